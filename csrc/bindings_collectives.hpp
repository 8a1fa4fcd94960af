// Registers shardline._shm.ShmCollectives; called from the module definition in bindings.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace shardline {

void bind_collectives(pybind11::module_& m);

}  // namespace shardline

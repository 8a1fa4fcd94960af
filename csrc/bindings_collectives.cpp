// Python bindings of the shared-memory collectives: shardline._shm.ShmCollectives.
// Tensors cross as (address, size) pairs: this module knows nothing of torch, and the
// Python wrapper (shardline.distributed.shm) checks device, layout and lifetime.
// Every call releases the GIL for its whole duration.
#include "bindings_collectives.hpp"

#include <cmath>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <pybind11/stl.h>

#include "py_wait.hpp"
#include "shm_collectives.hpp"

namespace py = pybind11;

namespace shardline {
namespace {

DType parse_dtype(const std::string& name) {
    std::optional<DType> dtype = dtype_from_name(name);
    if (!dtype) {
        throw std::invalid_argument("dtype '" + name + "' is not supported by the shared-memory all-reduce; "
                                    "supported: " + supported_dtype_names());
    }
    return *dtype;
}

void* address(uintptr_t value, uint64_t bytes, const char* argument) {
    if (value == 0 && bytes != 0) {
        throw std::invalid_argument(std::string(argument) + " is a null address for " + std::to_string(bytes) +
                                    " bytes");
    }
    return reinterpret_cast<void*>(value);
}

std::unique_ptr<ShmCollectives> with_interrupts(std::unique_ptr<ShmCollectives> group) {
    group->set_interrupt_check(&raise_pending_signals);
    return group;
}

}  // namespace

void bind_collectives(py::module_& m) {
    py::class_<ShmCollectives>(
        m, "ShmCollectives",
        "All-reduce and all-gather among the processes of one machine over one shared segment.\n"
        "Rank 0 creates it, ranks 1..n-1 attach by name; the last to attach unlinks the name.\n"
        "Buffers are passed as integer addresses (tensor.data_ptr()) that must stay valid and\n"
        "contiguous for the call. Waits raise PeerDied when a rank dies, RingClosed after this handle's\n"
        "close() or a failed collective on any rank (the ranks are out of step then), TimeoutError\n"
        "at the timeout.")
        .def_static(
            "create",
            [](int64_t n_ranks, int64_t buffer_bytes) {
                py::gil_scoped_release release;
                return with_interrupts(ShmCollectives::create(n_ranks, buffer_bytes));
            },
            py::arg("n_ranks"), py::arg("buffer_bytes"),
            "Rank 0: create a group of n_ranks ranks staging up to buffer_bytes per rank per step\n"
            "(a multiple of 64; larger inputs go through in pieces).")
        .def_static(
            "attach",
            [](const std::string& name, int64_t rank) {
                py::gil_scoped_release release;
                return with_interrupts(ShmCollectives::attach(name, rank));
            },
            py::arg("name"), py::arg("rank"), "Attach to the group `name` as rank (1 <= rank < n_ranks).")
        .def_property_readonly("name", &ShmCollectives::name)
        .def_property_readonly("rank", &ShmCollectives::rank)
        .def_property_readonly("n_ranks", &ShmCollectives::n_ranks)
        .def_property_readonly("buffer_bytes", &ShmCollectives::buffer_bytes)
        .def(
            "wait_attached",
            [](ShmCollectives& self, std::optional<double> timeout, std::optional<std::vector<int64_t>> pids) {
                Deadline deadline = deadline_from(timeout);
                std::vector<int64_t> expected = pids.value_or(std::vector<int64_t>{});
                py::gil_scoped_release release;
                self.wait_attached(deadline, expected);
            },
            py::arg("timeout") = py::none(), py::arg("pids") = py::none(),
            "Wait until every rank attached. pids: each rank's process id, in rank order, so that\n"
            "a rank dying before it attaches raises PeerDied instead of waiting for the timeout.")
        .def(
            "all_reduce",
            [](ShmCollectives& self, uintptr_t data, uint64_t count, const std::string& dtype,
               std::optional<double> timeout) {
                DType type = parse_dtype(dtype);
                void* ptr = address(data, count * dtype_size(type), "data");
                Deadline deadline = deadline_from(timeout);
                py::gil_scoped_release release;
                self.all_reduce(ptr, count, type, deadline);
            },
            py::arg("data"), py::arg("count"), py::arg("dtype"), py::arg("timeout") = py::none(),
            "Sum `count` elements of `dtype` at address `data` over all ranks, in place. Every rank\n"
            "gets the same bits: the sum runs in rank order (16-bit floats accumulate in fp32).")
        .def(
            "all_gather",
            [](ShmCollectives& self, uintptr_t input, uintptr_t output, uint64_t nbytes,
               std::optional<uint64_t> inner, std::optional<double> timeout) {
                const void* in = address(input, nbytes, "input");
                void* out = address(output, nbytes * self.n_ranks(), "output");
                Deadline deadline = deadline_from(timeout);
                uint64_t block = inner.value_or(nbytes);
                py::gil_scoped_release release;
                self.all_gather(in, out, nbytes, block, deadline);
            },
            py::arg("input"), py::arg("output"), py::arg("nbytes"), py::arg("inner") = py::none(),
            py::arg("timeout") = py::none(),
            "Gather every rank's nbytes at `input` into `output` (n_ranks * nbytes). The input is seen\n"
            "as blocks of `inner` bytes (default: one block) and the output as, for each block index,\n"
            "every rank's block in rank order: a concatenation along any dimension of a tensor.")
        .def("close", &ShmCollectives::close,
             "Close this rank's handle (later calls raise RingClosed). Peers are not told: they may still\n"
             "be finishing the last collective; they raise PeerDied once this process exits. Idempotent.")
        .def("__enter__", [](py::object self) { return self; })
        .def("__exit__", [](ShmCollectives& self, const py::args&) { self.close(); })
        .def("__repr__",
             [](ShmCollectives& self) {
                 return "<shardline._shm.ShmCollectives " + self.name() + " rank " + std::to_string(self.rank()) +
                        " of " + std::to_string(self.n_ranks()) + ", buffer_bytes=" +
                        std::to_string(self.buffer_bytes()) + ">";
             })
        .def_property_readonly_static(
            "dtypes", [](const py::object&) { return supported_dtype_names(); },
            "The dtypes all_reduce sums, comma-separated as torch names them.");
}

}  // namespace shardline

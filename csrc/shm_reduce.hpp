// The element types the shared-memory all-reduce sums, and the sum itself.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

namespace shardline {

enum class DType : uint32_t { kFloat32 = 1, kFloat64, kBFloat16, kFloat16, kInt32, kInt64 };

// Names as torch spells them (str(torch.float32) without "torch."); float16 only where
// the compiler has _Float16.
std::optional<DType> dtype_from_name(std::string_view name);
std::string dtype_name(DType dtype);
std::string supported_dtype_names();
size_t dtype_size(DType dtype);

// out[i] = srcs[0][i] + srcs[1][i] + ... + srcs[n_srcs - 1][i], summed left to right
// (16-bit floats in fp32, rounded once; integers wrap). out may alias any source.
void sum_into(void* out, const void* const* srcs, uint32_t n_srcs, uint64_t count, DType dtype);

}  // namespace shardline

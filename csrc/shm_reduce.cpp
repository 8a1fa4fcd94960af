#include "shm_reduce.hpp"

#include <algorithm>
#include <stdexcept>

#include "numeric.hpp"

namespace shardline {
namespace {

// Elements summed per block: the block's accumulator stays in L1 while every source
// is added to it, so each source is read once and the output written once.
constexpr uint64_t kBlock = 1024;

// One pass over every source: out[i] = ((s0[i] + s1[i]) + s2[i]) + ..., the number of
// sources fixed at compile time. Each group of kLanes elements is loaded from every
// source before it is stored, so out may alias a source element for element and the
// loop still vectorizes (no runtime overlap check falls back to scalar code).
template <class T, uint32_t N>
void sum_fixed(T* out, const T* const* srcs, uint64_t count) {
    using Acc = decltype(widen(T{}));
    constexpr uint64_t kLanes = 16;
    uint64_t i = 0;
    for (; i + kLanes <= count; i += kLanes) {
        Acc acc[kLanes];
        for (uint64_t k = 0; k < kLanes; ++k) acc[k] = widen(srcs[0][i + k]);
        for (uint32_t s = 1; s < N; ++s) {
            for (uint64_t k = 0; k < kLanes; ++k) acc[k] += widen(srcs[s][i + k]);
        }
        for (uint64_t k = 0; k < kLanes; ++k) out[i + k] = narrow<T, Acc>(acc[k]);
    }
    for (; i < count; ++i) {
        Acc acc = widen(srcs[0][i]);
        for (uint32_t s = 1; s < N; ++s) acc += widen(srcs[s][i]);
        out[i] = narrow<T, Acc>(acc);
    }
}

// Any number of sources: partial sums of up to kFanIn sources at a time, in order,
// each over a block that stays in L1.
template <class T>
void sum_any(T* out, const T* const* srcs, uint32_t n_srcs, uint64_t count) {
    using Acc = decltype(widen(T{}));
    Acc acc[kBlock];
    for (uint64_t start = 0; start < count; start += kBlock) {
        uint64_t n = std::min(kBlock, count - start);
        for (uint64_t i = 0; i < n; ++i) acc[i] = widen(srcs[0][start + i]);
        for (uint32_t k = 1; k < n_srcs; ++k) {
            const T* src = srcs[k] + start;
            for (uint64_t i = 0; i < n; ++i) acc[i] += widen(src[i]);
        }
        for (uint64_t i = 0; i < n; ++i) out[start + i] = narrow<T, Acc>(acc[i]);
    }
}

template <class T>
void sum_typed(void* out_raw, const void* const* srcs_raw, uint32_t n_srcs, uint64_t count) {
    auto* out = static_cast<T*>(out_raw);
    const auto* srcs = reinterpret_cast<const T* const*>(srcs_raw);
    switch (n_srcs) {
        case 1: return sum_fixed<T, 1>(out, srcs, count);
        case 2: return sum_fixed<T, 2>(out, srcs, count);
        case 3: return sum_fixed<T, 3>(out, srcs, count);
        case 4: return sum_fixed<T, 4>(out, srcs, count);
        case 8: return sum_fixed<T, 8>(out, srcs, count);
        default: return sum_any<T>(out, srcs, n_srcs, count);
    }
}

struct DTypeInfo {
    DType dtype;
    const char* name;
    size_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {DType::kFloat32, "float32", 4},
    {DType::kFloat64, "float64", 8},
    {DType::kBFloat16, "bfloat16", 2},
#ifdef __FLT16_MAX__
    {DType::kFloat16, "float16", 2},
#endif
    {DType::kInt32, "int32", 4},
    {DType::kInt64, "int64", 8},
};

const DTypeInfo& info(DType dtype) {
    for (const DTypeInfo& entry : kDTypes) {
        if (entry.dtype == dtype) return entry;
    }
    throw std::invalid_argument("dtype " + std::to_string(static_cast<uint32_t>(dtype)) +
                                " is not one of " + supported_dtype_names());
}

}  // namespace

std::optional<DType> dtype_from_name(std::string_view name) {
    for (const DTypeInfo& entry : kDTypes) {
        if (name == entry.name) return entry.dtype;
    }
    return std::nullopt;
}

std::string dtype_name(DType dtype) { return info(dtype).name; }

size_t dtype_size(DType dtype) { return info(dtype).size; }

std::string supported_dtype_names() {
    std::string names;
    for (const DTypeInfo& entry : kDTypes) {
        names += (names.empty() ? "" : ", ") + std::string(entry.name);
    }
    return names;
}

void sum_into(void* out, const void* const* srcs, uint32_t n_srcs, uint64_t count, DType dtype) {
    switch (dtype) {
        case DType::kFloat32: return sum_typed<float>(out, srcs, n_srcs, count);
        case DType::kFloat64: return sum_typed<double>(out, srcs, n_srcs, count);
        case DType::kBFloat16: return sum_typed<BFloat16>(out, srcs, n_srcs, count);
#ifdef __FLT16_MAX__
        case DType::kFloat16: return sum_typed<_Float16>(out, srcs, n_srcs, count);
#endif
        case DType::kInt32: return sum_typed<int32_t>(out, srcs, n_srcs, count);
        case DType::kInt64: return sum_typed<int64_t>(out, srcs, n_srcs, count);
        default: break;
    }
    throw std::invalid_argument("sum_into: dtype " + std::to_string(static_cast<uint32_t>(dtype)) +
                                " is not one of " + supported_dtype_names());
}

}  // namespace shardline

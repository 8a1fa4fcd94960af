// What the CPU kernels' vectorized loops share: the AVX2 clones of a hot function, and
// exp(x) for x <= 0 without a call per element (the softmax of paged_decode.cpp, the SiLU
// of elementwise.cpp).
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>

// An AVX2 clone of the function beside the baseline one, where CMakeLists.txt found that the
// compiler builds them (SHARDLINE_HAVE_TARGET_CLONES): the loader picks the one the CPU runs.
// `flatten` inlines the loops into each clone, so both are built for its instructions.
#ifdef SHARDLINE_HAVE_TARGET_CLONES
#define SHARDLINE_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default"), flatten))
#else
#define SHARDLINE_CPU_CLONES
#endif

namespace shardline::cpu {

// The bits of `from` read as a To (std::bit_cast, or a copy where the standard library
// predates it: GCC 10 takes -std=c++20 without it).
template <class To, class From>
inline To bits_as(From from) {
#ifdef __cpp_lib_bit_cast
    return std::bit_cast<To>(from);
#else
    To to;
    std::memcpy(&to, &from, sizeof(to));
    return to;
#endif
}

// exp(x) for x <= 0, -inf or NaN (a score minus the running max), branch-free so that the
// compiler vectorizes the loop that calls it (expf is a call per score): exp(x) = 2^n e^r
// with n = round(x / ln 2) and |r| <= ln(2) / 2, e^r by its Taylor series to r^7
// (relative error below 2e-7). Below about -87.7, where exp(x) is no longer a normal
// float, n is -127 and 2^n is 0, so -inf gives 0 exactly; NaN stays NaN.
inline float exp_nonpositive(float x) {
    const float clamped = std::max(x, -88.0f);  // NaN passes
    const float rounder = 12582912.0f;          // 1.5 * 2^23: adding it rounds to an integer
    const float shifted = clamped * 1.44269504f + rounder;
    const float n = shifted - rounder;
    const float r = (clamped - n * 0.693145752f) - n * 1.42860677e-6f;  // ln 2 in two parts
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    // 2^n from n + 127 as the exponent bits; n is shifted's low mantissa bits less rounder's.
    const uint32_t n_bits = bits_as<uint32_t>(shifted) - bits_as<uint32_t>(rounder);
    const float scale = bits_as<float>((n_bits + 127u) << 23);
    return p * scale;
}

}  // namespace shardline::cpu

// The element types the C++ code computes on, each widened to the type it is summed in
// and narrowed back: bfloat16 as raw bits (no compiler type for it), float16 as _Float16
// where the compiler has it.
#pragma once

#include <cstdint>
#include <cstring>

namespace shardline {

struct BFloat16 {
    uint16_t bits;
};

inline float widen(float x) { return x; }
inline double widen(double x) { return x; }
inline uint32_t widen(int32_t x) { return static_cast<uint32_t>(x); }
inline uint64_t widen(int64_t x) { return static_cast<uint64_t>(x); }
inline float widen(BFloat16 x) {
    uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}
#ifdef __FLT16_MAX__
inline float widen(_Float16 x) { return static_cast<float>(x); }
#endif

template <class T, class Acc>
inline T narrow(Acc x) {
    return static_cast<T>(x);
}

// Round to nearest even, as torch does; NaN stays a (quiet) NaN.
template <>
inline BFloat16 narrow<BFloat16, float>(float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    if ((bits & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((bits >> 16) | 0x40)};
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return BFloat16{static_cast<uint16_t>(bits >> 16)};
}

}  // namespace shardline

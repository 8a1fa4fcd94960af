#include "elementwise.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "simd.hpp"
#include "thread_pool.hpp"

namespace shardline::cpu {
namespace {

// Below this many bytes read and written per thread, waking a worker costs more than the
// share it takes (a call to the pool costs 6-12 us on 2 cores; 256 KiB of element-wise
// work, about 20-40 us).
constexpr int64_t kMinBytesPerThread = 256 << 10;

// fn(begin, end) over [0, rows) in up to `threads` contiguous runs of rows, each of at
// least kMinBytesPerThread when a row moves row_bytes.
template <class F>
void for_rows(int64_t rows, int64_t row_bytes, int threads, const F& fn) {
    const int64_t by_size = std::max<int64_t>(1, rows * row_bytes / kMinBytesPerThread);
    const int64_t parts = std::min<int64_t>({std::max(threads, 1), by_size, rows});
    if (parts <= 1) {
        if (rows > 0) fn(int64_t{0}, rows);
        return;
    }
    parallel_for(static_cast<size_t>(parts), [&](size_t part) {
        const int64_t p = static_cast<int64_t>(part);
        fn(rows * p / parts, rows * (p + 1) / parts);
    });
}

SHARDLINE_CPU_CLONES void rms_norm_rows(const float* x, const float* residual, const float* weight,
                                        float* out, float* sum, int64_t begin, int64_t end,
                                        int64_t hidden, float eps) {
    for (int64_t r = begin; r < end; ++r) {
        const float* xr = x + r * hidden;
        const float* s = xr;
        if (residual != nullptr) {
            const float* rr = residual + r * hidden;
            float* sr = sum + r * hidden;
#pragma omp simd
            for (int64_t i = 0; i < hidden; ++i) sr[i] = xr[i] + rr[i];
            s = sr;
        }
        // The squares summed in double: torch's float mean sums in several partial sums,
        // and neither order is the other's; double keeps this one's error far below both.
        double squares = 0.0;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < hidden; ++i) squares += static_cast<double>(s[i]) * s[i];
        const float inv = 1.0f / std::sqrt(static_cast<float>(squares / hidden) + eps);
        float* o = out + r * hidden;
#pragma omp simd
        for (int64_t i = 0; i < hidden; ++i) o[i] = (s[i] * inv) * weight[i];
    }
}

// SiLU(g) = g / (1 + exp(-g)), from e = exp(-|g|) so that exp's argument is never positive:
// g / (1 + e) for g >= 0, g * e / (1 + e) below (the same value, without exp(-g) overflowing).
SHARDLINE_CPU_CLONES void silu_mul_rows(const float* gate_up, float* out, int64_t begin,
                                        int64_t end, int64_t width) {
    for (int64_t r = begin; r < end; ++r) {
        const float* g = gate_up + r * 2 * width;
        const float* u = g + width;
        float* o = out + r * width;
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) {
            const float e = exp_nonpositive(-std::fabs(g[i]));
            const float silu = g[i] >= 0.0f ? g[i] / (1.0f + e) : g[i] * e / (1.0f + e);
            o[i] = silu * u[i];
        }
    }
}

// dst = src rotated: (a, b) of each pair (i, i + half) -> (a cos - b sin, b cos + a sin);
// elements past rot_dim copied. dst may not alias src.
inline void rotate_head(const float* src, float* dst, const float* cos, const float* sin,
                        int64_t half, int64_t head_dim) {
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
        const float a = src[i], b = src[i + half];
        dst[i] = a * cos[i] - b * sin[i];
        dst[i + half] = b * cos[i] + a * sin[i];
    }
    if (2 * half < head_dim) {
        std::memcpy(dst + 2 * half, src + 2 * half, (head_dim - 2 * half) * sizeof(float));
    }
}

SHARDLINE_CPU_CLONES void rotary_rows(const float* qkv, const int64_t* positions,
                                      const float* cos_sin, const int64_t* slot_mapping,
                                      float* q_out, float* k_cache, float* v_cache,
                                      const RotaryShape& s, int64_t begin, int64_t end) {
    const int64_t d = s.head_dim, half = s.rot_dim / 2;
    const int64_t kv_width = s.num_kv_heads * d;
    const int64_t row = s.num_heads * d + 2 * kv_width;
    for (int64_t t = begin; t < end; ++t) {
        const float* src = qkv + t * row;
        const float* cos = cos_sin + positions[t] * s.rot_dim;
        const float* sin = cos + half;
        for (int64_t h = 0; h < s.num_heads; ++h) {
            rotate_head(src + h * d, q_out + (t * s.num_heads + h) * d, cos, sin, half, d);
        }
        const int64_t slot = slot_mapping[t];
        if (slot < 0) continue;
        const float* k = src + s.num_heads * d;
        for (int64_t h = 0; h < s.num_kv_heads; ++h) {
            rotate_head(k + h * d, k_cache + slot * kv_width + h * d, cos, sin, half, d);
        }
        std::memcpy(v_cache + slot * kv_width, k + kv_width, kv_width * sizeof(float));
    }
}

void require(bool ok, const std::string& message) {
    if (!ok) throw std::invalid_argument(message);
}

}  // namespace

void rms_norm(const float* x, const float* residual, const float* weight, float* out,
              float* sum, int64_t rows, int64_t hidden, float eps, int threads) {
    require(rows >= 0 && hidden > 0, "rms_norm: rows " + std::to_string(rows) + " and hidden " +
                                         std::to_string(hidden) + " must be >= 0 and > 0");
    const int64_t row_bytes = (residual != nullptr ? 4 : 2) * hidden * 4;
    for_rows(rows, row_bytes, threads, [&](int64_t begin, int64_t end) {
        rms_norm_rows(x, residual, weight, out, sum, begin, end, hidden, eps);
    });
}

void silu_mul(const float* gate_up, float* out, int64_t rows, int64_t width, int threads) {
    require(rows >= 0 && width > 0, "silu_mul: rows " + std::to_string(rows) + " and width " +
                                         std::to_string(width) + " must be >= 0 and > 0");
    for_rows(rows, 3 * width * 4, threads, [&](int64_t begin, int64_t end) {
        silu_mul_rows(gate_up, out, begin, end, width);
    });
}

void rotary_write_kv(const float* qkv, const int64_t* positions, const float* cos_sin,
                     const int64_t* slot_mapping, float* q_out, float* k_cache, float* v_cache,
                     const RotaryShape& s, int threads) {
    require(s.tokens >= 0 && s.num_heads > 0 && s.num_kv_heads > 0 && s.head_dim > 0,
            "rotary_write_kv: tokens must be >= 0, heads and head_dim > 0");
    require(s.rot_dim > 0 && s.rot_dim % 2 == 0 && s.rot_dim <= s.head_dim,
            "rotary_write_kv: rot_dim " + std::to_string(s.rot_dim) +
                " must be even and in [2, head_dim " + std::to_string(s.head_dim) + "]");
    for (int64_t t = 0; t < s.tokens; ++t) {
        if (positions[t] < 0 || positions[t] >= s.max_position) {
            throw std::out_of_range("positions[" + std::to_string(t) + "] = " +
                                    std::to_string(positions[t]) + " is outside [0, " +
                                    std::to_string(s.max_position) + ") (the cos/sin table)");
        }
        if (slot_mapping[t] < -1 || slot_mapping[t] >= s.num_slots) {
            throw std::out_of_range("slot_mapping[" + std::to_string(t) + "] = " +
                                    std::to_string(slot_mapping[t]) + " is outside [-1, " +
                                    std::to_string(s.num_slots) + ")");
        }
    }
    const int64_t row_bytes = 2 * (s.num_heads + 2 * s.num_kv_heads) * s.head_dim * 4;
    for_rows(s.tokens, row_bytes, threads, [&](int64_t begin, int64_t end) {
        rotary_rows(qkv, positions, cos_sin, slot_mapping, q_out, k_cache, v_cache, s, begin, end);
    });
}

}  // namespace shardline::cpu

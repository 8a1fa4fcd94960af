// The element-wise passes of a decoder layer on the CPU in fp32, each one pass over its
// rows where torch runs several ops with a temporary between each: the residual add and
// RMSNorm, SiLU(gate) * up, and the rotary embedding of q and k with the KV-cache write.
// Rows are split over threads (thread_pool.hpp) only where they are many.
#pragma once

#include <cstdint>

namespace shardline::cpu {

// out[r] = s / sqrt(mean(s * s) + eps) * weight for s = x[r] (+ residual[r]), and with a
// residual, sum[r] = s (sum may be x itself: each row is read before it is written).
// x, residual, sum and out are [rows, hidden], contiguous; out may not alias the others.
void rms_norm(const float* x, const float* residual, const float* weight, float* out,
              float* sum, int64_t rows, int64_t hidden, float eps, int threads);

// out[r, i] = SiLU(gate_up[r, i]) * gate_up[r, width + i] for i < width: gate_up is
// [rows, 2 * width], out [rows, width], both contiguous.
void silu_mul(const float* gate_up, float* out, int64_t rows, int64_t width, int threads);

// Shapes of one rotary_write_kv call: qkv rows hold num_heads query heads, then
// num_kv_heads key heads, then as many value heads, head_dim each; the first rot_dim
// elements of each q and k head rotate (neox pairing: i with i + rot_dim / 2).
struct RotaryShape {
    int64_t tokens;
    int64_t num_heads;
    int64_t num_kv_heads;
    int64_t head_dim;
    int64_t rot_dim;
    int64_t max_position;  // rows of the cos/sin table
    int64_t num_slots;     // num_blocks * block_size of each cache
};

// For token t at position positions[t]: q_out[t] = q rotated; k rotated and v stored at
// slot slot_mapping[t] of k_cache and v_cache ([num_slots, num_kv_heads, head_dim]), a
// slot of -1 skipped. cos_sin is [max_position, rot_dim]: cos, then sin. Raises
// std::out_of_range for a position or slot outside its range, before writing anything.
void rotary_write_kv(const float* qkv, const int64_t* positions, const float* cos_sin,
                     const int64_t* slot_mapping, float* q_out, float* k_cache, float* v_cache,
                     const RotaryShape& shape, int threads);

}  // namespace shardline::cpu

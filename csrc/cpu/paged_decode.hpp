// Paged decode attention on the CPU: one query token per sequence, attending over that
// sequence's KV cache where its blocks lie, without gathering them into a contiguous copy.
#pragma once

#include <cstdint>
#include <string>

namespace shardline::cpu {

enum class ElementType { kFloat32, kBFloat16, kFloat16 };

// The dtype names (as torch spells them) this build computes on, comma-separated.
std::string supported_dtypes();

// Shapes of one call. q and out are [batch, num_heads, head_dim]; each cache is
// [num_blocks, block_size, num_kv_heads, head_dim]; block_tables is [batch, max_blocks]
// with rows table_stride elements apart (rows may overlap: 0 shares one row among all
// sequences); all contiguous otherwise. Query head h reads KV head
// h / (num_heads / num_kv_heads).
struct DecodeShape {
    int64_t batch;
    int64_t num_heads;
    int64_t num_kv_heads;
    int64_t head_dim;
    int64_t block_size;
    int64_t num_blocks;
    int64_t max_blocks;
    int64_t table_stride;
};

// Raises std::invalid_argument for inconsistent shapes or a negative or too long sequence,
// std::out_of_range for a block id outside [0, num_blocks), before any work starts.
// A sequence of length 0 gets zeros, and so does a head whose scores are all -inf (as
// in the reference's SDPA). Runs on up to `threads` threads (the caller's one and the
// process's workers, thread_pool.hpp), and with min_bytes_per_thread > 0 on no more than
// one per that many bytes of K and V.
void paged_decode_attention(ElementType type, const void* q, const void* k_cache,
                            const void* v_cache, const int32_t* block_tables,
                            const int32_t* seq_lens, void* out, const DecodeShape& shape,
                            float scale, int threads, int64_t min_bytes_per_thread);

}  // namespace shardline::cpu

#include "paged_decode.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "numeric.hpp"
#include "simd.hpp"
#include "thread_pool.hpp"

namespace shardline::cpu {
namespace {

void require(bool ok, const std::string& message) {
    if (!ok) throw std::invalid_argument(message);
}

void check(const DecodeShape& s, const int32_t* block_tables, const int32_t* seq_lens) {
    require(s.batch >= 0 && s.num_heads > 0 && s.num_kv_heads > 0 && s.head_dim > 0 &&
                s.block_size > 0 && s.num_blocks >= 0 && s.max_blocks >= 0,
            "every dimension must be positive (batch, num_blocks and max_blocks may be 0)");
    require(s.num_heads % s.num_kv_heads == 0,
            "num_heads " + std::to_string(s.num_heads) + " is not a multiple of num_kv_heads " +
                std::to_string(s.num_kv_heads));
    require(s.table_stride >= 0, "table_stride " + std::to_string(s.table_stride) + " is negative");
    for (int64_t b = 0; b < s.batch; ++b) {
        int64_t len = seq_lens[b];
        require(len >= 0 && len <= s.max_blocks * s.block_size,
                "seq_lens[" + std::to_string(b) + "] = " + std::to_string(len) + " is outside [0, " +
                    std::to_string(s.max_blocks * s.block_size) + "] (max_blocks * block_size)");
        const int32_t* row = block_tables + b * s.table_stride;
        for (int64_t i = 0; i * s.block_size < len; ++i) {
            if (row[i] < 0 || row[i] >= s.num_blocks) {
                throw std::out_of_range("block_tables[" + std::to_string(b) + ", " + std::to_string(i) +
                                        "] = " + std::to_string(row[i]) + " is outside [0, " +
                                        std::to_string(s.num_blocks) + ")");
            }
        }
    }
}

// The blocks of a sequence lie anywhere in the cache, so the hardware cannot guess the
// next one. Its K and V rows are asked for while the current block is computed, a few
// cache lines per step of that work: asked for all at once, they fill the core's miss
// buffers and the core waits on them.
template <class T>
class BlockPrefetch {
public:
    // The next block's n rows of K and V (row_bytes each, token_stride elements apart),
    // spread over `steps` calls of step().
    void start(const T* k, const T* v, int64_t token_stride, int64_t n, int64_t row_bytes, int64_t steps) {
        row_ = reinterpret_cast<const char*>(k);
        v_ = reinterpret_cast<const char*>(v);
        token_bytes_ = token_stride * static_cast<int64_t>(sizeof(T));
        row_bytes_ = row_bytes;
        n_ = rows_left_ = n;
        offset_ = 0;
        per_step_ = (2 * n * ((row_bytes + 63) / 64) + steps - 1) / std::max<int64_t>(steps, 1);
    }
    void stop() { row_ = nullptr; }
    void step() { issue(per_step_); }
    // Whatever the steps left (a block's last tokens take no step).
    void finish() { issue(std::numeric_limits<int64_t>::max()); }

private:
    // Into L2, not L1: the core can wait on many more L2 misses at once, and the current
    // block's rows keep L1.
    void issue(int64_t lines) {
        for (; lines > 0 && row_ != nullptr; --lines) {
            __builtin_prefetch(row_ + offset_, 0, 2);
            offset_ += 64;
            if (offset_ < row_bytes_) continue;
            offset_ = 0;
            row_ += token_bytes_;
            if (--rows_left_ > 0) continue;
            row_ = v_;  // K's rows are done: V's next, then nothing
            v_ = nullptr;
            rows_left_ = n_;
        }
    }

    const char* row_ = nullptr;
    const char* v_ = nullptr;
    int64_t token_bytes_ = 0, row_bytes_ = 0, n_ = 0, rows_left_ = 0, offset_ = 0, per_step_ = 0;
};

// One work item: a sequence's query heads of the KV heads [first, last), with a running
// max and sum per query head, rescaled once per block rather than once per token. The
// next block's rows are fetched into L2 while this one is computed, 16-bit rows are
// widened once per block for all of the KV head's query heads, both products step four
// tokens at a time, and the block's exps are vectorized (what each gained:
// bench/README.md, cpu_attention.py).
template <class T>
class HeadsAttention {
public:
    HeadsAttention(const DecodeShape& shape, float scale)
        : s_(shape), group_(shape.num_heads / shape.num_kv_heads), scale_(scale),
          q_(shape.num_heads * shape.head_dim), acc_(shape.num_heads * shape.head_dim),
          scores_(shape.num_heads * shape.block_size), max_(shape.num_heads), sum_(shape.num_heads),
          rows_(std::is_same_v<T, float> ? 0 : shape.block_size * shape.num_kv_heads * shape.head_dim) {}

    // q and out point at the sequence's first query head of KV head `first`.
    void run(const T* q, const T* k_cache, const T* v_cache, const int32_t* table, int64_t len,
             int64_t first, int64_t last, T* out) {
        const int64_t d = s_.head_dim;
        heads_ = (last - first) * group_;
        for (int64_t i = 0; i < heads_ * d; ++i) q_[i] = widen(q[i]) * scale_;
        std::fill_n(acc_.begin(), heads_ * d, 0.0f);
        std::fill_n(max_.begin(), heads_, -std::numeric_limits<float>::infinity());
        std::fill_n(sum_.begin(), heads_, 0.0f);
        const int64_t token_stride = s_.num_kv_heads * d;
        const int64_t width = (last - first) * d;  // the item's part of a token's row
        const int64_t row_bytes = width * static_cast<int64_t>(sizeof(T));
        auto block_base = [&](int64_t start) {
            return static_cast<int64_t>(table[start / s_.block_size]) * s_.block_size * token_stride +
                   first * d;
        };
        for (int64_t start = 0; start < len; start += s_.block_size) {
            const int64_t n = std::min(s_.block_size, len - start);
            const int64_t base = block_base(start);
            const int64_t next = start + s_.block_size;
            if (next < len) {
                prefetch_.start(k_cache + block_base(next), v_cache + block_base(next), token_stride,
                                std::min(s_.block_size, len - next), row_bytes,
                                2 * heads_ * ((n + 3) / 4));
            } else {
                prefetch_.stop();
            }
            int64_t stride = 0;
            const float* k = as_float(k_cache + base, token_stride, n, width, stride);
            score_block(k, stride, n);
            update_softmax(n);
            const float* v = as_float(v_cache + base, token_stride, n, width, stride);
            accumulate_block(v, stride, n);
            prefetch_.finish();
        }
        for (int64_t h = 0; h < heads_; ++h) {
            // No weight at all (no tokens, or every score -inf) gives zeros, as the reference's
            // SDPA does; a NaN sum comes with a NaN accumulator and stays NaN.
            const float inv = sum_[h] > 0.0f ? 1.0f / sum_[h] : 0.0f;
            for (int64_t i = 0; i < d; ++i) out[h * d + i] = narrow<T, float>(acc_[h * d + i] * inv);
        }
    }

private:
    // The block's rows of the item's KV heads in fp32, `stride` floats apart: the cache
    // itself for fp32, else a copy widened once (each of a KV head's query heads would
    // otherwise widen every element again).
    const float* as_float(const T* rows, int64_t ts, int64_t n, int64_t width, int64_t& stride) {
        if constexpr (std::is_same_v<T, float>) {
            stride = ts;
            return rows;
        } else {
            for (int64_t t = 0; t < n; ++t) {
                const T* src = rows + t * ts;
                float* dst = rows_.data() + t * width;
#pragma omp simd
                for (int64_t i = 0; i < width; ++i) dst[i] = widen(src[i]);
            }
            stride = width;
            return rows_.data();
        }
    }

    // scores[h][t] = q[h] . k[t] for the block's n tokens; query head h reads KV head h / group.
    // Four tokens at a time: four independent sums keep the adder busy, where one dot
    // product at a time waited on its own additions.
    void score_block(const float* k, int64_t ts, int64_t n) {
        const int64_t d = s_.head_dim;
        for (int64_t h = 0; h < heads_; ++h) {
            const float* qh = q_.data() + h * d;
            const float* kh = k + (h / group_) * d;
            float* sh = scores_.data() + h * s_.block_size;
            int64_t t = 0;
            for (; t + 4 <= n; t += 4) {
                prefetch_.step();
                const float *k0 = kh + t * ts, *k1 = k0 + ts, *k2 = k1 + ts, *k3 = k2 + ts;
                float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
                for (int64_t i = 0; i < d; ++i) {
                    const float qi = qh[i];
                    s0 += qi * k0[i];
                    s1 += qi * k1[i];
                    s2 += qi * k2[i];
                    s3 += qi * k3[i];
                }
                sh[t] = s0;
                sh[t + 1] = s1;
                sh[t + 2] = s2;
                sh[t + 3] = s3;
            }
            for (; t < n; ++t) {
                const float* kt = kh + t * ts;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t i = 0; i < d; ++i) dot += qh[i] * kt[i];
                sh[t] = dot;
            }
        }
    }

    // Scores become weights against the new running max; what was summed so far is rescaled.
    // While every score so far is -inf, the weights are 0 (as in torch's softmax), not the
    // NaN of exp(-inf - -inf); a NaN score (which the max skips) stays NaN, as in torch.
    void update_softmax(int64_t n) {
        const int64_t d = s_.head_dim;
        for (int64_t h = 0; h < heads_; ++h) {
            float* sh = scores_.data() + h * s_.block_size;
            const float new_max = std::max(max_[h], *std::max_element(sh, sh + n));
            if (new_max == -std::numeric_limits<float>::infinity()) {
                for (int64_t t = 0; t < n; ++t) {
                    sh[t] = std::isnan(sh[t]) ? sh[t] : 0.0f;
                    sum_[h] += sh[t];
                }
                continue;
            }
            const float correction = std::exp(max_[h] - new_max);  // exp(-inf) = 0 at the start
            float* ah = acc_.data() + h * d;
            for (int64_t i = 0; i < d; ++i) ah[i] *= correction;
            float block_sum = 0.0f;
#pragma omp simd reduction(+ : block_sum)
            for (int64_t t = 0; t < n; ++t) {
                sh[t] = exp_nonpositive(sh[t] - new_max);
                block_sum += sh[t];
            }
            sum_[h] = sum_[h] * correction + block_sum;
            max_[h] = new_max;
        }
    }

    // acc[h] += sum over the block's tokens of weight[h][t] * v[t], four tokens per pass
    // over acc[h], so it is loaded and stored once per four rows.
    void accumulate_block(const float* v, int64_t ts, int64_t n) {
        const int64_t d = s_.head_dim;
        for (int64_t h = 0; h < heads_; ++h) {
            const float* p = scores_.data() + h * s_.block_size;
            const float* vh = v + (h / group_) * d;
            float* ah = acc_.data() + h * d;
            int64_t t = 0;
            for (; t + 4 <= n; t += 4) {
                prefetch_.step();
                const float *v0 = vh + t * ts, *v1 = v0 + ts, *v2 = v1 + ts, *v3 = v2 + ts;
                const float p0 = p[t], p1 = p[t + 1], p2 = p[t + 2], p3 = p[t + 3];
#pragma omp simd
                for (int64_t i = 0; i < d; ++i) {
                    ah[i] += p0 * v0[i] + p1 * v1[i] + p2 * v2[i] + p3 * v3[i];
                }
            }
            for (; t < n; ++t) {
                const float* vt = vh + t * ts;
                const float pt = p[t];
#pragma omp simd
                for (int64_t i = 0; i < d; ++i) ah[i] += pt * vt[i];
            }
        }
    }

    const DecodeShape& s_;
    BlockPrefetch<T> prefetch_;
    const int64_t group_;
    const float scale_;
    int64_t heads_ = 0;
    std::vector<float> q_, acc_, scores_, max_, sum_, rows_;
};

// A work item is a sequence's KV heads [first, last). Whole sequences while there are at
// least as many as threads; fewer sequences split their heads so every thread has work.
struct WorkItem {
    int64_t seq, first, last;
};

std::vector<WorkItem> work_items(const DecodeShape& s, int threads) {
    const int64_t splits = s.batch >= threads ? 1 : std::min<int64_t>(s.num_kv_heads, (threads + s.batch - 1) / s.batch);
    const int64_t per_item = (s.num_kv_heads + splits - 1) / splits;
    std::vector<WorkItem> items;
    for (int64_t b = 0; b < s.batch; ++b) {
        for (int64_t first = 0; first < s.num_kv_heads; first += per_item) {
            items.push_back({b, first, std::min(first + per_item, s.num_kv_heads)});
        }
    }
    return items;
}

// Each thread takes a contiguous run of items holding about an equal share of the rows.
std::vector<size_t> split_by_rows(const std::vector<WorkItem>& items, const int32_t* seq_lens, int threads) {
    auto rows = [&](const WorkItem& item) { return (static_cast<int64_t>(seq_lens[item.seq]) + 1) * (item.last - item.first); };
    int64_t total = 0;
    for (const WorkItem& item : items) total += rows(item);
    std::vector<size_t> bounds{0};
    int64_t done = 0;
    for (size_t i = 0; i < items.size() && static_cast<int>(bounds.size()) < threads; ++i) {
        done += rows(items[i]);
        if (done * threads >= total * static_cast<int64_t>(bounds.size())) bounds.push_back(i + 1);
    }
    if (bounds.back() != items.size()) bounds.push_back(items.size());
    return bounds;
}

// The items [begin, end) on the calling thread. On x86-64 this is compiled twice, for
// AVX2 with FMA and for the baseline, and the loader picks the clone the CPU runs: 8-wide
// fused multiply-adds made the kernel 1.3x faster where query heads share a KV head.
// `flatten` inlines the loops into each clone, so both are built for its instructions.
template <class T>
SHARDLINE_CPU_CLONES void run_items(const T* q, const T* k_cache, const T* v_cache,
                                    const int32_t* block_tables, const int32_t* seq_lens, T* out,
                                    const DecodeShape& s, float scale, const WorkItem* begin,
                                    const WorkItem* end) {
    const int64_t group = s.num_heads / s.num_kv_heads;
    HeadsAttention<T> attention(s, scale);
    for (const WorkItem* item = begin; item != end; ++item) {
        const int64_t offset = (item->seq * s.num_heads + item->first * group) * s.head_dim;
        attention.run(q + offset, k_cache, v_cache, block_tables + item->seq * s.table_stride,
                      seq_lens[item->seq], item->first, item->last, out + offset);
    }
}

template <class T>
void run_typed(const T* q, const T* k_cache, const T* v_cache, const int32_t* block_tables,
               const int32_t* seq_lens, T* out, const DecodeShape& s, float scale, int threads) {
    const std::vector<WorkItem> items = work_items(s, threads);
    const std::vector<size_t> bounds = split_by_rows(items, seq_lens, threads);
    parallel_for(bounds.size() - 1, [&](size_t range) {
        run_items(q, k_cache, v_cache, block_tables, seq_lens, out, s, scale,
                  items.data() + bounds[range], items.data() + bounds[range + 1]);
    });
}

int64_t kv_bytes(ElementType type, const DecodeShape& s, const int32_t* seq_lens) {
    int64_t tokens = 0;
    for (int64_t b = 0; b < s.batch; ++b) tokens += seq_lens[b];
    return 2 * tokens * s.num_kv_heads * s.head_dim * (type == ElementType::kFloat32 ? 4 : 2);
}

}  // namespace

std::string supported_dtypes() {
#ifdef __FLT16_MAX__
    return "float32, bfloat16, float16";
#else
    return "float32, bfloat16";
#endif
}

void paged_decode_attention(ElementType type, const void* q, const void* k_cache,
                            const void* v_cache, const int32_t* block_tables,
                            const int32_t* seq_lens, void* out, const DecodeShape& shape,
                            float scale, int threads, int64_t min_bytes_per_thread) {
    check(shape, block_tables, seq_lens);
    if (shape.batch == 0) return;
    threads = std::max(threads, 1);
    if (min_bytes_per_thread > 0) {
        threads = static_cast<int>(std::min<int64_t>(
            threads, std::max<int64_t>(1, kv_bytes(type, shape, seq_lens) / min_bytes_per_thread)));
    }
    switch (type) {
        case ElementType::kFloat32:
            return run_typed(static_cast<const float*>(q), static_cast<const float*>(k_cache),
                             static_cast<const float*>(v_cache), block_tables, seq_lens,
                             static_cast<float*>(out), shape, scale, threads);
        case ElementType::kBFloat16:
            return run_typed(static_cast<const BFloat16*>(q), static_cast<const BFloat16*>(k_cache),
                             static_cast<const BFloat16*>(v_cache), block_tables, seq_lens,
                             static_cast<BFloat16*>(out), shape, scale, threads);
        case ElementType::kFloat16:
#ifdef __FLT16_MAX__
            return run_typed(static_cast<const _Float16*>(q), static_cast<const _Float16*>(k_cache),
                             static_cast<const _Float16*>(v_cache), block_tables, seq_lens,
                             static_cast<_Float16*>(out), shape, scale, threads);
#else
            throw std::invalid_argument("float16 is not supported: this compiler has no _Float16");
#endif
    }
    throw std::invalid_argument("unknown element type");
}

}  // namespace shardline::cpu

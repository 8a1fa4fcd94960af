#include "paged_decode.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "numeric.hpp"

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
    require(s.table_stride >= s.max_blocks, "table_stride " + std::to_string(s.table_stride) +
                                                " is below max_blocks " + std::to_string(s.max_blocks));
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

// One work item: a sequence's query heads of the KV heads [first, last), with a running
// max and sum per query head, rescaled once per block rather than once per token. Each
// token's K (and V) row is read for all of the item's KV heads at once: the heads of a
// token are adjacent in the cache, and a row read head by head, stride apart, ran at half
// the speed.
template <class T>
class HeadsAttention {
public:
    HeadsAttention(const DecodeShape& shape, float scale)
        : s_(shape), group_(shape.num_heads / shape.num_kv_heads), scale_(scale),
          q_(shape.num_heads * shape.head_dim), acc_(shape.num_heads * shape.head_dim),
          scores_(shape.num_heads * shape.block_size), max_(shape.num_heads), sum_(shape.num_heads) {}

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
        for (int64_t start = 0; start < len; start += s_.block_size) {
            const int64_t n = std::min(s_.block_size, len - start);
            const int64_t base = static_cast<int64_t>(table[start / s_.block_size]) * s_.block_size *
                                     token_stride + first * d;
            score_block(k_cache + base, token_stride, n);
            update_softmax(n);
            accumulate_block(v_cache + base, token_stride, n);
        }
        for (int64_t h = 0; h < heads_; ++h) {
            const float inv = len > 0 ? 1.0f / sum_[h] : 0.0f;
            for (int64_t i = 0; i < d; ++i) out[h * d + i] = narrow<T, float>(acc_[h * d + i] * inv);
        }
    }

private:
    // scores[h][t] = q[h] . k[t] for the block's n tokens; query head h reads KV head h / group.
    void score_block(const T* k, int64_t token_stride, int64_t n) {
        const int64_t d = s_.head_dim;
        for (int64_t t = 0; t < n; ++t) {
            const T* row = k + t * token_stride;
            for (int64_t h = 0; h < heads_; ++h) {
                const float* qh = q_.data() + h * d;
                const T* kh = row + (h / group_) * d;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t i = 0; i < d; ++i) dot += qh[i] * widen(kh[i]);
                scores_[h * s_.block_size + t] = dot;
            }
        }
    }

    // Scores become weights against the new running max; what was summed so far is rescaled.
    void update_softmax(int64_t n) {
        const int64_t d = s_.head_dim;
        for (int64_t h = 0; h < heads_; ++h) {
            float* sh = scores_.data() + h * s_.block_size;
            const float new_max = std::max(max_[h], *std::max_element(sh, sh + n));
            const float correction = std::exp(max_[h] - new_max);  // exp(-inf) = 0 at the start
            float* ah = acc_.data() + h * d;
            for (int64_t i = 0; i < d; ++i) ah[i] *= correction;
            float block_sum = 0.0f;
            for (int64_t t = 0; t < n; ++t) {
                sh[t] = std::exp(sh[t] - new_max);
                block_sum += sh[t];
            }
            sum_[h] = sum_[h] * correction + block_sum;
            max_[h] = new_max;
        }
    }

    void accumulate_block(const T* v, int64_t token_stride, int64_t n) {
        const int64_t d = s_.head_dim;
        for (int64_t t = 0; t < n; ++t) {
            const T* row = v + t * token_stride;
            for (int64_t h = 0; h < heads_; ++h) {
                const float p = scores_[h * s_.block_size + t];
                const T* vh = row + (h / group_) * d;
                float* ah = acc_.data() + h * d;
#pragma omp simd
                for (int64_t i = 0; i < d; ++i) ah[i] += p * widen(vh[i]);
            }
        }
    }

    const DecodeShape& s_;
    const int64_t group_;
    const float scale_;
    int64_t heads_ = 0;
    std::vector<float> q_, acc_, scores_, max_, sum_;
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
    auto rows = [&](const WorkItem& item) { return (seq_lens[item.seq] + 1) * (item.last - item.first); };
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

template <class T>
void run_typed(const T* q, const T* k_cache, const T* v_cache, const int32_t* block_tables,
               const int32_t* seq_lens, T* out, const DecodeShape& s, float scale, int threads) {
    const int64_t group = s.num_heads / s.num_kv_heads;
    const std::vector<WorkItem> items = work_items(s, threads);
    auto work = [&](size_t begin, size_t end) {
        HeadsAttention<T> attention(s, scale);
        for (size_t i = begin; i < end; ++i) {
            const WorkItem& item = items[i];
            const int64_t offset = (item.seq * s.num_heads + item.first * group) * s.head_dim;
            attention.run(q + offset, k_cache, v_cache, block_tables + item.seq * s.table_stride,
                          seq_lens[item.seq], item.first, item.last, out + offset);
        }
    };
    const std::vector<size_t> bounds = split_by_rows(items, seq_lens, threads);
    std::vector<std::thread> helpers;
    for (size_t i = 1; i + 1 < bounds.size(); ++i) helpers.emplace_back(work, bounds[i], bounds[i + 1]);
    work(bounds[0], bounds.size() > 1 ? bounds[1] : 0);
    for (std::thread& helper : helpers) helper.join();
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

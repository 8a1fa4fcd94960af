// Python bindings: shardline._cpu_kernels, the CPU kernels the torch reference is too slow
// for. Tensors cross as integer addresses (tensor.data_ptr()); the Python wrapper
// (shardline.kernels.cpu_attention) checks devices, dtypes, layouts and lifetimes.
// Every call releases the GIL for its whole duration.
#include <cstdint>
#include <string>

#include <pybind11/pybind11.h>

#include "elementwise.hpp"
#include "paged_decode.hpp"

namespace py = pybind11;
using namespace shardline::cpu;

namespace {

ElementType element_type(const std::string& name) {
    if (name == "float32") return ElementType::kFloat32;
    if (name == "bfloat16") return ElementType::kBFloat16;
#ifdef __FLT16_MAX__
    if (name == "float16") return ElementType::kFloat16;
#endif
    throw py::value_error("dtype '" + name + "' is not supported; supported: " + supported_dtypes());
}

template <class T>
T* at(uintptr_t address) {
    return reinterpret_cast<T*>(address);
}

}  // namespace

PYBIND11_MODULE(_cpu_kernels, m) {
    m.doc() = "CPU kernels of shardline (paged decode attention, fused element-wise passes).";
    m.attr("SUPPORTED_DTYPES") = py::str(supported_dtypes());
    m.def(
        "paged_decode_attention",
        [](const std::string& dtype, uintptr_t q, uintptr_t k_cache, uintptr_t v_cache,
           uintptr_t block_tables, uintptr_t seq_lens, uintptr_t out, int64_t batch,
           int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
           int64_t num_blocks, int64_t max_blocks, int64_t table_stride, float scale, int threads,
           int64_t min_bytes_per_thread) {
            ElementType type = element_type(dtype);
            DecodeShape shape{batch, num_heads, num_kv_heads, head_dim, block_size, num_blocks,
                              max_blocks, table_stride};
            py::gil_scoped_release release;
            paged_decode_attention(type, at<const void>(q), at<const void>(k_cache),
                                   at<const void>(v_cache), at<const int32_t>(block_tables),
                                   at<const int32_t>(seq_lens), at<void>(out), shape, scale, threads,
                                   min_bytes_per_thread);
        },
        py::arg("dtype"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("seq_lens"), py::arg("out"), py::arg("batch"), py::arg("num_heads"), py::arg("num_kv_heads"),
        py::arg("head_dim"), py::arg("block_size"), py::arg("num_blocks"), py::arg("max_blocks"),
        py::arg("table_stride"), py::arg("scale"), py::arg("threads"), py::arg("min_bytes_per_thread"),
        "out[b, h] = softmax(q[b, h] . K_b^T * scale) V_b over sequence b's first seq_lens[b] cached\n"
        "tokens, read in place through its block table row. Addresses of contiguous tensors: q and\n"
        "out [batch, num_heads, head_dim] of `dtype`, caches [num_blocks, block_size, num_kv_heads,\n"
        "head_dim] of `dtype`, block_tables int32 rows of table_stride, seq_lens int32 [batch]. Up to\n"
        "`threads` threads, and with min_bytes_per_thread > 0 one per that many bytes of K and V at most.\n"
        "Raises ValueError for a bad shape or length, IndexError for a block id out of range.");
    m.def(
        "rms_norm",
        [](uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t out, uintptr_t sum,
           int64_t rows, int64_t hidden, float eps, int threads) {
            py::gil_scoped_release release;
            rms_norm(at<const float>(x), at<const float>(residual), at<const float>(weight),
                     at<float>(out), at<float>(sum), rows, hidden, eps, threads);
        },
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("out"), py::arg("sum"),
        py::arg("rows"), py::arg("hidden"), py::arg("eps"), py::arg("threads"),
        "out = RMSNorm(s) * weight for s = x (+ residual, stored in sum, which may be x) of\n"
        "contiguous fp32 [rows, hidden]; residual 0 for none.");
    m.def(
        "silu_mul",
        [](uintptr_t gate_up, uintptr_t out, int64_t rows, int64_t width, int threads) {
            py::gil_scoped_release release;
            silu_mul(at<const float>(gate_up), at<float>(out), rows, width, threads);
        },
        py::arg("gate_up"), py::arg("out"), py::arg("rows"), py::arg("width"), py::arg("threads"),
        "out [rows, width] = SiLU(gate) * up of contiguous fp32 gate_up [rows, 2 * width].");
    m.def(
        "rotary_write_kv",
        [](uintptr_t qkv, uintptr_t positions, uintptr_t cos_sin, uintptr_t slot_mapping,
           uintptr_t q_out, uintptr_t k_cache, uintptr_t v_cache, int64_t tokens, int64_t num_heads,
           int64_t num_kv_heads, int64_t head_dim, int64_t rot_dim, int64_t max_position,
           int64_t num_slots, int threads) {
            RotaryShape shape{tokens,  num_heads,    num_kv_heads, head_dim,
                              rot_dim, max_position, num_slots};
            py::gil_scoped_release release;
            rotary_write_kv(at<const float>(qkv), at<const int64_t>(positions),
                            at<const float>(cos_sin), at<const int64_t>(slot_mapping),
                            at<float>(q_out), at<float>(k_cache), at<float>(v_cache), shape,
                            threads);
        },
        py::arg("qkv"), py::arg("positions"), py::arg("cos_sin"), py::arg("slot_mapping"),
        py::arg("q_out"), py::arg("k_cache"), py::arg("v_cache"), py::arg("tokens"),
        py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("rot_dim"),
        py::arg("max_position"), py::arg("num_slots"), py::arg("threads"),
        "Neox rotary of q and k of contiguous fp32 qkv rows [tokens, (Hq + 2 Hk) head_dim]: q\n"
        "into q_out [tokens, Hq, head_dim], k rotated and v stored at their int64 slots of the\n"
        "caches (-1 skipped). Raises IndexError for a position or slot out of range.");
}

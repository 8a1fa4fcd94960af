// Python bindings: shardline._cpu_kernels, the CPU kernels the torch reference is too slow
// for. Tensors cross as integer addresses (tensor.data_ptr()); the Python wrapper
// (shardline.kernels.cpu_attention) checks devices, dtypes, layouts and lifetimes.
// Every call releases the GIL for its whole duration.
#include <cstdint>
#include <string>

#include <pybind11/pybind11.h>

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
    m.doc() = "CPU kernels of shardline (paged decode attention).";
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
}

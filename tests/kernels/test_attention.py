"""The Triton paged attention kernels (decode with split-KV, varlen prefill over a cached
prefix) against their torch references."""

import os
import subprocess
import sys

import pytest
import torch

from checks import DEVICES, assert_close, dtypes, force_triton, paged_cache

from shardline import kernels
from shardline.kernels import reference

pytest.importorskip("triton")

from shardline.kernels import attention_decode as decode
from shardline.kernels import attention_prefill as prefill

pytestmark = pytest.mark.usefixtures("fresh_seed")

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# (KV heads, query heads per KV head, head size, cache block size)
LAYOUTS = [(2, 1, 64, 16), (1, 2, 80, 32), (2, 4, 64, 16), (1, 8, 96, 16), (1, 4, 64, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_matches_reference(device, layout):
    num_kv_heads, group, head_dim, block_size = layout
    lengths = [1, block_size * 2, int(torch.randint(2, 70, ()))]
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    for dtype in dtypes(device):
        k_cache, v_cache, block_tables = paged_cache(lengths, num_kv_heads, head_dim,
                                                     block_size, dtype, device)
        q = torch.randn(len(lengths), num_kv_heads * group, head_dim, dtype=dtype,
                        device=device)
        expected = reference.paged_decode_attention(q, k_cache.nan_to_num(),
                                                    v_cache.nan_to_num(), block_tables,
                                                    seq_lens, scale)
        for num_splits in (1, 3) + ((None,) if device == "cuda" else ()):
            out = torch.full_like(q, float("nan"))
            result = decode.paged_decode_attention(q, k_cache, v_cache, block_tables,
                                                   seq_lens, scale, out=out,
                                                   num_splits=num_splits)
            assert result is out
            assert_close(out, expected, TOLERANCE)


def test_decode_splits_a_long_context_and_reads_strided_queries():
    num_kv_heads, group, head_dim = 1, 4, 64
    lengths = [int(torch.randint(150, 200, ())), 3]
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    k_cache, v_cache, block_tables = paged_cache(lengths, num_kv_heads, head_dim, 16,
                                                 torch.float32, "cpu")
    fused = torch.randn(2, (group + 2) * num_kv_heads, head_dim)
    q = fused[:, :group * num_kv_heads]
    out = decode.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, 0.125,
                                        num_splits=7)
    assert_close(out, reference.paged_decode_attention(q, k_cache.nan_to_num(),
                                                       v_cache.nan_to_num(), block_tables,
                                                       seq_lens, 0.125), TOLERANCE)


def test_decode_merges_more_splits_than_one_merge_pass_reads(monkeypatch):
    lengths = [int(torch.randint(17 * 16, 60 * 16, ())), int(torch.randint(1, 20, ())), 1]
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    k_cache, v_cache, block_tables = paged_cache(lengths, 2, 64, 16, torch.float32, "cpu")
    q = torch.randn(3, 4, 64)
    merged = []
    merge = decode._merge_splits_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                merged.append(args[5])     # num_splits
                return merge[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(decode, "_merge_splits_kernel", Spy())
    out = decode.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, 0.125,
                                        num_splits=64)
    assert len(merged) == 1 and merged[0] > decode.MERGE_WIDTH
    assert_close(out, reference.paged_decode_attention(q, k_cache.nan_to_num(),
                                                       v_cache.nan_to_num(), block_tables,
                                                       seq_lens, 0.125), TOLERANCE)


def test_decode_splits_only_when_the_batch_cannot_fill_the_gpu():
    assert decode.choose_splits(batch=256, num_kv_heads=8, max_context=2048, num_sms=132) == 1
    assert decode.choose_splits(batch=8, num_kv_heads=8, max_context=32768, num_sms=132) == 9
    assert decode.choose_splits(batch=64, num_kv_heads=1, max_context=2048, num_sms=132) == 8
    assert decode.choose_splits(batch=1, num_kv_heads=1, max_context=1 << 20, num_sms=132) == 64
    assert decode.choose_splits(batch=1, num_kv_heads=1, max_context=100, num_sms=132) == 1


def test_decode_of_an_empty_sequence_is_zero():
    k_cache, v_cache, block_tables = paged_cache([5, 1], 1, 64, 16, torch.float32, "cpu")
    q = torch.randn(2, 2, 64)
    seq_lens = torch.tensor([5, 0], dtype=torch.int32)
    for num_splits in (1, 2):
        out = decode.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, 0.1,
                                            num_splits=num_splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_decode_with_a_block_table_of_no_columns_is_zero():
    k_cache, v_cache, _ = paged_cache([5], 1, 64, 16, torch.float32, "cpu")
    q = torch.randn(3, 2, 64)
    out = torch.full_like(q, float("nan"))
    decode.paged_decode_attention(q, k_cache, v_cache, torch.zeros(3, 0, dtype=torch.int32),
                                  torch.zeros(3, dtype=torch.int32), 0.1, out=out)
    assert torch.equal(out, torch.zeros_like(q))


def prefill_inputs(chunks: list[tuple[int, int]], device: str):
    """query_start_loc and seq_lens of sequences given as (cached prefix, new tokens)."""
    q_lens = [new for _, new in chunks]
    starts = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([cached + new for cached, new in chunks], dtype=torch.int32)
    return starts.to(device), seq_lens.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_prefill_matches_reference(device, layout):
    num_kv_heads, group, head_dim, block_size = layout
    chunks = [(0, 1), (0, int(torch.randint(17, 40, ()))), (int(torch.randint(1, 40, ())), 1),
              (int(torch.randint(1, 40, ())), int(torch.randint(2, 35, ()))), (7, 0)]
    query_start_loc, seq_lens = prefill_inputs(chunks, device)
    num_tokens = int(query_start_loc[-1])
    scale = head_dim ** -0.5
    for dtype in dtypes(device):
        k_cache, v_cache, block_tables = paged_cache(seq_lens.tolist(), num_kv_heads,
                                                     head_dim, block_size, dtype, device)
        q = torch.randn(num_tokens, num_kv_heads * group, head_dim, dtype=dtype,
                        device=device)
        out = torch.full_like(q, float("nan"))
        result = prefill.paged_prefill_attention(q, k_cache, v_cache, block_tables,
                                                 query_start_loc, seq_lens, scale, out=out)
        assert result is out
        assert_close(out, reference.paged_prefill_attention(
            q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale), TOLERANCE)


def test_prefill_reads_strided_queries_and_leaves_padding_tokens_alone():
    chunks = [(20, 18), (0, 33)]
    query_start_loc, seq_lens = prefill_inputs(chunks, "cpu")
    k_cache, v_cache, block_tables = paged_cache(seq_lens.tolist(), 2, 64, 16,
                                                 torch.float32, "cpu")
    real_tokens = int(query_start_loc[-1])
    fused = torch.randn(real_tokens + 37, 8, 64)
    q = fused[:, :4]
    out = torch.full_like(q, float("nan"))
    prefill.paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc,
                                    seq_lens, 0.125, out=out)
    expected = reference.paged_prefill_attention(q, k_cache, v_cache, block_tables,
                                                 query_start_loc, seq_lens, 0.125)
    assert_close(out[:real_tokens], expected[:real_tokens], TOLERANCE)
    assert out[real_tokens:].isnan().all()


def test_attention_rejects_mismatched_heads():
    k_cache = v_cache = torch.zeros(4, 16, 3, 64)
    block_tables = torch.zeros(2, 1, dtype=torch.int32)
    seq_lens = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        decode.paged_decode_attention(torch.randn(2, 4, 64), k_cache, v_cache, block_tables,
                                      seq_lens, 1.0)
    with pytest.raises(ValueError, match="query_start_loc must be"):
        prefill.paged_prefill_attention(torch.randn(2, 6, 64), k_cache, v_cache,
                                        block_tables, torch.tensor([0, 2]), seq_lens, 1.0)


def test_dispatch_routes_cpu_tensors_to_triton_only_when_forced(monkeypatch):
    monkeypatch.setattr(decode, "paged_decode_attention", lambda *args: "triton decode")
    monkeypatch.setattr(prefill, "paged_prefill_attention", lambda *args: "triton prefill")
    k_cache, v_cache, block_tables = paged_cache([3], 1, 64, 16, torch.float32, "cpu")
    q = torch.randn(1, 1, 64)
    seq_lens, starts = torch.tensor([3], dtype=torch.int32), torch.tensor([0, 1])
    force_triton(monkeypatch, True)
    assert kernels.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                          1.0) == "triton decode"
    assert kernels.paged_prefill_attention(q, k_cache, v_cache, block_tables, starts,
                                           seq_lens, 1.0) == "triton prefill"
    force_triton(monkeypatch, False)
    k_cache, v_cache = k_cache.nan_to_num(), v_cache.nan_to_num()
    out = kernels.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, 1.0)
    assert_close(out, reference.paged_decode_attention(q, k_cache, v_cache, block_tables,
                                                       seq_lens, 1.0), TOLERANCE)


def compile_for_hopper() -> None:
    """Compiles the attention kernels to sm_90 code, with the 16-aligned pointers and
    strides of a real launch, through the real compiler (no GPU needed)."""
    from shardline.kernels._compile import compile_sm90, jit_function

    int_pointers = {"block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr"}
    builds = [(decode._decode_split_kernel, {"KV_BLOCK_SIZE": 16, "BLOCK_G": 16, "BLOCK_D": 128,
                                             "BLOCK_N": 64, "DIRECT": direct}, 4)
              for direct in (True, False)]
    builds += [(decode._merge_splits_kernel, {"BLOCK_S": 16, "BLOCK_D": 128}, 4),
               (prefill._prefill_kernel, {"KV_BLOCK_SIZE": 16, "BLOCK_D": 128, "BLOCK_M": 128,
                                          "BLOCK_N": 64}, 8)]
    for kernel, constexprs, warps in builds:
        fn = jit_function(kernel)
        names = fn.arg_names
        constexprs = {"DOT_PRECISION": "tf32", **constexprs}
        constexprs = {name: value for name, value in constexprs.items() if name in names}
        types = {name: "*i32" if name in int_pointers
                 else "*fp32" if name.startswith("part_")
                 else "*bf16" if name.endswith("_ptr")
                 else "fp32" if name == "qk_scale" else "i32"
                 for name in names if name not in constexprs}
        aligned = [name for name, kind in types.items()
                   if kind.startswith("*") or name.startswith("stride")]
        build = compile_sm90(kernel, types, constexprs, aligned=aligned, num_warps=warps)
        assert build.compiled.asm["cubin"], f"{fn.__name__} produced no machine code"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the tests above compile them")
def test_kernels_compile_for_hopper():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]


if __name__ == "__main__":
    compile_for_hopper()

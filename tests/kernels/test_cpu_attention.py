"""The C++ paged decode attention (the CPU path) against the torch reference."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checks import assert_close, paged_cache

from shardline import kernels
from shardline.kernels import cpu_attention, reference

pytestmark = pytest.mark.usefixtures("fresh_seed")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (KV heads, query heads per KV head, head size, cache block size)
LAYOUTS = [(2, 1, 64, 16), (1, 2, 80, 32), (4, 2, 64, 16), (1, 8, 96, 16), (2, 4, 64, 1),
           (3, 3, 40, 8)]


def expected_output(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """The reference in fp32 over the cache with its NaN poison zeroed (infinities a test
    wrote stay), rounded to q's dtype once."""
    def clean(cache):
        return cache.float().nan_to_num(nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    out = reference.paged_decode_attention(q.float(), clean(k_cache), clean(v_cache),
                                           block_tables, seq_lens, scale)
    return out.to(q.dtype)


@pytest.mark.parametrize("dtype", cpu_attention.DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference_on_any_thread_count(rng, layout, dtype):
    num_kv_heads, group, head_dim, block_size = layout
    lengths = [0, 1, block_size, block_size * 3] + [rng.randint(2, 300) for _ in range(4)]
    rng.shuffle(lengths)
    k_cache, v_cache, block_tables = paged_cache(lengths, num_kv_heads, head_dim, block_size,
                                                 dtype, "cpu")
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(len(lengths), num_kv_heads * group, head_dim, dtype=dtype)
    scale = head_dim ** -0.5
    expected = expected_output(q, k_cache, v_cache, block_tables, seq_lens, scale)
    for threads in (1, 2, 3, 64):
        out = cpu_attention.paged_decode_attention(q, k_cache, v_cache, block_tables,
                                                   seq_lens, scale, threads=threads)
        assert_close(out, expected, TOLERANCE)
        assert out[lengths.index(0)].eq(0).all(), "a sequence of length 0 gets zeros"


def test_one_sequence_splits_its_heads_across_threads(rng):
    """Fewer sequences than threads: the heads are split; every head is still written."""
    length = rng.randint(100, 400)
    k_cache, v_cache, block_tables = paged_cache([length], 4, 64, 16, torch.float32, "cpu")
    q = torch.randn(1, 8, 64)
    seq_lens = torch.tensor([length], dtype=torch.int32)
    expected = expected_output(q, k_cache, v_cache, block_tables, seq_lens, 0.125)
    for threads in (2, 3, 4, 8):
        out = cpu_attention.paged_decode_attention(q, k_cache, v_cache, block_tables,
                                                   seq_lens, 0.125, threads=threads)
        assert_close(out, expected, TOLERANCE)


def test_reads_queries_and_tables_through_views(rng):
    """A non-contiguous q and a block table that is a column slice of a wider one."""
    lengths = [rng.randint(1, 90) for _ in range(5)]
    k_cache, v_cache, block_tables = paged_cache(lengths, 2, 64, 16, torch.float32, "cpu")
    wide = torch.full((5, block_tables.shape[1] + 7), -1, dtype=torch.int32)
    wide[:, :block_tables.shape[1]] = block_tables
    q = torch.randn(4, 5, 64).transpose(0, 1)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    expected = expected_output(q, k_cache, v_cache, block_tables, seq_lens, 0.125)
    out = cpu_attention.paged_decode_attention(q, k_cache, v_cache,
                                               wide[:, :block_tables.shape[1]], seq_lens, 0.125)
    assert_close(out, expected, TOLERANCE)


def test_every_weight_of_a_wide_softmax_matches_float64(rng):
    """Scores spread over [-120, 0] below their max give weights across the whole float
    range, read out one by one through one-hot value rows; each matches softmax in float64
    (the kernel computes exp itself, not through libm). Query head h reads its scores from
    key dimension h, exactly, so only the softmax's own rounding is measured."""
    head_dim, block_size, heads = 64, 16, 2
    length = rng.randint(block_size + 1, head_dim)
    k_cache, v_cache, block_tables = paged_cache([length], 1, head_dim, block_size,
                                                 torch.float32, "cpu")
    scores = torch.tensor([[rng.randint(-120 * 64, 0) / 64 for _ in range(length)]
                           for _ in range(heads)]) + rng.randint(-50, 50)
    for t in range(length):
        block, slot = block_tables[0, t // block_size], t % block_size
        k_cache[block, slot, 0] = 0.0
        k_cache[block, slot, 0, :heads] = scores[:, t]
        v_cache[block, slot, 0] = torch.nn.functional.one_hot(torch.tensor(t), head_dim)
    q = torch.eye(heads, head_dim).unsqueeze(0)
    out = cpu_attention.paged_decode_attention(q, k_cache, v_cache, block_tables,
                                               torch.tensor([length], dtype=torch.int32), 1.0)
    expected = torch.softmax(scores.double(), dim=-1)
    weights = out[0, :, :length].double()
    normal = expected > 1.2e-38  # smaller ones are not normal floats: the kernel may give 0
    assert torch.allclose(weights[normal], expected[normal], rtol=2e-6, atol=0)
    assert weights[~normal].abs().lt(1.25e-38).all()
    assert out[0, :, length:].eq(0).all()


@pytest.mark.parametrize("dtype", cpu_attention.DTYPES)
def test_a_first_block_of_minus_inf_scores_weighs_nothing(rng, dtype):
    """Keys scoring -inf against the query (an overflowed cache row) get weight 0, as in
    torch's softmax, also when a whole block of them comes before any finite score."""
    block_size = 8
    lengths = [rng.randint(block_size + 1, 120) for _ in range(4)]
    k_cache, v_cache, block_tables = paged_cache(lengths, 2, 64, block_size, dtype, "cpu")
    first_blocks = block_tables[:, 0].long()
    k_cache[first_blocks, :, :, rng.randrange(64)] = float("-inf")
    q = torch.rand(len(lengths), 4, 64, dtype=dtype) + 0.1
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    expected = expected_output(q, k_cache, v_cache, block_tables, seq_lens, 0.125)
    out = cpu_attention.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                               0.125)
    assert_close(out, expected, TOLERANCE)


@pytest.mark.parametrize("dtype", cpu_attention.DTYPES)
def test_a_nan_key_among_minus_inf_ones_still_gives_nan(rng, dtype):
    """A NaN score makes its head's output NaN, as in torch's softmax, also in a block
    whose other scores are all -inf."""
    block_size = 8
    lengths = [rng.randint(block_size + 1, 120) for _ in range(4)]
    k_cache, v_cache, block_tables = paged_cache(lengths, 2, 64, block_size, dtype, "cpu")
    k_cache[block_tables[:, 0].long(), :, :, rng.randrange(64)] = float("-inf")
    k_clean = k_cache.nan_to_num(nan=0.0, neginf=float("-inf"))
    seq, kv_head = rng.randrange(len(lengths)), rng.randrange(2)
    for cache in (k_cache, k_clean):
        cache[block_tables[seq, 0], rng.randrange(block_size), kv_head, rng.randrange(64)] = \
            float("nan")
    q = torch.rand(len(lengths), 4, 64, dtype=dtype) + 0.1
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    expected = reference.paged_decode_attention(q.float(), k_clean.float(),
                                                v_cache.nan_to_num().float(), block_tables,
                                                seq_lens, 0.125).to(dtype)
    out = cpu_attention.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                               0.125)
    assert expected[seq, 2 * kv_head:2 * kv_head + 2].isnan().all()
    assert torch.equal(out.isnan(), expected.isnan())
    assert_close(out[~out.isnan()], expected[~expected.isnan()], TOLERANCE)


@pytest.mark.parametrize("dtype", cpu_attention.DTYPES)
def test_a_nan_key_among_finite_ones_gives_nan(rng, dtype):
    """A NaN score anywhere in a block of finite ones (the kernel's own exp must keep it)
    makes the output of the query heads that read it NaN, as in torch's softmax; the other
    heads are untouched."""
    lengths = [rng.randint(2, 120) for _ in range(3)]
    k_cache, v_cache, block_tables = paged_cache(lengths, 2, 64, 16, dtype, "cpu")
    k_clean = k_cache.clone()
    seq, kv_head = rng.randrange(len(lengths)), rng.randrange(2)
    token = rng.randrange(lengths[seq])
    k_cache[block_tables[seq, token // 16], token % 16, kv_head, rng.randrange(64)] = \
        float("nan")
    q = torch.randn(len(lengths), 4, 64, dtype=dtype)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    out = cpu_attention.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                               0.125)
    poisoned = torch.zeros(out.shape[:2], dtype=torch.bool)
    poisoned[seq, 2 * kv_head:2 * kv_head + 2] = True
    assert out[poisoned].isnan().all() and not out[~poisoned].isnan().any()
    expected = expected_output(q, k_clean, v_cache, block_tables, seq_lens, 0.125)
    assert_close(out[~poisoned], expected[~poisoned], TOLERANCE)


@pytest.mark.parametrize("dtype", cpu_attention.DTYPES)
def test_a_head_whose_keys_all_score_minus_inf_gets_zeros(rng, dtype):
    """As the reference's SDPA gives a row with nothing to attend to: zeros, not NaN."""
    lengths = [rng.randint(1, 100) for _ in range(4)]
    k_cache, v_cache, block_tables = paged_cache(lengths, 2, 64, 8, dtype, "cpu")
    seq, kv_head = rng.randrange(len(lengths)), rng.randrange(2)
    blocks = block_tables[seq, :-(-lengths[seq] // 8)].long()
    k_cache[blocks, :, kv_head, rng.randrange(64)] = float("-inf")
    q = torch.rand(len(lengths), 4, 64, dtype=dtype) + 0.1
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    expected = expected_output(q, k_cache, v_cache, block_tables, seq_lens, 0.125)
    assert expected[seq, 2 * kv_head:2 * kv_head + 2].eq(0).all()
    out = cpu_attention.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                               0.125)
    assert_close(out, expected, TOLERANCE)


def test_sequences_sharing_one_block_table_row(rng):
    """A table whose rows are one row expanded (stride 0), as for samples of one prompt,
    and a single-row table of any row stride."""
    length = rng.randint(20, 200)
    k_cache, v_cache, block_tables = paged_cache([length], 2, 64, 16, torch.float32, "cpu")
    for batch in (1, 3):
        q = torch.randn(batch, 4, 64)
        tables = block_tables[0].expand(batch, -1)
        seq_lens = torch.full((batch,), length, dtype=torch.int32)
        expected = expected_output(q, k_cache, v_cache, tables.contiguous(), seq_lens, 0.125)
        out = cpu_attention.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens,
                                                   0.125)
        assert_close(out, expected, TOLERANCE)


def test_the_dispatcher_takes_it_on_the_cpu():
    """kernels.paged_decode_attention on CPU tensors never reads a slot past a sequence's
    end (the reference's padded SDPA does, and turns the NaN poison into NaN output)."""
    lengths = [7, 40, 1]
    k_cache, v_cache, block_tables = paged_cache(lengths, 2, 64, 16, torch.float32, "cpu")
    q = torch.randn(3, 4, 64)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    expected = expected_output(q, k_cache, v_cache, block_tables, seq_lens, 0.125)
    out = kernels.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, 0.125)
    assert_close(out, expected, TOLERANCE)


@pytest.mark.parametrize("dtype", cpu_attention.DTYPES)
def test_mixed_step_matches_reference(rng, dtype):
    """Prompt chunks, one-token decodes and empty spans in one step, padding rows after
    them: the decodes go through the kernel together, the chunks through SDPA."""
    q_lens = [1, 1, rng.randint(2, 40), 1, 0, rng.randint(2, 70), 1]
    rng.shuffle(q_lens)
    lengths = [n + rng.randint(0, 120) for n in q_lens]
    k_cache, v_cache, block_tables = paged_cache(lengths, 2, 64, 16, dtype, "cpu")
    starts = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    q = torch.randn(int(starts[-1]) + 3, 4, 64, dtype=dtype)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    expected = reference.paged_prefill_attention(
        q.float(), k_cache.nan_to_num().float(), v_cache.nan_to_num().float(), block_tables,
        starts, seq_lens, 0.125).to(dtype)
    out = kernels.paged_prefill_attention(q, k_cache, v_cache, block_tables, starts,
                                          seq_lens, 0.125)
    assert_close(out, expected, TOLERANCE)


@pytest.mark.parametrize("change, error, message", [
    (lambda a: a.update(block_tables=a["block_tables"].index_fill(1, torch.tensor([0]), 99)),
     IndexError, r"block_tables\[0, 0\] = 99 is outside \[0, \d+\)"),
    (lambda a: a["block_tables"].__setitem__((1, 0), -3),
     IndexError, r"block_tables\[1, 0\] = -3 is outside"),
    (lambda a: a["seq_lens"].__setitem__(1, 10_000),
     ValueError, r"seq_lens\[1\] = 10000 is outside \[0, \d+\]"),
    (lambda a: a["seq_lens"].__setitem__(0, -1), ValueError, r"seq_lens\[0\] = -1"),
    (lambda a: a.update(q=a["q"][:, :, :32]), ValueError, "head_dim 32 differs"),
    (lambda a: a.update(q=a["q"][:, :3]), ValueError, "num_heads 3 is not a multiple"),
    (lambda a: a.update(v_cache=a["v_cache"][:-1]), ValueError, "v_cache shape"),
    (lambda a: a.update(seq_lens=a["seq_lens"][:1]), ValueError, r"seq_lens \(1,\)"),
    (lambda a: a.update(q=a["q"][0]), ValueError, r"q must be \[batch, num_heads, head_dim\]"),
    (lambda a: a.update(k_cache=a["k_cache"][0]), ValueError, r"k_cache must be \[num_blocks"),
    (lambda a: a.update(q=a["q"].double()), ValueError, "q's dtype torch.float64 is not one"),
    (lambda a: a.update(k_cache=a["k_cache"].bfloat16()), ValueError,
     "k_cache's dtype torch.bfloat16 differs from q's torch.float32"),
    (lambda a: a.update(v_cache=a["v_cache"].half()), ValueError, "v_cache's dtype"),
    (lambda a: a.update(q=a["q"].to("meta")), ValueError, "q is on meta; the kernel takes"),
    (lambda a: a.update(v_cache=a["v_cache"].transpose(1, 2).contiguous().transpose(1, 2)),
     ValueError, "v_cache must be contiguous"),
    (lambda a: a.update(block_tables=a["block_tables"].float()), ValueError,
     "block_tables must hold integers; got torch.float32"),
    (lambda a: a.update(block_tables=a["block_tables"].long().index_fill(1, torch.tensor([0]),
                                                                          2 ** 32 + 1)),
     ValueError, r"block_tables holds 4294967297, outside int32"),
    (lambda a: a.update(seq_lens=a["seq_lens"].long().index_fill(0, torch.tensor([1]),
                                                                 2 ** 32 + 5)),
     ValueError, r"seq_lens holds 4294967301, outside int32"),
])
def test_bad_input_is_refused_naming_it(change, error, message):
    """Each before the kernel reads a byte: a cache of another dtype or layout, or a tensor
    off the CPU, would be read as something it is not; an int64 id or length past int32
    would wrap to another, valid-looking one."""
    k_cache, v_cache, block_tables = paged_cache([5, 20], 2, 64, 16, torch.float32, "cpu")
    args = dict(q=torch.randn(2, 4, 64), k_cache=k_cache, v_cache=v_cache,
                block_tables=block_tables, seq_lens=torch.tensor([5, 20], dtype=torch.int32),
                scale=0.125)
    change(args)
    with pytest.raises(error, match=message):
        cpu_attention.paged_decode_attention(**args)


def test_supports_only_cpu_tensors_of_one_supported_dtype():
    cache = torch.zeros(2, 16, 1, 64)
    assert cpu_attention.supports(torch.zeros(1, 1, 64), cache, cache)
    assert not cpu_attention.supports(torch.zeros(1, 1, 64, dtype=torch.float64),
                                      cache.double(), cache.double())
    assert not cpu_attention.supports(torch.zeros(1, 1, 64, dtype=torch.bfloat16), cache, cache)
    strided = torch.zeros(2, 2, 16, 64).transpose(1, 2)
    assert not cpu_attention.supports(torch.zeros(1, 2, 64), strided, strided.contiguous())


_SHORT_OF_MEMORY = """
import resource, sys, torch
from checks import paged_cache
from shardline.kernels import cpu_attention, reference

torch.manual_seed(int(sys.argv[1]))
lengths = [300] * 8
k_cache, v_cache, tables = paged_cache(lengths, 2, 64, 16, torch.float32, "cpu")
q, seq_lens = torch.randn(8, 4, 64), torch.tensor(lengths, dtype=torch.int32)
expected = reference.paged_decode_attention(q, k_cache.nan_to_num(), v_cache.nan_to_num(),
                                            tables, seq_lens, 0.125)
size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
            if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (size + (2 << 20), resource.RLIM_INFINITY))
out = cpu_attention.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.125,
                                           threads=4)
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
assert (out - expected).abs().max() < 1e-5
print("all right")
"""


def _thread_stacks_of_8_mib() -> None:
    """glibc sizes a new thread's stack by RLIMIT_STACK as the process starts."""
    import resource
    hard = resource.getrlimit(resource.RLIMIT_STACK)[1]
    soft = 8 << 20 if hard == resource.RLIM_INFINITY else min(8 << 20, hard)
    resource.setrlimit(resource.RLIMIT_STACK, (soft, hard))


def test_threads_it_cannot_start_leave_their_work_to_the_caller(tmp_path, fresh_seed):
    """With 2 MiB of address space to spare, no thread's 8 MiB stack fits: the threads that
    cannot start leave their share to the calling thread and the output is whole. The
    call used to fail ('Resource temporarily unavailable'), and a failed start after a
    first thread had started aborted the process (std::terminate). (That second case is
    not tested: with so little memory a started thread may die in glibc itself, which
    aborts when it cannot allocate thread-local storage.)"""
    script = tmp_path / "short_of_memory.py"
    script.write_text(_SHORT_OF_MEMORY)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run([sys.executable, str(script), str(fresh_seed)], capture_output=True,
                          text=True, timeout=300, env=env, preexec_fn=_thread_stacks_of_8_mib)
    assert done.returncode == 0 and "all right" in done.stdout, done.stderr[-2000:]

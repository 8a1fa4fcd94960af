"""Benchmark of shardline's Triton kernels against torch (cuBLAS, flash SDPA, a per-expert
loop) and against the device's own ceilings, measured in the same run.

Shapes are those of a Llama-3-8B-like layer sharded TP=1/2/8 and of a Mixtral-like MoE
layer, in bf16. The kernels are called through the `shardline.kernels` dispatch points,
so a tuned table that sends a shape to cuBLAS shows here as it does in the engine; a shape
the table lacks is autotuned (SHARDLINE_AUTOTUNE=1 unless set otherwise), where the engine
would run a default config and its linears on cuBLAS. The
linears are timed as plain GEMMs (gate_up with its SiLU), the comparison with cuBLAS the
targets name; at TP=1 the engine fuses the QKV, o and down projections' split-K reductions
into the rotary and norm kernels, which bench/tune.py times against their cuBLAS forms.
Each result carries its target from issue 4 and whether it met it; results go to
bench/results/kernels.json and kernels.png.

    python bench/kernels.py            # on a CUDA GPU (H100 / H200)
    python bench/kernels.py --dry-run  # CPU, Triton interpreter, tiny shapes: runs every
                                       # code path once; its numbers mean nothing
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from _files import write_json
from _kernel_results import TARGETS, Bench, plot, print_table
from _kernel_shapes import FULL, TINY, TP_SIZES, Shapes, llama_gemms
from _timing import Timer, copy_bandwidth

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SLEEP_CYCLES = 300_000
os.environ.setdefault("SHARDLINE_AUTOTUNE", "1")   # the kernels at their best, not defaults


def measure_ceilings(b: Bench, tiny: bool) -> None:
    """The device's copy bandwidth (read + write bytes) and dense matmul FLOP/s."""
    copy_bytes_per_s = copy_bandwidth(b.timer, 1 << (22 if tiny else 30))
    size = 256 if tiny else 8192
    lhs, rhs = b.randn(size, size), b.randn(size, size)
    matmul_ms = b.timer(lambda i: torch.matmul(lhs, rhs), 1)
    b.ceilings = {"copy_GBps": copy_bytes_per_s / 1e9,
                  "matmul_TFLOPs": 2 * size ** 3 / matmul_ms / 1e9}


def bench_matmul(b: Bench, s: Shapes) -> None:
    """linear / linear_silu_mul against the cuBLAS GEMM of the same shape (its epilogue
    not counted for the baseline, so the fused kernel is held to a stricter bar)."""
    from shardline import kernels
    for tp in TP_SIZES:
        for name, n, k in llama_gemms(s, tp):
            op = kernels.linear_silu_mul if name == "gate_up" else kernels.linear
            for m in s.matmul_m:
                copies = b.copies((m * k + n * k) * b.dtype.itemsize)
                xs = [b.randn(m, k) for _ in range(copies)]
                ws = [b.randn(n, k, scale=k ** -0.5) for _ in range(copies)]
                ms = b.timer(lambda i: op(xs[i], ws[i]), copies)
                actual = b.timer.last_output
                base_ms = b.timer(lambda i: torch.matmul(xs[i], ws[i].t()), copies)
                expected = b.timer.last_output
                if name == "gate_up":
                    gate, up = expected.float().chunk(2, dim=-1)
                    expected = F.silu(gate) * up
                bench = "matmul M<=16" if m <= 16 else "matmul M>=512"
                b.record(bench, f"TP{tp} {name} M={m} N={n} K={k}", ms, base_ms,
                         base_ms / ms, actual, expected,
                         tflops=2 * m * n * k / ms / 1e9,
                         **tiled_config_flags(xs[0], n // 2 if name == "gate_up" else n, k,
                                              name == "gate_up"))


def tiled_config_flags(x: torch.Tensor, n: int, k: int, gated: bool) -> dict[str, float]:
    """{"tma": 1.0 or 0.0}: whether the tiled GEMM ran this shape with a TMA config; {} where
    it did not run (split-K, or a table that sent the shape to torch.matmul). The table key
    follows the kernel's own key names (its table_key wants the launch's arguments, which
    only the wrapper computes)."""
    from shardline.kernels import _tuned
    from shardline.kernels._tuned import shape_bucket
    tiled = _tuned.KERNELS.get("_matmul_kernel")
    if tiled is None:
        return {}
    values = {"M_BUCKET": shape_bucket(x.shape[0]), "N": n, "K": k, "SILU_MUL": gated}
    key = _tuned.key_string(tiled.keys, tuple(values[name] for name in tiled.keys), x.dtype)
    reached = tiled.reached.get(key)
    if reached is None or reached.config is None:
        return {}
    return {"tma": float(bool(reached.config.kwargs.get("TMA")))}


def paged_kv(b: Bench, batch: int, context: int, kv_heads: int, head_dim: int,
             block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches with each sequence in shuffled blocks, and the block tables."""
    per_seq = math.ceil(context / block_size)
    shape = (batch * per_seq, block_size, kv_heads, head_dim)
    block_tables = torch.randperm(batch * per_seq, device=b.device).view(batch, per_seq)
    return b.randn(*shape), b.randn(*shape), block_tables.to(torch.int32)


@dataclass
class DecodeCase:
    """One decode attention case: `copies` input sets, cycled so that the working set
    outgrows L2, every sequence `context` tokens long."""

    q_heads: int
    kv_heads: int
    kv_bytes: int
    copies: int
    inputs: list[tuple[torch.Tensor, ...]]
    seq_lens: torch.Tensor
    scale: float

    def run(self, i: int, fn: Callable | None = None, **kwargs) -> torch.Tensor:
        """Input set `i` through `fn` (the kernel's dispatch point unless given)."""
        from shardline import kernels
        q, k_cache, v_cache, block_tables = self.inputs[i]
        return (fn or kernels.paged_decode_attention)(q, k_cache, v_cache, block_tables,
                                                      self.seq_lens, self.scale, **kwargs)


def decode_case(b: Bench, s: Shapes, batch: int, context: int, tp: int) -> DecodeCase:
    """`batch` sequences of `context` tokens with the heads of one of `tp` ranks."""
    q_heads, kv_heads = s.q_heads // tp, s.kv_heads // tp
    kv_bytes = 2 * batch * context * kv_heads * s.head_dim * b.dtype.itemsize
    copies = b.copies(kv_bytes)
    inputs = [(b.randn(batch, q_heads, s.head_dim),
               *paged_kv(b, batch, context, kv_heads, s.head_dim, s.block_size))
              for _ in range(copies)]
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=b.device)
    return DecodeCase(q_heads, kv_heads, kv_bytes, copies, inputs, seq_lens,
                      s.head_dim ** -0.5)


def bench_decode_attention(b: Bench, s: Shapes) -> None:
    """Paged decode attention: KV bytes read per second against the copy bandwidth."""
    from shardline.kernels import reference
    for batch, context in s.decode:
        for tp in TP_SIZES:
            case = decode_case(b, s, batch, context, tp)
            ms = b.timer(case.run, case.copies)
            bandwidth = case.kv_bytes / ms / 1e6
            b.record("decode attention", f"TP{tp} batch {batch} x {context} ctx, "
                     f"Hq={case.q_heads} Hk={case.kv_heads}", ms, None,
                     bandwidth / b.ceilings["copy_GBps"], b.timer.last_output,
                     case.run(0, reference.paged_decode_attention), GBps=bandwidth)


def bench_prefill_attention(b: Bench, s: Shapes) -> None:
    """Varlen paged prefill attention against flash SDPA on the same (equal) lengths."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from shardline import kernels
    backend = SDPBackend.FLASH_ATTENTION if b.device.type == "cuda" else SDPBackend.MATH
    for seqs, length in s.prefill:
        for tp in TP_SIZES:
            q_heads, kv_heads = s.q_heads // tp, s.kv_heads // tp
            group, tokens = q_heads // kv_heads, seqs * length
            set_bytes = 2 * tokens * (q_heads + kv_heads) * s.head_dim * b.dtype.itemsize
            copies = b.copies(set_bytes)
            paged, dense = [], []
            for _ in range(copies):
                q = b.randn(tokens, q_heads, s.head_dim)
                k_cache, v_cache, block_tables = paged_kv(b, seqs, length, kv_heads,
                                                          s.head_dim, s.block_size)
                paged.append((q, k_cache, v_cache, block_tables))
                k, v = (cache[block_tables.long()].reshape(seqs, -1, kv_heads, s.head_dim)
                        [:, :length].transpose(1, 2).repeat_interleave(group, dim=1)
                        for cache in (k_cache, v_cache))
                dense.append((q.view(seqs, length, q_heads, s.head_dim).transpose(1, 2)
                              .contiguous(), k.contiguous(), v.contiguous()))
            starts = torch.arange(seqs + 1, device=b.device, dtype=torch.int32) * length
            seq_lens = torch.full((seqs,), length, dtype=torch.int32, device=b.device)
            scale = s.head_dim ** -0.5

            def ours(i: int) -> torch.Tensor:
                q, k_cache, v_cache, block_tables = paged[i]
                return kernels.paged_prefill_attention(q, k_cache, v_cache, block_tables,
                                                       starts, seq_lens, scale)

            def sdpa(i: int) -> torch.Tensor:
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(*dense[i], is_causal=True,
                                                          scale=scale)

            ms = b.timer(ours, copies)
            actual = b.timer.last_output
            base_ms = b.timer(sdpa, copies)
            expected = b.timer.last_output.transpose(1, 2).reshape(tokens, q_heads, s.head_dim)
            b.record("prefill attention", f"TP{tp} {seqs} x {length} tokens, "
                     f"Hq={q_heads} Hk={kv_heads}", ms, base_ms, base_ms / ms, actual,
                     expected)


def expert_loop(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The baseline MoE: one torch GEMM pair per expert over the tokens routed to it."""
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        token_idx, slot = (topk_ids == e).nonzero(as_tuple=True)
        gate, up = torch.matmul(x[token_idx], w13[e].t()).chunk(2, dim=-1)
        y = torch.matmul(F.silu(gate) * up, w2[e].t()).float()
        out.index_add_(0, token_idx, y * topk_weights[token_idx, slot, None].float())
    return out.to(x.dtype)


def grouped_mm_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The strongest torch baseline where this torch has it: the routed rows sorted by
    expert, and each of the two GEMMs one torch._grouped_mm over all experts."""
    top_k = topk_ids.shape[1]
    flat = topk_ids.flatten()
    order = flat.argsort(stable=True)
    token = order // top_k
    offsets = torch.bincount(flat, minlength=w13.shape[0]).cumsum(0).to(torch.int32)
    gate, up = torch._grouped_mm(x[token], w13.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offsets)
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, token, y.float() * topk_weights.flatten()[order, None].float())
    return out.to(x.dtype)


def grouped_mm_runs(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether torch._grouped_mm exists and takes these operands on this device."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    ids = torch.zeros(x.shape[0], 1, dtype=torch.int64, device=x.device)
    try:
        grouped_mm_moe(x, w13, w2, torch.ones_like(ids, dtype=x.dtype), ids)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def bench_fused_moe(b: Bench, s: Shapes) -> None:
    """Fused MoE (grouped GEMMs, top-k weights in the epilogue) against the expert loop,
    and against torch._grouped_mm where this torch runs it on this device (its ratio is
    reported beside the verdict, which the issue sets against the loop)."""
    from shardline import kernels
    for tp in TP_SIZES:
        inter = s.intermediate // tp
        set_bytes = 3 * s.experts * inter * s.hidden * b.dtype.itemsize
        copies = b.copies(set_bytes)
        weights = [(b.randn(s.experts, 2 * inter, s.hidden, scale=s.hidden ** -0.5),
                    b.randn(s.experts, s.hidden, inter, scale=inter ** -0.5))
                   for _ in range(copies)]
        x = b.randn(s.moe_tokens, s.hidden)
        router = torch.randn(s.moe_tokens, s.experts, device=b.device).softmax(-1)
        topk_weights, topk_ids = router.topk(s.top_k, dim=-1)
        topk_weights = (topk_weights / topk_weights.sum(-1, keepdim=True)).to(b.dtype)

        def ours(i: int) -> torch.Tensor:
            return kernels.fused_moe(x, *weights[i], topk_weights, topk_ids)

        def loop(i: int) -> torch.Tensor:
            return expert_loop(x, *weights[i], topk_weights, topk_ids)

        def grouped(i: int) -> torch.Tensor:
            return grouped_mm_moe(x, *weights[i], topk_weights, topk_ids)

        ms = b.timer(ours, copies)
        actual = b.timer.last_output
        base_ms = b.timer(loop, copies)
        expected = b.timer.last_output.float()
        extra = {}
        if grouped_mm_runs(x, *weights[0]):
            extra["grouped_mm_rel_err"] = ((grouped(0).float() - expected).abs().max()
                                           / expected.abs().max().clamp_min(1e-6)).item()
            extra["grouped_mm_ms"] = b.timer(grouped, copies)
            extra["x_grouped_mm"] = extra["grouped_mm_ms"] / ms
        b.record("fused moe", f"TP{tp} {s.moe_tokens} tokens top-{s.top_k} of "
                 f"{s.experts}, I={inter}", ms, base_ms, base_ms / ms, actual, expected,
                 **extra)


STEPS = {"matmul": bench_matmul, "decode-attention": bench_decode_attention,
         "prefill-attention": bench_prefill_attention, "fused-moe": bench_fused_moe}


def write_report(b: Bench, out_dir: Path) -> None:
    import triton
    report = {"device": b.device_name, "dtype": str(b.dtype), "dry_run": b.dry_run,
              "torch": torch.__version__, "triton": triton.__version__,
              "ceilings": b.ceilings, "targets": TARGETS,
              "results": [asdict(r) for r in b.results]}
    write_json(out_dir / "kernels.json", report)


def add_run_args(parser: argparse.ArgumentParser, outputs: str, warmup: int,
                 reps: int) -> None:
    """The flags open_bench and results_dir take: --dry-run, --out-dir (for `outputs`),
    and the timer's --warmup and --reps."""
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, Triton interpreter, tiny shapes, one timed run each")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help=f"where to write {outputs} (default bench/results; a temporary "
                             "folder for --dry-run)")
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--reps", type=int, default=reps)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(parser, "kernels.json / kernels.png", warmup=25, reps=100)
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS),
                        help="the benchmarks to run, in this order (default: all)")
    return parser.parse_args()


def open_bench(script: str, dry_run: bool, warmup: int, reps: int) -> Bench:
    """The run's Bench with its ceilings measured: bf16 on the GPU, or with `dry_run`
    fp32 in the Triton interpreter on the CPU (one timed run each). Exits, naming
    `script`, where neither can run."""
    if dry_run:
        # Must precede the first import of triton (the kernels import it lazily).
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["SHARDLINE_FORCE_TRITON"] = "1"
    elif not torch.cuda.is_available():
        sys.exit(f"{script} measures the Triton kernels on a CUDA GPU (H100 / H200) "
                 "and none is visible. Use --dry-run to run its code paths on the CPU in the "
                 "Triton interpreter at tiny shapes.")
    if os.environ.get("SHARDLINE_DISABLE_TRITON") == "1":
        sys.exit("SHARDLINE_DISABLE_TRITON=1 is set: the bench would time the torch "
                 "references instead of the kernels; unset it.")
    device = torch.device("cpu" if dry_run else "cuda")
    dtype = torch.float32 if dry_run else torch.bfloat16
    timer = (Timer(device, 0, 1) if dry_run
             else Timer(device, warmup, reps, sleep_cycles=SLEEP_CYCLES))
    b = Bench(device, dtype, timer, dry_run)
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    measure_ceilings(b, dry_run)
    return b


def results_dir(out_dir: Path | None, dry_run: bool) -> Path:
    """`out_dir`, made; by default bench/results, or a temporary folder for a dry run."""
    out_dir = out_dir or (Path(tempfile.mkdtemp(prefix="shardline-bench-")) if dry_run
                          else RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def main() -> None:
    args = parse_args()
    b = open_bench("bench/kernels.py", args.dry_run, args.warmup, args.reps)
    shapes = TINY if args.dry_run else FULL
    out_dir = results_dir(args.out_dir, args.dry_run)
    # Written after each benchmark: a run stopped at a time limit keeps what it measured.
    for name in args.steps:
        first = len(b.results)
        STEPS[name](b, shapes)
        print_table(b, b.results[first:])
        write_report(b, out_dir)
        print(f"{name}: done, {out_dir / 'kernels.json'} written", file=sys.stderr, flush=True)
    plot(b, out_dir / "kernels.png")
    print(f"wrote {out_dir / 'kernels.json'} and {out_dir / 'kernels.png'}")


if __name__ == "__main__":
    main()

"""The Triton sharded matmul against its torch reference, in the interpreter on CPU."""

import random

import pytest
import torch

from checks import DEVICES, assert_close, dtypes, force_triton

from shardline import kernels
from shardline.kernels import reference

triton = pytest.importorskip("triton")

from shardline.kernels import _config, matmul, matmul_split_k


def describe(config) -> str:
    return "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + (
        f"-w{config.num_warps}-s{config.num_stages}")

pytestmark = pytest.mark.usefixtures("fresh_seed")

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def inputs(m: int, n: int, k: int, dtype: torch.dtype, device: str):
    x = torch.randn(m, k, dtype=dtype, device=device)
    w = torch.randn(n, k, dtype=dtype, device=device) / k ** 0.5
    return x, w, torch.randn(n, dtype=dtype, device=device), torch.randn(m, n, dtype=dtype,
                                                                           device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,k,split_k", [(37, 45, 70, None), (1, 64, 96, None),
                                           (5, 33, 200, 3), (16, 40, 64, 2)])
def test_linear_matches_reference(device, m, n, k, split_k):
    for dtype in dtypes(device):
        x, w, bias, residual = inputs(m, n, k, dtype, device)
        for b, r in [(None, None), (bias, None), (bias, residual), (None, residual)]:
            out = poisoned((m, n), dtype, device)
            matmul.linear(x, w, b, r, out=out, split_k=split_k)
            assert_close(out, reference.linear(x, w, b, r), TOLERANCE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,k,split_k", [(19, 35, 50, None), (3, 24, 160, 4)])
def test_linear_silu_mul_matches_reference(device, m, n, k, split_k):
    for dtype in dtypes(device):
        x, w, bias, _ = inputs(m, 2 * n, k, dtype, device)
        for b in (None, bias):
            out = poisoned((m, n), dtype, device)
            matmul.linear_silu_mul(x, w, b, out=out, split_k=split_k)
            assert_close(out, reference.linear_silu_mul(x, w, b), TOLERANCE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,k,split_k", [(37, 45, 70, None), (1, 48, 160, None),
                                           (5, 33, 200, 3), (16, 40, 64, 2)])
def test_linear_rms_norm_matches_reference(device, m, n, k, split_k, monkeypatch):
    """Both results, and the norm fused into the split-K reduction: no separate norm
    kernel runs there; the tiled path runs one."""
    norms, norm = [], matmul.rms_norm
    monkeypatch.setattr(matmul, "rms_norm",
                        lambda *args, **kwargs: norms.append(1) or norm(*args, **kwargs))
    split, _ = matmul_split_k.k_slices(torch.empty(m, k), torch.empty(n, k), split_k)
    for dtype in dtypes(device):
        x, w, bias, residual = inputs(m, n, k, dtype, device)
        norm_weight = 1 + torch.randn(n, dtype=dtype, device=device) / 4
        eps = float(torch.rand(()) * 1e-5)
        for b in (None, bias):
            norms.clear()
            normed, summed = matmul.linear_rms_norm(x, w, b, residual, norm_weight, eps,
                                                    split_k=split_k)
            want_normed, want_summed = reference.linear_rms_norm(x, w, b, residual,
                                                                 norm_weight, eps)
            assert_close(summed, want_summed, TOLERANCE)
            assert_close(normed, want_normed, TOLERANCE)
            assert len(norms) == (split == 1)


@pytest.mark.parametrize("bad,match", [
    (dict(residual=(4, 5)), r"residual must be \[4, 6\]"),
    (dict(norm_weight=(5,)), r"norm_weight must be \[6\]"),
    (dict(split_k=0), "split_k must be"),
])
def test_linear_rms_norm_rejects_bad_arguments(bad, match):
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    residual = torch.randn(bad.get("residual", (4, 6)))
    norm_weight = torch.randn(bad.get("norm_weight", (6,)))
    with pytest.raises(ValueError, match=match):
        matmul.linear_rms_norm(x, w, None, residual, norm_weight, 1e-6,
                               split_k=bad.get("split_k"))


def test_linear_reads_strided_input():
    x = torch.randn(70, 21)[::2, 1:]
    w = torch.randn(30, 20)
    assert_close(matmul.linear(x, w), reference.linear(x, w), TOLERANCE)


def tma_case(m: int, n: int, k: int, dtype: torch.dtype, device: str):
    """Inputs whose x is a view one element past an aligned base, so the wrapper must copy
    it for TMA, with bias, residual and a merged gate_up weight."""
    x = torch.randn(m, k + 1, dtype=dtype, device=device)[:, 1:]
    w = torch.randn(n, k, dtype=dtype, device=device) / k ** 0.5
    gate_up = torch.randn(2 * n, k, dtype=dtype, device=device) / k ** 0.5
    bias = torch.randn(n, dtype=dtype, device=device)
    return x, w, gate_up, bias, torch.randn(m, n, dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", matmul._TMA_CONFIGS, ids=lambda c: describe(c))
def test_tma_configs_match_reference(device, config, monkeypatch):
    """Each TMA tile, launched through the wrapper, at shapes with a row, column and K
    edge inside a tile (TMA zero-fills past them) and an x TMA cannot read in place."""
    from shardline.kernels._config import _FixedConfig
    if device == "cpu":
        monkeypatch.setattr(matmul, "tma_capable", lambda device: True)
    elif not matmul.tma_capable(torch.device(device)):
        pytest.skip("TMA needs a Hopper or newer GPU and a triton that builds descriptors")
    monkeypatch.setattr(matmul, "_matmul_kernel",
                        _FixedConfig(matmul._matmul_kernel.fn, config))
    for dtype in [d for d in dtypes(device) if d != torch.float32]:
        m, n, k = int(torch.randint(17, 150, ())), int(torch.randint(9, 200, ())), 8 * int(
            torch.randint(9, 40, ()))
        x, w, gate_up, bias, residual = tma_case(m, n, k, dtype, device)
        out = poisoned((m, n), dtype, device)
        matmul.linear(x, w, bias, residual, out=out)
        assert_close(out, reference.linear(x, w, bias, residual), TOLERANCE)
        out = poisoned((m, n), dtype, device)
        matmul.linear_silu_mul(x, gate_up, None, out=out)
        assert_close(out, reference.linear_silu_mul(x, gate_up), TOLERANCE)


def test_tma_configs_are_candidates_only_where_tma_can_load(monkeypatch):
    def kept(dtype: torch.dtype, k: int, gated: bool = False) -> set[bool]:
        args = {"x_ptr": torch.empty(0, k, dtype=dtype), "K": k, "M_BUCKET": 4096}
        return {c.kwargs["TMA"] for c in matmul._fit_rows(matmul._TILED_CONFIGS, args,
                                                          SILU_MUL=gated)}
    assert kept(torch.bfloat16, 4096) == {False}          # a CPU tensor
    monkeypatch.setattr(matmul, "tma_capable", lambda device: True)
    assert kept(torch.bfloat16, 4096) == kept(torch.float16, 4096, gated=True) == {False, True}
    assert kept(torch.bfloat16, 4100) == {False}          # rows of 8200 bytes
    assert kept(torch.float32, 4096) == {False}


def test_tiles_whose_pipeline_outgrows_shared_memory_are_never_candidates(monkeypatch):
    def kept(dtype: torch.dtype, gated: bool = False) -> list[triton.Config]:
        args = {"x_ptr": torch.empty(0, 4096, dtype=dtype), "K": 4096, "M_BUCKET": 4096}
        return matmul._fit_rows(matmul._TILED_CONFIGS, args, SILU_MUL=gated)
    everything = kept(torch.float32)      # off CUDA nothing bounds them
    hopper = 232448                       # what sm_90 lets one program opt in to
    monkeypatch.setattr(_config, "max_shared_memory", lambda device: hopper)
    assert kept(torch.bfloat16) == everything
    fp32 = kept(torch.float32)
    dropped = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages)
               for c in everything if c not in fp32]
    assert dropped == [(128, 256, 3), (128, 128, 4)]   # 288 KiB and 256 KiB of fp32 tiles
    ampere = 101376                       # sm_86 / sm_89
    monkeypatch.setattr(_config, "max_shared_memory", lambda device: ampere)
    assert kept(torch.float32, gated=True), "no tile fits gated fp32 in 99 KiB"
    for dtype, gated in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, True)):
        limit = random.randint(64 << 10, hopper)
        monkeypatch.setattr(_config, "max_shared_memory", lambda device: limit)
        for config in kept(dtype, gated):
            assert matmul.pipeline_bytes(config, dtype.itemsize, gated) <= limit


def test_split_k_chosen_for_decode_shapes_only():
    cpu = torch.device("cpu")
    assert matmul_split_k.choose_split_k(1, 64, 4096, cpu) > 1
    assert matmul_split_k.choose_split_k(matmul_split_k.SPLIT_K_MAX_M + 1, 64, 4096, cpu) == 1
    assert matmul_split_k.choose_split_k(1, 64, 32, cpu) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=(4, 8), w=(6, 9)), "same K"),
    (dict(x=(4, 8), w=(6, 8), bias=(5,)), "bias must be"),
    (dict(x=(4, 8), w=(6, 8), residual=(4, 5)), "residual must be"),
])
def test_linear_rejects_bad_shapes(kwargs, match):
    x, w = torch.randn(kwargs["x"]), torch.randn(kwargs["w"])
    bias = torch.randn(kwargs["bias"]) if "bias" in kwargs else None
    residual = torch.randn(kwargs["residual"]) if "residual" in kwargs else None
    with pytest.raises(ValueError, match=match):
        matmul.linear(x, w, bias, residual)


def test_linear_rejects_bad_out_and_split_k():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="out must be"):
        matmul.linear(x, w, out=torch.empty(4, 5))
    with pytest.raises(ValueError, match="split_k must be"):
        matmul.linear(x, w, split_k=0)


def test_linear_of_no_rows_is_empty():
    assert matmul.linear(torch.randn(0, 8), torch.randn(5, 8)).shape == (0, 5)


def test_linear_silu_mul_rejects_odd_rows():
    with pytest.raises(ValueError, match="even row count"):
        matmul.linear_silu_mul(torch.randn(2, 8), torch.randn(7, 8))


@pytest.mark.parametrize("split_k", [1, 4])
def test_linear_and_its_norm_read_strided_bias_and_norm_weight(split_k):
    x, w = torch.randn(3, 160), torch.randn(24, 160) / 160 ** 0.5
    bias, norm_weight = torch.randn(48)[::2], torch.randn(72)[::3]
    residual = torch.randn(3, 24)
    assert_close(matmul.linear(x, w, bias, split_k=split_k), reference.linear(x, w, bias),
                 TOLERANCE)
    normed, summed = matmul.linear_rms_norm(x, w, bias, residual, norm_weight, 1e-6,
                                            split_k=split_k)
    want_normed, want_summed = reference.linear_rms_norm(x, w, bias, residual, norm_weight,
                                                         1e-6)
    assert_close(summed, want_summed, TOLERANCE)
    assert_close(normed, want_normed, TOLERANCE)


def test_linear_launches_row_slices_where_x_offsets_would_pass_int32(monkeypatch):
    x, w = torch.randn(37, 40), torch.randn(24, 40)
    residual, bias = torch.randn(37, 24), torch.randn(24)
    launches = []
    kernel = matmul._matmul_kernel
    monkeypatch.setattr(matmul, "_matmul_kernel", type(
        "Counted", (), {"__getitem__": lambda self, grid: launches.append(1) or kernel[grid]})())
    monkeypatch.setattr(matmul, "_INT32_MAX", 10 * x.stride(0))   # 10 rows per launch
    assert_close(matmul.linear(x, w, bias, residual, split_k=1),
                 reference.linear(x, w, bias, residual), TOLERANCE)
    assert len(launches) == 4


@pytest.mark.parametrize("name", ["bias", "residual", "out"])
def test_linear_refuses_a_tensor_of_another_dtype_than_x(name):
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    other = {"bias": torch.randn(6, dtype=torch.float16),
             "residual": torch.randn(4, 6, dtype=torch.float16),
             "out": torch.empty(4, 6, dtype=torch.float16)}[name]
    with pytest.raises(ValueError, match=f"{name} must .*float32.*got .*torch.float16"):
        matmul.linear(x, w, **{name: other})


def test_dispatch_routes_cpu_tensors_to_triton_only_when_forced(monkeypatch):
    monkeypatch.setattr(matmul, "linear", lambda *args: "triton linear")
    monkeypatch.setattr(matmul, "linear_silu_mul", lambda *args: "triton silu")
    monkeypatch.setattr(matmul, "linear_rms_norm", lambda *args: "triton linear norm")
    x, w, r, g = torch.randn(3, 8), torch.randn(6, 8), torch.randn(3, 6), torch.randn(6)
    force_triton(monkeypatch, True)
    assert kernels.linear(x, w) == "triton linear"
    assert kernels.linear_silu_mul(x, w) == "triton silu"
    assert kernels.linear_rms_norm(x, w, None, r, g, 1e-6) == "triton linear norm"
    force_triton(monkeypatch, False)
    assert torch.equal(kernels.linear(x, w), reference.linear(x, w))
    assert torch.equal(kernels.linear_silu_mul(x, w), reference.linear_silu_mul(x, w))
    for got, want in zip(kernels.linear_rms_norm(x, w, None, r, g, 1e-6),
                         reference.linear_rms_norm(x, w, None, r, g, 1e-6)):
        assert torch.equal(got, want)


def test_kernels_compile_for_h100(compile_for_h100):
    tiles = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
    io = dict(x_ptr="*bf16", w_ptr="*bf16", bias_ptr="*bf16", res_ptr="*bf16",
              out_ptr="*bf16", ws_ptr="*fp32", norm_w_ptr="*bf16", sum_ptr="*bf16")
    compile_for_h100("shardline.kernels.matmul", [
        ("_matmul_kernel", io, dict(HAS_BIAS=True, HAS_RESIDUAL=residual, SILU_MUL=gated,
                                    PRECISION="tf32", TMA=tma, **tiles))
        for tma in (False, True) for gated, residual in ((False, True), (True, False))
    ])
    compile_for_h100("shardline.kernels.matmul_split_k", [
        ("_matmul_partial_kernel", io, dict(PRECISION="ieee", BLOCK_M=16, BLOCK_N=64,
                                            BLOCK_K=128)),
        ("_splitk_reduce_kernel", io, dict(SPLIT_K=4, HAS_BIAS=True, HAS_RESIDUAL=True,
                                           SILU_MUL=True, RMS_NORM=False, BLOCK_N=1024)),
        ("_splitk_reduce_kernel", io, dict(SPLIT_K=8, HAS_BIAS=False, HAS_RESIDUAL=True,
                                           SILU_MUL=False, RMS_NORM=True, BLOCK_N=8192)),
    ])

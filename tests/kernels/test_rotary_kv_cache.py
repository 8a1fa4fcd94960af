"""The fused rotary + KV-cache write against its torch reference (rotate, then write)."""

import pytest
import torch

from checks import DEVICES, assert_close, dtypes, force_triton

from shardline import kernels
from shardline.kernels import reference

pytest.importorskip("triton")

from shardline.kernels import rotary_kv_cache

pytestmark = pytest.mark.usefixtures("fresh_seed")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def random_inputs(tokens: int, hq: int, hk: int, d: int, rot: int, dtype: torch.dtype,
                  device: str, num_slots: int) -> dict:
    """Views of one fused qkv projection, an arbitrary [cos | sin] table, and distinct
    slots of which a random third are -1 (padding)."""
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, dtype=dtype, device=device)
    angles = torch.rand(64, rot // 2, device=device) * 6.3
    slots = torch.randperm(num_slots)[:tokens]
    slots[torch.rand(tokens) < 1 / 3] = -1
    return dict(positions=torch.randint(0, 64, (tokens,), device=device),
                q=qkv[:, :hq * d].view(tokens, hq, d),
                k=qkv[:, hq * d:(hq + hk) * d].view(tokens, hk, d),
                v=qkv[:, (hq + hk) * d:].view(tokens, hk, d),
                cos_sin_cache=torch.cat((angles.cos(), angles.sin()), dim=-1),
                slot_mapping=slots.to(device))


def assert_matches_reference(inputs: dict, is_neox: bool, cache_shape: tuple,
                             cache_dtype: torch.dtype) -> None:
    """The rotated q and every cache element (written or not) as the reference leaves them:
    rotated K within the dtype's tolerance, V copied exactly, the rest untouched."""
    def run(op, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        return op(**inputs, is_neox=is_neox, k_cache=k_cache, v_cache=v_cache)
    compare_with_reference(
        lambda *caches: run(rotary_kv_cache.rotary_and_write_kv_cache, *caches),
        lambda *caches: run(reference.rotary_and_write_kv_cache, *caches),
        inputs["slot_mapping"], cache_shape, cache_dtype, TOLERANCE, v_exact=True)


def compare_with_reference(op, reference_op, slots: torch.Tensor, cache_shape: tuple,
                           cache_dtype: torch.dtype, tolerance: dict, v_exact: bool) -> None:
    """op(k_cache, v_cache) -> q and reference_op on copies of the same random caches: q,
    and the written K and V slots within tolerance (V bit-exact if `v_exact`), every other
    cache element untouched."""
    device = slots.device
    caches = [torch.randn(cache_shape, device=device).to(cache_dtype) for _ in range(2)]
    expected_caches = [c.clone() for c in caches]
    assert_close(op(*caches), reference_op(*expected_caches), tolerance)
    written = torch.zeros(cache_shape[0] * cache_shape[1], dtype=torch.bool, device=device)
    written[slots[slots >= 0].long()] = True
    for index, (cache, expected) in enumerate(zip(caches, expected_caches)):
        cache, expected = (c.view(-1, *cache_shape[2:]) for c in (cache, expected))
        assert torch.equal(cache[~written], expected[~written])
        if index == 1 and v_exact:
            assert torch.equal(cache, expected)
        elif written.any():
            assert_close(cache[written], expected[written], tolerance)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("tokens,hq,hk,d,rot,block_size", [
    (7, 4, 2, 16, 16, 4), (5, 6, 3, 24, 12, 16), (5, 3, 1, 20, 8, 1), (1, 8, 8, 32, 32, 16)])
def test_matches_reference(device, is_neox, tokens, hq, hk, d, rot, block_size):
    num_blocks = 6
    for dtype in dtypes(device):
        inputs = random_inputs(tokens, hq, hk, d, rot, dtype, device, num_blocks * block_size)
        assert_matches_reference(inputs, is_neox, (num_blocks, block_size, hk, d), dtype)


GEMM_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens,hidden,hq,hk,d,rot,split", [
    (3, 160, 4, 2, 16, 16, True), (1, 192, 3, 1, 20, 8, True), (20, 48, 4, 2, 16, 12, False)])
def test_qkv_projection_matches_reference(device, tokens, hidden, hq, hk, d, rot, split,
                                          monkeypatch):
    """Projection, rotation and cache writes as the reference, with and without bias; on
    the split-K path the rotary kernel sums the partials: no reduction pass runs."""
    from shardline.kernels import matmul_split_k
    reduces = []
    gemm = matmul_split_k.split_k_gemm
    monkeypatch.setattr(matmul_split_k, "split_k_gemm",
                        lambda *a, **kw: reduces.append(1) or gemm(*a, **kw))
    block_size, num_blocks = 4, 8
    for dtype in dtypes(device):
        for is_neox, with_bias in ((True, True), (False, False)):
            inputs = random_inputs(tokens, hq, hk, d, rot, dtype, device,
                                   num_blocks * block_size)
            x = torch.randn(tokens, hidden, dtype=dtype, device=device)
            weight = torch.randn((hq + 2 * hk) * d, hidden, dtype=dtype,
                                 device=device) / hidden ** 0.5
            bias = (torch.randn(weight.shape[0], dtype=dtype, device=device) if with_bias
                    else None)
            assert (matmul_split_k.k_slices(x, weight, None)[0] > 1) == split
            args = dict(x=x, weight=weight, bias=bias, positions=inputs["positions"],
                        cos_sin_cache=inputs["cos_sin_cache"], is_neox=is_neox,
                        slot_mapping=inputs["slot_mapping"], num_heads=hq)
            compare_with_reference(
                lambda k_cache, v_cache: rotary_kv_cache.qkv_rotary_and_write_kv_cache(
                    **args, k_cache=k_cache, v_cache=v_cache),
                lambda k_cache, v_cache: reference.qkv_rotary_and_write_kv_cache(
                    **args, k_cache=k_cache, v_cache=v_cache),
                inputs["slot_mapping"], (num_blocks, block_size, hk, d), dtype, GEMM_TOLERANCE,
                v_exact=False)
    assert not reduces


def test_qkv_projection_rejects_a_weight_the_cache_does_not_fit():
    inputs = random_inputs(3, 4, 2, 16, 16, torch.float32, "cpu", 16)
    cache = torch.zeros(2, 8, 2, 16)
    with pytest.raises(ValueError, match=r"weight must be \[\(num_heads 4 \+ 2 x 2 KV heads"):
        rotary_kv_cache.qkv_rotary_and_write_kv_cache(
            torch.randn(3, 32), torch.randn(7 * 16, 32), None, inputs["positions"],
            inputs["cos_sin_cache"], True, cache, cache, inputs["slot_mapping"], 4)
    with pytest.raises(ValueError, match="k_cache must be"):
        rotary_kv_cache.qkv_rotary_and_write_kv_cache(
            torch.randn(3, 32), torch.randn(8 * 16, 32), None, inputs["positions"],
            inputs["cos_sin_cache"], True, torch.empty(0), torch.empty(0),
            inputs["slot_mapping"], 4)


@pytest.mark.parametrize("hidden", [32, 160])   # tiled and split-K projections
def test_both_ops_read_strided_positions_slots_and_bias(hidden):
    tokens, hq, hk, d, block_size, num_blocks = 3, 4, 2, 16, 4, 8
    inputs = random_inputs(tokens, hq, hk, d, d, torch.float32, "cpu", num_blocks * block_size)
    inputs["positions"] = torch.stack((inputs["positions"], inputs["positions"]), 1)[:, 1]
    inputs["slot_mapping"] = inputs["slot_mapping"].repeat_interleave(2)[::2]
    assert not inputs["positions"].is_contiguous()
    assert_matches_reference(inputs, True, (num_blocks, block_size, hk, d), torch.float32)
    x = torch.randn(tokens, hidden)
    weight = torch.randn((hq + 2 * hk) * d, hidden) / hidden ** 0.5
    args = dict(x=x, weight=weight, bias=torch.randn(2 * weight.shape[0])[::2],
                positions=inputs["positions"], cos_sin_cache=inputs["cos_sin_cache"],
                is_neox=True, slot_mapping=inputs["slot_mapping"], num_heads=hq)
    compare_with_reference(
        lambda k_cache, v_cache: rotary_kv_cache.qkv_rotary_and_write_kv_cache(
            **args, k_cache=k_cache, v_cache=v_cache),
        lambda k_cache, v_cache: reference.qkv_rotary_and_write_kv_cache(
            **args, k_cache=k_cache, v_cache=v_cache),
        inputs["slot_mapping"], (num_blocks, block_size, hk, d), torch.float32, GEMM_TOLERANCE,
        v_exact=False)


@pytest.mark.parametrize("name", ["positions", "slot_mapping"])
def test_qkv_projection_names_a_short_per_token_input_before_projecting(name, monkeypatch):
    from shardline.kernels import matmul, matmul_split_k
    for module, op in ((matmul, "linear"), (matmul_split_k, "partials")):
        monkeypatch.setattr(module, op, lambda *a, **kw: pytest.fail("projected first"))
    inputs = random_inputs(3, 4, 2, 16, 16, torch.float32, "cpu", 16)
    inputs[name] = inputs[name][:2]
    cache = torch.zeros(2, 8, 2, 16)
    with pytest.raises(ValueError, match=rf"{name} must be \[3\] \(one .* per row of x\)"):
        rotary_kv_cache.qkv_rotary_and_write_kv_cache(
            torch.randn(3, 32), torch.randn(8 * 16, 32), None, inputs["positions"],
            inputs["cos_sin_cache"], True, cache, cache, inputs["slot_mapping"], 4)


def test_casts_to_the_cache_dtype():
    inputs = random_inputs(6, 4, 2, 16, 16, torch.float32, "cpu", 32)
    assert_matches_reference(inputs, True, (4, 8, 2, 16), torch.float16)


def test_padding_only_rotates_q_and_writes_nothing():
    inputs = random_inputs(4, 4, 2, 16, 16, torch.float32, "cpu", 32)
    inputs["slot_mapping"] = torch.full((4,), -1)
    k_cache, v_cache = torch.randn(4, 8, 2, 16), torch.randn(4, 8, 2, 16)
    before = k_cache.clone(), v_cache.clone()
    q = rotary_kv_cache.rotary_and_write_kv_cache(**inputs, is_neox=True, k_cache=k_cache,
                                                  v_cache=v_cache)
    expected_q, _ = reference.rotary_embedding(inputs["positions"], inputs["q"], inputs["k"],
                                               inputs["cos_sin_cache"], True)
    assert_close(q, expected_q, TOLERANCE)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_rejects_mismatched_shapes():
    inputs = random_inputs(3, 4, 2, 16, 16, torch.float32, "cpu", 16)
    k_cache = v_cache = torch.zeros(2, 8, 2, 16)
    with pytest.raises(ValueError, match="slot_mapping must be"):
        rotary_kv_cache.rotary_and_write_kv_cache(
            **{**inputs, "slot_mapping": torch.arange(2)}, is_neox=True, k_cache=k_cache,
            v_cache=v_cache)
    with pytest.raises(ValueError, match="cos_sin_cache must be"):
        rotary_kv_cache.rotary_and_write_kv_cache(
            **{**inputs, "cos_sin_cache": torch.randn(10, 7)}, is_neox=True, k_cache=k_cache,
            v_cache=v_cache)
    with pytest.raises(ValueError, match="k_cache and v_cache must be"):
        rotary_kv_cache.rotary_and_write_kv_cache(
            **inputs, is_neox=True, k_cache=torch.zeros(2, 8, 1, 16), v_cache=v_cache)


def test_dispatch_routes_cpu_tensors_to_triton_only_when_forced(monkeypatch):
    monkeypatch.setattr(rotary_kv_cache, "rotary_and_write_kv_cache", lambda *a: "triton")
    inputs = random_inputs(3, 4, 2, 16, 16, torch.float32, "cpu", 16)
    args = (inputs["positions"], inputs["q"], inputs["k"], inputs["v"],
            inputs["cos_sin_cache"], True)
    force_triton(monkeypatch, True)
    assert kernels.rotary_and_write_kv_cache(*args, torch.zeros(2, 8, 2, 16),
                                             torch.zeros(2, 8, 2, 16),
                                             inputs["slot_mapping"]) == "triton"
    force_triton(monkeypatch, False)
    caches = [torch.zeros(2, 8, 2, 16) for _ in range(4)]
    actual = kernels.rotary_and_write_kv_cache(*args, caches[0], caches[1],
                                               inputs["slot_mapping"])
    expected = reference.rotary_and_write_kv_cache(*args, caches[2], caches[3],
                                                   inputs["slot_mapping"])
    assert torch.equal(actual, expected)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def test_qkv_dispatch_routes_cpu_tensors_to_triton_only_when_forced(monkeypatch):
    monkeypatch.setattr(rotary_kv_cache, "qkv_rotary_and_write_kv_cache", lambda *a: "triton")
    inputs = random_inputs(3, 4, 2, 16, 16, torch.float32, "cpu", 16)
    x, weight = torch.randn(3, 32), torch.randn(8 * 16, 32)
    args = (x, weight, None, inputs["positions"], inputs["cos_sin_cache"], True)
    tail = (inputs["slot_mapping"], 4)
    force_triton(monkeypatch, True)
    cache = torch.zeros(2, 8, 2, 16)
    assert kernels.qkv_rotary_and_write_kv_cache(*args, cache, cache, *tail) == "triton"
    force_triton(monkeypatch, False)
    caches = [torch.zeros(2, 8, 2, 16) for _ in range(4)]
    actual = kernels.qkv_rotary_and_write_kv_cache(*args, caches[0], caches[1], *tail)
    expected = reference.qkv_rotary_and_write_kv_cache(*args, caches[2], caches[3], *tail)
    assert torch.equal(actual, expected)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def test_kernel_compiles_for_h100(compile_for_h100):
    io = {name: "*bf16" for name in ("q_ptr", "k_ptr", "v_ptr", "q_out_ptr", "k_cache_ptr",
                                     "v_cache_ptr")}
    io.update(pos_ptr="*i64", slot_ptr="*i64", cos_sin_ptr="*fp32", bias_ptr="*bf16")
    partials = {**io, "q_ptr": "*fp32", "k_ptr": "*fp32", "v_ptr": "*fp32"}
    compile_for_h100("shardline.kernels.rotary_kv_cache", [
        ("_rotary_kv_cache_kernel", types,
         dict(KV_BLOCK_SIZE=16, SPLITS=splits, HAS_BIAS=bias, IS_NEOX=neox, BLOCK_HQ=32,
              BLOCK_HK=8, BLOCK_HALF=32, BLOCK_TAIL=0 if neox else 64, BLOCK_D=128))
        for neox, splits, bias, types in ((True, 1, False, io), (False, 1, False, io),
                                          (True, 4, True, partials))
    ])

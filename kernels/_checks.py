"""Input checks the kernels share, so bad input fails before a launch with a message that
names the argument, and the layout fixes the kernels rely on (a unit last stride)."""

from __future__ import annotations

import torch


def unit_last_dim(t: torch.Tensor) -> torch.Tensor:
    """`t` itself where its last dim is contiguous, else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def output_like(like: torch.Tensor, out: torch.Tensor | None, name: str = "out",
                shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """`out` where given, refused unless it has `shape` (by default `like`'s), `like`'s
    dtype and device and a unit last stride (the kernels store rows at out's strides);
    else a new tensor."""
    shape = tuple(like.shape) if shape is None else tuple(shape)
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if (tuple(out.shape) != shape or out.dtype != like.dtype or out.device != like.device
            or (out.numel() and out.stride(-1) != 1)):
        raise ValueError(f"{name} must be {list(shape)} {like.dtype} on {like.device} with a "
                         f"contiguous last dim; got {list(out.shape)} {out.dtype} on "
                         f"{out.device}")
    return out


def check_index(t: torch.Tensor, name: str, length: int, what: str) -> torch.Tensor:
    """A 1-D integer tensor of `length` entries (`what` says what they count), returned
    contiguous: the kernels read entry i at offset i."""
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must be [{length}] ({what}); got {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers; got {t.dtype}")
    return t.contiguous()


def check_same_dtype(x: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Each named tensor given (not None) has x's dtype: the kernels read them as such."""
    for name, t in others.items():
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{name} must have x's dtype {x.dtype}; got {t.dtype}")


def check_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """q [tokens, Hq, D] against a [blocks, block_size, Hk, D] cache and B sequences."""
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, Hq, D]; got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must be the same [blocks, block_size, Hk, D]; "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"head size of q ({q.shape[2]}) and of the cache "
                         f"({k_cache.shape[3]}) differ")
    if q.shape[1] % k_cache.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads "
                         f"({k_cache.shape[2]})")
    if block_tables.dim() != 2:
        raise ValueError(f"block_tables must be [B, max_blocks]; got {tuple(block_tables.shape)}")
    if seq_lens.shape != (block_tables.shape[0],):
        raise ValueError(f"seq_lens must be [{block_tables.shape[0]}]; got "
                         f"{tuple(seq_lens.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must have a contiguous last dim")


def check_qkv_weight(weight: torch.Tensor, num_heads: int, k_cache: torch.Tensor
                     ) -> tuple[int, int]:
    """(KV heads, head size) of a fused QKV weight [(Hq + 2 Hk) D, H] that feeds the cache
    k_cache [blocks, block_size, Hk, D]."""
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [blocks, block_size, Hk, D]; got "
                         f"{tuple(k_cache.shape)}")
    num_kv_heads, head_size = k_cache.shape[2], k_cache.shape[3]
    rows = (num_heads + 2 * num_kv_heads) * head_size
    if weight.dim() != 2 or weight.shape[0] != rows:
        raise ValueError(f"weight must be [(num_heads {num_heads} + 2 x {num_kv_heads} KV heads "
                         f"of the cache) x head size {head_size} = {rows}, hidden]; got "
                         f"{tuple(weight.shape)}")
    return num_kv_heads, head_size

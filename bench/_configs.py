"""Triton configs as one line of text, as the tuning and resource benches print and record
them."""

from __future__ import annotations

import triton


def describe(config: triton.Config, short: bool = False) -> str:
    """"BLOCK_M=16 BLOCK_N=64 BLOCK_K=128 GROUP_M=8 w4 s3": the tile parameters, warps and
    stages. `short`, for tables of many configs, drops the "BLOCK_" prefixes and GROUP_M
    (which changes no resource of the compiled kernel): "M=16 N=64 K=128 w4 s3"."""
    tiles = " ".join(f"{k.removeprefix('BLOCK_') if short else k}={v}"
                     for k, v in config.kwargs.items() if not (short and k == "GROUP_M"))
    return f"{tiles} w{config.num_warps} s{config.num_stages}".strip()

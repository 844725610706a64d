"""Launch configurations of the Triton kernels: data in one place.

The launchers ask `forward_config`; the compile check (`prefix_kernels.triton.compile_check`) enumerates
`forward_launch_space()`, which is every configuration `forward_config` can return, so what can be launched is
exactly what is compiled for sm_80 and sm_90 on the CPU machines.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Head dims are padded to the next power of two inside the kernels (80 -> 128, 96 -> 128).
BLOCK_D_CHOICES = (16, 32, 64, 128, 256)
# Query-block heights for short query lengths (decode, speculative widths); tl.dot needs M >= 16.
SHORT_BLOCK_M = (16, 32, 64)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class ForwardConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def block_d_for(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def _long_query_config(block_d: int, dtype: torch.dtype) -> ForwardConfig:
    if dtype == torch.float32:
        # fp32 tiles are twice the bytes and the dot runs in IEEE fp32: smaller tiles, fewer stages.
        if block_d >= 256:
            return ForwardConfig(32, 32, 4, 1)
        return ForwardConfig(64, 32, 4, 2)
    if block_d >= 256:
        return ForwardConfig(64, 32, 8, 2)
    if block_d == 128:
        return ForwardConfig(128, 64, 8, 3)
    return ForwardConfig(128, 64, 4, 3)


def forward_config(head_dim: int, dtype: torch.dtype, seq_q: int) -> ForwardConfig:
    """The configuration the forward launcher uses for this call."""
    block_d = block_d_for(head_dim)
    base = _long_query_config(block_d, dtype)
    for block_m in SHORT_BLOCK_M:
        if seq_q <= block_m and block_m < base.block_m:
            # A short query block: fewer warps, since the tile has few rows.
            return ForwardConfig(block_m, base.block_n, 4, base.num_stages)
    return base


def forward_launch_space() -> list[tuple[int, torch.dtype, ForwardConfig]]:
    """Every (block_d, dtype, config) that forward_config can return."""
    space = []
    for dtype in FLOAT_DTYPES:
        for block_d in BLOCK_D_CHOICES:
            head_dim = block_d
            seen = set()
            for seq_q in (1, 17, 33, 4096):
                config = forward_config(head_dim, dtype, seq_q)
                if config not in seen:
                    seen.add(config)
                    space.append((block_d, dtype, config))
    return space

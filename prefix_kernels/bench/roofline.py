"""The roofline floor of each op row: FLOPs and the bytes that must move, against ceilings measured in this run.

FLOPs: 4 * B * Hq * D * (visible query-key pairs per head) for the forward (QK^T and PV, 2 FLOPs per MAC),
x3.5 for forward + backward (ANCHORS.md). Visible pairs, counted per query at position pos = L - S + i: every
prefix key (positions -P..-1) and the own keys j <= pos (causal) or all L; with a window only the keys at positions
above pos - window (S <= L: S * P + S * (L - S) + S * (S + 1) / 2 causal, as ANCHORS' S^2 / 2 + S * P).
Bytes: every input read once and every output written once, the prefix counted ONCE (not B times); with a window,
only the K/V that some query's window reaches are read (the gradients are written whole).
floor = max(bytes / copy bandwidth, FLOPs / matmul rate).
"""
from __future__ import annotations

import torch

from .cases import OpCase
from .timing import bench_ms

FWD_BWD_FLOP_FACTOR = 3.5


def visible_pairs(case: OpCase) -> float:
    s, l, p = case.seq_q, case.seq_k, case.prefix
    pos = torch.arange(l - s, l, dtype=torch.float64)
    first = pos - case.window + 1 if case.window is not None else torch.full_like(pos, -p)  # leftmost key position
    prefix = (-1 - torch.clamp(first, min=-p) + 1).clamp(min=0)
    last_own = torch.clamp(pos, max=l - 1) if case.causal else torch.full_like(pos, l - 1)
    own = (last_own - torch.clamp(first, min=0) + 1).clamp(min=0)
    return float((prefix + own).sum())


def _keys_read(case: OpCase) -> tuple[int, int]:
    """(own keys, prefix keys) per sequence that some query's window reaches: all of them without a window."""
    if case.window is None:
        return case.seq_k, case.prefix
    first = case.seq_k - case.seq_q - case.window + 1  # the first query's leftmost key position
    return min(case.seq_k, max(case.seq_k - first, 0)), min(case.prefix, max(-first, 0))


def op_flops(case: OpCase) -> float:
    fwd = 4.0 * case.batch * case.heads_q * case.head_dim * visible_pairs(case)
    return fwd * FWD_BWD_FLOP_FACTOR if case.op == "fwd+bwd" else fwd


def op_bytes(case: OpCase) -> float:
    elt = torch.empty((), dtype=case.torch_dtype).element_size()
    b, d = case.batch, case.head_dim
    q = b * case.heads_q * case.seq_q * d          # also the size of out, dout, dq
    own = b * case.heads_kv * case.seq_k * d       # each of k, v (and dk, dv)
    pre = case.heads_kv * case.prefix * d          # each of prefix_k, prefix_v: ONCE
    own_keys, prefix_keys = _keys_read(case)
    own_read = b * case.heads_kv * own_keys * d
    pre_read = case.heads_kv * prefix_keys * d
    forward = (q + 2 * own_read + 2 * pre_read) + q  # read q, k, v, prefix; write out
    if case.op != "fwd+bwd":
        return forward * elt
    lse = b * case.heads_q * case.seq_q * 4          # float32, written by the forward, read by the backward
    # read q, k, v, prefix, out, dout; write dq and the whole dk, dv, d prefix
    backward = (q + 2 * own_read + 2 * pre_read + 2 * q) + (q + 2 * own + 2 * pre)
    return (forward + backward) * elt + 2 * lse


def measure_ceilings(device, *, warmup_ms=25, rep_ms=100) -> dict:
    """Copy bandwidth (bytes read + written per second) and matmul rate of this device, measured now."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    n_bytes = (1 << 30) if on_gpu else (64 << 20)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src), device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    del src, dst
    n = 8192 if on_gpu else 512
    dtype = torch.bfloat16 if on_gpu else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_ms = bench_ms(lambda: a @ b, device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    del a, b
    return dict(copy_bytes=2 * n_bytes, copy_ms=copy_ms, bandwidth_bytes_per_s=2 * n_bytes / (copy_ms * 1e-3),
                matmul_n=n, matmul_dtype=str(dtype).removeprefix("torch."), matmul_ms=mm_ms,
                matmul_flops_per_s=2.0 * n ** 3 / (mm_ms * 1e-3))


def floor_ms(case: OpCase, ceilings: dict) -> dict:
    flops, nbytes = op_flops(case), op_bytes(case)
    memory_ms = nbytes / ceilings["bandwidth_bytes_per_s"] * 1e3
    compute_ms = flops / ceilings["matmul_flops_per_s"] * 1e3
    return dict(flops=flops, bytes=nbytes, memory_floor_ms=memory_ms, compute_floor_ms=compute_ms,
                floor_ms=max(memory_ms, compute_ms), bound="memory" if memory_ms >= compute_ms else "compute")

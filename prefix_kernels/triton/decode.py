"""Shared-prefix decode (S <= 16, no gradients): Hydragen-style prefix batching, split-K, and an LSE merge.

Two launches, both sized from shapes only (no .item(), no host sync, no value-dependent allocation), so a step
can be captured in a CUDA graph:

1. `_decode_partials` computes every partial attention into an fp32 workspace [slots, B*Hq*S, D] (+ LSE):
   - prefix programs: for one (prefix n, KV head, split of the prefix keys, block of rows) the rows are the
     (b, g, s) triples of ALL sequences and of the G heads of the group, gathered by index math (Hydragen's
     inter-sequence batching). A prefix tile is therefore loaded once per BLOCK_M rows instead of once per
     sequence: with one shared prefix and B*G*S <= BLOCK_M rows, the prefix is read exactly once per step;
     beyond that, the row blocks of one (head, split) are adjacent program ids, so they run together and the
     repeats hit L2. Rows whose prefix is not n are masked out; with several prefixes the sequences are
     first sorted by prefix on the device (fixed size), so a row block mostly holds one prefix and blocks
     holding none of prefix n skip all work.
   - own programs: one (sequence, KV head, split of its own keys, block of rows), rows = the G*S queries of the
     group, so each sequence's own K/V is read once for all heads of its group.
   Both kinds share one launch: the long prefix programs come first, the many short own programs fill around
   them, and there is no tail between two kernels (DecodeConfig.interleave alternates the two kinds instead;
   DecodeConfig.own_launch gives the own programs a launch of their own, with their own tiling's footprint).
   On sm_90 a prefix part of more than 128 packed rows reads its K/V tiles through TMA descriptors.
2. `_merge_partials` combines the slots of each row by their LSEs into out (q's dtype) and lse (float32);
   rows that saw nothing anywhere get zeros and -inf.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .configs import (DECODE_OFF_GPU_SMS, MERGE_BLOCK_M, MERGE_NUM_WARPS, block_d_for,
                      cdiv, decode_config, decode_splits)
from .device import launch, on_first_tensor_device
from .forward import (_attend_tile, _has_tma, _load_rows, _own_visible, _tma_compatible, attention_sinks_argument,
                      dot_precision, prefix_window_padding, window_argument)


@triton.jit
def _store_partial(acc, m_i, l_i, WOut, WLse, slot, rows, store_ok, offs_d, d_ok, R, HEAD_DIM: tl.constexpr):
    """Normalized partial out and its LSE (natural log) for `rows` of workspace slot `slot`; nothing seen ->
    zeros and -inf, which the merge weighs as 0."""
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    row64 = tl.cast(slot, tl.int64) * R + rows.to(tl.int64)  # slot may be a constant 1 (specialized)
    tl.store(WOut + row64[:, None] * HEAD_DIM + offs_d[None, :], out, mask=store_ok[:, None] & d_ok[None, :])
    tl.store(WLse + row64, lse, mask=store_ok)


@triton.jit
def _prefix_part(
    pid, Q, PK, PV, WOut, WLse, PrefixIndex, PrefixLens, Order, LeftPad,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_pkn, stride_pkh, stride_pks, stride_pkd,
    stride_pvn, stride_pvh, stride_pvs, stride_pvd,
    HQ, HKV, S, L, P, R, NH, ROWS, RB, CHUNK, sm_scale, softcap, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_PREFIX_INDEX: tl.constexpr,
    HAS_PREFIX_LENS: tl.constexpr, HAS_ORDER: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_DESC: tl.constexpr, PREFIX_WINDOW: tl.constexpr,
):
    # Row blocks vary fastest: the blocks reading one (prefix, head, split) tile range run side by side (L2 reuse).
    rb = pid % RB
    rest = pid // RB
    nh = rest % NH
    split = rest // NH
    n = nh // HKV
    h = nh % HKV

    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)  # packed rows r = (j * G + g) * S + s, j = the j-th sequence
    row_ok = rows < ROWS
    j = rows // (GROUP * S)
    g = (rows // S) % GROUP
    s = rows % S
    if HAS_ORDER:
        b = tl.load(Order + j, mask=row_ok, other=0).to(tl.int64)
    else:
        b = j.to(tl.int64)
    if HAS_PREFIX_INDEX:
        mine = row_ok & (tl.load(PrefixIndex + b, mask=row_ok, other=-1) == n)
    else:
        mine = row_ok
    hq = h * GROUP + g
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = Q + b[:, None] * stride_qb + hq[:, None].to(tl.int64) * stride_qh + s[:, None] * stride_qs \
        + offs_d[None, :] * stride_qd
    q = _load_rows(q_ptrs, mine, d_ok, True, HEAD_DIM != BLOCK_D)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_PREFIX_LENS:
        prefix_len = tl.load(PrefixLens + n).to(tl.int32)
    else:
        prefix_len = P
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, prefix_len)
    if PREFIX_WINDOW:  # (window_includes_prefix) each row's first key in the window: key p sits at p - prefix_len,
        # the row's query at L - S + s less its left padding. Keys left of every row of this block's are skipped.
        pad = tl.load(LeftPad + b, mask=row_ok, other=0).to(tl.int32)
        first_key = (L - S + s) - pad + prefix_len - window + 1
        block_first = tl.min(tl.where(mine, first_key, prefix_len), 0)
        start = tl.maximum(start, (tl.maximum(block_first, 0) // BLOCK_N) * BLOCK_N)
    # A block holding no row of prefix n reads nothing (with sorted rows, most blocks of other prefixes).
    any_mine = tl.max(mine.to(tl.int32), 0) > 0
    end = tl.where(any_mine, tl.maximum(end, start), start)
    if PREFIX_WINDOW:  # every tile masked, from each row's first key
        full_end = start
    else:
        full_end = start + ((end - start) // BLOCK_N) * BLOCK_N
    if USE_DESC:  # PK, PV are 4-D TMA tensor descriptors, addressed by (int32) coordinates [n, h, key, 0]
        pk_base = PK
        pv_base = PV
    else:
        pk_base = PK + n.to(tl.int64) * stride_pkn + h.to(tl.int64) * stride_pkh
        pv_base = PV + n.to(tl.int64) * stride_pvn + h.to(tl.int64) * stride_pvh
    for start_n in range(start, full_end, BLOCK_N):  # every prefix key is visible: no mask in full tiles
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, pk_base, pv_base, stride_pks, stride_pkd, stride_pvs, stride_pvd,
            start_n, end, 0, sm_scale, softcap, offs_n, offs_d,
            HEAD_DIM, BLOCK_D, False, HAS_SOFTCAP, DOT_PRECISION, n, h, USE_DESC)
    for start_n in range(full_end, end, BLOCK_N):  # the partial last tile of the split (window: all), if any
        # (TMA zero-fills keys past P; keys past `end` but inside P are read and masked here)
        cols = start_n + offs_n
        visible = tl.broadcast_to(cols[None, :] < end, (BLOCK_M, BLOCK_N))
        if PREFIX_WINDOW:
            visible = visible & (cols[None, :] >= first_key[:, None])
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, pk_base, pv_base, stride_pks, stride_pkd, stride_pvs, stride_pvd,
            start_n, end, visible, sm_scale, softcap, offs_n, offs_d,
            HEAD_DIM, BLOCK_D, True, HAS_SOFTCAP, DOT_PRECISION, n, h, USE_DESC)
    out_rows = (b * HQ + hq) * S + s
    _store_partial(acc, m_i, l_i, WOut, WLse, split, out_rows, mine, offs_d, d_ok, R, HEAD_DIM)


@triton.jit
def _own_window_start(L, S, window, BLOCK_N: tl.constexpr):
    """Keys left of L - S - window + 1 are outside every row's window: whole tiles of them are skipped."""
    return (tl.maximum(L - S - window + 1, 0) // BLOCK_N) * BLOCK_N


@triton.jit
def _own_part(
    pid, Q, K, V, KPM, WOut, WLse,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_ml,
    HQ, HKV, S, L, R, NB, ROWS, RB, CHUNK, FIRST_SLOT, sm_scale, softcap, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    rb = pid % RB
    rest = pid // RB
    bh = rest % NB
    split = rest // NB
    b = (bh // HKV).to(tl.int64)
    h = bh % HKV

    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)  # rows r = g * S + s of this sequence's KV-head group
    row_ok = rows < ROWS
    g = rows // S
    s = rows % S
    hq = h * GROUP + g
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = Q + b * stride_qb + hq[:, None].to(tl.int64) * stride_qh + s[:, None] * stride_qs \
        + offs_d[None, :] * stride_qd
    q = _load_rows(q_ptrs, row_ok, d_ok, True, HEAD_DIM != BLOCK_D)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    q_pos = L - S + s  # bottom-right aligned
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, L)
    if HAS_WINDOW:
        start = tl.maximum(start, _own_window_start(L, S, window, BLOCK_N))
    k_base = K + b * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b * stride_vb + h.to(tl.int64) * stride_vh
    # Few rows and a memory-bound stream: every tile takes the masked path (the mask is cheap next to the loads).
    for start_n in range(start, end, BLOCK_N):
        visible = _own_visible(start_n + offs_n, end, q_pos, b, KPM, stride_mb, stride_ml, window,
                               BLOCK_M, BLOCK_N, CAUSAL, HAS_KPM, HAS_WINDOW)
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
            start_n, end, visible, sm_scale, softcap, offs_n, offs_d,
            HEAD_DIM, BLOCK_D, True, HAS_SOFTCAP, DOT_PRECISION)
    out_rows = (b * HQ + hq) * S + s
    _store_partial(acc, m_i, l_i, WOut, WLse, FIRST_SLOT + split, out_rows, row_ok, offs_d, d_ok, R, HEAD_DIM)


@triton.jit
def _own_part_units(
    pid, Q, K, V, KPM, WOut, WLse,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_ml,
    HQ, HKV, S, L, R, NB, ROWS, UNITS, SLOT, sm_scale, softcap, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The own part of UNITS consecutive (sequence, KV head) pairs, each whole (one split, one row block: the plan
    chooses this only then), as ONE loop over (pair, key tile). The software pipeline then loads the next pair's
    first tiles while this pair's last ones are computed: the stream does not drain between pairs, as it does
    between programs (a new program's first tile waits a whole memory latency, with nothing else in flight when
    the launch's footprint leaves one program per SM)."""
    rows = tl.arange(0, BLOCK_M)  # rows r = g * S + s of a sequence's KV-head group
    row_ok = rows < ROWS
    g = rows // S
    s = rows % S
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_pos = L - S + s  # bottom-right aligned
    if HAS_WINDOW:
        start = _own_window_start(L, S, window, BLOCK_N)
    else:
        start = 0
    # At least one (then fully masked) tile, so that every pair's partial is written, -inf if it sees nothing: the
    # plan comes here only with own keys, but window=0 or L=0 must not leave a workspace slot unwritten.
    tiles = tl.maximum(tl.cdiv(L - start, BLOCK_N), 1)
    first = pid * UNITS
    pairs = tl.minimum(UNITS, NB - first)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for t in range(0, pairs * tiles):
        bh = first + t // tiles
        tile = t % tiles
        b = (bh // HKV).to(tl.int64)
        h = bh % HKV
        hq = h * GROUP + g
        # q is re-read with every tile (4 KB against the tile's 32 KB of K/V, from L2): the pipeline then treats
        # it like the K/V loads, and a new pair needs no branch.
        q_ptrs = Q + b * stride_qb + hq[:, None].to(tl.int64) * stride_qh + s[:, None] * stride_qs \
            + offs_d[None, :] * stride_qd
        q = _load_rows(q_ptrs, row_ok, d_ok, True, HEAD_DIM != BLOCK_D)
        fresh = tile == 0  # a new pair starts from an empty softmax state
        acc = tl.where(fresh, 0.0, acc)
        m_i = tl.where(fresh, float("-inf"), m_i)
        l_i = tl.where(fresh, 0.0, l_i)
        start_n = start + tile * BLOCK_N
        visible = _own_visible(start_n + offs_n, L, q_pos, b, KPM, stride_mb, stride_ml, window,
                               BLOCK_M, BLOCK_N, CAUSAL, HAS_KPM, HAS_WINDOW)
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, K + b * stride_kb + h.to(tl.int64) * stride_kh,
            V + b * stride_vb + h.to(tl.int64) * stride_vh, stride_ks, stride_kd, stride_vs, stride_vd,
            start_n, L, visible, sm_scale, softcap, offs_n, offs_d,
            HEAD_DIM, BLOCK_D, True, HAS_SOFTCAP, DOT_PRECISION)
        if tile == tiles - 1:
            _store_partial(acc, m_i, l_i, WOut, WLse, SLOT, (b * HQ + hq) * S + s, row_ok, offs_d, d_ok, R,
                           HEAD_DIM)


@triton.jit
def _decode_partials(
    Q, K, V, PK, PV, KPM, PrefixIndex, PrefixLens, Order, LeftPad, WOut, WLse,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pkn, stride_pkh, stride_pks, stride_pkd,
    stride_pvn, stride_pvh, stride_pvs, stride_pvd,
    stride_mb, stride_ml,
    HQ, HKV, S, L, P, R, sm_scale, softcap, window,
    PREFIX_PROGRAMS, P_NH, P_ROWS, P_RB, P_SPLITS, P_CHUNK,
    O_NB, O_ROWS, O_RB, O_CHUNK, O_UNITS,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    P_BLOCK_M: tl.constexpr, P_BLOCK_N: tl.constexpr, O_BLOCK_M: tl.constexpr, O_BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_PREFIX_INDEX: tl.constexpr, HAS_PREFIX_LENS: tl.constexpr, HAS_ORDER: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_DESC: tl.constexpr = False, INTERLEAVE: tl.constexpr = False,
    OWN_UNITS: tl.constexpr = False, PREFIX_PART: tl.constexpr = True, OWN_PART: tl.constexpr = True,
    PREFIX_WINDOW: tl.constexpr = False,
):
    # PREFIX_PART / OWN_PART: which kinds of program this launch holds (DecodeConfig.own_launch launches each kind
    # alone); with one kind, is_prefix is a constant and the other kind's code is not compiled in.
    pid = tl.program_id(0)
    if not (PREFIX_PART and OWN_PART):
        is_prefix = PREFIX_PART
        local = pid
    elif INTERLEAVE:  # prefix and own programs alternate until the fewer kind runs out (DecodeConfig.interleave)
        own_programs = tl.num_programs(0) - PREFIX_PROGRAMS
        paired = tl.minimum(PREFIX_PROGRAMS, own_programs)
        if pid < 2 * paired:
            is_prefix = pid % 2 == 0
            local = pid // 2
        else:
            is_prefix = PREFIX_PROGRAMS > own_programs
            local = pid - paired
    else:
        is_prefix = pid < PREFIX_PROGRAMS
        local = tl.where(is_prefix, pid, pid - PREFIX_PROGRAMS)
    if is_prefix:
        _prefix_part(
            local, Q, PK, PV, WOut, WLse, PrefixIndex, PrefixLens, Order, LeftPad,
            stride_qb, stride_qh, stride_qs, stride_qd,
            stride_pkn, stride_pkh, stride_pks, stride_pkd,
            stride_pvn, stride_pvh, stride_pvs, stride_pvd,
            HQ, HKV, S, L, P, R, P_NH, P_ROWS, P_RB, P_CHUNK, sm_scale, softcap, window,
            GROUP, HEAD_DIM, BLOCK_D, P_BLOCK_M, P_BLOCK_N, HAS_SOFTCAP, HAS_PREFIX_INDEX, HAS_PREFIX_LENS,
            HAS_ORDER, DOT_PRECISION, USE_DESC, PREFIX_WINDOW)
    elif OWN_UNITS:  # O_UNITS (sequence, KV head) pairs per own program (DecodeConfig.own_programs_per_sm)
        _own_part_units(
            local, Q, K, V, KPM, WOut, WLse,
            stride_qb, stride_qh, stride_qs, stride_qd,
            stride_kb, stride_kh, stride_ks, stride_kd,
            stride_vb, stride_vh, stride_vs, stride_vd,
            stride_mb, stride_ml,
            HQ, HKV, S, L, R, O_NB, O_ROWS, O_UNITS, P_SPLITS, sm_scale, softcap, window,
            GROUP, HEAD_DIM, BLOCK_D, O_BLOCK_M, O_BLOCK_N, CAUSAL, HAS_KPM, HAS_WINDOW, HAS_SOFTCAP,
            DOT_PRECISION)
    else:
        _own_part(
            local, Q, K, V, KPM, WOut, WLse,
            stride_qb, stride_qh, stride_qs, stride_qd,
            stride_kb, stride_kh, stride_ks, stride_kd,
            stride_vb, stride_vh, stride_vs, stride_vd,
            stride_mb, stride_ml,
            HQ, HKV, S, L, R, O_NB, O_ROWS, O_RB, O_CHUNK, P_SPLITS, sm_scale, softcap, window,
            GROUP, HEAD_DIM, BLOCK_D, O_BLOCK_M, O_BLOCK_N, CAUSAL, HAS_KPM, HAS_WINDOW, HAS_SOFTCAP,
            DOT_PRECISION)


@triton.jit
def _merge_partials(
    WOut, WLse, Out, Lse, Sinks, R, HQ, S,
    stride_ob, stride_oh, stride_os, stride_od,
    SLOTS, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    """out/lse of each row (b, hq, s) from its SLOTS partials; the max LSE is subtracted so nothing overflows,
    and a row whose every slot is -inf gets zeros and -inf (never exp(-inf - -inf) = NaN). HAS_SINKS: each head's
    attention sink is one more partial, of value zero and LSE Sinks[hq] (gpt-oss)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    rows64 = rows.to(tl.int64)
    b = rows64 // (HQ * S)
    hq = (rows64 // S) % HQ
    s = rows64 % S
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if HAS_SINKS:
        sink = tl.load(Sinks + hq, mask=row_ok, other=float("-inf")).to(tl.float32)
        m = sink
    for slot in range(0, SLOTS):
        m = tl.maximum(m, tl.load(WLse + slot * R + rows64, mask=row_ok, other=float("-inf")))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_SINKS:
        total = tl.exp(sink - m_use)
    for slot in range(0, SLOTS):
        base = slot * R + rows64
        weight = tl.exp(tl.load(WLse + base, mask=row_ok, other=float("-inf")) - m_use)
        part = tl.load(WOut + base[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                       other=0.0)
        acc += weight[:, None] * part
        total += weight
    seen = total > 0.0
    out = acc / tl.where(seen, total, 1.0)[:, None]
    lse = tl.where(seen, m_use + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    o_ptrs = Out + (b * stride_ob + hq * stride_oh + s * stride_os)[:, None] + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + rows64, lse, mask=row_ok)


@triton.jit
def _merge_two(
    OA, LA, OB, LB, Out, Lse, R,
    stride_ar, stride_ad, stride_br, stride_bd, stride_or, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """merge_attention_states on rows: out = (e^(la-m) oa + e^(lb-m) ob) / (e^(la-m) + e^(lb-m)), m = max;
    both -inf -> zeros and -inf."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < R
    offs_d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    la = tl.load(LA + rows, mask=row_ok, other=float("-inf")).to(tl.float32)
    lb = tl.load(LB + rows, mask=row_ok, other=float("-inf")).to(tl.float32)
    m = tl.maximum(la, lb)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    wa = tl.exp(la - m_use)
    wb = tl.exp(lb - m_use)
    oa = tl.load(OA + rows[:, None] * stride_ar + offs_d[None, :] * stride_ad, mask=mask, other=0.0).to(tl.float32)
    ob = tl.load(OB + rows[:, None] * stride_br + offs_d[None, :] * stride_bd, mask=mask, other=0.0).to(tl.float32)
    total = wa + wb
    seen = total > 0.0
    inv = 1.0 / tl.where(seen, total, 1.0)
    out = (wa * inv)[:, None] * oa + (wb * inv)[:, None] * ob
    lse = tl.where(seen, m_use + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    tl.store(Out + rows[:, None] * stride_or + offs_d[None, :] * stride_od, out.to(Out.dtype.element_ty), mask=mask)
    tl.store(Lse + rows, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------------------------
# Launchers

def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count  # cached by torch: no sync
    return DECODE_OFF_GPU_SMS


def decode_plan(q, k, prefix_k, *, config=None, sms=None):
    """Everything about the launch that follows from shapes: (config, prefix (rows, row blocks, splits, chunk),
    own (rows, row blocks, splits, chunk, pairs per program))."""
    return _plan_for_shapes(tuple(q.shape), k.shape[1], k.shape[2], prefix_k.shape[0], prefix_k.shape[2], q.dtype,
                            sms or _sm_count(q.device), config, _has_tma(q.device))


@functools.lru_cache(maxsize=1024)
def _plan_for_shapes(q_shape, heads_kv, seq_k, num_prefixes, prefix_len, dtype, sms, config, tma_capable):
    # Cached: a decode loop asks the same shapes every step, and the host time per step is what decode
    # latency is made of when the GPU work is ~0.1 ms.
    batch, heads_q, seq_q, head_dim = q_shape
    group = heads_q // heads_kv
    own_kv_bytes = 2 * batch * heads_kv * seq_k * head_dim * dtype.itemsize
    config = config or decode_config(head_dim, dtype, batch * group * seq_q, group * seq_q, tma_capable, own_kv_bytes)
    p_rows = batch * group * seq_q
    p_rb = cdiv(p_rows, config.prefix.block_m)
    o_rows = group * seq_q
    o_rb = cdiv(o_rows, config.own.block_m)
    # One tile width for both chunkings: the prefix tiles are at least as wide as the own ones.
    block_n = max(config.prefix.block_n, config.own.block_n)
    (p_splits, p_chunk), (o_splits, o_chunk) = decode_splits(
        p_rb * num_prefixes * heads_kv, prefix_len, o_rb * batch * heads_kv, seq_k, block_n, sms,
        config.prefix_programs_per_sm)
    o_units = 1
    if config.own_programs_per_sm is not None and o_rb == 1 and o_splits == 1:
        # Rounded up: at most own_programs_per_sm * sms programs (rounding down made up to twice as many, a
        # straggler wave of whole groups behind the first).
        o_units = cdiv(batch * heads_kv, config.own_programs_per_sm * sms)
    return config, (p_rows, p_rb, p_splits, p_chunk), (o_rows, o_rb, o_splits, o_chunk, o_units)


def decode_launch(q, k, v, prefix_k, prefix_v, work_out, work_lse, *, causal, scale, key_padding_mask,
                  prefix_index, prefix_lens, window, softcap, window_includes_prefix=False, left_padding=None,
                  order=None, config=None, sms=None, plan=None, part="both"):
    """(grid, args, kwargs) of _decode_partials: shared by the launcher and the compile check. `plan`:
    decode_plan's answer for these tensors, when the caller already has it. `part`: "both" kinds of program in
    one launch, or the "prefix" or the "own" programs alone (DecodeConfig.own_launch)."""
    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    num_prefixes = prefix_k.shape[0]
    config, (p_rows, p_rb, p_splits, p_chunk), (o_rows, o_rb, o_splits, o_chunk, o_units) = plan or decode_plan(
        q, k, prefix_k, config=config, sms=sms)
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    prefix_programs = p_rb * num_prefixes * heads_kv * p_splits
    own_programs = o_rb * cdiv(batch * heads_kv, o_units) * o_splits
    programs = {"both": prefix_programs + own_programs, "prefix": prefix_programs, "own": own_programs}[part]
    grid = (programs,)
    block_d = block_d_for(head_dim)
    prefix_sources = (prefix_k, prefix_v)
    use_desc = part != "own" and config.prefix.tma and all(_tma_compatible(t) for t in prefix_sources)
    if use_desc:
        prefix_sources = tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, config.prefix.block_n,
                                                                                         block_d])
                               for t in prefix_sources)
    args = (
        q, k, v, *prefix_sources, kpm, prefix_index, prefix_lens, order,
        prefix_window_padding(q, window, window_includes_prefix and part != "own", left_padding), work_out, work_lse,
        *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
        *(kpm.stride() if kpm is not None else (0, 0)),
        heads_q, heads_kv, seq_q, seq_k, prefix_k.shape[2], batch * heads_q * seq_q, scale, float(softcap or 1.0),
        window_argument(window, seq_k, prefix_k.shape[2]),
        prefix_programs, num_prefixes * heads_kv, p_rows, p_rb, p_splits, p_chunk,
        batch * heads_kv, o_rows, o_rb, o_chunk, o_units,
    )
    kwargs = dict(
        GROUP=heads_q // heads_kv, HEAD_DIM=head_dim, BLOCK_D=block_d,
        P_BLOCK_M=config.prefix.block_m, P_BLOCK_N=config.prefix.block_n,
        O_BLOCK_M=config.own.block_m, O_BLOCK_N=config.own.block_n,
        CAUSAL=causal, HAS_KPM=kpm is not None, HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        HAS_PREFIX_INDEX=prefix_index is not None, HAS_PREFIX_LENS=prefix_lens is not None,
        HAS_ORDER=order is not None, DOT_PRECISION=dot_precision(q.dtype), USE_DESC=use_desc,
        INTERLEAVE=config.interleave, OWN_UNITS=o_units > 1, PREFIX_PART=part != "own", OWN_PART=part != "prefix",
        PREFIX_WINDOW=window is not None and window_includes_prefix and part != "own",
        # A launch of both parts: the prefix tiling is the bigger one, it sets warps and pipelining.
        num_warps=config.own.num_warps if part == "own" else max(config.prefix.num_warps, config.own.num_warps),
        num_stages=config.own.num_stages if part == "own" else config.prefix.num_stages,
    )
    return grid, args, kwargs


_SIDE_STREAMS = threading.local()  # per thread: another thread's decode must not land in this one's capture


def _side_stream(device: torch.device):
    """This thread's side stream of DecodeConfig.own_stream on `device` and the two events that fork it from the
    caller's stream and join it back, made once (new ones per call cost host time; making them inside a CUDA-graph
    capture is refused: a first call outside it makes them, as the kernels' compilation needs anyway, an eager call
    of a graphs_only config too). An event is recorded anew before every wait on it, so reusing it is safe. The
    caller's tensors need no record_stream: the caller's stream waits for this one before anything after the call
    can run, and this one allocates nothing."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    streams = getattr(_SIDE_STREAMS, "by_device", None)
    if streams is None:
        streams = _SIDE_STREAMS.by_device = {}
    if index not in streams:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("DecodeConfig(own_stream=True): the decode's side stream is made at its first call "
                               "on a device and thread, which must come before a CUDA-graph capture (run the step "
                               "once eagerly first, as the kernels' compilation needs anyway)")
        streams[index] = (torch.cuda.Stream(device=index), torch.cuda.Event(), torch.cuda.Event())
    return streams[index]


# The signatures (_launch_signature) of graphs_only launches that ran eagerly, by device: their kernels are loaded.
_LOADED_SIGNATURES: set = set()


def _launch_signature(args, kwargs) -> tuple:
    """What Triton compiles and loads a kernel variant for, read off a launch's arguments (where unsure, finer: a
    finer signature only costs an extra eager run of the two launches): each tensor's dtype and 16-byte alignment,
    each integer's classes (1, a multiple of 16, 32-bit), a descriptor's tensor and block, the constexprs and launch
    options; floats and None by kind. Not the values: a cache that grows by a key each step keeps its signature."""
    def of(a):
        if isinstance(a, torch.Tensor):
            return "tensor", a.dtype, a.data_ptr() % 16 == 0
        if isinstance(a, bool) or a is None:
            return a
        if isinstance(a, int):
            return "int", a == 1, a % 16 == 0, -2 ** 31 <= a < 2 ** 31
        if isinstance(a, float):
            return "float"
        if isinstance(a, TensorDescriptor):
            return ("descriptor", a.base.dtype, tuple(a.block_shape), tuple(s % 16 == 0 for s in a.strides),
                    getattr(a, "padding", None))
        return type(a).__name__, a
    return tuple(map(of, args)), tuple(sorted(kwargs.items()))


def _capturing(device: torch.device) -> bool:
    """Whether this call is being captured into a CUDA graph (never off the GPU)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def merge_partials_launch(work_out, work_lse, out, lse, slots, sinks=None):
    """sinks: None, or [Hq] contiguous in float16, bfloat16 or float32."""
    rows, head_dim = work_out.shape[1], work_out.shape[2]
    heads_q, seq_q = out.shape[1], out.shape[2]
    grid = (cdiv(rows, MERGE_BLOCK_M),)
    args = (work_out, work_lse, out, lse, work_lse if sinks is None else sinks, rows, heads_q, seq_q, *out.stride(),
            slots)
    kwargs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d_for(head_dim), BLOCK_M=MERGE_BLOCK_M,
                  HAS_SINKS=sinks is not None, num_warps=MERGE_NUM_WARPS)
    return grid, args, kwargs


@on_first_tensor_device
def prefix_attention_decode(q, k, v, prefix_k, prefix_v, *, causal, scale, key_padding_mask=None,
                            prefix_index=None, prefix_lens=None, window=None, softcap=None,
                            window_includes_prefix=False, left_padding=None, sinks=None, config=None, sms=None):
    """(out [B, Hq, S, D] in q's dtype, lse [B, Hq, S] float32) on validated inputs (prefix_k/v 4-D). sinks [Hq]:
    each head's attention sink, taken by the merge (one more partial of value zero)."""
    batch, heads_q, seq_q, head_dim = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((batch, heads_q, seq_q), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    plan = decode_plan(q, k, prefix_k, config=config, sms=sms)
    _, (_, _, p_splits, _), (_, _, o_splits, _, _) = plan
    slots = p_splits + o_splits
    rows = batch * heads_q * seq_q
    # Sized from shapes only: CUDA-graph safe. Each row is written once per slot.
    work_out = torch.empty((slots, rows, head_dim), device=q.device, dtype=torch.float32)
    work_lse = torch.empty((slots, rows), device=q.device, dtype=torch.float32)
    order = None
    if prefix_index is not None and prefix_k.shape[0] > 1 and p_splits:
        # Sequences sorted by prefix (on the device, fixed size): each row block then mostly holds one prefix.
        order = torch.argsort(prefix_index, stable=True)
    def launches_of(plan):  # (part, grid, args, kwargs) of each partials launch of this plan
        if plan[0].own_launch:  # each kind of program that has work, in a launch of its own
            parts = tuple(part for part, splits in (("prefix", p_splits), ("own", o_splits)) if splits)
        else:
            parts = ("both",) if slots else ()
        return [(part, *decode_launch(q, k, v, prefix_k, prefix_v, work_out, work_lse, causal=causal, scale=scale,
                                      key_padding_mask=key_padding_mask, prefix_index=prefix_index,
                                      prefix_lens=prefix_lens, window=window, softcap=softcap,
                                      window_includes_prefix=window_includes_prefix, left_padding=left_padding,
                                      order=order, plan=plan, part=part))
                for part in parts]

    config = plan[0]
    launches = launches_of(plan)
    # DecodeConfig.own_stream: the own launch on a side stream, forked after everything before this call and
    # joined before the merge, also when a launch raises (a capture must not end with the side stream still in
    # it); capturable in a CUDA graph. Off the GPU the launches simply run in turn. The stream is made at the first
    # call, also an eager one of a graphs_only config, so that a later capture finds it.
    side = _side_stream(q.device) if config.own_stream and q.is_cuda else None
    loading = None
    if config.graphs_only and not _capturing(q.device):
        # Eagerly (DecodeConfig.graphs_only) one launch, on the caller's stream. But until the two launches' kernel
        # variants ran here once (Triton compiles and loads one per signature, below), this call runs them: a
        # module load inside a capture is refused, and a capture follows an eager warm-up in a serving loop.
        side, signature = None, (q.device, tuple(_launch_signature(args, kwargs) for *_, args, kwargs in launches))
        if signature in _LOADED_SIGNATURES:
            launches = launches_of((config.one_launch(), *plan[1:]))
        else:
            loading = signature
    side = side if len(launches) == 2 else None
    if side is not None:
        side_stream, fork, join = side
        fork.record(torch.cuda.current_stream(q.device))
        side_stream.wait_event(fork)
    try:
        for part, grid, args, kwargs in launches:
            with torch.cuda.stream(side_stream) if side is not None and part == "own" else contextlib.nullcontext():
                launch(_decode_partials, grid, args, kwargs)
    finally:
        if side is not None:
            join.record(side_stream)
            torch.cuda.current_stream(q.device).wait_event(join)
    if loading is not None:  # (only once they ran: a launch that raised loaded nothing)
        if len(_LOADED_SIGNATURES) > 4096:  # (bounded: start over rather than grow)
            _LOADED_SIGNATURES.clear()
        _LOADED_SIGNATURES.add(loading)
    grid, args, kwargs = merge_partials_launch(work_out, work_lse, out, lse, slots, attention_sinks_argument(sinks))
    launch(_merge_partials, grid, args, kwargs)
    return out, lse


def merge_two_launch(out_a, lse_a, out_b, lse_b, out, lse):
    """(grid, args, kwargs) of _merge_two on [R, D] / [R] views."""
    rows, head_dim = out_a.shape
    grid = (cdiv(rows, MERGE_BLOCK_M),)
    args = (out_a, lse_a, out_b, lse_b, out, lse, rows, *out_a.stride(), *out_b.stride(), *out.stride())
    kwargs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d_for(head_dim), BLOCK_M=MERGE_BLOCK_M,
                  num_warps=MERGE_NUM_WARPS)
    return grid, args, kwargs


@on_first_tensor_device
def merge_attention_states_triton(out_a, lse_a, out_b, lse_b):
    """Triton merge of two partial attentions [..., D] / [...] (shapes already checked)."""
    head_dim = out_a.shape[-1]
    a, b = out_a.reshape(-1, head_dim), out_b.reshape(-1, head_dim)
    la, lb = lse_a.reshape(-1).contiguous(), lse_b.reshape(-1).contiguous()  # (read densely: lse[..., -1] is not)
    out = torch.empty(a.shape, device=out_a.device, dtype=out_a.dtype)
    lse = torch.empty(la.shape, device=out_a.device, dtype=torch.float32)
    if out.numel():
        grid, args, kwargs = merge_two_launch(a, la, b, lb, out, lse)
        launch(_merge_two, grid, args, kwargs)
    return out.view(out_a.shape), lse.view(lse_a.shape)


# ---------------------------------------------------------------------------------------------------------------
# As a custom op: opaque to torch.compile (with a fake impl), like the prefill forward.

@torch.library.custom_op("prefix_kernels::prefix_attention_decode", mutates_args=())
def prefix_attention_decode_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], prefix_index: Optional[torch.Tensor], prefix_lens: Optional[torch.Tensor],
    causal: bool, scale: float, window: Optional[int], softcap: Optional[float], window_includes_prefix: bool,
    left_padding: Optional[torch.Tensor], sinks: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    return prefix_attention_decode(q, k, v, prefix_k, prefix_v, causal=causal, scale=scale,
                                   key_padding_mask=key_padding_mask, prefix_index=prefix_index,
                                   prefix_lens=prefix_lens, window=window, softcap=softcap,
                                   window_includes_prefix=window_includes_prefix, left_padding=left_padding,
                                   sinks=sinks)


@prefix_attention_decode_op.register_fake
def _decode_fake(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, prefix_lens, causal, scale, window,
                 softcap, window_includes_prefix, left_padding, sinks):
    batch, heads_q, seq_q, _ = q.shape
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((batch, heads_q, seq_q), dtype=torch.float32, device=q.device))


def triton_decode_attention(call, sinks=None):
    """(out, lse) of a validated call (validation.PrefixAttentionCall) through the decode strategy; with sinks
    ([Hq], the call's, when they need no gradient: the kernels have no backward) the merge takes them.

    The custom op is what torch.compile, FakeTensor and other dispatch modes must see; in plain eager mode its
    dispatch only adds host time (~20 us of a ~0.1 ms step; the decode has no autograd), so it is called
    directly there."""
    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode() or type(call.q) is not torch.Tensor:
        return torch.ops.prefix_kernels.prefix_attention_decode(
            call.q, call.k, call.v, call.prefix_k, call.prefix_v, call.key_padding_mask, call.prefix_index,
            call.prefix_lens, call.causal, call.scale, call.window, call.softcap, call.window_includes_prefix,
            call.left_padding, sinks)
    return prefix_attention_decode(call.q, call.k, call.v, call.prefix_k, call.prefix_v, sinks=sinks,
                                   **call.options())

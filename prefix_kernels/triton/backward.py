"""Backward of the fused prefix attention: FlashAttention-2 style, P recomputed from the forward's saved LSE.

Four kernels, each launched only when a gradient it produces is needed:
  preprocess  Delta = rowsum(dO * O) - dlse. The LSE gradient folds in here: with p = exp(s - lse),
              d lse / d s = p, so ds = p * (dp - Delta) covers both the output's and the LSE's gradient.
  dq          query-major, the forward's exact tile walk (prefix tiles, then own tiles with causal/window skipping).
  dkdv        key-major over each sequence's own keys: per (b, kv head, key block), the G query heads of the group
              and the query blocks that can see those keys.
  dprefix     key-major over one prefix's keys: per (prefix n, kv head, prefix key block), every sequence b with
              prefix_index[b] == n, its G query heads and all its query blocks. The sum over the batch happens in
              registers: no atomics, no [B, ...] buffer. When the programs fill the GPU's waves badly, the query
              tiles are split into a number of chunks fixed by the shapes and the SM count (at most
              configs.MAX_PREFIX_CHUNKS; configs.chunks_for_waves) whose fp32 partials are summed in a fixed order.
  fused dq    (BackwardConfig.fuse_dq, off by default) dkdv and dprefix also add ds @ k to an fp32 dq with
              atomics and the dq kernel does not run: two matmuls per (query, key) tile pair fewer (the dq kernel
              recomputes p and dp), dq no longer bit-reproducible run to run.
Rows that saw nothing (lse = -inf) contribute nothing: their lse is read as +inf, so p = exp2(s - inf) = 0.
Keys that are invisible to every query of a program (padding, prefix keys past prefix_lens) get exact zeros.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import PREPROCESS_BLOCK_M, backward_config, block_d_for, cdiv, prefix_grad_chunks
from .device import batch_chunks, chunk_ranges, launch, on_first_tensor_device
from .forward import (_load_rows, _own_visible, _prefix_query_pos, _prefix_tiles, _prefix_visible, _query_block,
                      _softcap_log2, dot_precision, prefix_window_padding, window_argument)

LOG2E = 1.4426950408889634


@triton.jit
def _lse_log2(lse):
    """Natural-log LSE -> log2 units, with -inf (a row that saw nothing) read as +inf so that p = 0 there."""
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _bwd_preprocess(
    Out, DO, Lse, DLse, Delta,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_lb, stride_lh, stride_ls,
    HQ, S,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    hq = (pid_bh % HQ).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < S
    d_ok = offs_d < HEAD_DIM
    o = _load_rows(Out + b * stride_ob + hq * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
                   row_ok, d_ok, True, HEAD_DIM != BLOCK_D)
    do = _load_rows(DO + b * stride_dob + hq * stride_doh + offs_m[:, None] * stride_dos
                    + offs_d[None, :] * stride_dod, row_ok, d_ok, True, HEAD_DIM != BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + b * stride_lb + hq * stride_lh + offs_m * stride_ls, mask=row_ok, other=0.0)
    lse = tl.load(Lse + pid_bh.to(tl.int64) * S + offs_m, mask=row_ok, other=0.0)
    # A row that saw nothing has p = 0 everywhere: keep a NaN/inf dlse there from reaching 0 * NaN.
    delta = tl.where(lse == float("-inf"), 0.0, delta)
    tl.store(Delta + pid_bh.to(tl.int64) * S + offs_m, delta, mask=row_ok)


@triton.jit
def _dq_tile(
    dq, q, do, lse2, delta,
    k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    start_n, n_limit, visible, sm_scale, softcap,
    offs_n, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    APPLY_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dq += ds @ k over keys [start_n, start_n + BLOCK_N) (the forward's _attend_tile, differentiated)."""
    cols = start_n + offs_n
    col_ok = cols < n_limit
    d_ok = offs_d < HEAD_DIM
    k = _load_rows(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, col_ok, d_ok,
                   APPLY_MASK, HEAD_DIM != BLOCK_D)
    v = _load_rows(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, col_ok, d_ok,
                   APPLY_MASK, HEAD_DIM != BLOCK_D)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s = _softcap_log2(qk, sm_scale, softcap, HAS_SOFTCAP, DOT_PRECISION)
    if APPLY_MASK:
        p = tl.math.exp2(tl.where(visible, s, float("-inf")) - lse2[:, None])
    else:
        p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        t = s * (1.0 / (softcap * 1.4426950408889634))  # tanh of the scaled score
        ds = ds * (1.0 - t * t)
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)


@triton.jit
def _prefix_attention_bwd_dq(
    Q, K, V, PK, PV, DO, Lse, Delta, DQ, KPM, PrefixIndex, PrefixLens, LeftPad,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pkn, stride_pkh, stride_pks, stride_pkd,
    stride_pvn, stride_pvh, stride_pvs, stride_pvd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    stride_mb, stride_ml,
    HQ, S, L, P, sm_scale, softcap, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_PREFIX_INDEX: tl.constexpr, HAS_PREFIX_LENS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HEAVY_FIRST: tl.constexpr = False, PREFIX_WINDOW: tl.constexpr = False,
):
    pid_m = _query_block(HEAVY_FIRST)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    hq = (pid_bh % HQ).to(tl.int64)
    hkv = hq // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < S
    d_ok = offs_d < HEAD_DIM
    q = _load_rows(Q + b * stride_qb + hq * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                   row_ok, d_ok, True, HEAD_DIM != BLOCK_D)
    do = _load_rows(DO + b * stride_dob + hq * stride_doh + offs_m[:, None] * stride_dos
                    + offs_d[None, :] * stride_dod, row_ok, d_ok, True, HEAD_DIM != BLOCK_D)
    # Rows past S read lse = +inf: p = 0 there, and their q/dO are zeros.
    lse2 = _lse_log2(tl.load(Lse + pid_bh.to(tl.int64) * S + offs_m, mask=row_ok, other=float("-inf")))
    delta = tl.load(Delta + pid_bh.to(tl.int64) * S + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    first_pos = L - S + pid_m * BLOCK_M

    # ---- the prefix this sequence uses: every key below its length is visible (in the window) ----
    if HAS_PREFIX_INDEX:
        prefix_id = tl.load(PrefixIndex + b).to(tl.int64)
    else:
        prefix_id = 0
    if HAS_PREFIX_LENS:
        prefix_len = tl.load(PrefixLens + prefix_id).to(tl.int32)
    else:
        prefix_len = P
    pk_base = PK + prefix_id * stride_pkn + hkv * stride_pkh
    pv_base = PV + prefix_id * stride_pvn + hkv * stride_pvh
    prefix_pos = _prefix_query_pos(first_pos, LeftPad, b, PREFIX_WINDOW)
    prefix_lo, prefix_full_end = _prefix_tiles(prefix_pos, prefix_len, window, BLOCK_N, PREFIX_WINDOW)
    for start_n in range(prefix_lo, prefix_full_end, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, pk_base, pv_base, stride_pks, stride_pkd, stride_pvs, stride_pvd,
                      start_n, prefix_len, 0, sm_scale, softcap, offs_n, offs_d,
                      HEAD_DIM, BLOCK_D, False, HAS_SOFTCAP, DOT_PRECISION)
    for start_n in range(prefix_full_end, prefix_len, BLOCK_N):
        visible = _prefix_visible(start_n + offs_n, prefix_len, prefix_pos + tl.arange(0, BLOCK_M), window,
                                  BLOCK_M, BLOCK_N, PREFIX_WINDOW)
        dq = _dq_tile(dq, q, do, lse2, delta, pk_base, pv_base, stride_pks, stride_pkd, stride_pvs, stride_pvd,
                      start_n, prefix_len, visible, sm_scale, softcap, offs_n, offs_d,
                      HEAD_DIM, BLOCK_D, True, HAS_SOFTCAP, DOT_PRECISION)

    # ---- own keys: the forward's walk (query i at position L - S + i) ----
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    if CAUSAL:
        hi = tl.minimum(L, first_pos + BLOCK_M)
        full_end = (tl.maximum(tl.minimum(L, first_pos + 1), 0) // BLOCK_N) * BLOCK_N
    else:
        hi = L
        full_end = (L // BLOCK_N) * BLOCK_N
    if HAS_WINDOW:
        lo = (tl.maximum(first_pos - window + 1, 0) // BLOCK_N) * BLOCK_N
    else:
        lo = 0
    full_end = tl.maximum(full_end, lo)
    q_pos = L - S + offs_m
    for start_n in range(lo, full_end, BLOCK_N):
        visible = _own_visible(start_n + offs_n, L, q_pos, b, KPM, stride_mb, stride_ml, window,
                               BLOCK_M, BLOCK_N, CAUSAL, HAS_KPM, HAS_WINDOW, True)
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                      start_n, L, visible, sm_scale, softcap, offs_n, offs_d,
                      HEAD_DIM, BLOCK_D, HAS_KPM or HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION)
    for start_n in range(full_end, hi, BLOCK_N):
        visible = _own_visible(start_n + offs_n, L, q_pos, b, KPM, stride_mb, stride_ml, window,
                               BLOCK_M, BLOCK_N, CAUSAL, HAS_KPM, HAS_WINDOW)
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                      start_n, L, visible, sm_scale, softcap, offs_n, offs_d,
                      HEAD_DIM, BLOCK_D, True, HAS_SOFTCAP, DOT_PRECISION)

    dq = dq * sm_scale
    dq_ptrs = DQ + b * stride_dqb + hq * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :] * stride_dqd
    if HEAD_DIM != BLOCK_D:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_tile(
    dk, dv, k, v,
    q_base, do_base, lse_base, delta_base, stride_qs, stride_qd, stride_dos, stride_dod,
    start_m, S, cols, q_shift, window, sm_scale, softcap,
    offs_m, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, WINDOW_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    dq_base, stride_dqs, stride_dqd, key_keep, FUSE_DQ: tl.constexpr,
):
    """dv += p^T dO, dk += ds^T q for the keys `cols` over queries [start_m, start_m + BLOCK_M) of one head.

    Works transposed ([BLOCK_N, BLOCK_M]) so both accumulations are plain dots. Rows past S read lse = +inf and
    zeros, so they add nothing; keys past the tile's limit are never stored, so they need no mask.
    FUSE_DQ: also add ds @ k (unscaled) to the fp32 dq rows at dq_base with atomics (FlashAttention-2's dq), so no
    separate dq kernel recomputes p and dp. Keys whose p the tile does not mask but no query sees (key_keep False:
    padding, prefix keys past prefix_lens, and keys past the tile's limit) are dropped from ds first. Those last
    were loaded as zeros, but their p = exp2(-lse) can overflow ds to inf (fp16, a very negative lse), and
    inf * 0 would put NaN into the whole dq row.
    """
    rows = start_m + offs_m
    row_ok = rows < S
    d_ok = offs_d < HEAD_DIM
    q = _load_rows(q_base + rows[:, None] * stride_qs + offs_d[None, :] * stride_qd, row_ok, d_ok,
                   True, HEAD_DIM != BLOCK_D)
    do = _load_rows(do_base + rows[:, None] * stride_dos + offs_d[None, :] * stride_dod, row_ok, d_ok,
                    True, HEAD_DIM != BLOCK_D)
    lse2 = _lse_log2(tl.load(lse_base + rows, mask=row_ok, other=float("-inf")))
    delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
    s_t = _softcap_log2(qk_t, sm_scale, softcap, HAS_SOFTCAP, DOT_PRECISION)
    if CAUSAL_MASK or WINDOW_MASK:
        q_pos = q_shift + rows
        if CAUSAL_MASK:
            visible = cols[:, None] <= q_pos[None, :]
            if WINDOW_MASK:
                visible = visible & ((q_pos[None, :] - cols[:, None]) < window)
        else:
            visible = (q_pos[None, :] - cols[:, None]) < window
        p_t = tl.math.exp2(tl.where(visible, s_t, float("-inf")) - lse2[None, :])
    else:
        p_t = tl.math.exp2(s_t - lse2[None, :])
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    if HAS_SOFTCAP:
        t = s_t * (1.0 / (softcap * 1.4426950408889634))
        ds_t = ds_t * (1.0 - t * t)
    if FUSE_DQ:
        ds_t = tl.where(key_keep[:, None], ds_t, 0.0)
        dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PRECISION)
        tl.atomic_add(dq_base + rows[:, None] * stride_dqs + offs_d[None, :] * stride_dqd, dq,
                      mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _prefix_attention_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, DK, DV, KPM, DQ,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    stride_mb, stride_ml,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    HQ, S, L, sm_scale, softcap, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FUSE_DQ: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    heads_kv = HQ // GROUP
    b = (pid_bh // heads_kv).to(tl.int64)
    hkv = (pid_bh % heads_kv).to(tl.int64)

    start_n = pid_n * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    cols = start_n + offs_n
    col_ok = cols < L
    d_ok = offs_d < HEAD_DIM
    k = _load_rows(K + b * stride_kb + hkv * stride_kh + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                   col_ok, d_ok, True, HEAD_DIM != BLOCK_D)
    v = _load_rows(V + b * stride_vb + hkv * stride_vh + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                   col_ok, d_ok, True, HEAD_DIM != BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Which query blocks see these keys: query i sits at position q_shift + i.
    q_shift = L - S
    if HAS_WINDOW:
        # Queries at or past (last key + window) see none of them.
        m_hi = tl.minimum(S, tl.maximum(start_n + BLOCK_N - 1 + window - q_shift, 0))
    else:
        m_hi = S
    if CAUSAL:
        # Queries before the first key see none of them; from m_full on, every query sees every key of the block
        # (causally), so only [m_lo, m_full) needs the causal mask.
        m_lo = (tl.maximum(start_n - q_shift, 0) // BLOCK_M) * BLOCK_M
        m_full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - q_shift, 0), BLOCK_M) * BLOCK_M
        m_full = tl.minimum(m_full, m_hi)
    else:
        m_lo = 0
        m_full = 0

    if HAS_KPM:
        key_ok = tl.load(KPM + b * stride_mb + cols * stride_ml, mask=col_ok, other=0) != 0
    else:
        key_ok = col_ok
    for g in range(GROUP):
        hq = hkv * GROUP + g
        bh = b * HQ + hq
        q_base = Q + b * stride_qb + hq * stride_qh
        do_base = DO + b * stride_dob + hq * stride_doh
        dq_base = DQ  # None unless FUSE_DQ
        if FUSE_DQ:
            dq_base = DQ + b * stride_dqb + hq * stride_dqh
        for start_m in range(m_lo, m_full, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, Lse + bh * S, Delta + bh * S,
                                stride_qs, stride_qd, stride_dos, stride_dod,
                                start_m, S, cols, q_shift, window, sm_scale, softcap, offs_m, offs_d,
                                HEAD_DIM, BLOCK_D, True, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION,
                                dq_base, stride_dqs, stride_dqd, key_ok, FUSE_DQ)
        for start_m in range(m_full, m_hi, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, Lse + bh * S, Delta + bh * S,
                                stride_qs, stride_qd, stride_dos, stride_dod,
                                start_m, S, cols, q_shift, window, sm_scale, softcap, offs_m, offs_d,
                                HEAD_DIM, BLOCK_D, False, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION,
                                dq_base, stride_dqs, stride_dqd, key_ok, FUSE_DQ)

    if HAS_KPM:
        # A padded key is invisible to every query: its gradient is zero. Its column of p was never masked (the
        # columns are independent given lse), so it is dropped here, once, instead of masked in every tile.
        dk = tl.where(key_ok[:, None], dk, 0.0)
        dv = tl.where(key_ok[:, None], dv, 0.0)
    dk = dk * sm_scale
    if HEAD_DIM != BLOCK_D:
        mask = col_ok[:, None] & d_ok[None, :]
    else:
        mask = col_ok[:, None]
    tl.store(DK + b * stride_dkb + hkv * stride_dkh + cols[:, None] * stride_dks + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + b * stride_dvb + hkv * stride_dvh + cols[:, None] * stride_dvs + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _prefix_attention_bwd_dprefix(
    Q, PK, PV, DO, Lse, Delta, DPK, DPV, PrefixIndex, PrefixLens, LeftPad, DQ,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_pkn, stride_pkh, stride_pks, stride_pkd,
    stride_pvn, stride_pvh, stride_pvs, stride_pvd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_gc, stride_gn, stride_gh, stride_gs, stride_gd,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    B, HQ, S, P, sm_scale, softcap, q_shift, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_PREFIX_INDEX: tl.constexpr, HAS_PREFIX_LENS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FUSE_DQ: tl.constexpr = False, PREFIX_WINDOW: tl.constexpr = False,
):
    """d prefix_k/v for keys [start_n, start_n + BLOCK_N) of prefix n, KV head hkv: the sum over every query tile
    (b, query block, g) of chunk `chunk` whose sequence uses prefix n. DPK/DPV have the layout [chunks, N, Hkv, P, D]
    (a chunk stride of 0 when there is a single chunk writing the gradient itself). PREFIX_WINDOW: query i sits at
    position q_shift + i, less its row's left padding (LeftPad[b]), and prefix key p at p - prefix_len; the window
    masks the scores, and query blocks past every key's window are skipped."""
    pid_n = tl.program_id(0)
    pid_nh = tl.program_id(1)
    chunk = tl.program_id(2)
    heads_kv = HQ // GROUP
    n = (pid_nh // heads_kv).to(tl.int64)
    hkv = (pid_nh % heads_kv).to(tl.int64)

    start_n = pid_n * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    cols = start_n + offs_n
    col_ok = cols < P
    d_ok = offs_d < HEAD_DIM
    k = _load_rows(PK + n * stride_pkn + hkv * stride_pkh + cols[:, None] * stride_pks + offs_d[None, :] * stride_pkd,
                   col_ok, d_ok, True, HEAD_DIM != BLOCK_D)
    v = _load_rows(PV + n * stride_pvn + hkv * stride_pvh + cols[:, None] * stride_pvs + offs_d[None, :] * stride_pvd,
                   col_ok, d_ok, True, HEAD_DIM != BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if HAS_PREFIX_LENS:
        prefix_len = tl.load(PrefixLens + n).to(tl.int32)
    else:
        prefix_len = P
    key_ok = cols < prefix_len
    if PREFIX_WINDOW:
        # Key p sits at position p - prefix_len; the tile's last key, the one the window keeps longest.
        key_pos = cols - prefix_len
        last_key_pos = tl.minimum(start_n + BLOCK_N, prefix_len) - 1 - prefix_len
    else:
        key_pos = cols

    # The flattened query tiles (b, query block, g), B * m_tiles * GROUP of them; this chunk sums every chunks-th,
    # from tile `chunk` on. Strided, not contiguous ranges: the tiles a window or prefix_index leaves out (a
    # sequence's later blocks, the sequences of other prefixes) would otherwise empty some chunks and not others.
    # Block-major within a sequence, so the blocks a window leaves visible are one leading range per sequence.
    m_tiles = tl.cdiv(S, BLOCK_M)
    seq_tiles = GROUP * m_tiles
    chunks = tl.num_programs(2)
    # Keys past this prefix's length: nothing to sum, an empty range in every sequence.
    all_tiles = tl.where(start_n < prefix_len, seq_tiles, 0)
    for b in range(0, B):
        hi = all_tiles
        if HAS_PREFIX_INDEX:
            # Sequences using another prefix are skipped by an empty range: no host sync, no branch on B.
            hi = tl.where(tl.load(PrefixIndex + b) == n, hi, 0)
        b64 = tl.cast(b, tl.int64)
        row_shift = q_shift
        if PREFIX_WINDOW:
            row_shift = q_shift - tl.load(LeftPad + b64).to(tl.int32)
            # Row i sees key position j only if row_shift + i - j < window: the rows past the last key's window
            # see none of this tile. A clipped range, not a branch in the loop (one there had doubled the masked
            # variant's spills).
            visible_rows = tl.minimum(tl.maximum(window + last_key_pos - row_shift, 0), S)
            hi = tl.minimum(hi, tl.cdiv(visible_rows, BLOCK_M) * GROUP)
        # This sequence's first tile in the chunk: the t >= 0 with b * seq_tiles + t = chunk (mod chunks), taken
        # from the residues (b * seq_tiles can pass int32).
        first = (chunk + chunks - ((b % chunks) * (seq_tiles % chunks)) % chunks) % chunks
        for t in range(first, hi, chunks):
            m_block = t // GROUP
            g = t - m_block * GROUP
            start_m = m_block * BLOCK_M
            hq = hkv * GROUP + g
            bh = b64 * HQ + hq
            dq_base = DQ  # None unless FUSE_DQ
            if FUSE_DQ:
                dq_base = DQ + b64 * stride_dqb + hq * stride_dqh
            dk, dv = _dkdv_tile(dk, dv, k, v, Q + b64 * stride_qb + hq * stride_qh,
                                DO + b64 * stride_dob + hq * stride_doh, Lse + bh * S, Delta + bh * S,
                                stride_qs, stride_qd, stride_dos, stride_dod,
                                start_m, S, key_pos, row_shift, window, sm_scale, softcap, offs_m, offs_d,
                                HEAD_DIM, BLOCK_D, False, PREFIX_WINDOW, HAS_SOFTCAP, DOT_PRECISION,
                                dq_base, stride_dqs, stride_dqd, key_ok, FUSE_DQ)

    # Keys past prefix_lens[n] are visible to no query of this prefix: zero gradient (their p was never masked).
    dk = tl.where(key_ok[:, None], dk * sm_scale, 0.0)
    dv = tl.where(key_ok[:, None], dv, 0.0)
    if HEAD_DIM != BLOCK_D:
        mask = col_ok[:, None] & d_ok[None, :]
    else:
        mask = col_ok[:, None]
    offset = chunk.to(tl.int64) * stride_gc + n * stride_gn + hkv * stride_gh
    tl.store(DPK + offset + cols[:, None] * stride_gs + offs_d[None, :] * stride_gd, dk.to(DPK.dtype.element_ty),
             mask=mask)
    tl.store(DPV + offset + cols[:, None] * stride_gs + offs_d[None, :] * stride_gd, dv.to(DPV.dtype.element_ty),
             mask=mask)


# ------------------------------------------------------------------------------------------------------------
# Launch descriptions: (grid, args, kwargs) per kernel, shared by the launcher and the compile check.


def _strides_or_zero(t, n):
    return t.stride() if t is not None else (0,) * n


def preprocess_launch(out, grad_out, lse, grad_lse, delta):
    batch, heads_q, seq_q, head_dim = out.shape
    grid = (cdiv(seq_q, PREPROCESS_BLOCK_M), batch * heads_q)
    args = (out, grad_out, lse, grad_lse, delta, *out.stride(), *grad_out.stride(), *_strides_or_zero(grad_lse, 3),
            heads_q, seq_q)
    kwargs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d_for(head_dim), BLOCK_M=PREPROCESS_BLOCK_M,
                  HAS_DLSE=grad_lse is not None, num_warps=4, num_stages=1)
    return grid, args, kwargs


def dq_launch(q, k, v, prefix_k, prefix_v, grad_out, lse, delta, dq, *, causal, scale, key_padding_mask,
              prefix_index, prefix_lens, window, softcap, window_includes_prefix=False, left_padding=None,
              config=None):
    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    config = (config or backward_config(head_dim, q.dtype, seq_q)).dq
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    grid = (cdiv(seq_q, config.block_m), batch * heads_q)
    args = (
        q, k, v, prefix_k, prefix_v, grad_out, lse, delta, dq, kpm, prefix_index, prefix_lens,
        prefix_window_padding(q, window, window_includes_prefix, left_padding),
        *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(), *grad_out.stride(),
        *dq.stride(), *_strides_or_zero(kpm, 2),
        heads_q, seq_q, seq_k, prefix_k.shape[2], scale, float(softcap or 1.0),
        window_argument(window, seq_k, prefix_k.shape[2]),
    )
    kwargs = dict(
        GROUP=heads_q // heads_kv, HEAD_DIM=head_dim, BLOCK_D=block_d_for(head_dim),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        CAUSAL=causal, HAS_KPM=kpm is not None, HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        HAS_PREFIX_INDEX=prefix_index is not None, HAS_PREFIX_LENS=prefix_lens is not None,
        DOT_PRECISION=dot_precision(q.dtype), HEAVY_FIRST=config.heavy_first,
        PREFIX_WINDOW=window is not None and window_includes_prefix, num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return grid, args, kwargs


def dkdv_launch(q, k, v, grad_out, lse, delta, dk, dv, *, causal, scale, key_padding_mask, window, softcap,
                config=None, dq_acc=None):
    """dq_acc: the fp32 [B, Hq, S, D] buffer the kernel adds its unscaled dq terms to (BackwardConfig.fuse_dq)."""
    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    config = (config or backward_config(head_dim, q.dtype, seq_q)).dkdv
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    grid = (cdiv(seq_k, config.block_n), batch * heads_kv)
    args = (
        q, k, v, grad_out, lse, delta, dk, dv, kpm, dq_acc,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        *_strides_or_zero(kpm, 2), *_strides_or_zero(dq_acc, 4),
        heads_q, seq_q, seq_k, scale, float(softcap or 1.0), window_argument(window, seq_k, 0),
    )
    kwargs = dict(
        GROUP=heads_q // heads_kv, HEAD_DIM=head_dim, BLOCK_D=block_d_for(head_dim),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        CAUSAL=causal, HAS_KPM=kpm is not None, HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        DOT_PRECISION=dot_precision(q.dtype), FUSE_DQ=dq_acc is not None, num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return grid, args, kwargs


def dprefix_chunks(q, prefix_k, config=None) -> int:
    """How many query chunks the d prefix kernel uses for these shapes (see configs.prefix_grad_chunks)."""
    batch, heads_q, seq_q, head_dim = q.shape
    num_prefixes, heads_kv, prefix_len, _ = prefix_k.shape
    config = (config or backward_config(head_dim, q.dtype, seq_q)).dprefix
    programs = num_prefixes * heads_kv * cdiv(prefix_len, config.block_n)
    query_tiles = batch * (heads_q // heads_kv) * cdiv(seq_q, config.block_m)
    return prefix_grad_chunks(programs, query_tiles, q.device)


def dprefix_launch(q, prefix_k, prefix_v, grad_out, lse, delta, dpk, dpv, chunks, *, scale, prefix_index,
                   prefix_lens, softcap, seq_k=None, window=None, window_includes_prefix=False, left_padding=None,
                   config=None, dq_acc=None):
    """dpk/dpv: [chunks, N, Hkv, P, D] (fp32 partials), or [N, Hkv, P, D] when chunks == 1. dq_acc: as in
    dkdv_launch. seq_k (L), window and left_padding matter only with window_includes_prefix."""
    batch, heads_q, seq_q, head_dim = q.shape
    num_prefixes, heads_kv, prefix_len, _ = prefix_k.shape
    config = (config or backward_config(head_dim, q.dtype, seq_q)).dprefix
    group = heads_q // heads_kv
    grad_strides = dpk.stride() if dpk.dim() == 5 else (0, *dpk.stride())
    assert dpk.stride() == dpv.stride()
    grid = (cdiv(prefix_len, config.block_n), num_prefixes * heads_kv, chunks)
    args = (
        q, prefix_k, prefix_v, grad_out, lse, delta, dpk, dpv, prefix_index, prefix_lens,
        prefix_window_padding(q, window, window_includes_prefix, left_padding), dq_acc,
        *q.stride(), *prefix_k.stride(), *prefix_v.stride(), *grad_out.stride(), *grad_strides,
        *_strides_or_zero(dq_acc, 4),
        batch, heads_q, seq_q, prefix_len, scale, float(softcap or 1.0),
        (seq_k if seq_k is not None else seq_q) - seq_q,
        window_argument(window, seq_k if seq_k is not None else seq_q, prefix_len),
    )
    kwargs = dict(
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d_for(head_dim),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        HAS_SOFTCAP=softcap is not None, HAS_PREFIX_INDEX=prefix_index is not None,
        HAS_PREFIX_LENS=prefix_lens is not None,
        DOT_PRECISION=dot_precision(q.dtype), FUSE_DQ=dq_acc is not None,
        PREFIX_WINDOW=window is not None and window_includes_prefix, num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return grid, args, kwargs


@on_first_tensor_device
def prefix_attention_backward(
    q, k, v, prefix_k, prefix_v, out, lse, grad_out, grad_lse, *, needs=(True,) * 5, causal, scale,
    key_padding_mask=None, prefix_index=None, prefix_lens=None, window=None, softcap=None,
    window_includes_prefix=False, left_padding=None, prefix_chunks=None, config=None,
):
    """Gradients of the fused forward on already-validated inputs; prefix_k/v are 4-D [N, Hkv, P, D].

    needs: which of (dq, dk, dv, dprefix_k, dprefix_v) to compute; the others come back as None and no kernel
    runs for them (dk and dv come from one kernel, as do dprefix_k and dprefix_v). grad_lse may be None.
    prefix_chunks overrides the d prefix split (tests); config overrides the launch configuration (tuning
    scripts; the package always uses configs.backward_config). Returns (dq, dk, dv, dprefix_k, dprefix_v), each
    contiguous in its input's shape, in the inputs' dtype.
    """
    need_dq, need_dk, need_dv, need_dpk, need_dpv = needs
    batch, heads_q, seq_q, _ = q.shape
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype) if need_dq else None
    dk = torch.empty(k.shape, device=q.device, dtype=k.dtype) if need_dk or need_dv else None
    dv = torch.empty(v.shape, device=q.device, dtype=v.dtype) if need_dk or need_dv else None
    dpk = dpv = None
    if need_dpk or need_dpv:
        dpk = torch.empty(prefix_k.shape, device=q.device, dtype=prefix_k.dtype)
        dpv = torch.empty(prefix_v.shape, device=q.device, dtype=prefix_v.dtype)
    if not any(needs):
        return None, None, None, None, None
    if q.numel() == 0:  # no queries: nothing attends, every gradient is zero
        for t in (dq, dk, dv, dpk, dpv):
            if t is not None:
                t.zero_()
        return _select(needs, dq, dk, dv, dpk, dpv)

    lse = lse.contiguous()
    delta = torch.empty((batch, heads_q, seq_q), device=q.device, dtype=torch.float32)
    for chunk in batch_chunks(heads_q, out, grad_out, lse, grad_lse, delta):
        launch(_bwd_preprocess, *preprocess_launch(*chunk))

    # dq accumulated by the key-major kernels (BackwardConfig.fuse_dq): only when both run anyway.
    fuse_dq = (dq is not None and dk is not None and dpk is not None
               and (config or backward_config(q.shape[-1], q.dtype, seq_q)).fuse_dq)
    dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if fuse_dq else None
    heads_kv = k.shape[1]
    if dq is not None and not fuse_dq:
        for q_, k_, v_, grad_out_, lse_, delta_, dq_, mask, index, padding in batch_chunks(
                heads_q, q, k, v, grad_out, lse, delta, dq, key_padding_mask, prefix_index, left_padding):
            grid, args, kwargs = dq_launch(q_, k_, v_, prefix_k, prefix_v, grad_out_, lse_, delta_, dq_,
                                           causal=causal, scale=scale, key_padding_mask=mask, prefix_index=index,
                                           prefix_lens=prefix_lens, window=window, softcap=softcap,
                                           window_includes_prefix=window_includes_prefix, left_padding=padding,
                                           config=config)
            launch(_prefix_attention_bwd_dq, grid, args, kwargs)
    if dk is not None and dk.numel():
        for q_, k_, v_, grad_out_, lse_, delta_, dk_, dv_, mask, dq_acc_ in batch_chunks(
                heads_kv, q, k, v, grad_out, lse, delta, dk, dv, key_padding_mask, dq_acc):
            grid, args, kwargs = dkdv_launch(q_, k_, v_, grad_out_, lse_, delta_, dk_, dv_, causal=causal,
                                             scale=scale, key_padding_mask=mask, window=window, softcap=softcap,
                                             config=config, dq_acc=dq_acc_)
            launch(_prefix_attention_bwd_dkdv, grid, args, kwargs)
    if dpk is not None and dpk.numel():
        chunks = prefix_chunks or dprefix_chunks(q, prefix_k, config)
        if chunks > 1:
            part_k = torch.empty((chunks, *prefix_k.shape), device=q.device, dtype=torch.float32)
            part_v = torch.empty((chunks, *prefix_v.shape), device=q.device, dtype=torch.float32)
        else:
            part_k, part_v = dpk, dpv
        num_prefixes = prefix_k.shape[0]
        for first, stop in chunk_ranges(num_prefixes, prefix_k.shape[1]):
            # Past the grid's limit (N * Hkv programs on axis 1), a launch per chunk of prefixes, which sees its
            # prefixes numbered from 0: sequences of the others match none of them.
            if (first, stop) == (0, num_prefixes):
                pk_, pv_, gk_, gv_, index, lens = prefix_k, prefix_v, part_k, part_v, prefix_index, prefix_lens
            else:
                pk_, pv_ = prefix_k[first:stop], prefix_v[first:stop]
                gk_, gv_ = (part_k[:, first:stop], part_v[:, first:stop]) if chunks > 1 else (
                    part_k[first:stop], part_v[first:stop])
                index = prefix_index - first
                lens = None if prefix_lens is None else prefix_lens[first:stop]
            grid, args, kwargs = dprefix_launch(q, pk_, pv_, grad_out, lse, delta, gk_, gv_, chunks, scale=scale,
                                                prefix_index=index, prefix_lens=lens, softcap=softcap,
                                                seq_k=k.shape[2], window=window,
                                                window_includes_prefix=window_includes_prefix,
                                                left_padding=left_padding, config=config, dq_acc=dq_acc)
            launch(_prefix_attention_bwd_dprefix, grid, args, kwargs)
        if chunks > 1:  # a fixed-order sum: deterministic
            dpk.copy_(part_k.sum(0))
            dpv.copy_(part_v.sum(0))
    if fuse_dq:
        dq.copy_(dq_acc.mul_(scale))
    return _select(needs, dq, dk, dv, dpk, dpv)


def _select(needs, *grads):
    return tuple(g if need else None for need, g in zip(needs, grads))

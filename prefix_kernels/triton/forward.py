"""Fused forward over [shared prefix ; own keys]: one online softmax, no concatenation anywhere.

Each program owns BLOCK_M queries of one (sequence, query head). It streams the valid tiles of the prefix its
sequence uses (read in place from the ONE prefix copy; GQA by indexing the KV head), then the sequence's own
tiles, skipping tiles that causality or the window rule out (with PREFIX_WINDOW the window reaches into the
prefix too, whose key p then sits at position p - prefix_len). Only tiles that can contain an invisible key are
masked. It writes the output and the log-sum-exp (natural log) the backward needs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .configs import block_d_for, cdiv, forward_config
from .device import batch_chunks, launch, on_first_tensor_device



@triton.jit
def _load_rows(ptrs, row_ok, d_ok, CHECK_ROWS: tl.constexpr, CHECK_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile, bounds-checking only what may be out of range."""
    if CHECK_ROWS:
        if CHECK_D:
            return tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    if CHECK_D:
        return tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _query_block(HEAVY_FIRST: tl.constexpr):
    """This program's query block along grid axis 0; with ForwardConfig.heavy_first the longest (last) blocks of
    each head start first (forward and dq kernels)."""
    if HEAVY_FIRST:
        return tl.num_programs(0) - 1 - tl.program_id(0)
    return tl.program_id(0)


@triton.jit
def _tanh_to_a_few_ulp(x):
    """tanh(x) within a few ulp (fp32; 2.5 where exp2 is exact), without libdevice (runs in the interpreter).
    1 - 2 / (exp(2x) + 1) is off by ~1 ulp of 1.0 whatever x: a large relative error near 0, which softcap multiplies
    into every score (an fp32 softcap of 300 gave twice the reference's error). So |x| < 0.4 takes the odd Taylor
    series to x^13 (the next term < 1e-8 of tanh x), the rest sign(x) (1 - e) / (1 + e), e = exp(-2|x|) in (0, 0.45]."""
    x2 = x * x
    series = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * (0.021869488536155203 + x2 * (-0.008863235529902197
                                                                    + x2 * 0.0035921280365724811))))))
    e = tl.math.exp2(tl.abs(x) * (-2.0 * 1.4426950408889634))
    magnitude = (1.0 - e) / (1.0 + e)
    return tl.where(tl.abs(x) < 0.4, series, tl.where(x < 0, -magnitude, magnitude))


@triton.jit
def _softcap_log2(qk, sm_scale, softcap, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Raw q.k -> scores in log2 units: scale, optional tanh soft-capping (Gemma 2), times log2(e). fp32 inputs
    (DOT_PRECISION "ieee": the accurate path) get a tanh within a few ulp; 16-bit ones, whose scores are rounded far
    more coarsely anyway, the cheaper 1 - 2 / (exp(2s) + 1)."""
    if HAS_SOFTCAP:
        s = qk * (sm_scale / softcap)
        if DOT_PRECISION == "ieee":
            s = _tanh_to_a_few_ulp(s)
        else:  # exact limits at +-inf
            s = 1.0 - 2.0 / (tl.math.exp2(s * (2.0 * 1.4426950408889634)) + 1.0)
        return s * (softcap * 1.4426950408889634)
    return qk * (sm_scale * 1.4426950408889634)


@triton.jit
def _own_visible(cols, end, q_pos, b, KPM, stride_mb, stride_ml, window, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 INTERIOR: tl.constexpr = False):
    """Which own keys `cols` (< end) each row at position q_pos sees: causality, window, key padding. INTERIOR: a
    tile wholly below `end` and at or before every row's causal diagonal (the forward's and dq's fast tiles), where
    only the window and the padding can hide a key and the padding mask is read without a bounds check."""
    if INTERIOR:
        visible = tl.full((BLOCK_M, BLOCK_N), 1, tl.int1)
    else:
        visible = tl.broadcast_to(cols[None, :] < end, (BLOCK_M, BLOCK_N))
        if CAUSAL:
            visible = visible & (cols[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        visible = visible & ((q_pos[:, None] - cols[None, :]) < window)
    if HAS_KPM:
        if INTERIOR:
            key_ok = tl.load(KPM + b * stride_mb + cols * stride_ml)
        else:
            key_ok = tl.load(KPM + b * stride_mb + cols * stride_ml, mask=cols < end, other=0)
        visible = visible & (key_ok != 0)[None, :]
    return visible


@triton.jit
def _prefix_visible(cols, prefix_len, q_pos, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    PREFIX_WINDOW: tl.constexpr):
    """Which prefix keys `cols` each row at position q_pos sees: those below the prefix's length and, with
    PREFIX_WINDOW (window_includes_prefix), inside the window, key p sitting at position p - prefix_len (q_pos
    counted past the row's left padding: _prefix_query_pos)."""
    visible = tl.broadcast_to(cols[None, :] < prefix_len, (BLOCK_M, BLOCK_N))
    if PREFIX_WINDOW:
        visible = visible & ((q_pos[:, None] - (cols[None, :] - prefix_len)) < window)
    return visible


@triton.jit
def _prefix_query_pos(first_pos, LeftPad, b, PREFIX_WINDOW: tl.constexpr):
    """The position of a query block's first row as the prefix's window sees it: with PREFIX_WINDOW, past the
    row's left padding (left_padding[b] own keys that stand before the prefix, not after it)."""
    if PREFIX_WINDOW:
        return first_pos - tl.load(LeftPad + b).to(tl.int32)
    return first_pos


@triton.jit
def _prefix_tiles(first_pos, prefix_len, window, BLOCK_N: tl.constexpr, PREFIX_WINDOW: tl.constexpr):
    """(lo, full_end) of a query block's prefix walk from position first_pos: tiles [lo, full_end) need no mask,
    [full_end, prefix_len) do. With PREFIX_WINDOW the tiles left of every row's window are skipped and the rest
    masked."""
    if PREFIX_WINDOW:
        lo = (tl.maximum(first_pos + prefix_len - window + 1, 0) // BLOCK_N) * BLOCK_N
        return lo, lo
    return 0, (prefix_len // BLOCK_N) * BLOCK_N


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q,
    k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    start_n, n_limit, visible, sm_scale, softcap,
    offs_n, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    APPLY_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    desc_b=0, desc_h=0, USE_DESC: tl.constexpr = False,
):
    """One online-softmax step over keys [start_n, start_n + BLOCK_N).

    With APPLY_MASK, `visible` [BLOCK_M, BLOCK_N] says which scores count (it includes the range check
    cols < n_limit); without it, every key in the tile is in range and visible.
    With USE_DESC, k_base/v_base are 4-D tensor descriptors (Hopper's TMA copy engine) read at
    [desc_b, desc_h, start_n, 0]; the engine zero-fills rows and head-dim columns out of range.
    """
    cols = start_n + offs_n
    col_ok = cols < n_limit
    d_ok = offs_d < HEAD_DIM
    if USE_DESC:
        k = k_base.load([desc_b, desc_h, start_n, 0]).reshape(offs_n.shape[0], BLOCK_D)
    else:
        k = _load_rows(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, col_ok, d_ok,
                       APPLY_MASK, HEAD_DIM != BLOCK_D)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if APPLY_MASK or HAS_SOFTCAP:
        s = _softcap_log2(qk, sm_scale, softcap, HAS_SOFTCAP, DOT_PRECISION)
        if APPLY_MASK:
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen nothing yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
    else:
        # The hot path: every key visible, no cap. Scale the row max (scale > 0, validated) rather than the
        # tile, so the exponent is one fused multiply-add per score.
        qk_scale = sm_scale * 1.4426950408889634
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = m_new
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if USE_DESC:
        v = v_base.load([desc_b, desc_h, start_n, 0]).reshape(offs_n.shape[0], BLOCK_D)
    else:
        v = _load_rows(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, col_ok, d_ok,
                       APPLY_MASK, HEAD_DIM != BLOCK_D)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefix_attention_fwd(
    Q, K, V, PK, PV, Out, Lse, KPM, PrefixIndex, PrefixLens, LeftPad, Sinks,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pkn, stride_pkh, stride_pks, stride_pkd,
    stride_pvn, stride_pvh, stride_pvs, stride_pvd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_mb, stride_ml,
    HQ, S, L, P, sm_scale, softcap, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_PREFIX_INDEX: tl.constexpr, HAS_PREFIX_LENS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_DESC: tl.constexpr = False, HEAVY_FIRST: tl.constexpr = False, PREFIX_WINDOW: tl.constexpr = False,
    HAS_SINKS: tl.constexpr = False,
):
    pid_m = _query_block(HEAVY_FIRST)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    hq = pid_bh % HQ
    hkv = (hq // GROUP).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < S
    d_ok = offs_d < HEAD_DIM
    q_ptrs = Q + b * stride_qb + hq.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
    q = _load_rows(q_ptrs, row_ok, d_ok, True, HEAD_DIM != BLOCK_D)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    first_pos = L - S + pid_m * BLOCK_M  # query i sits at position L - S + i (bottom-right aligned)

    # ---- the shared prefix: every key up to this sequence's prefix length is visible (in the window) ----
    if HAS_PREFIX_INDEX:
        prefix_id = tl.load(PrefixIndex + b).to(tl.int64)
    else:
        prefix_id = 0
    if HAS_PREFIX_LENS:
        prefix_len = tl.load(PrefixLens + prefix_id).to(tl.int32)
    else:
        prefix_len = P
    if USE_DESC:  # K, V, PK, PV are tensor descriptors, addressed by (int32) coordinates
        pk_base = PK
        pv_base = PV
        desc_b = b.to(tl.int32)
        desc_h = hkv.to(tl.int32)
        desc_prefix = prefix_id
        if HAS_PREFIX_INDEX:
            desc_prefix = prefix_id.to(tl.int32)
    else:
        pk_base = PK + prefix_id * stride_pkn + hkv * stride_pkh
        pv_base = PV + prefix_id * stride_pvn + hkv * stride_pvh
        desc_b = 0
        desc_h = 0
        desc_prefix = 0
    prefix_pos = _prefix_query_pos(first_pos, LeftPad, b, PREFIX_WINDOW)
    prefix_lo, prefix_full_end = _prefix_tiles(prefix_pos, prefix_len, window, BLOCK_N, PREFIX_WINDOW)
    for start_n in range(prefix_lo, prefix_full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, pk_base, pv_base, stride_pks, stride_pkd, stride_pvs, stride_pvd,
            start_n, prefix_len, 0, sm_scale, softcap, offs_n, offs_d,
            HEAD_DIM, BLOCK_D, False, HAS_SOFTCAP, DOT_PRECISION, desc_prefix, desc_h, USE_DESC)
    for start_n in range(prefix_full_end, prefix_len, BLOCK_N):  # the partial last tile (window: all), if any
        visible = _prefix_visible(start_n + offs_n, prefix_len, prefix_pos + tl.arange(0, BLOCK_M), window,
                                  BLOCK_M, BLOCK_N, PREFIX_WINDOW)
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, pk_base, pv_base, stride_pks, stride_pkd, stride_pvs, stride_pvd,
            start_n, prefix_len, visible, sm_scale, softcap, offs_n, offs_d,
            HEAD_DIM, BLOCK_D, True, HAS_SOFTCAP, DOT_PRECISION, desc_prefix, desc_h, USE_DESC)

    # ---- the sequence's own keys ----
    if USE_DESC:
        k_base = K
        v_base = V
    else:
        k_base = K + b * stride_kb + hkv * stride_kh
        v_base = V + b * stride_vb + hkv * stride_vh
    if CAUSAL:
        hi = tl.minimum(L, first_pos + BLOCK_M)  # keys past the block's last query are skipped
        # Tiles that end at or before the block's first query position need no causal mask.
        full_end = (tl.maximum(tl.minimum(L, first_pos + 1), 0) // BLOCK_N) * BLOCK_N
    else:
        hi = L
        full_end = (L // BLOCK_N) * BLOCK_N
    if HAS_WINDOW:
        lo = (tl.maximum(first_pos - window + 1, 0) // BLOCK_N) * BLOCK_N  # keys left of every window skipped
    else:
        lo = 0
    full_end = tl.maximum(full_end, lo)
    q_pos = L - S + offs_m
    for start_n in range(lo, full_end, BLOCK_N):
        visible = _own_visible(start_n + offs_n, L, q_pos, b, KPM, stride_mb, stride_ml, window,
                               BLOCK_M, BLOCK_N, CAUSAL, HAS_KPM, HAS_WINDOW, True)
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
            start_n, L, visible, sm_scale, softcap, offs_n, offs_d,
            HEAD_DIM, BLOCK_D, HAS_KPM or HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION, desc_b, desc_h, USE_DESC)
    for start_n in range(full_end, hi, BLOCK_N):
        visible = _own_visible(start_n + offs_n, L, q_pos, b, KPM, stride_mb, stride_ml, window,
                               BLOCK_M, BLOCK_N, CAUSAL, HAS_KPM, HAS_WINDOW)
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
            start_n, L, visible, sm_scale, softcap, offs_n, offs_d,
            HEAD_DIM, BLOCK_D, True, HAS_SOFTCAP, DOT_PRECISION, desc_b, desc_h, USE_DESC)

    if HAS_SINKS:  # the head's attention sink (gpt-oss): one more score, in m_i's log2 units, of value zero
        sink = tl.load(Sinks + hq).to(tl.float32) * 1.4426950408889634
        m_all = tl.maximum(m_i, sink)
        m_use = tl.where(m_all == float("-inf"), 0.0, m_all)
        alpha = tl.math.exp2(m_i - m_use)  # acc and l_i were relative to m_i
        acc = acc * alpha[:, None]
        l_i = l_i * alpha + tl.math.exp2(sink - m_use)
        m_i = m_use

    # ---- epilogue: rows that saw nothing give zeros and lse = -inf (with a sink: zeros and the sink) ----
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    o_ptrs = Out + b * stride_ob + hq.to(tl.int64) * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    if HEAD_DIM != BLOCK_D:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Lse + pid_bh.to(tl.int64) * S + offs_m, lse, mask=row_ok)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products: the fp32 path is the accurate one, not a tf32 approximation.
    return "ieee" if dtype == torch.float32 else "tf32"


def forward_launch(
    q, k, v, prefix_k, prefix_v, out, lse, *, causal, scale, key_padding_mask, prefix_index, prefix_lens,
    window, softcap, window_includes_prefix=False, left_padding=None, sinks=None, config=None,
):
    """(grid, args, kwargs) of the forward kernel for these tensors: shared by the launcher and the compile check.
    sinks: None, or [Hq] contiguous in float16, bfloat16 or float32 (attention_sinks_argument).

    `config` overrides the launch configuration (tuning scripts only; the package always uses forward_config).
    """
    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    config = config or forward_config(head_dim, q.dtype, seq_q, tma_capable=_has_tma(q.device))
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    grid = (cdiv(seq_q, config.block_m), batch * heads_q)
    block_d = block_d_for(head_dim)
    sources = (k, v, prefix_k, prefix_v)
    use_desc = config.tma and all(_tma_compatible(t) for t in sources)
    if use_desc:
        sources = tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, config.block_n, block_d])
                        for t in sources)
    args = (
        q, *sources, out, lse, kpm, prefix_index, prefix_lens,
        prefix_window_padding(q, window, window_includes_prefix, left_padding), sinks,
        *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(), *out.stride(),
        *(kpm.stride() if kpm is not None else (0, 0)),
        heads_q, seq_q, seq_k, prefix_k.shape[2], scale, float(softcap or 1.0),
        window_argument(window, seq_k, prefix_k.shape[2]),
    )
    kwargs = dict(
        GROUP=heads_q // heads_kv, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        CAUSAL=causal, HAS_KPM=kpm is not None, HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        HAS_PREFIX_INDEX=prefix_index is not None, HAS_PREFIX_LENS=prefix_lens is not None,
        DOT_PRECISION=dot_precision(q.dtype), USE_DESC=use_desc, HEAVY_FIRST=config.heavy_first,
        PREFIX_WINDOW=window is not None and window_includes_prefix, HAS_SINKS=sinks is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return grid, args, kwargs


def window_argument(window, seq_k, prefix_len):
    """The window argument of every kernel (0 when there is none). No query is as far as L + P from a key it could
    see (L - 1 + P at most), so a longer window masks nothing and is passed as L + P rounded up to a multiple of 16:
    the kernels add the window to int32 positions, where one near 2**31 wrapped (int32's max as "no window" zeroed
    the prefix gradient of left-padded rows, and the own keys' dk/dv). The rounding keeps the value in the class
    Triton specializes integer arguments on (divisible by 16, as the usual windows are) while a growing cache's
    L + P moves it step by step: no second compiled variant mid-generation."""
    if window is None:
        return 0
    return min(int(window), cdiv(max(seq_k + prefix_len, 1), 16) * 16)


def prefix_window_padding(q, window, window_includes_prefix, left_padding):
    """The LeftPad argument: with PREFIX_WINDOW the kernels read each row's left padding (zeros when the caller
    gave none); otherwise None, never read."""
    if window is None or not window_includes_prefix:
        return None
    if left_padding is None:
        return torch.zeros(q.shape[0], dtype=torch.int32, device=q.device)
    return left_padding


def attention_sinks_argument(sinks):
    """The Sinks argument of the forward and decode kernels: None, or [Hq] contiguous in a dtype they load."""
    if sinks is None or (sinks.dtype in (torch.float16, torch.bfloat16, torch.float32) and sinks.is_contiguous()):
        return sinks
    return sinks.float().contiguous()  # (a float64 or strided [Hq])


def _has_tma(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _tma_compatible(t: torch.Tensor) -> bool:
    """What a TMA tensor descriptor needs: a contiguous last dim, 16-byte aligned base and strides, no empty dim,
    and no broadcast dim (stride 0 over more than one element, which the driver may refuse to encode: such a
    tensor takes the pointer loads)."""
    size = t.element_size()
    return (t.numel() > 0 and t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(stride * size % 16 == 0 and (stride != 0 or extent == 1)
                    for stride, extent in zip(t.stride()[:-1], t.shape[:-1])))


@on_first_tensor_device
def prefix_attention_forward(q, k, v, prefix_k, prefix_v, **options):
    """Launch the fused forward on already-validated inputs; prefix_k/v are 4-D [N, Hkv, P, D].

    options: causal, scale, key_padding_mask, prefix_index, prefix_lens, window, softcap, window_includes_prefix,
    left_padding, sinks ([Hq]: each head's attention sink, one more score of value zero, in the epilogue) (and
    config, see above).
    Returns (out [B, Hq, S, D] contiguous in q's dtype, lse [B, Hq, S] float32).
    """
    batch, heads_q, seq_q, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((batch, heads_q, seq_q), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    sinks = attention_sinks_argument(options.get("sinks"))
    for q_, k_, v_, out_, lse_, mask, index, padding in batch_chunks(
            heads_q, q, k, v, out, lse, options["key_padding_mask"], options["prefix_index"],
            options.get("left_padding")):
        grid, args, kwargs = forward_launch(q_, k_, v_, prefix_k, prefix_v, out_, lse_,
                                            **{**options, "key_padding_mask": mask, "prefix_index": index,
                                               "left_padding": padding, "sinks": sinks})
        launch(_prefix_attention_fwd, grid, args, kwargs)
    return out, lse


# Under TRITON_INTERPRET=1 (read when @triton.jit runs) the kernel runs on CPU tensors through the interpreter.
INTERPRETED = type(_prefix_attention_fwd).__name__ == "InterpretedFunction"

"""Fused Triton kernels for lean_training's elementwise work: RMSNorm, SwiGLU, rotary embedding, cross-entropy.

A frozen model's training step spends most of its non-matmul time moving activations through chains of small
PyTorch ops (the stock RMSNorm alone makes ~6 passes over a float32 copy of its input in forward and more in
backward). Each kernel here does one such chain in one pass, with the stock rounding points kept (a value the
stock code rounds to the activations' dtype is rounded here too), so results match the formulas in
prefix_kernels/lean_reference.py (same signatures; the tests cross-check them) up to float32 summation order and
the GPU's fast exp2 (tl.exp: ~1e-6 relative for large arguments; below fp16/bf16 resolution).

Each *_launch function returns (grid, args, kwargs) for its kernel: shared by the launcher and the compile check.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import cdiv
from .device import launch, on_first_tensor_device

# RMSNorm holds a whole row in registers: rows wider than this go to the reference formula (lean_ops_reason).
MAX_NORM_WIDTH = 16384
ELEMENTWISE_BLOCK = 1024
LOSS_BLOCK_V = 4096


@triton.jit
def _rms_norm_fwd(x_ptr, w_ptr, out_ptr, rstd_ptr, n_cols, x_row_stride, out_row_stride, eps,
                  BLOCK: tl.constexpr):
    """out = w * (x * rstd).to(x.dtype), rstd = rsqrt(mean(x^2) + eps) in float32: one row per program."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # the stock rounding to x's dtype
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd(grad_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, n_rows, n_cols,
                  grad_row_stride, x_row_stride, dx_row_stride,
                  BLOCK: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr):
    """dx (and this program's share of dw) for rows pid, pid + programs, ...; dw partials are summed by the host.

    The stock chain rule: grad_n = (grad * w) rounded to x's dtype, dx = rstd * (grad_n - x * rstd^2 *
    mean(grad_n * x)); dw = sum over rows of (grad * n) rounded to grad's dtype.
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    first_row = pid.to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for step in range(0, tl.cdiv(n_rows - pid, programs)):
        row64 = first_row + step * programs
        grad = tl.load(grad_ptr + row64 * grad_row_stride + cols, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row64 * x_row_stride + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row64)
        if NEED_DX:
            grad_n = (grad * w).to(x_ptr.dtype.element_ty).to(tl.float32)
            mean_gx = tl.sum(grad_n * x, axis=0) / n_cols
            dx = rstd * (grad_n - x * (rstd * rstd * mean_gx))
            tl.store(dx_ptr + row64 * dx_row_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        if NEED_DW:
            normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
            dw += (grad * normed).to(grad_ptr.dtype.element_ty).to(tl.float32)
    if NEED_DW:
        tl.store(dw_partial_ptr + first_row * n_cols + cols, dw, mask=ok)


@triton.jit
def _silu_rounded(gate, DTYPE: tl.constexpr):
    """F.silu in float32, rounded to the activations' dtype as the stock module's output is."""
    return (gate / (1.0 + tl.exp(-gate))).to(DTYPE).to(tl.float32)


@triton.jit
def _swiglu_fwd(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    gate = tl.load(gate_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    act = _silu_rounded(gate, out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, (act * up).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd(grad_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, BLOCK: tl.constexpr,
                NEED_DGATE: tl.constexpr, NEED_DUP: tl.constexpr):
    """d up = grad * silu(gate); d gate = silu'(gate) * (grad * up), each product rounded where stock rounds."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    dtype = grad_ptr.dtype.element_ty
    grad = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if NEED_DUP:
        act = _silu_rounded(gate, dtype)
        tl.store(dup_ptr + offs, (grad * act).to(dtype), mask=ok)
    if NEED_DGATE:
        up = tl.load(up_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        grad_act = (grad * up).to(dtype).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-gate))
        tl.store(dgate_ptr + offs, (grad_act * sig * (1.0 + gate * (1.0 - sig))).to(dtype), mask=ok)


@triton.jit
def _cross_entropy_fwd(logits_ptr, targets_ptr, loss_ptr, stats_ptr, n_vocab, row_stride, BLOCK_V: tl.constexpr):
    """Per row in float32 (one streaming pass, running max per lane): stats = (m, log sum exp(logits - m)), m the
    row's max (0 if it is all -inf), and loss = (m - logit of the target) + that log-sum. Kept apart, not as one
    log-sum-exp, which would carry an error of ~1 ulp of m into every softmax term (~2e-6 of the gradient at
    logits of 40 in float32 models). The host zeroes the loss of ignored rows (their target is any valid index)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK_V)
    run_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, n_vocab, BLOCK_V):
        x = tl.load(row_ptr + start + cols, mask=start + cols < n_vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, x)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # lanes that saw only -inf stay at sum 0
        run_sum = run_sum * tl.exp(run_max - shift) + tl.exp(x - shift)
        run_max = new_max
    row_max = tl.max(run_max, axis=0)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    log_sum = tl.log(tl.sum(run_sum * tl.exp(run_max - shift), axis=0))
    target_logit = tl.load(row_ptr + tl.load(targets_ptr + row)).to(tl.float32)
    tl.store(stats_ptr + 2 * row, shift)
    tl.store(stats_ptr + 2 * row + 1, log_sum)
    tl.store(loss_ptr + row, (shift - target_logit) + log_sum)


@triton.jit
def _cross_entropy_bwd(grad_ptr, logits_ptr, targets_ptr, stats_ptr, dlogits_ptr, n_vocab, row_stride,
                       drow_stride, BLOCK_V: tl.constexpr):
    """d logits = (softmax(logits) - onehot(target)) * grad[row], softmax = exp((logits - m) - log-sum) from the
    forward's stats; grad is 0 on ignored rows."""
    row = tl.program_id(0).to(tl.int64)
    grad = tl.load(grad_ptr + row)
    row_max = tl.load(stats_ptr + 2 * row)
    log_sum = tl.load(stats_ptr + 2 * row + 1)
    target = tl.load(targets_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, n_vocab, BLOCK_V):
        ok = start + cols < n_vocab
        x = tl.load(logits_ptr + row * row_stride + start + cols, mask=ok, other=0.0).to(tl.float32)
        prob = tl.exp((x - row_max) - log_sum) - tl.where(start + cols == target, 1.0, 0.0)
        tl.store(dlogits_ptr + row * drow_stride + start + cols, (prob * grad).to(dlogits_ptr.dtype.element_ty),
                 mask=ok)


@triton.jit
def _rope(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, seq, half,
          x_sb, x_sh, x_ss, cos_sb, cos_ss, sin_sb, sin_ss, out_sb, out_sh, out_ss,
          BLOCK_S: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr):
    """Rotary embedding of one (batch, head)'s BLOCK_S positions, halves [x1, x2] of the head dim, the stock
    rounding of each product and of the sum (q*cos + rotate_half(q)*sin, rotate_half(x) = [-x2, x1]):
      forward   out1 = x1*c1 - x2*s1,  out2 = x2*c2 + x1*s2
      backward  dx1 = g1*c1 + g2*s2,   dx2 = g2*c2 - g1*s1   (the transpose: what autograd of stock computes)
    cos/sin are [B or 1, S, D] (a batch stride of 0 broadcasts one row of positions)."""
    pid_bh = tl.program_id(0)  # on axis 0 (up to 2^31 - 1): B * H passes 65535 in large-batch decoding
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    pos = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_HALF)
    ok = (pos < seq)[:, None] & (cols < half)[None, :]
    pos64 = pos.to(tl.int64)[:, None]
    x_at = x_ptr + b * x_sb + h * x_sh + pos64 * x_ss + cols[None, :]
    cos_at = cos_ptr + b * cos_sb + pos64 * cos_ss + cols[None, :]
    sin_at = sin_ptr + b * sin_sb + pos64 * sin_ss + cols[None, :]
    dtype = out_ptr.dtype.element_ty
    x1 = tl.load(x_at, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_at + half, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(cos_at, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_at + half, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_at, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_at + half, mask=ok, other=0.0).to(tl.float32)
    if BACKWARD:
        out1 = (x1 * c1).to(dtype).to(tl.float32) + (x2 * s2).to(dtype).to(tl.float32)
        out2 = (x2 * c2).to(dtype).to(tl.float32) - (x1 * s1).to(dtype).to(tl.float32)
    else:
        out1 = (x1 * c1).to(dtype).to(tl.float32) - (x2 * s1).to(dtype).to(tl.float32)
        out2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
    out_at = out_ptr + b * out_sb + h * out_sh + pos64 * out_ss + cols[None, :]
    tl.store(out_at, out1.to(dtype), mask=ok)
    tl.store(out_at + half, out2.to(dtype), mask=ok)


def _row_warps(block: int) -> int:
    return 32 if block >= 16384 else 16 if block >= 8192 else 8 if block >= 2048 else 4


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """[rows, cols] with unit column stride (a view when the rows already are)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def lean_ops_reason(op: str, dtype: torch.dtype, width: int) -> str | None:
    """Why these kernels cannot take `op` on this dtype at this row width, or None."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the kernels compute in float32 and take float16, bfloat16 and float32, not {dtype}"
    if op == "rms_norm" and width > MAX_NORM_WIDTH:
        return f"the RMSNorm kernel holds a row in registers: width {width} > {MAX_NORM_WIDTH}"
    return None


def rms_norm_forward_launch(x, weight, out, rstd, eps):
    block = triton.next_power_of_2(x.shape[1])
    args = (x, weight, out, rstd, x.shape[1], x.stride(0), out.stride(0), float(eps))
    return (x.shape[0],), args, dict(BLOCK=block, num_warps=_row_warps(block))


def rms_norm_backward_launch(grad, x, weight, rstd, dx, dw_partial, programs, need_dx, need_dw):
    block = triton.next_power_of_2(x.shape[1])
    args = (grad, x, weight, rstd, dx, dw_partial, x.shape[0], x.shape[1], grad.stride(0), x.stride(0),
            dx.stride(0) if dx is not None else 0)
    kwargs = dict(BLOCK=block, NEED_DX=need_dx, NEED_DW=need_dw, num_warps=_row_warps(block))
    return (programs,), args, kwargs


def swiglu_forward_launch(gate, up, out):
    return (cdiv(gate.numel(), ELEMENTWISE_BLOCK),), (gate, up, out, gate.numel()), dict(BLOCK=ELEMENTWISE_BLOCK,
                                                                                            num_warps=4)


def swiglu_backward_launch(grad, gate, up, dgate, dup):
    args = (grad, gate, up, dgate, dup, gate.numel())
    kwargs = dict(BLOCK=ELEMENTWISE_BLOCK, NEED_DGATE=dgate is not None, NEED_DUP=dup is not None, num_warps=4)
    return (cdiv(gate.numel(), ELEMENTWISE_BLOCK),), args, kwargs


def _loss_block(n_vocab: int) -> int:
    return min(LOSS_BLOCK_V, triton.next_power_of_2(n_vocab))


def cross_entropy_forward_launch(logits, targets, loss, stats):
    block = _loss_block(logits.shape[1])
    args = (logits, targets, loss, stats, logits.shape[1], logits.stride(0))
    return (logits.shape[0],), args, dict(BLOCK_V=block, num_warps=_row_warps(block))


def cross_entropy_backward_launch(grad, logits, targets, stats, dlogits):
    block = _loss_block(logits.shape[1])
    args = (grad, logits, targets, stats, dlogits, logits.shape[1], logits.stride(0), dlogits.stride(0))
    return (logits.shape[0],), args, dict(BLOCK_V=block, num_warps=_row_warps(block))


ROPE_TILE = 1024  # (positions x half the head dim) per program: <= ~64 registers at 4 warps (triton 3.6 and 3.8)


def rope_launch(x, cos, sin, out, backward):
    """x, out [B, H, S, D] with unit last stride; cos, sin [B or 1, S, D] with unit last stride."""
    batch, heads, seq, dim = x.shape
    block_half = triton.next_power_of_2(dim // 2)
    block_s = min(max(1, ROPE_TILE // block_half), triton.next_power_of_2(seq))
    cos_sb = cos.stride(0) if cos.shape[0] == batch else 0
    sin_sb = sin.stride(0) if sin.shape[0] == batch else 0
    args = (x, cos, sin, out, heads, seq, dim // 2, x.stride(0), x.stride(1), x.stride(2), cos_sb, cos.stride(1),
            sin_sb, sin.stride(1), out.stride(0), out.stride(1), out.stride(2))
    # No FMA contraction: stock rounds each product before the sum (separate kernels). With fusion on, the H200
    # (655c7cb) showed LLVM narrow x*c to a bf16/fp16 multiply and fuse it with the sum: 1 ulp off stock.
    kwargs = dict(BLOCK_S=block_s, BLOCK_HALF=block_half, BACKWARD=backward, num_warps=4, enable_fp_fusion=False)
    return (batch * heads, cdiv(seq, block_s)), args, kwargs


# The launchers: the same signatures and results as prefix_kernels.lean_reference (shapes: see there).

@on_first_tensor_device
def rms_norm_forward(x, weight, eps):
    rows = _rows_view(x.reshape(-1, x.shape[-1]))
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    rstd = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    if rows.numel():
        grid, args, kwargs = rms_norm_forward_launch(rows, weight.contiguous(), out.view(rows.shape), rstd, eps)
        launch(_rms_norm_fwd, grid, args, kwargs)
    return out, rstd


def _dw_programs(x: torch.Tensor) -> int:
    """Programs for a backward that also sums dw: enough to fill the GPU, few enough that the partials stay small."""
    if x.device.type == "cuda":
        return min(x.shape[0], 4 * torch.cuda.get_device_properties(x.device).multi_processor_count)
    return min(x.shape[0], 4)


@on_first_tensor_device
def rms_norm_backward(grad, x, weight, rstd, need_dx, need_dw):
    width = x.shape[-1]
    grad_rows, rows = _rows_view(grad.reshape(-1, width)), _rows_view(x.reshape(-1, width))
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_dx else None
    programs = max(1, _dw_programs(rows) if need_dw else rows.shape[0])
    dw_partial = torch.empty((programs, width), dtype=torch.float32, device=x.device) if need_dw else None
    if rows.numel() and (need_dx or need_dw):
        grid, args, kwargs = rms_norm_backward_launch(grad_rows, rows, weight.contiguous(), rstd,
                                                      dx.view(rows.shape) if need_dx else None, dw_partial,
                                                      programs, need_dx, need_dw)
        launch(_rms_norm_bwd, grid, args, kwargs)
    dw = None
    if need_dw:
        dw = dw_partial.sum(0).to(weight.dtype) if rows.shape[0] else torch.zeros_like(weight)
    return dx, dw


@on_first_tensor_device
def swiglu_forward(gate, up):
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    if gate.numel():
        grid, args, kwargs = swiglu_forward_launch(gate, up, out)
        launch(_swiglu_fwd, grid, args, kwargs)
    return out


@on_first_tensor_device
def swiglu_backward(grad, gate, up, need_gate, need_up):
    grad, gate, up = grad.contiguous(), gate.contiguous(), up.contiguous()
    dgate = torch.empty_like(gate) if need_gate else None
    dup = torch.empty_like(up) if need_up else None
    if gate.numel() and (need_gate or need_up):
        grid, args, kwargs = swiglu_backward_launch(grad, gate, up, dgate, dup)
        launch(_swiglu_bwd, grid, args, kwargs)
    return dgate, dup


@on_first_tensor_device
def cross_entropy_forward(logits, targets, keep):
    logits = _rows_view(logits)
    # The kernel reads the target's logit unchecked; one host sync per loss call refuses what stock would.
    out_of_range = keep & ((targets < 0) | (targets >= logits.shape[1]))
    if out_of_range.any():
        bad = int(targets[out_of_range][0])
        raise ValueError(f"labels: {bad} is out of range for a vocabulary of {logits.shape[1]} (nor the ignore "
                         "index)")
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    stats = torch.empty((logits.shape[0], 2), dtype=torch.float32, device=logits.device)
    if logits.numel():
        grid, args, kwargs = cross_entropy_forward_launch(logits, targets, loss, stats)
        launch(_cross_entropy_fwd, grid, args, kwargs)
    return torch.where(keep, loss, 0.0), stats


@on_first_tensor_device
def cross_entropy_backward(grad, logits, targets, keep, stats):
    logits = _rows_view(logits)
    grad = torch.where(keep, grad.float(), 0.0)
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if logits.numel():
        grid, args, kwargs = cross_entropy_backward_launch(grad, logits, targets, stats, dlogits)
        launch(_cross_entropy_bwd, grid, args, kwargs)
    return dlogits


def _rope_one(x, cos, sin, backward):
    x = _rows_view(x)
    out = torch.empty_like(x)  # the input's layout (HF's q is a transposed view; so is the stock result)
    if x.numel():
        grid, args, kwargs = rope_launch(x, _rows_view(cos), _rows_view(sin), out, backward)
        launch(_rope, grid, args, kwargs)
    return out


@on_first_tensor_device
def rope_forward(q, k, cos, sin):
    return _rope_one(q, cos, sin, False), _rope_one(k, cos, sin, False)


@on_first_tensor_device
def rope_backward(grad_q, grad_k, cos, sin, need_q, need_k):
    return (_rope_one(grad_q, cos, sin, True) if need_q else None,
            _rope_one(grad_k, cos, sin, True) if need_k else None)

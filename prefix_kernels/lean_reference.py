"""The stock formulas of lean_training's ops in PyTorch: the CPU path and the oracle for the Triton kernels.

Same signatures as prefix_kernels.triton.lean_ops. The norm takes [..., width] (its rstd is flat, one per row),
the loss [rows, vocab], SwiGLU any shape;
each function computes what the stock transformers modules compute, with their rounding points:
  RMSNorm (Llama's): out = w * (x.float() * rstd).to(x.dtype), rstd = rsqrt(mean(x.float()^2) + eps)
  SwiGLU:            out = silu(gate) * up
  rotary embedding:  q * cos + rotate_half(q) * sin (Llama's apply_rotary_pos_emb, q and k [B, H, S, D],
                     cos and sin [B or 1, S, D]); backward its transpose, as autograd of it computes
  cross-entropy:     per row logsumexp(logits.float()) - logits[target], 0 where the row is ignored
The loss upcasts a bounded chunk of rows at a time (LOSS_CHUNK_BYTES of float32), in forward and in backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_CHUNK_BYTES = 1 << 28


def _wide(t):
    """The stock float32 upcast; float64 stays float64 (the tests' truth runs these formulas in float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def rms_norm_forward(x, weight, eps):
    """(out [..., width] in promote(weight, x) dtype, rstd [rows] float32; float64 for float64 x)."""
    x32 = _wide(x)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd.reshape(-1)


def rms_norm_backward(grad, x, weight, rstd, need_dx, need_dw):
    """(dx or None, dw or None): the stock chain rule through the rounding of the normalized rows."""
    x32 = _wide(x)
    rstd = rstd.view(x.shape[:-1] + (1,))
    normed = (x32 * rstd).to(x.dtype)
    dw = (grad * normed).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype) if need_dw else None
    dx = None
    if need_dx:
        grad_n = _wide((grad * weight).to(x.dtype))
        mean_gx = (grad_n * x32).sum(-1, keepdim=True) / x.shape[-1]
        dx = (rstd * (grad_n - x32 * (rstd.pow(2) * mean_gx))).to(x.dtype)
    return dx, dw


def swiglu_forward(gate, up):
    return F.silu(gate) * up


def swiglu_backward(grad, gate, up, need_gate, need_up):
    """(d gate or None, d up or None), silu(gate) recomputed with the forward's own op."""
    dup = grad * F.silu(gate) if need_up else None
    dgate = torch.ops.aten.silu_backward(grad * up, gate) if need_gate else None
    return dgate, dup


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_half_transposed(y):
    half = y.shape[-1] // 2
    return torch.cat((y[..., half:], -y[..., :half]), dim=-1)


def rope_forward(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope_backward(grad_q, grad_k, cos, sin, need_q, need_k):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (grad_q * cos + _rotate_half_transposed(grad_q * sin) if need_q else None,
            grad_k * cos + _rotate_half_transposed(grad_k * sin) if need_k else None)


def _chunk_rows(logits) -> int:
    return max(1, LOSS_CHUNK_BYTES // (4 * max(1, logits.shape[1])))


def cross_entropy_forward(logits, targets, keep):
    """(loss [rows] float32, 0 where not keep; stats [rows, 2]: each row's max m (0 if all -inf) and
    log sum exp(logits - m), kept apart for the backward's precision, see lean_ops._cross_entropy_fwd).
    targets: valid indices on every row."""
    rows = _chunk_rows(logits)
    stats = torch.empty((logits.shape[0], 2), dtype=_wide(logits[:0]).dtype, device=logits.device)
    loss = torch.empty_like(stats[:, 0])
    for start in range(0, logits.shape[0], rows):
        chunk = _wide(logits[start:start + rows])
        row_max = chunk.amax(dim=-1, keepdim=True) if chunk.shape[1] else chunk.new_zeros(chunk.shape[0], 1)
        row_max = torch.where(row_max == float("-inf"), 0.0, row_max)
        log_sum = torch.exp(chunk - row_max).sum(-1, keepdim=True).log()
        stats[start:start + rows] = torch.cat([row_max, log_sum], dim=1)
        picked = chunk.gather(1, targets[start:start + rows, None])
        loss[start:start + rows] = ((row_max - picked) + log_sum)[:, 0]
    return torch.where(keep, loss, 0.0), stats


def cross_entropy_backward(grad, logits, targets, keep, stats):
    """d logits (logits' dtype) = (softmax - onehot(target)) * grad, 0 on rows not kept."""
    rows = _chunk_rows(logits)
    grad = torch.where(keep, _wide(grad), 0.0)
    dlogits = torch.empty_like(logits)
    for start in range(0, logits.shape[0], rows):
        stop = start + rows
        probs = torch.exp((_wide(logits[start:stop]) - stats[start:stop, :1]) - stats[start:stop, 1:])
        probs.scatter_add_(1, targets[start:stop, None], -torch.ones_like(probs[:, :1]))
        dlogits[start:stop] = probs * grad[start:stop, None]
    return dlogits

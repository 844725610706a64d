"""The differentiable op as torch.library custom ops: forward and backward ops, fake impls, and autograd.

`prefix_kernels::prefix_attention_fwd` (Triton) and `prefix_kernels::prefix_attention_fwd_cuda` (csrc/) return
(out, lse) and share one autograd whose backward is the Triton backward. Both outputs are differentiable; the LSE's
gradient is folded into the backward's Delta (so `merge_attention_states` composes under autograd). The Triton op
also takes attention sinks (in its epilogue; the backward kernels need nothing for them, their own gradient is a
reduction over the saved out and lse here). The backward op
takes `needs` (which of dq, dk, dv, dprefix_k, dprefix_v to compute) and returns empty tensors for the others. Only
q, k, v, prefix_k, prefix_v, out, lse (plus the small mask/index tensors) are saved: the prefix is saved as the
ONE copy the caller passed, never anything of size B * P * D. Being opaque ops with fake impls, both trace under
torch.compile(fullgraph=True).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


@torch.library.custom_op("prefix_kernels::prefix_attention_fwd", mutates_args=())
def prefix_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    key_padding_mask: Optional[Tensor], prefix_index: Optional[Tensor], prefix_lens: Optional[Tensor],
    causal: bool, scale: float, window: Optional[int], softcap: Optional[float], window_includes_prefix: bool,
    left_padding: Optional[Tensor], sinks: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    from .triton.forward import prefix_attention_forward

    return prefix_attention_forward(q, k, v, prefix_k, prefix_v, causal=causal, scale=scale,
                                    key_padding_mask=key_padding_mask, prefix_index=prefix_index,
                                    prefix_lens=prefix_lens, window=window, softcap=softcap,
                                    window_includes_prefix=window_includes_prefix, left_padding=left_padding,
                                    sinks=sinks)


@torch.library.custom_op("prefix_kernels::prefix_attention_fwd_cuda", mutates_args=())
def prefix_attention_fwd_cuda(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    key_padding_mask: Optional[Tensor], prefix_index: Optional[Tensor], prefix_lens: Optional[Tensor],
    causal: bool, scale: float, window: Optional[int], softcap: Optional[float], window_includes_prefix: bool,
    left_padding: Optional[Tensor], sinks: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """The CUDA forward (csrc/) under the same signature and autograd: its out/lse feed the Triton backward.
    window, softcap and left_padding are always None here, window_includes_prefix False
    (prefix_kernels.cuda.unavailable_reason routes windows and softcaps away), and sinks None (attention.py applies
    them after this op)."""
    from .cuda import kernels

    return kernels().forward(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, prefix_lens, causal, scale)


def empty_out_and_lse(q):
    """What a forward returns, as empty tensors: out like q, lse [B, Hq, S] float32 (for fake impls)."""
    batch, heads_q, seq_q, _ = q.shape
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((batch, heads_q, seq_q), dtype=torch.float32, device=q.device))


@prefix_attention_fwd.register_fake
@prefix_attention_fwd_cuda.register_fake
def _prefix_attention_fwd_fake(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, prefix_lens, causal,
                               scale, window, softcap, window_includes_prefix, left_padding, sinks):
    return empty_out_and_lse(q)


@torch.library.custom_op("prefix_kernels::prefix_attention_bwd", mutates_args=())
def prefix_attention_bwd(
    grad_out: Tensor, grad_lse: Optional[Tensor],
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, out: Tensor, lse: Tensor,
    key_padding_mask: Optional[Tensor], prefix_index: Optional[Tensor], prefix_lens: Optional[Tensor],
    causal: bool, scale: float, window: Optional[int], softcap: Optional[float], window_includes_prefix: bool,
    left_padding: Optional[Tensor], needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dprefix_k, dprefix_v); a gradient not in `needs` comes back as an empty tensor."""
    from .triton.backward import prefix_attention_backward

    grads = prefix_attention_backward(q, k, v, prefix_k, prefix_v, out, lse, grad_out, grad_lse, needs=tuple(needs),
                                      causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                                      prefix_index=prefix_index, prefix_lens=prefix_lens, window=window,
                                      softcap=softcap, window_includes_prefix=window_includes_prefix,
                                      left_padding=left_padding)
    return tuple(g if g is not None else q.new_empty(0) for g in grads)


@prefix_attention_bwd.register_fake
def _prefix_attention_bwd_fake(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask,
                               prefix_index, prefix_lens, causal, scale, window, softcap, window_includes_prefix,
                               left_padding, needs):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) if need else q.new_empty(0)
                 for need, t in zip(needs, (q, k, v, prefix_k, prefix_v)))


def _setup_context(ctx, inputs, output):
    (q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, prefix_lens, causal, scale, window, softcap,
     window_includes_prefix, left_padding, sinks) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index, prefix_lens,
                          left_padding, sinks)
    ctx.options = dict(causal=causal, scale=scale, window=window, softcap=softcap,
                       window_includes_prefix=window_includes_prefix)
    ctx.set_materialize_grads(False)  # an unused lse (the usual case) must not cost a zero-filled gradient


def _backward(ctx, grad_out, grad_lse):
    q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index, prefix_lens, left_padding, sinks = \
        ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    no_grads = (None,) * 15
    if grad_out is None and grad_lse is None:
        return no_grads
    grad_sinks = _sinks_grad(grad_out, grad_lse, out, lse, sinks) if ctx.needs_input_grad[14] else None
    if not any(needs):
        return no_grads[:14] + (grad_sinks,)
    if grad_out is None:  # only the LSE was used
        grad_out = torch.zeros_like(out)
    o = ctx.options
    # (With sinks, out and lse are the sinks' already: the kernels' formulas hold unchanged, the sink being a key
    # whose value, and so whose every gradient but its own, is zero.)
    grads = torch.ops.prefix_kernels.prefix_attention_bwd(
        grad_out, grad_lse, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index, prefix_lens,
        o["causal"], o["scale"], o["window"], o["softcap"], o["window_includes_prefix"], left_padding, needs)
    return tuple(g if need else None for need, g in zip(needs, grads)) + no_grads[5:14] + (grad_sinks,)


def _sinks_grad(grad_out, grad_lse, out, lse, sinks):
    """d sinks[h] = sum over rows of p_sink * (d lse - rowsum(d out * out)), p_sink = exp(sink - lse) the sink's
    share of the row's weight (0 where lse = -inf: a row with no key and no sink)."""
    share = torch.where(lse == float("-inf"), torch.zeros_like(lse),
                        torch.exp(sinks.float().view(1, -1, 1) - lse))
    through_lse = grad_lse.float() if grad_lse is not None else torch.zeros_like(lse)
    through_out = (grad_out.float() * out.float()).sum(-1) if grad_out is not None else torch.zeros_like(lse)
    return (share * (through_lse - through_out)).sum((0, 2)).to(sinks.dtype)


# One backward (Triton) for both forwards: they share the out/lse contract.
for _forward in ("prefix_kernels::prefix_attention_fwd", "prefix_kernels::prefix_attention_fwd_cuda"):
    torch.library.register_autograd(_forward, _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "prefix_attention has no double backward: gradients taken with create_graph=True are right, but "
        "differentiating them again (a gradient penalty, a Hessian-vector product through the attention) is not "
        "supported")


# create_graph=True: the first gradients are right and carry this as their grad_fn, so that going through them
# again says what is missing (PyTorch's own message only said no autograd formula was registered for the op).
torch.library.register_autograd("prefix_kernels::prefix_attention_bwd", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


def differentiable(forward_op, call, sinks=None):
    """(out, lse) of a validated call (validation.PrefixAttentionCall) through one of the forward ops above;
    sinks only through the Triton one."""
    return forward_op(call.q, call.k, call.v, call.prefix_k, call.prefix_v, call.key_padding_mask,
                      call.prefix_index, call.prefix_lens, call.causal, call.scale, call.window, call.softcap,
                      call.window_includes_prefix, call.left_padding, sinks)


def triton_prefix_attention(call):
    """(out, lse) of a validated call through the differentiable Triton op, its attention sinks (call.sinks)
    included: the forward's epilogue takes them."""
    return differentiable(torch.ops.prefix_kernels.prefix_attention_fwd, call, call.sinks)

"""merge_attention_states: combine two partial attentions over disjoint key sets by their LSEs."""
from __future__ import annotations

import torch

from .reference import merge_attention_states_reference


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """(out, lse) of attention over the union of two disjoint key sets, from each part's (out, lse).

    out_* [..., S, D]; lse_* [..., S] float32, natural log, -inf where that part saw nothing (weight 0).
    A row where both parts are -inf gives zeros and -inf, never NaN. out_a and out_b share one floating dtype (the
    result's), lse_a and lse_b one floating dtype (float32 from the kernels; float64 for gradcheck), all one device.
    """
    _check_types(out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
    if out_a.dim() < 1:
        raise ValueError("out_a and out_b must be [..., S, D] tensors, got 0-d tensors")
    if out_a.shape != out_b.shape:
        raise ValueError(f"out_a and out_b must have one shape, got {tuple(out_a.shape)} and {tuple(out_b.shape)}")
    if lse_a.shape != out_a.shape[:-1] or lse_b.shape != out_a.shape[:-1]:
        raise ValueError(f"lse_a and lse_b must have shape out.shape[:-1] = {tuple(out_a.shape[:-1])}, got "
                         f"{tuple(lse_a.shape)} and {tuple(lse_b.shape)}")
    if _triton_serves(out_a, lse_a, out_b, lse_b):
        from .triton.decode import merge_attention_states_triton

        return merge_attention_states_triton(out_a, lse_a, out_b, lse_b)
    return merge_attention_states_reference(out_a, lse_a, out_b, lse_b)


def _check_types(**tensors) -> None:
    """TypeErrors naming the argument: no integer or mixed dtypes (the result would silently take out_a's), and no
    device mix (the kernel would read one device's pointer on another)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    out_a, lse_a, out_b, lse_b = tensors.values()
    if out_b.dtype != out_a.dtype:
        raise TypeError(f"out_b must have out_a's dtype {out_a.dtype}, got {out_b.dtype}")
    if lse_b.dtype != lse_a.dtype:
        raise TypeError(f"lse_b must have lse_a's dtype {lse_a.dtype}, got {lse_b.dtype}")
    for name, t in tensors.items():
        if t.device != out_a.device:
            raise ValueError(f"{name} is on {t.device}, out_a on {out_a.device}: all four must be on one device")


def _triton_serves(*tensors) -> bool:
    """The Triton merge runs on CUDA (or CPU under the interpreter), for fp16/bf16/fp32 outputs and fp32 LSEs, one
    device, no gradient (it has no backward: under autograd the reference composes instead), and outside
    torch.compile's tracing."""
    out_a, lse_a, out_b, lse_b = tensors
    if out_a.dtype not in (torch.float16, torch.bfloat16, torch.float32) or out_b.dtype != out_a.dtype:
        return False
    if lse_a.dtype != torch.float32 or lse_b.dtype != torch.float32:
        return False
    if any(t.device != out_a.device for t in tensors) or not 1 <= out_a.shape[-1] <= 256:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if torch.compiler.is_compiling():  # the reference's few ops trace (and fuse); the launcher reads data pointers
        return False
    try:
        from .triton import forward
    except ImportError:
        return False
    if out_a.device.type == "cuda":
        return torch.cuda.get_device_capability(out_a.device)[0] >= 8
    return out_a.device.type == "cpu" and forward.INTERPRETED


def apply_attention_sinks(out, lse, sinks):
    """(out, lse) with each head's attention sink added to the softmax: a merge with a key of score sinks[h] and
    value zero (gpt-oss). out [B, Hq, S, D], lse [B, Hq, S] float32 (-inf where a row saw nothing), sinks [Hq]:
    finite, or -inf for none.

    The sink takes exp(sink) / (exp(lse) + exp(sink)) of the weight, so out is scaled by sigmoid(lse - sink) and
    lse becomes logaddexp(lse, sink); a row that saw nothing stays zeros, with lse = the sink. Torch ops after the
    kernels (the CUDA ones; the Triton forward and decode take the sinks in their epilogue and merge): they
    differentiate through the kernels' (out, lse), the LSE's gradient being the backward's.
    """
    sink = sinks.to(lse.dtype).view(1, -1, 1).expand_as(lse)
    saw_nothing = lse == float("-inf")
    # A finite stand-in for such rows' lse: their results are chosen by where, and the branch not chosen must not
    # make a NaN (-inf - -inf) whose gradient, where's zero times NaN, would be NaN.
    seen_lse = torch.where(saw_nothing, torch.zeros_like(lse), lse)
    weight = torch.where(saw_nothing, torch.zeros_like(lse), torch.sigmoid(seen_lse - sink))
    return _ScaledRows.apply(out, weight), torch.where(saw_nothing, sink, torch.logaddexp(seen_lse, sink))


class _ScaledRows(torch.autograd.Function):
    """out * weight[..., None] computed in the wider dtype (float64 stays), saving out itself (the kernel's op keeps
    it anyway) rather than autograd's float32 copy of it: a [B, Hq, S, D] float32 per layer in training."""

    @staticmethod
    def forward(ctx, out, weight):
        ctx.save_for_backward(out, weight)
        compute = torch.promote_types(out.dtype, weight.dtype)
        return (out.to(compute) * weight.unsqueeze(-1)).to(out.dtype)

    @staticmethod
    def backward(ctx, grad):
        out, weight = ctx.saved_tensors
        compute = torch.promote_types(out.dtype, weight.dtype)
        grad = grad.to(compute)
        d_out = (grad * weight.unsqueeze(-1)).to(out.dtype) if ctx.needs_input_grad[0] else None
        d_weight = (grad * out.to(compute)).sum(-1).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return d_out, d_weight

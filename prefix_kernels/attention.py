"""prefix_attention: the public op (../shared/API.md). Validates, picks a backend, runs it."""
from __future__ import annotations

import contextlib

import torch

from .backends import choose_backend
from .cuda import cuda_decode_attention, cuda_prefix_attention
from .merge import apply_attention_sinks
from .reference import prefix_attention_reference
from .validation import validate


def prefix_attention(
    q, k, v, prefix_k, prefix_v, *, causal=True, scale=None, key_padding_mask=None, prefix_index=None,
    prefix_lens=None, window=None, softcap=None, return_lse=False, backend="auto", window_includes_prefix=False,
    left_padding=None, sinks=None,
):
    """Attention of q over [one shared prefix KV ; each sequence's own KV], without building the concat.

    q [B, Hq, S, D] (any strides); k, v [B, Hkv, L, D]; prefix_k, prefix_v [Hkv, P, D] or [N, Hkv, P, D]
    with prefix_index [B]. Query i sits at sequence position L - S + i; prefix keys are always visible up to
    prefix_lens (with a window and window_includes_prefix=True, prefix key p of a prefix of valid length P_n sits at
    position p - P_n and leaves the window like a sequence key: transformers' layout of a PEFT prefix in a
    sliding-window model; left_padding [B] int moves row b's prefix past its first left_padding[b] own keys, the
    left padding of a batch of prompt + tokens, which stands before the prompt; sinks [Hq] is each head's attention
    sink, gpt-oss's: one more logit in every row's softmax, with no value). Returns out [B, Hq, S, D] in q's
    dtype, and lse [B, Hq, S] float32 if return_lse. Under torch.autocast the floating inputs are first cast to the
    autocast dtype (as SDPA takes them), so out is in that.
    See ../shared/API.md for every argument.
    """
    inside = contextlib.nullcontext()
    device_type = getattr(getattr(q, "device", None), "type", None)
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        # As SDPA under autocast: the floating inputs in the autocast dtype, then the op as for those dtypes (the
        # reference's own matmuls must not be recast inside). In a mixed-precision model q and k come out of the
        # rotary embedding in float32 (its cos/sin are float32) while v stays in the autocast dtype: the dtype
        # check would refuse them otherwise (HF Trainer's bf16=True runs the model so).
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v, prefix_k, prefix_v = (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                                       for t in (q, k, v, prefix_k, prefix_v))
        inside = torch.autocast(device_type, enabled=False)
    with inside:
        return _prefix_attention(q, k, v, prefix_k, prefix_v, causal, scale, key_padding_mask, prefix_index,
                                 prefix_lens, window, softcap, return_lse, backend, window_includes_prefix,
                                 left_padding, sinks)


def _prefix_attention(q, k, v, prefix_k, prefix_v, causal, scale, key_padding_mask, prefix_index, prefix_lens,
                      window, softcap, return_lse, backend, window_includes_prefix, left_padding, sinks):
    call = validate(q, k, v, prefix_k, prefix_v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                    prefix_index=prefix_index, prefix_lens=prefix_lens, window=window, softcap=softcap,
                    backend=backend, window_includes_prefix=window_includes_prefix, left_padding=left_padding,
                    sinks=sinks)
    chosen = choose_backend(backend, call)
    if chosen == "torch":
        return prefix_attention_reference(call.q, call.k, call.v, call.prefix_k, call.prefix_v,
                                          return_lse=return_lse, sinks=call.sinks, **call.options())
    sinks_pending = call.sinks is not None
    if call.uses_decode:  # short queries, no gradient: prefix batched across sequences, split-K, LSE merge
        from .triton.decode import triton_decode_attention

        if chosen == "cuda":
            out, lse = cuda_decode_attention(call)
        elif sinks_pending and not (torch.is_grad_enabled() and call.sinks.requires_grad):
            out, lse = triton_decode_attention(call, sinks=call.sinks)  # its merge takes them: no launch more
            sinks_pending = False
        else:
            out, lse = triton_decode_attention(call)
    elif chosen == "cuda":  # differentiable: the CUDA forward, the Triton backward
        out, lse = cuda_prefix_attention(call)
    else:
        from .autograd import triton_prefix_attention  # differentiable: a custom op with a Triton backward

        out, lse = triton_prefix_attention(call)  # its epilogue takes the sinks, its autograd their gradient
        sinks_pending = False
    if sinks_pending:  # the CUDA kernels' (out, lse): the sink is a key of value zero, merged by its LSE
        out, lse = apply_attention_sinks(out, lse, call.sinks)
    return (out, lse) if return_lse else out

"""The naive reference: materialize the concatenation [prefix ; own keys] and run plain softmax attention.

This is the oracle every kernel is tested against, the "naive concat" baseline in benchmarks, and the CPU path.
It follows ../shared/API.md exactly; `mask_for` is the one place where visibility is written down, so the
semantics (bottom-right causal, window over sequence keys, prefix visible up to its length, and with
window_includes_prefix the window sliding over the prefix too, measured past each row's left_padding) live here
and nowhere else in Python.
"""
from __future__ import annotations

import math

import torch


def visibility_mask(
    batch: int,
    seq_q: int,
    seq_k: int,
    prefix_len: int,
    *,
    device: torch.device,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    prefix_index: torch.Tensor | None,
    prefix_lens: torch.Tensor | None,
    window: int | None,
    window_includes_prefix: bool = False,
    left_padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, 1, S, P + L] bool: True where query i of sequence b may attend to key column c.

    Columns 0..P-1 are prefix keys, P..P+L-1 the sequence's own keys. With window_includes_prefix, prefix key p of a
    prefix of valid length P_b sits at position p - P_b, just before the sequence's key 0 (where transformers puts
    a PEFT prefix: its cache positions 0..P-1 come before the tokens'), inside the window's reach. left_padding
    ([B], only then) moves row b's prefix just before its own key left_padding[b]: key p sits at position
    p - P_b + left_padding[b], as in a left-padded batch of prompt + tokens, where the padding comes first.
    """
    # Prefix part: key p is visible iff p < the length of the prefix this sequence uses.
    p_pos = torch.arange(prefix_len, device=device)
    if prefix_lens is not None:
        index = prefix_index if prefix_index is not None else torch.zeros(batch, dtype=torch.long, device=device)
        valid_len = prefix_lens.to(device=device, dtype=torch.long)[index.to(device=device, dtype=torch.long)]
    else:
        valid_len = torch.full((batch,), prefix_len, device=device, dtype=torch.long)
    prefix_visible = (p_pos[None, :] < valid_len[:, None])[:, None, :].expand(batch, seq_q, prefix_len)

    # Own part: query i sits at position L - S + i (bottom-right alignment).
    q_pos = torch.arange(seq_q, device=device) + (seq_k - seq_q)
    if window is not None and window_includes_prefix:
        key_pos = p_pos[None, :] - valid_len[:, None]  # [B, P]
        if left_padding is not None:
            key_pos = key_pos + left_padding.to(device=device, dtype=torch.long)[:, None]
        prefix_visible = prefix_visible & ((q_pos[None, :, None] - key_pos[:, None, :]) < window)
    k_pos = torch.arange(seq_k, device=device)
    own_visible = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
    if causal:
        own_visible &= k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        own_visible &= (q_pos[:, None] - k_pos[None, :]) < window
    own_visible = own_visible[None].expand(batch, seq_q, seq_k)
    if key_padding_mask is not None:
        own_visible = own_visible & key_padding_mask.to(device=device, dtype=torch.bool)[:, None, :]
    return torch.cat([prefix_visible, own_visible], dim=-1)[:, None]


def prefix_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    prefix_index: torch.Tensor | None = None,
    prefix_lens: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    upcast: bool = True,
    window_includes_prefix: bool = False,
    left_padding: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
):
    """Naive materialized-concat attention with the contract's semantics (see module docstring).

    sinks [Hq]: each head's attention sink (gpt-oss), one more logit in every row's softmax with no value: it takes
    its share of the weight (so lse includes it, and a row that sees no key gives zeros with lse = the sink).

    `upcast=True` computes in float32 (float64 stays float64): the oracle. `upcast=False` computes in the
    inputs' own dtype, which is what tests use to measure the reference's own low-precision error.
    Differentiable through plain autograd.
    """
    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k[None], prefix_v[None]
    prefix_len = prefix_k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    compute_dtype = torch.float32 if upcast and q.dtype in (torch.float16, torch.bfloat16) else q.dtype

    index = prefix_index if prefix_index is not None else torch.zeros(batch, dtype=torch.long, device=q.device)
    index = index.to(device=q.device, dtype=torch.long)
    # The naive part: B copies of the prefix, concatenated with each sequence's keys.
    keys = torch.cat([prefix_k[index], k], dim=2).to(compute_dtype)
    values = torch.cat([prefix_v[index], v], dim=2).to(compute_dtype)
    group = heads_q // heads_kv
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)

    scores = torch.matmul(q.to(compute_dtype), keys.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    visible = visibility_mask(
        batch, seq_q, seq_k, prefix_len, device=q.device, causal=causal, key_padding_mask=key_padding_mask,
        prefix_index=prefix_index, prefix_lens=prefix_lens, window=window,
        window_includes_prefix=window_includes_prefix, left_padding=left_padding,
    )
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:  # the sink as one more column of every row's scores, dropped after the softmax
        sink_column = sinks.to(compute_dtype).view(1, heads_q, 1, 1).expand(batch, heads_q, seq_q, 1)
        scores_and_sink = torch.cat([scores, sink_column], dim=-1)
        # A row of -inf only (no key, a -inf sink): logsumexp's backward there is NaN (exp(-inf - -inf)), which the
        # sink column would pass to the sinks; such rows take it over zeros and are set to -inf after.
        nothing = (scores_and_sink == float("-inf")).all(dim=-1)
        lse = torch.logsumexp(scores_and_sink.masked_fill(nothing[..., None], 0.0), dim=-1).masked_fill(
            nothing, float("-inf"))
    else:
        lse = torch.logsumexp(scores, dim=-1)  # -inf where a row sees nothing
    # Subtract a finite LSE so that fully masked rows give exp(-inf) = 0 rather than NaN.
    safe_lse = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe_lse[..., None])
    out = torch.matmul(probs, values).to(q.dtype)
    if return_lse:
        # float32 as the contract says; a float64 call (the test truth) keeps float64.
        return out, lse if lse.dtype == torch.float64 else lse.float()
    return out


def merge_attention_states_reference(out_a, lse_a, out_b, lse_b):
    """Combine two partial attentions over disjoint key sets: softmax-weighted by their LSEs.

    out_*: [..., S, D]; lse_*: [..., S] float32 natural log, -inf where that part saw nothing.
    Returns (out, lse) in out_a's dtype / float32; rows where both are -inf give zeros and -inf.
    """
    lse_dtype = torch.float64 if torch.float64 in (lse_a.dtype, out_a.dtype) else torch.float32
    lse_a, lse_b = lse_a.to(lse_dtype), lse_b.to(lse_dtype)
    # Weights relative to the larger LSE, divided by their sum (as the kernels merge): exact at any LSE magnitude
    # (exp(lse_a - logaddexp) in float32 lost 1e-3 at LSEs of 1e4), and finite everywhere where neither part saw
    # anything, so that the gradients there are 0, not NaN (logaddexp(-inf, -inf)'s backward is 0 * NaN). The
    # shift cancels out of both results, so it carries no gradient.
    top = torch.maximum(lse_a, lse_b)
    seen = top > float("-inf")
    shift = torch.where(seen, top, torch.zeros_like(top)).detach()
    weight_a, weight_b = torch.exp(lse_a - shift), torch.exp(lse_b - shift)
    total = torch.where(seen, weight_a + weight_b, torch.ones_like(top))  # >= 1 where seen
    out = (weight_a[..., None] * out_a.to(lse_dtype) + weight_b[..., None] * out_b.to(lse_dtype)) / total[..., None]
    lse = torch.where(seen, shift + torch.log(total), torch.full_like(top, float("-inf")))
    return out.to(out_a.dtype), lse

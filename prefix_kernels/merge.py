"""merge_attention_states: combine two partial attentions over disjoint key sets by their LSEs."""
from __future__ import annotations

from .reference import merge_attention_states_reference


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """(out, lse) of attention over the union of two disjoint key sets, from each part's (out, lse).

    out_* [..., S, D]; lse_* [..., S] float32, natural log, -inf where that part saw nothing (weight 0).
    A row where both parts are -inf gives zeros and -inf, never NaN.
    """
    if out_a.shape != out_b.shape:
        raise ValueError(f"out_a and out_b must have one shape, got {tuple(out_a.shape)} and {tuple(out_b.shape)}")
    if lse_a.shape != out_a.shape[:-1] or lse_b.shape != out_a.shape[:-1]:
        raise ValueError(f"lse_a and lse_b must have shape out.shape[:-1] = {tuple(out_a.shape[:-1])}, got "
                         f"{tuple(lse_a.shape)} and {tuple(lse_b.shape)}")
    return merge_attention_states_reference(out_a, lse_a, out_b, lse_b)

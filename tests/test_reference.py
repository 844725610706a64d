"""The reference (the oracle) against an independent float64 computation written row by row."""
import math

import pytest
import torch

from helpers import Case, make_inputs, max_error
from prefix_kernels import merge_attention_states
from prefix_kernels.merge import apply_attention_sinks
from prefix_kernels.reference import prefix_attention_reference


def row_by_row(q, k, v, prefix_k, prefix_v, *, causal, key_padding_mask=None, prefix_index=None,
               prefix_lens=None, window=None, softcap=None, scale=None, window_includes_prefix=False,
               left_padding=None, sinks=None):
    """Each query row's visible key list spelled out from API.md, in float64 Python loops. With
    window_includes_prefix, prefix key p sits at position p - (its prefix's length), just before own key 0; with
    left_padding too, the distances are those of the stock layout [padding, prefix, tokens]. A sink is one more
    score in the row's softmax, whose weight goes to no value."""
    q, k, v = q.double(), k.double(), v.double()
    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k[None], prefix_v[None]
    prefix_k, prefix_v = prefix_k.double(), prefix_v.double()
    B, Hq, S, D = q.shape
    Hkv, L, P = k.shape[1], k.shape[2], prefix_k.shape[2]
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, Hq, S, D, dtype=torch.float64)
    lse = torch.full((B, Hq, S), float("-inf"), dtype=torch.float64)
    for b in range(B):
        n = int(prefix_index[b]) if prefix_index is not None else 0
        valid_prefix = int(prefix_lens[n]) if prefix_lens is not None else P
        for h in range(Hq):
            g = h // (Hq // Hkv)
            for i in range(S):
                position = L - S + i
                keys, values = [], []
                for p in range(valid_prefix):
                    if left_padding is not None:  # columns of [left_padding[b] pads, the prefix, the tokens]
                        pad = int(left_padding[b])
                        query_column, key_column = pad + valid_prefix + (position - pad), pad + p
                    else:
                        query_column, key_column = valid_prefix + position, p
                    if window is not None and window_includes_prefix and query_column - key_column >= window:
                        continue
                    keys.append(prefix_k[n, g, p]); values.append(prefix_v[n, g, p])
                for j in range(L):
                    if causal and j > position:
                        continue
                    if window is not None and position - j >= window:
                        continue
                    if key_padding_mask is not None and not key_padding_mask[b, j]:
                        continue
                    keys.append(k[b, g, j]); values.append(v[b, g, j])
                sink = [] if sinks is None else [float(sinks[h])]
                if not keys:
                    lse[b, h, i] = sink[0] if sink else float("-inf")
                    continue
                scores = torch.stack(keys) @ q[b, h, i] * scale
                if softcap is not None:
                    scores = softcap * torch.tanh(scores / softcap)
                scores = torch.cat([scores, torch.tensor(sink, dtype=torch.float64)])
                weights = torch.softmax(scores, 0)[:len(keys)]
                out[b, h, i] = weights @ torch.stack(values)
                lse[b, h, i] = torch.logsumexp(scores, 0)
    return out, lse


REFERENCE_CASES = [
    Case(batch=2, heads_q=6, heads_kv=2, seq_q=5, seq_k=9, prefix_len=4, head_dim=16),
    Case(batch=3, heads_q=3, heads_kv=1, seq_q=4, seq_k=7, prefix_len=5, head_dim=16, num_prefixes=2,
         prefix_lens=(5, 2), padding="left"),
    Case(batch=2, heads_q=2, heads_kv=2, seq_q=6, seq_k=6, prefix_len=0, head_dim=16, padding="empty-row"),
    Case(batch=2, heads_q=2, heads_kv=1, seq_q=5, seq_k=8, prefix_len=3, head_dim=16, window=3, softcap=1.5),
    Case(batch=2, heads_q=2, heads_kv=1, seq_q=5, seq_k=8, prefix_len=3, head_dim=16, causal=False, window=2),
    Case(batch=1, heads_q=2, heads_kv=1, seq_q=6, seq_k=4, prefix_len=2, head_dim=16),  # S > L: early rows
    Case(batch=3, heads_q=3, heads_kv=1, seq_q=4, seq_k=7, prefix_len=5, head_dim=16, num_prefixes=2,
         prefix_lens=(5, 2), padding="left", window=8, window_includes_prefix=True),  # the window in the prefix
    Case(batch=1, heads_q=2, heads_kv=1, seq_q=6, seq_k=4, prefix_len=3, head_dim=16, causal=False, window=2,
         window_includes_prefix=True),
    Case(batch=3, heads_q=3, heads_kv=1, seq_q=4, seq_k=8, prefix_len=5, head_dim=16, num_prefixes=2,
         prefix_lens=(5, 2), padding="left", window=6, window_includes_prefix=True, left_padding=True),  # past pads
    Case(batch=3, heads_q=4, heads_kv=2, seq_q=4, seq_k=6, prefix_len=3, head_dim=16, num_prefixes=2,
         prefix_lens=(0, 3), padding="empty-row", softcap=1.5, sinks=True),  # sinks, rows that see only the sink
]


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda c: c.id)
def test_reference_matches_row_by_row_float64(case):
    q, k, v, prefix_k, prefix_v, options = make_inputs(case, torch.float64, "cpu")
    out, lse = prefix_attention_reference(q, k, v, prefix_k, prefix_v, return_lse=True, scale=0.3, **options)
    expected_out, expected_lse = row_by_row(q, k, v, prefix_k, prefix_v, scale=0.3, **options)
    assert max_error(out, expected_out) < 1e-12
    assert torch.equal(torch.isinf(lse), torch.isinf(expected_lse))
    assert max_error(lse, expected_lse) < 1e-12
    assert not torch.isnan(out).any()


def test_reference_gradcheck_float64():
    case = Case(batch=2, heads_q=2, heads_kv=1, seq_q=3, seq_k=4, prefix_len=2, head_dim=16, softcap=2.0,
                padding="left")
    q, k, v, prefix_k, prefix_v, options = make_inputs(case, torch.float64, "cpu", requires_grad=True)
    torch.autograd.gradcheck(
        lambda *t: prefix_attention_reference(*t, return_lse=True, **options), (q, k, v, prefix_k, prefix_v))


def test_merge_of_two_halves_equals_whole_attention():
    """Attention over prefix + own keys = merge(attention over prefix alone, attention over own keys alone)."""
    case = Case(batch=2, heads_q=3, heads_kv=1, seq_q=5, seq_k=7, prefix_len=6, head_dim=16, padding="empty-row")
    q, k, v, prefix_k, prefix_v, options = make_inputs(case, torch.float64, "cpu")
    whole = prefix_attention_reference(q, k, v, prefix_k, prefix_v, return_lse=True, **options)
    no_own = dict(options, key_padding_mask=torch.zeros(2, 7, dtype=torch.bool))
    prefix_part = prefix_attention_reference(q, k, v, prefix_k, prefix_v, return_lse=True, **no_own)
    empty = prefix_k[:, :0]
    own_part = prefix_attention_reference(q, k, v, empty, empty, return_lse=True, **options)
    out, lse = merge_attention_states(*prefix_part, *own_part)
    assert max_error(out, whole[0]) < 1e-12 and max_error(lse, whole[1]) < 1e-12


def test_merge_of_two_empty_parts_is_zero_not_nan():
    out = torch.randn(2, 3, 4)
    lse = torch.full((2, 3), float("-inf"))
    merged, merged_lse = merge_attention_states(out, lse, out, lse)
    assert (merged == 0).all() and torch.isinf(merged_lse).all()


def test_sinks_on_a_kernel_result_equal_the_sink_in_the_softmax_and_differentiate_without_nan():
    """apply_attention_sinks (what the kernel backends run on their (out, lse)) against the reference's sink column,
    in float64, with rows that see nothing and a head whose sink is -inf (no sink); then gradcheck through it,
    those rows included (a NaN gradient there would fail it)."""
    case = Case(batch=2, heads_q=3, heads_kv=1, seq_q=4, seq_k=5, prefix_len=0, head_dim=16, padding="empty-row")
    q, k, v, prefix_k, prefix_v, options = make_inputs(case, torch.float64, "cpu")
    sinks = torch.tensor([0.7, float("-inf"), 2.5], dtype=torch.float64)
    out, lse = prefix_attention_reference(q, k, v, prefix_k, prefix_v, return_lse=True, **options)
    assert torch.isinf(lse[0]).all()  # sequence 0 sees nothing
    want = prefix_attention_reference(q, k, v, prefix_k, prefix_v, return_lse=True, sinks=sinks, **options)
    got = apply_attention_sinks(out, lse, sinks)
    assert max_error(got[0], want[0]) < 1e-12 and max_error(got[1], want[1]) < 1e-12
    assert (got[0][0] == 0).all() and torch.equal(got[1][0, :, 0], sinks)  # nothing seen: zeros, lse = the sink
    out.requires_grad_(), lse.requires_grad_(), sinks.requires_grad_()

    def finite(out, lse, sinks):  # (the lse of a row that sees nothing and has no sink stays -inf: no derivative)
        out, lse = apply_attention_sinks(out, lse, sinks)
        return out, torch.nan_to_num(lse, neginf=0.0)

    torch.autograd.gradcheck(finite, (out, lse, sinks))
    # the reference's own gradient of the sinks: 0, not NaN, for a -inf sink over rows that see nothing (its
    # logsumexp over a row of -inf only has a NaN backward, which the sink column passed on; found in review)
    leaf = sinks.detach().requires_grad_()
    q.requires_grad_()
    prefix_attention_reference(q, k, v, prefix_k, prefix_v, sinks=leaf, **options).sum().backward()
    assert not torch.isnan(leaf.grad).any() and not torch.isnan(q.grad).any()


def test_sinks_after_a_kernel_save_no_float32_copy_of_a_16_bit_output():
    """Where the sinks are applied after the kernels (the CUDA ones), training keeps out itself (saved by the
    kernel's op anyway) and the [B, Hq, S] weight, not the float32 copy of out that a plain multiply would save
    (found in review: 2x out's bytes per layer)."""
    out = torch.randn(2, 3, 5, 16, dtype=torch.float16, requires_grad=True)
    lse = torch.randn(2, 3, 5, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got, _ = apply_attention_sinks(out, lse, torch.randn(3, dtype=torch.float16))
    got.float().sum().backward()
    assert not [t for t in saved if t.dtype == torch.float32 and t.numel() >= out.numel()], \
        [(t.dtype, tuple(t.shape)) for t in saved]
    assert out.grad is not None and lse.grad is not None


def test_merge_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="lse_a"):
        merge_attention_states(torch.zeros(2, 3, 4), torch.zeros(2, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3))


@pytest.mark.parametrize("bad, message", [
    (dict(out_b=torch.zeros(2, 3, 4, dtype=torch.float16)), "out_b must have out_a's dtype"),
    (dict(out_a=torch.zeros(2, 3, 4, dtype=torch.int64), out_b=torch.zeros(2, 3, 4, dtype=torch.int64)),
     "out_a must be a floating-point tensor"),
    (dict(lse_b=torch.zeros(2, 3, dtype=torch.int32)), "lse_b must be a floating-point tensor"),
    (dict(lse_b=torch.zeros(2, 3, dtype=torch.float64)), "lse_b must have lse_a's dtype"),
    (dict(out_a=torch.zeros(()), lse_a=torch.zeros(()), out_b=torch.zeros(()), lse_b=torch.zeros(())), "0-d"),
    (dict(lse_a=[0.0]), "lse_a must be a torch.Tensor"),
    (dict(lse_b=torch.zeros(2, 3, device="meta")), "lse_b is on meta"),
], ids=["mixed-out-dtypes", "integer-out", "integer-lse", "mixed-lse-dtypes", "0-d", "not-a-tensor", "two-devices"])
def test_merge_rejects_bad_types_naming_the_argument(bad, message):
    """Before this check, mixed or integer dtypes went to the reference, whose result silently took out_a's dtype,
    and 0-d tensors raised an IndexError."""
    args = dict(out_a=torch.zeros(2, 3, 4), lse_a=torch.zeros(2, 3),
                out_b=torch.zeros(2, 3, 4), lse_b=torch.zeros(2, 3))
    args.update(bad)
    error = ValueError if message in ("0-d", "lse_b is on meta") else TypeError
    with pytest.raises(error, match=message):
        merge_attention_states(**args)

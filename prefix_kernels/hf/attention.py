"""The attention function and mask function registered with transformers under the name "prefix_kernels".

A patched model hands every attention call here. The prefix comes from a *prefix source* that patch() puts on each
attention module (attribute `_prefix_kernels_source`). A prefix source is any object with

    prefix_length: int                                 # P, the positions the prefix occupies before the tokens
    layer_prefix(layer_idx) -> (prefix_k, prefix_v) | None
        # [Hkv, P, D] (or [N, Hkv, P, D] with prefix_index) at KV-head width; None = no prefix on this layer
    begin_forward() -> None                            # optional: called once at the start of each model forward
    prefix_index: Tensor | None                        # optional: [B] which of N prefixes each row uses
    prefix_lens: Tensor | None                         # optional: [N] each prefix's valid length (<= P); a row's
                                                       # tokens then start at its prefix's length, not at P

PrefixTuning, its export() and the PEFT bridge are prefix sources. So is the serving cache (hf/cache.py,
SharedPrefixCache): a cache passed to a patched model's forward that is a prefix source replaces the patch's source
for that forward (patch.py's positions hook sets it on the modules), and holds only the sequences' own tokens.

The mask function does not build a dense [B, 1, S, L] mask: it hands the attention function the 2-D padding mask
(True = a real token), cut to the last L keys, or None when there is no padding. Causality, the sliding window and
the prefix's visibility are the kernel's.
"""
from __future__ import annotations

import weakref

import torch

from ..attention import prefix_attention
from ..validation import check_index_values, is_trusted, trust_index_values, values_checkable

NAME = "prefix_kernels"
SOURCE_ATTR = "_prefix_kernels_source"
BACKEND_ATTR = "_prefix_kernels_backend"
WINDOW_ATTR = "_prefix_kernels_window"  # a layer's window where the model keeps it in its mask only (patch.py)


def padding_mask_function(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                          attention_mask=None, **kwargs):
    """AttentionMaskInterface entry: the [B, kv_length] bool padding mask (True = real key), or None.

    A static cache's layer (q_offset is then a tensor, StaticLayer's count of written tokens) holds positions from
    slot 0 (hf/cache.py's _OwnStaticLayer): its decode step (one query, nothing synced) attends to the whole buffer of
    kv_length slots, those not written yet being no keys; a step of several queries gets the written keys only, so
    its mask is the mask's first columns.
    """
    if isinstance(q_offset, torch.Tensor):
        if q_length == 1:
            written = torch.arange(kv_length, device=q_offset.device) <= q_offset  # the slot being written included
            if attention_mask is not None:
                attention_mask = attention_mask[:, :kv_length].to(device=written.device, dtype=torch.bool)
                written = written & torch.nn.functional.pad(attention_mask, (0, kv_length - attention_mask.shape[1]))
            return written.expand(batch_size, kv_length)
        if attention_mask is not None:
            return attention_mask[:, :int(q_offset) + q_length].to(torch.bool)
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:].to(torch.bool)


def _padding_mask(attention_mask, batch, length):
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"the prefix_kernels attention takes a 2-D padding mask [B, L] (True = real token), got "
                         f"{shape}; custom 4-D masks are not supported by the patched model")
    if attention_mask.shape[1] < length:
        raise ValueError(f"the padding mask covers {attention_mask.shape[1]} keys but the layer has {length}; "
                         "only caches that hold every past token (DynamicCache) are supported")
    return attention_mask[:, -length:].to(torch.bool)


def rows_prefix_index(source, batch):
    """The source's prefix_index for a forward of `batch` rows, or None.

    A serving cache's index of B0 rows also serves k * B0 rows as generate() expands a batch for beam search or
    num_return_sequences (each row repeated k times in place, its beams staying in its group when reordered). Other
    sources need one entry per row (validation.py says so otherwise)."""
    from transformers import Cache

    index = getattr(source, "prefix_index", None)
    lens = getattr(source, "prefix_lens", None)
    if index is None:
        if lens is not None and lens.shape[0] > 1:
            raise ValueError(f"the prefix source holds {lens.shape[0]} prefixes but no prefix_index says which one "
                             "each row continues (SharedPrefixCache.from_prompts(..., prefix_index=...) or "
                             "cache.reset(prefix_index=...))")
        return None
    if index.dim() != 1:
        raise ValueError(f"the prefix source's prefix_index must be 1-D, [B], got shape {tuple(index.shape)}")
    rows = index.shape[0]
    if rows == batch or not isinstance(source, Cache):
        return index
    if not rows or batch % rows:
        raise ValueError(f"prefix_index has {rows} rows but the forward has {batch}: it must have one per row (or "
                         "per row before generate() repeats each row for beams or num_return_sequences)")
    expanded = index.repeat_interleave(batch // rows)
    if lens is not None and is_trusted("prefix_index", index, 0, lens.shape[0] - 1):
        # the cache's index, read once per forward (its begin_forward): the copies hold its values
        trust_index_values("prefix_index", expanded, 0, lens.shape[0] - 1)
    return expanded


def row_prefix_lengths(source, batch):
    """The positions the prefix occupies before each row's tokens: the int P, or a [B, 1] tensor of each row's
    prefix length where the source's prefixes have lengths of their own (prefix_lens)."""
    lens = getattr(source, "prefix_lens", None)
    if lens is None:
        return int(source.prefix_length)
    index = rows_prefix_index(source, batch)
    if index is None:
        return lens.expand(batch)[:, None]
    # read before indexing with it (free for a serving cache's index, read once per forward by the cache)
    check_index_values("prefix_index", index, lens.shape[0] - 1, f"N = {lens.shape[0]} prefixes")
    return lens[index][:, None]


def _prefix_window(source, prefix_len, seq_q, length, window, attention_mask, key_padding_mask) -> dict:
    """The kernels' options for a sliding-window layer whose window reaches into the prefix: {} when every prefix
    key is within every query's reach (P + L <= window), else window_includes_prefix and, for a serving cache, each
    row's left padding.

    transformers (the naive path, PEFT) puts a learned prefix at cache positions 0..P-1, before the tokens' and
    their left padding, inside the window's reach: the kernels' option places it so. A sliding-window cache layer
    keeps the last window - 1 tokens only: once it dropped any, the call's first query sits at index window - 1 of
    the keys it hands over, and the prefix is out of every query's reach there as well.
    A serving cache (a Cache that is the source: patch.py's serves_prefix) stands for the stock model run on
    [left padding, prompt, suffix] per row, where the padding comes before the prompt: its left padding (the own
    keys before each row's first real one) is passed so that the window measures from there, and a row's tokens do
    not depend on how much the batch padded it. Its layers keep every own key (no sliding layers), so the leading
    padding of the mask is the row's."""
    from transformers import Cache

    if window is None or prefix_len == 0 or prefix_len + length <= window:
        return {}
    options = {"window_includes_prefix": True}
    if isinstance(source, Cache) and key_padding_mask is not None:
        # A static cache's decode step sees its whole buffer, the query placed at the buffer's end (hf/cache.py's
        # _OwnStaticLayer): the kernels measure the prefix's window from there, so the prefix moves right by the
        # slots not written yet (the mask's trailing False; the query's own slot is a real token). Its own keys
        # are all within the window: the cache holds no more than the window (StaticSharedPrefixCache's check).
        unwritten = seq_q == 1 and getattr(source, "decode_sees_whole_buffer", False)
        options["left_padding"] = _left_padding(attention_mask, key_padding_mask, unwritten)
    return options


_LEFT_PADDING = {}   # "last": (weak reference to a forward's mask, its version counter, [B, L], left padding)


def _left_padding(attention_mask, key_padding_mask, unwritten):
    """Each row's keys before its first real one (plus, where `unwritten`, its keys after its last one), computed
    once per forward (every layer of a forward gets the same mask object from the mask function) where the version
    counter tells an in-place write (not for inference tensors: made per layer then), and trusted by the range check
    (validation.py): a count of the keys needs no host read to tell it is in range."""
    def count():
        padding = (~key_padding_mask).long()
        leading = padding.cumprod(dim=-1).sum(dim=-1)
        if not unwritten:
            return leading
        # (a row with no real key at all would count its keys twice: it has no prefix position to keep anyway)
        return (leading + padding.flip(-1).cumprod(dim=-1).sum(dim=-1)).clamp(max=key_padding_mask.shape[1])

    if not values_checkable(key_padding_mask):
        return count()
    entry = _LEFT_PADDING.get("last")
    if entry is not None and entry[0]() is attention_mask and not attention_mask.is_inference() and \
            entry[1] == attention_mask._version and entry[2] == key_padding_mask.shape:
        return entry[3]
    padding = count()
    trust_index_values("left_padding", padding, 0, key_padding_mask.shape[1])   # a count of its keys
    if not attention_mask.is_inference():
        _LEFT_PADDING["last"] = (weakref.ref(attention_mask), attention_mask._version, key_padding_mask.shape,
                                 padding)
    return padding


def prefix_kernels_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface entry: query [B, H, S, D], key/value [B, Hkv, L, D] -> (out [B, S, H, D], None)."""
    if dropout and module.training:
        raise ValueError(f"the prefix_kernels attention has no attention dropout, but this model uses "
                         f"{dropout} in training; set the model config's attention dropout to 0.0 "
                         "(e.g. attn_pdrop / attention_dropout)")
    source = getattr(module, SOURCE_ATTR, None)
    prefix = source.layer_prefix(module.layer_idx) if source is not None else None
    batch, heads_kv, length, head_dim = key.shape
    if prefix is None:
        empty = key.new_empty(heads_kv, 0, head_dim)
        prefix_k = prefix_v = empty
    else:
        prefix_k, prefix_v = (t.to(query.dtype) for t in prefix)
    options = {}
    if prefix is not None:
        prefix_index = rows_prefix_index(source, batch)
        if prefix_index is not None:
            options["prefix_index"] = prefix_index
        if getattr(source, "prefix_lens", None) is not None:
            options["prefix_lens"] = source.prefix_lens
    window = kwargs.get("sliding_window")
    if window is None:
        window = module.__dict__.get(WINDOW_ATTR)
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    if window is not None and not causal:
        # transformers' bidirectional sliding layers (EmbeddingGemma) see |i - j| < window; the kernels' window is
        # one-sided (i - j < window), so a non-causal call would see the far future keys.
        raise ValueError(f"a bidirectional sliding-window layer (window {int(window)}, not causal: e.g. "
                         "use_bidirectional_attention) is not supported by the prefix_kernels attention: its window "
                         "is two-sided, the kernels' one-sided")
    key_padding_mask = _padding_mask(attention_mask, batch, length)
    options.update(_prefix_window(source, prefix_k.shape[-2], query.shape[2], length, window, attention_mask,
                                  key_padding_mask))
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux")  # a learned attention sink per query head (gpt-oss, flint, granite_swa)
    out = prefix_attention(
        query, key, value, prefix_k, prefix_v,
        causal=causal,
        scale=scaling,
        key_padding_mask=key_padding_mask,
        window=int(window) if window is not None else None,
        softcap=float(softcap) if softcap is not None else None,
        backend=getattr(module, BACKEND_ATTR, "auto"),
        sinks=sinks,
        **options,
    )
    return out.transpose(1, 2), None


def register() -> str:
    """Register both functions with transformers (idempotent); returns the implementation name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, prefix_kernels_attention)
    AttentionMaskInterface.register(NAME, padding_mask_function)
    return NAME

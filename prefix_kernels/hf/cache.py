"""SharedPrefixCache: serve many sequences that continue one prompt (or one learned prefix), its KV stored once.

    cache = SharedPrefixCache.from_prompt(model, prompt_ids)        # the prompt's KV, computed once at batch 1
    out = model.generate(input_ids=suffixes, attention_mask=mask, past_key_values=cache, max_new_tokens=...)
    # (transformers >= 5.2x spells it cache=, and warns on past_key_values=; prefix_kernels.hf.compat.cache_kwargs
    # gives the name the installed version takes)

The cache is a transformers DynamicCache whose layers hold only each sequence's OWN tokens (its suffix and what it
generates), and a prefix source (hf/attention.py) that serves the shared K/V, [Hkv, P, D] per layer, to the kernels.
Because the cache reports only the own tokens as its length, generate() derives cache positions, position_ids
(from the 2-D padding mask, counted from 0) and mask sizes over the own tokens alone; the patch's positions hook
shifts the positions by P (the prefix length), so row b's real tokens sit at P, P+1, ... as they would after the
prompt in the stock model, whatever its left padding. The registered mask function passes the padding mask of the
own keys to the kernel; the prefix is visible to every query, or, past a sliding window, to those within the window
as measured in the stock layout [left padding, prompt, suffix] (hf/attention.py's _prefix_window).

The model must be patched (prefix_kernels.patch) for the kernels to see the prefix: from_prompt/from_prefix patch an
unpatched model with an empty prefix (the stock model, through the kernels; prefix_kernels.unpatch undoes it), and a
cache passed to the patched model's forward takes the place of the patch's prefix for that forward. On a model that
is already patched with a learned prefix, from_prompt's prompt attends to that prefix and the cache serves both
(learned prefix, then prompt), as the patched model would continue them.

from_prompts(model, [prompt_a, prompt_b, ...], prefix_index=[B]) serves rows that continue different prompts in one
batch: the prompts, padded to the longest, are the kernels' multiple prefixes (prefix_lens, prefix_index), and each
row's positions start after its own prompt (hf/attention.py's row_prefix_lengths). from_prefixes does the same for
several learned prefixes.

StaticSharedPrefixCache is the same with the own tokens in preallocated buffers (transformers' StaticLayer), so
that generate() compiles its decode step (CUDA graphs on a GPU); its layers and the mask function agree on what a
step sees (see _OwnStaticLayer).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, StaticLayer

from ..validation import INDEX_DTYPES, check_and_trust_index_values, check_index_values
from .compat import cache_kwargs, output_cache
from .patch import _STATE_ATTR, family_of, kv_geometry, patch


class _NoPrefix:
    """The empty prefix source: what from_prompt patches an unpatched model with (the stock model's behaviour)."""

    prefix_length = 0

    def layer_prefix(self, layer_idx):
        return None


def _sliding_window(model):
    """The sliding window of the model's attention layers, or None when none of them slides."""
    family = family_of(model)
    window = getattr(model.config, family.window, None) if family.window else None
    types = getattr(model.config, "layer_types", None)
    if window is None or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def _ensure_patched(model, backend):
    """The prefix source the model is patched with, patching it with the empty prefix if it is not."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        patch(model, _NoPrefix(), backend=backend)
        return None
    return state.source


def _check_model(model):
    try:
        from peft import PeftModel
    except ImportError:
        PeftModel = ()
    if isinstance(model, PeftModel):
        raise ValueError("SharedPrefixCache serves a transformers model, not a PeftModel: build it on the base model "
                         "(peft_model.get_base_model()), with from_prefix(base, prefix) for a learned prefix")
    family_of(model)  # a clear error for families the kernels cannot serve


def _prompt_kv(model, prompt_ids):
    """Each layer's K/V of `prompt_ids` ([P] or [1, P]) after the model's patched prefix, if any: [Hkv, P', D]."""
    try:
        ids = torch.as_tensor(prompt_ids, device=next(model.parameters()).device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"a prompt must be token ids (a list or an int tensor), got {prompt_ids!r}: {error}") from None
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"a prompt must be int token ids, got {ids.dtype}")
    ids = ids.long()
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be one non-empty sequence, [P] or [1, P], got shape {tuple(ids.shape)}")
    state = getattr(model, _STATE_ATTR, None)
    source = state.source if state is not None else None
    if getattr(source, "prefix_index", None) is not None:
        raise ValueError("the model is patched with several prefixes (prefix_index); a shared prompt cache "
                         "continues one: patch it with one prefix")
    layers = kv_geometry(model)[0]
    with torch.no_grad():
        # A plain cache, so that a patched model attends to its own prefix source.
        out = model(input_ids=ids, use_cache=True, **cache_kwargs(model, DynamicCache()))
        prompt = output_cache(out)
        keys, values = [], []
        for layer in range(layers):
            k, v = prompt.layers[layer].keys[0], prompt.layers[layer].values[0]
            learned = source.layer_prefix(layer) if source is not None else None
            if learned is None and source is not None and int(source.prefix_length):
                raise ValueError(f"the model's patched prefix has no K/V on layer {layer}; a prompt cache "
                                 "over it would misplace positions on that layer")
            if learned is not None:
                k = torch.cat([learned[0].detach().to(k.dtype), k], dim=1)
                v = torch.cat([learned[1].detach().to(v.dtype), v], dim=1)
            keys.append(k.contiguous())
            values.append(v.contiguous())
    return keys, values


def _index_tensor(name, values, device):
    """`values` (a tensor, or a list of ints) as an int tensor on `device`, or a TypeError naming `name`."""
    try:
        tensor = torch.as_tensor(values, device=device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{name} must be ints (a list or an int tensor), got {values!r}: {error}") from None
    if tensor.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must hold int32 or int64 values, got {tensor.dtype}")
    return tensor


def _stacked_prompts(per_prompt):
    """[(keys, values)] per prompt, each a list of [Hkv, P_n, D] per layer -> (keys, values) per layer as
    [N, Hkv, max P_n, D] (zeros past each prompt's length) and the lengths [N]."""
    lengths = [keys[0].shape[1] for keys, _ in per_prompt]
    width = max(lengths)

    def stack(tensors):
        return torch.stack([torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1])) for t in tensors])

    layers = range(len(per_prompt[0][0]))
    keys = [stack([keys[layer] for keys, _ in per_prompt]) for layer in layers]
    values = [stack([values[layer] for _, values in per_prompt]) for layer in layers]
    return keys, values, torch.tensor(lengths, device=keys[0].device)


class _SharedPrefix:
    """What both caches share: one prefix K/V per layer (the prefix source interface) and the constructors.

    One prompt: [Hkv, P, D] per layer. Several (from_prompts): [N, Hkv, max P_n, D] per layer with prefix_lens [N],
    and prefix_index [B] saying which one each row continues (the kernels' multiple prefixes)."""

    def _init_prefix(self, prefix_k, prefix_v, window, prefix_lens, prefix_index):
        if len(prefix_k) != len(prefix_v):
            raise ValueError(f"{len(prefix_k)} prefix key tensors but {len(prefix_v)} value tensors")
        rank = 3 if prefix_lens is None else 4
        well_formed = all(k.dim() == rank and k.shape == v.shape for k, v in zip(prefix_k, prefix_v))
        if not prefix_k or not well_formed or len({k.shape[-2] for k in prefix_k}) != 1:
            layout = "[Hkv, P, D]" if prefix_lens is None else "[N, Hkv, P, D] (with prefix_lens)"
            raise ValueError(f"every layer's prefix K and V must be {layout} with the same P: got " +
                             ", ".join(f"{tuple(k.shape)}/{tuple(v.shape)}" for k, v in zip(prefix_k, prefix_v)))
        self.prefix_k, self.prefix_v = list(prefix_k), list(prefix_v)
        self.prefix_length = int(prefix_k[0].shape[-2])
        self.window = window
        self.prefix_lens = None
        self._prefix_index = None
        if prefix_lens is not None:
            count = prefix_k[0].shape[0]
            prefix_lens = _index_tensor("prefix_lens", prefix_lens, prefix_k[0].device)
            if prefix_lens.shape != (count,):
                raise ValueError(f"prefix_lens must have one length per prompt, [{count}], got shape "
                                 f"{tuple(prefix_lens.shape)}")
            check_index_values("prefix_lens", prefix_lens, self.prefix_length, "the longest prompt", lower=1)
            self.prefix_lens = prefix_lens.clone()   # the cache's own, not the caller's to write
            if prefix_index is not None:
                self._set_prefix_index(prefix_index)
        elif prefix_index is not None:
            raise ValueError("prefix_index chooses among several prompts: this cache holds one")

    @property
    def prefix_index(self):
        """[B] ints, which prompt each row continues (several prompts only), or None. Set it through reset(
        prefix_index=...) or by assignment: either checks it and keeps the cache's own copy."""
        return self._prefix_index

    @prefix_index.setter
    def prefix_index(self, prefix_index):
        self._set_prefix_index(prefix_index)

    def _checked_index(self, prefix_index):
        if self.prefix_lens is None:
            raise ValueError("prefix_index chooses among several prompts (from_prompts): this cache holds one")
        index = _index_tensor("prefix_index", prefix_index, self.prefix_lens.device)
        if index.dim() != 1:
            raise ValueError(f"prefix_index must be 1-D, [B]: the prompt each row continues, got shape "
                             f"{tuple(index.shape)}")
        count = self.prefix_lens.shape[0]
        check_index_values("prefix_index", index, count - 1, f"N = {count} prompts")
        return index

    def _set_prefix_index(self, prefix_index):
        self._prefix_index = self._checked_index(prefix_index).clone()   # the cache's own (see prefix_lens)

    def begin_forward(self):
        """Called by the patch once per model forward (the prefix source interface): the index and the lengths are
        read once here (a host sync each, not one per layer; none in a compiled step) and trusted by the layers'
        range checks for the forward. Read every forward: a write to them through .data or numpy would not show
        in their version counters."""
        if self.prefix_lens is not None:
            check_and_trust_index_values("prefix_lens", self.prefix_lens, self.prefix_length, "the longest prompt",
                                         lower=1)
        if self._prefix_index is not None:
            count = self.prefix_lens.shape[0]
            check_and_trust_index_values("prefix_index", self._prefix_index, count - 1, f"N = {count} prompts")

    # ---- the prefix source interface (hf/attention.py) ----
    def layer_prefix(self, layer_idx):
        return self.prefix_k[layer_idx], self.prefix_v[layer_idx]

    # ---- constructors ----
    @classmethod
    def from_prompt(cls, model, prompt_ids, *, backend="auto", **options):
        """Run `model` once on `prompt_ids` ([P] or [1, P]) and keep each layer's prompt K/V, once.

        model: a supported transformers model, stock or patched (prefix_kernels.patch); an unpatched model is
        patched with an empty prefix (backend is passed to patch() then).
        options: the cache's own (StaticSharedPrefixCache: max_cache_len).
        """
        _check_model(model)
        keys, values = _prompt_kv(model, prompt_ids)
        _ensure_patched(model, backend)
        return cls(keys, values, window=_sliding_window(model), **options)

    @classmethod
    def from_prompts(cls, model, prompts, *, prefix_index=None, backend="auto", **options):
        """Several prompts in one cache, each run once at batch 1 and stored once: a batch mixes rows that continue
        different prompts (multi-tenant system prompts), read by the kernels as multiple prefixes.

        prompts: a list of token id sequences ([P_n] or [1, P_n]), of any lengths.
        prefix_index: [B] ints, which prompt each row continues (or set it later: cache.reset(prefix_index=...)).
        """
        _check_model(model)
        if isinstance(prompts, torch.Tensor) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise TypeError(f"prompts must be a non-empty list of token id sequences, got {type(prompts).__name__}")
        keys, values, lengths = _stacked_prompts([_prompt_kv(model, prompt) for prompt in prompts])
        _ensure_patched(model, backend)
        return cls(keys, values, window=_sliding_window(model), prefix_lens=lengths, prefix_index=prefix_index,
                   **options)

    @classmethod
    def from_prefix(cls, model, prefix, *, backend="auto", **options):
        """Serve a learned prefix: any prefix source (PrefixTuning, PrefixTuning.export(), ...), copied detached.

        The sequences continue the prefix alone (the model's own patched prefix, if any, is not added).
        """
        _check_model(model)
        keys, values = _learned_kv(model, prefix)
        _ensure_patched(model, backend)
        return cls(keys, values, window=_sliding_window(model), **options)

    @classmethod
    def from_prefixes(cls, model, prefixes, *, prefix_index=None, backend="auto", **options):
        """Several learned prefixes in one cache (say, one per task, of any lengths): a batch mixes rows that
        continue different ones, as from_prompts does for prompts. prefix_index: [B] ints, which one each row
        continues (or later: cache.reset(prefix_index=...))."""
        _check_model(model)
        if not isinstance(prefixes, (list, tuple)) or not prefixes:
            raise TypeError(f"prefixes must be a non-empty list of prefix sources, got {type(prefixes).__name__}")
        keys, values, lengths = _stacked_prompts([_learned_kv(model, prefix) for prefix in prefixes])
        _ensure_patched(model, backend)
        return cls(keys, values, window=_sliding_window(model), prefix_lens=lengths, prefix_index=prefix_index,
                   **options)


def _learned_kv(model, prefix):
    """Each layer's K/V of a prefix source with one prefix, detached, in the model's dtype: [Hkv, P, D]."""
    if not hasattr(prefix, "layer_prefix") or not hasattr(prefix, "prefix_length"):
        raise TypeError(f"prefix must be a prefix source (with prefix_length and layer_prefix(layer_idx)), "
                        f"got {type(prefix).__name__}")
    if getattr(prefix, "prefix_index", None) is not None:
        raise ValueError("a prefix source with several prefixes (prefix_index) cannot be served as one; pass them "
                         "one by one to from_prefixes")
    layers, heads_kv, head_dim = kv_geometry(model)
    parameter = next(model.parameters())
    with torch.no_grad():
        if hasattr(prefix, "begin_forward"):
            prefix.begin_forward()
        keys, values = [], []
        for layer in range(layers):
            pair = prefix.layer_prefix(layer)
            if pair is None:
                raise ValueError(f"the prefix has no K/V on layer {layer}")
            k, v = (t.detach().to(device=parameter.device, dtype=parameter.dtype).contiguous() for t in pair)
            if k.shape != (heads_kv, int(prefix.prefix_length), head_dim):
                raise ValueError(f"layer {layer}: prefix K/V of shape {tuple(k.shape)}, expected "
                                 f"{(heads_kv, int(prefix.prefix_length), head_dim)}")
            keys.append(k)
            values.append(v)
    return keys, values


class SharedPrefixCache(_SharedPrefix, DynamicCache):
    """A DynamicCache of each sequence's own tokens plus one shared prefix K/V per layer (a prefix source).

    prefix_k, prefix_v: one [Hkv, P, D] tensor per layer (as the model's cache holds them, after RoPE), or, for
    several prompts, one [N, Hkv, P, D] per layer with prefix_lens [N] (their lengths) and prefix_index [B].
    window: the model's sliding window, if its layers slide (StaticSharedPrefixCache's max_cache_len limit; this serves
    sequences past it, the window sliding over the prompt as in the stock model).
    After a generate() the own part holds that batch's tokens: call reset() (the prefix stays) before reusing it.
    StaticSharedPrefixCache is the same with preallocated own tokens, for compiled (CUDA-graph) decoding.
    """

    def __init__(self, prefix_k, prefix_v, *, window=None, prefix_lens=None, prefix_index=None):
        DynamicCache.__init__(self)
        self._init_prefix(prefix_k, prefix_v, window, prefix_lens, prefix_index)

    # ---- the cache: own tokens only (DynamicCache.update) ----
    def reset(self, *, prefix_index=None):
        """Drop the sequences' own tokens (the prefix stays), so that the cache serves another batch; prefix_index
        ([B] ints, several prompts only) says which prompt each row of that batch continues.

        Not DynamicCache.reset(): on transformers 5.17 that zeroes the layers' tensors but keeps their length, and
        the next generate() would continue after that many zero keys; 5.2x drops them, as this does on both.
        """
        if prefix_index is not None:
            self._set_prefix_index(prefix_index)
        for layer in self.layers:
            layer.keys = layer.values = None
            layer.is_initialized = False   # the next update() initializes the layer afresh
            if isinstance(getattr(layer, "cumulative_length", None), int):
                layer.cumulative_length = 0


class _OwnStaticLayer(StaticLayer):
    """A StaticLayer of the sequences' own tokens: [B, Hkv, max_cache_len, D], allocated once, written in place.

    What update() returns follows the kernels' causal alignment (the last query sees the last key). One new token
    on an initialized layer (a decode step: what generate() compiles) gets the whole buffer, at a fixed address and
    shape; the slots not written yet are hidden by the mask (hf/attention.py's padding_mask_function, which knows
    the layer is static from its tensor count). Anything else (the prefill, which generate() runs eagerly, even of
    one token: before initialization the count is still the int 0) gets exactly the keys written so far, a host
    sync that only those steps pay; compiled (generate's prefill_chunk_size), that sync is traced as a
    data-dependent size.
    """

    def update(self, key_states, value_states, *args, **kwargs):
        new = key_states.shape[-2]
        if new == 1 and self.is_initialized:
            return super().update(key_states, value_states, *args, **kwargs)
        # (its room and batch size were checked by the patch's hook: check_room)
        written = int(self.cumulative_length) + new if self.is_initialized else new
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        return keys[:, :, :written], values[:, :, :written]


class StaticSharedPrefixCache(_SharedPrefix, Cache):
    """SharedPrefixCache with the own tokens preallocated (max_cache_len per row): generate() compiles its decode
    step with this cache (transformers' automatic compilation of compileable caches on GPUs: torch.compile,
    mode "reduce-overhead", i.e. CUDA graphs), which removes the per-layer host time of an eager decode step.

        cache = StaticSharedPrefixCache.from_prompt(model, prompt_ids, max_cache_len=suffix_width + max_new_tokens)

    The buffers take their batch size from the first batch: reset() between batches of that size.
    """

    decode_sees_whole_buffer = True   # (hf/attention.py: where its decode step measures a sliding window from)

    def __init__(self, prefix_k, prefix_v, *, max_cache_len, window=None, prefix_lens=None, prefix_index=None):
        if not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be a positive int (own tokens per row), got {max_cache_len!r}")
        self._init_prefix(prefix_k, prefix_v, window, prefix_lens, prefix_index)
        if window is not None and max_cache_len > window:
            # Its decode step attends to the whole buffer, the query placed at its end (_OwnStaticLayer): the
            # kernels' window measures from there. The attention moves the prefix by the slots not written yet
            # (hf/attention.py's _prefix_window), but the own keys cannot move: they must all be within reach.
            raise ValueError(f"max_cache_len ({max_cache_len}) exceeds the model's sliding window ({int(window)}): "
                             "a StaticSharedPrefixCache serves sequences whose own tokens fit the window (the prompt "
                             "may pass it; SharedPrefixCache serves any length)")
        Cache.__init__(self, layers=[_OwnStaticLayer(max_cache_len=max_cache_len) for _ in self.prefix_k])
        if not torch.compiler.is_compiling():
            # Fixed addresses: the compiled step reads the prefix in place. Unmarked, CUDA-graph replays would copy
            # every layer's prefix into the graph's own inputs on every step.
            lengths = [self.prefix_lens] if self.prefix_lens is not None else []  # (the index: _set_prefix_index)
            for t in self.prefix_k + self.prefix_v + lengths:
                torch._dynamo.mark_static_address(t)

    def _set_prefix_index(self, prefix_index):
        index = self._checked_index(prefix_index)
        if self._prefix_index is not None and self._prefix_index.shape == index.shape:
            self._prefix_index.copy_(index)  # in place: the compiled step reads it at its address
        else:
            self._prefix_index = index.clone()
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(self._prefix_index)

    def reset(self, *, prefix_index=None):
        """Forget the own tokens (the prefix stays); the buffers keep their address for the compiled step.
        prefix_index ([B] ints, several prompts only): which prompt each row of the next batch continues."""
        if prefix_index is not None:
            self._set_prefix_index(prefix_index)
        for layer in self.layers:
            if layer.is_initialized:
                layer.cumulative_length.zero_()

    def check_room(self, held, new, batch):
        """Called by the patch before each eager forward (not in a compiled step, where an overflow is a
        device-side assert): `new` tokens after `held` must fit the buffers, `batch` rows their batch size."""
        first = self.layers[0]
        if first.is_initialized and batch != first.batch_size:
            raise ValueError(f"this StaticSharedPrefixCache holds batches of {first.batch_size} rows, got {batch}: "
                             "build one cache per batch size")
        room = first.max_cache_len
        if held + new > room:
            raise ValueError(f"the sequences' own tokens ({held} + {new}) exceed the StaticSharedPrefixCache's "
                             f"max_cache_len ({room}): size it for the suffix width plus max_new_tokens, and reset() "
                             "it before each new batch")

    def load_prompt(self, model, prompt_ids):
        """Serve another prompt of the same length: its K/V is written over the prefix in place (the compiled step
        and its CUDA graphs stay valid), and the own tokens are forgotten."""
        if self.prefix_lens is not None:
            raise ValueError("load_prompt replaces a one-prompt cache's prefix; this cache holds several prompts: "
                             "build a new one with from_prompts")
        keys, values = _prompt_kv(model, prompt_ids)
        if keys[0].shape != self.prefix_k[0].shape:
            raise ValueError(f"load_prompt replaces the prefix in place: the new prompt's K/V per layer is "
                             f"{tuple(keys[0].shape)}, the cache's {tuple(self.prefix_k[0].shape)}; build a new cache "
                             "for another length")
        with torch.no_grad():
            for target, source in zip(self.prefix_k + self.prefix_v, keys + values):
                target.copy_(source)
        self.reset()

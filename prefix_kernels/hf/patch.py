"""patch / unpatch: route a transformers model's attention through prefix_attention, with a prefix per layer.

One table of per-family facts, not a function per family. Scaling, the GQA group, the sliding window and the
softcap reach the attention function as the model's own arguments (query/key head counts, `scaling`,
`sliding_window`, `softcap`); the table says where a family keeps its layers, its KV geometry, and how it turns
the prefix length P into positions (the "position shift": the naive path, the prefix as a cache of P entries,
places the real tokens at positions P, P+1, ...; the patched path has no such cache, so patch() passes the same
positions explicitly).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .attention import BACKEND_ATTR, SOURCE_ATTR, WINDOW_ATTR, row_prefix_lengths


@dataclass(frozen=True)
class Family:
    layers: str                 # decoder layer list, dotted path from model.base_model
    attention: str              # decoder layer's attention module, dotted path from the layer
    positions: str = "arange"   # "arange": past + P + i; "cumsum": from the padding mask, as OPT does
    embeds: str = ""            # module (dotted path from model.base_model) whose forward computes the positions
    gqa: str | None = "num_key_value_heads"       # config attribute with Hkv (None: as many as query heads)
    heads: str = "num_attention_heads"            # config attribute with the query head count
    window: str | None = None   # config attribute of the sliding window (passed by the model as `sliding_window`)
    softcap: str | None = None  # config attribute of the score softcap (passed by the model as `softcap`)
    # Where a family whose attention does not pass `sliding_window` (its window lives in its mask only, which the
    # patch replaces) keeps a layer's window: "module" (the attention module's sliding_window, set on sliding layers
    # only) or "config" (config.sliding_window, every layer).
    window_in_mask: str | None = None


_LLAMA_LIKE = Family(layers="layers", attention="self_attn")
_SLIDING = Family(layers="layers", attention="self_attn", window="sliding_window")
FAMILIES = {
    "llama": _LLAMA_LIKE,
    "mistral": _SLIDING,
    "qwen2": _SLIDING,
    "qwen3": _SLIDING,
    "gemma": _LLAMA_LIKE,
    "gemma2": Family(layers="layers", attention="self_attn", window="sliding_window",
                     softcap="attn_logit_softcapping"),
    "phi": _LLAMA_LIKE,
    "phi3": _SLIDING,
    # Later Llama-layout families (each tested against the naive path in tests/test_hf.py): the model's own
    # arguments (scaling, sliding_window per layer type, softcap) reach the attention, so the table needs nothing
    # more. Where a config has no sliding_window, the family's window attribute reads None.
    "gemma3_text": _SLIDING,
    "cohere2": _SLIDING,
    "exaone4": _SLIDING,
    "ministral": _SLIDING,
    "olmo3": _SLIDING,
    "smollm3": _SLIDING,
    "starcoder2": _SLIDING,
    "mixtral": _SLIDING,
    "qwen2_moe": Family(layers="layers", attention="self_attn", window="sliding_window", window_in_mask="module"),
    "qwen3_moe": _SLIDING,
    "phimoe": Family(layers="layers", attention="self_attn", window="sliding_window", window_in_mask="config"),
    "apertus": _LLAMA_LIKE,
    "arcee": _LLAMA_LIKE,
    "cohere": _LLAMA_LIKE,
    "glm": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "helium": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "seed_oss": _LLAMA_LIKE,
    "stablelm": _LLAMA_LIKE,
    "bitnet": _LLAMA_LIKE,
    "ernie4_5": _LLAMA_LIKE,
    "ernie4_5_moe": _LLAMA_LIKE,
    "flex_olmo": _LLAMA_LIKE,
    "glm4": _LLAMA_LIKE,
    "glm4_moe": _LLAMA_LIKE,
    "granitemoe": _LLAMA_LIKE,
    "granitemoeshared": _LLAMA_LIKE,
    "hunyuan_v1_dense": _LLAMA_LIKE,
    "hunyuan_v1_moe": _LLAMA_LIKE,
    "nemotron": _LLAMA_LIKE,
    "olmoe": _LLAMA_LIKE,
    "dots1": _SLIDING,
    "exaone_moe": _SLIDING,
    "ministral3": _SLIDING,   # (its query temperature reads the shifted position_ids)
    "vaultgemma": Family(layers="layers", attention="self_attn", window="sliding_window",
                         softcap="attn_logit_softcapping"),
    "persimmon": Family(layers="layers", attention="self_attn", gqa=None),
    "dbrx": Family(layers="blocks", attention="norm_attn_norm.attn"),
    # Attention sinks: the model passes them as `s_aux`, which the attention hands to the kernels' `sinks`.
    "gpt_oss": _SLIDING,
    "flint": _SLIDING,
    "granite_swa": _SLIDING,
    "granitemoe_swa": _SLIDING,
    "gpt2": Family(layers="h", attention="attn", gqa=None, heads="n_head"),
    "gpt_neox": Family(layers="layers", attention="attention", gqa=None),
    "opt": Family(layers="decoder.layers", attention="self_attn", positions="cumsum", embeds="decoder", gqa=None),
}
NOT_ROUTED = ("bloom", "falcon", "gpt_neo", "mpt")
# Families whose attention does go through AttentionInterface but which the kernels cannot serve as they compute.
_MLA = "multi-head latent attention: its value head dim differs from its query/key head dim, the kernels take one"
_HYBRID = ("some of its layers are not attention (linear attention, convolution or a state-space mixer) and keep "
           "their own state, which a prefix of keys and values does not give them")
NOT_SERVABLE = {
    "deepseek_v2": _MLA, "deepseek_v3": _MLA,
    "jetmoe": "its keys and values are tiled per expert after the cache: more KV heads than the prefix has",
    "llama4_text": "its chunked attention lives in its mask only (not a sliding window), and its NoPE layers' "
                   "temperature reads the cache's length, which does not count the prefix",
    "qwen3_next": _HYBRID, "minimax": _HYBRID, "lfm2": _HYBRID, "granitemoehybrid": _HYBRID, "falcon_h1": _HYBRID,
}
_STATE_ATTR = "_prefix_kernels_patch"


def family_of(model) -> Family:
    """The facts for `model`'s family, or a ValueError naming the supported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in NOT_SERVABLE:
        why = NOT_SERVABLE[model_type]
    elif model_type in NOT_ROUTED:
        why = "its attention does not go through transformers' AttentionInterface"
    else:
        why = "it is not in the families table"
    raise ValueError(f"prefix_kernels cannot patch model type {model_type!r}: {why}. "
                     f"Supported families: {', '.join(sorted(FAMILIES))}")


def _get(obj, dotted):
    for part in filter(None, dotted.split(".")):
        obj = getattr(obj, part)
    return obj


def attention_modules(model) -> list:
    """Each decoder layer's attention module, in layer order."""
    family = family_of(model)
    return [_get(layer, family.attention) for layer in _get(model.base_model, family.layers)]


def kv_geometry(model) -> tuple[int, int, int]:
    """(layers, Hkv, head dim) of a supported model."""
    family, config = family_of(model), model.config
    heads = getattr(config, family.heads)
    heads_kv = getattr(config, family.gqa, None) if family.gqa else None
    heads_kv = heads_kv or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return len(attention_modules(model)), heads_kv, head_dim


def _cache_length(cache):
    """The tokens a cache holds: an int, or for a static cache a 0-d tensor (StaticLayer counts on the device;
    reading it would sync the host and break a compiled graph)."""
    length = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
    return length if isinstance(length, torch.Tensor) else int(length)


def _capturing(device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def serves_prefix(cache) -> bool:
    """Whether a cache passed to the model is itself a prefix source (SharedPrefixCache): it then replaces the
    patch's source for that forward, and its own layers hold only the sequences' own tokens."""
    return cache is not None and hasattr(cache, "layer_prefix") and hasattr(cache, "prefix_length")


def _positions_hook(family, source, signature, shift_given, modules=()):
    """A forward pre-hook on the module that computes positions: drops a prefix part of the padding mask
    (PEFT prepends P ones) and passes the positions the naive path would use. Given position_ids count the
    model's own tokens from 0 (generate() derives them from the padding mask), so they are shifted by P too,
    unless the caller already did (PEFT shifts them itself: shift_given=False). A cache that serves a prefix
    (serves_prefix) is the source of this forward, in place of `source`, for the attention `modules` too."""
    # Positional arguments by name, without inspect's binding at call time: under torch.compile (a static cache's
    # decode step) dynamo cannot trace Signature.bind on transformers 5.17 (a mappingproxy it sees mutated).
    positional = [p.name for p in signature.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]  # of the bound forward: no self

    def hook(module, args, kwargs):
        if len(args) > len(positional):
            raise TypeError(f"{type(module).__name__}.forward got {len(args)} positional arguments; the prefix_kernels "
                            f"patch names at most {len(positional)} ({', '.join(positional)})")
        arguments = dict(zip(positional, args))
        arguments.update(kwargs)
        cache = arguments.get("cache", arguments.get("past_key_values"))
        if not serves_prefix(cache) and getattr(cache, "is_compileable", False):
            # transformers' StaticCache hands every step its whole buffer, unwritten slots included, and the
            # kernels' causal alignment would put the queries at its end.
            raise ValueError(f"a patched model serves a DynamicCache, or a StaticSharedPrefixCache for compiled "
                             f"decoding; {type(cache).__name__} (static layers, e.g. cache_implementation='static') "
                             "is not supported")
        active = cache if serves_prefix(cache) else source
        for attention in modules:
            attention.__dict__[SOURCE_ATTR] = active
        if hasattr(active, "begin_forward"):
            active.begin_forward()
        tokens = arguments.get("input_ids")
        if tokens is None:
            tokens = arguments.get("inputs_embeds")
        if tokens is None:
            return None
        batch, seq = tokens.shape[:2]
        prefix_len = int(active.prefix_length)
        past = _cache_length(cache)
        # The checks below need the length on the host. A static cache counts on the device: it is read (one sync
        # per forward) in eager forwards only, never in a compiled step or a CUDA-graph capture.
        host_reads = not torch.compiler.is_compiling() and not _capturing(tokens.device)
        checked = past if isinstance(past, int) else (int(past) if host_reads else 0)
        if host_reads and hasattr(cache, "check_room"):
            cache.check_room(checked, seq, batch)
        mask = arguments.get("attention_mask")
        stale = serves_prefix(cache) and checked and (seq == 0 or (
            isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] < checked + seq))
        if stale:
            # A fresh batch on a cache that still holds an earlier batch's own tokens would attend to them. Without
            # a mask (generate() drops an all-ones one) it cannot be told from a continuation, as on transformers' own
            # caches; a call left with no token (generate cutting the cached length off a narrower batch) can.
            covered = f" and an attention mask over {mask.shape[-1]} keys" if isinstance(mask, torch.Tensor) else ""
            raise ValueError(f"this SharedPrefixCache already holds {checked} own tokens per row from an earlier "
                             f"call, but this call brings {seq} new tokens{covered}; call cache.reset() before "
                             "serving a new batch with it")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and prefix_len and isinstance(past, int) and \
                mask.shape[1] == prefix_len + past + seq:
            mask = mask[:, prefix_len:]
            arguments["attention_mask"] = mask
        shift = row_prefix_lengths(active, batch)  # P, or [B, 1] where the source's prefixes differ in length
        given = arguments.get("position_ids")
        if given is not None:
            if shift_given and prefix_len:
                arguments["position_ids"] = given + shift
        else:
            device = tokens.device
            if family.positions == "cumsum" and isinstance(mask, torch.Tensor) and mask.dim() == 2:
                # as the naive path's cumsum over [P ones, mask]: pads at -1, real tokens from P
                mask = mask.to(device=device, dtype=torch.long)
                arguments["position_ids"] = ((mask.cumsum(1) + shift) * mask - 1)[:, -seq:]
            else:
                arguments["position_ids"] = torch.arange(seq, device=device)[None] + past + shift
        return (), arguments

    return hook


@dataclass
class _PatchState:
    previous_implementation: str
    hook: object
    extra_undo: object = None
    source: object = None       # the prefix source given to patch()


def patch(model, prefix=None, *, backend="auto", _shift_given_positions=True):
    """Make `model` attend to `prefix` through the kernels; returns the model (patched in place).

    model: a supported transformers model (see FAMILIES), or a PeftModel with a PrefixTuningConfig (prefix omitted).
    prefix: a prefix source (hf/attention.py): PrefixTuning, PrefixTuning.export(), or your own.
    backend: passed to prefix_attention ("auto", "triton", "cuda", "torch").
    """
    from . import attention as hf_attention

    if prefix is None:
        from .peft import is_peft_prefix_model, patch_peft

        if is_peft_prefix_model(model):
            return patch_peft(model, backend=backend)
        raise ValueError("patch(model) without a prefix needs a PeftModel with a PrefixTuningConfig; "
                         "otherwise pass a prefix, e.g. patch(model, PrefixTuning(model, num_virtual_tokens=32))")
    if getattr(model, _STATE_ATTR, None) is not None:
        raise ValueError("this model is already patched; call prefix_kernels.unpatch(model) first")
    family = family_of(model)
    if not hasattr(prefix, "layer_prefix") or not hasattr(prefix, "prefix_length"):
        raise TypeError(f"prefix must be a prefix source (with prefix_length and layer_prefix(layer_idx)), "
                        f"got {type(prefix).__name__}")
    name = hf_attention.register()
    previous = model.config._attn_implementation
    modules = attention_modules(model)
    for module in modules:
        # Through __dict__: a prefix that is an nn.Module must not become a submodule of every attention layer.
        module.__dict__[SOURCE_ATTR] = prefix
        module.__dict__[BACKEND_ATTR] = backend
        if family.window_in_mask:
            holder = module if family.window_in_mask == "module" else model.config
            module.__dict__[WINDOW_ATTR] = getattr(holder, "sliding_window", None)
    embeds = _get(model.base_model, family.embeds)
    signature = inspect.signature(embeds.forward)
    hook = embeds.register_forward_pre_hook(
        _positions_hook(family, prefix, signature, _shift_given_positions, modules), with_kwargs=True)
    model.set_attn_implementation(name)
    model.__dict__[_STATE_ATTR] = _PatchState(previous, hook, source=prefix)
    return model


def unpatch(model):
    """Undo patch(): the stock attention implementation, no hooks, no attributes; returns the model."""
    from .peft import unpatch_peft_bridge

    target = unpatch_peft_bridge(model)
    state = target.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        raise ValueError("this model is not patched by prefix_kernels")
    state.hook.remove()
    for module in attention_modules(target):
        for attr in (SOURCE_ATTR, BACKEND_ATTR, WINDOW_ATTR):
            module.__dict__.pop(attr, None)
    target.set_attn_implementation(state.previous_implementation)
    return model

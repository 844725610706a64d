"""The PEFT bridge: patch(peft_model) for a PeftModel with a PrefixTuningConfig.

PEFT keeps the prefix as one parameter (P, 2 * layers * Hkv * D), ordered L0.K, L0.V, L1.K, ... along the last
dim (peft_model.get_prompt: view(B, P, 2 * layers, Hkv, D), permute, split by 2). The bridge views that parameter
per layer as [Hkv, P, D] without copying (or the output of the reparameterization MLP, computed once per forward),
and turns off PEFT's own path: get_prompt() returns None on the patched model, so PeftModel.forward passes no
expanded cache. PEFT still prepends P ones to the attention mask and still shifts user-given position_ids by P; the
positions hook (patch.py) drops those P mask columns and supplies the shifted positions when none are given, so
the loss equals PEFT's own forward.
"""
from __future__ import annotations

_GET_PROMPT = "get_prompt"
_BRIDGE_ATTR = "_prefix_kernels_peft_bridge"


def is_peft_prefix_model(model) -> bool:
    try:
        from peft import PeftModel, PeftType
    except ImportError:
        return False
    return isinstance(model, PeftModel) and model.active_peft_config.peft_type == PeftType.PREFIX_TUNING


class PeftPrefixSource:
    """A prefix source over a PeftModel's prompt encoder (the active adapter)."""

    def __init__(self, peft_model, layers, heads_kv, head_dim):
        config = peft_model.active_peft_config
        if config.num_transformer_submodules != 1:
            raise ValueError("the PEFT bridge supports decoder-only models (num_transformer_submodules == 1)")
        if config.num_layers != layers or config.token_dim != heads_kv * head_dim:
            raise ValueError(f"the PEFT prefix has {config.num_layers} layers of width {config.token_dim}, but the "
                             f"model has {layers} layers of Hkv * D = {heads_kv} * {head_dim}")
        self.peft_model = peft_model
        self.prefix_length = config.num_virtual_tokens
        self.shape = (self.prefix_length, 2 * layers, heads_kv, head_dim)
        self._current = None

    def _encoder(self):
        return self.peft_model.prompt_encoder[self.peft_model.active_adapter]

    def _table(self):
        encoder = self._encoder()
        weight = encoder.embedding.weight
        if getattr(encoder, "prefix_projection", False) and hasattr(encoder, "transform"):
            weight = encoder.transform(weight)   # prompt tokens are 0..P-1, so embedding(tokens) is the weight
        return weight.view(self.shape)           # (P, 2 * layers, Hkv, D), a view

    def begin_forward(self):
        self._current = self._table()

    def layer_prefix(self, layer_idx):
        table = self._current if self._current is not None else self._table()
        return table[:, 2 * layer_idx].transpose(0, 1), table[:, 2 * layer_idx + 1].transpose(0, 1)


def patch_peft(peft_model, *, backend="auto"):
    from .patch import kv_geometry, patch

    base = peft_model.get_base_model()
    source = PeftPrefixSource(peft_model, *kv_geometry(base))
    patch(base, source, backend=backend, _shift_given_positions=False)
    peft_model.__dict__[_GET_PROMPT] = _no_prompt
    peft_model.__dict__[_BRIDGE_ATTR] = source
    return peft_model


def _no_prompt(batch_size, task_ids=None, max_cache_len=None):
    return None  # the patched attention reads the prefix itself; PEFT must not pass an expanded cache


def unpatch_peft_bridge(model):
    """Remove the bridge from a patched PeftModel and return its base model; any other model is returned as is."""
    if _BRIDGE_ATTR not in getattr(model, "__dict__", {}):
        return model
    model.__dict__.pop(_GET_PROMPT, None)
    model.__dict__.pop(_BRIDGE_ATTR)
    return model.get_base_model()

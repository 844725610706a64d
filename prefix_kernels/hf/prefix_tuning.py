"""PrefixTuning: a learned prefix K/V per layer at KV-head width, stored once and never expanded to the batch."""
from __future__ import annotations

import json

import torch
from torch import nn


class FrozenPrefix:
    """A fixed per-layer prefix (a prefix source, hf/attention.py): prefix_k, prefix_v [layers, Hkv, P, D]."""

    def __init__(self, prefix_k: torch.Tensor, prefix_v: torch.Tensor):
        self.prefix_k, self.prefix_v = prefix_k, prefix_v
        self.prefix_length = prefix_k.shape[2]

    def layer_prefix(self, layer_idx):
        return self.prefix_k[layer_idx], self.prefix_v[layer_idx]


class PrefixTuning(nn.Module):
    """Trainable prefix for a transformers model (a prefix source for prefix_kernels.patch).

    Without projection the parameters are prefix_k, prefix_v [layers, Hkv, P, D]. With prefix_projection=True
    (Li & Liang; PEFT's prefix_projection) they come from an embedding (P, Hkv * D) through
    Linear(Hkv * D, encoder_hidden_size) -> tanh -> Linear(-, 2 * layers * Hkv * D), ordered as PEFT orders them
    (L0.K, L0.V, L1.K, ...). init_text_ids ([P] or [1, P] token ids) starts the prefix at the K/V the model itself
    computes for that text (positions 0..P-1, where the real tokens then start at P).
    """

    def __init__(self, model, num_virtual_tokens, prefix_projection=False, encoder_hidden_size=None,
                 init_text_ids=None, dtype=None):
        super().__init__()
        from .patch import kv_geometry

        layers, heads_kv, head_dim = kv_geometry(model)
        self.num_layers, self.num_kv_heads, self.head_dim = layers, heads_kv, head_dim
        self.prefix_length = int(num_virtual_tokens)
        self.prefix_projection = bool(prefix_projection)
        parameter = next(model.parameters())
        factory = dict(device=parameter.device, dtype=dtype or parameter.dtype)
        P, width = self.prefix_length, heads_kv * head_dim
        if self.prefix_projection:
            if init_text_ids is not None:
                raise ValueError("init_text_ids initializes the prefix K/V directly; it cannot be combined with "
                                 "prefix_projection=True")
            hidden = encoder_hidden_size or model.config.hidden_size
            self.encoder_hidden_size = hidden
            self.embedding = nn.Parameter(torch.randn(P, width, **factory))
            self.transform = nn.Sequential(nn.Linear(width, hidden, **factory), nn.Tanh(),
                                           nn.Linear(hidden, 2 * layers * width, **factory))
        else:
            self.encoder_hidden_size = None
            shape = (layers, heads_kv, P, head_dim)
            self.prefix_k = nn.Parameter(torch.randn(shape, **factory))
            self.prefix_v = nn.Parameter(torch.randn(shape, **factory))
            if init_text_ids is not None:
                keys, values = text_kv(model, init_text_ids)
                if keys.shape != shape:
                    raise ValueError(f"init_text_ids gives K/V of shape {tuple(keys.shape)}, expected {shape}: "
                                     f"pass exactly num_virtual_tokens = {P} token ids")
                with torch.no_grad():
                    self.prefix_k.copy_(keys)
                    self.prefix_v.copy_(values)
        self._current = None

    # ---- the prefix source interface ----
    def _projected(self):
        table = self.transform(self.embedding)  # (P, 2 * layers * Hkv * D)
        return table.view(self.prefix_length, 2 * self.num_layers, self.num_kv_heads, self.head_dim)

    def begin_forward(self):
        self._current = self._projected() if self.prefix_projection else None

    def layer_prefix(self, layer_idx):
        if not self.prefix_projection:
            return self.prefix_k[layer_idx], self.prefix_v[layer_idx]
        table = self._current if self._current is not None else self._projected()
        return table[:, 2 * layer_idx].transpose(0, 1), table[:, 2 * layer_idx + 1].transpose(0, 1)

    def forward(self):
        """(prefix_k, prefix_v), each [layers, Hkv, P, D]."""
        if not self.prefix_projection:
            return self.prefix_k, self.prefix_v
        table = self._projected().view(self.prefix_length, self.num_layers, 2, self.num_kv_heads, self.head_dim)
        table = table.permute(2, 1, 3, 0, 4)  # (2, layers, Hkv, P, D)
        return table[0], table[1]

    def export(self) -> FrozenPrefix:
        """The current prefix, detached and contiguous, as a frozen prefix source for serving."""
        with torch.no_grad():
            keys, values = self()
        return FrozenPrefix(keys.detach().contiguous(), values.detach().contiguous())

    # ---- persistence ----
    def _metadata(self):
        return {"format": "prefix_kernels.PrefixTuning/1", "num_layers": str(self.num_layers),
                "num_kv_heads": str(self.num_kv_heads), "head_dim": str(self.head_dim),
                "num_virtual_tokens": str(self.prefix_length), "prefix_projection": json.dumps(self.prefix_projection),
                "encoder_hidden_size": json.dumps(self.encoder_hidden_size)}

    def save(self, path):
        """Write the parameters and the geometry to a safetensors file."""
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path),
                  metadata=self._metadata())

    def load(self, path):
        """Load parameters saved by save() into this prefix (same geometry); returns self."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as handle:
            saved = handle.metadata() or {}
        expected = self._metadata()
        mismatched = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
        if mismatched:
            raise ValueError(f"{path} holds a prefix of another geometry: " +
                             ", ".join(f"{k} = {a} (this prefix: {b})" for k, (a, b) in mismatched.items()))
        self.load_state_dict(load_file(str(path), device=str(next(self.parameters()).device)))
        return self


def text_kv(model, token_ids):
    """Each layer's K/V for `token_ids` ([T] or [1, T]) under the model's stock attention: ([layers, Hkv, T, D]) x 2."""
    from .compat import output_cache
    from .patch import _STATE_ATTR

    if getattr(model, _STATE_ATTR, None) is not None:
        raise ValueError("compute the text K/V before patch(): the patched model would attend to a prefix")
    ids = torch.as_tensor(token_ids, device=next(model.parameters()).device).long()
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.shape[0] != 1:
        raise ValueError(f"init_text_ids must be one sequence, [T] or [1, T], got shape {tuple(ids.shape)}")
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = output_cache(out)
    keys = torch.stack([layer.keys[0] for layer in cache.layers])
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return keys, values

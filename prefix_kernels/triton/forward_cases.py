"""The forward kernel's launchable configurations as compile-check cases (see compile_check.py)."""
from __future__ import annotations

from dataclasses import replace

import torch

from .configs import forward_launch_space
from .forward import _prefix_attention_fwd, forward_launch

# Every block config is compiled with every feature switched on (all masked code paths, without and with the window
# reaching into the prefix, and the attention sinks' epilogue); the fp16/bf16 configs of 64+ rows also without any
# (the unmasked fast path of training/prefill); each single feature for the main bf16 config (the combinations share
# the same code paths). The sinks are the forward's alone (the backward needs nothing for them): not in these dicts,
# which the backward and decode cases share.
# prefix_window: the window reaching into the prefix too (window_includes_prefix; implies a window).
ALL_FEATURES = dict(causal=True, kpm=True, window=True, softcap=True, multi_prefix=True, prefix_window=True)
NO_FEATURES = dict(causal=False, kpm=False, window=False, softcap=False, multi_prefix=False, prefix_window=False)
# Every feature with the window over the sequence keys only (the prefix's full tiles unmasked), compiled as "all";
# ALL_FEATURES, the window reaching into the prefix too (every prefix tile masked), as "prefix-window".
EVERY_MASK = {**ALL_FEATURES, "prefix_window": False}


def case_tensors(block_d, dtype, seq_q, features, batch=2, prefix_len=64):
    """CPU stand-ins of a representative call, (q, k, prefix_k, lse, options): q is HF's strided view, the
    optional tensors are present exactly when `features` switches them on. Shared by the compile cases."""
    heads_kv, group, seq_k = 2, 3, 256
    head_dim = block_d
    q = torch.empty(batch, seq_q, heads_kv * group, head_dim, dtype=dtype).transpose(1, 2)
    k = torch.empty(batch, heads_kv, seq_k, head_dim, dtype=dtype)
    n_prefix = 2 if features["multi_prefix"] else 1
    prefix_k = torch.empty(n_prefix, heads_kv, prefix_len, head_dim, dtype=dtype)
    lse = torch.empty(batch, heads_kv * group, seq_q, dtype=torch.float32)
    options = dict(
        causal=features["causal"], scale=0.125,
        key_padding_mask=torch.ones(batch, seq_k, dtype=torch.bool) if features["kpm"] else None,
        prefix_index=torch.zeros(batch, dtype=torch.int64) if features["multi_prefix"] else None,
        prefix_lens=torch.full((n_prefix,), prefix_len, dtype=torch.int64) if features["multi_prefix"] else None,
        window=64 if features["window"] or features["prefix_window"] else None,
        softcap=30.0 if features["softcap"] else None, window_includes_prefix=features["prefix_window"],
    )
    return q, k, prefix_k, lse, options


def _case_with(config, block_d, dtype, seq_q, features, sinks_dtype=None):
    q, k, prefix_k, lse, options = case_tensors(block_d, dtype, seq_q, features)
    if sinks_dtype is not None:
        options["sinks"] = torch.empty(q.shape[1], dtype=sinks_dtype)
    return forward_launch(q, k, k, prefix_k, prefix_k, torch.empty_like(q), lse, config=config, **options)


def forward_cases():
    seq_for_block_m = {16: 1, 32: 17, 64: 33}
    for block_d, dtype, config in forward_launch_space():
        seq_q = seq_for_block_m.get(config.block_m, 4096)
        # (sinks in the model's dtype; Flint keeps them in float32 beside 16-bit activations)
        variants = [("all", EVERY_MASK, dtype), ("prefix-window", ALL_FEATURES, dtype)]
        if dtype != torch.float32 and config.block_m >= 64:
            variants.append(("none", NO_FEATURES, None))
        if block_d == 128 and dtype == torch.bfloat16 and config.block_m == 128:
            variants += [(name, {**NO_FEATURES, name: True}, None) for name in ALL_FEATURES]
            variants += [("sinks", NO_FEATURES, dtype), ("sinks-float32", NO_FEATURES, torch.float32)]
        for label, features, sinks_dtype in variants:
            _, args, kwargs = _case_with(config, block_d, dtype, seq_q, features, sinks_dtype)
            dtype_name = str(dtype).removeprefix("torch.")
            name = (f"fwd-{dtype_name}-d{block_d}-m{config.block_m}-n{config.block_n}-w{config.num_warps}"
                    f"-s{config.num_stages}{'-tma' if config.tma else ''}-{label}")
            yield name, _prefix_attention_fwd, args, kwargs
    # The reversed query-block order (ForwardConfig.heavy_first; timed by bench/tune_forward.py, not chosen by
    # forward_config yet) on the bf16 training configs of head dim 128, causal as in training.
    for block_d, dtype, config in forward_launch_space():
        if block_d == 128 and dtype == torch.bfloat16 and config.block_m >= 64:
            config = replace(config, heavy_first=True)
            _, args, kwargs = _case_with(config, block_d, dtype, 4096, {**NO_FEATURES, "causal": True})
            name = (f"fwd-bfloat16-d128-m{config.block_m}-n{config.block_n}-w{config.num_warps}"
                    f"-s{config.num_stages}{'-tma' if config.tma else ''}-heavy-first-causal")
            yield name, _prefix_attention_fwd, args, kwargs

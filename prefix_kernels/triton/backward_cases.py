"""The backward kernels' launchable configurations as compile-check cases (see compile_check.py).

Every (block_d, dtype, kernel, config) of configs.backward_launch_space() is compiled with all features switched on
(without and with the window reaching into the prefix) and with none; the single-feature variants (and the d prefix
kernel's fp32-partials variant) for the main fp16/bf16 configurations. The arguments come from the launcher's own
*_launch functions, so the specialization is the one a real launch gets.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .backward import (_bwd_preprocess, _prefix_attention_bwd_dkdv, _prefix_attention_bwd_dprefix,
                       _prefix_attention_bwd_dq, dkdv_launch, dprefix_launch, dq_launch, preprocess_launch)
from .configs import (BLOCK_D_CHOICES, FLOAT_DTYPES, FUSED_DQ_CANDIDATES, BackwardConfig, backward_config,
                      backward_launch_space)
from .forward_cases import ALL_FEATURES, EVERY_MASK, NO_FEATURES, case_tensors

# A query length that makes backward_config return a given dq / dkdv block_m (short-query variants).
_SEQ_FOR = (1, 17, 33, 4096)


def _seq_q_for(block_d, dtype, kernel, config):
    for seq_q in _SEQ_FOR:
        if getattr(backward_config(block_d, dtype, seq_q), kernel) == config:
            return seq_q
    raise AssertionError(f"no query length gives {kernel} config {config}")


def _launch(kernel, block_d, dtype, seq_q, features, partials=False, config=None, fuse_dq=False):
    q, k, prefix_k, lse, options = case_tensors(block_d, dtype, seq_q, features)
    grad_out = torch.empty_like(q)  # strided like q: autograd hands whatever layout the consumer produced
    if kernel != "dq":
        options = dict(options, config=config, dq_acc=torch.empty(q.shape) if fuse_dq else None)
    if kernel == "dq":
        dq = torch.empty(q.shape, dtype=dtype)
        return _prefix_attention_bwd_dq, dq_launch(q, k, k, prefix_k, prefix_k, grad_out, lse, lse, dq, **options)
    if kernel == "dkdv":
        dk = torch.empty(k.shape, dtype=dtype)
        kw = {name: options[name] for name in ("causal", "scale", "key_padding_mask", "window", "softcap", "config",
                                               "dq_acc")}
        return _prefix_attention_bwd_dkdv, dkdv_launch(q, k, k, grad_out, lse, lse, dk, dk, **kw)
    if kernel == "dprefix":
        chunks = 4 if partials else 1
        shape = (chunks, *prefix_k.shape) if partials else prefix_k.shape
        grad = torch.empty(shape, dtype=torch.float32 if partials else dtype)
        kw = {name: options[name] for name in ("scale", "prefix_index", "prefix_lens", "softcap", "config",
                                               "dq_acc", "window", "window_includes_prefix")}
        return _prefix_attention_bwd_dprefix, dprefix_launch(q, prefix_k, prefix_k, grad_out, lse, lse, grad, grad,
                                                             chunks, seq_k=k.shape[2], **kw)
    raise ValueError(kernel)


def backward_cases():
    for block_d, dtype, kernel, config in backward_launch_space():
        seq_q = _seq_q_for(block_d, dtype, kernel, config)
        main = block_d in (64, 128) and dtype != torch.float32 and seq_q == 4096
        variants = [("all", EVERY_MASK, False), ("prefix-window", ALL_FEATURES, False),
                    ("none", NO_FEATURES, False)]
        if main:
            variants += [(name, {**NO_FEATURES, name: True}, False) for name in ALL_FEATURES]
        if kernel == "dprefix":
            variants += [("all-partials", ALL_FEATURES, True)]
        dtype_name = str(dtype).removeprefix("torch.")
        for label, features, partials in variants:
            fn, (_, args, kwargs) = _launch(kernel, block_d, dtype, seq_q, features, partials)
            name = (f"bwd-{kernel}-{dtype_name}-d{block_d}-m{config.block_m}-n{config.block_n}"
                    f"-w{config.num_warps}-s{config.num_stages}-{label}")
            yield name, fn, args, kwargs
    # The dq kernel with the reversed query-block order (ForwardConfig.heavy_first; timed by
    # bench/tune_backward.py, not chosen by backward_config yet), bf16 head dim 128, causal as in training.
    q, k, prefix_k, lse, options = case_tensors(128, torch.bfloat16, 4096, {**NO_FEATURES, "causal": True})
    config = backward_config(128, torch.bfloat16, 4096)
    config = replace(config, dq=replace(config.dq, heavy_first=True))
    _, args, kwargs = dq_launch(q, k, k, prefix_k, prefix_k, torch.empty_like(q), lse, lse,
                                torch.empty(q.shape, dtype=torch.bfloat16), config=config, **options)
    dq = config.dq
    yield (f"bwd-dq-bfloat16-d128-m{dq.block_m}-n{dq.block_n}-w{dq.num_warps}-s{dq.num_stages}-heavy-first-causal",
           _prefix_attention_bwd_dq, args, kwargs)
    # The key-major kernels adding dq with atomics (BackwardConfig.fuse_dq; timed by bench/tune_backward.py, not
    # chosen by backward_config yet): fp16/bf16, the default tiles of head dims 64 and 128 with every feature and
    # with none, and the sweep's other head-dim-128 tiles with none. (Every feature but the window reaching into the
    # prefix: the sweep never passes one, and on sm_80 its mask took the d prefix kernel's spills past 3 KB.)
    for dtype in (torch.float16, torch.bfloat16):
        dtype_name = str(dtype).removeprefix("torch.")
        for block_d in (64, 128):
            default = backward_config(block_d, dtype, 4096)
            candidates = FUSED_DQ_CANDIDATES if block_d == 128 else ()  # the sweep's shapes are head dim 128
            for config in dict.fromkeys([default.dkdv, *candidates]):
                variants = [("none", NO_FEATURES)] + [("all", EVERY_MASK)] * (config == default.dkdv)
                for kernel in ("dkdv", "dprefix"):
                    for label, features in variants:
                        tiles = BackwardConfig(dq=default.dq, dkdv=config, dprefix=config)
                        fn, (_, args, kwargs) = _launch(kernel, block_d, dtype, 4096, features, config=tiles,
                                                        fuse_dq=True)
                        yield (f"bwd-{kernel}-{dtype_name}-d{block_d}-m{config.block_m}-n{config.block_n}"
                               f"-w{config.num_warps}-s{config.num_stages}-fused-dq-{label}", fn, args, kwargs)
    for dtype in FLOAT_DTYPES:
        for block_d in BLOCK_D_CHOICES:
            for has_dlse in (False, True):
                out = torch.empty(2, 17, 6, block_d, dtype=dtype).transpose(1, 2)
                lse = torch.empty(2, 6, 17, dtype=torch.float32)
                _, args, kwargs = preprocess_launch(out, out, lse, lse if has_dlse else None, lse)
                dtype_name = str(dtype).removeprefix("torch.")
                yield (f"bwd-preprocess-{dtype_name}-d{block_d}-{'dlse' if has_dlse else 'nodlse'}",
                       _bwd_preprocess, args, kwargs)

"""The decode and merge kernels' launchable configurations as compile-check cases (see compile_check.py).

Every (block_d, dtype, config) of configs.decode_launch_space() is compiled with every feature on (all masked
paths, several prefixes with the sort order), and again with the window reaching into the prefix as well
("prefix-window": every prefix tile masked, an edge of serving a sliding-window model, allowed a few spills); the
main bf16 configs also with none (one shared prefix, plain causal decode: the serving case). The arguments come
from the launcher's own decode_launch, so the specialization is the one a real launch gets.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .configs import BLOCK_D_CHOICES, FLOAT_DTYPES, HOPPER_DECODE_PREFIX_CANDIDATES, decode_config, \
    decode_launch_space
from .decode import _decode_partials, _merge_partials, _merge_two, decode_launch, merge_partials_launch, \
    merge_two_launch
from .forward_cases import ALL_FEATURES, EVERY_MASK, NO_FEATURES, case_tensors


def _decode_case(block_d, dtype, config, features, sms=132, part="both"):
    batch, seq_q = 3, 4
    q, k, prefix_k, _, options = case_tensors(block_d, dtype, seq_q, features, batch=batch, prefix_len=512)
    rows = batch * q.shape[1] * seq_q
    work_out = torch.empty(4, rows, block_d, dtype=torch.float32)
    work_lse = torch.empty(4, rows, dtype=torch.float32)
    options["order"] = torch.zeros(batch, dtype=torch.int64) if features["multi_prefix"] else None
    return decode_launch(q, k, k, prefix_k, prefix_k, work_out, work_lse, config=config, sms=sms, part=part,
                         **options)


def _variants(block_d, dtype):
    """(label, features) compiled for a config: every feature on, without and with the window in the prefix;
    for the main bf16 configs also none."""
    variants = [("all", EVERY_MASK), ("prefix-window", ALL_FEATURES)]
    if dtype == torch.bfloat16 and block_d in (64, 128):
        variants.append(("none", {**NO_FEATURES, "causal": True}))
    return variants


def decode_cases():
    for block_d, dtype, config in decode_launch_space():
        if config.own_launch:  # its two launches: below (its eager one launch is the same config without them)
            continue
        dtype_name = str(dtype).removeprefix("torch.")
        for label, features in _variants(block_d, dtype):
            _, args, kwargs = _decode_case(block_d, dtype, config, features)
            p, o = config.prefix, config.own
            name = (f"dec-{dtype_name}-d{block_d}-pm{p.block_m}-pn{p.block_n}-om{o.block_m}-on{o.block_n}"
                    f"-w{kwargs['num_warps']}-s{kwargs['num_stages']}{'-tma' if p.tma else ''}-{label}")
            yield name, _decode_partials, args, kwargs
    # The interleaved program order (DecodeConfig.interleave; timed by bench/tune_decode.py, not chosen by
    # decode_config) on the bf16 serving configs of head dim 128 (of one launch: nothing to interleave otherwise).
    for block_d, dtype, config in decode_launch_space():
        if dtype == torch.bfloat16 and block_d == 128 and not config.own_launch:
            config = replace(config, interleave=True)
            _, args, kwargs = _decode_case(block_d, dtype, config, {**NO_FEATURES, "causal": True})
            p, o = config.prefix, config.own
            yield (f"dec-bfloat16-d128-pm{p.block_m}-pn{p.block_n}-om{o.block_m}-on{o.block_n}-w{kwargs['num_warps']}"
                   f"-s{kwargs['num_stages']}{'-tma' if p.tma else ''}-interleave-none"), _decode_partials, args, kwargs
    # Own programs over several (sequence, KV head) pairs (DecodeConfig.own_programs_per_sm; timed by
    # bench/tune_decode.py, not chosen by decode_config) with the bf16 head-dim-128 one-launch configs of one-token
    # decode (G * S <= 16 own rows), in the serving case and with every masked path; one notional SM, so that
    # the plan takes it. (Triton 3.8: no spill on sm_90; the GPU image's 3.6 spills 8 B in the every-mask variant
    # of the 64 x 64 pointer tile, not in the serving case.)
    for block_d, dtype, config in decode_launch_space():
        if dtype == torch.bfloat16 and block_d == 128 and config.own.block_m == 16 and not config.own_launch:
            config = replace(config, own_programs_per_sm=1)
            for label, features in (("none", {**NO_FEATURES, "causal": True}), ("all", EVERY_MASK)):
                _, args, kwargs = _decode_case(block_d, dtype, config, features, sms=1)
                assert kwargs["OWN_UNITS"], "the plan did not take the pairs-per-program loop"
                p, o = config.prefix, config.own
                yield (f"dec-bfloat16-d128-pm{p.block_m}-pn{p.block_n}-om{o.block_m}-on{o.block_n}"
                       f"-w{kwargs['num_warps']}-s{kwargs['num_stages']}{'-tma' if p.tma else ''}-units-{label}"), \
                    _decode_partials, args, kwargs
    # The two launches of DecodeConfig.own_launch: those of every config decode_config gives it (a one-block prefix
    # part with a bigger footprint), with that config's feature variants; and, as bench/tune_decode.py times it,
    # with every bf16 head-dim-128 config, each prefix tiling in the serving case, each own tiling in the serving
    # case and with every masked path. Each launch compiles its own part's code only (so the own launch gets the own
    # tiling's footprint): one case per (part, that part's tiling, warps, stages, features), whatever the other's.
    seen = set()
    for block_d, dtype, config in decode_launch_space():
        chosen = config.own_launch
        if not chosen and (dtype != torch.bfloat16 or block_d != 128):
            continue
        config = replace(config, own_launch=True)
        dtype_name = str(dtype).removeprefix("torch.")
        for part, tiling in (("prefix", config.prefix), ("own", config.own)):
            labels = [label for label, _ in _variants(block_d, dtype)
                      if not (part == "own" and label == "prefix-window")] if chosen else \
                ["none"] if part == "prefix" else ["none", "all"]  # (an own launch has no prefix window)
            for label in labels:
                features = dict(_variants(block_d, dtype) + [("none", {**NO_FEATURES, "causal": True})])[label]
                _, args, kwargs = _decode_case(block_d, dtype, config, features, part=part)
                key = (block_d, dtype, part, tiling, kwargs["num_warps"], kwargs["num_stages"], label)
                if key in seen:
                    continue
                seen.add(key)
                yield (f"dec-{dtype_name}-d{block_d}-{part}-launch-m{tiling.block_m}-n{tiling.block_n}"
                       f"-w{kwargs['num_warps']}-s{kwargs['num_stages']}{'-tma' if kwargs['USE_DESC'] else ''}"
                       f"-{label}"), _decode_partials, args, kwargs
    # The taller prefix tiles that bench/tune_decode.py times on sm_90 (bf16, head dim 128, the serving case).
    for name, prefix in HOPPER_DECODE_PREFIX_CANDIDATES.items():
        config = replace(decode_config(128, torch.bfloat16, 1024, 4, tma_capable=True), prefix=prefix)
        _, args, kwargs = _decode_case(128, torch.bfloat16, config, {**NO_FEATURES, "causal": True})
        yield f"dec-bfloat16-d128-{name}-tma-tune-none", _decode_partials, args, kwargs
    for dtype in FLOAT_DTYPES:
        dtype_name = str(dtype).removeprefix("torch.")
        for block_d in BLOCK_D_CHOICES:
            rows = 40
            work_out = torch.empty(3, rows, block_d, dtype=torch.float32)
            work_lse = torch.empty(3, rows, dtype=torch.float32)
            out = torch.empty(2, 4, 5, block_d, dtype=dtype)
            lse = torch.empty(2, 4, 5, dtype=torch.float32)
            _, args, kwargs = merge_partials_launch(work_out, work_lse, out, lse, 3)
            yield f"merge-partials-{dtype_name}-d{block_d}", _merge_partials, args, kwargs
            for sinks_dtype in dict.fromkeys((dtype, torch.float32)):  # attention sinks: the model's dtype, or fp32
                sinks = torch.empty(4, dtype=sinks_dtype)
                _, args, kwargs = merge_partials_launch(work_out, work_lse, out, lse, 3, sinks)
                yield (f"merge-partials-{dtype_name}-d{block_d}-sinks-{str(sinks_dtype).removeprefix('torch.')}",
                       _merge_partials, args, kwargs)
            a = torch.empty(rows, block_d, dtype=dtype)
            la = torch.empty(rows, dtype=torch.float32)
            _, args, kwargs = merge_two_launch(a, la, a, la, torch.empty_like(a), torch.empty_like(la))
            yield f"merge-two-{dtype_name}-d{block_d}", _merge_two, args, kwargs

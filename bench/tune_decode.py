"""Time the Triton decode at the ANCHORS decode shapes with each launch choice it has (GPU only).

The default (on sm_90: TMA prefix tiles where the prefix part is compute-bound; the own launch on a side stream
where decode_config takes it, then also "one-launch"), the pointer tiles that sm_80 uses, and on the one-launch
config: the interleaved program order (DecodeConfig.interleave), one prefix program per SM
(DecodeConfig.prefix_programs_per_sm), own programs over several sequences (DecodeConfig.own_programs_per_sm),
the own programs in a launch of their own (DecodeConfig.own_launch), after the prefix launch or beside it on a
side stream (own_stream; also eagerly, next to the one launch's eager time),
and where the packed rows span several blocks the taller prefix tiles (HOPPER_DECODE_PREFIX_CANDIDATES), each
replayed from a CUDA graph (device time only), the own part alone (an empty prefix: how much of the prefix part
overlaps it), and the PyTorch split baseline in the same run. Used to pick the decode entries of
prefix_kernels/triton/configs.py; not a pass/fail test.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch
import triton

from prefix_kernels.bench.cases import get_preset
from prefix_kernels.bench.providers import PROVIDERS, make_inputs
from prefix_kernels.bench.report import environment
from prefix_kernels.bench.timing import bench_ms, graph_bench_ms
from prefix_kernels.triton.configs import DECODE_ONE_BLOCK_ROWS, HOPPER_DECODE_PREFIX_CANDIDATES, decode_config
from prefix_kernels.triton.decode import prefix_attention_decode
from prefix_kernels.triton.forward import _has_tma


def launch_choices(head_dim, dtype, rows, group_rows, tma_capable, own_kv_bytes, every_tile=False):
    """{name: DecodeConfig (None: the plan's own choice)} of every launch choice timed at one shape."""
    default = decode_config(head_dim, dtype, rows, group_rows, tma_capable, own_kv_bytes)
    # The knobs below are each tried on the one-launch config (decode_config takes the own launch on a side
    # stream at some shapes: then "one-launch" is timed too)
    base = default.one_launch()
    configs = {"default": None,
               **({"one-launch": base} if base != default else {}),
               "pointer": decode_config(head_dim, dtype, rows, group_rows, False, own_kv_bytes),
               "interleaved": replace(base, interleave=True),
               # one prefix program per SM: the other program slot streams own keys from the first wave on
               "prefix-1/sm": replace(base, prefix_programs_per_sm=1)}
    # Own programs over several (sequence, KV head) pairs in one pipelined loop: no drained stream between
    # two short own programs (DecodeConfig.own_programs_per_sm), alone and with one prefix program per SM.
    for per_sm in (2, 4, 8):
        configs[f"own-{per_sm}/sm"] = replace(base, own_programs_per_sm=per_sm)
    configs["prefix-1/sm+own-4/sm"] = replace(base, prefix_programs_per_sm=1, own_programs_per_sm=4)
    # The own programs in a launch of their own, with their own tiling's footprint (DecodeConfig.own_launch)
    configs["own-launch"] = replace(base, own_launch=True)
    # ... on a side stream, concurrent with the prefix launch (DecodeConfig.own_stream)
    configs["own-stream"] = replace(base, own_launch=True, own_stream=True)
    # ... with one prefix program per SM (B=256 G=4 P=4096 on the H200: prefix-1/sm alone 0.106 against 0.117 ms,
    # own-stream alone no gain): whether the own launch fills the slot it leaves
    configs["prefix-1/sm+own-stream"] = replace(base, prefix_programs_per_sm=1, own_launch=True, own_stream=True)
    # Taller prefix tiles where the prefix part spans several row blocks (where the default takes TMA); off the
    # GPU at every shape (every_tile), so that the smoke check runs them
    if rows > DECODE_ONE_BLOCK_ROWS or every_tile:
        configs.update({name: replace(base, prefix=prefix)
                        for name, prefix in HOPPER_DECODE_PREFIX_CANDIDATES.items()})
    return configs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--preset", default="anchors", help="smoke: small shapes, to check the script on CPU")
    parser.add_argument("--device", default="cuda", help="cpu (under TRITON_INTERPRET=1) only to check the script")
    args = parser.parse_args(argv)
    split = PROVIDERS["split"]
    if args.device == "cuda":
        timer = graph_bench_ms
    else:
        def timer(fn):
            return bench_ms(fn, args.device), None
    results = []
    for case in (c for c in get_preset(args.preset).ops if c.op == "decode"):
        inputs = make_inputs(case, args.device)
        q, k, v, prefix_k, prefix_v = inputs.q, inputs.k, inputs.v, inputs.prefix_k[None], inputs.prefix_v[None]
        group = case.heads_q // case.heads_kv
        rows, group_rows = case.batch * group * case.seq_q, group * case.seq_q
        own_kv_bytes = k.numel() * k.element_size() * 2
        configs = launch_choices(case.head_dim, q.dtype, rows, group_rows, _has_tma(q.device), own_kv_bytes,
                                 every_tile=args.device != "cuda")
        row = dict(label=case.label, times_ms={}, max_diff={})
        want = None
        for name, config in configs.items():
            def run(config=config):
                return prefix_attention_decode(q, k, v, prefix_k, prefix_v, causal=True, scale=inputs.scale,
                                               config=config)
            # Each choice's output against the default's first (a race or a skipped slot must not pass as a fast
            # time): the largest difference, and WRONG in the printout past a few units of the dtype's rounding
            out = run()[0].float()
            want = out if want is None else want
            row["max_diff"][name] = float((out - want).abs().max())
            row["times_ms"][name], _ = timer(run)
            if name in ("default", "own-stream"):
                # also eagerly (host time included; the default's first eager call has run): the side stream's eager
                # cost, which made decode_config take it inside graph captures only (0.585 ms eagerly at B=128 G=1
                # P=16384 against 0.204 replayed)
                row["times_ms"][f"{name}-eager"] = bench_ms(run, args.device)
        # The own part alone (an empty prefix): next to the default's time it says how much of the prefix part
        # runs alongside the own part rather than after it (the GQA serving shapes sat at ~55-58% of their floor
        # on the H200 with the two phases looking serial).
        empty_k, empty_v = prefix_k[:, :, :0], prefix_v[:, :, :0]
        row["times_ms"]["own-only"], _ = timer(lambda: prefix_attention_decode(
            q, k, v, empty_k, empty_v, causal=True, scale=inputs.scale))
        prepared = split.prepare(case, inputs)
        with torch.no_grad():
            row["times_ms"]["split"], _ = timer(prepared.forward)
        results.append(row)
        times = row["times_ms"].items()
        tolerance = 16 * torch.finfo(q.dtype).eps * max(1.0, float(want.abs().max()))
        wrong = [n for n, d in row["max_diff"].items() if not d <= tolerance]  # (NaN included)
        print(f"{case.label}: " + ", ".join(f"{n} {t:.3f} ms" if t else f"{n} n/a" for n, t in times)
              + (f"; WRONG (max diff vs the default): {', '.join(wrong)}" if wrong else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            card = torch.cuda.get_device_name() if args.device == "cuda" else args.device
            json.dump(dict(card=card, torch=torch.__version__, triton=triton.__version__,
                           environment=environment(args.device), results=results), f, indent=1)


if __name__ == "__main__":
    main()

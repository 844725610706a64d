"""Time the CUDA kernels (csrc/) as built now, next to Triton: the forward at the ANCHORS training shapes and the
decode at the ANCHORS decode shapes (CUDA-graph replays) (GPU only).

bench/gpu_check.sh --tune-cuda rebuilds the extension once per variant (PK_FORWARD_* and PK_DECODE_STAGES defines
through NVCC_APPEND_FLAGS, see csrc/forward.cu and csrc/decode.cu) and runs this after each build, appending one
JSON line per shape to --json. The label names the build. Each forward variant is checked against the float32
reference on the same inputs before it is timed, each decode against Triton's output. On an sm_90 card the forward is
also timed with its wgmma loops (PK_CUDA_FORWARD=wgmma, "cuda-wgmma", fed by cp.async, and wgmma-tma,
"cuda-wgmma-tma", fed by a TMA producer warpgroup, and wgmma-tma-persistent, "cuda-wgmma-tma-persistent", that loop
on a grid of one block per SM), and the decode with its wgmma prefix programs
(PK_CUDA_DECODE=wgmma, "cuda-wgmma"), last and in rows of their own. The decode is also timed with its own programs
in 64-row blocks ("cuda-own-rows", PK_CUDA_DECODE_OWN=rows: the layout before the keys were split across the
warps). Used to pick csrc's defaults; not a pass/fail test.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch
import triton

import prefix_kernels
from prefix_kernels.bench.report import git_commit
from prefix_kernels.bench.timing import poison_cached_blocks
from prefix_kernels.reference import prefix_attention_reference
from sanitize_cuda import broken_loops  # (beside this script) the Hopper loops that failed their smoke run

SHAPES = [dict(B=8, S=2048, P=128), dict(B=16, S=1024, P=512)]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", required=True, help="the build's tile settings, e.g. r2-k32-b1-fs1-ds3")
    parser.add_argument("--json", required=True, help="JSON lines file to append to")
    parser.add_argument("--heads", type=int, default=32)
    args = parser.parse_args(argv)
    if prefix_kernels.cuda.UNAVAILABLE_REASON:
        raise SystemExit(f"{args.label}: {prefix_kernels.cuda.UNAVAILABLE_REASON}")
    time_forward(args, [("cuda", "cuda", "mma"), ("triton", "triton", "mma")])
    # (the own programs' layout before the keys were split across the warps, next to the default)
    time_decode(args, [("cuda", "cuda", {"PK_CUDA_DECODE": "mma", "PK_CUDA_DECODE_OWN": "auto"}),
                       ("cuda-own-rows", "cuda", {"PK_CUDA_DECODE": "mma", "PK_CUDA_DECODE_OWN": "rows"}),
                       ("triton", "triton", {})])
    if torch.cuda.get_device_capability() == (9, 0):
        # Last: a Hopper loop built with new settings may trap, which ends the process's CUDA context.
        broken = broken_loops()
        for loop in sorted(broken):
            print(f"{args.label:24} left out: {loop} (it failed its smoke run)")
        loops = [(f"cuda-{loop}", "cuda", loop) for loop in ("wgmma", "wgmma-tma", "wgmma-tma-persistent")
                 if loop not in broken]
        if loops:
            time_forward(args, loops)
        if "decode-wgmma" not in broken:
            time_decode(args, [("cuda-wgmma", "cuda", {"PK_CUDA_DECODE": "wgmma", "PK_CUDA_DECODE_OWN": "auto"})])


def time_forward(args, variants):
    """The ANCHORS training shapes, each (name, backend, $PK_CUDA_FORWARD) of `variants` checked against the
    float32 reference on one batch row and against Triton's output on the whole batch (written over NaN-filled
    blocks: a loop that skips work shows NaN, not an earlier variant's output), then timed; one JSON line per
    shape."""
    dtype, device, H, D = torch.bfloat16, torch.device("cuda"), args.heads, 128
    for shape in SHAPES:
        B, S, P = shape["B"], shape["S"], shape["P"]
        flops = 4 * B * H * D * (S * S / 2 + S * P)
        q = torch.randn(B, S, H, D, device=device, dtype=dtype).transpose(1, 2)  # HF's layout, read in place
        k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype) for _ in "kv")
        prefix_k, prefix_v = (torch.randn(H, P, D, device=device, dtype=dtype) for _ in "kv")
        row = dict(label=args.label, card=torch.cuda.get_device_name(), commit=git_commit()["commit"], shape=shape)
        with torch.no_grad():
            # Truth on one batch row (the full reference at these sizes is slow and large).
            one = [t[:1] for t in (q, k, v)]
            truth = prefix_attention_reference(*(t.float() for t in one), prefix_k.float(), prefix_v.float(),
                                               causal=True)
            whole = prefix_kernels.prefix_attention(q, k, v, prefix_k, prefix_v, causal=True, scale=1 / math.sqrt(D),
                                                    backend="triton").float()  # every row, from the other kernels
            for name, backend, loop in variants:
                # read by the extension at each call; named, "mma" too: the default differs between cards
                previous = os.environ.get("PK_CUDA_FORWARD")
                os.environ["PK_CUDA_FORWARD"] = loop
                try:
                    run = lambda: prefix_kernels.prefix_attention(q, k, v, prefix_k, prefix_v, causal=True,
                                                                  scale=1 / math.sqrt(D), backend=backend)
                    poison_cached_blocks([q.shape], dtype, device)
                    out = run()
                    error = _max_diff(out[:1], truth)
                    batch_diff = _max_diff(out, whole)
                    del out
                    ms = triton.testing.do_bench(run, return_mode="median")
                    row[name] = dict(ms=ms, tflops=flops / ms / 1e9, max_error=error, max_diff_vs_triton=batch_diff)
                finally:
                    restore_env("PK_CUDA_FORWARD", previous)
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{args.label:24} B={B:2} S={S} P={P}: " + " | ".join(
            f"{name} {row[name]['ms']:.3f} ms {row[name]['tflops']:.0f} TFLOP/s (err {row[name]['max_error']:.2g}, "
            f"vs triton {row[name]['max_diff_vs_triton']:.2g})"
            for name, _, _ in variants), flush=True)


def time_decode(args, variants):
    """The ANCHORS decode shapes, each (name, backend, environment: $PK_CUDA_DECODE, $PK_CUDA_DECODE_OWN) of
    `variants` replayed from a CUDA graph (device time only, what a serving loop that captures its step pays);
    CUDA's output against Triton's."""
    from prefix_kernels.bench.cases import get_preset
    from prefix_kernels.bench.providers import make_inputs
    from prefix_kernels.bench.timing import graph_bench_ms

    for case in (c for c in get_preset("anchors").ops if c.op == "decode"):
        inputs = make_inputs(case, "cuda")
        row = dict(label=args.label, card=torch.cuda.get_device_name(), commit=git_commit()["commit"],
                   shape=case.label)

        def call(backend):
            return prefix_kernels.prefix_attention(inputs.q, inputs.k, inputs.v, inputs.prefix_k, inputs.prefix_v,
                                                   causal=True, scale=inputs.scale, backend=backend)

        with torch.no_grad():
            expected = call("triton").float()
            for name, backend, environment in variants:
                previous = {variable: os.environ.get(variable) for variable in environment}
                os.environ.update(environment)  # read by the extension at each call
                try:
                    # (eager first: the first wgmma call on a device checks its code outside the capture)
                    poison_cached_blocks([inputs.q.shape], inputs.q.dtype, "cuda")
                    out = call(backend)
                    row[name] = dict(ms=None, not_captured=None)
                    if backend == "cuda":
                        row[name]["max_diff_vs_triton"] = _max_diff(out, expected)
                    del out

                    def check_replay(captured, entry=row[name]):  # the replayed (timed) output, over NaN
                        entry["replay_max_diff_vs_triton"] = _max_diff(captured, expected)
                    row[name]["ms"], row[name]["not_captured"] = graph_bench_ms(lambda: call(backend),
                                                                                check=check_replay)
                finally:
                    for variable, value in previous.items():
                        restore_env(variable, value)
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
        shown = [f"{name} " + (f"{row[name]['ms']:.3f} ms" if row[name]["ms"] else
                               f"not captured ({row[name]['not_captured']})") +
                 (f" (vs triton max diff {row[name]['max_diff_vs_triton']:.2g})" if backend == "cuda" else "") +
                 (f" (replayed: {row[name]['replay_max_diff_vs_triton']:.2g})"
                  if "replay_max_diff_vs_triton" in row[name] else "")
                 for name, backend, _ in variants]
        print(f"{args.label:24} decode {case.label}: " + " | ".join(shown), flush=True)


def _max_diff(out, expected) -> float:
    """Largest |out - expected|, an unwritten (NaN) element counting as infinite (a NaN maximum compares False with
    any tolerance a reader holds it against)."""
    return (out.float() - expected).nan_to_num(nan=float("inf")).abs().max().item()


def restore_env(name, previous):
    """Puts back the variable as it was before a timed variant set it (unset: the extension's default loop)."""
    if previous is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = previous


if __name__ == "__main__":
    main()

"""Sweep the backward kernels' launch configurations at the ANCHORS training shapes (GPU only), then run the
fwd+bwd benchmark with the best one next to the default and the baselines, in the same run.

Each kernel (dq, own dk/dv, prefix dk/dv) is timed alone (the launcher's `needs` runs only that kernel) for
every candidate; a candidate's gradients must match the default configuration's. The best per kernel, summed
over the shapes, forms `ours-tuned`. Then the whole backward is timed with the default against dq accumulated by
the key-major kernels (BackwardConfig.fuse_dq) in each fused tile; the fastest fused tile forms
`ours-tuned-fused`. The bench harness measures both with `ours-triton` (the package's current configs), naive,
prebuilt and FlexAttention, all behind the same correctness guard. The winner is printed as the line to put into
prefix_kernels/triton/configs.py; this script changes nothing itself.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import triton

import prefix_kernels.bench.main as bench_main
from prefix_kernels.bench.cases import get_preset
from prefix_kernels.bench.providers import Prepared, Provider, _all_leaves, _identity_grads
from prefix_kernels.bench.report import environment
from prefix_kernels.triton.backward import prefix_attention_backward
from prefix_kernels.triton.configs import FUSED_DQ_CANDIDATES, BackwardConfig, ForwardConfig, backward_config
from prefix_kernels.triton.forward import prefix_attention_forward

DQ_CANDIDATES = [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 64, 8, 3),
                 (128, 64, 8, 3, False, True)]  # the last: the longest query blocks first (heavy_first)
KV_CANDIDATES = [(32, 64, 8, 2), (32, 128, 8, 2), (64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3)]
PARTS = {"dq": ((True, False, False, False, False), DQ_CANDIDATES),
         "dkdv": ((False, True, True, False, False), KV_CANDIDATES),
         "dprefix": ((False, False, False, True, True), KV_CANDIDATES)}


def sweep(case):
    """{part: {candidate: ms or None}} for one fwd+bwd case."""
    torch.manual_seed(0)
    B, H, Hkv, S, L, P, D = (case.batch, case.heads_q, case.heads_kv, case.seq_q, case.seq_k, case.prefix,
                             case.head_dim)
    dev, dt = torch.device("cuda"), torch.bfloat16
    q = torch.randn(B, S, H, D, device=dev, dtype=dt).transpose(1, 2)
    k, v = (torch.randn(B, Hkv, L, D, device=dev, dtype=dt) for _ in "kv")
    pk, pv = (torch.randn(1, Hkv, P, D, device=dev, dtype=dt) for _ in "kv")
    options = dict(causal=True, scale=1 / math.sqrt(D), key_padding_mask=None, prefix_index=None, prefix_lens=None,
                   window=None, softcap=None)
    out, lse = prefix_attention_forward(q, k, v, pk, pv, **options)
    dout = torch.randn_like(out)
    default = backward_config(D, dt, S)
    results = {}
    for part, (needs, candidates) in PARTS.items():
        want = prefix_attention_backward(q, k, v, pk, pv, out, lse, dout, None, needs=needs, **options)
        results[part] = {}
        for cand in candidates:
            config = ForwardConfig(*cand)
            override = BackwardConfig(dq=config if part == "dq" else default.dq,
                                      dkdv=config if part == "dkdv" else default.dkdv,
                                      dprefix=config if part == "dprefix" else default.dprefix)
            run = lambda: prefix_attention_backward(q, k, v, pk, pv, out, lse, dout, None, needs=needs,
                                                    config=override, **options)
            try:
                got = run()
                error = max(float((g.float() - w.float()).abs().max()) for g, w in zip(got, want) if g is not None)
                if error > 5e-2:
                    raise RuntimeError(f"gradients differ from the default config's by {error:.3g}")
                results[part][cand] = triton.testing.do_bench(run, return_mode="median")
            except Exception as exc:  # out of shared memory on this chip, or wrong: not a candidate
                results[part][cand] = None
                print(f"  {part} {cand}: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
    # The whole backward: the default (separate dq kernel) against dq added by the key-major kernels with atomics
    # (BackwardConfig.fuse_dq) in each fused tile, the same tile for both key-major kernels.
    want = prefix_attention_backward(q, k, v, pk, pv, out, lse, dout, None, **options)
    results["whole"] = {}
    for tile in [None, *dict.fromkeys([default.dkdv, *FUSED_DQ_CANDIDATES])]:
        name = "separate" if tile is None else f"fused {tile.block_m} {tile.block_n} {tile.num_warps} {tile.num_stages}"
        config = default if tile is None else BackwardConfig(default.dq, tile, tile, fuse_dq=True)
        run = lambda: prefix_attention_backward(q, k, v, pk, pv, out, lse, dout, None, config=config,  # noqa: E731
                                                **options)
        try:
            error = max(float((g.float() - w.float()).abs().max()) for g, w in zip(run(), want))
            if error > 5e-2:
                raise RuntimeError(f"gradients differ from the default config's by {error:.3g}")
            results["whole"][name] = triton.testing.do_bench(run, return_mode="median")
        except Exception as exc:
            results["whole"][name] = None
            print(f"  whole {name}: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
    return results


def tuned_provider(config: BackwardConfig, name: str = "ours-tuned") -> Provider:
    """Our fwd+bwd with the given backward configuration (forward unchanged)."""

    class TunedAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, pk, pv, scale):
            options = dict(causal=True, scale=scale, key_padding_mask=None, prefix_index=None, prefix_lens=None,
                           window=None, softcap=None)
            out, lse = prefix_attention_forward(q, k, v, pk[None], pv[None], **options)
            ctx.save_for_backward(q, k, v, pk, pv, out, lse)
            ctx.options = options
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, pk, pv, out, lse = ctx.saved_tensors
            dq, dk, dv, dpk, dpv = prefix_attention_backward(q, k, v, pk[None], pv[None], out, lse, dout.contiguous(),
                                                             None, config=config, **ctx.options)
            return dq, dk, dv, dpk[0], dpv[0], None

    def prepare(case, inputs):
        q, k, v, pk, pv = inputs.tensors
        return Prepared(lambda: TunedAttention.apply(q, k, v, pk, pv, inputs.scale), _all_leaves(inputs),
                        _identity_grads)

    return Provider(name, f"ours with backward {config}", "ours", ("fwd+bwd",), prepare)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--providers", default="ours-triton,naive,prebuilt,flex",
                        help="baselines measured next to ours-tuned (flex compiles for a while)")
    args = parser.parse_args(argv)
    cases = [c for c in get_preset("anchors").ops if c.op == "fwd+bwd"]
    totals = {part: {} for part in (*PARTS, "whole")}
    report = []
    for case in cases:
        results = sweep(case)
        report.append(dict(case=case.label, results={p: {str(c): ms for c, ms in r.items()} for p, r in results.items()}))
        print(case.label)
        for part, timings in results.items():
            for cand, ms in sorted(timings.items(), key=lambda x: x[1] or 1e9):
                print(f"  {part} {cand}: {'failed' if ms is None else f'{ms:.3f} ms'}")
                if ms is not None and totals[part].get(cand, 0.0) is not None:
                    totals[part][cand] = totals[part].get(cand, 0.0) + ms
                else:
                    totals[part][cand] = None
    fused_totals = {name: ms for name, ms in totals.pop("whole").items() if name != "separate"}
    best = {part: min((c for c, ms in t.items() if ms is not None), key=lambda c: t[c]) for part, t in totals.items()}
    config = BackwardConfig(*(ForwardConfig(*best[p]) for p in ("dq", "dkdv", "dprefix")))
    print(f"best (summed over the shapes): {config}")
    providers = [tuned_provider(config)]
    timed = [name for name, ms in fused_totals.items() if ms is not None]
    if timed:  # the fastest fused tile, measured next to ours-tuned (the separate kernels' best) and the baselines
        best["fused"] = min(timed, key=fused_totals.get)
        tile = ForwardConfig(*(int(x) for x in best["fused"].split()[1:]))
        fused = BackwardConfig(config.dq, tile, tile, fuse_dq=True)
        print(f"best fused (summed over the shapes): {fused}")
        providers.append(tuned_provider(fused, "ours-tuned-fused"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tune_backward.json").write_text(json.dumps(dict(
        card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        environment=environment("cuda"), sweep=report,
        best={p: best[p] if isinstance(best[p], str) else list(best[p]) for p in best}), indent=1))
    bench_args = bench_main.parse_args(["--preset", "anchors", "--ops", "fwd+bwd", "--providers", args.providers,
                                        "--out", str(args.out / "tuned"), "--no-progress", "--quiet"])
    bench_main.run(bench_args, extra_providers=providers)


if __name__ == "__main__":
    main()

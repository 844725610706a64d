"""Sweep the forward kernel's launch configurations at the ANCHORS training shapes (GPU only).

Prints TFLOP/s per configuration next to naive concat + SDPA and SDPA flash without a prefix, measured in the
same run, and writes JSON. Used to pick the entries of prefix_kernels/triton/configs.py; not a pass/fail test.
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F
import triton

from prefix_kernels.bench.report import environment
from prefix_kernels.reference import visibility_mask
from prefix_kernels.triton.configs import ForwardConfig, forward_config
from prefix_kernels.triton.forward import prefix_attention_forward

SHAPES = [dict(B=8, S=2048, P=128), dict(B=16, S=1024, P=512)]
CANDIDATES = [ForwardConfig(*c) for c in [
    (128, 64, 8, 3), (64, 64, 4, 3),
    # K/V tiles through TMA tensor descriptors (sm_90+). On the H200 (tune_forward.json there) every 128-row TMA
    # tile lost to (64, 64, 4 warps, 3 stages) by 12-25%, and on the H100 (c194848) so did its 64-row neighbours
    # (4 stages and 32-key tiles, the slowest, dropped since).
    (128, 128, 8, 3, True),
    (64, 64, 4, 3, True), (64, 64, 4, 2, True), (64, 128, 4, 2, True), (64, 32, 4, 3, True),
    # the longest query blocks first (ForwardConfig.heavy_first)
    (64, 64, 4, 3, True, True), (128, 64, 8, 3, False, True),
]]


def naive_concat_sdpa(q, k, v, prefix_k, prefix_v, mask):
    """What PEFT/HF do: B copies of the prefix, torch.cat, SDPA with a dense mask."""
    batch = q.shape[0]
    keys = torch.cat([prefix_k.expand(batch, -1, -1, -1), k], dim=2)
    values = torch.cat([prefix_v.expand(batch, -1, -1, -1), v], dim=2)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    dtype, device, H, D = torch.bfloat16, torch.device("cuda"), args.heads, args.head_dim
    results = []
    for shape in SHAPES:
        B, S, P = shape["B"], shape["S"], shape["P"]
        flops = 4 * B * H * D * (S * S / 2 + S * P)
        q = torch.randn(B, S, H, D, device=device, dtype=dtype).transpose(1, 2)
        k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype) for _ in "kv")
        prefix_k, prefix_v = (torch.randn(H, P, D, device=device, dtype=dtype) for _ in "kv")
        options = dict(causal=True, scale=1 / math.sqrt(D), key_padding_mask=None, prefix_index=None,
                       prefix_lens=None, window=None, softcap=None)
        mask = visibility_mask(B, S, S, P, device=device, causal=True, key_padding_mask=None, prefix_index=None,
                               prefix_lens=None, window=None)
        reference = naive_concat_sdpa(q, k, v, prefix_k[None], prefix_v[None], mask)
        row = dict(shape=shape, default=forward_config(D, dtype, S).__dict__, configs=[])
        row["naive_ms"] = triton.testing.do_bench(
            lambda: naive_concat_sdpa(q, k, v, prefix_k[None], prefix_v[None], mask), return_mode="median")
        row["flash_no_prefix_ms"] = triton.testing.do_bench(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), return_mode="median")
        for config in CANDIDATES:
            run = lambda: prefix_attention_forward(q, k, v, prefix_k[None], prefix_v[None], config=config, **options)
            try:
                error = (run()[0].float() - reference.float()).abs().max().item()
                ms = triton.testing.do_bench(run, return_mode="median")
            except Exception as exc:  # a config that does not fit this chip
                row["configs"].append(dict(config=config.__dict__, error=str(exc)[:200]))
                continue
            row["configs"].append(dict(config=config.__dict__, ms=ms, tflops=flops / ms / 1e9, max_error=error))
        results.append(row)
        print(f"B={B} S={S} P={P}: naive {row['naive_ms']:.3f} ms, flash without prefix "
              f"{row['flash_no_prefix_ms']:.3f} ms")
        for c in sorted((c for c in row["configs"] if "ms" in c), key=lambda c: c["ms"]):
            print(f"  {c['config']}: {c['ms']:.3f} ms {c['tflops']:.0f} TFLOP/s "
                  f"({row['naive_ms'] / c['ms']:.2f}x naive) err {c['max_error']:.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           environment=environment("cuda"), results=results), f, indent=1)


if __name__ == "__main__":
    main()

"""Run one prefix_attention call a few times, for a profiler to attach to (GPU only; no timing, no checks).

    ncu --clock-control none -k regex:"prefix|forward_(persistent_)?kernel|decode" -c 4 --set detailed \\
        python3 bench/profile_case.py --op decode --backend triton -B 128 -P 16384 -L 256 --heads 32/32

The shapes default to the first ANCHORS decode shape; --op forward / fwd+bwd take -S (queries = own keys).
--q-layout bshd passes q as a patched HF model does (a transposed [B, S, H, D] view). What earlier profiles
showed: bench/NOTES.md.
"""
from __future__ import annotations

import argparse

import torch

import prefix_kernels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=("forward", "fwd+bwd", "decode"), default="decode")
    parser.add_argument("--backend", choices=("auto", "triton", "cuda", "torch"), default="auto")
    parser.add_argument("-B", "--batch", type=int, default=64)
    parser.add_argument("-S", "--seq-q", type=int, default=2048, help="forward / fwd+bwd queries (= own keys)")
    parser.add_argument("-L", "--seq-k", type=int, default=256, help="decode: each sequence's own keys")
    parser.add_argument("-P", "--prefix", type=int, default=4096)
    parser.add_argument("--heads", default="32/32", help="Hq/Hkv")
    parser.add_argument("-D", "--head-dim", type=int, default=128)
    parser.add_argument("--q-layout", choices=("bhsd", "bshd"), default="bhsd")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cpu only to check the script itself")
    args = parser.parse_args(argv)
    heads_q, heads_kv = (int(h) for h in args.heads.split("/"))
    seq_q, seq_k = (1, args.seq_k) if args.op == "decode" else (args.seq_q, args.seq_q)
    options = dict(device=args.device, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32)
    if args.q_layout == "bshd":
        q = torch.randn(args.batch, seq_q, heads_q, args.head_dim, **options).transpose(1, 2)
    else:
        q = torch.randn(args.batch, heads_q, seq_q, args.head_dim, **options)
    k, v = (torch.randn(args.batch, heads_kv, seq_k, args.head_dim, **options) for _ in "kv")
    prefix_k, prefix_v = (torch.randn(heads_kv, args.prefix, args.head_dim, **options) for _ in "kv")
    training = args.op == "fwd+bwd"
    for t in (q, k, v, prefix_k, prefix_v):
        t.requires_grad_(training)
    for _ in range(args.calls):
        with torch.set_grad_enabled(training):
            out = prefix_kernels.prefix_attention(q, k, v, prefix_k, prefix_v, causal=True, backend=args.backend)
            if training:
                out.backward(torch.ones_like(out))
    if args.device == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()

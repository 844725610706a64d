"""`prefix-kernels demo`: attention over a shared prefix on this device, fused kernel against the naive concat.

Uses the attention geometry of the embedded default model, SmolLM2-135M (9 query heads, 3 KV heads, head dim
64): a batch of sequences that share one prefix. It checks the kernel against the naive concat, then times both
and reports peak memory. The model-level demo (prefix tuning SmolLM2 through the kernels) comes with the
Hugging Face integration (issue 5).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

SMOLLM2_GEOMETRY = dict(heads_q=9, heads_kv=3, head_dim=64)


def _timed(fn, device, repeats):
    fn()  # warm-up: compilation stays out of the numbers
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return (time.perf_counter() - start) / repeats, peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="prefix-kernels demo", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--prefix-len", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if not on_gpu:
        # The Triton kernels run on CPU tensors only through the interpreter, which is read at kernel definition.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from . import prefix_attention
    from .backends import choose_backend
    from .validation import validate

    batch = args.batch or (16 if on_gpu else 2)
    prefix_len = args.prefix_len or (1024 if on_gpu else 64)
    seq_len = args.seq_len or (512 if on_gpu else 32)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    g = SMOLLM2_GEOMETRY
    print(f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if on_gpu else ''}, {dtype}, "
          f"batch {batch}, shared prefix {prefix_len}, own tokens {seq_len}, "
          f"{g['heads_q']}/{g['heads_kv']} heads, head dim {g['head_dim']} (SmolLM2-135M's attention)")
    q = torch.randn(batch, seq_len, g["heads_q"], g["head_dim"], device=device, dtype=dtype).transpose(1, 2)
    k, v = (torch.randn(batch, g["heads_kv"], seq_len, g["head_dim"], device=device, dtype=dtype) for _ in "kv")
    prefix_k, prefix_v = (torch.randn(g["heads_kv"], prefix_len, g["head_dim"], device=device, dtype=dtype)
                          for _ in "kv")
    call = validate(q, k, v, prefix_k, prefix_v, causal=True, scale=None, key_padding_mask=None, prefix_index=None,
                    prefix_lens=None, window=None, softcap=None, backend="auto")
    backend = choose_backend("auto", call)
    print(f"backend='auto' chose {backend!r}" + ("" if on_gpu else " (Triton interpreter on CPU: slow, exact)"))

    with torch.no_grad():
        fused = prefix_attention(q, k, v, prefix_k, prefix_v)
        naive = prefix_attention(q, k, v, prefix_k, prefix_v, backend="torch")
        error = (fused.float() - naive.float()).abs().max().item()
        print(f"max |fused - naive| = {error:.2e}")
        repeats = 20 if on_gpu else 2
        fused_time, fused_peak = _timed(lambda: prefix_attention(q, k, v, prefix_k, prefix_v), device, repeats)
        naive_time, naive_peak = _timed(lambda: prefix_attention(q, k, v, prefix_k, prefix_v, backend="torch"),
                                        device, repeats)
    print(f"fused ({backend}): {fused_time * 1e3:9.3f} ms" + (f", peak {fused_peak / 2**20:8.1f} MiB" if on_gpu else ""))
    print(f"naive concat:  {naive_time * 1e3:9.3f} ms" + (f", peak {naive_peak / 2**20:8.1f} MiB" if on_gpu else ""))
    if on_gpu:
        print(f"speed-up {naive_time / fused_time:.2f}x")
    else:
        print("CPU timings mean nothing here (the interpreter runs the kernel in numpy); run on a GPU for speed.")
    return 0 if error < (5e-2 if on_gpu else 1e-4) else 1

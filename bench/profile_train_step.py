"""Where the anchors train_step spends its GPU time: torch.profiler over a few steps, per variant, kernels grouped.

    python3 bench/profile_train_step.py --variants peft,ours,ours-lean --steps 2

Prints, per variant, the GPU time per step split into groups (matmul, attention, the lean kernels, other
elementwise/reduction kernels, optimizer) and the top kernels. No timing claims come from this (the profiler adds
its own overhead); it says where the time goes, which the anchors rows cannot. --device cpu --tiny checks the
script itself.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses

import torch

import prefix_kernels
from prefix_kernels.bench.cases import get_preset
from prefix_kernels.bench.models import build_llama

# Kernel-name fragments per group, first match wins (cuBLAS/CUTLASS names for the matmuls; ours by function name).
GROUPS = (
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas")),
    ("attention", ("_prefix_attention", "_bwd_preprocess", "flash", "fmha", "efficient_attention", "attention")),
    ("lean kernels", ("_rms_norm", "_swiglu", "_rope", "_cross_entropy")),
    ("optimizer", ("adam", "multi_tensor")),
    ("loss/softmax", ("softmax", "nll", "log_softmax")),
)


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, fragments in GROUPS:
        if any(fragment in lowered for fragment in fragments):
            return group
    return "other elementwise"


def build(variant: str, case, device):
    from peft import PrefixTuningConfig, get_peft_model

    model = build_llama(case, device)
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=case.prefix))
    runner = peft_model
    if variant != "peft":
        runner = prefix_kernels.patch(peft_model, backend="auto")
    if variant == "ours-lean":
        prefix_kernels.lean_training(peft_model, backend="auto")
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(case.vocab, (case.batch, case.seq), generator=torch.Generator().manual_seed(2)).to(device)

    def step():
        runner(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def profile(variant: str, case, device, steps: int, top: int) -> None:
    step = build(variant, case, device)
    step()  # warmup: compilations, allocator, cuBLAS handles
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    kernels = collections.Counter()
    for event in prof.key_averages():
        if device == "cpu":  # checking the script: the CPU ops stand in for kernels
            device_us = event.self_cpu_time_total
        elif event.device_type == torch.autograd.DeviceType.CUDA:  # kernels only: CPU ops would count them twice
            device_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        else:
            continue
        if device_us > 0:
            kernels[event.key] += device_us / steps / 1e3  # ms per step
    total = sum(kernels.values())
    groups = collections.Counter()
    for name, ms in kernels.items():
        groups[group_of(name)] += ms
    print(f"== {variant}: {total:.1f} ms of GPU kernels per step ({case.label})")
    for group, ms in groups.most_common():
        print(f"   {group:<18} {ms:8.1f} ms  {100 * ms / max(total, 1e-9):5.1f}%")
    for name, ms in kernels.most_common(top):
        print(f"   {ms:8.2f} ms  {group_of(name):<17} {name[:110]}")
    del step
    if device == "cuda":
        torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="peft,ours,ours-lean", help="comma list of peft, ours, ours-lean")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the smoke preset's tiny model (checks the script)")
    args = parser.parse_args(argv)
    preset = get_preset("smoke" if args.tiny else "anchors")
    case = next(c for c in preset.models if c.op == "train_step")
    if args.device == "cpu" and not args.tiny:
        case = dataclasses.replace(case, dtype="fp32")
    for variant in args.variants.split(","):
        if variant not in ("peft", "ours", "ours-lean"):
            raise SystemExit(f"unknown variant {variant!r}")
        profile(variant, case, args.device, args.steps, args.top)


if __name__ == "__main__":
    main()

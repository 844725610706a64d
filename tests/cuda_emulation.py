"""The host-emulated build of csrc/ (PK_EMULATE): the CUDA kernels' own source compiled with g++, their warp-level
instructions emulated by csrc/emulator/, registered as torch.ops.prefix_kernels_emulated on CPU tensors.
Built once per source change (torch's extension cache)."""
from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include dir (cuda_fp16.h, cuda_bf16.h are host-includable), or None."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    return next((c for c in candidates if (c / "cuda_fp16.h").exists()), None)


def unavailable_reason() -> str | None:
    if shutil.which("g++") is None and shutil.which("c++") is None:
        return "no host C++ compiler to build the emulated CUDA kernels"
    if cuda_include_dir() is None:
        return "no CUDA toolkit headers (cuda_fp16.h) to build the emulated CUDA kernels"
    if not (CSRC / "emulator" / "emulator.cpp").exists():
        return "csrc/emulator/ is missing"
    return None


def emulated_kernels():
    """torch.ops.prefix_kernels_emulated (forward, decode), built on first use."""
    return getattr(torch.ops, emulated_namespace())


@functools.cache
def emulated_namespace(defines: tuple[str, ...] = ()) -> str:
    """Builds the emulated ops (once per source change) and returns their torch.ops namespace:
    prefix_kernels_emulated for the shipped settings, prefix_kernels_emulated_<n> for a variant built with extra
    `defines` (e.g. "-DPK_FORWARD_STAGES=3": a tile setting bench/gpu_check.sh --tune-cuda times on a GPU)."""
    from torch.utils.cpp_extension import load

    name = "prefix_kernels_emulated"
    if defines:
        name += "_" + "".join(c if c.isalnum() else "_" for c in "".join(defines)).lower()
    load(
        name=name,
        sources=[str(CSRC / "emulator" / "emulated_ops.cpp"), str(CSRC / "emulator" / "emulator.cpp")],
        extra_include_paths=[str(CSRC), str(cuda_include_dir())],
        extra_cflags=["-DPK_EMULATE", f"-DPK_OPS_NAMESPACE={name}", *defines, "-O2", "-std=c++20", "-Wall",
                      "-Werror", "-Wno-unused-function"],
        extra_ldflags=["-lstdc++"],  # shared libstdc++, as setup.py insists (see there); enough for the host g++
        is_python_module=False,
        verbose=False,
    )
    return name

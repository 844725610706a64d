"""Build entry. The Python package needs no build; the optional CUDA extension (csrc/) is built here.

Knobs (environment):
  PREFIX_KERNELS_SKIP_CUDA_BUILD=1   never build the extension
  PREFIX_KERNELS_FORCE_CUDA_BUILD=1  fail instead of skipping when the extension cannot be built
  PREFIX_KERNELS_CUDA_ARCHS="8.0;9.0a"  archs to build for (default)
  MAX_JOBS                           parallel compile jobs (torch's own knob)
The extension is built only when csrc/ has kernel sources, torch is a CUDA build and nvcc is found.
"""
import glob
import os
import sys

from setuptools import setup


def cuda_extension():
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    force = os.environ.get("PREFIX_KERNELS_FORCE_CUDA_BUILD") == "1"
    if os.environ.get("PREFIX_KERNELS_SKIP_CUDA_BUILD") == "1":
        return None, "PREFIX_KERNELS_SKIP_CUDA_BUILD=1"
    if not sources:
        return None, "csrc/ has no kernel sources yet"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        return None, f"torch is not importable at build time ({exc})"
    if torch.version.cuda is None or CUDA_HOME is None:
        why = "torch is a CPU-only build" if torch.version.cuda is None else "nvcc / CUDA_HOME not found"
        if force:
            sys.exit(f"PREFIX_KERNELS_FORCE_CUDA_BUILD=1 but {why}")
        return None, why
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("PREFIX_KERNELS_CUDA_ARCHS", "8.0;9.0a"))
    ext = CUDAExtension(
        "prefix_kernels._C", sources,
        extra_compile_args={"cxx": ["-O3", "-Werror"], "nvcc": ["-O3", "--use_fast_math", "-Werror=all-warnings"]},
    )
    return (ext, BuildExtension), None


built, skipped_because = cuda_extension()
if skipped_because:
    print(f"prefix-kernels: skipping the CUDA extension: {skipped_because}", file=sys.stderr)
setup(
    ext_modules=[built[0]] if built else [],
    cmdclass={"build_ext": built[1]} if built else {},
)

"""How the Triton kernels are launched.

On the tensors' GPU: Triton launches a kernel on the *current* CUDA device, wherever its tensors are. A model split
across GPUs (transformers' device_map="auto") runs a layer on cuda:1 while cuda:0 is current: without this, its
kernels would run on cuda:0 against cuda:1 memory. Every launcher entry point is wrapped; the check costs one
current-device query per call, and nothing when the device is already current (the usual case).

With the options fixed: `launch` passes FP fusion (FMA contraction) explicitly. Triton 3.9 warns when a launch
leaves it unset, and 3.10 turns the default off, which would change every kernel's speed and rounding.
"""
from __future__ import annotations

import contextlib
import functools

import torch


def launch_device(t):
    """A context that makes t's CUDA device current for a launch (a no-op when it is, or t is not on a GPU)."""
    if (getattr(t, "is_cuda", False) and not torch.compiler.is_compiling()
            and t.device.index != torch.cuda.current_device()):
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


# FMA contraction on, as every Triton release before 3.10 did by default and every timing so far measured; a kernel
# that must not fuse (the rotary embedding: its rounding must match HF's) says enable_fp_fusion=False itself.
FP_FUSION = True

# CUDA's limit on a grid's axes 1 and 2 (axis 0 goes to 2^31 - 1). The kernels with B * H programs on axis 1 are
# launched per chunk of the batch past it (batch_chunks), the d prefix kernel (N * Hkv) per chunk of prefixes;
# launch() refuses any grid beyond it, naming the kernel, where CUDA would fail the launch with a bare "invalid
# argument". Tests lower it to split small batches.
MAX_GRID_YZ = 65535


def launch(kernel, grid, args, kwargs):
    """kernel[grid](*args, **kwargs) with enable_fp_fusion set (FP_FUSION unless kwargs says otherwise)."""
    if any(size > MAX_GRID_YZ for size in grid[1:]):
        raise ValueError(f"{kernel.__name__}: grid {tuple(grid)} has more than {MAX_GRID_YZ} programs on axis 1 or 2, "
                         "more than CUDA launches")
    kernel[grid](*args, **with_fixed_options(kwargs))


def chunk_ranges(count: int, heads: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering range(count), each small enough that (stop - start) * heads programs on grid
    axis 1 stay within MAX_GRID_YZ (one item at least: heads past the limit are launch()'s to refuse)."""
    per_chunk = max(1, MAX_GRID_YZ // heads)
    return [(start, min(start + per_chunk, count)) for start in range(0, count, per_chunk)]


def batch_chunks(heads: int, *tensors):
    """Batch-major tensors (None passes through) cut into chunks of whole sequences, each small enough that a
    launch with (its sequences) * heads programs on grid axis 1 stays within MAX_GRID_YZ. One chunk, the tensors
    themselves, unless B * heads passes the limit (B = 4096 at 16 heads)."""
    ranges = chunk_ranges(tensors[0].shape[0], heads)
    if len(ranges) <= 1:
        return [tensors]
    return [tuple(None if t is None else t[start:stop] for t in tensors) for start, stop in ranges]


def with_fixed_options(kwargs: dict) -> dict:
    """The launch options every launch passes (the compile check applies them too)."""
    return {"enable_fp_fusion": FP_FUSION, **kwargs}


def on_first_tensor_device(launcher):
    """Wrap a launcher whose first argument is a tensor on the device its kernels must run on."""
    @functools.wraps(launcher)
    def on_device(first, *args, **kwargs):
        with launch_device(first):
            return launcher(first, *args, **kwargs)

    return on_device

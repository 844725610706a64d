"""The optional compiled CUDA extension (csrc/): which calls it serves, why not, and its ops for attention.py.

`prefix_kernels._C` (built by setup.py where nvcc and a CUDA build of torch are present) registers
`torch.ops.prefix_kernels_cuda.forward` and `.decode`: fp16/bf16, head dims 64 and 128, GQA, causal,
key_padding_mask, several prefixes and prefix_lens. Anything else (fp32, other head dims, window, softcap, head
dims that are not contiguous) is served by Triton under backend="auto" and refused, with the reason, under
backend="cuda". The backward of a CUDA forward is the Triton backward (same out/lse contract).

"auto" picks CUDA only where a GPU run measured it faster than Triton (auto_prefers_cuda; bench/NOTES.md): small
decode calls. The forward (prefill, training) stays on Triton: 197 against 415 TFLOP/s on the H100.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Optional

import torch
from torch import Tensor

from .autograd import empty_out_and_lse

# "auto" sends a decode call to CUDA while its packed prefix work, rows per KV head (B * G * S) times prefix keys,
# is at most this. Such calls are bound by host time per call, less for the one torch op: on the H100 (c194848) at
# B=64 P=4096 the CUDA decode took 0.159 ms eagerly against Triton's 0.380, while replayed from CUDA graphs
# Triton was the faster kernel (0.131 vs 0.158; on all four ANCHORS decode shapes), so code that captures its
# decode step by hand should name backend="triton" (auto does not switch under a manual capture: the usual eager
# warm-up would leave the Triton kernel cold for the capture). Under torch.compile auto keeps to Triton: a compiled
# decode step is replayed from CUDA graphs in the usual mode ("reduce-overhead", what generate() compiles a static
# cache's step with), whose warm-up run launches the kernel the graph then captures. Past the threshold the prefix
# part turns compute-bound, where the Triton decode is faster in any case (0.193 vs 0.336 ms at 1024 rows x 16384
# keys).
AUTO_CUDA_DECODE_MAX_WORK = 256 * 4096
HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)
_HOW_TO_BUILD = ("build it with `python3 setup.py build_ext --inplace` where nvcc and a CUDA build of torch are "
                 "present")

if importlib.util.find_spec("prefix_kernels._C") is None:  # the normal case on CPU machines
    _C = None
    UNAVAILABLE_REASON = f"the CUDA extension prefix_kernels._C is not built ({_HOW_TO_BUILD}), use backend='triton'"
else:
    try:
        _C = importlib.import_module("prefix_kernels._C")  # loading it registers torch.ops.prefix_kernels_cuda
        UNAVAILABLE_REASON = None
    except ImportError as exc:  # built against another torch, say
        _C = None
        UNAVAILABLE_REASON = f"the CUDA extension prefix_kernels._C failed to load ({exc}); re-{_HOW_TO_BUILD}"


_FAKES_REGISTERED: set[str] = set()


def _register_fakes(namespace: str) -> None:
    """Fake impls (shapes only) so both ops trace under torch.compile and run under FakeTensorMode."""
    if namespace in _FAKES_REGISTERED:
        return
    _FAKES_REGISTERED.add(namespace)

    def fake(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, prefix_lens, causal, scale):
        return empty_out_and_lse(q)
    for op in ("forward", "decode"):
        torch.library.register_fake(f"{namespace}::{op}")(fake)


class _Kernels:
    """Where the ops live and which device their tensors must be on: the real extension (CUDA), or the host
    emulation of the same kernels that the tests build (CPU; see use_emulated_kernels)."""
    namespace: Optional[str] = "prefix_kernels_cuda" if _C is not None else None
    device_type = "cuda"


if _C is not None:
    _register_fakes("prefix_kernels_cuda")


def use_kernels(namespace: Optional[str], device_type: str = "cuda") -> tuple[Optional[str], str]:
    """Route backend="cuda" to the ops of `namespace` on `device_type` tensors; returns the previous routing.
    Tests route it to "prefix_kernels_emulated" on "cpu": the host-emulated build of csrc/ (tests/cuda_emulation.py),
    the same kernels on CPU tensors, so the dispatch, autograd and decode paths run without a GPU."""
    previous = (_Kernels.namespace, _Kernels.device_type)
    if namespace is not None:
        _register_fakes(namespace)
    _Kernels.namespace, _Kernels.device_type = namespace, device_type
    return previous


def _alignment_reason(name: str, t: Tensor) -> str | None:
    if t.numel() == 0:
        return None
    if t.stride(-1) != 1:
        return f"{name} has head-dim stride {t.stride(-1)}; the CUDA kernels need a contiguous head dim"
    if any(size > 1 and stride % 8 for size, stride in zip(t.shape[:-1], t.stride()[:-1])):
        return f"{name} has strides {t.stride()}; the CUDA kernels need strides in multiples of 8 elements"
    # Under torch.compile the tensors are fakes without storage: the op itself checks the address at run time.
    if not torch.compiler.is_compiling() and t.data_ptr() % 16:
        return f"{name} is not 16-byte aligned"
    return None


def unavailable_reason(call) -> str | None:
    """Why the CUDA backend cannot serve this call, or None if it can."""
    q = call.q
    device_type = _Kernels.device_type if _Kernels.namespace is not None else "cuda"
    if q.device.type != device_type:  # first: building the extension would not help CPU tensors
        where = " (on the CPU: backend='torch', or 'triton' under TRITON_INTERPRET=1)" if q.device.type == "cpu" else ""
        return f"the CUDA kernels run on CUDA tensors, q is on {q.device}{where}"
    if _Kernels.namespace is None:
        return UNAVAILABLE_REASON
    if q.dtype not in DTYPES:
        return f"the CUDA kernels take float16 or bfloat16, got {q.dtype}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"the CUDA kernels take head dims {HEAD_DIMS}, got {q.shape[-1]}"
    if call.window is not None:
        return "the CUDA kernels have no sliding window"
    if call.softcap is not None:
        return "the CUDA kernels have no softcap"
    if q.device.type == "cuda" and not torch.compiler.is_compiling():
        major, minor = torch.cuda.get_device_capability(q.device)
        if major < 8:
            return f"the CUDA kernels need compute capability 8.0 or newer, this GPU is {major}.{minor}"
    for name in ("q", "k", "v", "prefix_k", "prefix_v"):
        reason = _alignment_reason(name, getattr(call, name))
        if reason:
            return reason
    return None


def auto_prefers_cuda(call) -> bool:
    """Whether "auto" should run this call on the CUDA kernels, where they can serve it (unavailable_reason)."""
    if not call.uses_decode or torch.compiler.is_compiling():
        return False
    batch, heads_q, seq_q, _ = call.q.shape
    heads_kv, prefix_len = call.prefix_k.shape[1], call.prefix_k.shape[2]
    return batch * (heads_q // heads_kv) * seq_q * prefix_len <= AUTO_CUDA_DECODE_MAX_WORK


def _args(call):
    return (call.q, call.k, call.v, call.prefix_k, call.prefix_v, call.key_padding_mask, call.prefix_index,
            call.prefix_lens, call.causal, call.scale)


def kernels():
    """The op namespace serving backend="cuda": torch.ops.prefix_kernels_cuda, or the emulated build in tests."""
    return getattr(torch.ops, _Kernels.namespace)


def cuda_decode_attention(call):
    """(out, lse) through the CUDA decode (packed prefix partials, split-K, merge); no autograd."""
    return kernels().decode(*_args(call))


def cuda_prefix_attention(call):
    """(out, lse) of a validated call through the differentiable CUDA forward (Triton backward)."""
    from .autograd import differentiable

    return differentiable(torch.ops.prefix_kernels.prefix_attention_fwd_cuda, call)

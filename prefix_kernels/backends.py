"""Which backend serves a call: "auto" picks the fastest one that can, an explicit one says why it cannot."""
from __future__ import annotations

import torch

from . import cuda


def triton_unavailable_reason(call) -> str | None:
    """Why the Triton backend cannot serve this call, or None if it can."""
    return triton_device_reason(call.q.device)


def triton_device_reason(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on tensors of this device, or None if they can."""
    try:
        from .triton import forward
    except ImportError as exc:
        return triton_import_failure(exc)
    if device.type == "cuda":
        if torch.compiler.is_compiling():
            # A device query is a graph break under torch.compile(fullgraph=True); an old GPU then fails in
            # Triton's own compile instead of here.
            return None
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"the Triton kernels need a GPU of compute capability 8.0 or newer, this one is {major}.{minor}"
        return None
    if device.type == "cpu":
        if forward.INTERPRETED:
            return None
        return ("Triton runs on CUDA tensors, or on CPU tensors only under the Triton interpreter: set "
                "TRITON_INTERPRET=1 before prefix_kernels is imported")
    return f"Triton does not run on {device.type} tensors"


def triton_import_failure(exc: ImportError) -> str:
    """What to install when the Triton kernels cannot be imported: triton itself, or a module it imports (numpy,
    which the interpreter needs and triton does not declare)."""
    missing = (getattr(exc, "name", None) or "").split(".")[0]
    if missing and missing not in ("triton", "prefix_kernels"):
        return f"Triton cannot be imported: it needs {missing} ({exc}); install {missing} or use backend='torch'"
    return f"Triton is not importable ({exc}); install triton or use backend='torch'"


def choose_backend(requested: str, call) -> str:
    """The backend that runs `call`; raises ValueError when an explicit backend cannot serve it."""
    reasons = {"triton": triton_unavailable_reason, "cuda": cuda.unavailable_reason}
    if requested == "torch":
        return "torch"
    if requested != "auto":
        reason = reasons[requested](call)
        if reason is not None:
            raise ValueError(f"backend={requested!r} cannot serve this call: {reason}")
        return requested
    # CUDA only for the calls where a GPU run measured it faster than Triton (small decode calls).
    if cuda.auto_prefers_cuda(call) and cuda.unavailable_reason(call) is None:
        return "cuda"
    if triton_unavailable_reason(call) is None:
        return "triton"
    return "torch"

"""The optional compiled CUDA extension (csrc/). The package works without it; this says why it is absent."""
from __future__ import annotations

import importlib
import importlib.util

_HOW_TO_BUILD = "build it with `pip install -e .` where nvcc and a CUDA build of torch are present"

if importlib.util.find_spec("prefix_kernels._C") is None:  # the normal case on CPU machines
    _C = None
    UNAVAILABLE_REASON = f"the CUDA extension prefix_kernels._C is not built ({_HOW_TO_BUILD}), use backend='triton'"
else:
    try:
        _C = importlib.import_module("prefix_kernels._C")  # built by setup.py from csrc/
        UNAVAILABLE_REASON = None
    except ImportError as exc:  # built against another torch, say
        _C = None
        UNAVAILABLE_REASON = f"the CUDA extension prefix_kernels._C failed to load ({exc}); re-{_HOW_TO_BUILD}"


def unavailable_reason(call) -> str | None:
    """Why the CUDA backend cannot serve this call, or None if it can."""
    if _C is None:
        return UNAVAILABLE_REASON
    return "the CUDA extension has no prefix_attention op yet"

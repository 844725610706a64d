"""lean_training's kernels as compile-check cases (see compile_check.py): every dtype, each gradient subset, and
row widths that cover every block size and warp count the launchers choose (up to MAX_NORM_WIDTH)."""
from __future__ import annotations

import torch

from . import lean_ops

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NORM_WIDTHS = (80, 2048, 8192, lean_ops.MAX_NORM_WIDTH)
VOCABS = (97, 32000, 128256)
ROPE_DIMS = (64, 80, 128, 256)
GRADIENT_SUBSETS = ((True, True), (True, False), (False, True))


def _name(dtype):
    return str(dtype).removeprefix("torch.")


def lean_cases():
    for dtype in DTYPES:
        d = _name(dtype)
        for width in NORM_WIDTHS:
            x = torch.empty(4, width, dtype=dtype)
            weight = torch.empty(width, dtype=dtype)
            rstd = torch.empty(4)
            _, args, kwargs = lean_ops.rms_norm_forward_launch(x, weight, torch.empty_like(x), rstd, 1e-6)
            yield f"lean-rmsnorm-fwd-{d}-w{width}", lean_ops._rms_norm_fwd, args, kwargs
            for need_dx, need_dw in GRADIENT_SUBSETS:
                dx = torch.empty_like(x) if need_dx else None
                partial = torch.empty(2, width) if need_dw else None
                _, args, kwargs = lean_ops.rms_norm_backward_launch(x, x, weight, rstd, dx, partial, 2, need_dx,
                                                                    need_dw)
                yield (f"lean-rmsnorm-bwd-{d}-w{width}-dx{int(need_dx)}-dw{int(need_dw)}", lean_ops._rms_norm_bwd,
                       args, kwargs)
        # the mixed case of a float32 weight (a float32 output) over low-precision rows
        x = torch.empty(4, 2048, dtype=dtype)
        weight = torch.empty(2048)
        _, args, kwargs = lean_ops.rms_norm_forward_launch(x, weight, torch.empty(4, 2048), torch.empty(4), 1e-6)
        yield f"lean-rmsnorm-fwd-{d}-w2048-float32-weight", lean_ops._rms_norm_fwd, args, kwargs

        act = torch.empty(4, 8192, dtype=dtype)
        _, args, kwargs = lean_ops.swiglu_forward_launch(act, act, torch.empty_like(act))
        yield f"lean-swiglu-fwd-{d}", lean_ops._swiglu_fwd, args, kwargs
        for need_gate, need_up in GRADIENT_SUBSETS:
            _, args, kwargs = lean_ops.swiglu_backward_launch(act, act, act, act if need_gate else None,
                                                              act if need_up else None)
            yield f"lean-swiglu-bwd-{d}-dgate{int(need_gate)}-dup{int(need_up)}", lean_ops._swiglu_bwd, args, kwargs

        for dim in ROPE_DIMS:
            for seq in (1, 4096):  # a decode step's one position; the widest position tile
                x = torch.empty(2, seq, 8, dim, dtype=dtype).transpose(1, 2)  # HF's [B, H, S, D] view
                cos = torch.empty(1, seq, dim, dtype=dtype)
                for backward in (False, True):
                    _, args, kwargs = lean_ops.rope_launch(x, cos, cos, torch.empty_like(x), backward)
                    yield (f"lean-rope-{'bwd' if backward else 'fwd'}-{d}-d{dim}-s{seq}", lean_ops._rope, args,
                           kwargs)

        for vocab in VOCABS:
            logits = torch.empty(4, vocab, dtype=dtype)
            targets = torch.empty(4, dtype=torch.int64)
            rows, stats = torch.empty(4), torch.empty(4, 2)
            _, args, kwargs = lean_ops.cross_entropy_forward_launch(logits, targets, rows, stats)
            yield f"lean-xent-fwd-{d}-v{vocab}", lean_ops._cross_entropy_fwd, args, kwargs
            _, args, kwargs = lean_ops.cross_entropy_backward_launch(rows, logits, targets, stats, logits)
            yield f"lean-xent-bwd-{d}-v{vocab}", lean_ops._cross_entropy_bwd, args, kwargs

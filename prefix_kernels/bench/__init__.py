"""The benchmark suite behind `prefix-kernels bench` (issue 4).

    python -m prefix_kernels.bench --preset anchors --out DIR

cases.py: presets and sizes; providers.py: ours and the baselines; harness.py: guard, time, memory;
roofline.py: FLOPs, bytes, measured ceilings; models.py: training step and generate rows; report.py: outputs.
"""
from __future__ import annotations

# Bound here, not through a lazy wrapper: importing the submodule prefix_kernels.bench.main rebinds the package's
# `main` to that module, so a wrapper named main was replaced by the module once anything imported it.
from .main import main

__all__ = ["main"]

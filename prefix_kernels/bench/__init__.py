"""The benchmark suite behind `prefix-kernels bench` (issue 4).

    python -m prefix_kernels.bench --preset anchors --out DIR

cases.py: presets and sizes; providers.py: ours and the baselines; harness.py: guard, time, memory;
roofline.py: FLOPs, bytes, measured ceilings; models.py: training step and generate rows; report.py: outputs.
"""
from __future__ import annotations


def main(argv=None) -> int:
    from .main import main as _main
    return _main(argv)


__all__ = ["main"]

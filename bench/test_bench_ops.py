"""pytest-benchmark entries over the same harness as `prefix-kernels bench` (issue 4).

Run explicitly; the default `pytest` run collects tests/ only:
    python -m pytest bench/test_bench_ops.py --benchmark-only                       # anchors on a GPU, smoke on CPU
    PREFIX_KERNELS_BENCH_PRESET=sweep python -m pytest bench/test_bench_ops.py --benchmark-json out.json
Every entry first passes the correctness guard (the provider's output against the float32 reference).
`prefix-kernels bench` is the fuller tool (roofline floor, peak memory, model rows, markdown and plots).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():  # before prefix_kernels' Triton kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("pytest_benchmark")

from prefix_kernels.bench.cases import get_preset  # noqa: E402
from prefix_kernels.bench.harness import case_tensors, guarded_call  # noqa: E402
from prefix_kernels.bench.providers import PROVIDERS, Unavailable  # noqa: E402
from prefix_kernels.bench.timing import synchronize  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESET = os.environ.get("PREFIX_KERNELS_BENCH_PRESET", "anchors" if DEVICE.type == "cuda" else "smoke")
CASES = get_preset(PRESET).ops
_TENSORS = {}


def _tensors(case):
    if case not in _TENSORS:
        _TENSORS.clear()  # one case's tensors at a time (GPU memory)
        _TENSORS[case] = case_tensors(case, DEVICE)
    return _TENSORS[case]


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.label.replace(' ', '-')}" for c in CASES])
def test_op(benchmark, case, provider):
    provider = PROVIDERS[provider]
    if case.op not in provider.ops:
        pytest.skip(f"{provider.name} does not take part in {case.op}")
    inputs, dout, reference = _tensors(case)
    try:
        call, check = guarded_call(case, provider, inputs, dout, reference)
    except Unavailable as exc:
        pytest.skip(f"n/a: {exc}")
    assert check["correct"] is not False, f"{provider.name} disagrees with the reference: {check['errors']}"
    benchmark.group = f"{case.op} {case.label}"
    benchmark.extra_info.update(case=case.as_dict(), provider=provider.name, errors=check["errors"])

    def timed():
        call()
        synchronize(DEVICE)
    benchmark.pedantic(timed, rounds=20 if DEVICE.type == "cuda" else 3, warmup_rounds=2)

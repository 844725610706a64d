"""The compiled CUDA extension prefix_kernels._C (csrc/): its two ops are registered with the schema the Python side
calls, their fake impls (prefix_kernels/cuda.py) give the output shapes torch.compile traces with, and a call on CPU
tensors is refused.

Cheap: nothing is compiled or launched here (setup.py builds the extension; the kernel tests run it on a GPU).
Skipped where the extension is not built, with the reason prefix_kernels.cuda gives, except under
PREFIX_KERNELS_FORCE_CUDA_BUILD=1 (CI compiles csrc/ on its CPU machine): there a missing extension fails.
"""
import os
import shutil
import subprocess

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from prefix_kernels import cuda

OPS = ("forward", "decode")
ARGUMENTS = [  # (name, type) as torch's schema parser spells them
    ("q", "Tensor"), ("k", "Tensor"), ("v", "Tensor"), ("prefix_k", "Tensor"), ("prefix_v", "Tensor"),
    ("key_padding_mask", "Optional[Tensor]"), ("prefix_index", "Optional[Tensor]"),
    ("prefix_lens", "Optional[Tensor]"), ("causal", "bool"), ("scale", "float"),
]


@pytest.fixture(scope="module")
def ops():
    if cuda._C is None:
        if os.environ.get("PREFIX_KERNELS_FORCE_CUDA_BUILD") == "1":
            pytest.fail(f"PREFIX_KERNELS_FORCE_CUDA_BUILD=1 but {cuda.UNAVAILABLE_REASON}")
        pytest.skip(cuda.UNAVAILABLE_REASON)
    return torch.ops.prefix_kernels_cuda


def test_extension_loaded(ops):
    assert cuda.UNAVAILABLE_REASON is None
    for name in OPS:
        assert hasattr(ops, name), f"prefix_kernels._C registers no prefix_kernels_cuda::{name}"


def test_extension_links_the_shared_libstdcxx(ops):
    """A private static libstdc++ copy in _C (a compiler wrapper adding -static-libstdc++) broke every number
    formatted into an error message on the GPU image: a crash there, a silently dropped number elsewhere."""
    if shutil.which("readelf") is None:
        pytest.skip("no readelf to list the extension's shared-library dependencies")
    dynamic = subprocess.run(["readelf", "-d", cuda._C.__file__], capture_output=True, text=True, check=True).stdout
    assert "[libstdc++.so.6]" in dynamic, f"{cuda._C.__file__} does not link libstdc++ dynamically:\n{dynamic}"


@pytest.mark.parametrize("name", OPS)
def test_schema(ops, name):
    schema = getattr(ops, name).default._schema
    assert [(a.name, str(a.type)) for a in schema.arguments] == ARGUMENTS, str(schema)
    assert [str(r.type) for r in schema.returns] == ["Tensor", "Tensor"], str(schema)


def inputs(B, Hq, Hkv, S, L, P, D, dtype, device, prefixes=None):
    """q as the transposed view HF hands over; one prefix [Hkv, P, D], or N of them with index, lengths and a
    key padding mask."""
    q = torch.empty(B, S, Hq, D, dtype=dtype, device=device).transpose(1, 2)
    k = torch.empty(B, Hkv, L, D, dtype=dtype, device=device)
    v = torch.empty_like(k)
    if prefixes is None:
        prefix_k = torch.empty(Hkv, P, D, dtype=dtype, device=device)
        return (q, k, v, prefix_k, torch.empty_like(prefix_k), None, None, None)
    prefix_k = torch.empty(prefixes, Hkv, P, D, dtype=dtype, device=device)
    return (q, k, v, prefix_k, torch.empty_like(prefix_k),
            torch.ones(B, L, dtype=torch.bool, device=device),
            torch.zeros(B, dtype=torch.int32, device=device),
            torch.full((prefixes,), P, dtype=torch.int32, device=device))


CASES = [  # (op, B, Hq, Hkv, S, L, P, D, dtype, prefixes)
    ("forward", 2, 6, 3, 17, 33, 5, 80, torch.bfloat16, None),
    ("forward", 3, 4, 4, 64, 64, 16, 128, torch.float16, 2),
    ("forward", 1, 8, 1, 1, 7, 0, 64, torch.float32, None),
    ("decode", 4, 8, 2, 1, 40, 128, 128, torch.bfloat16, None),
    ("decode", 5, 9, 3, 4, 12, 32, 64, torch.float16, 3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "{}-B{}-Hq{}-Hkv{}-S{}-L{}-P{}-D{}-{}-N{}".format(
    *c[:8], str(c[8]).removeprefix("torch."), c[9]))
def test_fake_shapes(ops, case):
    name, B, Hq, Hkv, S, L, P, D, dtype, prefixes = case
    with FakeTensorMode():  # CUDA fake tensors need no GPU
        args = inputs(B, Hq, Hkv, S, L, P, D, dtype, "cuda", prefixes)
        out, lse = getattr(ops, name)(*args, True, D ** -0.5)
    assert (out.shape, out.dtype, out.device) == ((B, Hq, S, D), dtype, args[0].device)
    assert (lse.shape, lse.dtype, lse.device) == ((B, Hq, S), torch.float32, args[0].device)


@pytest.mark.parametrize("name", OPS)
def test_cpu_tensors_are_refused(ops, name):
    args = inputs(2, 4, 2, 3, 5, 4, 32, torch.float32, "cpu")
    with pytest.raises((NotImplementedError, RuntimeError), match="CPU"):
        getattr(ops, name)(*args, True, 32 ** -0.5)

"""Bad input is refused before any launch, with a message that names the argument; backend choice."""
from unittest import mock

import pytest
import torch

from conftest import DEVICE, HAS_CUDA
from helpers import Case, make_inputs
import prefix_kernels.triton.decode as triton_decode
import prefix_kernels.triton.forward as triton_forward
from prefix_kernels import cuda, prefix_attention

CASE = Case(batch=2, heads_q=6, heads_kv=2, seq_q=3, seq_k=5, prefix_len=4, head_dim=32)


def _inputs(**overrides):
    q, k, v, pk, pv, options = make_inputs(CASE, torch.float32, DEVICE)
    tensors = dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv)
    for name in list(overrides):
        if name in tensors:
            tensors[name] = overrides.pop(name)
    options.update(overrides)
    return tensors, options


BAD_INPUTS = {
    "q-not-4d": (dict(q=torch.randn(2, 6, 32)), TypeError, ValueError, "q"),
    "k-batch": (dict(k=torch.randn(3, 2, 5, 32), v=torch.randn(3, 2, 5, 32)), ValueError, None, "k"),
    "v-shape": (dict(v=torch.randn(2, 2, 6, 32)), ValueError, None, "v"),
    "dtype-mismatch": (dict(k=torch.randn(2, 2, 5, 32, dtype=torch.float16)), TypeError, None, "k"),
    "int-q": (dict(q=torch.zeros(2, 6, 3, 32, dtype=torch.int32)), TypeError, None, "q"),
    "gqa-ratio": (dict(q=torch.randn(2, 5, 3, 32)), ValueError, None, "q.shape[1]"),
    "head-dim": (dict(q=torch.randn(2, 6, 3, 20), k=torch.randn(2, 2, 5, 20), v=torch.randn(2, 2, 5, 20),
                      prefix_k=torch.randn(2, 4, 20), prefix_v=torch.randn(2, 4, 20)), ValueError, None, "head dim"),
    "prefix-heads": (dict(prefix_k=torch.randn(3, 4, 32), prefix_v=torch.randn(3, 4, 32)), ValueError, None,
                     "prefix_k"),
    "prefix-v-shape": (dict(prefix_v=torch.randn(2, 5, 32)), ValueError, None, "prefix_v"),
    "prefix-5d": (dict(prefix_k=torch.randn(1, 1, 2, 4, 32)), ValueError, None, "prefix_k"),
    "n-prefixes-without-index": (dict(prefix_k=torch.randn(3, 2, 4, 32), prefix_v=torch.randn(3, 2, 4, 32)),
                                 ValueError, None, "prefix_index"),
    "no-prefix-at-all": (dict(prefix_k=torch.randn(0, 2, 4, 32), prefix_v=torch.randn(0, 2, 4, 32)), ValueError,
                         None, "prefix_k holds no prefix"),
    "index-out-of-range": (dict(prefix_k=torch.randn(3, 2, 4, 32), prefix_v=torch.randn(3, 2, 4, 32),
                                prefix_index=torch.tensor([0, 3])), ValueError, None, "prefix_index"),
    "index-negative": (dict(prefix_index=torch.tensor([0, -1])), ValueError, None, "prefix_index"),
    "index-float": (dict(prefix_index=torch.tensor([0.0, 0.0])), TypeError, None, "prefix_index"),
    "index-shape": (dict(prefix_index=torch.tensor([0, 0, 0])), ValueError, None, "prefix_index"),
    "lens-too-long": (dict(prefix_lens=torch.tensor([5])), ValueError, None, "prefix_lens"),
    "lens-shape": (dict(prefix_lens=torch.tensor([1, 2])), ValueError, None, "prefix_lens"),
    "mask-dtype": (dict(key_padding_mask=torch.ones(2, 5)), TypeError, None, "key_padding_mask"),
    "mask-shape": (dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, None, "key_padding_mask"),
    "window-zero": (dict(window=0), ValueError, None, "window"),
    "window-includes-prefix-not-bool": (dict(window=4, window_includes_prefix="yes"), TypeError, None,
                                        "window_includes_prefix"),
    "left-padding-without-prefix-window": (dict(window=4, left_padding=torch.tensor([0, 1])), ValueError, None,
                                           "window_includes_prefix=True"),
    "left-padding-past-length": (dict(window=4, window_includes_prefix=True, left_padding=torch.tensor([0, 6])),
                                 ValueError, None, "left_padding"),
    "left-padding-negative": (dict(window=4, window_includes_prefix=True, left_padding=torch.tensor([-1, 0])),
                              ValueError, None, "left_padding"),
    "left-padding-float": (dict(window=4, window_includes_prefix=True, left_padding=torch.tensor([0.0, 1.0])),
                           TypeError, None, "left_padding"),
    "left-padding-shape": (dict(window=4, window_includes_prefix=True, left_padding=torch.tensor([0, 1, 2])),
                           ValueError, None, "left_padding"),
    "softcap-negative": (dict(softcap=-1.0), ValueError, None, "softcap"),
    "softcap-inf": (dict(softcap=float("inf")), ValueError, None, "softcap"),  # every score was NaN
    "softcap-float32-overflow": (dict(softcap=1e39), ValueError, None, "softcap"),
    "softcap-bool": (dict(softcap=True), ValueError, None, "softcap"),
    "softcap-float32-underflow": (dict(softcap=1e38), ValueError, None, "softcap"),  # scale / softcap: a denormal
    "causal-not-bool": (dict(causal=1), TypeError, None, "causal"),
    "scale-nan": (dict(scale=float("nan")), ValueError, None, "scale"),
    "scale-negative": (dict(scale=-0.1), ValueError, None, "scale"),
    "scale-float32-underflow": (dict(scale=1e-39), ValueError, None, "scale"),  # 0 or a denormal in the kernels
    "scale-float32-overflow": (dict(scale=1e39), ValueError, None, "scale"),
    "backend-name": (dict(backend="flash"), ValueError, None, "backend"),
    "not-a-tensor": (dict(prefix_v=[1, 2]), TypeError, None, "prefix_v"),
    "sinks-shape": (dict(sinks=torch.zeros(2)), ValueError, None, "sinks"),  # one per KV head: Hq is 6
    "sinks-int": (dict(sinks=torch.zeros(6, dtype=torch.int64)), TypeError, None, "sinks"),
    "sinks-not-a-tensor": (dict(sinks=[0.0] * 6), TypeError, None, "sinks"),
    "sinks-device": (dict(sinks=torch.zeros(6, device="meta")), ValueError, None, "sinks"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_naming_the_argument(name, monkeypatch):
    overrides, error, alt_error, fragment = BAD_INPUTS[name]
    overrides = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v)
                 for k, v in overrides.items()}
    tensors, options = _inputs(**overrides)

    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched for bad input")

    # every Triton launch (forward, decode, merge: this case's S = 3 takes the decode) and the CUDA ops
    for module in (triton_forward, triton_decode):
        monkeypatch.setattr(module, "launch", no_launch)
    monkeypatch.setattr(cuda, "kernels", no_launch)
    with pytest.raises((error, alt_error) if alt_error else error) as info:
        prefix_attention(**tensors, **options)
    assert fragment in str(info.value), f"message does not name {fragment!r}: {info.value}"
    good_tensors, good_options = _inputs()  # the guard is live: the same call with good input launches
    with pytest.raises(AssertionError, match="a kernel was launched"):
        prefix_attention(**good_tensors, **good_options)


def test_index_values_are_read_unless_the_library_made_them(monkeypatch):
    """Reading an index's values syncs the host (per layer in a model). A caller's tensor is read on every call (a
    write through .data or numpy would not show in its version counter); one the library made and trusts
    (trust_index_values: a serving cache's index) is not, until an in-place write bumps its version counter, or a
    call needs narrower bounds than it was trusted for."""
    from prefix_kernels.validation import trust_index_values

    reads = []
    aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: reads.append(t) or aminmax(t))
    prefix_k, prefix_v = torch.randn(3, 2, 4, 32, device=DEVICE), torch.randn(3, 2, 4, 32, device=DEVICE)
    index = torch.tensor([2, 0], device=DEVICE)
    tensors, options = _inputs(prefix_k=prefix_k, prefix_v=prefix_v, prefix_index=index, backend="torch")
    for _ in range(3):
        prefix_attention(**tensors, **options)
    assert len(reads) == 3
    index.data[1] = 3   # no version bump: a caller's tensor is read anyway
    with pytest.raises(ValueError, match=r"prefix_index values must lie in \[0, 2\].*got values in \[2, 3\]"):
        prefix_attention(**tensors, **options)
    index[1] = 1

    reads.clear()
    trust_index_values("prefix_index", index, 0, 2)
    for _ in range(3):
        prefix_attention(**tensors, **options)
    assert not reads
    index[1] = 3   # out of range now, and the version counter tells
    with pytest.raises(ValueError, match=r"prefix_index values must lie in \[0, 2\].*got values in \[2, 3\]"):
        prefix_attention(**tensors, **options)
    index[1] = 1
    trust_index_values("prefix_index", index, 0, 2)
    fewer = dict(tensors, prefix_k=prefix_k[:2], prefix_v=prefix_v[:2])   # the same tensor, bounds [0, 1]
    with pytest.raises(ValueError, match=r"prefix_index values must lie in \[0, 1\]"):
        prefix_attention(**fewer, **options)
    other = index.clone()   # another tensor, not trusted
    reads.clear()
    prefix_attention(**tensors, **dict(options, prefix_index=other))
    assert len(reads) == 1


@pytest.mark.skipif(not HAS_CUDA, reason="needs a second device")
def test_device_mismatch_names_the_argument():
    tensors, options = _inputs()
    tensors["prefix_k"] = tensors["prefix_k"].cpu()
    with pytest.raises(ValueError, match="prefix_k"):
        prefix_attention(**tensors, **options)


def test_explicit_cuda_backend_explains_why_it_is_missing():
    """CPU tensors: the error says the kernels take CUDA tensors and what serves CPU ones, built or not (building
    would not help them); CUDA tensors: that it is not built, or (CI compiles it) that they are fp32."""
    from prefix_kernels import cuda

    tensors, options = _inputs()  # float32
    if tensors["q"].device.type != "cuda":
        why = "run on CUDA tensors, q is on cpu .*backend='torch'"
    elif cuda._C is None:
        why = "prefix_kernels._C"
    else:
        why = "float16 or bfloat16"
    with pytest.raises(ValueError, match=f"backend='cuda' cannot serve this call: .*{why}"):
        prefix_attention(**tensors, backend="cuda", **options)


def test_a_missing_module_under_triton_is_named():
    """triton declares no dependency, and its interpreter needs numpy: a base install without numpy said "install
    triton" although triton was there."""
    from prefix_kernels.backends import triton_import_failure

    assert "needs numpy" in triton_import_failure(ModuleNotFoundError("No module named 'numpy'", name="numpy"))
    assert "install triton" in triton_import_failure(ModuleNotFoundError("No module named 'triton'", name="triton"))


def test_auto_uses_a_kernel_not_the_reference_where_triton_can_run(monkeypatch):
    """On CUDA tensors, or on CPU under the interpreter, "auto" runs the Triton kernels (prefill or decode
    strategy, with or without gradients), never the naive reference."""
    import prefix_kernels.attention as attention

    def no_reference(*args, **kwargs):
        raise AssertionError("auto fell back to the reference")

    monkeypatch.setattr(attention, "prefix_attention_reference", no_reference)
    for seq_q in (1, 3, 20):
        tensors, options = _inputs()
        tensors["q"] = torch.randn(2, 6, seq_q, 32, device=DEVICE)
        prefix_attention(**tensors, **options)
        tensors = {name: t.requires_grad_() for name, t in tensors.items()}
        prefix_attention(**tensors, **options).sum().backward()


def test_triton_backend_on_cpu_without_interpreter_explains(monkeypatch):
    monkeypatch.setattr(triton_forward, "INTERPRETED", False)
    tensors, options = _inputs()
    tensors = {name: t.cpu() for name, t in tensors.items()}
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        prefix_attention(**tensors, backend="triton", **options)
    out = prefix_attention(**tensors, **options)  # "auto" serves it with the reference
    assert out.shape == tensors["q"].shape


@pytest.mark.parametrize("batch, heads, seq_q, prefix_len, grad, expected", [
    (64, (32, 8), 1, 4096, False, True),     # generate at the ANCHORS serving shape: launch-bound, CUDA measured faster
    (64, (32, 32), 1, 4096, False, True),    # memory-bound decode (even on the H100)
    (256, (32, 8), 1, 16384, False, False),  # compute-bound packed decode: Triton 1.8x faster
    (128, (32, 32), 1, 16384, False, False),
    (4, (32, 8), 1, 4096, True, False),      # with gradients: the differentiable forward (Triton), not decode
    (4, (32, 8), 64, 512, False, False),     # prefill
])
def test_auto_prefers_cuda_for_small_decode_calls_only(batch, heads, seq_q, prefix_len, grad, expected):
    """The rule "auto" uses to pick the CUDA kernels (where they can serve the call), on shapes alone."""
    from prefix_kernels import cuda
    from prefix_kernels.validation import validate

    heads_q, heads_kv = heads
    meta = dict(device="meta", dtype=torch.bfloat16)
    q = torch.empty(batch, heads_q, seq_q, 128, requires_grad=grad, **meta)
    k = v = torch.empty(batch, heads_kv, 16, 128, **meta)
    prefix_k = prefix_v = torch.empty(heads_kv, prefix_len, 128, **meta)
    call = validate(q, k, v, prefix_k, prefix_v, causal=True, scale=None, key_padding_mask=None, prefix_index=None,
                    prefix_lens=None, window=None, softcap=None, backend="auto")
    assert cuda.auto_prefers_cuda(call) is expected
    # in a compiled step (CUDA graphs, where the Triton decode measured faster on every shape): never
    with mock.patch.object(torch.compiler, "is_compiling", return_value=True):
        assert cuda.auto_prefers_cuda(call) is False

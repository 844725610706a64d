"""Every kernel backend's forward against the float64 reference, over odd shapes and every contract option."""
import math
from dataclasses import replace

import pytest
import torch
import triton
import triton.language as tl

from conftest import DEVICE, HAS_CUDA, KERNEL_DTYPES
from helpers import (Case, assert_attention_matches_truth, assert_close_to_truth, assert_lse_close, make_inputs,
                     max_error, truth_and_reference_error)
from prefix_kernels import prefix_attention
from prefix_kernels.backends import choose_backend
from prefix_kernels.triton.configs import forward_config
from prefix_kernels.triton.forward import (_tanh_to_a_few_ulp, _tma_compatible, forward_launch,
                                           prefix_attention_forward)
from prefix_kernels.validation import validate

CASES = [
    Case(batch=3, heads_q=4, heads_kv=4, seq_q=1, seq_k=23, prefix_len=37, head_dim=64),      # decode-shaped
    Case(batch=2, heads_q=6, heads_kv=2, seq_q=17, seq_k=40, prefix_len=37, head_dim=80),     # GQA 3, D 80, L > S
    Case(batch=2, heads_q=8, heads_kv=2, seq_q=17, seq_k=17, prefix_len=0, head_dim=128),     # P = 0, GQA 4
    Case(batch=2, heads_q=3, heads_kv=3, seq_q=17, seq_k=30, prefix_len=1, head_dim=64),      # P = 1
    Case(batch=3, heads_q=6, heads_kv=2, seq_q=17, seq_k=25, prefix_len=37, head_dim=64, num_prefixes=2,
         prefix_lens=(37, 5)),                                                                 # two prefixes
    Case(batch=3, heads_q=6, heads_kv=2, seq_q=17, seq_k=29, prefix_len=37, head_dim=64, padding="left"),
    Case(batch=2, heads_q=6, heads_kv=2, seq_q=17, seq_k=29, prefix_len=9, head_dim=64, padding="random",
         q_layout="bhsd", kv_slice=True),                                                      # strided k/v
    Case(batch=2, heads_q=6, heads_kv=2, seq_q=17, seq_k=17, prefix_len=0, head_dim=64, padding="empty-row"),
    Case(batch=3, heads_q=6, heads_kv=2, seq_q=17, seq_k=20, prefix_len=8, head_dim=64, num_prefixes=2,
         prefix_lens=(0, 8), padding="empty-row"),                                             # rows that see nothing
    Case(batch=2, heads_q=6, heads_kv=2, seq_q=17, seq_k=40, prefix_len=11, head_dim=64, window=5),
    Case(batch=2, heads_q=6, heads_kv=2, seq_q=17, seq_k=40, prefix_len=11, head_dim=64, softcap=2.0),
    Case(batch=2, heads_q=6, heads_kv=2, seq_q=17, seq_k=23, prefix_len=11, head_dim=64, scale=0.3,
         padding="left"),                                                                      # not 1/sqrt(D)
    Case(batch=2, heads_q=6, heads_kv=2, seq_q=17, seq_k=33, prefix_len=13, head_dim=96, causal=False),
    Case(batch=2, heads_q=3, heads_kv=1, seq_q=70, seq_k=150, prefix_len=130, head_dim=128, window=100,
         padding="right"),                                                                     # several tiles
    Case(batch=1, heads_q=2, heads_kv=1, seq_q=70, seq_k=150, prefix_len=130, head_dim=32, causal=False),
    # The window reaching into the prefix (window_includes_prefix: key p of a prefix of length P_n at p - P_n): two
    # prefixes of different lengths and left padding; a prefix reached by the first query blocks only, across
    # several tiles; a window that leaves no prefix key to any row.
    Case(batch=3, heads_q=6, heads_kv=2, seq_q=17, seq_k=29, prefix_len=37, head_dim=64, num_prefixes=2,
         prefix_lens=(37, 9), padding="left", window=33, window_includes_prefix=True),
    Case(batch=2, heads_q=3, heads_kv=1, seq_q=70, seq_k=150, prefix_len=130, head_dim=128, window=170,
         window_includes_prefix=True, softcap=2.0),
    Case(batch=2, heads_q=6, heads_kv=2, seq_q=17, seq_k=40, prefix_len=11, head_dim=64, window=5,
         window_includes_prefix=True),
    # ... measured past each row's left padding (left_padding: the serving cache's prompt, which the stock layout
    # puts after the padding): rows padded by 3, 10 and 17 keys, two prefix lengths; across several tiles.
    Case(batch=3, heads_q=6, heads_kv=2, seq_q=17, seq_k=29, prefix_len=37, head_dim=64, num_prefixes=2,
         prefix_lens=(37, 9), padding="left", window=33, window_includes_prefix=True, left_padding=True),
    Case(batch=3, heads_q=3, heads_kv=1, seq_q=70, seq_k=150, prefix_len=130, head_dim=128, padding="left",
         window=150, window_includes_prefix=True, left_padding=True),
    # Attention sinks (gpt-oss), applied to the kernels' (out, lse): rows that see nothing (their lse is the sink's),
    # a window; decode-shaped, through the decode kernels.
    Case(batch=3, heads_q=6, heads_kv=2, seq_q=17, seq_k=20, prefix_len=8, head_dim=64, num_prefixes=2,
         prefix_lens=(0, 8), padding="empty-row", window=9, sinks=True),
    Case(batch=3, heads_q=6, heads_kv=2, seq_q=1, seq_k=23, prefix_len=37, head_dim=64, padding="left", sinks=True),
]

BACKENDS = ["triton", "cuda"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _skip_if_unavailable(backend, tensors, options):
    try:
        choose_backend(backend, validate(*tensors, scale=options.get("scale"), prefix_index=options.get("prefix_index"),
                                         prefix_lens=options.get("prefix_lens"), backend=backend,
                                         **{k: options[k] for k in ("causal", "key_padding_mask", "window",
                                                                     "softcap")}))
    except ValueError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_matches_reference(case, dtype, backend):
    *tensors, options = make_inputs(case, dtype, DEVICE)
    _skip_if_unavailable(backend, tensors, options)
    (truth_out, truth_lse), reference_error = truth_and_reference_error(tensors, options, dtype)

    out, lse = prefix_attention(*tensors, return_lse=True, backend=backend, **options)

    assert_attention_matches_truth(out, lse, tensors[0], truth_out, truth_lse, reference_error, dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=lambda c: c.id)  # decode-shaped; prefill, left padding
def test_auto_backend_matches_reference(case, dtype):
    """What most callers use: "auto" picks a kernel (Triton, or the CUDA decode for small calls where it is built),
    and that kernel's result is held to the truth like an explicit backend's."""
    *tensors, options = make_inputs(case, dtype, DEVICE)
    (truth_out, truth_lse), reference_error = truth_and_reference_error(tensors, options, dtype)
    out, lse = prefix_attention(*tensors, return_lse=True, backend="auto", **options)
    assert_attention_matches_truth(out, lse, tensors[0], truth_out, truth_lse, reference_error, dtype)


@pytest.mark.parametrize("backend, dtype", [("torch", torch.bfloat16), ("triton", torch.float16)]
                         + ([("triton", torch.bfloat16)] if HAS_CUDA else []), ids=str)
def test_autocast_casts_the_inputs_as_sdpa_would(backend, dtype):
    """Under torch.autocast a mixed-precision model hands over q and k in float32 (after a float32 rotary) and v
    in the autocast dtype: the call runs on all of them in the autocast dtype (as SDPA does), bit for bit the call
    on inputs cast beforehand, instead of refusing the mixed dtypes (which broke HF Trainer's bf16=True)."""
    case = Case(batch=2, heads_q=6, heads_kv=2, seq_q=17, seq_k=21, prefix_len=9, head_dim=32, padding="left")
    *tensors, options = make_inputs(case, torch.float32, DEVICE)
    tensors[2] = tensors[2].to(dtype)  # v as the projection gave it; q, k, the prefix in float32
    with torch.autocast(DEVICE.type, dtype=dtype):
        out, lse = prefix_attention(*tensors, return_lse=True, backend=backend, **options)
    want, want_lse = prefix_attention(*(t.to(dtype) for t in tensors), return_lse=True, backend=backend, **options)
    assert out.dtype == dtype and torch.equal(out, want) and torch.equal(lse, want_lse)
    with pytest.raises(TypeError, match="v has dtype"):  # outside autocast the mix is still an error
        prefix_attention(*tensors, backend=backend, **options)


def test_every_sequence_sees_the_one_prefix_the_same(backend):
    """A prefix shared by the whole batch gives every sequence the same attention to it: the same queries (an
    expanded view of one row) with every own key masked agree across sequences and with the reference. (That the
    prefix is never copied per sequence: test_prefix_is_read_once_never_copied_per_sequence.)"""
    case = Case(batch=3, heads_q=2, heads_kv=1, seq_q=5, seq_k=5, prefix_len=19, head_dim=32)
    q, k, v, prefix_k, prefix_v, options = make_inputs(case, torch.float32, DEVICE)
    _skip_if_unavailable(backend, [q, k, v, prefix_k, prefix_v], options)
    # Masking every own key leaves the prefix alone: all sequences with the same queries agree.
    q = q[:1].expand_as(q)
    options["key_padding_mask"] = torch.zeros(case.batch, case.seq_k, dtype=torch.bool, device=DEVICE)
    out = prefix_attention(q, k, v, prefix_k, prefix_v, backend=backend, **options)
    assert torch.allclose(out[0], out[1]) and torch.allclose(out[0], out[2])
    ref = prefix_attention(q, k, v, prefix_k, prefix_v, backend="torch", **options)
    assert max_error(out, ref) < 1e-5


@pytest.mark.parametrize("seq_q", [1, 20], ids=["decode", "forward"])
def test_prefix_is_read_once_never_copied_per_sequence(seq_q):
    """The forward and the decode allocate nothing of the size of B copies of a prefix: no expanded, indexed or
    concatenated prefix anywhere (the backward's own test is in test_backward.py). Two prefixes picked per sequence
    (prefix_index), since prefix_k[prefix_index] is the copy an implementation would be tempted to make. The
    output itself ([B, Hq, S, D], a third of the bound here) is the largest thing allowed."""
    batch = 32
    case = Case(batch=batch, heads_q=2, heads_kv=1, seq_q=seq_q, seq_k=seq_q + 3, prefix_len=128, head_dim=32,
                num_prefixes=2, prefix_lens=(128, 50))
    *tensors, options = make_inputs(case, torch.float32, DEVICE)
    options["prefix_index"] = torch.arange(batch, device=DEVICE) % 2
    bound = batch * case.heads_kv * case.prefix_len * case.head_dim * 4 / 2  # half of one [B, Hkv, P, D] copy
    with torch.no_grad():
        prefix_attention(*tensors, backend="triton", **options)  # compiled (and its caches filled) first
        if DEVICE.type == "cuda":  # the caching allocator's peak: every allocation of the call, together
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            prefix_attention(*tensors, backend="triton", **options)
            torch.cuda.synchronize()
            assert 0 < torch.cuda.max_memory_allocated() - before < bound
            return
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            prefix_attention(*tensors, backend="triton", **options)
    allocations = [(e.name, e.cpu_memory_usage) for e in prof.events()
                   if e.name.startswith("aten::") and e.cpu_memory_usage > 0]
    assert allocations, "the profiler saw no allocation (not even the output): the check would be blind"
    for name, nbytes in allocations:
        assert nbytes < bound, (name, nbytes, bound)


def test_out_of_place_output_is_contiguous_and_fresh(backend):
    case = Case(batch=2, heads_q=2, heads_kv=1, seq_q=3, seq_k=7, prefix_len=4, head_dim=32)
    *tensors, options = make_inputs(case, torch.float32, DEVICE)
    _skip_if_unavailable(backend, tensors, options)
    out = prefix_attention(*tensors, backend=backend, **options)
    assert out.is_contiguous()
    assert out.data_ptr() != tensors[0].data_ptr()


def test_broadcast_tensors_take_pointer_loads_not_tma_descriptors():
    """A prefix broadcast over the KV heads (stride 0 over more than one element: the driver may refuse such a
    TMA map) takes the pointer loads even where the config asks for TMA, and still computes the reference; a
    stride 0 over a single element does not matter."""
    case = Case(batch=2, heads_q=4, heads_kv=2, seq_q=5, seq_k=6, prefix_len=16, head_dim=32)
    *tensors, options = make_inputs(case, torch.float32, DEVICE)
    tensors[3] = tensors[3][:1].expand(case.heads_kv, -1, -1)  # prefix_k [Hkv, P, D]: one head's keys for both
    assert tensors[3].stride(0) == 0
    assert not _tma_compatible(tensors[3]) and _tma_compatible(tensors[3][:1])
    call = validate(*tensors, backend="triton", **{"scale": None, "prefix_index": None, "prefix_lens": None, **options})
    config = replace(forward_config(case.head_dim, torch.float32, case.seq_q), tma=True)
    out = torch.empty_like(call.q)
    lse = torch.empty(call.q.shape[:3], device=DEVICE, dtype=torch.float32)
    _, _, kwargs = forward_launch(call.q, call.k, call.v, call.prefix_k, call.prefix_v, out, lse, config=config,
                                  **call.options())
    assert not kwargs["USE_DESC"]
    out = prefix_attention_forward(call.q, call.k, call.v, call.prefix_k, call.prefix_v, config=config,
                                   **call.options())[0]
    want = prefix_attention(*tensors, backend="torch", **options)
    assert max_error(out, want) < 1e-5


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("case", [c for c in CASES if c.prefix_len > 0], ids=lambda c: c.id)
def test_forward_through_tma_descriptors_matches_reference(case, dtype):
    """The Hopper variant (K/V tiles through TMA tensor descriptors; zero fill past the edges instead of masked
    loads) computes the same function. Runs where the default config may pick it (sm_90+) and in the
    interpreter."""
    if HAS_CUDA and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90+")
    *tensors, options = make_inputs(case, dtype, DEVICE)
    (truth_out, truth_lse), reference_error = truth_and_reference_error(tensors, options, dtype)
    call = validate(*tensors, backend="triton", **{"scale": None, "prefix_index": None, "prefix_lens": None, **options})
    config = replace(forward_config(case.head_dim, dtype, case.seq_q), tma=True)
    out = torch.empty_like(call.q)
    lse = torch.empty(call.q.shape[:3], device=DEVICE, dtype=torch.float32)
    _, _, kwargs = forward_launch(call.q, call.k, call.v, call.prefix_k, call.prefix_v, out, lse, config=config,
                                  **call.options())
    assert kwargs["USE_DESC"], "these tensors qualify for descriptors: the TMA path must be the one tested"

    out, lse = prefix_attention_forward(call.q, call.k, call.v, call.prefix_k, call.prefix_v, config=config,
                                        sinks=call.sinks, **call.options())

    assert_close_to_truth("out", out, truth_out, reference_error, dtype)
    assert torch.equal(torch.isinf(lse), torch.isinf(truth_lse))
    assert_lse_close(lse, truth_lse)


def test_a_grid_past_cudas_limit_is_refused_before_the_launch(monkeypatch):
    """More heads than a grid's axis 1 takes (even one sequence per launch) is a clear error naming the kernel,
    not CUDA's bare "invalid argument" at launch (the limit lowered to 5 here, against 6 query heads)."""
    from prefix_kernels.triton import device

    monkeypatch.setattr(device, "MAX_GRID_YZ", 5)
    case = Case(batch=2, heads_q=6, heads_kv=2, seq_q=3, seq_k=4, prefix_len=5, head_dim=32)
    *tensors, options = make_inputs(case, torch.float32, DEVICE, requires_grad=True)  # (the forward, not decode)
    with pytest.raises(ValueError, match=r"_prefix_attention_fwd: grid \(1, 6\) has more than 5 programs"):
        prefix_attention(*tensors, backend="triton", **options)


@triton.jit
def _tanh_kernel(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, _tanh_to_a_few_ulp(tl.load(X + offs, mask=offs < N)), mask=offs < N)


def test_softcap_tanh_is_within_a_few_ulp():
    """The fp32 path's tanh (softcap) against the float64 one over |x| from 1e-6 to 20, on both sides of the switch
    from the series to the exponential at 0.4: within 8 ulp (2.5 in the interpreter, whose exp2 is exact; a GPU's is
    an approximation to ~2^-22). 1 - 2 / (exp(2x) + 1), the 16-bit paths' formula, is off by ~1 ulp of 1.0 whatever
    x: 8e5 ulp at x = 1e-6."""
    magnitudes = torch.cat([torch.logspace(-6, math.log10(20), 4000), torch.linspace(0.39, 0.41, 1001)])
    x = torch.cat([magnitudes, -magnitudes]).to(DEVICE, torch.float32)
    y = torch.empty_like(x)
    _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    want = torch.tanh(x.double())
    ulp = torch.finfo(torch.float32).eps * torch.exp2(torch.floor(torch.log2(want.abs())))  # of tanh x in fp32
    assert float(((y.double() - want).abs() / ulp).max()) <= 8

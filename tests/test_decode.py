"""The decode strategy (S <= 16, no gradients) against the float64 reference and the prefill kernel, the Triton
merge of attention states, and CUDA-graph safety. Small shapes: this runs under the interpreter on CPU."""
import math
import os
import threading
from dataclasses import replace

import pytest
import torch

from conftest import DEVICE, HAS_CUDA, KERNEL_DTYPES
from helpers import (Case, assert_attention_matches_truth, assert_lse_close, make_inputs, max_error,
                     truth_and_reference_error)
from prefix_kernels import merge_attention_states, prefix_attention
from prefix_kernels.reference import merge_attention_states_reference
from prefix_kernels.triton import decode
from prefix_kernels.triton.configs import OWN_STREAM_MIN_OWN_BYTES, DecodeConfig, decode_launch_space
from prefix_kernels.triton.forward import prefix_attention_forward
from prefix_kernels.validation import validate

CASES = [
    Case(batch=5, heads_q=6, heads_kv=2, seq_q=1, seq_k=23, prefix_len=37, head_dim=64),       # GQA 3, L odd
    Case(batch=5, heads_q=4, heads_kv=4, seq_q=4, seq_k=21, prefix_len=1, head_dim=80),        # P = 1, D 80
    Case(batch=5, heads_q=8, heads_kv=2, seq_q=4, seq_k=19, prefix_len=0, head_dim=128),       # P = 0, GQA 4
    Case(batch=5, heads_q=6, heads_kv=2, seq_q=4, seq_k=25, prefix_len=37, head_dim=64, num_prefixes=2,
         prefix_lens=(37, 5), padding="left"),                                                  # two prefixes
    Case(batch=5, heads_q=6, heads_kv=2, seq_q=1, seq_k=20, prefix_len=8, head_dim=64, num_prefixes=2,
         prefix_lens=(0, 8), padding="empty-row"),                                              # rows see nothing
    Case(batch=5, heads_q=6, heads_kv=2, seq_q=4, seq_k=33, prefix_len=11, head_dim=64, window=5, softcap=2.0),
    Case(batch=5, heads_q=6, heads_kv=2, seq_q=1, seq_k=23, prefix_len=37, head_dim=64, scale=0.3),  # not 1/sqrt(D)
    Case(batch=3, heads_q=3, heads_kv=1, seq_q=4, seq_k=3, prefix_len=37, head_dim=64, causal=False,
         padding="random", q_layout="bhsd", kv_slice=True),                                     # L < S, strided
    # The window reaching into the prefix (key p at p - P_n): rows of 4 positions see 4 different prefix ranges;
    # two prefixes of different lengths, padding, several splits of the prefix.
    Case(batch=5, heads_q=6, heads_kv=2, seq_q=4, seq_k=13, prefix_len=201, head_dim=64, num_prefixes=2,
         prefix_lens=(201, 150), padding="left", window=150, window_includes_prefix=True),
    # ... measured past each row's left padding (3, 10, 4, 11, 5 keys): rows of one block start at other keys.
    Case(batch=5, heads_q=6, heads_kv=2, seq_q=4, seq_k=13, prefix_len=201, head_dim=64, num_prefixes=2,
         prefix_lens=(201, 150), padding="left", window=150, window_includes_prefix=True, left_padding=True),
    Case(batch=5, heads_q=6, heads_kv=2, seq_q=1, seq_k=151, prefix_len=201, head_dim=64),     # several splits
]

# A notional GPU of many SMs: makes the launcher split both the prefix and the own keys (Flash-Decoding).
MANY_SMS = 64


def _call(case, dtype):
    *tensors, options = make_inputs(case, dtype, DEVICE)
    return tensors, options


def _validated(tensors, options):
    return validate(*tensors, scale=options.get("scale"), backend="triton", causal=options["causal"],
                    key_padding_mask=options["key_padding_mask"], prefix_index=options.get("prefix_index"),
                    prefix_lens=options.get("prefix_lens"), window=options["window"], softcap=options["softcap"],
                    window_includes_prefix=options.get("window_includes_prefix", False),
                    left_padding=options.get("left_padding"))


def _decode_with(call, config, sms=None):
    """The Triton decode of a validated call with this DecodeConfig on `sms` notional SMs (default MANY_SMS)."""
    return decode.prefix_attention_decode(call.q, call.k, call.v, call.prefix_k, call.prefix_v, config=config,
                                          sms=sms or MANY_SMS, **call.options())


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_decode_matches_reference_and_prefill(case, dtype):
    tensors, options = _call(case, dtype)
    (truth_out, truth_lse), reference_error = truth_and_reference_error(tensors, options, dtype)
    call = _validated(tensors, options)

    out, lse = decode.prefix_attention_decode(call.q, call.k, call.v, call.prefix_k, call.prefix_v,
                                              sms=MANY_SMS, **call.options())

    assert_attention_matches_truth(out, lse, tensors[0], truth_out, truth_lse, reference_error, dtype)
    # The same numbers as the prefill kernel (up to summation order).
    prefill_out, prefill_lse = prefix_attention_forward(call.q, call.k, call.v, call.prefix_k, call.prefix_v,
                                                        **call.options())
    assert max_error(out, prefill_out) <= 2 * reference_error + 1e-5
    assert max_error(lse, prefill_lse) <= 1e-4


@pytest.mark.parametrize("sinks_dtype", ["q", torch.float32, torch.float64], ids=["sinks-as-q", "sinks-fp32",
                                                                                  "sinks-fp64"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_merge_takes_the_attention_sinks(dtype, sinks_dtype):
    """The decode's merge adds each head's sink as one more partial (value zero, LSE the sink) instead of the
    elementwise step after it: over prefix and own splits, with a row that sees nothing (its lse becomes the sink)
    and a head without a sink (-inf); the sinks in q's dtype, float32 (Flint keeps them so) or float64."""
    case = Case(batch=3, heads_q=6, heads_kv=2, seq_q=2, seq_k=151, prefix_len=201, head_dim=64, num_prefixes=2,
                prefix_lens=(0, 201), padding="empty-row", sinks=True)
    tensors, options = _call(case, dtype)
    sinks = options.pop("sinks").to(dtype if sinks_dtype == "q" else sinks_dtype)
    sinks[4] = float("-inf")
    (truth_out, truth_lse), reference_error = truth_and_reference_error(tensors, {**options, "sinks": sinks}, dtype)
    call = _validated(tensors, options)
    plan = decode.decode_plan(call.q, call.k, call.prefix_k, sms=MANY_SMS)
    assert plan[1][2] > 1 and plan[2][2] > 1, "prefix and own keys in several splits each"

    out, lse = decode.prefix_attention_decode(call.q, call.k, call.v, call.prefix_k, call.prefix_v, sinks=sinks,
                                              sms=MANY_SMS, **call.options())

    assert_attention_matches_truth(out, lse, tensors[0], truth_out, truth_lse, reference_error, dtype)
    assert torch.isinf(lse[0, 4]).all() and (out[0, 4] == 0).all()  # sees nothing, no sink: zeros and -inf
    assert torch.equal(lse[0, :4, :], sinks[:4, None].float().expand(4, case.seq_q))  # sees nothing but the sink


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_prefix_window_past_padding_reads_from_the_earliest_row_of_a_block(dtype):
    """With left_padding the rows of one row block start at prefix keys tiles apart (padding 0, 70 and 140 keys:
    first keys 250, 180, 110): the block reads from the earliest. (CASES pad rows a few keys apart, in one tile.)"""
    batch, heads, seq_k, prefix_len, head_dim = 3, 2, 150, 300, 64
    q = torch.randn(batch, heads, 1, head_dim, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(batch, heads, seq_k, head_dim, device=DEVICE, dtype=dtype) for _ in range(2))
    prefix_k, prefix_v = (torch.randn(heads, prefix_len, head_dim, device=DEVICE, dtype=dtype) for _ in range(2))
    pads = torch.tensor([0, 70, 140], device=DEVICE)
    options = dict(causal=True, key_padding_mask=torch.arange(seq_k, device=DEVICE) >= pads[:, None], window=200,
                   softcap=None, window_includes_prefix=True, left_padding=pads)
    tensors = [q, k, v, prefix_k, prefix_v]
    (truth_out, truth_lse), reference_error = truth_and_reference_error(tensors, options, dtype)
    call = _validated(tensors, options)
    out, lse = _decode_with(call, None)
    assert_attention_matches_truth(out, lse, q, truth_out, truth_lse, reference_error, dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("case", [c for c in CASES if c.prefix_len > 0], ids=lambda c: c.id)
def test_decode_prefix_through_tma_descriptors_matches_reference(case, dtype):
    """The Hopper prefix part (prefix K/V tiles through TMA descriptors, zero fill past P) computes the same
    function, split-K included. Runs on sm_90+ GPUs and in the interpreter."""
    if HAS_CUDA and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90+")
    tensors, options = _call(case, dtype)
    (truth_out, truth_lse), reference_error = truth_and_reference_error(tensors, options, dtype)
    call = _validated(tensors, options)
    base = decode.decode_plan(call.q, call.k, call.prefix_k, sms=MANY_SMS)[0]
    config = DecodeConfig(replace(base.prefix, tma=True), base.own)
    rows = call.q.shape[0] * call.q.shape[1] * call.q.shape[2]
    work = torch.empty(64, rows, call.q.shape[-1], device=DEVICE), torch.empty(64, rows, device=DEVICE)
    _, _, kwargs = decode.decode_launch(call.q, call.k, call.v, call.prefix_k, call.prefix_v, *work,
                                        config=config, sms=MANY_SMS, **call.options())
    assert kwargs["USE_DESC"], "these tensors qualify for descriptors: the TMA path must be the one tested"

    out, lse = decode.prefix_attention_decode(call.q, call.k, call.v, call.prefix_k, call.prefix_v, config=config,
                                              sms=MANY_SMS, **call.options())

    assert_attention_matches_truth(out, lse, tensors[0], truth_out, truth_lse, reference_error, dtype)


# More prefix programs (split-K over a long prefix) than own programs: the interleaved order's leftovers are prefix.
PREFIX_HEAVY = Case(batch=1, heads_q=3, heads_kv=1, seq_q=1, seq_k=5, prefix_len=300, head_dim=32)


@pytest.mark.parametrize("case", CASES + [PREFIX_HEAVY], ids=lambda c: c.id)
def test_interleaved_program_order_computes_the_same(case):
    """DecodeConfig.interleave only reorders programs (prefix and own alternating): the same numbers, split-K,
    several prefixes and more prefix than own programs included."""
    tensors, options = _call(case, torch.float32)
    call = _validated(tensors, options)
    base = decode.decode_plan(call.q, call.k, call.prefix_k, sms=MANY_SMS)[0]
    first_out, first_lse = _decode_with(call, base)
    interleaved = replace(base, interleave=True)
    _, _, kwargs = decode.decode_launch(call.q, call.k, call.v, call.prefix_k, call.prefix_v,
                                        torch.empty(64, 1, 1), torch.empty(64, 1), config=interleaved,
                                        sms=MANY_SMS, **call.options())
    assert kwargs["INTERLEAVE"]
    out, lse = _decode_with(call, interleaved)
    assert torch.equal(out, first_out) and torch.equal(lse, first_lse)  # same programs, same arithmetic
    ref_out, ref_lse = prefix_attention(*tensors, return_lse=True, backend="torch", **options)
    assert max_error(out, ref_out) < 1e-5 and max_error(lse, ref_lse) < 1e-5


@pytest.mark.parametrize("case", CASES + [PREFIX_HEAVY], ids=lambda c: c.id)
def test_own_launch_computes_the_same(case, monkeypatch):
    """DecodeConfig.own_launch: the prefix programs and the own programs in two launches (each with its own part's
    code only) write the same partials as one launch of both: the same numbers, split-K and several prefixes
    included; without prefix keys (or own keys) one launch of the other kind."""
    tensors, options = _call(case, torch.float32)
    call = _validated(tensors, options)
    base = decode.decode_plan(call.q, call.k, call.prefix_k, sms=MANY_SMS)[0]
    first_out, first_lse = _decode_with(call, base)
    launches = []
    real_launch = decode.launch
    monkeypatch.setattr(decode, "launch", lambda kernel, grid, args, kwargs: (
        launches.append((kernel, kwargs)), real_launch(kernel, grid, args, kwargs)))
    out, lse = _decode_with(call, replace(base, own_launch=True))
    parts = [(kw["PREFIX_PART"], kw["OWN_PART"]) for kernel, kw in launches if kernel is decode._decode_partials]
    _, (_, _, prefix_splits, _), (_, _, own_splits, _, _) = decode.decode_plan(call.q, call.k, call.prefix_k,
                                                                               config=base, sms=MANY_SMS)
    # each kind that has work, alone (no prefix keys, or no own keys: one launch of the other kind)
    assert parts == [kind for kind, splits in (((True, False), prefix_splits), ((False, True), own_splits))
                     if splits], parts
    for kernel, kw in launches:
        if kernel is decode._decode_partials and not kw["PREFIX_PART"]:
            assert (kw["num_warps"], kw["num_stages"]) == (base.own.num_warps, base.own.num_stages)
    assert torch.equal(out, first_out) and torch.equal(lse, first_lse)  # same programs, same arithmetic
    ref_out, ref_lse = prefix_attention(*tensors, return_lse=True, backend="torch", **options)
    assert max_error(out, ref_out) < 1e-5 and max_error(lse, ref_lse) < 1e-5
    with pytest.raises(ValueError, match="nothing to interleave"):
        replace(base, own_launch=True, interleave=True)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], PREFIX_HEAVY], ids=lambda c: c.id)
def test_own_stream_computes_the_same_eagerly_and_in_a_cuda_graph(case, monkeypatch):
    """DecodeConfig.own_stream: on a GPU the own launch runs on a side stream beside the prefix launch and is joined
    before the merge: the same numbers as one launch, eagerly and replayed from a CUDA graph (the fork and join are
    captured) with new values in the same buffers. Off the GPU the two launches run in turn."""
    tensors, options = _call(case, torch.float16)
    call = _validated(tensors, options)
    base = decode.decode_plan(call.q, call.k, call.prefix_k, sms=MANY_SMS)[0]
    config = replace(base, own_launch=True, own_stream=True)
    forks, streams = [], []
    real_side_stream, real_launch = decode._side_stream, decode.launch
    monkeypatch.setattr(decode, "_side_stream", lambda device: forks.append(device) or real_side_stream(device))

    def spy(kernel, grid, args, kwargs):  # which stream each part's launch was issued on
        if kernel is decode._decode_partials and DEVICE.type == "cuda":
            streams.append((kwargs["PREFIX_PART"], kwargs["OWN_PART"], torch.cuda.current_stream()))
        real_launch(kernel, grid, args, kwargs)

    monkeypatch.setattr(decode, "launch", spy)
    want_out, want_lse = _decode_with(call, base)
    caller, streams[:] = (torch.cuda.current_stream() if DEVICE.type == "cuda" else None), []
    out, lse = _decode_with(call, config)
    assert len(forks) == (1 if DEVICE.type == "cuda" else 0)
    if forks and case.prefix_len:  # the prefix launch on the caller's stream, the own launch on the side stream
        assert [(p, o, st == caller, st == real_side_stream(DEVICE)[0]) for p, o, st in streams] == \
            [(True, False, True, False), (False, True, False, True)], streams
    elif forks:  # one kind of program: one launch, on the caller's stream
        assert [st == caller for *_, st in streams] == [True], streams
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    if DEVICE.type != "cuda":
        return
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out, graph_lse = _decode_with(call, config)
    for t in tensors:  # new values in the same buffers, as a decode loop does
        t.copy_(torch.randn_like(t))
    graph.replay()
    want_out, want_lse = _decode_with(call, base)
    torch.cuda.synchronize()
    assert torch.equal(graph_out, want_out) and torch.equal(graph_lse, want_lse)


# Run in a fresh process: there no decode kernel is loaded yet, as in a serving process that warms up, then
# captures (in the test process an earlier test may have loaded the part kernels already).
_WARM_UP_THEN_CAPTURE = """
from dataclasses import replace
import torch
import triton
from prefix_kernels.triton import decode
B, Hq, Hkv, L, P, D = 3, 6, 2, 40, 70, 128
q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.float16)
k, v = (torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.float16) for _ in range(2))
prefix_k, prefix_v = (torch.randn(1, Hkv, P, D, device="cuda", dtype=torch.float16) for _ in range(2))
base = decode.decode_plan(q, k, prefix_k)[0]
config = replace(base, own_launch=True, own_stream=True, graphs_only=True)
def run(config):
    return decode.prefix_attention_decode(q, k, v, prefix_k, prefix_v, causal=True, scale=D ** -0.5, config=config)
want = run(base)
run(config)  # the warm-up: its first eager call
runtime = getattr(getattr(triton, "knobs", None), "runtime", None)  # (Triton >= 3.4: count the module loads)
loads = []
if runtime is not None and hasattr(runtime, "kernel_load_start_hook"):
    runtime.kernel_load_start_hook = lambda module, function, name, *rest: loads.append(name)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    got = run(config)
assert not loads, f"kernels loaded inside the capture: {loads}"
graph.replay()
torch.cuda.synchronize()
assert all(torch.equal(a, b) for a, b in zip(got, want)), "the replay differs from one launch"
print("captured")
"""


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
def test_graphs_only_config_captures_after_its_first_eager_call():
    """A graphs_only config (decode_config's side stream) captures after one eager warm-up call in a fresh process:
    that call loaded the two launches' kernels (a module load inside a capture is refused) and made the side
    stream; the replay matches one launch."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", _WARM_UP_THEN_CAPTURE], cwd=root, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(root)), timeout=300)
    assert result.returncode == 0 and "captured" in result.stdout, result.stderr[-3000:]


def test_own_stream_is_not_made_inside_a_capture(monkeypatch):
    """The side stream is made at the first call on a device and thread; inside a CUDA-graph capture that is
    refused with a message saying to run the step once first (checked without a GPU: the capture is faked)."""
    monkeypatch.setattr(decode, "_SIDE_STREAMS", threading.local())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="before a CUDA-graph capture"):
        decode._side_stream(torch.device("cuda", 0))


def _default_config(batch, heads_q, heads_kv, seq_k, prefix_len, head_dim=128, dtype=torch.bfloat16, tma=True):
    """The decode plan's config for one-token decode of these sizes, as on a 132-SM GPU with TMA or without."""
    return decode._plan_for_shapes((batch, heads_q, 1, head_dim), heads_kv, seq_k, 1, prefix_len, dtype, 132, None,
                                   tma)[0]


def test_decode_config_takes_the_side_stream_where_one_launch_gives_own_programs_the_prefix_footprint():
    """decode_config runs the own programs in their own launch on a side stream (in CUDA-graph captures) where one
    launch would give them the prefix part's bigger footprint (one row block of 65-128 packed rows on 8 warps against
    own tiles of 4) and the own K/V is large: the H200's B=128 G=1 P=16384 (0.207 against 0.266 ms); not where the
    footprints match (64 rows; the GQA serving shapes' 4-warp TMA tiles), nor for small steps, fp32, or head dims
    other than 65-128 (untimed)."""
    measured = _default_config(128, 32, 32, 256, 16384)
    assert measured.own_launch and measured.own_stream and measured.prefix.num_warps > measured.own.num_warps
    assert measured.graphs_only  # eagerly the side stream cost more than it saved
    assert _default_config(128, 32, 32, 256, 16384, tma=False).own_stream  # the same tile without TMA
    assert _default_config(100, 16, 16, 512, 4096, dtype=torch.float16).own_stream  # 100 rows, 210 MB
    # own K/V of 2 MB per key position: the gate at 32 keys
    assert _default_config(128, 32, 32, 32, 16384).own_stream
    assert OWN_STREAM_MIN_OWN_BYTES == 32 * 2 * 128 * 32 * 128 * 2
    for config in (_default_config(64, 32, 32, 256, 4096),              # 64 packed rows: the own programs' 4 warps
                   _default_config(256, 32, 8, 256, 4096),              # G=4, 1024 rows: the 4-warp TMA prefix tile
                   _default_config(256, 32, 8, 128, 16384, tma=False),  # ... several row blocks without TMA
                   _default_config(128, 32, 32, 31, 16384),             # own K/V under the gate
                   _default_config(128, 32, 32, 256, 16384, dtype=torch.float32),
                   _default_config(128, 16, 16, 256, 16384, head_dim=256),
                   _default_config(100, 16, 16, 1024, 4096, head_dim=64)):  # head dim 64: untimed
        assert not config.own_launch and not config.own_stream, config
    # the compile check's space holds these configs' two launches and, for eager calls, their one launch
    space = {(block_d, dtype, config) for block_d, dtype, config in decode_launch_space()}
    graphs_only = [(block_d, dtype, config) for block_d, dtype, config in space if config.graphs_only]
    assert (128, torch.bfloat16, measured) in space and graphs_only
    for block_d, dtype, config in graphs_only:
        assert (block_d, dtype, config.one_launch()) in space
        assert not config.one_launch().own_launch and replace(config.one_launch(), interleave=True).interleave


def test_graphs_only_runs_both_launches_first_then_one_launch_eagerly_and_two_in_a_capture(monkeypatch):
    """DecodeConfig.graphs_only (as decode_config sets it): the first eager call of a launch signature (what Triton
    compiles a kernel variant for) runs the prefix and own launches, so that their kernels are loaded before a
    capture needs them; later eager calls one launch of both parts, also as the own keys grow by one a step; a call
    being captured the two launches (the capture is faked: the launches run here, so the numbers are checked too,
    bit-equal to one launch); an argument of another alignment is a new signature."""
    monkeypatch.setattr(decode, "_LOADED_SIGNATURES", set())
    case = Case(batch=5, heads_q=6, heads_kv=2, seq_q=1, seq_k=17, prefix_len=37, head_dim=64)
    cache_shape = (2, case.batch, case.heads_kv, 24, case.head_dim)  # K and V of a static cache
    buffer = torch.randn(torch.Size(cache_shape).numel() + 4, device=DEVICE)
    launches, capturing = [], [False]
    real_launch = decode.launch
    monkeypatch.setattr(decode, "launch", lambda kernel, grid, args, kwargs: (
        launches.append((kwargs.get("PREFIX_PART"), kwargs.get("OWN_PART"))), real_launch(kernel, grid, args, kwargs)))
    monkeypatch.setattr(decode, "_capturing", lambda device: capturing[0])

    def partials_of_one_call(seq_k, capture=False, offset=0):
        *tensors, options = make_inputs(replace(case, seq_k=seq_k), torch.float32, DEVICE)
        storage = buffer[offset:offset + buffer.numel() - 4].view(cache_shape)
        tensors[1], tensors[2] = storage[0, :, :, :seq_k], storage[1, :, :, :seq_k]  # views of the cache
        call = _validated(tensors, options)
        base = decode.decode_plan(call.q, call.k, call.prefix_k, sms=MANY_SMS)[0]
        want_out, want_lse = _decode_with(call, base)
        launches.clear()
        capturing[0] = capture
        out, lse = _decode_with(call, replace(base, own_launch=True, graphs_only=True))
        capturing[0] = False
        assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
        return [parts for parts in launches if parts != (None, None)]  # (the merge has neither flag)

    two, one = [(True, False), (False, True)], [(True, True)]
    assert partials_of_one_call(17) == two       # the first eager call: loads both kernels
    assert partials_of_one_call(17) == one       # then one launch eagerly
    assert partials_of_one_call(18) == one       # one more own key: the same signature
    assert partials_of_one_call(19, capture=True) == two
    assert partials_of_one_call(16) == two       # 16 keys: integers divisible by 16, a new signature
    assert partials_of_one_call(20, offset=1) == two  # K/V 4 bytes off 16-byte alignment: a new signature
    assert partials_of_one_call(21, offset=1) == one
    with pytest.raises(ValueError, match="graphs_only limits own_launch"):
        replace(decode.decode_plan(*(torch.empty(1, 2, 1, 64),) * 2, torch.empty(1, 2, 8, 64))[0], graphs_only=True)


def test_own_stream_needs_own_launch():
    config = decode.decode_plan(torch.empty(2, 4, 1, 64), torch.empty(2, 2, 8, 64), torch.empty(1, 2, 16, 64))[0]
    with pytest.raises(ValueError, match="needs own_launch=True"):
        replace(config, own_stream=True)


@pytest.mark.parametrize("case,programs_per_sm",
                         [(c, 1) for c in CASES] + [(c, 3) for c in CASES if c.batch * c.heads_kv >= 6],
                         ids=lambda x: x.id if isinstance(x, Case) else f"per-sm{x}")
def test_own_pairs_in_one_loop_compute_the_same(case, programs_per_sm):
    """DecodeConfig.own_programs_per_sm: an own program takes several whole (sequence, KV head) pairs in one loop
    over (pair, key tile); the softmax state restarts with each pair. One notional SM, so the own part is one
    split and one program takes all pairs (1) or at most 3 programs take ceil(pairs / 3) each, the last fewer
    (3): the same numbers as one pair per program, masks (padding, window, causality) and L < S included."""
    tensors, options = _call(case, torch.float32)
    call = _validated(tensors, options)
    base = decode.decode_plan(call.q, call.k, call.prefix_k, sms=1)[0]
    config = replace(base, own_programs_per_sm=programs_per_sm)
    _, _, own_plan = decode.decode_plan(call.q, call.k, call.prefix_k, config=config, sms=1)
    pairs = call.q.shape[0] * call.k.shape[1]
    assert own_plan[2] == 1 and own_plan[4] == -(-pairs // programs_per_sm), own_plan
    _, _, kwargs = decode.decode_launch(call.q, call.k, call.v, call.prefix_k, call.prefix_v,
                                        torch.empty(64, 1, 1), torch.empty(64, 1), config=config, sms=1,
                                        **call.options())
    assert kwargs["OWN_UNITS"]
    first_out, first_lse = decode.prefix_attention_decode(call.q, call.k, call.v, call.prefix_k, call.prefix_v,
                                                          config=base, sms=1, **call.options())
    out, lse = decode.prefix_attention_decode(call.q, call.k, call.v, call.prefix_k, call.prefix_v,
                                              config=config, sms=1, **call.options())
    assert torch.equal(out, first_out) and torch.equal(lse, first_lse)  # same tiles, same order, same arithmetic
    ref_out, ref_lse = prefix_attention(*tensors, return_lse=True, backend="torch", **options)
    assert max_error(out, ref_out) < 1e-5 and max_error(lse, ref_lse) < 1e-5


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5], PREFIX_HEAVY], ids=lambda c: c.id)
def test_occupancy_knobs_together_in_fp16(case):
    """Both occupancy knobs with the interleaved order, in fp16, against the float64 truth. On 2 notional SMs the
    own programs take several pairs each (10 pairs: 5 per program), and the long prefix of PREFIX_HEAVY gets
    fewer splits than by key count (3 -> 2)."""
    tensors, options = _call(case, torch.float16)
    (truth_out, truth_lse), reference_error = truth_and_reference_error(tensors, options, torch.float16)
    call = _validated(tensors, options)
    default = decode.decode_plan(call.q, call.k, call.prefix_k, sms=2)
    config = replace(default[0], prefix_programs_per_sm=1, own_programs_per_sm=1, interleave=True)
    _, (_, _, prefix_splits, _), (_, _, _, _, units) = decode.decode_plan(call.q, call.k, call.prefix_k,
                                                                          config=config, sms=2)
    assert units > 1 or prefix_splits < default[1][2], "neither knob changes this launch"
    out, lse = decode.prefix_attention_decode(call.q, call.k, call.v, call.prefix_k, call.prefix_v, config=config,
                                              sms=2, **call.options())
    assert_attention_matches_truth(out, lse, tensors[0], truth_out, truth_lse, reference_error, torch.float16)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], PREFIX_HEAVY], ids=lambda c: c.id)
def test_own_launch_with_the_occupancy_knobs_in_fp16(case):
    """DecodeConfig.own_launch with both occupancy knobs, in fp16, against the float64 truth (2 notional SMs: the
    own programs take several pairs each in their own launch)."""
    tensors, options = _call(case, torch.float16)
    (truth_out, truth_lse), reference_error = truth_and_reference_error(tensors, options, torch.float16)
    call = _validated(tensors, options)
    default = decode.decode_plan(call.q, call.k, call.prefix_k, sms=2)
    out, lse = _decode_with(call, replace(default[0], prefix_programs_per_sm=1, own_programs_per_sm=1,
                                          own_launch=True), sms=2)
    assert_attention_matches_truth(out, lse, tensors[0], truth_out, truth_lse, reference_error, torch.float16)


def test_pairs_loop_writes_every_partial_even_without_keys_to_read():
    """A pair with no own tile to read (window=0 here, which prefix_attention refuses, called on the kernel
    directly) still writes its partial: -inf, like one pair per program, never an unwritten workspace slot."""
    case = CASES[0]
    tensors, options = _call(case, torch.float32)
    call = _validated(tensors, options)
    kwargs = {**call.options(), "window": 0}
    base = decode.decode_plan(call.q, call.k, call.prefix_k, sms=1)[0]
    first_out, first_lse = decode.prefix_attention_decode(call.q, call.k, call.v, call.prefix_k, call.prefix_v,
                                                          config=base, sms=1, **kwargs)
    out, lse = decode.prefix_attention_decode(call.q, call.k, call.v, call.prefix_k, call.prefix_v,
                                              config=replace(base, own_programs_per_sm=1), sms=1, **kwargs)
    assert torch.equal(out, first_out) and torch.equal(lse, first_lse)


def test_prefix_programs_per_sm_caps_the_prefix_splits():
    """DecodeConfig.prefix_programs_per_sm: at most that many prefix programs per SM (at least one split), the own
    split unchanged; the ANCHORS GQA serving shape on 132 SMs goes from 2 prefix splits to 1."""
    from prefix_kernels.triton.configs import decode_splits
    free = decode_splits(128, 4096, 2048, 256, 64, 132)
    capped = decode_splits(128, 4096, 2048, 256, 64, 132, prefix_programs_per_sm=1)
    assert free[0][0] == 2 and capped[0] == (1, 4096) and capped[1] == free[1]
    assert decode_splits(16, 4096, 8, 256, 64, 4, prefix_programs_per_sm=1)[0][0] == 1  # never below one split
    # 8 prefix programs split 32 ways by key count on 132 SMs: a cap of 1 per SM allows 16, of 2 per SM 33.
    assert decode_splits(8, 4096, 8, 256, 64, 132)[0][0] == 32
    assert decode_splits(8, 4096, 8, 256, 64, 132, prefix_programs_per_sm=1)[0][0] == 16
    assert decode_splits(8, 4096, 8, 256, 64, 132, prefix_programs_per_sm=2)[0][0] == 32


def test_split_k_is_exercised():
    tensors, options = _call(CASES[-1], torch.float32)
    call = _validated(tensors, options)
    _, prefix_plan, own_plan = decode.decode_plan(call.q, call.k, call.prefix_k, sms=MANY_SMS)
    assert prefix_plan[2] > 1 and own_plan[2] > 1, (prefix_plan, own_plan)


def test_dispatch_picks_decode_only_for_short_queries_without_grad(monkeypatch):
    calls = []
    real = decode.prefix_attention_decode
    monkeypatch.setattr(decode, "prefix_attention_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    case = Case(batch=2, heads_q=2, heads_kv=1, seq_q=3, seq_k=7, prefix_len=5, head_dim=32)
    tensors, options = _call(case, torch.float32)
    out, lse = prefix_attention(*tensors, return_lse=True, backend="triton", **options)
    assert calls, "S <= 16 without gradients takes the decode strategy"
    ref = prefix_attention(*tensors, backend="torch", **options)
    assert max_error(out, ref) < 1e-5
    calls.clear()
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = prefix_attention(*leaves, backend="triton", **options)
    assert not calls, "a call that needs gradients takes the differentiable prefill path"
    assert out.requires_grad


def test_decode_plan_is_computed_once_per_shape():
    """The plan is cached by shape (a decode loop asks the same one every step) and still follows the shapes."""
    case = Case(batch=3, heads_q=4, heads_kv=2, seq_q=1, seq_k=9, prefix_len=40, head_dim=32)
    tensors, _ = _call(case, torch.float32)
    q, k, _, prefix_k, _ = tensors
    before = decode._plan_for_shapes.cache_info()
    first = decode.decode_plan(q, k, prefix_k.unsqueeze(0), sms=MANY_SMS)
    assert decode.decode_plan(q, k, prefix_k.unsqueeze(0), sms=MANY_SMS) is first
    assert decode._plan_for_shapes.cache_info().hits >= before.hits + 1
    longer = decode.decode_plan(q, k, torch.randn(1, 2, 4000, 32), sms=MANY_SMS)
    assert longer[1][2] * longer[1][3] >= 4000 > first[1][2] * first[1][3]  # the splits cover the new prefix


def test_decode_under_torch_compile_and_fake_tensors_goes_through_the_custom_op():
    """In eager mode the launcher is called directly (less host time); torch.compile and FakeTensor must still
    see the opaque custom op: fullgraph tracing fails if the launcher leaks into the graph. With attention sinks,
    which the op's merge takes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    case = Case(batch=3, heads_q=6, heads_kv=2, seq_q=2, seq_k=9, prefix_len=11, head_dim=32, padding="left",
                sinks=True)
    tensors, options = _call(case, torch.float32)
    mask = options["key_padding_mask"]
    tensors.append(options["sinks"])

    def step(q, k, v, prefix_k, prefix_v, sinks, mask):
        return prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask=mask, return_lse=True, sinks=sinks,
                                backend="triton")

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    with torch.no_grad():
        out, lse = torch.compile(step, fullgraph=True, backend=recording_backend)(*tensors, mask)
    assert graphs and "prefix_attention_decode" in graphs[0]
    ref_out, ref_lse = step(*tensors[:5], None, mask)  # (no sink: the results must differ)
    assert max_error(lse, ref_lse) > 1e-2
    ref_out, ref_lse = prefix_attention(*tensors[:5], key_padding_mask=mask, return_lse=True, sinks=tensors[5],
                                        backend="torch")
    assert max_error(out, ref_out) < 1e-5 and max_error(lse, ref_lse) < 1e-5
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in (*tensors, mask)]
        fake_out, fake_lse = step(*fakes)
    assert fake_out.shape == out.shape and fake_lse.shape == lse.shape
    with torch.no_grad():  # make_fx traces real tensors under a dispatch mode: it must record the op too
        traced = make_fx(step)(*tensors, mask)
    assert "prefix_attention_decode" in str(traced.graph)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_merge_kernel_matches_reference_with_empty_rows(dtype):
    shape = (2, 3, 5, 80)
    out_a, out_b = torch.randn(shape, device=DEVICE, dtype=dtype), torch.randn(shape, device=DEVICE, dtype=dtype)
    lse_a, lse_b = torch.randn(shape[:-1], device=DEVICE) * 10, torch.randn(shape[:-1], device=DEVICE)
    lse_a[0, 0, :2] = float("-inf")            # only b counts
    lse_b[0, 1, 1:3] = float("-inf")           # only a counts
    lse_a[1, 2], lse_b[1, 2] = float("-inf"), float("-inf")  # nothing seen: zeros, -inf
    out_a[0, 0, :2] = 0                        # what a kernel writes for a part that saw nothing
    out_b[1, 2] = 0
    out_a[1, 2] = 0
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
    ref_out, ref_lse = merge_attention_states_reference(out_a.double(), lse_a.double(), out_b.double(),
                                                        lse_b.double())
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert max_error(out, ref_out) <= {torch.float32: 1e-5}.get(dtype, 2e-2)
    assert max_error(lse, ref_lse) <= 1e-5
    assert (out[1, 2] == 0).all() and torch.isinf(lse[1, 2]).all()


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend, batch, head_dim", [("auto", 5, 64), ("triton", 5, 64), ("triton", 50, 128)],
                         ids=["auto-d64", "triton-d64", "triton-d128-150-packed-rows-tma-on-sm90"])
def test_decode_step_captures_in_a_cuda_graph_without_host_sync(backend, batch, head_dim):
    case = Case(batch=batch, heads_q=6, heads_kv=2, seq_q=1, seq_k=40, prefix_len=300, head_dim=head_dim,
                num_prefixes=2, prefix_lens=(300, 100), padding="left")
    tensors, options = _call(case, torch.float16)
    run = lambda: prefix_attention(*tensors, return_lse=True, backend=backend, **options)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up: compiles the kernels
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            out, lse = run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for t in tensors:  # new values in the same buffers, as a decode loop does
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    ref_out, ref_lse = prefix_attention(*tensors, return_lse=True, backend="torch", **options)
    assert max_error(out, ref_out) < 1e-2
    assert_lse_close(lse, ref_lse)


def test_merge_reads_strided_lses():
    """An LSE given as a strided view (the last query's, lse[..., -1], say): the Triton merge read it densely,
    out off by ~2 (found by fuzzing)."""
    shape = (2, 4, 3, 8)
    out_a, out_b = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    lse_a = torch.randn(*shape[:-1], 2, device=DEVICE)[..., 0]
    lse_b = torch.randn(shape[:-1], device=DEVICE)
    assert lse_a.reshape(-1).stride() != (1,)
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
    ref_out, ref_lse = merge_attention_states_reference(out_a.double(), lse_a.double(), out_b.double(),
                                                        lse_b.double())
    assert max_error(out, ref_out) <= 1e-5 and max_error(lse, ref_lse) <= 1e-5


def test_merge_gradients_are_zero_not_nan_where_neither_part_saw_anything():
    """Under autograd (the reference formula): rows where both LSEs are -inf give zeros and -inf forward, and
    gradients of 0 backward; logaddexp's backward there is 0 * NaN, which made every such gradient NaN (found by
    fuzzing). Elsewhere the gradients are float64 autograd's of the plain formula."""
    out_a, out_b = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(3, 5, 16, dtype=torch.float64)
    lse_a, lse_b = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    lse_a[1, 2] = lse_b[1, 2] = float("-inf")
    lse_a[2, 0] = float("-inf")
    leaves = [t.clone().requires_grad_() for t in (out_a, lse_a, out_b, lse_b)]
    out, lse = merge_attention_states(*leaves)
    (out.sum() + torch.where(lse.isinf(), 0.0, lse).sum()).backward()
    assert (out[1, 2] == 0).all() and lse[1, 2] == float("-inf")
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()
    assert leaves[1].grad[1, 2] == 0 and leaves[3].grad[1, 2] == 0 and (leaves[0].grad[1, 2] == 0).all()
    plain = [t.clone().requires_grad_() for t in (out_a, lse_a, out_b, lse_b)]
    total = torch.logaddexp(plain[1], plain[3])
    want = (torch.exp(plain[1] - total)[..., None] * plain[0] + torch.exp(plain[3] - total)[..., None] * plain[2])
    seen = ~total.isinf()
    (want[seen].sum() + total[seen].sum()).backward()
    for leaf, expected in zip(leaves, plain):
        assert torch.allclose(leaf.grad[seen], expected.grad[seen], atol=1e-12)


def test_merge_reference_is_exact_at_large_lses():
    """Weights relative to the larger LSE and divided by their sum: two equal LSEs of 1e4 average the outputs
    (float32). exp(lse_a - logaddexp) with the sum rounded to float32 gave 1.9996 for 2, 1.47 at 1e7."""
    out_a, out_b = torch.ones(2, 4), torch.full((2, 4), 3.0)
    for magnitude in (1e4, 1e7):
        lse = torch.full((2,), magnitude)
        out, merged = merge_attention_states_reference(out_a, lse, out_b, lse.clone())
        assert torch.equal(out, torch.full((2, 4), 2.0)), magnitude
        assert torch.allclose(merged, lse + math.log(2), rtol=1e-7)


def test_merge_traces_under_torch_compile():
    """torch.compile(fullgraph=True) of a function that merges: the Triton merge's launcher reads data pointers,
    which dynamo refuses to trace, so under tracing the reference's ops compose (and fuse) instead."""
    shape = (2, 3, 5, 16)
    out_a, out_b = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    lse_a, lse_b = torch.randn(shape[:-1], device=DEVICE), torch.randn(shape[:-1], device=DEVICE)
    lse_b[0, 1] = float("-inf")
    compiled = torch.compile(merge_attention_states, fullgraph=True, backend="aot_eager")
    out, lse = compiled(out_a, lse_a, out_b, lse_b)
    ref_out, ref_lse = merge_attention_states_reference(out_a.double(), lse_a.double(), out_b.double(),
                                                        lse_b.double())
    assert max_error(out, ref_out) <= 1e-5 and max_error(lse, ref_lse) <= 1e-5

"""The CUDA kernels (csrc/) against the float64 reference and against the Triton kernels: the forward and the
decode, fp16 and bf16, head dims 64 and 128, GQA group 3, causal, key_padding_mask, several prefixes with
prefix_lens, rows that see nothing.

Without a GPU they run in the host emulation (tests/cuda_emulation.py: the same source through g++, warp-level
instructions emulated), bf16 included since no Triton interpreter is involved; on a GPU, the built extension.
"""
import os

import pytest
import torch

from conftest import HAS_CUDA
from cuda_emulation import emulated_kernels, emulated_namespace, unavailable_reason
from helpers import (ERROR_FLOOR, Case, assert_attention_matches_truth, assert_close_to_truth, assert_lse_close,
                     attention_loss, batch_strided_past_int32, loss_weights, make_inputs, max_error,
                     truth_and_reference_error, truth_and_reference_grad_errors)
from prefix_kernels import cuda, prefix_attention
from prefix_kernels.validation import validate

DTYPES = [pytest.param(torch.float16, id="float16"), pytest.param(torch.bfloat16, id="bfloat16")]


# The emulator runs one warp ahead until it blocks in sync_threads, first warp 0 then the last warp: a tile
# overwritten while another warp still reads it, or read before its cp.async landed and was published by a
# sync_threads, fails the test (csrc/emulator/README.md).
EMULATOR_SCHEDULES = ("greedy", "greedy-reverse")


def _kernel_params():
    emulated_skip = ("on a GPU the built extension is tested instead" if HAS_CUDA else unavailable_reason())
    gpu_skip = None if HAS_CUDA and cuda.UNAVAILABLE_REASON is None else (
        "no GPU" if not HAS_CUDA else cuda.UNAVAILABLE_REASON)
    emulated = [pytest.param(f"emulated:{schedule}", id=f"emulated-{schedule}",
                             marks=[pytest.mark.skip(reason=emulated_skip)] if emulated_skip else [])
                for schedule in EMULATOR_SCHEDULES]
    return emulated + [pytest.param("gpu", id="gpu", marks=[pytest.mark.skip(reason=gpu_skip)] if gpu_skip else [])]


@pytest.fixture(params=_kernel_params())
def kernels(request, monkeypatch):
    """Routes backend="cuda" to the kernels under test for the duration of a test; yields the tensors' device."""
    if request.param.startswith("emulated:"):
        monkeypatch.setenv("PK_EMU_SCHEDULE", request.param.split(":", 1)[1])  # read by the emulator at each launch
        emulated_kernels()
        previous = cuda.use_kernels("prefix_kernels_emulated", "cpu")
        device = torch.device("cpu")
    else:
        previous = cuda.use_kernels("prefix_kernels_cuda", "cuda")
        device = torch.device("cuda")
    yield device
    cuda.use_kernels(*previous)


FORWARD_CASES = [
    Case(batch=2, heads_q=6, heads_kv=2, seq_q=70, seq_k=75, prefix_len=45, head_dim=64,
         scale=0.3),                                                               # GQA 3, 1 warp idle, a scale
    Case(batch=1, heads_q=3, heads_kv=1, seq_q=33, seq_k=33, prefix_len=64, head_dim=128, causal=False,
         padding="left", q_layout="bhsd"),                                                  # a whole prefix tile
    Case(batch=3, heads_q=6, heads_kv=2, seq_q=19, seq_k=29, prefix_len=21, head_dim=64, num_prefixes=2,
         prefix_lens=(0, 13), padding="empty-row"),                                         # rows that see nothing
    Case(batch=2, heads_q=3, heads_kv=3, seq_q=20, seq_k=5, prefix_len=0, head_dim=64),     # L < S, no prefix
    Case(batch=1, heads_q=3, heads_kv=1, seq_q=150, seq_k=160, prefix_len=33, head_dim=128,
         padding="left"),                                                                   # 2 blocks of 128 rows
    Case(batch=2, heads_q=6, heads_kv=2, seq_q=18, seq_k=130, prefix_len=7, head_dim=128, padding="random",
         kv_slice=True),                                                                    # strided K/V
]

DECODE_CASES = [
    Case(batch=5, heads_q=6, heads_kv=2, seq_q=1, seq_k=23, prefix_len=300, head_dim=64,
         scale=0.3),                                                               # prefix in splits, a scale
    Case(batch=5, heads_q=6, heads_kv=2, seq_q=4, seq_k=25, prefix_len=37, head_dim=128, num_prefixes=2,
         prefix_lens=(37, 5), padding="left"),                                              # two prefixes
    Case(batch=5, heads_q=6, heads_kv=2, seq_q=1, seq_k=20, prefix_len=8, head_dim=64, num_prefixes=2,
         prefix_lens=(0, 8), padding="empty-row"),                                          # rows see nothing
    Case(batch=9, heads_q=8, heads_kv=2, seq_q=2, seq_k=140, prefix_len=19, head_dim=64),   # 2 prefix row blocks
    Case(batch=3, heads_q=3, heads_kv=1, seq_q=4, seq_k=3, prefix_len=37, head_dim=64, causal=False,
         padding="random", q_layout="bhsd"),                                                # L < S
    # A speculative width of 17 whose causal limit falls inside full own tiles (L a multiple of 64, no padding):
    # the tiles the own programs may skip masking for must stop below the first query's position.
    Case(batch=4, heads_q=6, heads_kv=2, seq_q=17, seq_k=128, prefix_len=20, head_dim=64),
    # Splits of more tiles than the ring has stages, so every stage is refilled (found in review: without these,
    # a refill issued before the barrier passed every decode case):
    Case(batch=8, heads_q=6, heads_kv=2, seq_q=1, seq_k=300, prefix_len=40, head_dim=64),   # 5 own tiles a split
    Case(batch=8, heads_q=4, heads_kv=2, seq_q=2, seq_k=290, prefix_len=600, head_dim=128,
         padding="random"),                                                                 # 10 prefix tiles a split
]


def _validated(tensors, options):
    return validate(*tensors, scale=options.get("scale"), backend="cuda", causal=options["causal"],
                    key_padding_mask=options["key_padding_mask"], prefix_index=options.get("prefix_index"),
                    prefix_lens=options.get("prefix_lens"), window=options["window"], softcap=options["softcap"])


def _check_op(op_name, case, dtype, device, index_dtype=torch.int64):
    """The op against the float64 truth, and against the Triton kernels on the same inputs (the two backends
    must agree as closely as each agrees with the truth). bf16 Triton needs a GPU (the interpreter breaks it)."""
    *tensors, options = make_inputs(case, dtype, device)
    for name in ("prefix_index", "prefix_lens"):  # the kernels read int32 and int64 index tensors
        if options.get(name) is not None:
            options[name] = options[name].to(index_dtype)
    (truth_out, truth_lse), reference_error = truth_and_reference_error(tensors, options, dtype)
    call = _validated(tensors, options)
    assert cuda.unavailable_reason(call) is None
    out, lse = _call_op(op_name, call)
    assert_attention_matches_truth(out, lse, tensors[0], truth_out, truth_lse, reference_error, dtype)
    if dtype == torch.bfloat16 and device.type == "cpu":
        return
    with torch.no_grad():
        triton_out, triton_lse = prefix_attention(*tensors, return_lse=True, backend="triton", **options)
    assert max_error(out, triton_out) <= 2 * reference_error + ERROR_FLOOR[dtype], "CUDA vs Triton: out"
    assert_lse_close(lse, triton_lse, "CUDA vs Triton: lse")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: c.id)
def test_forward_matches_reference(kernels, case, dtype, monkeypatch):
    monkeypatch.setenv("PK_CUDA_FORWARD", "mma")  # (named: on an H100/H200 the default is the Hopper loop)
    _check_op("forward", case, dtype, kernels)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c.id)
def test_decode_matches_reference(kernels, case, dtype):
    _check_op("decode", case, dtype, kernels)


@pytest.mark.parametrize("loop", ["mma", "wgmma", "wgmma-tma", "wgmma-tma-persistent"])
def test_offsets_past_int32_are_computed_in_64_bits(kernels, loop, monkeypatch):
    """q, k and v with batch strides of 2^30 + 64 elements (sequence 2 starts past 2^31): the forward (each loop)
    and the decode give bit for bit what they give on contiguous copies. Emulated only: the host build's index math
    is the kernels' own, and a GPU would need the 6 GB for real."""
    if kernels.type != "cpu":
        pytest.skip("emulated only (a GPU would allocate the 6 GB)")
    monkeypatch.setenv("PK_CUDA_FORWARD", loop)
    monkeypatch.setenv("PK_CUDA_DECODE", "mma" if loop == "mma" else "wgmma")
    case = Case(batch=3, heads_q=6, heads_kv=2, seq_q=20, seq_k=70, prefix_len=9, head_dim=64, padding="left")
    *tensors, options = make_inputs(case, torch.float16, kernels)
    strided = [batch_strided_past_int32(t) for t in tensors[:3]] + tensors[3:]
    for op_name, s in (("forward", slice(None)), ("decode", slice(-1, None))):
        want, got = (_call_op(op_name, _validated([t[:, :, s] if i == 0 else t for i, t in enumerate(inputs)],
                                                  options))
                     for inputs in (tensors, strided))
        for name, a, b in zip(("out", "lse"), want, got):
            assert torch.equal(a, b), f"{op_name} {name}"


def _hopper_or_skip(device, loop):
    """loop: a PK_CUDA_FORWARD value, or "decode-wgmma" (PK_CUDA_DECODE=wgmma), as bench/sanitize_cuda.py names them."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) != (9, 0):
        pytest.skip("the wgmma kernels run on sm_90 only")
    if device.type == "cuda" and loop in _broken_loops():
        pytest.skip(f"the {loop} loop failed its smoke run in bench/gpu_check.sh (see its log)")


def _broken_loops():
    """The Hopper loops bench/gpu_check.sh saw hang or fail when run alone first (bench/sanitize_cuda.py): running
    them here would stall every later CUDA call of the test process."""
    return set(os.environ.get("PK_BROKEN_CUDA_LOOPS", "").split())


# The Hopper loop's tiles are 128 keys: these have 6-8 tiles a row block, so every stage of its ring is refilled
# (found in review: no forward case above refills a 3-stage ring of 128-key tiles).
HOPPER_CASES = FORWARD_CASES + [
    Case(batch=1, heads_q=2, heads_kv=1, seq_q=150, seq_k=300, prefix_len=400, head_dim=128, padding="random"),
    Case(batch=1, heads_q=2, heads_kv=1, seq_q=130, seq_k=700, prefix_len=0, head_dim=64, causal=False),
]


# The Hopper loops' feeds: cp.async by the math warps, or TMA by a producer warpgroup (its mbarriers after the tiles),
# one work per block or on the persistent grid (one block per SM: in the emulation 2 blocks, each through several
# works, so that the pipelines' stages and phases run on across works)
HOPPER_FEEDS = [pytest.param(("wgmma", False), id="cp.async"), pytest.param(("wgmma-tma", True), id="tma"),
                pytest.param(("wgmma-tma-persistent", True), id="tma-persistent")]


def _hopper_shared_bytes(head_dim, stages, tma, rows=128, keys=128):
    """Q (`rows` rows), a ring of `stages` (K, V) pairs of `keys` keys, and with TMA a full and an empty mbarrier per
    stage for K and for V, and for Q: what the emulator reports as the launch's shared memory when the Hopper loop
    ran."""
    return (rows + 2 * stages * keys) * head_dim * 2 + (8 * (4 * stages + 2) if tma else 0)


@pytest.mark.parametrize("feed", HOPPER_FEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", HOPPER_CASES, ids=lambda c: c.id)
def test_hopper_forward_matches_reference(kernels, case, dtype, feed, monkeypatch):
    """The sm_90a forward (wgmma, FA3's overlap over a ring of 3 tile pairs), fed by cp.async (PK_CUDA_FORWARD=wgmma)
    or by a TMA producer warpgroup (wgmma-tma): in the emulation, whose wgmma checks the fences, the waits, that
    every operand reached the async proxy (or, from TMA, that the reading thread waited for the mbarrier phase the
    copy completed), that no copy lands in an operand still being read, that A registers stay unchanged until the
    wait and that a warpgroup's 4 warps issue the same wgmmas, and on an H100/H200."""
    loop, tma = feed
    _hopper_or_skip(kernels, loop)
    monkeypatch.setenv("PK_CUDA_FORWARD", loop)
    ops = cuda.kernels()
    if kernels.type == "cpu":
        ops.shared_memory_stats(True)
    _check_op("forward", case, dtype, kernels)
    if kernels.type == "cpu":  # it was the Hopper loop (with this feed, on its grid) that ran
        stats = ops.shared_memory_stats(True)
        assert stats[2] == _hopper_shared_bytes(case.head_dim, 3, tma)
        assert stats[3] == _forward_blocks(case, loop, EMULATED_SMS)
        assert stats[4] == _forward_works(case), "a work skipped or repeated"


EMULATED_SMS = 2  # (csrc/ops.cpp: what the launchers are told off a GPU; conftest.py unsets $PK_EMU_SMS)


def _forward_works(case, rows=128):
    """A forward launch's works: `rows` queries of one (b, hq) each."""
    return -(-case.seq_q // rows) * case.batch * case.heads_q


def _forward_blocks(case, loop, sms, rows=128):
    """The blocks a forward launch takes: one per work, or on the persistent grid one per SM, fewer where there are
    fewer units (query blocks j and m_blocks - 1 - j of one (b, hq))."""
    m_blocks = -(-case.seq_q // rows)
    if loop.endswith("-persistent"):
        return min((m_blocks + 1) // 2 * case.batch * case.heads_q, sms)
    return _forward_works(case, rows)


# 3 query blocks (a unit of two, the middle one alone) of 3 heads, 3-5 tiles each: 6 units, 9 works
PERSISTENT_CASE = Case(batch=1, heads_q=3, heads_kv=1, seq_q=300, seq_k=300, prefix_len=130, head_dim=128,
                       padding="random")


@pytest.mark.parametrize("sms", [1, 4, 64])
def test_persistent_forward_on_other_grids(kernels, sms, monkeypatch):
    """The persistent TMA forward with every work on one block (9 works: the pipelines' phases wrap many times),
    on 4 blocks of 2 units or 1, and on more SMs than units (a unit each): in the emulation ($PK_EMU_SMS) and on an
    H100/H200 ($PK_CUDA_SMS), where the small test shapes would otherwise give every unit a block of its own."""
    _hopper_or_skip(kernels, "wgmma-tma-persistent")
    case = PERSISTENT_CASE
    monkeypatch.setenv("PK_CUDA_FORWARD", "wgmma-tma-persistent")
    monkeypatch.setenv("PK_EMU_SMS" if kernels.type == "cpu" else "PK_CUDA_SMS", str(sms))
    assert _forward_blocks(case, "wgmma-tma-persistent", sms) == min(6, sms)
    if kernels.type != "cpu":
        grids = _gpu_kernel_grids(lambda: _check_op("forward", case, torch.bfloat16, kernels),
                                  "forward_persistent_kernel")
        assert grids is None or grids == [[min(6, sms), 1, 1]], grids  # ($PK_CUDA_SMS took effect)
        return
    ops = cuda.kernels()
    ops.shared_memory_stats(True)
    _check_op("forward", case, torch.float16, kernels)
    stats = ops.shared_memory_stats(True)
    assert stats[3] == min(6, sms)
    assert stats[4] == _forward_works(case) == 9, "a work skipped or repeated"


@pytest.mark.parametrize("loop", ["mma", "wgmma-tma"])
def test_forward_past_the_grid_limit_launches_in_chunks_of_sequences(kernels, loop, monkeypatch):
    """A grid's y axis takes at most 65535 blocks and the forward puts B * Hq there: larger batches launch per
    chunk of whole sequences (csrc/ops.cpp), their masks and prefix indices cut with them. In the emulation the
    limit is lowered to 7 ($PK_EMU_MAX_GRID_Y, which its launches enforce too): 4 sequences of 6 heads in 4
    launches. On a GPU the real limit: 16384 sequences of 4 heads in 2."""
    if loop != "mma":
        _hopper_or_skip(kernels, loop)
    monkeypatch.setenv("PK_CUDA_FORWARD", loop)
    if kernels.type == "cpu":
        monkeypatch.setenv("PK_EMU_MAX_GRID_Y", "7")
        case = Case(batch=4, heads_q=6, heads_kv=2, seq_q=19, seq_k=29, prefix_len=21, head_dim=64, num_prefixes=2,
                    prefix_lens=(21, 5), padding="random")
    else:
        case = Case(batch=16384, heads_q=4, heads_kv=2, seq_q=3, seq_k=5, prefix_len=9, head_dim=64,
                    num_prefixes=2, prefix_lens=(9, 4), padding="random")
    ops = cuda.kernels()
    if kernels.type == "cpu":
        ops.shared_memory_stats(True)
    _check_op("forward", case, torch.float16, kernels)
    if kernels.type == "cpu":
        assert ops.shared_memory_stats(True)[3] == _forward_works(case) == 24  # 4 launches of 6 blocks


@pytest.mark.parametrize("seq_q", [3, 20], ids=["decode", "forward"])
def test_expanded_prefix_index_is_served_by_cuda_and_auto(kernels, seq_q):
    """An expanded prefix_index (stride 0: every sequence on prefix 1): the op refused it from inside, "must be
    contiguous", under backend="cuda" and under "auto" on the small decode calls auto sends to CUDA (found by
    fuzzing); validate() copies the index tensors now."""
    case = Case(batch=4, heads_q=6, heads_kv=2, seq_q=seq_q, seq_k=20, prefix_len=37, head_dim=64, num_prefixes=2,
                prefix_lens=(37, 5))
    *tensors, options = make_inputs(case, torch.float16, kernels)
    options["prefix_index"] = torch.tensor([1], device=kernels).expand(case.batch)
    (truth_out, _), reference_error = truth_and_reference_error(tensors, options, torch.float16)
    for backend in ("cuda", "auto"):
        out = prefix_attention(*tensors, backend=backend, **options)
        assert_close_to_truth(f"out ({backend})", out, truth_out, reference_error, torch.float16)


# The other Hopper builds, which bench/gpu_check.sh --tune-cuda times against the shipped one: (defines, ring depth,
# (rows, keys) of the cp.async feed's blocks, cases): no overlap with 2 stages; the two warpgroups taking turns
# (ping-pong) on the shipped loop; one warpgroup of 64 rows with 64-key tiles (the TMA feed keeps 128 x 128).
HOPPER_BUILDS = [
    pytest.param(("-DPK_HOPPER_OVERLAP=0", "-DPK_HOPPER_STAGES=2"), 2, (128, 128),
                 [(c, torch.float16) for c in HOPPER_CASES] + [(HOPPER_CASES[-2], torch.bfloat16)], id="in-turn"),
    pytest.param(("-DPK_HOPPER_PINGPONG=1",), 3, (128, 128), [(c, torch.float16) for c in HOPPER_CASES],
                 id="ping-pong"),
    pytest.param(("-DPK_HOPPER_WARPGROUPS=1", "-DPK_HOPPER_KEYS=64"), 3, (64, 64),
                 [(c, torch.float16) for c in HOPPER_CASES] + [(HOPPER_CASES[-1], torch.bfloat16)],
                 id="one-warpgroup"),
]


@pytest.mark.skipif(HAS_CUDA or unavailable_reason() is not None,
                    reason="the emulated build (no GPU here, and a host compiler with CUDA headers)")
@pytest.mark.parametrize("schedule", EMULATOR_SCHEDULES)
@pytest.mark.parametrize("feed", HOPPER_FEEDS)
@pytest.mark.parametrize("defines,stages,block,cases", HOPPER_BUILDS)
def test_other_hopper_builds_match_reference(defines, stages, block, cases, feed, schedule, monkeypatch):
    loop, tma = feed
    if tma and block != (128, 128):
        pytest.skip("the TMA feed keeps its 128 x 128 blocks in this build: tested with the shipped one")
    rows, keys = block
    monkeypatch.setenv("PK_EMU_SCHEDULE", schedule)
    monkeypatch.setenv("PK_CUDA_FORWARD", loop)
    namespace = emulated_namespace(defines)
    previous = cuda.use_kernels(namespace, "cpu")
    try:
        for case, dtype in cases:
            getattr(torch.ops, namespace).shared_memory_stats(True)
            _check_op("forward", case, dtype, torch.device("cpu"))
            assert getattr(torch.ops, namespace).shared_memory_stats(True)[2] == \
                _hopper_shared_bytes(case.head_dim, stages, tma, rows, keys), case.id
    finally:
        cuda.use_kernels(*previous)


# The decode's wgmma prefix programs (PK_CUDA_DECODE=wgmma) take 128 packed rows against 128-key tiles:
HOPPER_DECODE_CASES = DECODE_CASES + [
    # G = 4: 160 packed rows, two row blocks, the second's warpgroup 1 idle; split prefix
    Case(batch=40, heads_q=8, heads_kv=2, seq_q=1, seq_k=30, prefix_len=700, head_dim=64, padding="left"),
    # one row block: the prefix in 2 splits of 5 and 4 tiles (every stage of the 3-stage ring refilled)
    Case(batch=3, heads_q=3, heads_kv=1, seq_q=2, seq_k=20, prefix_len=1100, head_dim=128),
    # two prefixes in one row block: prefix 1's rows only in the second warpgroup (64 rows a sequence); one prefix
    # ends inside a tile
    Case(batch=3, heads_q=4, heads_kv=1, seq_q=16, seq_k=20, prefix_len=300, head_dim=128, num_prefixes=2,
         prefix_lens=(300, 130), padding="random"),
]


def _gpu_kernel_names(run):
    """The names of the GPU kernels `run()` launched, as the profiler saw them (which loop a call took)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        run()
    return [event.name for event in profile.events()]


def _gpu_kernel_grids(run, name):
    """The grids of the GPU kernels named like `name` that `run()` launched, from the profiler's trace; None where
    the trace holds no kernel (a profiler that sees none)."""
    import json
    import tempfile

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        run()
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "trace.json")
        profile.export_chrome_trace(path)
        with open(path) as trace:
            events = json.load(trace).get("traceEvents", [])
    kernels = [event for event in events if str(event.get("cat", "")).lower() == "kernel"]
    if not kernels:
        return None
    return [event.get("args", {}).get("grid") for event in kernels if name in event.get("name", "")]


# On 8 emulated SMs (PK_EMU_SMS; 2 above): two row blocks, both warpgroups of the first busy, each in 3 splits
HOPPER_DECODE_MORE_SMS = Case(batch=50, heads_q=4, heads_kv=1, seq_q=1, seq_k=10, prefix_len=900, head_dim=64,
                              padding="left")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,sms", [pytest.param(c, None, id=c.id) for c in HOPPER_DECODE_CASES] +
                         [pytest.param(HOPPER_DECODE_MORE_SMS, "8", id=f"{HOPPER_DECODE_MORE_SMS.id}-8sms")])
def test_hopper_decode_matches_reference(kernels, case, sms, dtype, monkeypatch):
    """The decode with its prefix programs on the sm_90a loop (PK_CUDA_DECODE=wgmma: a launch of their own, 128
    packed rows of many sequences per block, the Hopper forward's loop fed by cp.async), the own programs and the
    merge as by default: in the emulation (with its wgmma checks) and on an H100/H200 (where the profiler shows the
    wgmma kernel ran)."""
    _hopper_or_skip(kernels, "decode-wgmma")
    monkeypatch.setenv("PK_CUDA_DECODE", "wgmma")
    if sms:
        monkeypatch.setenv("PK_EMU_SMS", sms)
    ops = cuda.kernels()
    if kernels.type == "cpu":
        ops.shared_memory_stats(True)
        _check_op("decode", case, dtype, kernels)
        if case.prefix_len > 0:  # the largest launch was the wgmma prefix programs' (twice the own programs')
            assert ops.shared_memory_stats(True)[2] == _hopper_shared_bytes(case.head_dim, 3, False)
        return
    names = _gpu_kernel_names(lambda: _check_op("decode", case, dtype, kernels))
    if any("decode_merge_kernel" in name for name in names):  # (the profiler saw the kernels at all)
        assert any("decode_prefix_wgmma_kernel" in name for name in names) == (case.prefix_len > 0)


def test_default_forward_loop(kernels, monkeypatch):
    """With PK_CUDA_FORWARD unset the forward runs a wgmma loop where the device runs it (sm_90 with 9.0a code): at
    D = 128 the TMA feed (1.15x the cp.async feed on the H200), at D = 64 the cp.async one; mma.sync elsewhere. The
    emulator keeps to mma.sync (its tests name each loop)."""
    monkeypatch.delenv("PK_CUDA_FORWARD", raising=False)
    case = FORWARD_CASES[1]
    if kernels.type == "cpu":
        ops = cuda.kernels()
        ops.shared_memory_stats(True)
        _check_op("forward", case, torch.float16, kernels)
        assert ops.shared_memory_stats(True)[2] not in (_hopper_shared_bytes(case.head_dim, 3, tma) for tma in (0, 1))
        return
    if {"wgmma", "wgmma-tma"} & set(_broken_loops()):
        pytest.skip("a wgmma loop failed its smoke run in bench/gpu_check.sh (see its log)")
    monkeypatch.setenv("PK_CUDA_FORWARD", "wgmma")  # where it is an error (sm_80, no 9.0a code) mma.sync is expected
    try:
        _call_op("forward", _validated(*_split_options(make_inputs(case, torch.bfloat16, kernels))))
        hopper = True
    except Exception as error:  # (the extension's std::runtime_error)
        assert "PK_CUDA_FORWARD=wgmma: " in str(error)
        hopper = False

    def forward_kernels(case):
        names = _gpu_kernel_names(lambda: _check_op("forward", case, torch.bfloat16, kernels))
        seen = any("_prefix_attention_fwd" in name for name in names)  # (the profiler saw kernels: Triton's, at least)
        return [name for name in names if "forward_kernel" in name] if seen else None

    for case, feed in ((FORWARD_CASES[1], "wgmma-tma"), (FORWARD_CASES[0], "wgmma")):  # D = 128, D = 64
        monkeypatch.delenv("PK_CUDA_FORWARD", raising=False)
        ours = forward_kernels(case)
        if ours is None:
            continue
        assert ours and all(("HopperAttention" in name) == hopper for name in ours), ours
        if hopper:  # the same kernel as the feed named explicitly
            monkeypatch.setenv("PK_CUDA_FORWARD", feed)
            assert forward_kernels(case) == ours, (case.head_dim, feed)


def test_default_forward_takes_cp_async_where_tma_cannot_copy_a_tensor(kernels, monkeypatch):
    """A key tensor broadcast over the KV heads (stride 0, which the operand checks accept) at head dim 128: the
    default forward computes it (on the cp.async feed, chosen up front for a broadcast dim; any other map the
    driver refuses falls back there too), and naming the TMA feed either computes it (a driver that encodes such a
    map) or says which tensor TMA cannot copy."""
    _hopper_or_skip(kernels, "wgmma-tma")
    case = Case(batch=2, heads_q=6, heads_kv=3, seq_q=40, seq_k=40, prefix_len=24, head_dim=128)
    tensors, options = _split_options(make_inputs(case, torch.bfloat16, kernels))
    tensors[1] = tensors[1][:, :1].expand(-1, case.heads_kv, -1, -1)  # k: one head's keys for every KV head
    assert tensors[1].stride(1) == 0
    (truth_out, truth_lse), reference_error = truth_and_reference_error(tensors, options, torch.bfloat16)
    call = _validated(tensors, options)
    for loop in (None, "wgmma-tma"):
        if loop is None:
            monkeypatch.delenv("PK_CUDA_FORWARD", raising=False)
        else:
            monkeypatch.setenv("PK_CUDA_FORWARD", loop)
        try:
            out, lse = _call_op("forward", call)
        except Exception as error:  # (a ValueError or RuntimeError from the extension)
            assert loop is not None and "k cannot be copied by TMA" in str(error), str(error)
            continue
        assert_attention_matches_truth(out, lse, tensors[0], truth_out, truth_lse, reference_error, torch.bfloat16)


def test_forward_loop_choice_is_checked(kernels, monkeypatch):
    """PK_CUDA_FORWARD names the loop; anything else, or a Hopper loop on a device without wgmma, is an error that
    says why."""
    call = _validated(*_split_options(make_inputs(FORWARD_CASES[0], torch.float16, kernels)))
    monkeypatch.setenv("PK_CUDA_FORWARD", "fastest")
    with pytest.raises(Exception,
                       match="PK_CUDA_FORWARD=fastest is not one of mma, wgmma, wgmma-tma, wgmma-tma-persistent"):
        _call_op("forward", call)
    for loop in ("wgmma", "wgmma-tma", "wgmma-tma-persistent"):
        if kernels.type == "cuda" and loop in _broken_loops():
            continue
        monkeypatch.setenv("PK_CUDA_FORWARD", loop)
        if kernels.type == "cuda" and torch.cuda.get_device_capability(kernels) != (9, 0):
            with pytest.raises(Exception, match=f"PK_CUDA_FORWARD={loop}: wgmma needs an sm_90 GPU"):
                _call_op("forward", call)
        else:
            _call_op("forward", call)


def test_decode_loop_choice_is_checked(kernels, monkeypatch):
    """PK_CUDA_DECODE likewise: mma or wgmma, and wgmma only where the device runs it."""
    call = _validated(*_split_options(make_inputs(DECODE_CASES[0], torch.float16, kernels)))
    monkeypatch.setenv("PK_CUDA_DECODE", "fastest")
    with pytest.raises(Exception, match="PK_CUDA_DECODE=fastest is not one of mma, wgmma"):
        _call_op("decode", call)
    monkeypatch.setenv("PK_CUDA_DECODE", "wgmma")
    if kernels.type == "cuda" and torch.cuda.get_device_capability(kernels) != (9, 0):
        with pytest.raises(Exception, match="PK_CUDA_DECODE=wgmma: wgmma needs an sm_90 GPU"):
            _call_op("decode", call)
    elif not (kernels.type == "cuda" and "decode-wgmma" in _broken_loops()):
        _call_op("decode", call)
    monkeypatch.delenv("PK_CUDA_DECODE")
    monkeypatch.setenv("PK_CUDA_DECODE_OWN", "columns")
    with pytest.raises(Exception, match="PK_CUDA_DECODE_OWN=columns is not one of auto, rows, keys"):
        _call_op("decode", call)


# The own programs' two layouts (PK_CUDA_DECODE_OWN): by default a sequence of at most 16 rows (G * S) takes one
# 16-row block whose 4 warps split each tile's keys, a larger one 64-row blocks split by rows; "rows" and "keys"
# force one. Each forced layout runs the decode cases the default gives the other one, and "keys" also a sequence
# of 40 rows (3 blocks of 16, the last partly empty) with a padding mask. The last two split the own keys (the
# emulator's 2 SMs give every other case one own split): 4 splits by default, 3 row blocks x 2 splits with "keys".
OWN_LAYOUT_CASES = (
    [("rows", c) for c in DECODE_CASES if c.heads_q // c.heads_kv * c.seq_q <= 16] +
    [("keys", c) for c in DECODE_CASES if c.heads_q // c.heads_kv * c.seq_q > 16] +
    [("keys", Case(batch=3, heads_q=8, heads_kv=2, seq_q=10, seq_k=150, prefix_len=30, head_dim=128,
                   padding="random")),
     ("auto", Case(batch=1, heads_q=4, heads_kv=1, seq_q=1, seq_k=600, prefix_len=0, head_dim=64, padding="random")),
     ("keys", Case(batch=1, heads_q=4, heads_kv=1, seq_q=10, seq_k=600, prefix_len=0, head_dim=128, padding="left"))])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout,case", OWN_LAYOUT_CASES, ids=lambda x: x.id if isinstance(x, Case) else x)
def test_decode_own_layouts_match_reference(kernels, layout, case, dtype, monkeypatch):
    monkeypatch.setenv("PK_CUDA_DECODE_OWN", layout)
    _check_op("decode", case, dtype, kernels)


@pytest.mark.skipif(HAS_CUDA or unavailable_reason() is not None,
                    reason="the emulated build's decode_plan op (no GPU here, and a host compiler with CUDA headers)")
def test_decode_own_layout_choice(monkeypatch):
    """Which layout the plan gives the own programs, and how many row blocks (results alone cannot tell: both
    layouts are right)."""
    ops = emulated_kernels()

    def layout(heads_q, heads_kv, seq_q):  # (own row blocks, keys split across the warps)
        own_row_blocks, keys_across_warps, *_ = ops.decode_plan(8, heads_q, heads_kv, seq_q, 300, 100, 132)
        return own_row_blocks, bool(keys_across_warps)

    monkeypatch.delenv("PK_CUDA_DECODE_OWN", raising=False)
    assert layout(32, 32, 1) == (1, True)     # one query, G = 1 (ANCHORS' 32/32 shapes)
    assert layout(32, 8, 1) == (1, True)      # G = 4 (32/8)
    assert layout(32, 2, 1) == (1, True)      # G * S = 16: still one block of 16
    assert layout(6, 2, 6) == (1, False)      # 18 rows: one 64-row block
    assert layout(6, 2, 30) == (2, False)     # 90 rows: two
    monkeypatch.setenv("PK_CUDA_DECODE_OWN", "auto")
    assert layout(32, 8, 1) == (1, True)
    monkeypatch.setenv("PK_CUDA_DECODE_OWN", "rows")
    assert layout(32, 8, 1) == (1, False)
    monkeypatch.setenv("PK_CUDA_DECODE_OWN", "keys")
    assert layout(6, 2, 17) == (4, True)      # 51 rows: four blocks of 16


def _split_options(inputs):
    *tensors, options = inputs
    return tensors, options


def _call_op(op_name, call):
    return getattr(cuda.kernels(), op_name)(call.q, call.k, call.v, call.prefix_k, call.prefix_v,
                                            call.key_padding_mask, call.prefix_index, call.prefix_lens, call.causal,
                                            call.scale)


# The other pipeline of each kernel (BlockAttention's kStages): the forward with a ring of 3 (K, V) tile pairs, the
# decode with one K and one V tile; the shipped build has them the other way round, and bench/gpu_check.sh
# --tune-cuda times both on a GPU. Emulated only (on a GPU the built extension has the shipped settings).
SWAPPED_STAGES = ("-DPK_FORWARD_STAGES=3", "-DPK_DECODE_STAGES=1")


@pytest.mark.skipif(HAS_CUDA or unavailable_reason() is not None,
                    reason="the emulated build (no GPU here, and a host compiler with CUDA headers)")
@pytest.mark.parametrize("schedule", EMULATOR_SCHEDULES)
@pytest.mark.parametrize("op_name,case,dtype",
                         [("forward", c, torch.float16) for c in FORWARD_CASES] +
                         [("forward", FORWARD_CASES[4], torch.bfloat16)] +
                         [("decode", c, torch.float16) for c in DECODE_CASES],
                         ids=lambda x: x.id if isinstance(x, Case) else str(x).removeprefix("torch."))
def test_other_pipeline_depths_match_reference(op_name, case, dtype, schedule, monkeypatch):
    monkeypatch.setenv("PK_EMU_SCHEDULE", schedule)
    previous = cuda.use_kernels(emulated_namespace(SWAPPED_STAGES), "cpu")
    try:
        _check_op(op_name, case, dtype, torch.device("cpu"))
    finally:
        cuda.use_kernels(*previous)


# (card, its per-block opt-in and per-SM shared memory in KiB, the decode's ring depth there at head dim 64 / 128)
CARDS = [("sm90", 227, 228, 3, 3), ("sm80", 163, 164, 3, 2), ("sm86", 99, 100, 2, 1)]


@pytest.mark.skipif(HAS_CUDA or unavailable_reason() is not None,
                    reason="the emulated build (no GPU here, and a host compiler with CUDA headers)")
@pytest.mark.parametrize("card,per_block_kib,per_sm_kib,stages_d64,stages_d128", CARDS, ids=lambda x: str(x))
@pytest.mark.parametrize("case", [DECODE_CASES[0], DECODE_CASES[-1]], ids=lambda c: c.id)
def test_decode_ring_depth_keeps_two_blocks_per_sm(case, card, per_block_kib, per_sm_kib, stages_d64, stages_d128,
                                                   monkeypatch):
    """The decode takes the deepest ring of (K, V) tile pairs that still lets two blocks share an SM (its launch is
    sized for two programs per SM): at head dim 128, 3 stages (112 KB) on sm_90, 2 (80 KB) on an A100 (164 KiB
    per SM), 1 (48 KB) on sm_86/89 cards (100 KiB per SM, 99 per block). Each depth is checked against the truth;
    the emulator refuses a launch over its per-block limit, and over 48 KiB without the opt-in, as a GPU does."""
    monkeypatch.setenv("PK_EMU_MAX_SHARED_KIB", str(per_block_kib))
    monkeypatch.setenv("PK_EMU_SHARED_PER_SM_KIB", str(per_sm_kib))
    monkeypatch.setenv("PK_EMU_SCHEDULE", "greedy")
    ops = emulated_kernels()
    previous = cuda.use_kernels("prefix_kernels_emulated", "cpu")
    try:
        ops.shared_memory_stats(True)
        _check_op("decode", case, torch.float16, torch.device("cpu"))
        largest = ops.shared_memory_stats(True)[2]
    finally:
        cuda.use_kernels(*previous)
    stages = stages_d64 if case.head_dim == 64 else stages_d128
    assert largest == (64 + 2 * 64 * stages) * case.head_dim * 2, (largest, stages)


@pytest.mark.parametrize("op_name", ["forward", "decode"])
def test_int32_prefix_index_and_lens(kernels, op_name):
    case = Case(batch=5, heads_q=6, heads_kv=2, seq_q=3 if op_name == "decode" else 20, seq_k=25, prefix_len=37,
                head_dim=64, num_prefixes=3, prefix_lens=(37, 5, 0), padding="left")
    _check_op(op_name, case, torch.float16, kernels, index_dtype=torch.int32)


@pytest.mark.parametrize("loop", ["mma", "wgmma"])
def test_decode_replays_in_a_cuda_graph(kernels, loop, monkeypatch):
    """The CUDA decode allocates from shapes only and never syncs: it captures and replays in a CUDA graph (with
    either prefix loop; the wgmma one's first call, eager here, checks the loaded code outside the capture)."""
    if kernels.type != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    if loop == "wgmma":
        _hopper_or_skip(kernels, "decode-wgmma")
    monkeypatch.setenv("PK_CUDA_DECODE", loop)
    case = Case(batch=5, heads_q=6, heads_kv=2, seq_q=1, seq_k=23, prefix_len=300, head_dim=128, num_prefixes=2,
                prefix_lens=(300, 40))
    *tensors, options = make_inputs(case, torch.bfloat16, kernels)
    call = _validated(tensors, options)
    eager, _ = cuda.cuda_decode_attention(call)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, _ = cuda.cuda_decode_attention(call)
    tensors[0].copy_(torch.randn_like(tensors[0]))  # new queries, same buffers
    graph.replay()
    expected, _ = cuda.cuda_decode_attention(call)
    assert not torch.equal(eager, expected)
    assert torch.equal(captured, expected)


def _random_case(generator, decode):
    """Odd shapes drawn fresh each run (reproducible from the printed torch seed)."""
    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    heads_kv = pick((1, 2))
    num_prefixes = pick((1, 1, 2, 3))
    prefix_len = pick((0, 1, 17, 64, 65, 130))
    return Case(
        batch=pick((1, 2, 3, 5)), heads_kv=heads_kv, heads_q=heads_kv * pick((1, 3, 4)),
        seq_q=pick((1, 2, 5, 16)) if decode else pick((1, 17, 63, 64, 65, 100)),
        seq_k=pick((0, 1, 9, 64, 97, 150)), prefix_len=prefix_len, head_dim=pick((64, 128)),
        num_prefixes=num_prefixes,
        prefix_lens=tuple(pick(range(prefix_len + 1)) for _ in range(num_prefixes)) if pick((0, 1)) else None,
        causal=bool(pick((0, 1, 1))), padding=pick((None, "left", "random")), q_layout=pick(("bshd", "bhsd")),
        kv_slice=bool(pick((0, 1))))


@pytest.mark.parametrize("op_name", ["forward", "forward-wgmma", "forward-wgmma-tma", "decode", "decode-wgmma"])
def test_random_shapes_match_reference(kernels, op_name, monkeypatch):
    if op_name.startswith("forward-"):
        loop = op_name.removeprefix("forward-")
        _hopper_or_skip(kernels, loop)
        monkeypatch.setenv("PK_CUDA_FORWARD", loop)
        op_name = "forward"
    elif op_name == "decode-wgmma":
        _hopper_or_skip(kernels, op_name)
        monkeypatch.setenv("PK_CUDA_DECODE", "wgmma")
        op_name = "decode"
    generator = torch.Generator().manual_seed(int(torch.randint(2**31, (1,))))
    for _ in range(6):
        case = _random_case(generator, decode=op_name == "decode")
        if case.seq_k == 0 and case.padding:
            case = Case(**{**case.__dict__, "padding": None})
        dtype = DTYPES[int(torch.randint(2, (1,)))].values[0]
        index_dtype = (torch.int32, torch.int64)[int(torch.randint(2, (1,)))]
        try:
            _check_op(op_name, case, dtype, kernels, index_dtype)
        except AssertionError as error:
            raise AssertionError(f"{case.id} {dtype}: {error}") from error


def test_public_op_routes_decode_and_training_to_cuda(kernels):
    """backend="cuda": short queries without grad take the CUDA decode, the rest the differentiable CUDA forward
    whose backward (Triton) sums the prefix gradient over the batch; attention sinks on both (applied to their
    (out, lse), the LSE's gradient through the Triton backward)."""
    dtype = torch.float16
    case = Case(batch=3, heads_q=6, heads_kv=2, seq_q=17, seq_k=21, prefix_len=11, head_dim=64, padding="left",
                sinks=True)
    *tensors, options = make_inputs(case, dtype, kernels, requires_grad=True)
    out_weight, lse_weight = loss_weights(tensors)
    truth, reference_errors = truth_and_reference_grad_errors(tensors, options, out_weight, lse_weight)
    out, lse = prefix_attention(*tensors, return_lse=True, backend="cuda", **options)
    attention_loss(out, lse, out_weight, lse_weight).backward()
    for name, leaf, expected, reference_error in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), tensors, truth,
                                                     reference_errors):
        assert leaf.grad.shape == leaf.shape
        assert_close_to_truth(name, leaf.grad, expected, reference_error, dtype)

    decode_case = Case(batch=3, heads_q=6, heads_kv=2, seq_q=1, seq_k=21, prefix_len=11, head_dim=64, sinks=True)
    *tensors, options = make_inputs(decode_case, dtype, kernels)
    (truth_out, truth_lse), reference_error = truth_and_reference_error(tensors, options, dtype)
    with torch.no_grad():
        out, lse = prefix_attention(*tensors, return_lse=True, backend="cuda", **options)
    assert_attention_matches_truth(out, lse, tensors[0], truth_out, truth_lse, reference_error, dtype)


def test_torch_compile_fullgraph_traces_the_cuda_path(kernels):
    """Forward (the CUDA op, shapes from its fake), backward (Triton) and the decode, in one fullgraph trace."""
    case = Case(batch=3, heads_q=6, heads_kv=2, seq_q=17, seq_k=20, prefix_len=9, head_dim=64, num_prefixes=2,
                prefix_lens=(9, 4), padding="left")
    *tensors, options = make_inputs(case, torch.float16, kernels)
    extra = [options[name] for name in ("key_padding_mask", "prefix_index", "prefix_lens")]

    def step(q, k, v, prefix_k, prefix_v, mask, prefix_index, prefix_lens):
        out = prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask=mask, prefix_index=prefix_index,
                               prefix_lens=prefix_lens, backend="cuda")
        with torch.no_grad():  # the decode strategy: one query per sequence, no gradient
            last = prefix_attention(q[:, :, -1:], k, v, prefix_k, prefix_v, key_padding_mask=mask,
                                    prefix_index=prefix_index, prefix_lens=prefix_lens, backend="cuda")
        return (out.float() ** 2).sum(), last

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_leaves = [t.detach().requires_grad_() for t in tensors]
    compiled_leaves = [t.detach().requires_grad_() for t in tensors]
    eager_loss, eager_last = step(*eager_leaves, *extra)
    compiled_loss, compiled_last = compiled(*compiled_leaves, *extra)
    eager_loss.backward()
    compiled_loss.backward()
    assert torch.equal(eager_last, compiled_last)
    for a, b in zip(eager_leaves, compiled_leaves):
        assert b.grad is not None and torch.equal(a.grad, b.grad)


def _count_kernel_calls(monkeypatch) -> list:
    """A list that grows by one each time the Python side fetches the CUDA ops (once per forward or decode)."""
    calls = []
    real_kernels = cuda.kernels
    monkeypatch.setattr(cuda, "kernels", lambda: calls.append(1) or real_kernels())
    return calls


def test_auto_runs_small_decode_calls_on_cuda(kernels, monkeypatch):
    """backend="auto" where the kernels serve the call: a small decode call runs on them and matches the truth; the
    same call once its work passes cuda.AUTO_CUDA_DECODE_MAX_WORK, and a call with gradients, do not."""
    launches = _count_kernel_calls(monkeypatch)
    dtype = torch.float16
    case = Case(batch=3, heads_q=6, heads_kv=2, seq_q=1, seq_k=21, prefix_len=11, head_dim=64)
    *tensors, options = make_inputs(case, dtype, kernels)
    (truth_out, truth_lse), reference_error = truth_and_reference_error(tensors, options, dtype)
    with torch.no_grad():
        out, lse = prefix_attention(*tensors, return_lse=True, backend="auto", **options)
    assert len(launches) == 1
    assert_attention_matches_truth(out, lse, tensors[0], truth_out, truth_lse, reference_error, dtype)
    work = case.batch * (case.heads_q // case.heads_kv) * case.seq_q * case.prefix_len
    monkeypatch.setattr(cuda, "AUTO_CUDA_DECODE_MAX_WORK", work - 1)
    with torch.no_grad():
        prefix_attention(*tensors, backend="auto", **options)
    monkeypatch.setattr(cuda, "AUTO_CUDA_DECODE_MAX_WORK", work)
    prefix_attention(*(t.detach().requires_grad_() for t in tensors), backend="auto", **options)
    assert len(launches) == 1


def _tiny_llama(transformers, device):
    """Two layers, GQA 3, head dim 64 (a head dim the CUDA kernels take), fp16."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=192, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=3, num_key_value_heads=1, head_dim=64,
                                      max_position_embeddings=128)
    return transformers.AutoModelForCausalLM.from_config(config).to(device, torch.float16)


def test_patched_model_trains_through_cuda(kernels, monkeypatch):
    """A Hugging Face model patched with backend="cuda" (fp16, GQA, head dim 64, left padding): loss and prefix
    gradients match the same model patched with the reference backend, and the CUDA forward did run."""
    transformers = pytest.importorskip("transformers")
    import prefix_kernels

    launches = _count_kernel_calls(monkeypatch)
    model = _tiny_llama(transformers, kernels)
    config = model.config
    prefix = prefix_kernels.PrefixTuning(model, num_virtual_tokens=9).to(kernels, torch.float16)
    ids = torch.randint(1, 64, (3, 21), device=kernels)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    results = {}
    for backend in ("torch", "cuda"):
        prefix_kernels.patch(model, prefix, backend=backend)
        prefix.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        results[backend] = (loss.item(), [p.grad.float().clone() for p in prefix.parameters()])
        prefix_kernels.unpatch(model)
    (want_loss, want_grads), (got_loss, got_grads) = results["torch"], results["cuda"]
    assert len(launches) == config.num_hidden_layers
    assert abs(got_loss - want_loss) <= 2e-3 * abs(want_loss)
    for got, want in zip(got_grads, want_grads):
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999


def test_shared_prefix_cache_serves_through_cuda(kernels, monkeypatch):
    """SharedPrefixCache on backend="cuda": the left-padded suffixes and a generated token against the prompt's
    KV (stored once) through the CUDA decode; logits match the same steps on the reference backend."""
    transformers = pytest.importorskip("transformers")
    import prefix_kernels
    from prefix_kernels.hf.compat import cache_kwargs

    launches = _count_kernel_calls(monkeypatch)
    model = _tiny_llama(transformers, kernels).eval()
    config = model.config
    prompt = torch.randint(1, 64, (1, 70), device=kernels)
    suffixes = torch.randint(1, 64, (3, 5), device=kernels)
    mask = torch.ones_like(suffixes)
    mask[0, :2] = 0
    logits = {}
    for backend in ("torch", "cuda"):
        with torch.no_grad():
            cache = prefix_kernels.SharedPrefixCache.from_prompt(model, prompt, backend=backend)
            first = model(input_ids=suffixes, attention_mask=mask, **cache_kwargs(model, cache)).logits
            step = model(input_ids=first[:, -1:].argmax(-1), attention_mask=torch.cat([mask, mask[:, -1:]], 1),
                         **cache_kwargs(model, cache)).logits
        logits[backend] = torch.cat([first[:, -1:], step], 1).float()
        prefix_kernels.unpatch(model)
    assert len(launches) == 2 * config.num_hidden_layers  # the suffixes, then one token, in every layer
    scale = logits["torch"].std().item()
    assert (logits["cuda"] - logits["torch"]).abs().max().item() <= 2e-2 * scale


def test_ldmatrix_reads_are_free_of_bank_conflicts(kernels):
    """The XOR swizzle of the shared tiles puts the 8 rows of every ldmatrix phase in 8 different bank groups (a
    wrong swizzle gives right answers, slowly: only this catches it). Counted by the emulator."""
    if kernels.type != "cpu":
        pytest.skip("counted by the emulator")
    ops = emulated_kernels()
    ops.shared_memory_stats(True)
    for head_dim in (64, 128):
        for op_name, seq_q in (("forward", 40), ("decode", 2)):
            case = Case(batch=2, heads_q=3, heads_kv=1, seq_q=seq_q, seq_k=70, prefix_len=20, head_dim=head_dim)
            *tensors, options = make_inputs(case, torch.bfloat16, kernels)
            call = _validated(tensors, options)
            getattr(ops, op_name)(call.q, call.k, call.v, call.prefix_k, call.prefix_v, None, None, None, True,
                                  call.scale)
    phases, extra, *_ = ops.shared_memory_stats(True)
    assert phases > 0 and extra == 0, f"{extra} extra wavefronts over {phases} ldmatrix phases"


@pytest.mark.parametrize("change, reason", [
    (dict(dtype=torch.float32), "float16 or bfloat16"),
    (dict(head_dim=80), "head dims"),
    (dict(window=4), "sliding window"),
    (dict(softcap=5.0), "softcap"),
    (dict(misaligned=True), "16-byte aligned"),
])
def test_calls_outside_coverage_are_refused_by_cuda_and_served_by_auto(kernels, change, reason):
    dtype = change.get("dtype", torch.float16)
    case = Case(batch=2, heads_q=6, heads_kv=2, seq_q=5, seq_k=9, prefix_len=4, head_dim=change.get("head_dim", 64),
                window=change.get("window"), softcap=change.get("softcap"))
    q, k, v, pk, pv, options = make_inputs(case, dtype, kernels)
    if change.get("misaligned"):
        q = torch.empty(q.numel() + 1, dtype=dtype, device=q.device)[1:].view(q.shape).copy_(q)
    with pytest.raises(ValueError, match=reason):
        prefix_attention(q, k, v, pk, pv, backend="cuda", **options)
    assert cuda.unavailable_reason(_validated([q, k, v, pk, pv], options)) is not None
    if kernels.type == "cuda":  # auto serves it with Triton (on CPU, under the interpreter: slow, not repeated here)
        prefix_attention(q, k, v, pk, pv, backend="auto", **options)


def test_op_checks_its_inputs_before_launching(kernels):
    """Called directly (not through prefix_attention), the op still refuses what its kernels do not handle."""
    q, k, v, pk, pv, _ = make_inputs(Case(head_dim=64), torch.float16, kernels)
    ops = cuda.kernels()
    pk4, pv4 = pk[None], pv[None]
    with pytest.raises(RuntimeError, match="head dim 64 or 128, got 32"):  # the number too: see test_cuda_build
        ops.forward(q[..., :32], k[..., :32], v[..., :32], pk4[..., :32], pv4[..., :32], None, None, None, True, 0.1)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        ops.decode(q.float(), k.float(), v.float(), pk4.float(), pv4.float(), None, None, None, True, 0.1)
    with pytest.raises(RuntimeError, match="prefix_index"):
        ops.forward(q, k, v, torch.cat([pk4, pk4]), torch.cat([pv4, pv4]), None, None, None, True, 0.1)
    for scale in (0.0, 1e-39, 1e39):  # 0 (or a flushed denormal) in base 2 makes masked scores -inf * 0 = NaN
        with pytest.raises(RuntimeError, match="scale"):
            ops.decode(q[:, :, :1], k, v, pk4, pv4, None, None, None, True, scale)

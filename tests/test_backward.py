"""The Triton backward (through the custom op's autograd) against the float64 reference's autograd.

Gradients of all five inputs, with a loss that uses the LSE too, over the forward's sweep; which kernels run for a
subset of inputs; torch.compile; what is saved for backward; the per-prefix sum with several prefixes; and the
compile check of every backward kernel configuration for sm_80 / sm_90.
"""
import pytest
import torch

from conftest import DEVICE, KERNEL_DTYPES
from helpers import (ERROR_FLOOR, TRITON_39, Case, assert_attention_matches_truth, attention_loss,
                     batch_strided_past_int32, compile_check_spills, loss_weights, make_inputs, max_error,
                     reference_grads, truth_and_reference_error, truth_and_reference_grad_errors)
from prefix_kernels import prefix_attention
from prefix_kernels.reference import prefix_attention_reference
from prefix_kernels.triton import backward as triton_backward
from test_forward import CASES

NAMES = ("dq", "dk", "dv", "dprefix_k", "dprefix_v")


def _kernel_grads(tensors, options, out_weight, lse_weight, requires=(True,) * 5):
    leaves = [t.detach().requires_grad_(r) for t, r in zip(tensors, requires)]
    out, lse = prefix_attention(*leaves, return_lse=True, backend="triton", **options)
    attention_loss(out, lse, out_weight, lse_weight).backward()
    return [leaf.grad for leaf in leaves]


def _assert_grads_close(grads, truth, reference_errors, dtype):
    for name, got, want, ref_error in zip(NAMES, grads, truth, reference_errors):
        assert got is not None and got.shape == want.shape and got.dtype == dtype, name
        assert not torch.isnan(got).any(), f"{name} has NaN"
        error = max_error(got, want)
        allowed = 2 * ref_error + ERROR_FLOOR[dtype]
        assert error <= allowed, (f"{name}: max error {error:.3g} > allowed {allowed:.3g} "
                                  f"(2 x reference's own {ref_error:.3g} + floor {ERROR_FLOOR[dtype]:g})")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gradients_match_reference(case, dtype):
    *tensors, options = make_inputs(case, dtype, DEVICE)
    out_weight, lse_weight = loss_weights(tensors)
    truth, reference_errors = truth_and_reference_grad_errors(tensors, options, out_weight, lse_weight)

    grads = _kernel_grads(tensors, options, out_weight, lse_weight)

    _assert_grads_close(grads, truth, reference_errors, dtype)
    for grad, tensor in zip(grads, tensors):
        assert grad.shape == tensor.shape  # a 3-D prefix gets a 3-D gradient


def test_gradients_without_lse_in_the_loss():
    """The usual training call: only the output is used, so no LSE gradient reaches the backward."""
    case = Case(batch=2, heads_q=4, heads_kv=2, seq_q=19, seq_k=23, prefix_len=21, head_dim=32, padding="left")
    *tensors, options = make_inputs(case, torch.float32, DEVICE)
    out_weight, _ = loss_weights(tensors)
    truth, reference_errors = truth_and_reference_grad_errors(tensors, options, out_weight, None)
    _assert_grads_close(_kernel_grads(tensors, options, out_weight, None), truth, reference_errors, torch.float32)


def test_only_lse_in_the_loss():
    case = Case(batch=2, heads_q=2, heads_kv=1, seq_q=9, seq_k=9, prefix_len=12, head_dim=32)
    *tensors, options = make_inputs(case, torch.float32, DEVICE)
    leaves = [t.detach().requires_grad_() for t in tensors]
    _, lse = prefix_attention(*leaves, return_lse=True, backend="triton", **options)
    lse.sum().backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in tensors]
    prefix_attention_reference(*ref_leaves, return_lse=True, **options)[1].sum().backward()
    for name, a, b in zip(NAMES, leaves, ref_leaves):
        want = b.grad if b.grad is not None else torch.zeros_like(b)  # v does not reach the LSE
        assert max_error(a.grad, want) < 1e-5, name


@pytest.mark.parametrize("path", ["kernel-epilogue", "after-the-decode"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_sink_gradient_matches_reference(dtype, path):
    """d sinks (gpt-oss trains them; prefix tuning does not) with the LSE in the loss, against the float64
    reference, within 2x the reference's own error in this dtype: from the differentiable op's autograd (the
    forward's epilogue took the sinks; q needs a gradient too), and where only the sinks need one (the decode, with
    no backward, then the elementwise step after it). Rows that see nothing (sequence 0) give the sink all of their
    weight, and no NaN."""
    case = Case(batch=2, heads_q=6, heads_kv=2, seq_q=9, seq_k=11, prefix_len=0, head_dim=32, padding="empty-row",
                sinks=True)
    *tensors, options = make_inputs(case, dtype, DEVICE)
    sinks = options.pop("sinks")
    out_weight, lse_weight = loss_weights(tensors)
    q_grad = path == "kernel-epilogue"

    def grads(backend, cast=None, upcast=True):
        leaves = [sinks.detach().to(cast or sinks.dtype).requires_grad_(),
                  tensors[0].detach().to(cast or tensors[0].dtype).requires_grad_(q_grad)]
        inputs = [leaves[1]] + [t.to(cast or t.dtype) for t in tensors[1:]]
        if backend == "torch":
            out, lse = prefix_attention_reference(*inputs, return_lse=True, sinks=leaves[0], upcast=upcast, **options)
        else:
            out, lse = prefix_attention(*inputs, return_lse=True, sinks=leaves[0], backend=backend, **options)
        attention_loss(out, lse, out_weight, lse_weight).backward()
        return [leaf.grad for leaf in leaves]

    names = ("dsinks", "dq") if q_grad else ("dsinks",)
    truth = grads("torch", cast=torch.float64)
    reference_errors = [max_error(g, t) for g, t in zip(grads("torch", upcast=False), truth[:len(names)])]
    for name, got, want, reference_error in zip(names, grads("triton"), truth, reference_errors):
        assert got.dtype == dtype and not torch.isnan(got).any(), name
        error = max_error(got, want)
        assert error <= 2 * reference_error + ERROR_FLOOR[dtype] * want.abs().max().item(), (name, error,
                                                                                            reference_error)


def test_create_graph_gives_first_gradients_and_a_clear_error_for_the_second():
    """create_graph=True: first-order gradients as without it; differentiating them again raises a message that
    says double backward is not supported (PyTorch's own named the backward op's missing autograd formula)."""
    case = Case(batch=2, heads_q=3, heads_kv=1, seq_q=9, seq_k=11, prefix_len=7, head_dim=32)
    *tensors, options = make_inputs(case, torch.float32, DEVICE)
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = prefix_attention(*leaves, backend="triton", **options)
    grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
    plain = [t.detach().requires_grad_() for t in tensors]
    want = torch.autograd.grad(prefix_attention(*plain, backend="triton", **options).square().sum(), plain)
    for name, got, expected in zip(NAMES, grads, want):
        assert torch.equal(got.detach(), expected), name
    with pytest.raises(NotImplementedError, match="no double backward"):
        grads[0].sum().backward()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the interpreter wraps int32 as a GPU does; a GPU would allocate 6 GB")
def test_offsets_past_int32_are_computed_in_64_bits():
    """q, k, v and the output gradient with batch strides of 2^30 + 64 elements, so that sequence 2 starts past
    2^31: every kernel of the forward, the backward and the decode (whose integer math the interpreter wraps at
    32 bits as the GPU does) gives bit for bit what it gives on contiguous copies."""
    case = Case(batch=3, heads_q=3, heads_kv=1, seq_q=17, seq_k=19, prefix_len=6, head_dim=32, padding="left")
    *tensors, options = make_inputs(case, torch.float16, DEVICE)
    grad_out = torch.randn(tensors[0].shape, dtype=torch.float16)

    def run(q, k, v, grad):
        leaves = [t.detach().requires_grad_() for t in (q, k, v, *tensors[3:])]
        out, lse = prefix_attention(*leaves, return_lse=True, backend="triton", **options)
        out.backward(grad)
        with torch.no_grad():  # S = 1: the decode's kernels
            decoded = prefix_attention(q[:, :, -1:], k, v, *tensors[3:], return_lse=True, backend="triton",
                                       **options)
        return (out, lse, *decoded, *(leaf.grad for leaf in leaves))

    strided = [batch_strided_past_int32(t) for t in (*tensors[:3], grad_out)]
    for name, want, got in zip(("out", "lse", "decode out", "decode lse", *NAMES), run(*tensors[:3], grad_out),
                               run(*strided)):
        assert torch.equal(got, want), name


def test_reference_gradcheck_float64():
    case = Case(batch=2, heads_q=2, heads_kv=1, seq_q=3, seq_k=4, prefix_len=3, head_dim=16, num_prefixes=2,
                prefix_lens=(3, 2), padding="right", softcap=2.0, window=3)
    *tensors, options = make_inputs(case, torch.float64, DEVICE, requires_grad=True)
    torch.autograd.gradcheck(
        lambda *t: prefix_attention_reference(*t, return_lse=True, **options), tensors, atol=1e-6)


class _LaunchSpy:
    """Stands in for a @triton.jit kernel: counts launches and forwards them."""

    def __init__(self, kernel, launches, name):
        self.kernel, self.launches, self.name = kernel, launches, name

    def __getitem__(self, grid):
        self.launches.append(self.name)
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch):
    record = []
    for name in ("_prefix_attention_bwd_dq", "_prefix_attention_bwd_dkdv", "_prefix_attention_bwd_dprefix"):
        monkeypatch.setattr(triton_backward, name, _LaunchSpy(getattr(triton_backward, name), record, name))
    return record


@pytest.mark.parametrize("requires, kernels", [
    ((False, False, False, True, True), {"_prefix_attention_bwd_dprefix"}),
    ((True, False, False, False, False), {"_prefix_attention_bwd_dq"}),
    ((False, True, False, False, False), {"_prefix_attention_bwd_dkdv"}),
    ((False, False, False, False, True), {"_prefix_attention_bwd_dprefix"}),
], ids=["prefix-only", "q-only", "k-only", "prefix_v-only"])
def test_only_the_needed_gradients_are_computed(requires, kernels, launches):
    case = Case(batch=2, heads_q=4, heads_kv=2, seq_q=7, seq_k=9, prefix_len=11, head_dim=32)
    *tensors, options = make_inputs(case, torch.float32, DEVICE)
    out_weight, lse_weight = loss_weights(tensors)
    grads = _kernel_grads(tensors, options, out_weight, lse_weight, requires=requires)
    assert set(launches) == kernels and len(launches) == len(kernels)
    truth = reference_grads(tensors, options, out_weight, lse_weight, dtype=torch.float64)
    for name, need, got, want in zip(NAMES, requires, grads, truth):
        if need:
            assert max_error(got, want) < 1e-5, name
        else:
            assert got is None, name


def test_torch_compile_fullgraph_traces_forward_and_backward():
    """The op, its backward and the attention sinks' step after it (gpt-oss), in one fullgraph trace: the same
    gradients as eagerly, the sinks' included."""
    case = Case(batch=3, heads_q=4, heads_kv=2, seq_q=5, seq_k=7, prefix_len=6, head_dim=32, padding="left",
                softcap=3.0, num_prefixes=2, prefix_lens=(6, 4), sinks=True)
    *tensors, options = make_inputs(case, torch.float32, DEVICE)

    def step(q, k, v, prefix_k, prefix_v, sinks, mask, prefix_index, prefix_lens):
        out, lse = prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask=mask, softcap=3.0,
                                    prefix_index=prefix_index, prefix_lens=prefix_lens, return_lse=True,
                                    sinks=sinks, backend="triton")
        return (out * out).sum() + lse.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    tensors.append(options["sinks"])
    extra = [options[name] for name in ("key_padding_mask", "prefix_index", "prefix_lens")]
    eager_leaves = [t.detach().requires_grad_() for t in tensors]
    compiled_leaves = [t.detach().requires_grad_() for t in tensors]
    step(*eager_leaves, *extra).backward()
    compiled(*compiled_leaves, *extra).backward()
    for name, a, b in zip(NAMES + ("dsinks",), eager_leaves, compiled_leaves):
        assert b.grad is not None and max_error(a.grad, b.grad) < 1e-6, name


def test_nothing_of_batch_times_prefix_size_is_saved_for_backward():
    """Saved tensors are q, k, v, out, lse and the ONE prefix copy: nothing with B*P*D elements, no expanded view."""
    case = Case(batch=4, heads_q=2, heads_kv=1, seq_q=3, seq_k=5, prefix_len=40, head_dim=32, num_prefixes=2,
                prefix_lens=(40, 17))
    *tensors, options = make_inputs(case, torch.float32, DEVICE, requires_grad=True)
    prefix_k = tensors[3]
    batch_prefix_numel = case.batch * case.heads_kv * case.prefix_len * case.head_dim
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = prefix_attention(*tensors, backend="triton", **options)
    out.sum().backward()
    assert saved, "nothing was saved: the hooks did not see the op"
    assert any(t.data_ptr() == prefix_k.data_ptr() for t in saved), "the prefix itself is saved"
    for t in saved:
        assert t.numel() < batch_prefix_numel, f"a tensor of shape {tuple(t.shape)} was saved"
        assert 0 not in t.stride() or t.numel() <= 1, f"an expanded view {tuple(t.shape)} was saved"


def test_backward_allocates_nothing_of_batch_times_prefix_size():
    """What the backward allocates stays well below one [B, Hkv, P, D] buffer: the prefix gradient is summed in
    place (or in a fixed number of chunk partials, never per sequence). B is large so that O(P) scratch (up to
    configs.MAX_PREFIX_CHUNKS partials on a GPU) is clearly told apart from a per-sequence buffer."""
    batch = 128 if DEVICE.type == "cuda" else 32  # off the GPU the prefix gradient is never chunked
    case = Case(batch=batch, heads_q=2, heads_kv=1, seq_q=2, seq_k=3, prefix_len=64, head_dim=32)
    *tensors, options = make_inputs(case, torch.float32, DEVICE, requires_grad=True)
    batch_prefix_bytes = case.batch * case.heads_kv * case.prefix_len * case.head_dim * 4
    out = prefix_attention(*tensors, backend="triton", **options)
    grad = torch.randn_like(out)
    if DEVICE.type == "cuda":  # the caching allocator's peak: every allocation of the backward, together
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out.backward(grad)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        assert 0 < peak < batch_prefix_bytes / 2, peak
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out.backward(grad)
    ops = [e for e in prof.events() if e.name == "prefix_kernels::prefix_attention_bwd"]
    assert len(ops) == 1
    assert 0 < ops[0].cpu_memory_usage < batch_prefix_bytes / 2, ops[0].cpu_memory_usage
    for event in prof.events():
        if event.name.startswith("aten::"):  # single allocations (the op-level events are totals)
            assert event.cpu_memory_usage < batch_prefix_bytes / 4, (event.name, event.cpu_memory_usage)


def test_prefix_gradient_is_the_sum_over_exactly_the_sequences_using_it():
    case = Case(batch=5, heads_q=4, heads_kv=2, seq_q=6, seq_k=8, prefix_len=10, head_dim=32, num_prefixes=3)
    q, k, v, prefix_k, prefix_v, options = make_inputs(case, torch.float32, DEVICE)
    options["prefix_index"] = torch.tensor([2, 0, 2, 2, 0], device=DEVICE)  # prefix 1 is used by nobody
    options["prefix_lens"] = torch.tensor([10, 10, 7], device=DEVICE)
    tensors = [q, k, v, prefix_k, prefix_v]
    out_weight, lse_weight = loss_weights(tensors)
    grads = _kernel_grads(tensors, options, out_weight, lse_weight)

    # Each sequence alone, against its own prefix as a single [Hkv, P, D] prefix, in float64.
    expected_k = torch.zeros_like(prefix_k, dtype=torch.float64)
    expected_v = torch.zeros_like(prefix_v, dtype=torch.float64)
    for b, n in enumerate(options["prefix_index"].tolist()):
        one = [q[b:b + 1], k[b:b + 1], v[b:b + 1], prefix_k[n], prefix_v[n]]
        g = reference_grads(one, dict(causal=True, prefix_lens=options["prefix_lens"][n:n + 1]),
                            out_weight[b:b + 1], lse_weight[b:b + 1], dtype=torch.float64)
        expected_k[n] += g[3]
        expected_v[n] += g[4]
    assert max_error(grads[3], expected_k) < 1e-5 and max_error(grads[4], expected_v) < 1e-5
    assert (grads[3][1] == 0).all() and (grads[4][1] == 0).all(), "an unused prefix gets exactly zero"
    assert (grads[3][2, :, 7:] == 0).all() and (grads[4][2, :, 7:] == 0).all(), "keys past prefix_lens get zero"


def test_prefix_gradient_chunks_fill_whole_waves():
    """The chunk count of the d prefix kernel (configs.chunks_for_waves): equal programs run in waves, so a count
    that spills a few programs into one more wave costs a whole round. The ANCHORS training shapes at head dim 128
    on 132 SMs: B=8 P=128 has 32 programs of 256 query tiles (one wave of 4 chunks, where the first rule's 9 took 3
    rounds), B=16 P=512 has 128 (one wave unsplit: no partials at all). With few query tiles (a review's case:
    32 programs of 32 tiles on 108 SMs) one round of 3 chunks of 11 tiles beats 10 chunks of 4 (2 of them empty,
    3 rounds). Never an empty chunk."""
    from prefix_kernels.triton.configs import MAX_PREFIX_CHUNKS, chunks_for_waves, prefix_grad_chunks

    assert chunks_for_waves(32, 256, MAX_PREFIX_CHUNKS, 132) == 4
    assert chunks_for_waves(128, 256, MAX_PREFIX_CHUNKS, 132) == 1
    assert chunks_for_waves(32, 32, MAX_PREFIX_CHUNKS, 108) == 3
    assert chunks_for_waves(160, 256, MAX_PREFIX_CHUNKS, 132) == 4   # 2 rounds unsplit; 5 rounds of a quarter
    assert chunks_for_waves(1, 256, MAX_PREFIX_CHUNKS, 132) == MAX_PREFIX_CHUNKS
    assert chunks_for_waves(1, 256, 3, 132) == 3 and chunks_for_waves(5, 4, 0, 132) == 1
    for programs in range(1, 300, 7):
        for query_tiles in (1, 2, 5, 32, 33, 256):
            for slots in (108, 132):
                chunks = chunks_for_waves(programs, query_tiles, min(MAX_PREFIX_CHUNKS, query_tiles), slots)
                per_chunk = -(-query_tiles // chunks)
                assert 1 <= chunks <= min(MAX_PREFIX_CHUNKS, query_tiles)
                assert -(-query_tiles // per_chunk) == chunks, (programs, query_tiles, slots, chunks)  # none empty
    assert prefix_grad_chunks(32, 256, torch.device("cpu")) == 1  # off the GPU the gradient is never chunked


@pytest.mark.parametrize("chunks", [2, 3, 16])
def test_chunked_prefix_gradient_matches_unsplit(chunks):
    """The split of the prefix gradient over query chunks (used on the GPU when few programs exist) sums to the
    same gradient; each split is deterministic run to run."""
    case = Case(batch=3, heads_q=6, heads_kv=2, seq_q=21, seq_k=13, prefix_len=19, head_dim=32, num_prefixes=2,
                prefix_lens=(19, 6), softcap=4.0)
    q, k, v, prefix_k, prefix_v, options = make_inputs(case, torch.float32, DEVICE)
    prefix_k, prefix_v = prefix_k.contiguous(), prefix_v.contiguous()
    from prefix_kernels.triton.forward import prefix_attention_forward

    scale = case.head_dim ** -0.5
    out, lse = prefix_attention_forward(q, k, v, prefix_k, prefix_v, scale=scale, **options)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    needs = (False, False, False, True, True)

    def run(n_chunks):
        return triton_backward.prefix_attention_backward(
            q, k, v, prefix_k, prefix_v, out, lse, grad_out, grad_lse, needs=needs, scale=scale,
            prefix_chunks=n_chunks, **options)[3:]

    whole, split, again = run(1), run(chunks), run(chunks)
    for a, b, c in zip(whole, split, again):
        assert max_error(a, b) < 1e-5
        assert torch.equal(b, c)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("variant", ["default-chunks", "4-chunks", "fused-dq"])
def test_prefix_gradient_where_the_window_ends_inside_the_query_blocks(dtype, variant, monkeypatch):
    """With the window over the prefix, the d prefix kernel skips the query blocks past every key's window (a
    range clipped per sequence). The boundary sits one row into a block: sequence 0 (3 padding keys, so its
    queries start at position 2) sees the prefix's last key (position -1) from rows 0..32 when the window is 36,
    so with 32-row query blocks its second block holds exactly one row that counts. Group 3 (blocks before heads
    in the flattened order), two prefixes of different lengths, rows past S, chunks dealt round-robin, the fused
    dq."""
    from dataclasses import replace

    from prefix_kernels.triton import configs

    case = Case(batch=3, heads_q=6, heads_kv=2, seq_q=70, seq_k=75, prefix_len=40, head_dim=32, num_prefixes=2,
                prefix_lens=(40, 23), padding="left", window=36, window_includes_prefix=True, left_padding=True)
    *tensors, options = make_inputs(case, dtype, DEVICE)
    assert options["left_padding"].tolist()[0] == 3
    assert configs.backward_config(case.head_dim, dtype, case.seq_q).dprefix.block_m == 32
    if variant == "4-chunks":  # 9 query tiles per sequence: the chunks start each sequence at different residues
        monkeypatch.setattr(triton_backward, "dprefix_chunks", lambda *args: 4)
    if variant == "fused-dq":
        monkeypatch.setattr(triton_backward, "backward_config",
                            lambda *args: replace(configs.backward_config(*args), fuse_dq=True))
    out_weight, lse_weight = loss_weights(tensors)
    truth, reference_errors = truth_and_reference_grad_errors(tensors, options, out_weight, lse_weight)
    _assert_grads_close(_kernel_grads(tensors, options, out_weight, lse_weight), truth, reference_errors, dtype)


@pytest.mark.parametrize("window", ["L+P", 2 ** 31 - 1, 2 ** 31 - 5, 2 ** 31 + 3])
@pytest.mark.parametrize("layout", ["left-padded", "unpadded-S<L"])
def test_a_window_at_or_past_every_distance_masks_nothing(layout, window):
    """A window no query's distance reaches (L + P; int32's max, a natural "no window") is exactly no window, over
    the prefix too: forward, decode and every gradient. The launchers clamp the window to L + P because the kernels
    add it to int32 positions, where 2**31 - 1 wrapped: it zeroed the own keys' dk/dv, and the prefix gradient of
    rows whose left padding puts them before the prefix's last key (a helper's fuzz). Unpadded with S < L, the last
    query sees the prefix's first key at L - 1 + P, one short of L + P: a clamp one lower would mask it."""
    padded = layout == "left-padded"
    seq_q, seq_k, prefix_len = (8, 8, 16) if padded else (5, 8, 16)
    case = Case(batch=2, heads_q=3, heads_kv=1, seq_q=seq_q, seq_k=seq_k, prefix_len=prefix_len, head_dim=32,
                padding="left" if padded else None, window=seq_k + prefix_len if window == "L+P" else window,
                window_includes_prefix=True, left_padding=padded)
    *tensors, options = make_inputs(case, torch.float32, DEVICE)
    if padded:  # both rows start past their padding, before the prefix's position: negative row shifts
        assert options["left_padding"].tolist() == [3, 10 % 8]
    out_weight, lse_weight = loss_weights(tensors)
    without = {k: v for k, v in options.items() if k not in ("window", "window_includes_prefix", "left_padding")}
    if not padded:  # the boundary is real: one less and the farthest pair is masked
        shorter = dict(options, window=seq_k + prefix_len - 1)
        assert max_error(prefix_attention_reference(*tensors, **shorter),
                         prefix_attention_reference(*tensors, **without)) > 1e-3
    truth, reference_errors = truth_and_reference_grad_errors(tensors, without, out_weight, lse_weight)
    _assert_grads_close(_kernel_grads(tensors, options, out_weight, lse_weight), truth, reference_errors,
                        torch.float32)
    step = [t[:, :, -1:] if i == 0 else t for i, t in enumerate(tensors)]  # the last query alone: the decode path
    got = prefix_attention(*step, backend="triton", **options)
    assert max_error(got, prefix_attention_reference(*step, **without)) < 1e-5


def test_the_kernels_window_argument_keeps_one_specialization_as_a_cache_grows():
    """window_argument: the window itself where it can mask something (below L + P), else at least L + P and a
    multiple of 16, so that a decode whose L grows each step hands Triton one class of integer (its divisibility
    specialization) all along: no kernel compiled again mid-generation."""
    from prefix_kernels.triton.forward import window_argument

    assert window_argument(None, 8, 16) == 0
    for prefix_len in (0, 5, 16):
        classes = set()
        for seq_k in range(0, 200):
            clamped = window_argument(2 ** 31 - 1, seq_k, prefix_len)
            assert clamped >= max(seq_k + prefix_len, 1) and clamped < 2 ** 31 - 1
            classes.add(clamped % 16 == 0)
            for window in (1, 7, 64, 100):
                if window < seq_k + prefix_len:
                    assert window_argument(window, seq_k, prefix_len) == window
        assert classes == {True}


@pytest.mark.compile
def test_backward_compiles_for_sm80_and_sm90_without_spills_in_main_configs():
    spilled, log = compile_check_spills("bwd-", timeout=3600)
    lines = list(spilled)
    for kernel in ("dq", "dkdv", "dprefix", "preprocess"):
        for dtype in ("float16", "bfloat16", "float32"):
            for arch in ("sm_80", "sm_90"):
                assert any(f"{arch} bwd-{kernel}-{dtype}" in line for line in lines), (kernel, dtype, arch)
    # The training hot path (fp16/bf16, long queries, no masks) on sm_90 spills at most a token amount. The
    # head-dim-128 tiles were chosen by timing on an H200 (bench/tune_backward.py): the larger tiles won by ~2x
    # over spill-free smaller ones although ptxas reports a few dozen bytes of spills on this path.
    hot = [line for line in lines if "sm_90" in line and line.split(":")[0].endswith("-none")
           and "float32" not in line and any(f"-d{d}-" in line for d in (64, 128)) and "-m16-" not in line
           and "fused-dq" not in line]
    assert hot, log[-2000:]
    for line in hot:
        assert spilled[line] <= (64 if TRITON_39 else 32), line  # Triton 3.9: 60 B (3.8: 12 B)
    # No configuration may spill more than a bounded amount (IEEE fp32 dots once spilled ~700 B on sm_90; the
    # timed d128 key-major tiles spill ~450 B with every mask feature on, ~610 B under Triton 3.9).
    for line, amount in spilled.items():
        assert amount <= (2560 if "fused-dq" in line else 640 if TRITON_39 else 512), line
    # The fused-dq variants (BackwardConfig.fuse_dq, opt-in for the sweep) hold a third fp32 tile: the default
    # d128 tile spills there (~1-2 KB on sm_80 with every mask), the sweep's 32-query tile must not on sm_90.
    fused = [line for line in lines if "fused-dq" in line]
    for kernel in ("dkdv", "dprefix"):
        for arch in ("sm_80", "sm_90"):
            assert any(f"{arch} bwd-{kernel}-bfloat16-d128" in line for line in fused), (kernel, arch)
        for dtype in ("float16", "bfloat16"):
            name = f"sm_90 bwd-{kernel}-{dtype}-d128-m32-n128-w8-s2-fused-dq-none"
            found = [line for line in fused if name in line]
            assert found, f"{name} was not compiled"
            assert spilled[found[0]] == 0, found[0]


def test_heavy_first_block_order_gives_identical_forward_and_dq():
    """ForwardConfig.heavy_first only reverses the order of query blocks (forward and dq kernels): the same
    programs, so bit-identical out, lse and dq, with a partial last block and the causal skip in play."""
    from dataclasses import replace

    from prefix_kernels.triton.configs import backward_config, forward_config
    from prefix_kernels.triton.forward import forward_launch, prefix_attention_forward
    from prefix_kernels.validation import validate

    case = Case(batch=2, heads_q=6, heads_kv=2, seq_q=40, seq_k=50, prefix_len=13, head_dim=32, padding="left")
    *tensors, options = make_inputs(case, torch.float32, DEVICE)
    call = validate(*tensors, backend="triton", **{"scale": None, "prefix_index": None, "prefix_lens": None, **options})
    base = replace(forward_config(32, torch.float32, case.seq_q), block_m=16)  # 3 query blocks, the last partial
    reversed_ = replace(base, heavy_first=True)
    _, _, kwargs = forward_launch(call.q, call.k, call.v, call.prefix_k, call.prefix_v, torch.empty_like(call.q),
                                  torch.empty(call.q.shape[:3], device=DEVICE), config=reversed_, **call.options())
    assert kwargs["HEAVY_FIRST"]
    results = []
    for config in (base, reversed_):
        out, lse = prefix_attention_forward(call.q, call.k, call.v, call.prefix_k, call.prefix_v, config=config,
                                            **call.options())
        bwd = replace(backward_config(32, torch.float32, case.seq_q), dq=config)
        dq = triton_backward.prefix_attention_backward(
            call.q, call.k, call.v, call.prefix_k, call.prefix_v, out, lse, torch.ones_like(out), None,
            needs=(True, False, False, False, False), config=bwd, **call.options())[0]
        results.append((out, lse, dq))
    for first, second in zip(*results):
        assert torch.equal(first, second)
    truth = prefix_attention_reference(*tensors, **options)
    assert max_error(results[1][0], truth) < 1e-5


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fused_dq_matches_the_reference(case, dtype, monkeypatch, launches):
    """BackwardConfig.fuse_dq: dq added with atomics by the dkdv and d prefix kernels, no dq kernel. Every
    feature of the sweep (padding, prefix_lens, window, softcap, several prefixes, empty rows) must keep the keys
    no query sees out of dq there, where the separate dq kernel masks them in p."""
    from dataclasses import replace

    from prefix_kernels.triton import configs

    monkeypatch.setattr(triton_backward, "backward_config",
                        lambda *args: replace(configs.backward_config(*args), fuse_dq=True))
    *tensors, options = make_inputs(case, dtype, DEVICE)
    out_weight, lse_weight = loss_weights(tensors)
    truth, reference_errors = truth_and_reference_grad_errors(tensors, options, out_weight, lse_weight)
    _assert_grads_close(_kernel_grads(tensors, options, out_weight, lse_weight), truth, reference_errors, dtype)
    assert "_prefix_attention_bwd_dq" not in launches and "_prefix_attention_bwd_dkdv" in launches
    if case.prefix_len:
        assert "_prefix_attention_bwd_dprefix" in launches


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("own, prefix", [(3, 4), (3, 128), (128, 4)], ids=["both-partial", "own-partial",
                                                                           "prefix-partial"])
def test_fused_dq_stays_finite_with_partial_key_tiles_and_a_very_negative_lse(dtype, own, prefix):
    """Keys past L or P in a partial key tile are loaded as zeros but their p = exp2(-lse) is not masked by a
    non-causal tile: with every score near -20, ds overflows fp16 there and inf * 0 made the fused dq all NaN
    (found in review). The fused path drops those keys from ds; dq equals the separate kernel's."""
    from dataclasses import replace

    from prefix_kernels.triton.configs import backward_config
    from prefix_kernels.triton.forward import prefix_attention_forward

    if dtype == torch.bfloat16 and DEVICE.type == "cpu":
        pytest.skip("bf16 arithmetic is broken in the Triton interpreter; tested on GPU")
    head_dim = 64
    q = torch.ones(1, 1, 1, head_dim, device=DEVICE, dtype=dtype)
    k = torch.full((1, 1, own, head_dim), -2.5, device=DEVICE, dtype=dtype)
    prefix_k = torch.full((1, 1, prefix, head_dim), -2.5, device=DEVICE, dtype=dtype)
    v, prefix_v = torch.randn_like(k), torch.randn_like(prefix_k)
    options = dict(causal=False, scale=head_dim ** -0.5, key_padding_mask=None, prefix_index=None,
                   prefix_lens=None, window=None, softcap=None)
    out, lse = prefix_attention_forward(q, k, v, prefix_k, prefix_v, **options)
    grad_out = torch.randn_like(out)
    fused = replace(backward_config(head_dim, dtype, 1), fuse_dq=True)
    separate, fused_grads = (triton_backward.prefix_attention_backward(
        q, k, v, prefix_k, prefix_v, out, lse, grad_out, None, config=config, **options)
        for config in (None, fused))
    assert torch.isfinite(fused_grads[0]).all()
    assert max_error(fused_grads[0], separate[0]) <= 1e-3 * max(1.0, float(separate[0].abs().max()))


def test_fused_dq_falls_back_to_the_dq_kernel_when_the_prefix_gradient_is_not_needed(monkeypatch, launches):
    """fuse_dq only where both key-major kernels run anyway: a frozen prefix keeps the separate dq kernel."""
    from dataclasses import replace

    from prefix_kernels.triton import configs

    monkeypatch.setattr(triton_backward, "backward_config",
                        lambda *args: replace(configs.backward_config(*args), fuse_dq=True))
    case = Case(batch=2, heads_q=6, heads_kv=2, seq_q=7, seq_k=9, prefix_len=11, head_dim=32)
    *tensors, options = make_inputs(case, torch.float32, DEVICE)
    out_weight, lse_weight = loss_weights(tensors)
    requires = (True, True, True, False, False)
    grads = _kernel_grads(tensors, options, out_weight, lse_weight, requires=requires)
    assert set(launches) == {"_prefix_attention_bwd_dq", "_prefix_attention_bwd_dkdv"}
    truth = reference_grads(tensors, options, out_weight, lse_weight, dtype=torch.float64)
    for name, got, want in list(zip(NAMES, grads, truth))[:3]:
        assert max_error(got, want) < 1e-5, name


CHUNKED_MASKS = {"random-padding": dict(padding="random"),
                 "left-padding-window": dict(padding="left", window=12, window_includes_prefix=True, left_padding=True)}


@pytest.mark.parametrize("masks", list(CHUNKED_MASKS))
@pytest.mark.parametrize("query_chunks", [1, 2], ids=["whole-batch", "two-query-chunks"])
@pytest.mark.parametrize("fuse_dq", [False, True], ids=["dq-kernel", "fused-dq"])
def test_batches_past_the_grid_limit_launch_in_chunks_of_sequences(fuse_dq, query_chunks, masks, monkeypatch):
    """CUDA launches at most 65535 programs on grid axes 1 and 2, and the forward and backward put B * H there:
    larger batches (B = 4096 at 16 heads) launch per chunk of whole sequences. With the limit lowered to 7, the
    forward, preprocess and dq kernels (B * 6 query heads) take 4 chunks of one sequence, dk/dv (B * 2 KV heads)
    two of 3 and 1; the d prefix kernel (4 prefixes * 2 KV heads) per chunk of prefixes, 3 and 1. Masks, prefix
    indices and the left padding (with a window over the prefix, measured past 3, 10, 4 and 11 padding keys) are
    cut with the rest; the prefixes' lengths (one of them 0) and gradients with the prefixes."""
    from dataclasses import replace

    from prefix_kernels.triton import configs, device
    from prefix_kernels.triton import forward as triton_forward

    monkeypatch.setattr(device, "MAX_GRID_YZ", 7)  # launch() refuses any grid past it
    monkeypatch.setattr(triton_backward, "backward_config",
                        lambda *args: replace(configs.backward_config(*args), fuse_dq=fuse_dq))
    # the d prefix kernel's partial sums per query chunk ([chunks, N, ...]; 1 chunk off the GPU) cut by prefix too
    monkeypatch.setattr(triton_backward, "dprefix_chunks", lambda *args: query_chunks)
    grids = []

    def recorded(kernel, grid, args, kwargs):
        grids.append((kernel.__name__, grid[1]))
        device.launch(kernel, grid, args, kwargs)
    monkeypatch.setattr(triton_forward, "launch", recorded)
    monkeypatch.setattr(triton_backward, "launch", recorded)
    case = Case(batch=4, heads_q=6, heads_kv=2, seq_q=9, seq_k=13, prefix_len=11, head_dim=32, num_prefixes=4,
                prefix_lens=(11, 4, 0, 7), **CHUNKED_MASKS[masks])
    *tensors, options = make_inputs(case, torch.float32, DEVICE)
    # not the chunks' own order; prefix 2 unused (its gradient: exactly 0), prefix 3 alone in its chunk
    options["prefix_index"] = torch.tensor([3, 0, 0, 1], device=DEVICE)
    out_weight, lse_weight = loss_weights(tensors)
    truth, reference_errors = truth_and_reference_grad_errors(tensors, options, out_weight, lse_weight)

    grads = _kernel_grads(tensors, options, out_weight, lse_weight)

    _assert_grads_close(grads, truth, reference_errors, torch.float32)
    assert (grads[3][2] == 0).all() and (grads[4][2] == 0).all(), "an unused prefix gets exactly zero"
    per_launch = {}
    for name, programs in grids:
        per_launch.setdefault(name, []).append(programs)
    expected = {"_prefix_attention_fwd": [6] * 4, "_bwd_preprocess": [6] * 4, "_prefix_attention_bwd_dkdv": [6, 2],
                "_prefix_attention_bwd_dprefix": [6, 2]}
    if not fuse_dq:
        expected["_prefix_attention_bwd_dq"] = [6] * 4
    assert per_launch == expected


# prefix_index [::2] of [0, 1, 1, 0, 0, 1, 1, 0] = [0, 1, 0, 1]; prefix_lens [::2] of [3, 7, 16, 5] = [3, 16]; then
# every sequence on prefix 1 ([1] expanded, stride 0) with the same length for both prefixes
EVERY_OTHER = slice(None, None, 2)
STRIDED_INDEX_TENSORS = {"sliced": ([0, 1, 1, 0, 0, 1, 1, 0], EVERY_OTHER, [3, 7, 16, 5], EVERY_OTHER),
                         "expanded": ([1], None, [5], None)}


@pytest.mark.parametrize("path", ["decode", "forward-backward"])
@pytest.mark.parametrize("layout", list(STRIDED_INDEX_TENSORS))
def test_strided_and_expanded_index_tensors_are_read_by_value(layout, path):
    """prefix_index and prefix_lens with any strides: the kernels read them as dense arrays, so a strided slice
    picked the wrong prefixes and lengths and an expanded one read past its one element (found by fuzzing; they are
    copied in validate() now)."""
    case = Case(batch=4, heads_q=2, heads_kv=1, seq_q=3 if path == "decode" else 20, seq_k=10, prefix_len=16,
                head_dim=32, num_prefixes=2)
    *tensors, options = make_inputs(case, torch.float32, DEVICE)
    index, index_rows, lens, lens_rows = STRIDED_INDEX_TENSORS[layout]
    index, lens = torch.tensor(index, device=DEVICE), torch.tensor(lens, device=DEVICE)
    options["prefix_index"] = index[index_rows] if index_rows else index.expand(case.batch)
    options["prefix_lens"] = lens[lens_rows] if lens_rows else lens.expand(case.num_prefixes)
    assert not options["prefix_index"].is_contiguous() and not options["prefix_lens"].is_contiguous()
    if path == "decode":
        with torch.no_grad():
            out = prefix_attention(*tensors, backend="triton", **options)
        assert max_error(out, prefix_attention(*tensors, backend="torch", **options)) < 1e-5
        return
    out_weight, lse_weight = loss_weights(tensors)
    truth, reference_errors = truth_and_reference_grad_errors(tensors, options, out_weight, lse_weight)
    _assert_grads_close(_kernel_grads(tensors, options, out_weight, lse_weight), truth, reference_errors,
                        torch.float32)


@pytest.mark.parametrize("softcap", [50.0, 1000.0])
def test_fp32_softcap_keeps_the_reference_accuracy(softcap):
    """fp32 with Gemma 2's attention softcap and a far larger one: the output and all five gradients within the
    usual tolerance. The 16-bit paths' tanh, 1 - 2 / (exp(2s) + 1), put an error of ~1 ulp of 1.0 times the cap into
    every score: 5-7x the tolerance at a cap of 1000 (found by fuzzing)."""
    case = Case(batch=2, heads_q=2, heads_kv=1, seq_q=20, seq_k=30, prefix_len=16, head_dim=64, softcap=softcap)
    *tensors, options = make_inputs(case, torch.float32, DEVICE)
    (truth_out, truth_lse), reference_error = truth_and_reference_error(tensors, options, torch.float32)
    out, lse = prefix_attention(*tensors, return_lse=True, backend="triton", **options)
    assert_attention_matches_truth(out, lse, tensors[0], truth_out, truth_lse, reference_error, torch.float32)
    out_weight, lse_weight = loss_weights(tensors)
    truth, reference_errors = truth_and_reference_grad_errors(tensors, options, out_weight, lse_weight)
    _assert_grads_close(_kernel_grads(tensors, options, out_weight, lse_weight), truth, reference_errors,
                        torch.float32)

"""Shared test helpers: input builders, the error-relative-to-reference tolerance, the compile check's reports."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass, field

import torch

from prefix_kernels.reference import prefix_attention_reference

# Error floors per dtype: below these, "2x the reference's own error" is rounding noise on both sides. fp32's is a
# few float32 ulps of the O(1) outputs (kernel errors measured 2e-7..6e-7 there; 1e-5 let a 20x regression pass).
ERROR_FLOOR = {torch.float32: 2e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@dataclass(frozen=True)
class Case:
    batch: int = 2
    heads_q: int = 6
    heads_kv: int = 2
    seq_q: int = 17
    seq_k: int = 40
    prefix_len: int = 37
    head_dim: int = 64
    num_prefixes: int = 1
    prefix_lens: tuple | None = None       # per prefix; None = all P valid
    causal: bool = True
    padding: str | None = None             # None | "left" | "right" | "random" | "empty-row"
    window: int | None = None
    window_includes_prefix: bool = False   # the window reaches into the prefix too
    left_padding: bool = False             # ... measured past each row's leading padding (passed as left_padding)
    softcap: float | None = None
    scale: float | None = None             # None: 1/sqrt(D)
    q_layout: str = "bshd"                 # "bshd": HF's transposed view; "bhsd": contiguous
    kv_slice: bool = False                 # k/v as a slice of a longer cache (non-contiguous)
    sinks: bool = False                    # an attention sink per query head (gpt-oss), drawn near the rows' LSEs
    extra: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        parts = [f"B{self.batch}", f"Hq{self.heads_q}", f"Hkv{self.heads_kv}", f"S{self.seq_q}", f"L{self.seq_k}",
                 f"P{self.prefix_len}", f"D{self.head_dim}"]
        if self.num_prefixes > 1:
            parts.append(f"N{self.num_prefixes}")
        if self.prefix_lens is not None:
            parts.append("lens" + "_".join(map(str, self.prefix_lens)))
        if not self.causal:
            parts.append("full")
        if self.padding:
            parts.append(f"pad-{self.padding}")
        if self.window:
            parts.append(f"win{self.window}" + ("-over-prefix" if self.window_includes_prefix else "")
                         + ("-past-padding" if self.left_padding else ""))
        if self.softcap:
            parts.append(f"cap{self.softcap:g}")
        if self.scale is not None:
            parts.append(f"scale{self.scale:g}")
        if self.q_layout != "bshd":
            parts.append(f"q-{self.q_layout}")
        if self.kv_slice:
            parts.append("kv-slice")
        if self.sinks:
            parts.append("sinks")
        return "-".join(parts)


def padding_mask(case: Case, device) -> torch.Tensor | None:
    batch, length = case.batch, case.seq_k
    if case.padding is None:
        return None
    real = torch.ones(batch, length, dtype=torch.bool, device=device)
    if case.padding in ("left", "right"):
        for b in range(batch):
            pad = (b * 7 + 3) % max(length, 1)  # a different amount per row
            if case.padding == "left":
                real[b, :pad] = False
            else:
                real[b, length - pad:] = False
    elif case.padding == "random":
        real = torch.rand(batch, length, device=device) > 0.3
    elif case.padding == "empty-row":
        real[0] = False  # sequence 0 has no own keys at all
    return real


def leading_padding(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """[B] int64: how many of each row's first keys are padding (False) before its first real key."""
    return (~key_padding_mask).long().cumprod(dim=-1).sum(dim=-1)


def make_inputs(case: Case, dtype, device, requires_grad=False):
    """Fresh random inputs for a case: (q, k, v, prefix_k, prefix_v, options)."""
    B, Hq, Hkv, S, L, P, D, N = (case.batch, case.heads_q, case.heads_kv, case.seq_q, case.seq_k,
                                 case.prefix_len, case.head_dim, case.num_prefixes)
    if case.q_layout == "bshd":
        q = torch.randn(B, S, Hq, D, device=device, dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, S, D, device=device, dtype=dtype)
    if case.kv_slice:
        k = torch.randn(B, Hkv, L + 5, D, device=device, dtype=dtype)[:, :, 3:3 + L]
        v = torch.randn(B, L + 2, Hkv, D, device=device, dtype=dtype)[:, 1:1 + L].transpose(1, 2)
    else:
        k = torch.randn(B, Hkv, L, D, device=device, dtype=dtype)
        v = torch.randn(B, Hkv, L, D, device=device, dtype=dtype)
    shape = (N, Hkv, P, D) if N > 1 else (Hkv, P, D)
    prefix_k = torch.randn(shape, device=device, dtype=dtype)
    prefix_v = torch.randn(shape, device=device, dtype=dtype)
    options = dict(causal=case.causal, key_padding_mask=padding_mask(case, device), window=case.window,
                   softcap=case.softcap)
    if N > 1:
        options["prefix_index"] = torch.arange(B, device=device) % N
    if case.prefix_lens is not None:
        options["prefix_lens"] = torch.tensor(case.prefix_lens, device=device)
    if case.window_includes_prefix:  # (only then, as scale)
        options["window_includes_prefix"] = True
    if case.left_padding:
        options["left_padding"] = leading_padding(options["key_padding_mask"])
    if case.scale is not None:  # (only then: some tests pass their own scale beside the options)
        options["scale"] = case.scale
    if case.sinks:  # in q's dtype, as a model's parameter; around the LSEs (~log of the key count), so they matter
        options["sinks"] = (torch.randn(Hq, device=device) * 1.5 + math.log(P + L)).to(dtype)
    tensors = [q, k, v, prefix_k, prefix_v]
    if requires_grad:
        tensors = [t.detach().requires_grad_() for t in tensors]
    return (*tensors, options)


# A batch stride that fits int32 while b * stride passes 2^31 from b = 2: index math done in int32 wraps there.
STRIDE_PAST_INT32 = (1 << 30) + 64


def batch_strided_past_int32(t: torch.Tensor) -> torch.Tensor:
    """t's values in a view whose batch stride is STRIDE_PAST_INT32 elements (t: [B >= 3, ...], contiguous). Only
    on a CPU: the storage is reserved, not touched, past the few pages the values land in (an untouched CPU
    allocation costs no memory; a GPU one would)."""
    assert t.device.type == "cpu" and t.shape[0] >= 3
    inner = t[0].numel()
    storage = torch.empty(STRIDE_PAST_INT32 * (t.shape[0] - 1) + inner, dtype=t.dtype)
    view = storage.as_strided(t.shape, (STRIDE_PAST_INT32, *t[0].stride()))
    view.copy_(t)
    return view


def max_error(a, b) -> float:
    """Max abs difference, with infinities compared by equality (lse = -inf on empty rows)."""
    a, b = a.double(), b.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    diff = torch.where(both_inf, torch.zeros_like(a), (a - b).abs())
    return float(diff.nan_to_num(nan=float("inf")).max()) if diff.numel() else 0.0


def truth_and_reference_error(tensors, options, dtype):
    """(float64 truth (out, lse), the low-precision reference's own max output error against it)."""
    as64 = [t.detach().double() for t in tensors]
    truth = prefix_attention_reference(*as64, return_lse=True, **options)
    lowp = prefix_attention_reference(*[t.detach() for t in tensors], upcast=False, **options)
    return truth, max_error(lowp, truth[0])


def assert_close_to_truth(name, got, truth, reference_error, dtype):
    """The kernel's error against the float64 truth must stay within 2x the reference's own error."""
    error = max_error(got, truth)
    allowed = 2 * reference_error + ERROR_FLOOR[dtype]
    assert error <= allowed, f"{name}: max error {error:.3g} > allowed {allowed:.3g} " \
                             f"(2 x reference's own {reference_error:.3g} + floor {ERROR_FLOOR[dtype]:g})"


# ---- gradients (tests/test_backward.py) ----

def attention_loss(out, lse, out_weight, lse_weight):
    """A scalar using the output through a [B, S, H, D] view (so dO arrives strided, as from HF) and, if
    lse_weight is given, the finite part of the LSE. Its gradients are exactly the weights, whatever out's dtype."""
    loss = (out.transpose(1, 2) * out_weight.to(out.dtype)).sum()
    if lse_weight is not None:
        finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        loss = loss + (finite * lse_weight).sum()
    return loss


def loss_weights(tensors):
    """Random cotangents for attention_loss: [B, S, H, D] in q's dtype, [B, Hq, S] float32 for the LSE."""
    q = tensors[0]
    batch, heads_q, seq_q, head_dim = q.shape
    return (torch.randn(batch, seq_q, heads_q, head_dim, device=q.device, dtype=q.dtype),
            torch.randn(batch, heads_q, seq_q, device=q.device, dtype=torch.float32))


def reference_grads(tensors, options, out_weight, lse_weight, *, dtype=None, upcast=True):
    """Gradients of attention_loss through the reference, with the inputs cast to `dtype` (None: as given)."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]
    out, lse = prefix_attention_reference(*leaves, return_lse=True, upcast=upcast, **options)
    attention_loss(out, lse, out_weight, lse_weight).backward()
    return [leaf.grad for leaf in leaves]


def truth_and_reference_grad_errors(tensors, options, out_weight, lse_weight):
    """(float64 truth gradients, the low-precision reference's own max error per gradient against them)."""
    truth = reference_grads(tensors, options, out_weight, lse_weight, dtype=torch.float64)
    lowp = reference_grads(tensors, options, out_weight, lse_weight, upcast=False)
    return truth, [max_error(g, t) for g, t in zip(lowp, truth)]


def assert_attention_matches_truth(out, lse, q, truth_out, truth_lse, reference_error, dtype):
    """A kernel's (out, lse) against the float64 truth: shape and dtype, no NaN, output within 2x the reference's
    own error, lse = -inf exactly on rows that see nothing (and exact zeros there), lse close elsewhere."""
    assert out.shape == q.shape and out.dtype == dtype and lse.dtype == torch.float32
    assert not torch.isnan(out).any()
    assert_close_to_truth("out", out, truth_out, reference_error, dtype)
    assert torch.equal(torch.isinf(lse), torch.isinf(truth_lse)), "lse = -inf exactly where a row sees nothing"
    assert_lse_close(lse, truth_lse)
    assert (out[torch.isinf(lse)] == 0).all(), "rows that see nothing give exact zeros"


# The LSE is float32 whatever the inputs (16-bit products are exact in float32): measured kernel errors are ~5e-7
# on LSEs of ~5. This bound is 20x that, relative to the LSE's size; the flat 1e-3 it replaced let a constant bias of
# 9e-4 pass, which skews merge_attention_states' weights by as much.
LSE_TOLERANCE = 1e-5


def assert_lse_close(lse, want, name="lse"):
    finite = want[torch.isfinite(want)]
    allowed = LSE_TOLERANCE * max(1.0, float(finite.abs().max()) if finite.numel() else 1.0)
    error = max_error(lse, want)
    assert error <= allowed, f"{name}: max error {error:.3g} > allowed {allowed:.3g}"


# Triton 3.9 allocates registers differently: 37 of the 1088 compile-check configurations spill more than under
# 3.8, all of them already at 255 registers (the d128 backward and the wide decode tiles; bench/NOTES.md, seventh
# session). Untimed on a GPU (the GPU image has 3.6): the spill budgets take 3.9's numbers as measured, rounded up,
# so that a further regression still fails.
TRITON_39 = tuple(int(part) for part in __import__("triton").__version__.split(".")[:2]) >= (3, 9)


def compile_check_spills(name_filter: str, timeout: int = 1800) -> tuple[dict, str]:
    """Run prefix_kernels.triton.compile_check on the cases whose name contains `name_filter`, in a subprocess
    (the compiler needs @triton.jit kernels defined without TRITON_INTERPRET, which the tests set; Triton's cache
    makes reruns fast). Fails the test if any configuration failed; returns ({report line of each configuration
    that compiled: bytes ptxas spilled}, the whole log)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "prefix_kernels.triton.compile_check", "--filter", name_filter],
                            capture_output=True, text=True, env=env, timeout=timeout)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    spills = {line: int(line.split("spills=")[1].split()[0]) for line in log.splitlines() if ": ok " in line}
    return spills, log

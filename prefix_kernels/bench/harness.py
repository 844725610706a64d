"""Run op cases through every provider in one process: guard correctness, time, measure peak memory.

Each (case, provider) pair gives one row (a dict, see `run_ops`). Before timing, the provider's output (and, for
fwd+bwd, its gradients) is compared with the naive reference computed in float32, so a fast but wrong provider
is flagged (`correct: False`) instead of winning the table.
"""
from __future__ import annotations

import gc
import sys
import time
import traceback
from dataclasses import replace

import torch

from ..reference import prefix_attention_reference
from .cases import OpCase
from .providers import GRAD_NAMES, PROVIDERS, Inputs, Provider, Unavailable, make_inputs
from .roofline import floor_ms, op_flops
from .timing import GRAPH_TIMING_BELOW_MS, PeakMemory, bench_ms, graph_bench_ms, poison_cached_blocks

# Error of a provider against the float32 reference, relative to the reference's largest magnitude.
# Loose enough for a correct low-precision kernel, tight enough to catch a wrong one (a dropped prefix,
# a wrong mask or scale gives errors of order 1e-1 and more).
TOLERANCE = {"fp32": 2e-3, "fp16": 1e-2, "bf16": 4e-2}


class Progress:
    """tqdm when importable, else one counter line per step on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled, self.bar = total, 0, enabled, None
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, unit="row", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def step(self, text: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str(text[:70])
            self.bar.update(1)
        else:
            print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _per_sequence_bytes(case: OpCase) -> int:
    n = case.prefix + case.seq_k
    return 4 * (4 * case.heads_q * n * case.head_dim + 4 * case.heads_q * case.seq_q * n)


def reference_result(case: OpCase, inputs: Inputs, dout: torch.Tensor | None) -> dict:
    """The float32 naive reference: {"out": ...} and, with dout, the five gradients. Chunked over the batch so
    that B copies of a long prefix never exist at once (the prefix gradient is summed over the chunks)."""
    budget = (2 << 30) if inputs.q.is_cuda else (256 << 20)
    chunk = max(1, budget // _per_sequence_bytes(case))
    outs, grads = [], {name: [] for name in GRAD_NAMES}
    pk = inputs.prefix_k.detach().float()
    pv = inputs.prefix_v.detach().float()
    d_pk = torch.zeros_like(pk)
    d_pv = torch.zeros_like(pv)
    for start in range(0, case.batch, chunk):
        part = slice(start, min(case.batch, start + chunk))
        q, k, v = (t.detach()[part].float() for t in (inputs.q, inputs.k, inputs.v))
        if dout is None:
            with torch.no_grad():
                outs.append(prefix_attention_reference(q, k, v, pk, pv, scale=inputs.scale,
                                                       **case.attention_options()))
            continue
        leaves = [t.requires_grad_() for t in (q, k, v, pk.clone(), pv.clone())]
        with torch.enable_grad():
            out = prefix_attention_reference(*leaves, scale=inputs.scale, **case.attention_options())
            g = torch.autograd.grad(out, leaves, dout[part].float())
        outs.append(out.detach())
        for name, value in zip(("q", "k", "v"), g[:3]):
            grads[name].append(value)
        d_pk += g[3]
        d_pv += g[4]
    result = {"out": torch.cat(outs)}
    if dout is not None:
        result.update({name: torch.cat(grads[name]) for name in ("q", "k", "v")}, prefix_k=d_pk, prefix_v=d_pv)
    return result


def compare(result: dict, reference: dict) -> dict:
    """{name: {"max_abs": ..., "rel": ...}} for every tensor the provider gave that the reference has."""
    errors = {}
    for name, value in result.items():
        if value is None or name not in reference:
            continue
        ref = reference[name]
        diff = (value.detach().float() - ref).abs()
        max_abs = float(diff.max()) if diff.numel() else 0.0
        if not diff.isfinite().all():
            max_abs = float("inf")
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        errors[name] = dict(max_abs=max_abs, rel=max_abs / max(scale, 1e-6))
    return errors


def guarded_call(case: OpCase, provider: Provider, inputs: Inputs, dout, reference):
    """Prepare `provider` for `case`, run it once and compare with the reference.

    Returns (timed, check): `timed()` is the call to time (forward under no_grad, or forward + backward), `check`
    holds errors, tolerance, correct (None for a "reference" provider, which computes another op) and the note.
    Raises Unavailable when the provider cannot serve the case here (-> "n/a").
    """
    try:
        prepared = provider.prepare(case, inputs)
    except NotImplementedError as exc:
        raise Unavailable(str(exc) or "not implemented") from None
    train = case.op == "fwd+bwd"
    leaves = prepared.leaves
    if train and not leaves:
        raise Unavailable("this provider has no backward")

    if train:
        def call():
            out = prepared.forward()
            return out, torch.autograd.grad(out, leaves, dout)
    else:
        def call():
            with torch.no_grad():
                return prepared.forward(), None

    # Correctness guard (also the first, compiling call), its outputs' blocks poisoned first (timing.py).
    poison_cached_blocks([t.shape for t in inputs.tensors] if train else [inputs.q.shape], inputs.q.dtype,
                         inputs.q.device)
    try:
        out, grads = call()
    except NotImplementedError as exc:  # e.g. FlexAttention's backward on CPU
        raise Unavailable(str(exc) or "not implemented") from None
    got = {"out": out}
    if grads is not None and prepared.canonical_grads is not None:
        got.update(prepared.canonical_grads(grads))
    errors = compare(got, reference) if provider.role != "reference" else {}
    tol = TOLERANCE[case.dtype]
    correct = None if provider.role == "reference" else all(e["rel"] <= tol for e in errors.values())
    del out, grads, got
    return call, dict(errors=errors, tolerance=tol, correct=correct, note=prepared.note)


def _run_one(case: OpCase, provider: Provider, inputs: Inputs, dout, reference, *, device, warmup_ms, rep_ms):
    """One row's figures; raises Unavailable (-> "n/a")."""
    call, check = guarded_call(case, provider, inputs, dout, reference)
    time_ms = bench_ms(call, device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    timing = dict(timing="eager")
    if case.op == "decode" and torch.device(device).type == "cuda" and time_ms < GRAPH_TIMING_BELOW_MS:
        # Decode steps are ~0.1 ms: eagerly timed they also measure the host. Every provider is replayed from
        # a CUDA graph where it can be captured (time_ms, held against the floor); the eager time is kept.
        def check_replay(captured):  # the replayed output against the reference too: it is what gets timed
            errors = compare({"out": captured[0]}, reference)
            if check["correct"] is not None and any(e["rel"] > check["tolerance"] for e in errors.values()):
                check.update(correct=False, graph_errors=errors)
        graph_ms, why_not = graph_bench_ms(call, warmup_ms=warmup_ms, rep_ms=rep_ms, check=check_replay)
        timing = dict(timing="cuda-graph", eager_ms=time_ms) if graph_ms is not None else \
            dict(timing="eager", graph_failure=why_not)
        time_ms = graph_ms if graph_ms is not None else time_ms
    with PeakMemory(device) as mem:
        if mem.device.type == "cuda":  # peak memory is only measured on CUDA
            call()
    return dict(time_ms=time_ms, peak_bytes=mem.peak_bytes, **timing, **check)


def case_tensors(case: OpCase, device):
    """(inputs, dout or None, float32 reference) for a case."""
    inputs = make_inputs(case, device)
    dout = None
    if case.op == "fwd+bwd":
        gen = torch.Generator(device="cpu").manual_seed(1)
        b, h, s, d = inputs.q.shape
        shape, dims = ((b, s, h, d), (0, 2, 1, 3)) if case.q_layout == "bshd" else ((b, h, s, d), (0, 1, 2, 3))
        dout = torch.randn(shape, generator=gen).to(device=device, dtype=case.torch_dtype).permute(dims)
    return inputs, dout, reference_result(case, inputs, dout)


def run_ops(cases, providers, *, device, ceilings, warmup_ms=25, rep_ms=100, progress: Progress | None = None,
            sink: list | None = None):
    """Every applicable (case, provider) pair, measured in this process. Returns a list of row dicts, appended to
    `sink` (when given) as each finishes, so that an interrupted run keeps them."""
    rows = sink if sink is not None else []
    device = torch.device(device)
    for case in cases:
        floor = floor_ms(case, ceilings)
        inputs, dout, reference = case_tensors(case, device)
        for provider in providers:
            if case.op not in provider.ops:
                continue
            row = dict(kind="op", op=case.op, case=case.as_dict(), label=case.label, provider=provider.name,
                       role=provider.role, description=provider.description, **floor)
            started = time.perf_counter()
            try:
                row.update(status="ok", **_run_one(case, provider, inputs, dout, reference, device=device,
                                                   warmup_ms=warmup_ms, rep_ms=rep_ms))
                row["pct_of_floor"] = 100.0 * floor["floor_ms"] / row["time_ms"]
                flops = floor["flops"]
                if provider.role == "reference":  # a bound computing another op (no prefix): its own FLOPs
                    flops = row["own_flops"] = op_flops(replace(case, prefix=0))
                row["tflops"] = flops / (row["time_ms"] * 1e-3) / 1e12
                if row["correct"] is False and progress is not None:
                    progress.write(f"WRONG: {provider.name} on {case.op} {case.label}: errors {row['errors']}")
            except Unavailable as exc:
                row.update(status="n/a", reason=str(exc))
            except torch.cuda.OutOfMemoryError as exc:
                row.update(status="error", reason=f"out of memory: {str(exc).splitlines()[0]}")
            except Exception as exc:  # one broken provider must not sink the run: report it
                row.update(status="error", reason=f"{type(exc).__name__}: {exc}",
                           traceback=traceback.format_exc(limit=6))
                if progress is not None:
                    progress.write(f"error: {provider.name} on {case.op} {case.label}: {type(exc).__name__}: {exc}")
            row["wall_s"] = time.perf_counter() - started  # setup, guard, compile and timing together
            rows.append(row)
            _free(device)
            if progress is not None:
                progress.step(f"{case.op} {provider.name}")
        del inputs, dout, reference
        _free(device)
    return rows


def count_op_rows(cases, providers) -> int:
    return sum(1 for c in cases for p in providers if c.op in p.ops)


def select_providers(names=None, extra=()) -> list[Provider]:
    """PROVIDERS in order (all, or those named), then any extra Provider objects (tests inject some)."""
    chosen = list(PROVIDERS.values()) if not names else []
    for name in names or ():
        if name not in PROVIDERS:
            raise ValueError(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")
        chosen.append(PROVIDERS[name])
    return chosen + list(extra)

"""Timing and peak memory: triton's do_bench median on CUDA (eager, or replaying a CUDA graph), a perf_counter
loop on CPU (meaningless there)."""
from __future__ import annotations

import statistics
import time

import torch


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(fn, device, *, warmup_ms: float = 25, rep_ms: float = 100, cpu_reps: int = 5) -> float:
    """Median wall time of fn() in milliseconds."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench
        try:
            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        except TypeError:  # triton without return_mode: ask for the 0.5 quantile
            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5])[0])
    start = time.perf_counter()
    fn()  # warmup, and how long one call takes
    first_ms = (time.perf_counter() - start) * 1e3
    times = []
    for _ in range(max(1, min(cpu_reps, int(rep_ms / max(first_ms, 1e-3))))):  # ~rep_ms in all, 1..cpu_reps calls
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# Decode rows slower than this eagerly are not host-bound (the naive concat: 14-56 ms) and keep their eager time;
# capturing them would also hold a second copy of their multi-GB concat in the graph's private memory pool.
GRAPH_TIMING_BELOW_MS = 5.0


def release_rng_after_failed_capture() -> None:
    """Undo what a capture that raised leaves behind in torch's CUDA generator.

    torch.cuda.graph marks the default CUDA generator as capturing when the capture begins and clears the mark only
    when it ends cleanly. After a failed capture every later random op on the GPU in this process raises "Offset
    increment outside graph capture encountered unexpectedly" (one such capture in a test worker failed 152 later
    tests on the H200, d432cfb). A capture that succeeds clears the mark: capture one tiny op.
    """
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        torch.empty(1, device="cuda").zero_()


def poison_cached_blocks(shapes, dtype, device) -> None:
    """Leaves NaN-filled blocks of these shapes in the CUDA caching allocator, where the next allocations of those
    sizes (a checked call's outputs) find them: a kernel that skips part of its output then shows NaN there, not
    the correct values an earlier call left in a reused block (the same shape timed just before). No-op off CUDA."""
    if torch.device(device).type != "cuda":
        return
    blocks = [torch.full(tuple(shape), float("nan"), dtype=dtype, device=device) for shape in shapes]
    del blocks


def _floating_tensors(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _floating_tensors(item)]
    return []


def graph_bench_ms(fn, *, warmup_ms: float = 25, rep_ms: float = 100,
                   check=None) -> tuple[float | None, str | None]:
    """(median ms of fn replayed from a CUDA graph, None) or (None, why it could not be captured).

    A replayed graph costs no host time per call: the figure a serving loop that captures its decode step pays,
    and the one to hold against the roofline floor, since a ~0.1 ms decode timed eagerly also measures how fast
    this machine's CPU issues the launches (the same call timed 0.175 and 0.277 ms eagerly on two H100 runs).
    check: called with what the captured fn returned, after one replay into outputs filled with NaN first: the
    replayed path is the timed one, and it can differ from the eager call's (decode's side stream in captures).
    """
    from triton.testing import do_bench

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # capture needs warm caches and compiled kernels: warm up off the capture
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.empty_cache()  # the graph allocates from its own pool: hand back what eager timing left cached
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            captured = fn()
    except Exception as exc:  # e.g. a host sync inside fn: that provider is then timed eagerly only
        release_rng_after_failed_capture()
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if check is not None:
        for t in _floating_tensors(captured):
            t.fill_(float("nan"))  # what the replay must overwrite
        graph.replay()
        torch.cuda.synchronize()
        check(captured)
    try:
        return float(do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")), None
    except TypeError:  # triton without return_mode
        return float(do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5])[0]), None
    finally:
        del graph


def time_calls_ms(fn, device, *, repeats: int, warmup: int = 1) -> list[float]:
    """Each of `repeats` calls' wall time in ms after `warmup` calls; for slow model-level calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


class PeakMemory:
    """Peak bytes allocated during the block beyond what was allocated when it began (CUDA only; None elsewhere)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_bytes = None

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device) - self.base)
        return False

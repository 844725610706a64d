"""`prefix-kernels bench` / `python -m prefix_kernels.bench`: parse flags, run a preset, write the results."""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from . import harness, models, report
from .cases import DTYPES, MODEL_OPS, OPS, PRESETS, get_preset, override
from .providers import PROVIDERS
from .roofline import measure_ceilings


def _int_list(text):
    return [int(x) for x in text.split(",") if x]


def _window(text):
    """--window: at least 2. A window of 1 leaves each query its own key alone, where dq and dk are exactly zero and
    the correctness guard (errors relative to each reference tensor's own size) cannot judge rounding noise."""
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"the window must be at least 2, got {value}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="prefix-kernels bench",
        description="Benchmarks prefix_attention and the model-level paths against the baselines, all measured in "
                    "the same run: markdown table, JSON, plots under bench/results/<card>/.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="anchors: the ANCHORS.md shapes; sweep: time vs prefix length and batch; smoke: tiny "
                             "fp32 shapes for CPU/CI (default: anchors on a GPU, smoke elsewhere)")
    parser.add_argument("--ops", default=None,
                        help=f"comma-separated subset of {', '.join(OPS + MODEL_OPS)}")
    parser.add_argument("--providers", default=None,
                        help=f"comma-separated subset of the op providers: {', '.join(PROVIDERS)} "
                             "(model rows always run their baseline and ours)")
    parser.add_argument("-B", "--batch", type=int, help="override the batch size of every row")
    parser.add_argument("-P", "--prefix", type=int, help="override the prefix length (train_step: virtual tokens; "
                                                         "generate: prompt length)")
    parser.add_argument("-L", "--seq-k", type=int, help="override each sequence's own keys L (op rows)")
    parser.add_argument("-S", "--seq-q", type=int, help="override the queries per sequence S of forward/fwd+bwd "
                                                        "rows (L follows unless given)")
    parser.add_argument("--heads", default=None, help="Hq or Hq/Hkv, e.g. 32/8")
    parser.add_argument("-D", "--head-dim", type=int, help="override the head dim (op rows)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="override the dtype")
    parser.add_argument("--window", type=_window, help="a sliding window (>= 2) on every op row, decode included, "
                                                       "over the prefix too (as transformers places a PEFT prefix)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warmup (ms)")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repetition time (ms)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<card>/)")
    parser.add_argument("--no-progress", action="store_true", help="no progress display")
    parser.add_argument("--quiet", action="store_true", help="do not print the markdown table at the end")
    return parser.parse_args(argv)


class Interrupted(BaseException):
    """SIGTERM (what `timeout` sends) during the rows. A BaseException: the per-row guards, which catch Exception
    so that one broken provider does not sink the run, let it through to run()."""


def _raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def _on_sigterm(action):
    """SIGTERM does `action` inside the block (main thread only: where Python delivers signals): Interrupted while
    the rows run, nothing while the results are written (`timeout` then waits for the files)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, action)
    try:
        yield
    finally:
        # None: a handler installed from C, which Python cannot reinstall; the default is the closest
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


class CheckpointedRows(list):
    """The run's rows, written out (`checkpoint(rows)`) each time one is appended: a run killed outright (SIGKILL at a
    device call's time limit, which no handler sees) keeps the rows it finished. SIGTERM is handled in run()."""

    def __init__(self, checkpoint):
        super().__init__()
        self._checkpoint = checkpoint

    def append(self, row) -> None:
        super().append(row)
        self._checkpoint(self)


INCOMPLETE = "incomplete: written after each row, and the run did not reach its end (killed, or still running)"


def run(args, extra_providers=()) -> dict:
    """Run what `args` selects; returns the result dict (also written to disk). Tests call this directly."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset_name = args.preset or ("anchors" if device.type == "cuda" else "smoke")
    heads_q = heads_kv = None
    if args.heads:
        parts = args.heads.split("/")
        heads_q = int(parts[0])
        heads_kv = int(parts[1]) if len(parts) > 1 else heads_q
    ops = [o for o in args.ops.split(",") if o] if args.ops else None
    for op in ops or ():
        if op not in OPS + MODEL_OPS:
            raise SystemExit(f"unknown op {op!r}; choose from {', '.join(OPS + MODEL_OPS)}")
    preset = override(get_preset(preset_name), ops=ops, batch=args.batch, prefix=args.prefix, seq_k=args.seq_k,
                      seq_q=args.seq_q, heads_q=heads_q, heads_kv=heads_kv, head_dim=args.head_dim,
                      dtype=args.dtype, window=args.window)
    providers = harness.select_providers([p for p in args.providers.split(",") if p] if args.providers else None,
                                         extra_providers)
    env = report.environment(device)
    out_dir = args.out or Path("bench") / "results" / env["card_slug"]
    out_dir.mkdir(parents=True, exist_ok=True)

    if device.type != "cuda":
        print(f"note: {report.CPU_WARNING}", file=sys.stderr)
    started = time.perf_counter()
    total = harness.count_op_rows(preset.ops, providers) + models.count_model_rows(preset.models, device)
    ceilings = measure_ceilings(device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    progress = harness.Progress(total, enabled=not args.no_progress)
    json_path, md_path = out_dir / f"{preset_name}.json", out_dir / f"{preset_name}.md"

    def result_of(rows_so_far, interrupted):
        return dict(preset=preset_name, description=preset.description, environment=env, ceilings=ceilings,
                    tolerance=harness.TOLERANCE, rows=list(rows_so_far), wall_s=time.perf_counter() - started,
                    interrupted=interrupted)

    def checkpoint(rows_so_far):  # the JSON, rewritten after each row; the end of run() replaces it with the whole
        report.write_json(json_path, result_of(rows_so_far, INCOMPLETE))
    rows = CheckpointedRows(checkpoint)  # filled row by row: a run stopped by a time limit keeps what it finished
    interrupted = None
    with _on_sigterm(signal.SIG_IGN):  # writing the results is never interrupted
        with _on_sigterm(_raise_interrupted):
            try:
                harness.run_ops(preset.ops, providers, device=device, ceilings=ceilings, warmup_ms=args.warmup_ms,
                                rep_ms=args.rep_ms, progress=progress, sink=rows)
                if preset.models:
                    try:
                        import peft  # noqa: F401
                        import transformers  # noqa: F401
                    except ImportError as exc:
                        rows += [dict(kind="model", op=c.op, case=c.as_dict(), label=c.label, provider="all",
                                      role="baseline", description="model-level rows", status="n/a",
                                      reason=f"transformers and peft are needed ({exc})") for c in preset.models]
                    else:
                        models.run_models(preset.models, device, progress, sink=rows)
            except Interrupted as exc:
                interrupted = f"stopped by {exc} after {len(rows)} of {total} rows"
        progress.close()
        if interrupted:
            print(f"interrupted: {interrupted}; writing the rows finished so far", file=sys.stderr)
        report.ratios(rows)
        result = result_of(rows, interrupted)
        plot_files, plot_note = report.plots(result, out_dir, preset_name)
        result.update(plots=plot_files, plots_note=plot_note)
        md = report.markdown(result)
        if plot_note:
            md += f"\nPlots: {plot_note}\n"
        elif plot_files:
            md += "\nPlots: " + ", ".join(f"![{f}]({f})" for f in plot_files) + "\n"
        report.write_json(json_path, result)
        md_path.write_text(md)
        result["files"] = dict(json=str(json_path), markdown=str(md_path),
                               plots=[str(out_dir / f) for f in plot_files])
    if not args.quiet:
        print(md)
    print(f"wrote {json_path} and {md_path} in {result['wall_s']:.0f} s", file=sys.stderr)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    wrong = [r for r in result["rows"] if r.get("correct") is False]
    for row in wrong:
        print(f"WRONG: {row['provider']} on {row['op']} {row['label']}", file=sys.stderr)
    return 1 if wrong or result["interrupted"] else 0

"""What a run leaves behind: JSON with every raw figure, a markdown table, plots; and where it ran."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from .providers import BASELINES
from .timing import GRAPH_TIMING_BELOW_MS

CPU_WARNING = ("No GPU: these timings were taken on a CPU and mean nothing (the smoke preset checks that the "
               "suite runs and that every provider agrees with the reference, not speed).")


# --- environment ------------------------------------------------------------------------------------------------

def card_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def card_slug(device) -> str:
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> dict:
    """The commit of the checkout this package runs from; PREFIX_KERNELS_COMMIT (or COMMIT, as bench/gpu_check.sh
    uses) overrides, for copies of the tree without .git."""
    for name in ("PREFIX_KERNELS_COMMIT", "COMMIT"):
        if os.environ.get(name):
            return dict(commit=os.environ[name], dirty=None, source=name)
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return dict(commit=commit, dirty=dirty, source="git")
    except (OSError, subprocess.SubprocessError):
        return dict(commit="unknown", dirty=None, source="no git checkout")


def environment(device) -> dict:
    device = torch.device(device)
    env = dict(card=card_name(device), card_slug=card_slug(device), device=str(device),
               cpu_timings_meaningless=device.type != "cuda",
               versions={name: _version(name) for name in ("torch", "triton", "transformers", "peft")},
               python=platform.python_version(), torch_cuda=torch.version.cuda,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               triton_interpret=os.environ.get("TRITON_INTERPRET"), **git_commit())
    env["versions"]["prefix_kernels"] = __import__("prefix_kernels").__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                   memory_bytes=props.total_memory)
    return env


# --- JSON ---------------------------------------------------------------------------------------------------------

def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value


def write_json(path: Path, result: dict) -> None:
    path.write_text(json.dumps(_jsonable(result), indent=1) + "\n")


# --- markdown -----------------------------------------------------------------------------------------------------

def _ms(value: float) -> str:
    if value >= 100:
        return f"{value:.0f} ms"
    if value >= 1:
        return f"{value:.2f} ms"
    return f"{value:.3f} ms"


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.0f} MiB"


def _footnote(notes: list, text: str) -> str:
    if text not in notes:
        notes.append(text)
    return f"[{notes.index(text) + 1}]"


def _status_cell(row: dict, notes: list) -> str:
    if row["status"] == "ok":
        timing = ""
        if "eager_ms" in row:  # time_ms is a CUDA-graph replay
            timing = f" (eager {_ms(row['eager_ms'])})"
        elif "graph_failure" in row:
            timing = f" eager {_footnote(notes, 'not capturable in a CUDA graph: ' + row['graph_failure'])}"
        return _ms(row["time_ms"]) + timing + (" **WRONG**" if row.get("correct") is False else "")
    return f"{row['status']} {_footnote(notes, row.get('reason', ''))}"


def _error_cell(row: dict) -> str:
    errors = row.get("errors") or {}
    if not errors:
        return "-"
    worst = max(errors.items(), key=lambda item: item[1]["rel"])
    return f"{worst[1]['max_abs']:.1e} ({worst[0]})"


def ratios(rows: list[dict]) -> None:
    """Add `speedup_vs` {baseline: baseline time / this time} to every ok op row (same case, same run). A baseline
    row flagged WRONG is no baseline: no ratio is taken against it."""
    by_case = {}
    for row in rows:
        if row["kind"] == "op" and row["status"] == "ok" and row.get("correct") is not False:
            by_case.setdefault((row["op"], row["label"]), {})[row["provider"]] = row["time_ms"]
    for row in rows:
        if row["kind"] == "op" and row["status"] == "ok":
            times = by_case[(row["op"], row["label"])]
            row["speedup_vs"] = {b: times[b] / row["time_ms"] for b in BASELINES if b in times}


def markdown(result: dict) -> str:
    env, ceil = result["environment"], result["ceilings"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    dirty = " (uncommitted changes)" if env.get("dirty") else ""
    lines = [f"# prefix_kernels bench: preset `{result['preset']}` on {env['card']}", "",
             f"{env['date']}; {versions}; commit `{env['commit'][:12]}`{dirty}.", ""]
    if env["cpu_timings_meaningless"]:
        lines += [f"**{CPU_WARNING}**", ""]
    if result.get("interrupted"):
        lines += [f"**Interrupted ({result['interrupted']}): only the rows finished before are below.**", ""]
    lines += [f"Ceilings measured in this run: copy {ceil['bandwidth_bytes_per_s'] / 1e12:.3g} TB/s (bytes read + "
              f"written), {ceil['matmul_dtype']} {ceil['matmul_n']}^3 matmul "
              f"{ceil['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s. Speedup columns: the baseline's time / this "
              "row's time (> 1 means this row is faster). % of floor: roofline floor / time.", ""]
    notes: list[str] = []
    op_rows = [r for r in result["rows"] if r["kind"] == "op"]
    for op in ("forward", "fwd+bwd", "decode"):
        rows = [r for r in op_rows if r["op"] == op]
        if not rows:
            continue
        lines += [f"## {op}", ""]
        if any("eager_ms" in r for r in rows):
            lines += ["Times with an eager time in parentheses are CUDA-graph replays (no host time per call: what a "
                      "serving loop that captures its step pays, and what the floor bounds); rows slower than "
                      f"{GRAPH_TIMING_BELOW_MS:g} ms eagerly are eager times.", ""]
        lines += ["| shape | provider | time | TFLOP/s | % of floor | peak mem | max err | "
                  + " | ".join(f"vs {b}" for b in BASELINES) + " |",
                  "|---|---|---|---|---|---|---|" + "---|" * len(BASELINES)]
        labels = list(dict.fromkeys(r["label"] for r in rows))
        for label in labels:
            group = [r for r in rows if r["label"] == label]
            first = group[0]
            lines.append(f"| {label} | *floor* ({first['bound']}) | {_ms(first['floor_ms'])} | | 100% | | |"
                         + " |" * len(BASELINES))
            for row in group:
                speed = row.get("speedup_vs", {})
                cells = [f"{speed[b]:.2f}x" if b in speed and b != row["provider"] else "" for b in BASELINES]
                if row["status"] == "ok":
                    figures = [f"{row['tflops']:.1f}", f"{row['pct_of_floor']:.0f}%", _mib(row["peak_bytes"]),
                               _error_cell(row)]
                else:
                    figures = [""] * 4
                lines.append("| " + " | ".join([label, row["provider"], _status_cell(row, notes), *figures, *cells])
                             + " |")
        lines.append("")
    model_rows = [r for r in result["rows"] if r["kind"] == "model"]
    if model_rows:
        lines += ["## model level", "",
                  "| op | shape | provider | time | tokens/s | prefill / step | peak mem beyond resident | check | "
                  "vs baseline |",
                  "|---|---|---|---|---|---|---|---|---|"]
        baseline_time = {(r["op"], r["label"]): r["time_ms"] for r in model_rows
                         if r["role"] == "baseline" and r["status"] == "ok"}
        for row in model_rows:
            if row["status"] != "ok":
                lines.append(f"| {row['op']} | {row['label']} | {row['provider']} | {_status_cell(row, notes)} "
                             "| | | | | |")
                continue
            check = "-"
            if "logits_rel_err" in row:  # low precision: the teacher-forced logits are the check (models.py)
                check = (f"teacher-forced logits err {row['logits_rel_err'] * 100:.2f}% of std "
                         f"(tol {row['tolerance'] * 100:.2f}%), argmax {row['decisive_match'] * 100:.0f}% equal on "
                         f"{row['decisive_steps']} decisive steps; free-running tokens "
                         f"{row['token_match'] * 100:.0f}% equal")
            elif "token_match" in row:
                check = f"tokens {row['token_match'] * 100:.0f}% equal"
            elif "loss_rel_err" in row:
                check = f"loss rel err {row['loss_rel_err']:.1e}"
                if "prefix_grad_rel_err" in row:
                    check += f", prefix grad {row['prefix_grad_rel_err']:.1e}"
            if row.get("correct") is False:
                check += " **WRONG**"
            base = baseline_time.get((row["op"], row["label"]))
            vs = f"{base / row['time_ms']:.2f}x" if base and row["role"] != "baseline" else ""
            split = ""  # generate: the prefill and one decode step (models._step_times)
            if row.get("step_ms") is not None:
                split = f"{_ms(row['prefill_ms'])} / {_ms(row['step_ms'])}"
            lines.append(f"| {row['op']} | {row['label']} | {row['provider']} | {_ms(row['time_ms'])} | "
                         f"{row['tokens_per_s']:.0f} | {split} | {_mib(row['peak_bytes'])} | {check} | {vs} |")
        lines.append("")
    if notes:
        lines += ["Notes:", ""] + [f"{i + 1}. {text}" for i, text in enumerate(notes)] + [""]
    # (one name can be an op provider and a model row, e.g. ours-cuda: each described under its own kind)
    providers = {(r["kind"], r["provider"]): r["description"] for r in result["rows"]}
    lines += ["Providers:", ""] + [f"- `{name}`{' (model rows)' if kind == 'model' else ''}: {text}"
                                   for (kind, name), text in providers.items()] + [""]
    return "\n".join(lines)


# --- plots ----------------------------------------------------------------------------------------------------------

def plots(result: dict, out_dir: Path, preset: str) -> tuple[list[str], str | None]:
    """Time against prefix length, batch and window for swept rows. Returns (files, reason none were drawn)."""
    swept = [r for r in result["rows"] if r["kind"] == "op" and r["status"] == "ok" and r["case"].get("sweep")]
    if not swept:
        return [], "no swept rows in this preset (the sweep preset has them)"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: plots skipped (pip install matplotlib to get them)"
    files = []
    axes = {"prefix": ("prefix", "prefix length P"), "batch": ("batch", "batch B"),
            "window": ("window", "sliding window W")}
    for op in ("forward", "fwd+bwd", "decode"):
        for axis, (key, xlabel) in axes.items():
            rows = [r for r in swept if r["op"] == op and r["case"]["sweep"] == axis]
            if not rows:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            for provider in dict.fromkeys(r["provider"] for r in rows):
                points = sorted((r["case"][key], r["time_ms"]) for r in rows if r["provider"] == provider)
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider)
            floors = sorted({(r["case"][key], r["floor_ms"]) for r in rows})
            ax.plot([p[0] for p in floors], [p[1] for p in floors], "k--", label="roofline floor")
            ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="time (ms)",
                   title=f"{op}: time vs {xlabel} ({result['environment']['card']})")
            ax.legend(fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            name = f"{preset}_{op.replace('+', '_')}_vs_{axis}.png"
            fig.tight_layout()
            fig.savefig(out_dir / name, dpi=120)
            plt.close(fig)
            files.append(name)
    return files, None

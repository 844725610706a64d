"""Summarize ncu's per-instruction source page (SASS) as text: where a kernel's warps stall, instruction by instruction.

    ncu --section SourceCounters -k regex:forward_kernel -c 1 -o /tmp/fwd python3 bench/profile_case.py --op forward ...
    ncu -i /tmp/fwd.ncu-rep --page source --print-source sass --csv > fwd.csv
    python3 bench/ncu_source_summary.py fwd.csv --top 60

GPU sessions are rare here and CPU sessions have no ncu: this turns the profile into a few hundred lines that a
later session can read against the SASS it disassembles itself (cuobjdump -sass, same nvcc). Prints the columns the
CSV has (the format is ncu's, not ours: a column it does not find is said, not guessed), the totals, the
instructions with the most warp-stall samples with their stall-reason columns, and the samples per instruction
kind (the opcode, HGMMA / MUFU / BAR / LDGSTS ...).
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import Counter


def number(text) -> float | None:
    """A CSV cell as a number (ncu writes thousands separators and sometimes units); None when it is not one."""
    if text is None:
        return None
    cleaned = text.replace(",", "").replace("%", "").strip()
    try:
        return float(cleaned)
    except ValueError:
        return None


def find_column(columns, *patterns):
    """The first column whose name matches one of the patterns (case-insensitive regexes), or None."""
    for pattern in patterns:
        for name in columns:
            if re.search(pattern, name, re.IGNORECASE):
                return name
    return None


def read_rows(lines):
    """The CSV's rows as dicts, skipping ncu's lines before the header (its '==PROF==' notes, kernel titles)."""
    lines = list(lines)
    start = next((i for i, line in enumerate(lines) if re.search(r'"?(# )?Address"?\s*,', line)
                  or re.search(r'"Source"\s*,', line)), 0)
    return list(csv.DictReader(lines[start:]))


def short_reason(column: str) -> str:
    """'smsp__pcsamp_warps_issue_stalled_long_scoreboard' -> 'long_scoreboard' (other names as they are)."""
    return re.sub(r"^.*stalled_", "", column.strip())


def opcode(sass: str) -> str:
    """The instruction's opcode without its modifiers: '@!P0 HGMMA.64x128x16.F32.BF16 ...' -> 'HGMMA'."""
    words = [w for w in sass.split() if not w.startswith("@")]
    return words[0].split(".")[0] if words else "?"


def summarize(rows, top: int, out=sys.stdout):
    if not rows:
        print("no rows: the CSV had no header this script recognizes", file=out)
        return
    columns = list(rows[0].keys())
    print(f"columns ({len(columns)}): {columns}", file=out)
    source = find_column(columns, r"^source$", r"sass", r"source")
    address = find_column(columns, r"address")
    samples = find_column(columns, r"warp stall sampling \(all", r"stall sampling", r"samples")
    executed = find_column(columns, r"^instructions executed$", r"instructions executed", r"inst_executed")
    if source is None or samples is None:
        print(f"no source or stall-sampling column found (source={source!r}, samples={samples!r})", file=out)
        return
    # ncu names them smsp__pcsamp_warps_issue_stalled_<reason>, each with a _not_issued twin (left out here)
    reasons = [c for c in columns if c not in (samples, executed, address, source)
               and re.search(r"stall|smsp__pcsamp", c, re.IGNORECASE) and not c.rstrip().endswith("_not_issued")
               and "not-issued" not in c.lower()]
    total = sum(number(r[samples]) or 0 for r in rows)
    print(f"{len(rows)} instructions, {total:.0f} warp-stall samples ({samples!r})", file=out)
    if total <= 0:
        return
    by_kind = Counter()
    for row in rows:
        by_kind[opcode(row[source])] += number(row[samples]) or 0
    print("samples by opcode: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in by_kind.most_common(15)),
          file=out)
    ranked = sorted(rows, key=lambda r: number(r[samples]) or 0, reverse=True)[:top]
    print(f"top {len(ranked)} instructions by samples (address, % of samples, executed, SASS, nonzero reasons):",
          file=out)
    for row in ranked:
        share = 100 * (number(row[samples]) or 0) / total
        found = sorted(((number(row[c]) or 0, short_reason(c)) for c in reasons), reverse=True)
        details = [f"{name}={value:g}" for value, name in found if value > 0]  # the largest first
        print(f"  {row.get(address, '?'):>8} {share:5.1f}% {row.get(executed, '') or '':>10}  "
              f"{row[source].strip()[:90]}  {' '.join(details)[:300]}", file=out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="ncu -i REPORT --page source --print-source sass --csv")
    parser.add_argument("--top", type=int, default=60)
    args = parser.parse_args(argv)
    with open(args.csv, newline="", errors="replace") as f:
        summarize(read_rows(f), args.top)


if __name__ == "__main__":
    main()

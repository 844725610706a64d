"""`prefix-kernels demo | bench`: the command line. Each subcommand lives in its own module; this only dispatches."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="prefix-kernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="the main job on the embedded default model (SmolLM2-135M), on this device",
                   add_help=False)
    sub.add_parser("bench", help="benchmarks against the baselines: tables, JSON and plots", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from .demo import main as entry
    else:
        from .bench.main import main as entry
    return entry(rest) or 0


if __name__ == "__main__":
    sys.exit(main())

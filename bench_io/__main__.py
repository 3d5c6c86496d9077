"""``python -m bench_io run [--size default|large|tiny] [--work DIR] [--results DIR]``"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench_io.bench import RESULTS, SIZES, run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench_io")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run every workload and contender; write results")
    r.add_argument("--size", choices=sorted(SIZES), default="default")
    r.add_argument("--work", type=Path, default=Path("bench-work"), help="scratch directory (tens of GB)")
    r.add_argument("--results", type=Path, default=RESULTS)
    r.add_argument("--contenders", default=None, help="comma-separated subset")
    r.add_argument("--repeat", type=int, default=2, help="runs per contender; the fastest is kept")
    args = ap.parse_args(argv)
    contenders = tuple(args.contenders.split(",")) if args.contenders else None
    run(args.size, args.work, args.results, contenders, repeat=args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())

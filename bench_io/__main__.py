"""``python -m bench_io run [--size default|large|tiny] [--work DIR] [--results DIR] [--only local|layers|remote]``

``local``: every local workload and contender (``latest.*``); ``remote``: the shaped object store
(``remote.*``, needs the ``s3`` extra). Both by default. ``layers``: the one-layer rewrite as
safetensors and as GGUF side by side, and planning (``layers.*``).
"""

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
    r.add_argument("--only", choices=("local", "layers", "remote"), default=None)
    r.add_argument("--delay-ms", type=float, default=30, help="shaped store: delay per request")
    r.add_argument("--conn-mbps", type=float, default=100, help="shaped store: MB/s per connection")
    r.add_argument("--requests", type=int, default=16, help="remote: requests in flight")
    r.add_argument("--note", default="", help="conditions of the run, recorded with the results")
    args = ap.parse_args(argv)
    contenders = tuple(args.contenders.split(",")) if args.contenders else None
    if args.only != "remote":
        run(args.size, args.work, args.results, contenders, repeat=args.repeat, layers_only=args.only == "layers",
            note=args.note)
    if args.only is None or args.only == "remote":
        from bench_io import remote

        args.work.mkdir(parents=True, exist_ok=True)
        remote.run(SIZES[args.size].remote_geometry, args.work, args.results, source_name=f"remote-{args.size}",
                   delay_s=args.delay_ms / 1000, conn_bytes_per_s=args.conn_mbps * 1e6, requests=args.requests)
    return 0


if __name__ == "__main__":
    sys.exit(main())

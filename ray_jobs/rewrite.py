"""Entry point for ``ray job submit``: execute a plan on the cluster the job runs in.

Example::

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m ray_jobs.rewrite s3://bucket/plans/120b-keep64.json s3://bucket/pruned/120b-keep64 --workers 16

Plan and destination live on storage every node reaches (a shared filesystem or an object store).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from planners.plan import Plan
from ray_jobs.executor import DEFAULT_PART_BYTES, execute_on_ray
from rewriter.core.errors import RewriterError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ray_jobs.rewrite", description=__doc__.splitlines()[0])
    ap.add_argument("plan", help="plan JSON (local path or fsspec URL)")
    ap.add_argument("dst", help="destination directory or fsspec URL")
    ap.add_argument("--address", default="auto", help="Ray address (default: the job's cluster)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--buffer-mib", type=int, default=16)
    ap.add_argument("--part-mib", type=int, default=DEFAULT_PART_BYTES >> 20,
                    help="split larger shards into parts (positioned-write destinations)")
    ap.add_argument("--src-options", default="{}", help="fsspec options for the source, JSON")
    ap.add_argument("--dst-options", default="{}", help="fsspec options for the destination, JSON")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--allow-nonuniform", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        result = execute_on_ray(
            Plan.load(args.plan), args.dst, address=args.address, workers=args.workers,
            part_bytes=args.part_mib << 20, buffer_bytes=args.buffer_mib << 20,
            src_options=json.loads(args.src_options), dst_options=json.loads(args.dst_options),
            force=args.force, allow_nonuniform=args.allow_nonuniform,
        )
    except RewriterError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(result.to_json(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

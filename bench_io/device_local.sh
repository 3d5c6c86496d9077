#!/bin/sh
# The local workloads of the I/O benchmark on a machine without s3fs, moto or Ray (the H200
# machine): every local contender, results (latest.json/md/png and the log) under $OUT.
# Usage: OUT=/some/dir sh bench_io/device_local.sh
set -eu
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/bench-work}
mkdir -p "$OUT" "$WORK"
{ nproc; free -g; df -h "$WORK"; uname -r; } > "$OUT/machine.txt" 2>&1 || true
"$PY" -m bench_io run --size default --only local --work "$WORK" --results "$OUT" --repeat 2 \
  --contenders naive,ours,ours-buffered,ours-seq,ours-buffered-seq,ours-jobs1,ours-jobs4,ours-jobs8,ours-seg1,ours-seg16,floor,dd \
  2>&1 | tee "$OUT/log.txt"

#!/usr/bin/env bash
# Does a seed give the same tokens whatever the batch on the GPU (issue 21's claim)? About 2 minutes on an
# H200, for a device call with time left after bench/device_check.sh: python -m bark_serve.bench.batch_invariance
# on CUDA (forks over 200 seeded requests of a tiny checkpoint, eager and batch_invariant engines; the
# bark-small decode step at batch 1 and at the row floor; the floors the probe finds, or null where cuBLAS
# has none). Runs from the checkout on PYTHONPATH, as bench/device_graphs.sh does (no ray needed).
#   bash bench/device_invariance.sh [OUTDIR]      (OUTDIR default: $OUT, else ./out)
# With the device tool: run(command="bash bench/device_invariance.sh", timeout_s=300, kind="nvidia-h200")
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-out}}"
mkdir -p "$OUTDIR"
source bench/checkout_on_path.sh
NAME="bench-$(bash bench/gpu_tag.sh)-invariance"
python3 -m bark_serve.bench.batch_invariance --device "${DEVICE:-cuda}" --requests "${REQUESTS:-200}" --steps 20 \
  > "$OUTDIR/$NAME.json" 2> >(tee "$OUTDIR/$NAME.log" >&2)
python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("floors", r["floors"]); \
[print(s) for s in r["steps"]]; [print({k: v for k, v in f.items() if k != "which"}) for f in r["forks"]]' \
  "$OUTDIR/$NAME.json"

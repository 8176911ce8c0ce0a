#!/usr/bin/env bash
# Issues 21 and 22's device checks in one call (under 10 minutes on an H200), so that a session lent the
# device for 15 minutes gets both. First issue 21's (bench/device_graphs.sh): transformers sequential and a
# static batch of 64 of the segments sorted by length (the stronger baseline: it pads less; the batch of 16,
# 2.25x slower on the last H200 run, and the workload-order batch are left out for time), the engines
# eager and with CUDA graphs at batch 1, 16 and 64, and the decode-step profile. Then issue 22's
# (bench/device_served.sh): the served app on the GPU, taking the transformers and engine runs from the
# first report (--reuse-runs: same machine, workload and dtype, minutes apart) instead of running them
# again. Each report is saved run by run, so a check cut short keeps what it measured.
#   python -m bark_serve.bench.device_pack .cache/device-pack-out   # here, once (37 MiB)
#   bash bench/device_check.sh PACKDIR [OUTDIR]                     # there (OUTDIR default: $OUT, else ./out)
# With the device tool: run(command="bash bench/device_check.sh .cache/device-pack-out",
#                           carry=[".cache/device-pack-out"], timeout_s=600, kind="nvidia-h200")
# DEVICE=cpu SIZE=tiny GRAPHS_TIMEOUT=900 BUDGET_S=1800: the whole call rehearsed on a CPU, as
# bench/device_rehearsal.sh runs it (in an environment like the device image's).
set -uo pipefail
cd "$(dirname "$0")/.."
PACK="${1:?usage: bench/device_check.sh PACKDIR [OUTDIR]}"
OUTDIR="${2:-${OUT:-out}}"
mkdir -p "$OUTDIR"
START=$SECONDS
HF_BATCHES=64 HF_ORDERS=sorted timeout -k 15 "${GRAPHS_TIMEOUT:-330}" bash bench/device_graphs.sh "$OUTDIR"
echo "issue 21's check: exit $?, $((SECONDS - START)) s"
LEFT=$((${BUDGET_S:-575} - (SECONDS - START)))
GRAPHS="$OUTDIR/bench-$(bash bench/gpu_tag.sh)-graphs.json"   # as device_graphs.sh names it
# Reuse what issue 21's report holds; what it lacks (a run that failed or was cut) the served bench runs
# itself: MISSING names those parts (hf: transformers sequential and the static batch, engines: batch 64).
if [ -s "$GRAPHS" ]; then
  export REUSE="$GRAPHS"
  MISSING="$(python3 - "$GRAPHS" <<'PY'
import json, sys
try:
    names = [r.get("name", "") for r in json.load(open(sys.argv[1])).get("runs", [])]
except (OSError, ValueError, AttributeError):
    names = []
need = {"hf": ("transformers_sequential", "transformers_batch64"), "engines": ("engines_batch64",)}
print(",".join(k for k, prefixes in need.items() if not all(any(n.startswith(p) for n in names) for p in prefixes)))
PY
)"
  export MISSING
  echo "reusing $GRAPHS; to run again: ${MISSING:-nothing}"
fi
# 40 s kept back: the pack's install (outside the served timeout) and the 20 s grace of its timeout -k
SERVED_TIMEOUT=$((LEFT - 40)) bash bench/device_served.sh "$PACK" "$OUTDIR"
echo "issue 22's check: exit $?, $((SECONDS - START)) s in all"

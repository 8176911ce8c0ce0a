#!/usr/bin/env bash
# Issue 22's device check (one call, under 10 minutes on an H200): the served app on the GPU. Installs the
# device pack (Ray, Serve and what the served app imports beyond the machine's image), starts a local Ray
# with the `single-gpu` profile (four stage pools on the one GPU, CUDA graphs on) and runs `bark-serve bench`
# on bark-mix-v1 with a random bark-small checkpoint in bfloat16: transformers sequential fp32 and a static
# batch of 64 (the best size in the issue-21 run) of the segments sorted by length, the engines at batch 64, the served app closed loop at
# concurrency 1, 16 and 64 (4, 32 and 192 requests: more than the clients, so that each run has steady
# figures, see bench/served_runs.steady_window), and Poisson arrivals at 0.5, 0.7 and 0.9 of saturation (32 requests each),
# with the plots. The code runs from the checkout on PYTHONPATH (torch and transformers are the machine's).
#   python -m bark_serve.bench.device_pack .cache/device-pack-out   # here, once: at most 50 MiB (37 MiB)
#   bash bench/device_served.sh PACKDIR [OUTDIR]                    # there (OUTDIR default: $OUT, else ./out)
# DEVICE=cpu SIZE=tiny: the same runs on a CPU and a tiny checkpoint (bench/device_rehearsal.sh).
# With the device tool: run(command="bash bench/device_served.sh .cache/device-pack-out",
#                           carry=[".cache/device-pack-out"], timeout_s=600, kind="nvidia-h200")
set -euo pipefail
cd "$(dirname "$0")/.."
PACK="${1:?usage: bench/device_served.sh PACKDIR [OUTDIR]}"
OUTDIR="${2:-${OUT:-out}}"
mkdir -p "$OUTDIR"
SITE="$(mktemp -d /tmp/bark-site-XXXX)"
bash "$PACK/install.sh" "$SITE" "$PWD"   # the pack, and this checkout linked in as $SITE/bark_serve
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export BARK_BENCH_CACHE="${BARK_BENCH_CACHE:-/tmp/bark-bench}" RAY_TMPDIR="$(mktemp -d /tmp/bark-ray-XXXX)"
# On exit: Ray's and the replicas' logs (placement, graph capture, errors) kept as one file, then the unpacked
# pack (188 MB) and Ray's session files removed.
keep_logs() {
  ( cd "$RAY_TMPDIR" && find . -path '*/logs/*' -type f -size -20M -print0 \
      | tar --null -T - -cJf "$OUTDIR/ray-logs.tar.xz" ) 2>/dev/null || true
  rm -rf "$SITE" "$RAY_TMPDIR"
}
trap keep_logs EXIT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
NAME="bench-$(bash bench/gpu_tag.sh)-served"   # bench-h200-served.json on an H200
python3 -c "import ray, ray.serve, fastapi, pydantic; print('ray', ray.__version__)"
# REUSE=FILE (bench/device_check.sh sets it): the transformers and engine runs come from issue 21's report,
# written minutes before in the same call on the same machine (--reuse-runs), instead of being run again.
# MISSING=hf,engines (device_check.sh, from that report): the parts it lacks, run here instead.
BASELINES=(--hf-requests 2 --hf-batches 64 --hf-orders sorted --engine-batches 64 --engine-requests 64)
if [ -n "${REUSE:-}" ]; then
  SKIP=offline
  for part in hf engines; do
    case ",${MISSING:-}," in *",$part,"*) ;; *) SKIP="$SKIP,$part" ;; esac
  done
  FIRST=(--skip "$SKIP" --reuse-runs "$REUSE" "${BASELINES[@]}")
else
  FIRST=(--skip offline "${BASELINES[@]}")
fi
# The served runs come in the order the floors need them (c1, c64, Poisson 0.7, 0.5, 0.9, then c16), and
# --deadline-s skips a run expected to end past the timeout (the bench's start, GEMM peaks and app stop take
# the other 60 s); timeout -k: a bench that ignores SIGTERM is killed 20 s later, well inside the call.
TIMEOUT="${SERVED_TIMEOUT:-560}"
timeout -k 20 "$TIMEOUT" python3 -m bark_serve.bench.cli --device "${DEVICE:-cuda}" --size "${SIZE:-small}" \
  --dtype bfloat16 \
  --profile single-gpu "${FIRST[@]}" \
  --concurrency 1,16,64 --served-requests 32,1=4,64=192 --rate-fractions 0.7,0.5,0.9 --gemm-seconds 1 \
  --deadline-s $((TIMEOUT - 60)) \
  --plots "$OUTDIR/img" --out "$OUTDIR/$NAME.json" 2> >(tee "$OUTDIR/$NAME.log" >&2) \
  >/dev/null
python3 - "$OUTDIR/$NAME.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for run in r["runs"]:
    print(f'{run["name"]:48s} n={run.get("requests")} {run.get("throughput_audio_s_per_s", 0):9.3f} audio-s/s '
          f'ttfa p95 {run.get("ttfa_p95_s")}')
print(json.dumps({k: r.get(k) for k in ("slo", "floors", "skipped", "failures")}, indent=1))
PY

#!/usr/bin/env bash
# Issue 21's device check (one call, about 6.5 minutes on an H200): transformers sequential fp32 and
# static batches of 16 and 64, each of the segments in workload order and sorted by length, the engines eager and with CUDA graphs at batch 1, 16 and 64, and the
# decode-step profile (wall vs GPU kernel time per decode-only step, every stage), on a random
# bark-small checkpoint in bfloat16. Runs from the checkout on PYTHONPATH (the device machine has
# torch, transformers and numpy, no ray: the bench's engine and transformers paths need neither).
#   bash bench/device_graphs.sh [OUTDIR]      (OUTDIR default: $OUT, else ./out)
# HF_BATCHES=64 HF_ORDERS=sorted run only transformers' static batch of 64 of the sorted segments (the batch
# of 16 was 2.25x slower than 64 on the H200 run of 2026-12-04; sorting pads less: on bark-mix-v1's first
# 64 requests a batch of 64 runs 978 steps sorted against 1536 in order), as bench/device_check.sh does to
# fit issue 22's check into the same call.
# DEVICE=cpu SIZE=tiny: the same runs on a CPU and a tiny checkpoint (bench/device_rehearsal.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-out}}"
mkdir -p "$OUTDIR"
source bench/checkout_on_path.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
NAME="bench-$(bash bench/gpu_tag.sh)-graphs"   # bench-h200-graphs.json on an H200
python3 -m bark_serve.bench.cli --device "${DEVICE:-cuda}" --size "${SIZE:-small}" --dtype bfloat16 --skip served,offline \
  --hf-requests 2 --hf-batches "${HF_BATCHES:-16,64}" \
  --hf-orders "${HF_ORDERS:-given,sorted}" --engine-batches 1,16,64 --engine-requests 1=2,16=16,64=64 \
  --cuda-graphs off,on --decode-steps 20 --gemm-seconds 1 \
  --out "$OUTDIR/$NAME.json" 2> >(tee "$OUTDIR/$NAME.log" >&2) >/dev/null
python3 - "$OUTDIR/$NAME.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for run in r["runs"]:
    print(f'{run["name"]:48s} {run.get("throughput_audio_s_per_s", 0):9.3f} audio-s/s')
for row in r.get("decode_steps", []):
    if "error" in row:
        print(f'{row["stage"]:8s} graphs {row["setting"]}: FAILED {row["error"]}')
        continue
    print(f'{row["stage"]:8s} b{row["batch"]:<3d} graphs={row["cuda_graphs"]!s:5s} wall {row["wall_ms"]:8.3f} ms '
          f'gpu {row["gpu_ms"]} ms ratio {row["wall_over_gpu"]} events {row["device_events_per_step"]}')
print(json.dumps({k: r.get(k) for k in ("floors", "failures")}, indent=1))
PY

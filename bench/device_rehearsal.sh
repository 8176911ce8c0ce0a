#!/usr/bin/env bash
# Rehearses the device call (bench/device_check.sh, issues 21 and 22) on this CPU machine, in an environment
# like the device image's: Python 3.12 with torch 2.11 and transformers 5.17 (the image's versions, not the
# project's pins), the image's small packages, and no Ray, FastAPI or pydantic but the pack's. The runs are
# the device call's, on a CPU and a tiny checkpoint: what it catches is a version the code does not run on,
# a package the pack lacks, a script step that fails or hangs; it measures nothing that counts.
#   python -m bark_serve.bench.device_pack .cache/device-pack-out     # the pack, once
#   bash bench/device_rehearsal.sh .cache/device-pack-out [OUTDIR]    # OUTDIR default: .cache/rehearsal
# The first run builds the venv (REHEARSAL_VENV, default .cache/device-image-venv): torch 2.11 from PyPI is
# the CUDA build, several GB with its nvidia-* wheels (about 4 minutes). On 2 cores the call then takes 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PACK="${1:?usage: bench/device_rehearsal.sh PACKDIR [OUTDIR]}"
OUTDIR="${2:-.cache/rehearsal}"
VENV="${REHEARSAL_VENV:-.cache/device-image-venv}"
if [ ! -x "$VENV/bin/python3" ]; then
  PY312=""
  for py in ${PYTHON312:-} python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    if "$py" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then PY312="$py"; break; fi
  done  # (a pyenv shim may exist and refuse to run)
  [ -n "$PY312" ] || { echo "device_rehearsal: no Python 3.12 (set PYTHON312)" >&2; exit 2; }
  echo "rehearsal: building $VENV with $PY312 (torch 2.11 is several GB: minutes)" >&2
  "$PY312" -m venv "$VENV"
  # The image's versions of torch and transformers, and those of its packages the code or Ray imports
  # (/work/.library/device/KINDS.md lists the image); never ray, fastapi, pydantic, redis, soundfile, av.
  "$VENV/bin/python3" -m pip install --quiet torch==2.11.0 transformers==5.17.0 accelerate numpy scipy aiohttp \
    msgpack pyyaml httpx matplotlib prometheus-client requests psutil uvloop six pyarrow pandas click cloudpickle \
    filelock jinja2 rich tqdm packaging typing-extensions attrs frozenlist fsspec
  # what those pull in here (typer's pydantic) that the image lacks: the pack must bring it
  "$VENV/bin/python3" -m pip uninstall --quiet -y pydantic pydantic-core annotated-types typing-inspection
fi
if "$VENV/bin/python3" -c "import ray" 2>/dev/null || "$VENV/bin/python3" -c "import pydantic" 2>/dev/null; then
  echo "device_rehearsal: $VENV has ray or pydantic, which the device image lacks; delete it to rebuild" >&2
  exit 2
fi
"$VENV/bin/python3" -c "import sys, torch, transformers; print('rehearsal: python', sys.version.split()[0], \
'torch', torch.__version__, 'transformers', transformers.__version__)"
mkdir -p "$OUTDIR"
PATH="$PWD/$VENV/bin:$PATH" DEVICE=cpu SIZE=tiny GRAPHS_TIMEOUT=900 BUDGET_S=1800 \
  BARK_BENCH_CACHE="${BARK_BENCH_CACHE:-/tmp/bark-bench-rehearsal}" bash bench/device_check.sh "$PACK" "$OUTDIR"
# device_check.sh goes on past a failed step (a cut-short call keeps what it measured); a rehearsal must not
python3 - "$OUTDIR" <<'PY'
import glob, json, sys
reports = {kind: glob.glob(f"{sys.argv[1]}/bench-*-{kind}.json") for kind in ("graphs", "served")}
missing = [kind for kind, found in reports.items() if not found]
if missing:
    sys.exit(f"device_rehearsal: no {' or '.join(missing)} report in {sys.argv[1]}: see the logs there")
loaded = {path: json.load(open(path)) for found in reports.values() for path in found}
broken = {path: r.get("failures") or r.get("skipped") for path, r in loaded.items() if r.get("failures") or r.get("skipped")}
if broken:  # a configuration that failed or was skipped for time: the device call would lose it too
    sys.exit(f"device_rehearsal: failed or skipped configurations: {json.dumps(broken)}")
runs = [run for path in reports["served"] for run in loaded[path]["runs"] if run["name"].startswith("served")]
failed = sum(run.get("failed_requests", 0) for run in runs)
if not runs or failed:
    sys.exit(f"device_rehearsal: {len(runs)} served runs, {failed} failed requests")
print(f"device_rehearsal: both reports written, {len(runs)} served runs, no failed request")
PY

# Sourced (from the repository root) by the device scripts that run the bench from the checkout, where
# nothing is pip-installed: a bark_serve package of symlinks to the checkout's folders goes first on
# PYTHONPATH, and the bench's random checkpoints are cached under /tmp unless BARK_BENCH_CACHE says otherwise.
BARK_PATH_ROOT="$(mktemp -d)"
mkdir -p "$BARK_PATH_ROOT/bark_serve"
for d in stages serving cluster offline bench cli schema; do ln -s "$PWD/$d" "$BARK_PATH_ROOT/bark_serve/$d"; done
export PYTHONPATH="$BARK_PATH_ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export BARK_BENCH_CACHE="${BARK_BENCH_CACHE:-/tmp/bark-bench}"

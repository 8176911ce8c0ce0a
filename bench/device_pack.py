"""The device pack (issue 22): what the served app and ``bark-serve bench`` import beyond the device's image.

The benchmark device (Python 3.12, x86-64, torch and transformers installed) reaches no package index, and a
call carries at most 64 MiB. This downloads the pinned wheels below for its Python and platform without their
declared dependencies (each pin is imported by the app, the bench or Ray's agents, as starting them with every
package the device lacks refused showed, or replaces a device package whose version may not do), unpacks them,
strips what nothing we run imports (Ray's jars, its dashboard's web client, RLlib, Tune, Train, the LLM library,
tests, caches) and writes OUTDIR: ``site.tar.xz``, ``install.sh`` and ``MANIFEST.json``. There:
``bash OUTDIR/install.sh TARGET [CHECKOUT]``, then ``PYTHONPATH=TARGET`` (CHECKOUT: also link the checkout's
folders into TARGET as ``bark_serve``).

    python -m bark_serve.bench.device_pack OUTDIR [--python-version 3.12] [--cache DIR] [--level 6]

Progress goes to stderr, a JSON summary to stdout; exit 1 when the pack is over ``--max-mib`` (50).
docs/DEVICE_PACK.md says what is left out and why.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.metadata as md
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

# (distribution, version, why it travels). The version listed is the fallback: the pack takes the version this
# environment has installed (pins()), so the device runs what CI tests even after a dependency's new release.
PINS: tuple[tuple[str, str, str], ...] = (
    ("ray", "2.60.0", "Ray core and Ray Serve (the served app), Ray Data (bark-serve dataset)"),
    ("jsonschema", "4.26.0", "imported by ray.runtime_env (plugin schemas) when ray is imported"),
    ("jsonschema-specifications", "2025.9.1", "imported by jsonschema"),
    ("referencing", "0.37.0", "imported by jsonschema"),
    ("rpds-py", "2026.9.1", "imported by referencing"),
    ("fastapi", "0.165.0", "the orchestrator's HTTP app (serving/routes.py) and Serve's proxy"),
    ("opentelemetry-api", "1.45.2", "FastAPI 0.165 imports it (fastapi/telemetry) at import time"),
    ("starlette", "1.10.0", "FastAPI's base: requests, responses, middleware"),
    ("pydantic", "2.14.4", "the request schema (schema/), the config (serving/config.py), Serve's own models"),
    ("pydantic_core", "2.50.5", "pydantic's compiled core"),
    ("annotated-types", "0.8.0", "imported by pydantic"),
    ("typing-inspection", "0.4.5", "imported by pydantic and FastAPI"),
    ("typing_extensions", "4.16.0", "pydantic 2.14 needs >= 4.16; the device's own may be older"),
    ("grpcio-reflection", "1.85.1", "imported by ray.serve (serve/_private/grpc_util.py)"),
    ("grpcio", "1.85.3", "the device has one, of unknown version: grpcio-reflection's code refuses grpcio < 1.85.1"),
    ("protobuf", "7.36.2", "the device has one, of unknown version: grpcio-reflection's code needs 7.35.1 to 8"),
    ("aiohttp-cors", "0.8.1", "Ray's dashboard agent modules (the reporter: the node's metrics export, GET /metrics)"),
    ("opencensus", "0.11.4", "Ray's metrics agent (ray/_private/metrics_agent.py): the node's Prometheus export"),
    ("opencensus-context", "0.1.3", "imported by opencensus"),
    ("googleapis-common-protos", "1.76.0", "imported by opencensus (google.rpc)"),
    ("opentelemetry-sdk", "1.45.2", "Ray's metrics (the reporter agent's OpenTelemetry path)"),
    ("opentelemetry-semantic-conventions", "0.66b2", "imported by opentelemetry-sdk"),
    ("opentelemetry-proto", "1.45.2", "imported by Ray's reporter agent"),
    ("opentelemetry-exporter-prometheus", "0.66b2", "Ray's metrics export in Prometheus format"),
    ("uvicorn", "0.55.0", "Serve's HTTP proxy server"),
    ("python-multipart", "0.0.34", "Starlette's form parser: voice uploads (POST /v1/voices), at request time"),
    ("redis", "8.2.0", "cluster/ imports it at module level, and the CLI and the routes import cluster/"),
    ("pyloudnorm", "0.2.0", "BS.1770 loudness normalization (stages/audio.py), on by default"),
    ("soundfile", "0.14.0", "wav/flac voice uploads without PyAV (stages/audio_in.py); bundles libsndfile"),
    ("cffi", "2.1.1", "soundfile's binding"),
    ("pycparser", "3.12", "cffi's parser"),
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64")
# Paths (relative to the unpacked tree; fnmatch patterns, a folder takes everything under it) nothing we run imports.
STRIP = ("ray/jars", "ray/dashboard/client", "ray/rllib", "ray/tune", "ray/train", "ray/llm",
         "ray/serve/llm", "ray/data/llm.py", "ray/air/integrations", "ray/util/dask", "ray/util/spark",
         "ray/util/joblib", "ray/autoscaler/aws", "ray/autoscaler/gcp", "ray/autoscaler/azure",
         "ray/autoscaler/_private/aws", "ray/autoscaler/_private/gcp", "ray/autoscaler/_private/_azure",
         "*/tests", "*/__pycache__", "*.pyc", "*.pyi", "*.dist-info/RECORD")
MAX_MIB = 50.0
ARCHIVE = "site.tar.xz"

# The checkout's folders that install as bark_serve.* (pyproject.toml's package-dir): install.sh links them.
PACKAGES = ("stages", "schema", "serving", "cluster", "offline", "bench", "cli")

INSTALL_SH = """#!/usr/bin/env bash
# bark-serve device pack: unpack it into TARGET; with CHECKOUT, also link the checkout's folders there as
# bark_serve.* (the checkout has no bark_serve folder of its own), so that PYTHONPATH=TARGET runs the app.
#   bash install.sh TARGET [CHECKOUT]        (PYTHON: the interpreter it is for, default python3)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
TARGET="${1:?usage: bash install.sh TARGET [CHECKOUT]}"
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; v = "%d.%d" % sys.version_info[:2]; sys.exit(0 if v == "@PY@" else
    "this pack is for Python @PY@, " + sys.executable + " is " + v)'
mkdir -p "$TARGET"
for a in "$HERE"/*.tar.xz; do
  if command -v xz >/dev/null; then xz -dc -T0 "$a" | tar -C "$TARGET" -xf -
  else "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$a" "$TARGET"; fi
done
if [ -n "${2:-}" ]; then
  CHECKOUT="$(cd "$2" && pwd)"
  mkdir -p "$TARGET/bark_serve"
  for d in @PACKAGES@; do ln -sfn "$CHECKOUT/$d" "$TARGET/bark_serve/$d"; done
fi
# Bytecode now, once, on every core: the pack carries none, and where PYTHONDONTWRITEBYTECODE is set (as on
# the machines that build it) every process, each Ray worker included, would compile Ray from source again.
T0=$SECONDS
"$PY" -m compileall -q -j0 "$TARGET" >/dev/null || echo "install.sh: some files did not compile (they still run)" >&2
echo "compiled $TARGET in $((SECONDS - T0)) s"
echo "device pack installed in $TARGET: export PYTHONPATH=$TARGET"
"""


def say(msg: str) -> None:
    print(f"[device-pack] {msg}", file=sys.stderr, flush=True)


def _accepted_tags(py: tuple[int, int]) -> set[Tag]:
    interp = f"cp{py[0]}{py[1]}"
    return {*cpython_tags(py, abis=[interp, "abi3", "none"], platforms=PLATFORMS),
            *compatible_tags(py, interp, platforms=PLATFORMS)}


def _cached(wheels: Path, name: str, version: str, accepted: set[Tag]) -> Path | None:
    for path in sorted(wheels.glob("*.whl")):
        dist, ver, _, tags = parse_wheel_filename(path.name)
        if dist == canonicalize_name(name) and str(ver) == version and tags & accepted:
            return path
    return None


def pins() -> list[tuple[str, str, str]]:
    """PINS with each version replaced by the one installed here, where it is: CI's fresh venv resolves the
    dependencies anew, and the device must run the versions the tests ran (the listed ones are the fallback)."""
    out = []
    for name, listed, why in PINS:
        try:
            out.append((name, md.version(name), why))
        except md.PackageNotFoundError:
            out.append((name, listed, why))
    return out


def download(cache: Path, py: tuple[int, int], wanted: list[tuple[str, str, str]]) -> dict[str, Path]:
    """One wheel per pin for Python ``py`` on x86-64 manylinux, from the cache or pip (only the missing ones)."""
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    accepted = _accepted_tags(py)
    missing = [f"{n}=={v}" for n, v, _ in wanted if _cached(wheels, n, v, accepted) is None]
    if missing:
        say(f"downloading {len(missing)} wheels for cp{py[0]}{py[1]}: {' '.join(missing)}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(wheels),
               "--python-version", f"{py[0]}.{py[1]}", "--implementation", "cp", "--abi", f"cp{py[0]}{py[1]}",
               "--abi", "abi3", "--abi", "none", *(a for p in PLATFORMS for a in ("--platform", p)),
               "--disable-pip-version-check", "--quiet", *missing]
        subprocess.run(cmd, check=True, stdout=sys.stderr)
    found = {n: _cached(wheels, n, v, accepted) for n, v, _ in wanted}
    lost = [n for n, p in found.items() if p is None]
    if lost:
        raise SystemExit(f"device pack: no wheel of {', '.join(lost)} for cp{py[0]}{py[1]} in {wheels}")
    return {n: p for n, p in found.items() if p is not None}


def unpack(wheel: Path, dest: Path) -> None:
    """As pip installs a wheel (files, exec bits, ``*.data/purelib|platlib``), without scripts or metadata updates."""
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # scripts, headers, data: nothing the app imports
                parts = parts[2:]
            if info.is_dir() or not parts[-1]:
                continue
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            if (info.external_attr >> 16) & 0o111:
                target.chmod(0o755)


def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file())


def strip(tree: Path) -> dict[str, int]:
    """Remove what matches STRIP; bytes removed per pattern."""
    removed = dict.fromkeys(STRIP, 0)
    for dirpath, dirnames, filenames in os.walk(tree, topdown=True):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            rel = path.relative_to(tree).as_posix()
            pattern = next((p for p in STRIP if fnmatch.fnmatchcase(rel, p)), None)
            if pattern is None:
                continue
            removed[pattern] += _size(path)
            if name in dirnames:
                shutil.rmtree(path)
                dirnames.remove(name)
            else:
                path.unlink()
    return removed


def compress(tree: Path, out: Path, level: int) -> None:
    """tar | xz -T0 (every core); Python's lzma (one core) where there is no xz."""
    names = sorted(p.name for p in tree.iterdir())
    if shutil.which("xz") is None:
        with lzma.open(out, "wb", preset=level) as xzf, tarfile.open(fileobj=xzf, mode="w|") as tf:
            for name in names:
                tf.add(tree / name, arcname=name)
        return
    with open(out, "wb") as fh:
        tar = subprocess.Popen(["tar", "--sort=name", "--owner=0", "--group=0", "-C", str(tree), "-cf", "-", *names],
                               stdout=subprocess.PIPE)
        xz = subprocess.run(["xz", "-T0", f"-{level}", "-c"], stdin=tar.stdout, stdout=fh)
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() or xz.returncode:
            raise SystemExit(f"device pack: tar/xz failed ({tar.returncode}, {xz.returncode})")


def build(outdir: Path, py: tuple[int, int], cache: Path, level: int = 6, max_mib: float = MAX_MIB) -> dict:
    t0 = time.monotonic()
    if cache.resolve().is_relative_to(outdir.resolve()):
        raise SystemExit(f"device pack: the download cache {cache} is inside OUTDIR {outdir}, whose every byte "
                         "travels: give another OUTDIR (e.g. .cache/device-pack-out) or --cache")
    wanted = pins()
    wheels = download(cache, py, wanted)
    tree = outdir / ".tree"
    shutil.rmtree(tree, ignore_errors=True)
    for old in outdir.glob("*.tar.xz"):
        old.unlink()
    tree.mkdir(parents=True)
    for wheel in wheels.values():
        unpack(wheel, tree)
    unpacked = _size(tree)
    say(f"unpacked {len(wheels)} wheels: {unpacked / 2**20:.1f} MiB; stripping")
    removed = strip(tree)
    kept = _size(tree)
    say(f"stripped {sum(removed.values()) / 2**20:.1f} MiB; compressing {kept / 2**20:.1f} MiB (xz -{level})")
    compress(tree, outdir / ARCHIVE, level)
    shutil.rmtree(tree)
    version = f"{py[0]}.{py[1]}"
    (outdir / "install.sh").write_text(INSTALL_SH.replace("@PY@", version).replace("@PACKAGES@", " ".join(PACKAGES)))
    manifest = {
        "python": version, "platforms": list(PLATFORMS), "xz_level": level,
        "packages": [{"name": n, "version": v, "why": why, "wheel": wheels[n].name,
                      "wheel_bytes": wheels[n].stat().st_size} for n, v, why in wanted],
        "unpacked_bytes": unpacked, "kept_bytes": kept,
        "stripped": {p: b for p, b in removed.items() if b},
        "archives": {ARCHIVE: (outdir / ARCHIVE).stat().st_size},
    }
    (outdir / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = _size(outdir)  # everything in OUTDIR travels, whoever put it there
    summary = {"outdir": str(outdir), "python": version, "total_bytes": total, "total_mib": round(total / 2**20, 2),
               "max_mib": max_mib, "unpacked_mib": round(unpacked / 2**20, 1), "kept_mib": round(kept / 2**20, 1),
               "files": sorted(str(p.relative_to(outdir)) for p in outdir.rglob("*")),
               "seconds": round(time.monotonic() - t0, 1)}
    say(f"{outdir}: {summary['total_mib']} MiB in {summary['seconds']} s")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bark_serve.bench.device_pack", description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--python-version", default="3.12", help="MAJOR.MINOR of the device's Python (default 3.12)")
    ap.add_argument("--cache", type=Path, default=Path(".cache/device-pack"), help="wheel download cache")
    ap.add_argument("--level", type=int, default=6, choices=range(10), help="xz level (default 6)")
    ap.add_argument("--max-mib", type=float, default=MAX_MIB, help="fail when OUTDIR holds more (default 50)")
    args = ap.parse_args(argv)
    try:
        major, minor = (int(x) for x in args.python_version.split("."))
    except ValueError:
        ap.error(f"--python-version: MAJOR.MINOR, got {args.python_version!r}")
    args.outdir.mkdir(parents=True, exist_ok=True)
    summary = build(args.outdir, (major, minor), args.cache, args.level, args.max_mib)
    print(json.dumps(summary, indent=1))
    if summary["total_mib"] > args.max_mib:
        say(f"FAILED: the pack is {summary['total_mib']} MiB, over the {args.max_mib:g} MiB limit")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

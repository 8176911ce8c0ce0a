"""``dtype: auto`` by measurement: time a small GEMM in each candidate dtype and keep the fastest.

CPU flags do not tell: on an AVX2 EPYC bfloat16 matmuls ran 100x slower than float32, on AMX Xeons
6x faster, and AMD parts with AVX512-BF16 sit in between. So each replica, at start-up, times a
matmul of a transformer block's shape (``rows x hidden`` by ``hidden x 4*hidden``) in every
candidate dtype and picks the highest rate. The result is cached per host (device name, torch
version and thread count) in a small JSON file, so later replicas on the same machine skip the
measurement. An explicit dtype in the config is an override: nothing is measured then.

On a CUDA device that runs bfloat16 natively (compute capability 8.0 and later) bfloat16 is preferred, not
raced: float16 is not a candidate there, and float32 is picked only if it measured more than
``PREFER_MARGIN`` faster. A GEMM this small times launch and sync latency as much as the kernel, so on an
H200 bfloat16 and float16 measured within 2% of each other, and which one a host cached was a coin flip;
pure float16 has far less range than Bark's reference (bfloat16 autocast) and was never run. On older GPUs
(float16 tensor cores, bfloat16 emulated) the probe still decides between float32, float16 and bfloat16.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

log = logging.getLogger(__name__)

# The shape of one MLP matmul of a batched bark-small prefill: big enough to reach the kernel's
# steady rate, small enough that a slow dtype costs a fraction of a second.
PROBE_ROWS, PROBE_HIDDEN = 256, 768
PROBE_SECONDS = 0.15  # per dtype
CACHE_ENV = "BARK_DTYPE_PROBE_CACHE"  # a file path, or "off" to measure every time
PREFER_MARGIN = 1.10  # another candidate must measure this much faster than the preferred dtype to be picked


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str
    tflops: dict[str, float]  # measured rate per candidate
    cached: bool


def candidates(device: str) -> list[str]:
    """float32 always; bfloat16 where the device can run it; float16 on a CUDA device without native bfloat16."""
    if device.startswith("cuda"):
        if preferred(device) == "bfloat16":
            return ["float32", "bfloat16"]
        out = ["float32", "float16"]
        return out + ["bfloat16"] if torch.cuda.is_bf16_supported() else out
    return ["float32", "bfloat16"]


def preferred(device: str) -> str | None:
    """The dtype ``auto`` keeps unless another measures ``PREFER_MARGIN`` faster: bfloat16 on a CUDA device that
    runs it natively (Bark's reference precision, with float32's range); None (the fastest wins) elsewhere."""
    if device.startswith("cuda") and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bfloat16"
    return None


def pick(rates: dict[str, float], prefer: str | None = None) -> str:
    """The fastest of ``rates``; ``prefer`` unless the fastest beats it by more than ``PREFER_MARGIN``."""
    best = max(rates, key=rates.__getitem__)
    if prefer in rates and rates[best] <= rates[prefer] * PREFER_MARGIN:
        return prefer
    return best


def gemm_rate(dtype: str, device: str, seconds: float = PROBE_SECONDS, clock: Callable[[], float] = time.perf_counter,
              shape: tuple[int, int, int] = (PROBE_ROWS, PROBE_HIDDEN, 4 * PROBE_HIDDEN)) -> float:
    """Best TFLOP/s of (m x k) @ (k x n) products over about ``seconds`` (at least 2 products; the best
    one counts, so the first's kernel selection and page faults do not). Also bench/gemm.py's peak."""
    m, k, n = shape
    dt = getattr(torch, dtype)
    a = torch.randn(m, k, device=device).to(dt)
    b = torch.randn(k, n, device=device).to(dt)
    flops = 2.0 * m * k * n
    best, start, count = 0.0, clock(), 0
    while count < 2 or clock() - start < seconds:
        _sync(device)
        t0 = clock()
        torch.matmul(a, b)
        _sync(device)
        best = max(best, flops / max(clock() - t0, 1e-9) / 1e12)
        count += 1
    return best


def choose_dtype(device: str, rate: Callable[[str, str], float] = gemm_rate, cache_file: Path | None = None,
                 ) -> DtypeChoice:
    """The candidate with the highest measured rate, or the preferred dtype within ``PREFER_MARGIN`` of it
    (``pick``; read from the host cache when it has this key)."""
    key = host_key(device)
    path = cache_file if cache_file is not None else default_cache_file()
    with _locked(path):  # replicas starting together: the first measures, the others read its choice
        cache = _read(path) if path else {}
        if key in cache and cache[key].get("dtype") in candidates(device):
            hit = cache[key]
            return DtypeChoice(hit["dtype"], dict(hit.get("tflops", {})), cached=True)
        rates = {name: rate(name, device) for name in candidates(device)}
        best = pick(rates, preferred(device))
        if path:
            _write(path, {**cache, key: {"dtype": best, "tflops": rates}})
    return DtypeChoice(best, rates, cached=False)


def auto_dtype(device: str, logger: logging.Logger | None = None) -> str:
    """What ``dtype: auto`` resolves to on this host; logs (INFO) the choice and the rates behind it."""
    choice = choose_dtype(device)
    rates = ", ".join(f"{k} {v:.3f}" for k, v in choice.tflops.items())
    (logger or log).info("dtype auto -> %s on %s (GEMM TFLOP/s: %s%s)", choice.dtype, device, rates,
                         "; cached for this host" if choice.cached else "")
    return choice.dtype


def host_key(device: str) -> str:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = _cpu_model()
    return f"{device.split(':')[0]}|{name}|torch {torch.__version__}|threads {torch.get_num_threads()}"


def default_cache_file() -> Path | None:
    env = os.environ.get(CACHE_ENV)
    if env == "off":
        return None
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bark-serve" / "dtype-probe.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def _locked(path: Path | None) -> Iterator[None]:
    """An exclusive lock beside the cache file while it is read, measured for and written: processes of
    one host (the stage actors of one run) that start together then agree on the dtype. Best effort:
    without a lock file (read-only home, no fcntl) each process measures on its own, as before."""
    lock: TextIO | None = None
    if path is not None:  # None: the cache is off
        try:
            import fcntl

            path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(path.with_name(path.name + ".lock"), "a")
        except (ImportError, OSError):  # no fcntl, or no lock file here: measure alone
            pass
    if lock is None:
        yield
        return
    with lock:  # closing it releases the lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(path: Path, data: dict) -> None:
    """Best effort and atomic (a reader never sees half a file)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except OSError as exc:
        log.info("could not cache the dtype probe in %s: %s", path, exc)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()

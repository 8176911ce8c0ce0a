"""The machine's matrix-multiply peak, measured in the same run as the benchmark it normalises."""

from __future__ import annotations

import time

import torch


def gemm_tflops(dtype: torch.dtype, device: str = "cpu", size: int = 2048, seconds: float = 2.0) -> float:
    """Best TFLOP/s of square (size x size) matmuls over about ``seconds``."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    flops = 2.0 * size ** 3
    best, deadline = 0.0, time.perf_counter() + seconds
    torch.matmul(a, b)  # warm-up (kernel selection, page faults)
    while True:
        _sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        dt = time.perf_counter() - t0
        best = max(best, flops / dt / 1e12)
        if time.perf_counter() > deadline:
            return best


def gemm_peaks(device: str = "cpu", size: int = 2048, seconds: float = 2.0) -> dict[str, float]:
    """TFLOP/s per dtype; a dtype so slow that one product takes over ``seconds`` is measured smaller."""
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        if device == "cpu" and dtype == torch.float16:
            continue  # no fast fp16 matmul on CPUs; not a serving choice there
        probe = gemm_tflops(dtype, device, 256, 0.2)
        n = size if probe * 1e12 * seconds > 2.0 * size ** 3 else 512  # keep slow dtypes from taking minutes
        out[name] = gemm_tflops(dtype, device, n, seconds)
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()

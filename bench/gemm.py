"""The machine's matrix-multiply peak, measured in the same run as the benchmark it normalises."""

from __future__ import annotations

from bark_serve.stages.dtype_probe import gemm_rate


def gemm_tflops(dtype: str, device: str = "cpu", size: int = 2048, seconds: float = 2.0) -> float:
    """Best TFLOP/s of square (size x size) matmuls over about ``seconds`` (``dtype`` as torch names it)."""
    return gemm_rate(dtype, device, seconds, shape=(size, size, size))


def gemm_peaks(device: str = "cpu", size: int = 2048, seconds: float = 2.0) -> dict[str, float]:
    """TFLOP/s per dtype; a dtype so slow that one product takes over ``seconds`` is measured smaller."""
    out = {}
    for name in ("float32", "bfloat16", "float16"):
        if device == "cpu" and name == "float16":
            continue  # no fast fp16 matmul on CPUs; not a serving choice there
        probe = gemm_tflops(name, device, 256, 0.2)
        n = size if probe * 1e12 * seconds > 2.0 * size ** 3 else 512  # keep slow dtypes from taking minutes
        out[name] = gemm_tflops(name, device, n, seconds)
    return out

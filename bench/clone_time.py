"""Seconds to clone a voice from a 10 s clip, on this machine: ``python -m bark_serve.bench.clone_time``.

A benchmark figure, not a timed test. Loads a :class:`VoiceCloner` (a Bark checkpoint's codec, HuBERT and the
quantizer; random ones with bark-small's shapes, made once and cached under $BARK_BENCH_CACHE or
~/.cache/bark-serve beside ``bark-serve bench``'s checkpoint, when none are given), then times
``clone`` on one seeded synthetic clip (a 24 kHz vowel-like tone with noise) after a warm-up, and prints one
JSON object: every run, the median, the load time, device, dtype, threads and the model sizes. Random
weights cost the same arithmetic as real ones, so the figure stands for the real models.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def synthetic_clip(seconds: float, rate: int = 24_000, seed: int = 0) -> np.ndarray:
    """A voiced-sounding test clip: harmonics of a gliding 110-180 Hz pitch, amplitude-modulated like
    syllables, plus a little noise (peak about 0.5)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 145 + 35 * np.sin(2 * np.pi * 0.3 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    syllables = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    audio = 0.2 * voiced * syllables + 0.01 * rng.standard_normal(t.size)
    return audio.astype(np.float32)


def random_models(size: str) -> tuple[Path, dict[str, Path]]:
    """A random Bark checkpoint and cloning weights of ``size``, made once under the cache directory."""
    from bark_serve.stages.random_checkpoint import CHECKPOINT_REVISION, make_checkpoint
    from bark_serve.stages.random_cloning import make_cloning_weights

    cache = Path(os.environ.get("BARK_BENCH_CACHE", Path.home() / ".cache" / "bark-serve"))
    ckpt = cache / f"bench-{size}-r{CHECKPOINT_REVISION}"  # the checkpoint `bench` makes too
    cloning = cache / f"bench-cloning-{size}"
    if not (ckpt / "model.safetensors").exists():
        print(f"making a random {size} Bark checkpoint in {ckpt} ...", file=sys.stderr)
        make_checkpoint(ckpt, size, seed=0, eos=False)
    weights = {"hubert": cloning / "hubert",
               "quantizer": cloning / "quantizer" / "quantifier_V1_hubert_base_ls960_23.pth"}
    if not all(p.exists() for p in weights.values()):
        print(f"making random {size} cloning weights in {cloning} ...", file=sys.stderr)
        weights = make_cloning_weights(cloning, size, seed=0)
    return ckpt, weights


def run(args) -> dict[str, Any]:
    import torch

    from bark_serve.stages.cloning import VoiceCloner
    from bark_serve.stages.engine import EngineOptions, resolve_device, resolve_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    model, weights = (Path(args.model), {}) if args.model else random_models(args.size)
    hubert = args.hubert or weights.get("hubert")
    quantizer = args.quantizer or weights.get("quantizer")
    if hubert is None or quantizer is None:
        raise SystemExit("with --model, give --hubert and --quantizer too (or leave all three out for random "
                         "bark-small-shaped weights)")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    t0 = time.perf_counter()
    cloner = VoiceCloner.from_pretrained(model, hubert, quantizer, EngineOptions(device=device, dtype=dtype))
    load_s = time.perf_counter() - t0
    clip = synthetic_clip(args.seconds)
    cloner.clone(clip, 24_000)  # warm-up: first-call allocations and kernel choices
    runs = []
    for _ in range(args.runs):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        voice = cloner.clone(clip, 24_000)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - t)
    return {
        "benchmark": "clone_time", "clip_s": args.seconds, "median_s": statistics.median(runs), "runs_s": runs,
        "load_s": load_s, "device": device, "device_name": _device_name(device), "dtype": dtype,
        "torch_threads": torch.get_num_threads(), "model": str(model), "hubert": str(hubert),
        "quantizer": str(quantizer), "sizes": cloner.sizes(),
        "prompt": {"semantic": int(voice.semantic.shape[0]), "frames": int(voice.fine.shape[1])},
    }


def _device_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bark_serve.bench.clone_time", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="Bark checkpoint (its codec); default: a random one of --size, cached")
    p.add_argument("--hubert", help="HuBERT directory or hub id (default with --model: none; random otherwise)")
    p.add_argument("--quantizer", help="quantizer .pth (default with --model: none; random otherwise)")
    p.add_argument("--size", default="small", choices=["tiny", "small", "large"],
                   help="shapes of the random models made when --model is not given (default small)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the clip (default 10)")
    p.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up (default 5)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", help="HuBERT's dtype: float32, bfloat16, float16 or auto")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    print(json.dumps(run(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

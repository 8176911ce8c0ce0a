"""``bark-serve bench``: transformers vs bark-serve's engines vs the served app, one run, one JSON.

Configurations, all on the same checkpoint (a random one with bark-small's shapes by default),
texts, mixed voices and semantic length:
  (1) transformers BarkModel.generate one request at a time, float32;
  (2) transformers with static batches, in the dtype the measured GEMM peak favours;
  (3) bark-serve's engines in one process at each --engine-batches;
  (4) the served app (Ray Serve, HTTP streaming) at each --concurrency;
  (5) whole-dataset paths: `bark-serve dataset` (Ray Data) and one /v1/batches job (bench/offline_runs.py).
It also measures the GEMM peak of every dtype, so each stage's achieved FLOP/s is a fraction of a
peak taken on the same machine in the same run.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark transformers vs bark-serve (engines and served); prints JSON",
                       description="Measure, on one random checkpoint, transformers' BarkModel.generate (one at a "
                                   "time and in static batches), bark-serve's engines in one process and the "
                                   "served app over HTTP. Prints one JSON report on stdout (progress on stderr).")
    p.add_argument("--model", help="checkpoint directory (default: a random one of --size, made once and cached)")
    p.add_argument("--size", default="small", choices=["tiny", "small", "large"],
                   help="shapes of the random checkpoint made when --model is not given (default small)")
    p.add_argument("--semantic-tokens", type=int, default=32, help="semantic tokens per request (49.9 per second)")
    p.add_argument("--hf-requests", type=int, default=4, help="requests for the transformers baselines")
    p.add_argument("--hf-batches", default="4,16", help="static batch sizes tried for baseline (2)")
    p.add_argument("--engine-batches", default="1,4,16",
                   help="comma list of batch sizes for the in-process engines, configuration (3)")
    p.add_argument("--engine-requests", type=int, default=16,
                   help="requests per engine batch size (at least the batch size)")
    p.add_argument("--concurrency", default="1,4,16,32",
                   help="comma list of client concurrency levels for the served app, configuration (4)")
    p.add_argument("--served-requests", type=int, help="requests per concurrency level (default: max(4, level))")
    p.add_argument("--stage-threads", default="",
                   help="torch threads per stage replica of the served app, e.g. semantic=1,coarse=2,fine=2,codec=1 "
                        "(default: the profile's)")
    p.add_argument("--dtype", default="auto", help="dtype of (2)-(4); auto: the faster GEMM peak of this machine")
    p.add_argument("--offline-requests", type=int, default=16,
                   help="items of the dataset and /v1/batches runs, configuration (5)")
    p.add_argument("--skip", default="", help="comma list of hf,engines,served,offline")
    p.add_argument("--gemm-seconds", type=float, default=2.0,
                   help="seconds spent measuring each dtype's GEMM peak (default 2)")
    p.add_argument("--out", help="also write the JSON here")
    p.set_defaults(func=bench)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _checkpoint(args) -> str:
    if args.model:
        return args.model
    from bark_serve.stages.checkpoint import make_checkpoint

    path = Path(os.environ.get("BARK_BENCH_CACHE", Path.home() / ".cache" / "bark-serve")) / f"bench-{args.size}"
    if not (path / "model.safetensors").exists():
        _log(f"writing a random {args.size} checkpoint to {path}")
        make_checkpoint(path, args.size, seed=0, eos=False)  # full length: every request makes the same audio
    return str(path)


def bench(args) -> int:
    """Everything but the JSON goes to stderr (Ray prints on stdout), so stdout parses as JSON."""
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):
        report = _bench(args)
    text = json.dumps(report, indent=2)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def _bench(args) -> dict:
    import torch

    from .engine_runs import engines
    from .gemm import gemm_peaks
    from .hf_runs import hf_batched, hf_sequential
    from .served_runs import ServedApp, served
    from .workload import Workload

    skip = set(args.skip.split(","))
    model = _checkpoint(args)
    work = Workload(semantic_tokens=args.semantic_tokens)
    _log("measuring GEMM peaks")
    peaks = gemm_peaks("cpu", seconds=args.gemm_seconds)
    dtype = args.dtype if args.dtype != "auto" else max(peaks, key=peaks.get)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "threads": torch.get_num_threads()},
              "gemm_peak_tflops": {k: round(v, 4) for k, v in peaks.items()}, "dtype": dtype,
              "workload": {"model": model, "semantic_tokens": args.semantic_tokens,
                           "voices": list(work.voices)}, "runs": []}
    runs = _Runs(report, args.out)
    if "hf" not in skip:
        _log("(1) transformers, one at a time, float32")
        runs.append(hf_sequential(model, work, args.hf_requests).summary())
        for b in _ints(args.hf_batches):
            _log(f"(2) transformers, static batch {b}, {dtype}")
            runs.append(hf_batched(model, work, max(b, args.hf_requests), b, dtype).summary())
    if "engines" not in skip:
        for b in _ints(args.engine_batches):
            _log(f"(3) engines in process, batch {b}, {dtype}")
            runs.append(engines(model, work, max(args.engine_requests, b), b, dtype, peaks).summary())
    if "served" not in skip:
        levels = _ints(args.concurrency)
        _log("(4) starting the served app")
        threads = {k: int(v) for k, v in (kv.split("=") for kv in args.stage_threads.split(",") if kv)}
        app = ServedApp(model, dtype, max_batch=max(levels), stage_threads=threads)
        try:
            for c in levels:
                n = args.served_requests or max(4, c)
                _log(f"(4) served, concurrency {c}, {n} requests")
                runs.append(served(app, work, c, n, peaks).summary())
        finally:
            app.close()
    if "offline" not in skip:
        from .offline_runs import batches_run, dataset_run

        batch = max(_ints(args.engine_batches))
        for name, fn in (("dataset", dataset_run), ("/v1/batches", batches_run)):
            _log(f"(5) {name}, {args.offline_requests} items, batch {batch}")
            runs.append(fn(model, work, args.offline_requests, dtype, batch).summary())
    report["ratios"] = _ratios(runs)
    return report


class _Runs(list):
    """The runs so far; each one is saved at once, so a crash late in a long benchmark loses nothing."""

    def __init__(self, report: dict, out: str | None):
        super().__init__()
        self.report, self.out = report, out
        report["runs"] = self

    def append(self, run: dict) -> None:
        super().append(run)
        _log(json.dumps(run))
        if self.out:
            self.report["ratios"] = _ratios(self)
            Path(self.out).write_text(json.dumps(self.report, indent=2) + "\n")


def _ratios(runs: list[dict]) -> dict:
    tput = {r["name"]: r["throughput_audio_s_per_s"] for r in runs if r.get("throughput_audio_s_per_s")}
    seq = next((v for k, v in tput.items() if k.startswith("transformers_sequential")), None)
    batched = max((v for k, v in tput.items() if k.startswith("transformers_batch")), default=None)
    out = {}
    for name, value in tput.items():
        if not name.startswith("transformers"):
            if seq:
                out[f"{name}_vs_transformers_sequential"] = round(value / seq, 2)
            if batched:
                out[f"{name}_vs_transformers_best_batch"] = round(value / batched, 2)
    return out

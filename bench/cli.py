"""``bark-serve bench``: transformers vs bark-serve's engines vs the served app, one run, one JSON.

Configurations, all on the same checkpoint (a random one with bark-small's shapes by default) and
the same seeded workload (bench/workload.py: a mix of request lengths, one in eight a long text):
  (1) transformers BarkModel.generate one segment at a time, float32;
  (2) transformers with static batches, in the dtype the measured GEMM peak favours;
  (3) bark-serve's engines in one process at each --engine-batches;
  (4) the served app (Ray Serve, HTTP streaming) in closed loop at each --concurrency, then under
      open-loop Poisson arrivals at a sweep of rates around the measured saturation rate.
  (5) whole-dataset paths: `bark-serve dataset` (Ray Data) and one /v1/batches job (bench/offline_runs.py).
It also measures the GEMM peak of every dtype, so achieved FLOP/s (per stage, and per request
against the roofline) are fractions of a peak taken on the same machine in the same run, and it
reports the goodput under a time-to-first-audio SLO and the issue's floors (``floors``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from bark_serve.stages.constants import STAGES


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark transformers vs bark-serve (engines and served); prints JSON",
                       description="Measure, on one random checkpoint and one seeded workload, transformers' "
                                   "BarkModel.generate (one at a time and in static batches), bark-serve's engines in "
                                   "one process and the served app over HTTP (closed loop at given concurrency "
                                   "levels, open-loop Poisson arrivals at a sweep of rates). Prints one JSON report "
                                   "on stdout (progress on stderr).")
    p.add_argument("--model", help="checkpoint directory (default: a random one of --size, made once and cached)")
    p.add_argument("--size", default="small", choices=["tiny", "small", "large"],
                   help="shapes of the random checkpoint made when --model is not given (default small)")
    p.add_argument("--mix", default="bark-mix-v1",
                   help="request length mix (bench/workload.py): bark-mix-v1 (3-15 s, one in eight a long text), "
                        "ci-tiny, or fixed-N (every request one sentence of N semantic tokens)")
    p.add_argument("--semantic-tokens", type=int, help="shorthand for --mix fixed-N")
    p.add_argument("--seed", type=int, default=0, help="workload and arrival seed (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--hf-requests", type=int, default=4, help="requests for the transformers baselines")
    p.add_argument("--hf-batches", default="4,16", help="static batch sizes tried for baseline (2)")
    p.add_argument("--hf-orders", type=_hf_orders, default="given",
                   help="comma list of the segment orders of baseline (2): given (workload order) and/or sorted "
                        "(by length, longest first: batches of like lengths; named ..._sorted). The best of all "
                        "static batches is the baseline of the ratios and floors (default given)")
    p.add_argument("--engine-batches", default="16",
                   help="comma list of batch sizes for the in-process engines, configuration (3)")
    p.add_argument("--engine-requests", type=per_batch, default={"*": 16},
                   help="requests per engine batch size (at least the batch size): a number, and/or per batch "
                        "size, e.g. 1=2,16=16,64=64 (default 16)")
    p.add_argument("--engine-orders", type=_engine_orders, default="longest",
                   help="comma list of the engines' admission orders, each a configuration of (3): longest "
                        "(longest requests first, as StageEngine.run does) and/or given (workload order; named "
                        "..._given) (default longest)")
    p.add_argument("--cuda-graphs", default="auto",
                   help="comma list of the engines' cuda_graphs settings to run, each a configuration of (3) and "
                        "of --decode-steps: auto, on, off (default auto)")
    p.add_argument("--decode-steps", type=int, default=0,
                   help="also time this many decode-only steps of each stage at each --engine-batches and "
                        "--cuda-graphs setting, wall clock against the profiler's GPU time (the report's "
                        "decode_steps block; 0: skip)")
    p.add_argument("--decode-stages", type=_decode_stages, default="semantic,coarse,fine",
                   help="the stages --decode-steps measures (default all three; a CPU's fine pass takes seconds)")
    p.add_argument("--concurrency", default="1,4,16",
                   help="closed-loop client concurrency levels for the served app, configuration (4); the highest "
                        "sets the saturation rate of the Poisson sweep")
    p.add_argument("--served-requests", type=per_batch, default={"*": 16},
                   help="requests per served run: a number, and/or per closed-loop concurrency, e.g. 16,1=4 "
                        "(at least the concurrency; the Poisson runs take the bare number, default 16)")
    p.add_argument("--rate-fractions", default="0.3,0.5,0.7,0.9",
                   help="open-loop Poisson rates as fractions of the measured saturation throughput in audio-s/s, "
                        "run in this order ('' for none)")
    p.add_argument("--rates", default="", help="open-loop Poisson rates in requests/s (instead of --rate-fractions)")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="seconds the served runs may take in all: a run expected to end later is skipped and "
                        "listed under the report's skipped (a device call with a hard limit; default none)")
    p.add_argument("--ttfa-slo", type=float, default=3.0,
                   help="goodput SLO: time-to-first-audio p95 within this multiple of a lone request's (default 3)")
    p.add_argument("--max-batch", type=per_stage, default={},
                   help="stage max_batch of the served app: a number for every stage and/or per-stage values, "
                        "e.g. 16,fine=1 (default: the highest concurrency level)")
    p.add_argument("--stage-threads", type=stage_threads, default={},
                   help="torch threads per stage replica of the served app: a number, auto (every core each) or "
                        "shared (the cores leased per step among the replicas), for all stages and/or per stage, "
                        "e.g. semantic=1,coarse=2,fine=2,codec=1 (default: the profile's; local-cpu: shared)")
    p.add_argument("--profile", default=None, help="config profile of the served app (default local-cpu, or "
                                                   "single-gpu with --device cuda)")
    p.add_argument("--dtype", default="auto",
                   help="dtype of (2)-(4); auto: as the engines choose, from this run's GEMM peaks (bfloat16 on a GPU "
                        "with native bfloat16, else the fastest)")
    p.add_argument("--offline-requests", type=int, default=16,
                   help="items of the dataset and /v1/batches runs, configuration (5)")
    p.add_argument("--skip", default="", help="comma list of hf,engines,served,offline")
    p.add_argument("--reuse-runs", metavar="JSON",
                   help="take the transformers and engine runs of this earlier report (same machine, device, "
                        "dtype and workload, e.g. written minutes before in the same device call) into this one, "
                        "marked reused_from, for the ratios and floors; with --skip hf,engines it saves their time")
    p.add_argument("--gemm-seconds", type=float, default=2.0,
                   help="seconds spent measuring each dtype's GEMM peak (default 2)")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--plots", help="also draw the report's PNG plots into this folder (matplotlib)")
    p.add_argument("--replot", metavar="JSON", help="only draw --plots from a saved report; measure nothing")
    p.set_defaults(func=bench)


def _decode_stages(text: str) -> list[str]:
    """--decode-stages: a comma list of the stages that have decode steps (every one but the codec)."""
    return _names(text, tuple(s for s in STAGES if s != "codec"))


def _names(text: str, allowed: tuple[str, ...]) -> list[str]:
    """A comma list of some of ``allowed`` (argparse type: anything else is a usage error, exit 2)."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names or any(n not in allowed for n in names):
        raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (got {text!r})")
    return names


def _hf_orders(text: str) -> list[str]:
    from .hf_runs import HF_ORDERS

    return _names(text, HF_ORDERS)


def _engine_orders(text: str) -> list[str]:
    from .engine_runs import ENGINE_ORDERS

    return _names(text, ENGINE_ORDERS)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _checkpoint(args) -> str:
    if args.model:
        return args.model
    from bark_serve.stages.random_checkpoint import CHECKPOINT_REVISION, make_checkpoint

    cache = Path(os.environ.get("BARK_BENCH_CACHE", Path.home() / ".cache" / "bark-serve"))
    path = cache / f"bench-{args.size}-r{CHECKPOINT_REVISION}"
    if not (path / "model.safetensors").exists():
        _log(f"writing a random {args.size} checkpoint to {path}")
        make_checkpoint(path, args.size, seed=0, eos=False)  # full length: every request makes the same audio
    return str(path)


def bench(args) -> int:
    """Everything but the JSON goes to stderr (Ray prints on stdout), so stdout parses as JSON."""
    import contextlib

    if args.replot:
        if not args.plots:
            raise SystemExit("--replot needs --plots DIR")
        from .plots import draw_all

        for path in draw_all(json.loads(Path(args.replot).read_text()), args.plots):
            _log(f"wrote {path}")
        return 0
    with contextlib.redirect_stdout(sys.stderr):
        report = _bench(args)
    text = json.dumps(report, indent=2)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.plots:
        from .plots import draw_all

        for path in draw_all(report, args.plots):
            _log(f"wrote {path}")
    return 0


def _bench(args) -> dict:
    import torch

    from bark_serve.stages.engine import resolve_device

    from .engine_runs import engines
    from .gemm import gemm_peaks
    from .hf_runs import hf_batched, hf_sequential
    from .workload import Workload

    skip = set(args.skip.split(","))
    model = _checkpoint(args)
    device = resolve_device(args.device)
    work = Workload(mix=f"fixed-{args.semantic_tokens}" if args.semantic_tokens else args.mix, seed=args.seed)
    _log(f"measuring GEMM peaks on {device}")
    peaks = gemm_peaks(device, size=8192 if device.startswith("cuda") else 2048, seconds=args.gemm_seconds)
    dtype = args.dtype if args.dtype != "auto" else auto_dtype(peaks, device)
    report: dict[str, Any] = {"machine": _machine(device, torch),
              "gemm_peak_tflops": {k: round(v, 4) for k, v in peaks.items()}, "dtype": dtype, "device": device,
              "workload": {"model": model, **work.describe()}, "runs": []}
    runs = _Runs(report, args.out, args.ttfa_slo)
    if args.reuse_runs:
        for run in _reusable_runs(args.reuse_runs, report):
            runs.append(run)
    graph_settings = _graph_settings(args.cuda_graphs)
    # Each configuration is attempted on its own: one that fails (a capture error on a new GPU, say) is
    # recorded under "failures" with its error and the others still run, so one call keeps what it can.
    if "engines" not in skip:
        for setting in graph_settings:
            for b in _ints(args.engine_batches):
                n = max(args.engine_requests.get(b, args.engine_requests.get("*", 16)), b)
                for order in args.engine_orders:
                    admitted = "longest first" if order == "longest" else f"in {order} order"
                    _log(f"(3) engines in process, batch {b}, {dtype}, cuda_graphs {setting}, {n} requests, "
                         f"admitted {admitted}")
                    runs.attempt(f"engines batch {b} cuda_graphs {setting} {order}",
                                 engines, model, work, n, b, dtype, peaks, device, setting, order)
    # transformers before the decode-step profile: the baselines every floor needs come first
    if "hf" not in skip:
        _log("(1) transformers, one at a time, float32")
        runs.attempt("transformers sequential", hf_sequential, model, work, args.hf_requests, device=device)
        for b in _ints(args.hf_batches):
            for order in args.hf_orders:
                _log(f"(2) transformers, static batch {b}, {dtype}, segments in {order} order")
                runs.attempt(f"transformers batch {b} {order}", hf_batched,
                             model, work, max(b, args.hf_requests), b, dtype, device, order)
    if args.decode_steps:
        from .decode_steps import measure

        _log(f"decode steps: {args.decode_steps} per stage, batch and cuda_graphs setting")
        rows = report.setdefault("decode_steps", [])

        def keep(row: dict) -> None:  # saved row by row: a run cut short keeps the rows it measured
            rows.append(row)
            runs.save()

        measure(model, _ints(args.engine_batches), graph_settings, dtype, device, args.decode_steps,
                args.decode_stages, log=_log, on_row=keep)
    if "served" not in skip:
        runs.attempt("served", _served, args, model, work, dtype, device, peaks, runs, report)
    if "offline" not in skip:
        from .offline_runs import batches_run, dataset_run

        batch = max(_ints(args.engine_batches))
        for name, fn in (("dataset", dataset_run), ("/v1/batches", batches_run)):
            _log(f"(5) {name}, {args.offline_requests} items, batch {batch}")
            runs.attempt(name, fn, model, work, args.offline_requests, dtype, batch)
    report["ratios"] = _ratios(runs)
    report["floors"] = _floors(report)
    return report


def auto_dtype(peaks: dict[str, float], device: str) -> str:
    """``--dtype auto``: the engines' rule (stages/dtype_probe.py: among the device's candidates, bfloat16 on a
    GPU that runs it natively unless float32 measures over 10% faster, else the fastest), applied to the
    bench's own, larger GEMM peaks."""
    from bark_serve.stages.dtype_probe import candidates, pick, preferred

    return pick({k: v for k, v in peaks.items() if k in candidates(device)}, preferred(device))


def _reusable_runs(path: str, report: dict) -> list[dict]:
    """The transformers and engine runs of the report at ``path``, checked to come from the same machine,
    device, dtype and workload as ``report`` (a mismatch is a usage error: exit 2 with the difference)."""
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested past the parser's depth
        raise _UsageError(f"--reuse-runs {path}: cannot read a bench report ({type(exc).__name__})") from None
    if not isinstance(earlier, dict) or not isinstance(earlier.get("runs"), list):
        raise _UsageError(f"--reuse-runs {path}: not a bench report (no runs list)")
    for key, want in (("device", report["device"]), ("dtype", report["dtype"]), ("workload", report["workload"]),
                      ("gpu", report["machine"].get("gpu")), ("cpu_model", report["machine"].get("cpu_model"))):
        have = earlier.get(key) if key in ("device", "dtype", "workload") else earlier.get("machine", {}).get(key)
        if have != want:
            raise _UsageError(f"--reuse-runs {path}: its {key} is {have!r}, this run's is {want!r}")
    runs = [r for r in earlier["runs"]
            if isinstance(r, dict) and str(r.get("name", "")).startswith(("transformers_", "engines_"))]
    for r in runs:  # what the ratios and floors read of each
        tput = r.get("throughput_audio_s_per_s")
        if not isinstance(tput, (int, float)) or isinstance(tput, bool) or not math.isfinite(tput) or tput <= 0:
            raise _UsageError(f"--reuse-runs {path}: run {r['name']!r} has no positive throughput_audio_s_per_s")
    return [{**r, "reused_from": path} for r in runs]


class _UsageError(SystemExit):
    """A bad argument found after parsing: the message on stderr and exit status 2."""

    def __init__(self, message: str):
        print(f"bark-serve bench: error: {message}", file=sys.stderr)
        super().__init__(2)


def _machine(device: str, torch) -> dict:
    out = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
           "threads": torch.get_num_threads()}
    try:
        out["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def _graph_settings(text: str) -> list[str]:
    settings = [x.strip() for x in text.split(",") if x.strip()] or ["auto"]
    for x in settings:
        if x not in ("auto", "on", "off"):
            raise SystemExit(f"--cuda-graphs: {x!r} is not auto, on or off")
    return settings


def per_batch(spec: str) -> dict:
    """'2' -> {"*": 2}; '1=2,16=16' -> {1: 2, 16: 16} (argparse type: a bad value is a usage error, exit 2)."""
    out: dict = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        key, _, value = part.rpartition("=")
        try:
            out[int(key) if key.strip() else "*"] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: expected N or BATCH=N with whole numbers") from None
        if min(out.values()) < 1:
            raise argparse.ArgumentTypeError(f"{part!r}: values must be at least 1")
    return out


def stage_threads(spec: str) -> dict:
    return per_stage(spec, ("auto", "shared"))


def per_stage(spec: str, words: tuple[str, ...] = ()) -> dict:
    """'16,fine=1' -> {"*": 16, "fine": 1} (argparse type: a bad value is a usage error, exit 2); ``words``
    are the other values allowed besides whole numbers."""
    out: dict = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        stage, _, value = part.rpartition("=")
        stage = stage.strip() or "*"
        if stage != "*" and stage not in STAGES:
            raise argparse.ArgumentTypeError(f"unknown stage {stage!r}: choose {', '.join(STAGES)}")
        if value.strip() in words:
            out[stage] = value.strip()
            continue
        try:
            out[stage] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value.strip()!r} is not a whole number"
                                             + (f" nor one of {', '.join(words)}" if words else "")) from None
        if out[stage] < 1:
            raise argparse.ArgumentTypeError(f"{part!r}: values must be at least 1")
    return out


def _for_stages(values: dict, default: int | None) -> dict:
    """Per stage: its own value, else the bare number, else ``default`` (stages with no value are left out)."""
    fallback = values.get("*", default)
    return {s: v for s in STAGES if (v := values.get(s, fallback)) is not None}


def _served(args, model, work, dtype, device, peaks, runs, report) -> None:
    """The served app's runs, in the order the floors need them (a run cut short loses the least): the lone
    closed loop, the saturating one, the Poisson rates as given, then the other closed-loop levels. With
    ``--deadline-s``, a run expected to end past the deadline is skipped (listed under ``skipped``)."""
    from .served_runs import ServedApp, served_closed, served_poisson

    deadline = Deadline(args.deadline_s, report.setdefault("skipped", []), runs.save)
    levels = _ints(args.concurrency)
    counts = args.served_requests
    n = counts.get("*", 16)
    _log("(4) starting the served app")
    threads = _for_stages(args.stage_threads, None)
    profile = args.profile or ("single-gpu" if device.startswith("cuda") else "local-cpu")
    app = ServedApp(model, dtype, max_batch=_for_stages(args.max_batch, max(levels)), stage_threads=threads,
                    device=device, profile=profile)
    try:
        report["served_app"] = app.describe()
        runs.save()
        timelines = report.setdefault("timelines", {})
        fits = deadline.fits

        def capacity() -> float | None:  # audio-s/s the saturating closed loop sustained, once it ran
            closed = [r for r in runs if r.get("mode") == "closed" and r.get("concurrency") == max(levels)]
            return saturation_figures(closed[-1])[0] if closed else None

        def closed_run(c: int) -> None:
            k = max(counts.get(c, n), c)
            audio = sum(r.audio_s for r in work.requests(k))
            cap = capacity()  # below saturation a GPU step costs about the same at c rows as at max(levels):
            expected = audio / (cap * c / max(levels)) if cap and c < max(levels) else None  # throughput ~ c
            if not fits(f"closed loop at concurrency {c}", expected):
                return
            _log(f"(4) served, closed loop, concurrency {c}, {k} requests")
            run = served_closed(app, work, c, k, peaks)
            timelines[run.name] = run.timeline
            runs.append(run.summary())

        order = sorted(set(levels))
        for c in [order[0], order[-1]] if len(order) > 1 else order:
            closed_run(c)
        best = [r for r in runs if r.get("mode") == "closed"]
        if best:
            # the Poisson rates are fractions of the capacity in audio-s/s, turned into requests/s with the mean
            # audio of the requests the Poisson runs send (the saturating run's requests may be longer or shorter)
            sat_audio, sat_rps, measure = max((saturation_figures(r) for r in best), key=lambda f: f[0])
            poisson_reqs = work.requests(n)
            mean_audio = sum(r.audio_s for r in poisson_reqs) / len(poisson_reqs)
            report["saturation_rps"] = sat_rps
            report["saturation_audio_s_per_s"] = sat_audio
            report["saturation_measure"] = measure
            fractions = [float(x) for x in args.rate_fractions.split(",") if x.strip()]
            rates: list[tuple[float, float | None]]  # (requests/s, fraction of the capacity when asked as one)
            if args.rates:
                rates = [(float(x), None) for x in args.rates.split(",") if x.strip()]
            else:
                rates = [(round(f * sat_audio / mean_audio, 4), f) for f in fractions]
            lone = [r for r in best if r.get("concurrency") == 1]
            # one stream's audio-s/s: alone if measured, else its share at saturation (slower: a safe guess)
            stream = lone[0]["throughput_audio_s_per_s"] if lone else sat_audio / max(levels)
            for rate, fraction in rates:
                # about n/rate seconds of arrivals, then the last ones finish (at most one more run of the longest)
                expected = n / rate + max(r.audio_s for r in poisson_reqs) / max(stream, 1e-9)
                if not fits(f"Poisson at {rate:g} requests/s", expected):
                    continue
                _log(f"(4) served, Poisson arrivals at {rate:g} requests/s, {n} requests")
                run = served_poisson(app, work, rate, n, peaks, seed=args.seed)
                summary = run.summary()
                summary["offered_audio_s_per_s"] = round(rate * mean_audio, 4)
                summary["rate_fraction_of_saturation"] = (fraction if fraction is not None
                                                          else round(rate * mean_audio / sat_audio, 3))
                timelines[summary["name"]] = run.timeline
                runs.append(summary)
        for c in order[1:-1]:
            closed_run(c)
        report["slo"] = _slo(runs, args.ttfa_slo)
    finally:
        app.close()


class Deadline:
    """``--deadline-s``: seconds from now that the served runs may take. ``fits(name, expected_s)`` says
    whether a run expected to take ``expected_s`` ends in time; one that does not is logged and listed in
    ``skipped`` (then ``on_skip()``). No deadline, or no estimate (None), always fits."""

    def __init__(self, seconds: float | None, skipped: list, on_skip=lambda: None, clock=None):
        self.clock = clock or time.monotonic
        self.seconds, self.skipped, self.on_skip, self.start = seconds, skipped, on_skip, self.clock()

    def fits(self, name: str, expected_s: float | None) -> bool:
        if self.seconds is None or expected_s is None:
            return True
        left = self.seconds - (self.clock() - self.start)
        if expected_s <= left:
            return True
        _log(f"(4) skipping {name}: expected to take about {expected_s:.0f} s, {left:.0f} s left "
             "before --deadline-s")
        self.skipped.append({"run": name, "expected_s": round(expected_s, 1), "left_s": round(left, 1)})
        self.on_skip()
        return False


def _slo(runs: list[dict], multiple: float) -> dict:
    """Goodput: the highest Poisson rate whose TTFA p95 stays within ``multiple`` x a lone request's TTFA p95."""
    lone = next((r for r in runs if r.get("mode") == "closed" and r.get("concurrency") == 1), None)
    if lone is None or "ttfa_p95_s" not in lone:
        return {"note": "no concurrency-1 run: no lone TTFA to compare with"}
    bound = multiple * lone["ttfa_p95_s"]
    rows = [{"rate_rps": r["rate_rps"], "fraction": r.get("rate_fraction_of_saturation"),
             "ttfa_p95_s": r.get("ttfa_p95_s"), "ttfa_p95_vs_lone": round(r["ttfa_p95_s"] / lone["ttfa_p95_s"], 2),
             "meets_slo": r["ttfa_p95_s"] <= bound}
            for r in runs if r.get("mode") == "poisson" and "ttfa_p95_s" in r]
    good = [row["rate_rps"] for row in rows if row["meets_slo"]]
    return {"lone_ttfa_p50_s": lone["ttfa_p50_s"], "lone_ttfa_p95_s": lone["ttfa_p95_s"],
            "ttfa_p95_bound_s": round(bound, 3), "rates": rows, "goodput_rps": max(good) if good else 0.0}


def _floors(report: dict) -> dict:
    """The issue's three floors, from this run alone."""
    runs = report["runs"]
    closed = [r for r in runs if r.get("mode") == "closed"]
    out: dict = {}
    best_hf = max((r["throughput_audio_s_per_s"] for r in runs if r["name"].startswith("transformers_batch")),
                  default=None)
    engine_runs = [r for r in runs if r["name"].startswith("engines_")]
    if engine_runs and best_hf:
        best = max(engine_runs, key=lambda r: r["throughput_audio_s_per_s"])
        out["engines_best"] = best["name"]
        out["engines_vs_transformers_best_batch"] = round(best["throughput_audio_s_per_s"] / best_hf, 2)
        by_order: dict[str, float] = {}  # the best static batch of each segment order (--hf-orders)
        for r in runs:
            if r["name"].startswith("transformers_batch"):
                order = r.get("order", "given")
                by_order[order] = max(by_order.get(order, 0.0), r["throughput_audio_s_per_s"])
        if len(by_order) > 1:
            out["engines_vs_transformers_best_batch_by_order"] = {
                o: round(best["throughput_audio_s_per_s"] / v, 2) for o, v in sorted(by_order.items())}
        # issue 21's floor names a batch (64): every engine run at the largest batch measured, by name
        top_batch = max((r.get("batch") or 0 for r in engine_runs), default=0)
        out[f"engines_batch{top_batch}_vs_transformers_best_batch"] = {
            r["name"]: round(r["throughput_audio_s_per_s"] / best_hf, 2)
            for r in engine_runs if r.get("batch") == top_batch}
    steps = [r for r in report.get("decode_steps") or [] if "error" not in r]
    top = max((r["batch"] for r in steps), default=None)
    # only rows whose every measured step replayed a graph (a failed capture runs those steps eagerly)
    graphed = {r["stage"]: r["wall_over_gpu"] for r in steps if r["cuda_graphs"] and r["batch"] == top}
    if graphed:
        out[f"decode_wall_over_gpu_batch{top}_graphs"] = graphed
    if closed:
        # makespan against makespan: the whole run (it ends with its longest request, as the engine and
        # transformers runs end with theirs); the steady figures (Little's law) beside it
        top = max(closed, key=lambda r: r["throughput_audio_s_per_s"])
        out["served_at_saturation"] = top["name"]
        out.update(_served_ratios(top["throughput_audio_s_per_s"], top, runs, best_hf, engine_runs))
        steady = [r for r in closed if r.get("steady")]
        if steady:
            best = max(steady, key=lambda r: r["steady"]["throughput_audio_s_per_s"])
            out["served_steady"] = {"run": best["name"], **_served_ratios(
                best["steady"]["throughput_audio_s_per_s"], best, runs, best_hf, engine_runs)}
    rates = (report.get("slo") or {}).get("rates") or []
    if rates:
        near = min(rates, key=lambda r: abs((r["fraction"] or 0) - 0.7))
        out["ttfa_p95_vs_lone_near_70pct"] = {"fraction": near["fraction"], "ratio": near["ttfa_p95_vs_lone"]}
    return out


def _served_ratios(served: float, run: dict, runs: list[dict], best_hf: float | None, engine_runs: list[dict]) -> dict:
    """A served throughput (audio-s/s) of closed-loop ``run`` against the roofline, transformers and the engines."""
    out: dict = {"served_audio_s_per_s": served}
    limit = run.get("roofline", {}).get("roofline_audio_s_per_s")
    out["served_frac_of_roofline"] = round(served / limit, 3) if limit else None
    if best_hf:
        out["served_vs_transformers_best_batch"] = round(served / best_hf, 2)
    seq = next((r["throughput_audio_s_per_s"] for r in runs if r["name"].startswith("transformers_sequential")), None)
    if seq:
        out["served_vs_transformers_sequential"] = round(served / seq, 1)
    # the Ray hops' cost: served at saturation against the engines in one process at the served batch size
    batch = max((run.get("max_batch") or {}).values(), default=None)
    same = [r for r in engine_runs if r.get("batch") == batch]
    if same:
        best_same = max(same, key=lambda r: r["throughput_audio_s_per_s"])
        out["served_vs_engines_same_batch"] = {
            "engines": best_same["name"], "ratio": round(served / best_same["throughput_audio_s_per_s"], 3),
            "served_max_batch": run.get("max_batch")}
    return out


def saturation_figures(run: dict) -> tuple[float, float, str]:
    """A closed-loop run's (audio-s/s, requests/s, measure): its steady figures when it had them (more
    requests than clients: served_runs.steady_window), else the whole run's, which ends with the longest
    request alone and so understates what the server sustains."""
    steady = run.get("steady")
    if steady:
        return steady["throughput_audio_s_per_s"], steady["requests_per_s"], "steady"
    return run["throughput_audio_s_per_s"], run["requests_per_s"], "whole run"


class _Runs(list):
    """The runs so far; each one is saved at once, so a crash late in a long benchmark loses nothing."""

    def __init__(self, report: dict, out: str | None, ttfa_slo: float = 3.0):
        super().__init__()
        self.report, self.out, self.ttfa_slo = report, out, ttfa_slo
        report["runs"] = self

    def append(self, run: dict) -> None:
        super().append(run)
        _log(json.dumps(run))
        self.save()

    def attempt(self, what: str, fn, *args, **kwargs) -> None:
        """``fn(*args, **kwargs)``: a Run, whose summary is appended, or None; an exception is logged with its traceback
        and kept in the report's ``failures`` instead of ending the benchmark."""
        import traceback

        try:
            run = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure of one configuration: record it and go on
            _log(f"FAILED {what}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            self.report.setdefault("failures", []).append({"what": what, "error": f"{type(exc).__name__}: {exc}"})
            self.save()
            return
        if run is not None:
            self.append(run.summary())

    def save(self) -> None:
        """The report as it stands, ratios, SLO and floors included: a run cut short keeps its summaries."""
        if self.out:
            self.report["ratios"] = _ratios(self)
            if any(r.get("mode") == "poisson" for r in self):
                self.report["slo"] = _slo(self, self.ttfa_slo)
            self.report["floors"] = _floors(self.report)
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


def main(argv: list[str] | None = None) -> int:
    """``python -m bark_serve.bench.cli ARGS``: the bench alone, on a host without the CLI's other needs."""
    parser = argparse.ArgumentParser(prog="bark-serve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

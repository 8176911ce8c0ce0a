"""(4) The served app: Ray Serve on this machine, HTTP clients in closed loop or open-loop Poisson arrivals.

Each request streams msgpack chunks, so the client sees its own time to first audio, and every
chunk carries its segment's per-stage timestamps (kept for the timeline plot). Stage replicas
report their engine's work counters and peak memory through their ``stats`` method; the
benchmark takes the difference over each run.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import msgpack

from bark_serve.cluster.ports import free_port
from bark_serve.stages.constants import STAGES

from .workload import (
    SEGMENT_TOKENS,
    BenchRequest,
    Run,
    Workload,
    counted_flops,
    poisson_arrivals,
    roofline,
    stage_efficiency,
)


def served_config(model_dir: str, dtype: str, max_batch: dict[str, int], profile: str = "local-cpu",
                  stage_threads: dict[str, int] | None = None, device: str | None = None, port: int = 8000):
    """The bench's config of the served app: ``profile`` with the bench's dtype, batches and threads, room for
    every request the bench sends, and on ``device="cpu"`` no GPU share anywhere (the voice encoder's too: a
    share on a host without GPUs is never placed)."""
    from bark_serve.serving.config import load_config

    stage_over = {"dtype": dtype, "max_ongoing_requests": 1024,
                  "max_queued_requests": 4096, **({"device": device} if device else {})}
    # Every sentence of the workload is one segment (workload.SEGMENT_TOKENS), so all
    # configurations see the same segments; the first-segment cut would change that.
    overrides: dict = {"model": model_dir, "http_host": "127.0.0.1", "http_port": port,
                       "orchestrator": {"num_cpus": 0.1, "max_active_requests": 1024, "max_ongoing_requests": 2048,
                                        "request_timeout_s": 7200, "segment_max_tokens": SEGMENT_TOKENS,
                                        "first_segment_max_tokens": None}}
    base = load_config(profile)
    for stage in STAGES:
        threads = (stage_threads or {}).get(stage, base.stage(stage).torch_threads)
        gpus = base.stage(stage).num_gpus if device != "cpu" else 0
        overrides[stage] = {**base.stage(stage).model_dump(), **stage_over, "num_cpus": 0.1,
                            "torch_threads": threads, "num_gpus": gpus,
                            "max_batch": max_batch.get(stage, base.stage(stage).max_batch)}
    if device == "cpu":  # an override replaces a whole block: the profile's pool and CPU share stay
        overrides["voice_cloning"] = {**base.voice_cloning.model_dump(), "num_gpus": 0, "device": "cpu"}
    return load_config(profile, overrides)


class ServedApp:
    """Ray + Serve with the bark app on this machine, started and stopped by the benchmark."""

    def __init__(self, model_dir: str, dtype: str, max_batch: dict[str, int], profile: str = "local-cpu",
                 stage_threads: dict[str, int] | None = None, device: str | None = None):
        import ray
        from ray import serve

        from bark_serve.serving.app import make_app
        from bark_serve.serving.config import DEPLOYMENT_NAMES
        from bark_serve.serving.serve_config import live_placement_problems, patient_proxy_start, pool_resources
        from bark_serve.serving.stage_server import resolve_threads

        self.port = free_port()
        self.cfg = served_config(model_dir, dtype, max_batch, profile, stage_threads, device, self.port)
        self.dtype = dtype
        self.threads = {s: resolve_threads(self.cfg.stage(s).torch_threads) for s in STAGES}
        self.thread_setting = {s: self.cfg.stage(s).torch_threads for s in STAGES}
        self.max_batch = {s: self.cfg.stage(s).max_batch for s in STAGES}
        patient_proxy_start()
        ray.init(address="local", resources=pool_resources(self.cfg), include_dashboard=False, log_to_driver=False)
        # serve.run waits forever for a replica Ray cannot place: say why and stop instead
        problems = live_placement_problems(self.cfg)
        if problems:
            ray.shutdown()
            raise SystemExit("bench: the served app cannot start on this machine: " + "; ".join(problems))
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        serve.run(make_app(self.cfg), name=self.cfg.app_name, route_prefix="/")
        self.url = f"http://127.0.0.1:{self.port}"
        self.handles = {s: serve.get_deployment_handle(DEPLOYMENT_NAMES[s], app_name=self.cfg.app_name)
                        for s in STAGES}
        # one unmeasured request through every stage: a device's lazy set-up (cuBLAS handles, the codec's
        # first kernels, which no graph capture warmed) falls on it, not on the lone run's first request
        self.warmup_s = _warm_up(self.url)

    def describe(self) -> dict:
        """What the runs were measured on, per stage: the config block it ran with and, from each replica,
        its device and memory, Ray placement (pool, GPU share, GPU ids), capacity and CUDA graph capture."""
        stats = self.stats()
        return {"warmup_request_s": self.warmup_s,
                "stages": {s: {"config": self.cfg.stage(s).model_dump(mode="json"),
                               **{k: stats[s].get(k) for k in ("device", "graphs", "capacity", "weight_bytes", "pid")}}
                           for s in STAGES}}

    def stats(self) -> dict[str, dict]:
        return {s: h.stats.remote().result() for s, h in self.handles.items()}

    def close(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


@dataclass
class Outcome:
    """One streamed request as its client saw it."""

    latency_s: float
    ttfa_s: float
    audio_s: float
    sent_at: float  # epoch seconds
    segments: list[dict] = field(default_factory=list)  # per chunk: stage -> queued_at/started/finished


def _warm_up(url: str) -> float | None:
    """Seconds one short request took (None if it failed: the runs will say why)."""
    try:
        return round(_stream(url, BenchRequest(("Warm up.",), None, 16)).latency_s, 3)
    except httpx.HTTPError as exc:
        print(f"[bench] warm-up request failed: {exc}", flush=True)
        return None


def _one(url: str, req: BenchRequest) -> Outcome | None:
    try:
        return _stream(url, req)
    except httpx.HTTPError as exc:
        print(f"[bench] request failed: {exc}", flush=True)
        return None


def _stream(url: str, req: BenchRequest) -> Outcome:
    body = {"text": req.text, "voice": req.voice, "stream": True, "temperature": 0, "min_eos_p": None,
            "max_semantic_tokens": req.semantic_tokens,
            # the model's raw samples, as the other configurations count them (no trim, crossfade or loudness)
            "trim_silence": False, "crossfade_ms": 0, "normalize_loudness": False}
    sent_at, t0 = time.time(), time.perf_counter()
    first, samples, segments = None, 0, []
    with httpx.stream("POST", url + "/v1/tts", content=msgpack.packb(body), timeout=7200,
                      headers={"Content-Type": "application/msgpack", "Accept": "application/msgpack"}) as r:
        r.raise_for_status()
        unpacker = msgpack.Unpacker()
        for data in r.iter_bytes():
            unpacker.feed(data)
            for msg in unpacker:
                if "audio" in msg:
                    first = first or time.perf_counter() - t0
                    samples += len(msg["audio"]) // 2
                    segments.append(msg.get("timings", {}))
                elif "error" in msg:
                    raise httpx.HTTPError(f"stream ended with {msg['error']}")
    return Outcome(time.perf_counter() - t0, first or 0.0, samples / 24_000, sent_at, segments)


def steady_window(outcomes: list[Outcome], concurrency: int) -> dict | None:
    """What a closed loop of ``concurrency`` clients sustains with every client's request in flight, by
    Little's law: requests/s = concurrency / mean latency, audio-s/s = concurrency x audio / summed latency.

    The whole run's figure (audio over wall time) is lower: the clients start together (the first wave
    fills the pipeline in lockstep) and run out of work one by one, and the run ends with its longest
    request alone (on bark-mix-v1 a long text, whose 4-8 segments follow one another, each continuing the
    previous one's voice, several times any other request). The law needs each latency to have been
    measured with the loop full, which holds for all but the last ``concurrency`` requests (those ran with
    fewer beside them, a little faster): so only a run with more requests than clients gets a figure, and
    the more requests per client, the closer. None for a run of one wave or with a failed request."""
    if len(outcomes) <= concurrency:
        return None
    latency = sum(o.latency_s for o in outcomes)
    if latency <= 0:
        return None
    audio = sum(o.audio_s for o in outcomes)
    return {"requests": len(outcomes), "concurrency": concurrency,
            "throughput_audio_s_per_s": round(concurrency * audio / latency, 4),
            "requests_per_s": round(concurrency * len(outcomes) / latency, 4)}


def hops(outcomes: list[Outcome]) -> dict:
    """Where a served segment's time goes between the stages' steps, from the timestamps each chunk carries
    (p50, p95 and mean in ms, and n):

    - ``queue_wait``: per stage, every segment's wait in that stage's queue (started - queued_at);
    - ``hop``: from one stage to the next, the next stage's queued_at - this one's finished, over each
      request's *first* segment: the Ray call, the orchestrator and the transfer, nothing else (a later
      segment of a long text also waits there for the previous segment's tokens, its voice history, and for
      a place in the request's window of segments in flight);
    - ``handoff``: the same over every segment, those waits included."""
    import numpy as np

    waits: dict[str, list[float]] = {s: [] for s in STAGES}
    pairs = [f"{a}->{b}" for a, b in zip(STAGES, STAGES[1:])]
    first: dict[str, list[float]] = {k: [] for k in pairs}
    every: dict[str, list[float]] = {k: [] for k in pairs}
    for o in outcomes:
        for i, seg in enumerate(o.segments):
            for s in STAGES:
                t = seg.get(s)
                if t:
                    waits[s].append(t["started"] - t["queued_at"])
            for key, (a, b) in zip(pairs, zip(STAGES, STAGES[1:])):
                if seg.get(a) and seg.get(b):
                    gap = seg[b]["queued_at"] - seg[a]["finished"]
                    every[key].append(gap)
                    if i == 0:
                        first[key].append(gap)

    def figures(values: list[float]) -> dict | None:
        if not values:
            return None
        ms = np.asarray(values) * 1e3
        return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
                "mean_ms": round(float(ms.mean()), 2), "n": len(values)}

    return {"queue_wait": {s: figures(v) for s, v in waits.items()},
            "hop": {k: figures(v) for k, v in first.items()},
            "handoff": {k: figures(v) for k, v in every.items()}}


def _measure(app: ServedApp, name: str, requests: list[BenchRequest], peaks: dict, submit,
             concurrency: int | None = None) -> Run:
    """Run ``submit(requests) -> outcomes`` and turn the outcomes and the replicas' counters into a Run
    (a closed loop's, given its ``concurrency``, also with its ``steady`` figures)."""
    before = app.stats()
    t0 = time.perf_counter()
    outcomes = submit(requests)
    wall = time.perf_counter() - t0
    ok = [o for o in outcomes if o is not None]
    run = Run(name, wall_s=wall, extra={"dtype": app.dtype, "torch_threads": app.threads,
                                        "torch_threads_setting": app.thread_setting, "max_batch": app.max_batch})
    run.latencies = [o.latency_s for o in ok]
    run.ttfa = [o.ttfa_s for o in ok]
    run.audio_s = sum(o.audio_s for o in ok)
    run.extra["failed_requests"] = len(outcomes) - len(ok)
    run.extra["segments"] = sum(len(o.segments) for o in ok)
    after = app.stats()
    totals = {s: {k: v - before[s]["totals"].get(k, 0.0) for k, v in after[s]["totals"].items()} for s in STAGES}
    run.extra["stages"] = stage_efficiency(totals, peaks, {s: app.dtype for s in STAGES}, wall)
    run.extra["roofline"] = roofline(counted_flops(totals), run.audio_s, wall, peaks.get(app.dtype, 0.0))
    run.extra["peak_rss_mb_per_replica"] = {s: round(after[s]["peak_rss_bytes"] / 2**20, 1) for s in STAGES}
    run.extra["kv"] = {s: after[s]["kv"] for s in STAGES if after[s].get("kv")}
    run.extra["cores"] = core_leases(before, after)
    run.extra["hops"] = hops(ok)
    if ok:  # did the run end on one long request? (a long text's segments follow one another)
        t0 = min(o.sent_at for o in ok)
        last = max(ok, key=lambda o: o.sent_at + o.latency_s)
        run.extra["last_request"] = {"latency_s": round(last.latency_s, 3), "audio_s": round(last.audio_s, 3),
                                     "segments": len(last.segments),
                                     "share_of_wall": round(last.latency_s / wall, 3) if wall else None,
                                     "sent_after_s": round(last.sent_at - t0, 3)}
    run.timeline = [{"sent_at": o.sent_at, "ttfa_s": o.ttfa_s, "segments": o.segments} for o in ok]  # not in summary
    if concurrency is not None and len(ok) == len(outcomes):  # a failed request would leave a client idle
        run.extra["steady"] = steady_window(ok, concurrency)
    return run


def core_leases(before: dict, after: dict) -> dict:
    """Per stage with ``torch_threads: shared``: the steps run on leased cores in this run, the mean threads they
    got and the seconds they waited for cores (cluster/cores.py)."""
    out = {}
    for s in STAGES:
        a, b = after[s].get("cores"), before[s].get("cores") or {}
        if a:
            leases = a["leases"] - b.get("leases", 0)
            out[s] = {"leases": leases, "waited_s": round(a["waited_s"] - b.get("waited_s", 0.0), 3),
                      "mean_threads": round((a["threads_granted"] - b.get("threads_granted", 0)) / leases, 2)
                      if leases else None}
    return out


def served_closed(app: ServedApp, work: Workload, concurrency: int, n: int, peaks: dict, offset: int = 0) -> Run:
    """``concurrency`` clients, each sending its next request when the last one finished."""
    def submit(requests):
        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(lambda r: _one(app.url, r), requests))

    run = _measure(app, f"served_concurrency{concurrency}_{app.dtype}", work.requests(n, offset), peaks, submit,
                   concurrency)
    run.extra.update(mode="closed", concurrency=concurrency)
    return run


def served_poisson(app: ServedApp, work: Workload, rate: float, n: int, peaks: dict, offset: int = 0,
                   seed: int = 0) -> Run:
    """Open loop: n requests sent at Poisson arrival times at ``rate`` per second, whatever the server does."""
    arrivals = poisson_arrivals(rate, n, seed)

    def submit(requests):
        outcomes: list[Outcome | None] = [None] * len(requests)
        start = time.perf_counter()

        def fire(i: int) -> None:
            outcomes[i] = _one(app.url, requests[i])

        threads = []
        for i, at in enumerate(arrivals):
            time.sleep(max(0.0, start + at - time.perf_counter()))
            t = threading.Thread(target=fire, args=(i,), daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
        return outcomes

    run = _measure(app, f"served_poisson{rate:g}rps_{app.dtype}", work.requests(n, offset), peaks, submit)
    run.extra.update(mode="poisson", rate_rps=rate)
    return run

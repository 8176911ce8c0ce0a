"""(4) The served app: Ray Serve on this machine, HTTP clients at a given concurrency.

Each request streams msgpack chunks, so the client sees its own time to first audio. Stage
replicas report their engine's work counters and peak memory through their ``stats`` method;
the benchmark takes the difference over each concurrency level.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import msgpack

from bark_serve.stages.constants import STAGES

from .workload import Run, Workload, stage_efficiency


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedApp:
    """Ray + Serve with the bark app on this machine, started and stopped by the benchmark."""

    def __init__(self, model_dir: str, dtype: str, max_batch: int, profile: str = "local-cpu",
                 stage_threads: dict[str, int] | None = None):
        import ray
        from ray import serve

        from bark_serve.serving.app import make_app
        from bark_serve.serving.config import DEPLOYMENT_NAMES, load_config
        from bark_serve.serving.serve_config import pool_resources
        from bark_serve.serving.stage_server import resolve_threads

        self.port = _free_port()
        stage_over = {"dtype": dtype, "max_batch": max_batch, "max_ongoing_requests": 256,
                      "max_queued_requests": 1024}
        overrides = {"model": model_dir, "http_host": "127.0.0.1", "http_port": self.port,
                     "orchestrator": {"num_cpus": 0.1, "max_active_requests": 256, "max_ongoing_requests": 512,
                                      "request_timeout_s": 7200}}
        base = load_config(profile)
        for stage in STAGES:
            threads = (stage_threads or {}).get(stage, base.stage(stage).torch_threads)
            overrides[stage] = {**base.stage(stage).model_dump(), **stage_over, "num_cpus": 0.1,
                                "torch_threads": threads}
        self.cfg = load_config(profile, overrides)
        self.dtype = dtype
        self.threads = {s: resolve_threads(self.cfg.stage(s).torch_threads) for s in STAGES}
        ray.init(address="local", resources=pool_resources(self.cfg), include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        serve.run(make_app(self.cfg), name=self.cfg.app_name, route_prefix="/")
        self.url = f"http://127.0.0.1:{self.port}"
        self.handles = {s: serve.get_deployment_handle(DEPLOYMENT_NAMES[s], app_name=self.cfg.app_name)
                        for s in STAGES}

    def stats(self) -> dict[str, dict]:
        return {s: h.stats.remote().result() for s, h in self.handles.items()}

    def close(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def _one(url: str, text: str, voice, semantic_tokens: int) -> tuple[float, float, float] | None:
    """(latency, time to first audio, audio seconds) of one streamed request; None if it failed."""
    try:
        return _stream(url, text, voice, semantic_tokens)
    except httpx.HTTPError as exc:
        print(f"[bench] request failed: {exc}", flush=True)
        return None


def _stream(url: str, text: str, voice, semantic_tokens: int) -> tuple[float, float, float]:
    body = {"text": text, "voice": voice, "stream": True, "temperature": 0, "min_eos_p": None,
            "max_semantic_tokens": semantic_tokens}
    t0 = time.perf_counter()
    first, samples = None, 0
    with httpx.stream("POST", url + "/v1/tts", content=msgpack.packb(body), timeout=3600,
                      headers={"Content-Type": "application/msgpack", "Accept": "application/msgpack"}) as r:
        r.raise_for_status()
        unpacker = msgpack.Unpacker()
        for data in r.iter_bytes():
            unpacker.feed(data)
            for msg in unpacker:
                if "audio" in msg:
                    first = first or time.perf_counter() - t0
                    samples += len(msg["audio"]) // 2
    return time.perf_counter() - t0, first or 0.0, samples / 24_000


def served(app: ServedApp, work: Workload, concurrency: int, n: int, peaks: dict) -> Run:
    before = app.stats()
    items = work.items(n)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda it: _one(app.url, it[0], it[1], work.semantic_tokens), items))
    run = Run(f"served_concurrency{concurrency}_{app.dtype}", wall_s=time.perf_counter() - t0,
              extra={"dtype": app.dtype, "concurrency": concurrency, "torch_threads": app.threads})
    ok = [r for r in results if r is not None]
    run.latencies = [r[0] for r in ok]
    run.ttfa = [r[1] for r in ok]
    run.audio_s = sum(r[2] for r in ok)
    run.extra["failed_requests"] = len(results) - len(ok)
    after = app.stats()
    totals = {s: {k: v - before[s]["totals"].get(k, 0.0) for k, v in after[s]["totals"].items()} for s in STAGES}
    run.extra["stages"] = stage_efficiency(totals, peaks, {s: app.dtype for s in STAGES})
    run.extra["peak_rss_mb_per_replica"] = {s: round(after[s]["peak_rss_bytes"] / 2**20, 1) for s in STAGES}
    run.extra["weights_mb_per_replica"] = {s: round(after[s]["weight_bytes"] / 2**20, 1) for s in STAGES}
    return run


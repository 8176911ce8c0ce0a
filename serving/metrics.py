"""Prometheus metrics through Ray (ray.serve.metrics): scraped from each node's metrics export port.

Stage replicas (tag ``stage``):
- ``bark_stage_queue_length`` (gauge): requests waiting for a place in the batch
- ``bark_stage_batch_size`` (histogram): requests per engine step
- ``bark_stage_step_seconds`` (histogram): duration of one engine step
- ``bark_stage_tokens_total`` (counter): tokens (semantic/coarse), frames (fine/codec) produced;
  its rate is tokens/s
- ``bark_stage_request_seconds`` (histogram): queue + work time of one request in the stage
- ``bark_stage_requests_total`` (counter, tag ``outcome`` ok|error)
- ``bark_stage_cuda_graphs``, ``bark_stage_graph_capture_seconds``, ``bark_stage_graph_memory_bytes`` (gauges):
  CUDA graphs captured at start (0: eager steps), their capture time and memory
- ``bark_stage_device_info`` (gauge, 1; tags ``device``, ``gpu_name``, ``gpu_ids``, ``gpu_share``): where the replica
  computes: its torch device, the GPU's name, the GPU ids Ray gave it and its share of them
- ``bark_stage_device_memory_bytes`` (gauge, tag ``kind``: allocated, reserved, free, total): the CUDA device's
  memory as this replica sees it (torch's allocated and reserved; the device's free and total)
Orchestrator:
- ``bark_request_seconds`` (histogram, tag ``api``: speech, tts, handle): whole request latency
- ``bark_time_to_first_audio_seconds`` (histogram): until the first audio chunk is ready
- ``bark_audio_seconds_total`` (counter): seconds of audio produced
- ``bark_http_errors_total`` (counter, tags ``code`` and ``route``, the route template): every error answer
Batch workers (BatchWorker replicas, published every few seconds by :class:`BatchProgressReporter`):
- ``bark_batch_items_total`` (counter, tag ``outcome`` succeeded|failed|retried|discarded): finished attempts
- ``bark_batch_items_in_flight`` (gauge): items this worker holds in the pipeline
- ``bark_batch_queue_waiting`` (gauge): items in the Redis stream that no worker has claimed yet (all jobs)
- ``bark_batch_queue_pending`` (gauge): items claimed by some worker and not finished yet (all jobs)
Ray Serve adds deployment, replica and application tags.

Ray 2.60 exports each metric to Prometheus as ``ray_<name>`` (its namespace ``ray``; the name is kept as
given, so a counter named ``..._total`` stays ``ray_..._total``); histograms add ``_bucket``, ``_sum``
and ``_count``. The Grafana dashboard (helm/bark-serve/dashboards/) queries those names.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger("ray.serve")
M = TypeVar("M")

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
BATCH_BUCKETS: list[float] = [1, 2, 4, 8, 16, 32, 64, 128, 256]
REPUBLISH_S = 10.0  # start-time gauges are set again this often, with the steps


class NullStageMetrics:
    """What a stage replica reports (its scheduler: queue, steps, requests; its engine: CUDA graphs), recorded
    nowhere. The one "no metrics" pattern: a sink whose methods do nothing, never ``None`` and never a stub
    that answers any name; :func:`replica_metrics` falls back to it outside a Serve replica."""

    def graphs(self, stats: dict | None) -> None: ...
    def device(self, report: dict, probe: Callable[[], dict] | None = None) -> None: ...
    def queue_length(self, n: int) -> None: ...
    def step(self, batch: float, tokens: float, seconds: float) -> None: ...
    def request_done(self, latency_s: float, ok: bool) -> None: ...


class NullRequestMetrics:
    """What the orchestrator reports per request, recorded nowhere (see :class:`NullStageMetrics`)."""

    def request(self, api: str, seconds: float) -> None: ...
    def first_audio(self, seconds: float) -> None: ...
    def audio(self, seconds: float) -> None: ...
    def error(self, code: int, route: str = "unmatched") -> None: ...


def replica_metrics(make: Callable[[], M], null: M, what: str) -> M:
    """``make()``, the real sink (it needs a Serve replica's context), or ``null`` where it cannot be made:
    metrics never fail serving (unit tests build schedulers and orchestrator parts outside a replica)."""
    try:
        return make()
    except Exception:
        log.warning("metrics unavailable for %s; recording none", what, exc_info=True)
        return null


class StageMetrics(NullStageMetrics):
    """The scheduler's metrics sink for one stage replica."""

    def __init__(self, stage: str):
        from ray.serve.metrics import Counter, Gauge, Histogram

        tags = {"stage": stage}
        self._queue = Gauge("bark_stage_queue_length", "Requests waiting in the stage queue", tag_keys=("stage",))
        self._batch = Histogram("bark_stage_batch_size", "Requests per engine step", boundaries=BATCH_BUCKETS,
                                tag_keys=("stage",))
        self._step = Histogram("bark_stage_step_seconds", "Engine step duration", boundaries=LATENCY_BUCKETS,
                               tag_keys=("stage",))
        self._tokens = Counter("bark_stage_tokens_total", "Tokens or frames produced", tag_keys=("stage",))
        self._latency = Histogram("bark_stage_request_seconds", "Time of a request in the stage",
                                  boundaries=LATENCY_BUCKETS, tag_keys=("stage",))
        self._requests = Counter("bark_stage_requests_total", "Requests finished by the stage",
                                 tag_keys=("stage", "outcome"))  # type: ignore[arg-type]  # Ray types a 1-tuple
        self._graphs = Gauge("bark_stage_cuda_graphs", "CUDA graphs the replica captured at start (0: eager steps)",
                             tag_keys=("stage",))
        self._capture = Gauge("bark_stage_graph_capture_seconds", "Seconds the replica spent capturing CUDA graphs",
                              tag_keys=("stage",))
        self._graph_memory = Gauge("bark_stage_graph_memory_bytes", "GPU memory the captured CUDA graphs reserved",
                                   tag_keys=("stage",))
        self._device = Gauge("bark_stage_device_info", "Where the replica computes (value 1)",
                             tag_keys=("stage", "device", "gpu_name", "gpu_ids", "gpu_share"))  # type: ignore[arg-type]
        self._memory = Gauge("bark_stage_device_memory_bytes", "CUDA memory as the replica sees it",
                             tag_keys=("stage", "kind"))  # type: ignore[arg-type]  # Ray types a 1-tuple
        self._tags = tags
        self._stage = stage
        self._graph_stats: dict | None = None
        self._graphs_at = 0.0
        self._device_probe: Callable[[], dict] | None = None

    def graphs(self, stats: dict | None) -> None:
        """The engine's ``graph_stats()`` at start (None: its steps run eagerly). Set again with the steps
        (every ``REPUBLISH_S``): a value set only while the replica starts was not always exported."""
        self._graph_stats = stats or {}
        self._graphs_at = time.monotonic()
        self._graphs.set(self._graph_stats.get("cuda_graphs", 0), tags=self._tags)
        self._capture.set(self._graph_stats.get("capture_s", 0.0), tags=self._tags)
        self._graph_memory.set(max(self._graph_stats.get("graph_bytes", 0), 0), tags=self._tags)

    def device(self, report: dict, probe: Callable[[], dict] | None = None) -> None:
        """The replica's ``device_report()``; ``probe`` reads it again when the gauges are set again."""
        self._device_probe = probe or self._device_probe
        share = (report.get("assigned_resources") or {}).get("GPU", 0)
        self._device.set(1, tags={"stage": self._stage, "device": str(report.get("device")),
                                  "gpu_name": str(report.get("name", "")), "gpu_share": f"{share:g}",
                                  "gpu_ids": ",".join(report.get("gpu_ids", []))})
        for kind in ("allocated", "reserved", "free", "total"):
            if f"{kind}_bytes" in report:
                self._memory.set(report[f"{kind}_bytes"], tags={"stage": self._stage, "kind": kind})

    def queue_length(self, n: int) -> None:
        self._queue.set(n, tags=self._tags)

    def step(self, batch: float, tokens: float, seconds: float) -> None:
        if self._graph_stats is not None and time.monotonic() - self._graphs_at > REPUBLISH_S:
            self.graphs(self._graph_stats)
            if self._device_probe is not None:
                self.device(self._device_probe())
        if batch:
            self._batch.observe(batch, tags=self._tags)
        self._step.observe(seconds, tags=self._tags)
        if tokens > 0:
            self._tokens.inc(tokens, tags=self._tags)

    def request_done(self, latency_s: float, ok: bool) -> None:
        self._latency.observe(latency_s, tags=self._tags)
        self._requests.inc(1, tags={"stage": self._stage, "outcome": "ok" if ok else "error"})


class RequestMetrics(NullRequestMetrics):
    """The orchestrator's request-level metrics."""

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        self._latency = Histogram("bark_request_seconds", "Whole request latency", boundaries=LATENCY_BUCKETS,
                                  tag_keys=("api",))
        self._ttfa = Histogram("bark_time_to_first_audio_seconds", "Time to the first audio chunk",
                               boundaries=LATENCY_BUCKETS)
        self._audio = Counter("bark_audio_seconds_total", "Seconds of audio produced")
        self._errors = Counter("bark_http_errors_total", "Error answers, every refusal included",
                               tag_keys=("code", "route"))  # type: ignore[arg-type]  # Ray types a 1-tuple

    def request(self, api: str, seconds: float) -> None:
        self._latency.observe(seconds, tags={"api": api})

    def first_audio(self, seconds: float) -> None:
        self._ttfa.observe(seconds)

    def audio(self, seconds: float) -> None:
        if seconds > 0:  # Ray counters refuse 0 (an empty generation is a valid answer)
            self._audio.inc(seconds)

    def error(self, code: int, route: str = "unmatched") -> None:
        self._errors.inc(1, tags={"code": str(code), "route": route})


BATCH_OUTCOMES = ("succeeded", "failed", "retried", "discarded")  # WorkerStats fields of the same names


@dataclass(frozen=True)
class BatchProgress:
    """One reading of a batch worker: its outcome counters so far, what it holds, and the shared queue."""

    outcomes: dict[str, int]
    in_flight: int
    waiting: int
    pending: int


class BatchMetrics:
    """The BatchWorker's metrics: outcome counters (fed with increments) and three gauges."""

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge

        self._items = Counter("bark_batch_items_total", "Batch item attempts finished, by outcome",
                              tag_keys=("outcome",))
        self._in_flight = Gauge("bark_batch_items_in_flight", "Batch items this worker holds in the pipeline")
        self._waiting = Gauge("bark_batch_queue_waiting", "Batch items no worker has claimed yet (all jobs)")
        self._pending = Gauge("bark_batch_queue_pending", "Batch items claimed and not finished (all jobs)")

    def items(self, outcome: str, n: int) -> None:
        if n > 0:  # Ray counters refuse 0
            self._items.inc(n, tags={"outcome": outcome})

    def gauges(self, in_flight: int, waiting: int, pending: int) -> None:
        self._in_flight.set(in_flight)
        self._waiting.set(waiting)
        self._pending.set(pending)


async def read_worker_progress(worker) -> BatchProgress:
    """A :class:`BatchProgress` of a ``cluster.batch_worker.BatchWorkerLoop``: its stats and its queue's backlog
    (finished items are deleted from the stream, so what is in it is either waiting or pending)."""
    length, pending = await worker.queue.backlog()
    return BatchProgress(outcomes={o: getattr(worker.stats, o) for o in BATCH_OUTCOMES}, in_flight=worker.in_flight,
                         waiting=max(length - pending, 0), pending=pending)


class BatchProgressReporter:
    """Turns a batch worker's running totals into metric updates: counters get what was added since the
    last reading, gauges the current values. ``read`` returns a :class:`BatchProgress`."""

    def __init__(self, read, sink: BatchMetrics):
        self.read, self.sink = read, sink
        self._seen = dict.fromkeys(BATCH_OUTCOMES, 0)

    async def publish(self) -> BatchProgress:
        progress = await self.read()
        for outcome in BATCH_OUTCOMES:
            now = progress.outcomes.get(outcome, 0)
            self.sink.items(outcome, now - self._seen[outcome])
            self._seen[outcome] = now
        self.sink.gauges(progress.in_flight, progress.waiting, progress.pending)
        return progress

    async def run(self, every_s: float = 5.0) -> None:
        """Publish until cancelled; a failed reading (Redis down) is skipped, never fatal."""
        while True:
            try:
                await self.publish()
            except Exception as exc:  # metrics must never stop the worker
                log.debug("batch metrics not published: %r", exc)
            await asyncio.sleep(every_s)


async def cluster_metrics_text(timeout_s: float = 5.0) -> str:
    """Every live node's Prometheus export (Ray's metrics agent), as one exposition text.

    What ``GET /metrics`` on the API port answers: the same series a Prometheus scraping each node's
    ``metrics_export_port`` gets, for a deployment that exposes only the API port. Families of several
    nodes are merged (one HELP/TYPE each); a node that does not answer in ``timeout_s`` is left out."""
    import httpx
    import ray

    nodes = await asyncio.to_thread(ray.nodes)
    urls = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in nodes if n.get("Alive") and n.get("MetricsExportPort")]
    async with httpx.AsyncClient(timeout=timeout_s, trust_env=False) as client:
        replies = await asyncio.gather(*(client.get(u) for u in urls), return_exceptions=True)
    texts = [r.text for r in replies if isinstance(r, httpx.Response) and r.status_code == 200]
    for url, r in zip(urls, replies):
        if not isinstance(r, httpx.Response) or r.status_code != 200:
            log.warning("/metrics: node export %s did not answer: %s", url, r)
    return texts[0] if len(texts) == 1 else merge_expositions(texts)


def merge_expositions(texts: list[str]) -> str:
    """Prometheus texts of several nodes as one: each family once, with every node's samples."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    families: dict = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name in families:
                families[family.name].samples.extend(family.samples)
            else:
                families[family.name] = family

    class _Merged:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry).decode()

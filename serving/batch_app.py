"""Batch jobs inside the Serve app: the BatchWorker deployment and the job store the HTTP router uses.

Each BatchWorker replica runs one BatchWorkerLoop (cluster/batch_worker.py):
it claims items from the Redis stream, keeps at most ``batch.max_in_flight``
of them in the pipeline, and sends them to the stage deployments with batch
priority, so interactive requests go first in every stage queue.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from ray import serve

from bark_serve.cluster.batch_types import BatchItem, SynthesisResult
from bark_serve.cluster.batch_worker import BatchWorkerLoop
from bark_serve.cluster.jobs import open_store
from bark_serve.cluster.queue import open_queue
from bark_serve.cluster.voice_store import VoiceStore
from bark_serve.schema.request import item_request
from bark_serve.stages import encoders as A
from bark_serve.stages.audio import join_segments
from bark_serve.stages.constants import STAGES
from bark_serve.stages.types import VoicePrompt

from .config import BarkConfig, parse_config
from .errors import unwrap
from .metrics import BatchMetrics, BatchProgressReporter, read_worker_progress
from .stage_calls import make_synthesizer
from .voices_api import registered_voices, voice_store

log = logging.getLogger("ray.serve")


class ItemProgress:
    """Which stage one batch item is in, from its segments' finished stage calls.

    An item is in the first stage that has not finished all its segments; ``report(stage, passed)``
    is called whenever that changes (``passed``: the stages it has just finished, for stage rates).
    """

    def __init__(self, n_segments: int, report):
        self.n, self.report = n_segments, report
        self.done = {s: 0 for s in STAGES}
        self.passed: list[str] = []
        self.report(STAGES[0], [])

    def finished(self, stage: str) -> None:
        self.done[stage] += 1
        passed = [s for s in STAGES if self.done[s] >= self.n and s not in self.passed]
        if passed:
            self.passed += passed
            current = next((s for s in STAGES if self.done[s] < self.n), None)
            self.report(current, passed)


BATCH_METRICS_EVERY_S = 5.0


def _publish_progress(worker: BatchWorkerLoop) -> BatchProgressReporter:
    return BatchProgressReporter(functools.partial(read_worker_progress, worker), BatchMetrics())


def batch_store_factory(cfg: BarkConfig):
    """A picklable factory of the JobStore (called in the orchestrator replica's event loop)."""
    return functools.partial(open_store, cfg.batch)


@serve.deployment
class BatchWorker:
    async def __init__(self, config: dict, semantic, coarse, fine, codec):  # type: ignore[misc]  # Serve awaits it
        self.cfg = parse_config(config)
        handles = {"semantic": semantic, "coarse": coarse, "fine": fine, "codec": codec}
        self.synth = make_synthesizer(self.cfg, handles)
        self.voice_store: VoiceStore | None = None  # opened when an item first names a registered voice
        bcfg = self.cfg.batch
        self.queue = await open_queue(bcfg)
        # Only batch.item_timeout_s bounds an item: the interactive request_timeout_s is for people waiting.
        self.loop = BatchWorkerLoop.from_config(self.queue, self.synthesize, bcfg, item_timeout_s=bcfg.item_timeout_s)
        self.task = asyncio.get_running_loop().create_task(self.loop.run())
        self.metrics_task = asyncio.get_running_loop().create_task(
            _publish_progress(self.loop).run(BATCH_METRICS_EVERY_S))
        log.info("batch worker %s started (max %d in flight)", self.loop.consumer, bcfg.max_in_flight)

    async def synthesize(self, item: BatchItem) -> SynthesisResult:
        """One item on the one path (serving/orchestrator.py's ``_run``): the typed request, planned in the
        planning thread (a 20k-character item must not stall this loop's heartbeats and claims), streamed
        through the stages with batch priority, joined and encoded as a file."""
        req = item_request(item.text, item.script, item.voice, item.format, item.seed, item.options, item.priority)
        try:
            own = await self._own_voices(req.named_voices(), item.owner)  # the job's tenant's registered voices
            plan = await self.synth.plan_request(req, request_id=f"{item.job_id}-{item.item_id}", own_voices=own)
            progress = ItemProgress(plan.n_segments, functools.partial(self.loop.report_stage, item.job_id,
                                                                        item.item_id))
            chunks = await self.synth.collect(plan, on_stage=progress.finished)
        except Exception as exc:
            raise unwrap(exc) from None  # InvalidRequestError fails the item at once; others are retried
        sr = self.synth.spec.sample_rate
        # joining and encoding minutes of audio is CPU work: not on this replica's event loop
        audio = await asyncio.to_thread(join_segments, [c.audio for c in chunks], sr,
                                        req.post_process(self.cfg.audio))
        encoded = await asyncio.to_thread(A.encode, audio, sr, req.format)
        timings = {s: sum(c.timings[s]["finished"] - c.timings[s]["started"] for c in chunks)
                   for s in chunks[0].timings}
        return SynthesisResult(audio=encoded, sample_rate=sr, duration_s=len(audio) / sr,
                               media_type=A.media_type(req.format), timings={"seed": plan.seed, "stages_s": timings})

    async def _own_voices(self, names: set[str], owner: str) -> dict[str, VoicePrompt]:
        """``owner``'s registered voices among ``names`` (serving/voices_api.py), from the voice store."""
        aliases = self.synth.planner.aliases
        if not self.cfg.voice_cloning.enabled or not any("/" not in n and n not in aliases for n in names):
            return {}
        if self.voice_store is None:
            self.voice_store = await asyncio.to_thread(voice_store, self.cfg)
        return await registered_voices(self.voice_store, names, owner, aliases, self.synth.spec)

    async def stats(self) -> dict:
        return {"consumer": self.loop.consumer, "running": not self.task.done()}

    async def check_health(self) -> None:
        if self.task.done():
            raise RuntimeError(f"batch worker loop stopped: {self.task.exception()!r}")

    async def __del__(self):
        self.metrics_task.cancel()
        await self.loop.stop(5.0)

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

import numpy as np
from pydantic import ValidationError
from ray import serve

from bark_serve.cluster.batch_types import BatchItem, SynthesisResult
from bark_serve.cluster.batch_worker import BatchWorkerLoop
from bark_serve.cluster.jobs import open_store
from bark_serve.cluster.queue import open_queue
from bark_serve.stages.types import InvalidRequestError

from . import audio as A
from .api_models import TTSRequest
from .config import BarkConfig, parse_config
from .errors import unwrap
from .http_api import validation_error
from .service import make_synthesizer

log = logging.getLogger("ray.serve")


def batch_store_factory(cfg: BarkConfig):
    """A picklable factory of the JobStore (called in the orchestrator replica's event loop)."""
    return functools.partial(open_store, cfg.batch)


def item_request(item: BatchItem) -> TTSRequest:
    """A batch item as a native request; a bad item raises InvalidRequestError (it fails without retries)."""
    try:
        return TTSRequest(text=item.text, voice=item.voice, format=item.format, seed=item.seed,
                          priority=item.priority, **(item.options or {}))
    except ValidationError as exc:
        raise InvalidRequestError(validation_error(exc).message) from None
    except TypeError as exc:
        raise InvalidRequestError(f"bad options: {exc}") from None


@serve.deployment
class BatchWorker:
    async def __init__(self, config: dict, semantic, coarse, fine, codec):
        self.cfg = parse_config(config)
        handles = {"semantic": semantic, "coarse": coarse, "fine": fine, "codec": codec}
        self.synth = make_synthesizer(self.cfg, handles)
        bcfg = self.cfg.batch
        timeout = bcfg.item_timeout_s or self.cfg.orchestrator.request_timeout_s
        self.queue = await open_queue(bcfg)
        self.loop = BatchWorkerLoop.from_config(self.queue, self.synthesize, bcfg, item_timeout_s=timeout)
        self.task = asyncio.get_running_loop().create_task(self.loop.run())
        log.info("batch worker %s started (max %d in flight)", self.loop.consumer, bcfg.max_in_flight)

    async def synthesize(self, item: BatchItem) -> SynthesisResult:
        req = item_request(item)
        try:
            plan = self.synth.plan(req.text, req.voice, req.generation_params(), "batch",
                                   request_id=f"{item.job_id}-{item.item_id}")
            chunks = await self.synth.collect(plan)
        except Exception as exc:
            raise unwrap(exc) from None  # InvalidRequestError fails the item at once; others are retried
        audio = np.concatenate([c.audio for c in chunks])
        sr = self.synth.spec.sample_rate
        timings = {s: sum(c.timings[s]["finished"] - c.timings[s]["started"] for c in chunks) for s in chunks[0].timings}
        return SynthesisResult(audio=A.encode(audio, sr, req.format), sample_rate=sr, duration_s=len(audio) / sr,
                               media_type=A.media_type(req.format), timings={"seed": plan.seed, "stages_s": timings})

    async def stats(self) -> dict:
        return {"consumer": self.loop.consumer, "running": not self.task.done()}

    async def check_health(self) -> None:
        if self.task.done():
            raise RuntimeError(f"batch worker loop stopped: {self.task.exception()!r}")

    async def __del__(self):
        await self.loop.stop(5.0)

"""Building a Synthesizer on top of the stage deployments' handles (orchestrator and batch workers).

A stage call whose replica died under it (SIGKILL, OOM, node lost) is sent
again, at most ``STAGE_RETRIES`` times with a short backoff: a stage call is
idempotent (its tokens come from the request's own seed), and Serve routes
the retry to a live replica or holds it until the restarted one is up. When
the retries are spent, the Ray error goes up and the client gets 503 with
Retry-After (serving/errors.py). A call refused by a replica whose device
broke (``ReplicaPoisoned``, serving/scheduler.py) is sent again the same way,
though not isolated (it never ran); Serve takes that replica out only after
its health checks fail (3 in a row, 10 s apart by default), so with one
replica the retries meet it again and the client gets that 503.

Quarantine: a retry runs *isolated*, alone in its replica's engine (every request
that was in the dead replica's batch is retried that way, one at a time). The replica
marks the request it runs alone in Ray's GCS key-value store (``alone_marker``) and
clears the mark when it is done, so a caller whose replica died can tell whether its
request was the one running then (``was_alone``) or only waiting its turn. A request
whose replica dies again while it runs alone is what kills replicas: it is not sent
again but fails with RequestCrashedStage (HTTP 500 ``request_crashed_stage``; a batch
item fails without further attempts), so one poison request takes down at most two
replicas, and the innocent requests of its first batch still succeed.
"""

from __future__ import annotations

import asyncio
import logging

from bark_serve.stages.plan import Planner
from bark_serve.stages.text import TextPreparer
from bark_serve.stages.types import Priority, RequestCrashedStage, StageRequest
from bark_serve.stages.voices import VoiceLibrary
from bark_serve.stages.weights import Checkpoint

from .config import BarkConfig
from .errors import unwrap
from .scheduler import ReplicaPoisoned
from .synthesis import Synthesizer

log = logging.getLogger("ray.serve")  # shows in the replica logs

STAGE_RETRIES = 2
RETRY_BACKOFF_S = (0.5, 2.0)  # before the 1st and 2nd retry


def replica_lost(exc: BaseException) -> bool:
    """Did the call fail because the replica serving it died or became unreachable (not the request's fault)?"""
    from ray.exceptions import RayActorError  # ActorDiedError and ActorUnavailableError derive from it
    from ray.serve.exceptions import ReplicaUnavailableError

    return isinstance(exc, (RayActorError, ReplicaUnavailableError))


def replica_poisoned(exc: BaseException) -> bool:
    """Did a replica whose device broke refuse the call (``ReplicaPoisoned``: the request did not run; Serve
    replaces that replica once its health check fails, and another replica may take the call meanwhile)?"""
    return isinstance(unwrap(exc), ReplicaPoisoned)


KV_NAMESPACE = "bark_serve"


def _alone_key(stage: str, request_id: str) -> bytes:
    return f"alone:{stage}:{request_id}".encode()


def alone_marker(stage: str):
    """The stage scheduler's ``alone_hook``: marks the request that runs alone in this replica's engine."""

    def mark(request_id: str, alone: bool) -> None:
        from ray.experimental import internal_kv

        try:
            if alone:
                internal_kv._internal_kv_put(_alone_key(stage, request_id), b"1", namespace=KV_NAMESPACE)
            else:
                internal_kv._internal_kv_del(_alone_key(stage, request_id), namespace=KV_NAMESPACE)
        except Exception as exc:  # no GCS (a test without Ray) or a GCS hiccup: the quarantine only loses a hint
            log.warning("could not mark %s as running alone: %s", request_id, exc)

    return mark


def _was_alone(stage: str, request_id: str) -> bool:
    from ray.experimental import internal_kv

    key = _alone_key(stage, request_id)
    try:
        marked = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE) is not None
        internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)
        return marked
    except Exception:  # the GCS did not answer: assume the worst, as before the marks existed
        return True


async def was_alone(stage: str, request_id: str) -> bool:
    """Was the request running alone in its replica's engine when the replica died (else: waiting its turn)?"""
    return await asyncio.to_thread(_was_alone, stage, request_id)


def died_running(exc: BaseException) -> bool:
    """Did the replica die while it ran the call (not: was it already gone, or unreachable)?"""
    from ray.exceptions import ActorDiedError

    return isinstance(exc, ActorDiedError)


def retrying_call(handles: dict, retries: int = STAGE_RETRIES, backoff_s=RETRY_BACKOFF_S):
    """``call(stage, request, priority)`` through Serve handles, resent when the replica died under it."""

    async def call(stage: str, request: StageRequest, priority: Priority):
        isolated = False
        for attempt in range(retries + 1):
            try:
                return await handles[stage].run.remote(request, priority, isolated)
            except Exception as exc:
                refused = replica_poisoned(exc)
                if not (refused or replica_lost(exc)):
                    raise
                if isolated and died_running(exc) and await was_alone(stage, request.request_id):
                    log.error("%s: request %s was running alone when its replica died, as before; it is "
                              "quarantined (not sent again)", stage, request.request_id)
                    raise RequestCrashedStage(f"this request took down the {stage} stage twice (the second time "
                                              "running alone); it is not retried") from None
                if attempt >= retries:
                    raise
                isolated = isolated or not refused  # a poisoned replica refused it: it ran nowhere, no suspect
                delay = backoff_s[min(attempt, len(backoff_s) - 1)]
                log.warning("%s replica %s during %s (%s); retry %d/%d%s in %.1f s", stage,
                            "unusable" if refused else "lost", request.request_id, type(exc).__name__,
                            attempt + 1, retries, ", alone," if isolated else "", delay)
                await asyncio.sleep(delay)

    return call


def make_planner(cfg: BarkConfig) -> Planner:
    """The config's planner: the checkpoint's tokenizer and voices (no weights), the orchestrator's limits."""
    ckpt = Checkpoint.open(cfg.model)
    voices = VoiceLibrary(ckpt.spec, ckpt, [cfg.voices_dir] if cfg.voices_dir else [])
    ocfg = cfg.orchestrator
    return Planner(TextPreparer.from_checkpoint(ckpt), voices, ocfg.segment_max_tokens,
                   ocfg.first_segment_max_tokens, ocfg.max_text_chars, cfg.voice_aliases)


def make_synthesizer(cfg: BarkConfig, handles: dict) -> Synthesizer:
    """The config's planner, with stage calls through Serve handles."""
    planner = make_planner(cfg)
    return Synthesizer(planner, planner.text.spec, retrying_call(handles), cfg.orchestrator.max_segments_in_flight)

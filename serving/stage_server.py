"""One generic Ray Serve deployment for every stage: an engine plus its batching loop.

The app builder deploys it four times (SemanticServer, CoarseServer,
FineServer, CodecServer), each with its own pool, replicas and limits. The
engine comes from ``engine_factory`` (dependency injection: tests pass a
fake engine where the model is beside the point).
"""

from __future__ import annotations

import logging
import os

from ray import serve

from bark_serve.cluster.cores import CoreBudget, host_cores
from bark_serve.cluster.placement import ray_placement
from bark_serve.stages.engine import EngineOptions, device_report, invariance_summary, resolve_device, resolve_dtype
from bark_serve.stages.types import InvalidRequestError, Priority, StageRequest

from .config import BarkConfig, StageConfig, parse_config
from .metrics import NullStageMetrics, StageMetrics, replica_metrics
from .scheduler import StageOutput, StageScheduler
from .stage_calls import alone_marker

log = logging.getLogger("ray.serve")  # shows in the replica logs


def resolve_threads(setting: int | str | None) -> int | None:
    """``"auto"`` and ``"shared"``: the cores this process may run on (its CPU affinity; ``"shared"`` leases
    them per step, :func:`core_budget`), else the setting itself."""
    if isinstance(setting, str):  # "auto" or "shared", the strings StageConfig allows
        return host_cores()
    return setting


def shares_cores(cfg: StageConfig, device: str) -> bool:
    """Whether the replica leases the host's cores per step (``torch_threads: shared`` on CPU)."""
    return cfg.torch_threads == "shared" and device.startswith("cpu")


def core_budget(cfg: StageConfig, device: str) -> CoreBudget | None:
    """The host's cores shared with the other stage replicas there (``torch_threads: shared`` on CPU), else None."""
    if not shares_cores(cfg, device):
        return None
    import torch

    return CoreBudget(on_grant=torch.set_num_threads)


def engine_options(cfg: StageConfig) -> EngineOptions:
    device = resolve_device(cfg.device)
    threads = resolve_threads(cfg.torch_threads)
    return EngineOptions(device=device, dtype=resolve_dtype(cfg.dtype, device, threads, log), capacity=cfg.max_batch,
                         torch_threads=threads, cpu_offload=cfg.cpu_offload,
                         max_forward_tokens=cfg.max_forward_tokens, cuda_graphs=cfg.cuda_graphs,
                         graph_buckets=tuple(cfg.graph_buckets), batch_invariant=cfg.batch_invariant,
                         shared_threads=shares_cores(cfg, device))


def load_engine(stage: str, cfg: BarkConfig, options: EngineOptions):
    """The real engine: read only this stage's sub-model from the checkpoint."""
    from bark_serve.stages.pipeline import ENGINES
    from bark_serve.stages.weights import Checkpoint

    return ENGINES[stage].from_checkpoint(Checkpoint.open(cfg.model), options)


# Helpers come before the deployment class: Serve pickles the class when it is decorated.
def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()



def _describe(device: dict) -> str:
    parts = [device["device"]]
    if "name" in device:
        parts.append(f"{device['name']}, {device['allocated_bytes'] / 2**30:.2f} GiB allocated, "
                     f"{device['reserved_bytes'] / 2**30:.2f} GiB reserved, {device['free_bytes'] / 2**30:.1f} of "
                     f"{device['total_bytes'] / 2**30:.1f} GiB free")
    parts.append(f"CUDA_VISIBLE_DEVICES={device.get('cuda_visible_devices')}")
    if "assigned_resources" in device:
        parts.append(f"Ray resources {device['assigned_resources']}, GPU ids {device['gpu_ids']}")
    return "; ".join(parts)


@serve.deployment
class StageServer:
    def __init__(self, stage: str, config: dict, engine_factory=load_engine):
        self.stage = stage
        cfg = parse_config(config)
        scfg = cfg.stage(stage)
        options = engine_options(scfg)
        self.engine = engine_factory(stage, cfg, options)
        metrics = replica_metrics(lambda: StageMetrics(stage), NullStageMetrics(), stage)
        max_queue = scfg.max_queued_requests if scfg.max_queued_requests >= 0 else 1 << 30
        self.cores = core_budget(scfg, options.device)
        self.scheduler = StageScheduler(self.engine, alone_hook=alone_marker(stage),
                                        max_queue=max_queue + scfg.max_ongoing_requests,
                                        batch_wait_s=scfg.batch_wait_ms / 1000.0, metrics=metrics, cores=self.cores)
        graphs = getattr(self.engine, "graph_stats", lambda: None)()
        metrics.graphs(graphs)
        device = self.device_report()
        metrics.device(device, self.device_report)
        log.info("%s placed: %s", stage, _describe(device))
        if scfg.batch_invariant:
            log.info("%s batch_invariant: %s", stage, invariance_summary(self.engine))
        log.info("%s ready: capacity %d, %s on %s, %s", stage, scfg.max_batch, self.engine.dtype, self.engine.device,
                 "eager steps" if graphs is None else
                 f"{graphs['cuda_graphs']} CUDA graphs captured in {graphs['capture_s']:.2f} s, "
                 f"{graphs['graph_bytes'] / 2**20:.0f} MiB" + (f" (capture failed: {graphs['capture_error']})"
                                                              if graphs.get("capture_error") else ""))

    async def run(self, request: StageRequest, priority: Priority = Priority.INTERACTIVE,
                  isolated: bool = False) -> StageOutput:
        """Process one stage request (a stages.types *Request); raises InvalidRequestError for a bad one.
        ``isolated``: run it alone in the engine (a request retried after a replica died under it)."""
        if not hasattr(request, "request_id"):
            raise InvalidRequestError(f"{self.stage} expects a stage request, got {type(request).__name__}")
        return await self.scheduler.submit(request, priority, isolated=isolated)

    async def stats(self) -> dict:
        s = self.scheduler.stats()
        s.update(stage=self.stage, capacity=self.engine.capacity, weight_bytes=self.engine.weight_bytes(),
                 totals=dict(self.engine.totals),
                 kv=self.engine.kv_stats() if hasattr(self.engine, "kv_stats") else None,
                 graphs=getattr(self.engine, "graph_stats", lambda: None)(),
                 peak_rss_bytes=_peak_rss(), pid=os.getpid(), node_id=_node_id(), device=self.device_report(),
                 cores=self.cores.stats() if self.cores is not None else None)
        return s

    def device_report(self) -> dict:
        """Where this replica computes: its torch device (a CUDA device's name and memory), the resources Ray
        gave it (GPU share, pool) and the GPUs it sees (``CUDA_VISIBLE_DEVICES``)."""
        return {**device_report(str(self.engine.device)), **ray_placement()}

    async def ready(self) -> bool:
        return not self.scheduler.poisoned

    async def check_health(self) -> None:
        """Serve's health check: the replica is unhealthy if its batching loop died or its device is unusable
        (a sticky CUDA error: serving/scheduler.py), so that Serve replaces it."""
        if self.scheduler.poisoned:
            raise RuntimeError(f"{self.stage} device unusable: {self.scheduler.poisoned}")
        if self.scheduler.steps and not self.scheduler.alive:
            raise RuntimeError(f"{self.stage} batching loop stopped")

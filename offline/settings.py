"""Where and how wide each ``map_batches`` stage runs, read from the serving config's blocks.

The dataset command uses the same YAML file as ``bark-serve up``: each stage block
(``semantic:``, ``coarse:``, ``fine:``, ``codec:``) gives its stage's actor pool

- ``num_cpus`` / ``num_gpus`` per actor and one unit of its pool resource (``bark_pool_<pool>``);
- the pool size: ``autoscaling.min_replicas..max_replicas`` (at least 1), else ``num_replicas`` fixed;
- ``max_batch``: the engine's capacity and the rows one ``map_batches`` call takes;
- device, dtype, threads, offload: the engine options, as for a Serve replica.

The planning stage (split, tokenize, voices) runs on the ``orchestrator:`` block's placement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bark_serve.serving.config import BarkConfig, Placement
from bark_serve.stages.constants import STAGES

PLAN_BATCH_ROWS = 64
# An actor that dies (killed, OOM, node lost) is restarted and its in-flight batches are retried on it:
# Ray Data gives actor pools max_restarts=-1 and max_task_retries=-1 by default (tests/offline checks
# both the defaults and a killed actor), so nothing is passed here.


@dataclass(frozen=True)
class MapSpec:
    """The keyword arguments of one ``Dataset.map_batches`` over an actor pool."""

    name: str
    concurrency: tuple[int, int]
    batch_size: int
    num_cpus: float
    num_gpus: float
    resources: dict[str, float] = field(default_factory=dict)

    def kwargs(self) -> dict:
        from ray.data import ActorPoolStrategy

        low, high = self.concurrency
        return {"compute": ActorPoolStrategy(min_size=low, max_size=high), "batch_size": self.batch_size,
                "num_cpus": self.num_cpus, **({"num_gpus": self.num_gpus} if self.num_gpus else {}),
                **({"resources": dict(self.resources)} if self.resources else {})}


def pool_size(p: Placement) -> tuple[int, int]:
    if p.autoscaling is not None:
        return max(1, p.autoscaling.min_replicas), max(1, p.autoscaling.max_replicas)
    return p.num_replicas, p.num_replicas


def map_spec(name: str, p: Placement, batch_size: int) -> MapSpec:
    resources = {p.pool_resource: 1.0} if p.pool_resource else {}
    return MapSpec(name, pool_size(p), batch_size, p.num_cpus, p.num_gpus, resources)


def plan_spec(cfg: BarkConfig) -> MapSpec:
    return map_spec("plan", cfg.orchestrator, PLAN_BATCH_ROWS)


def stage_specs(cfg: BarkConfig) -> dict[str, MapSpec]:
    return {s: map_spec(s, cfg.stage(s), cfg.stage(s).max_batch) for s in STAGES}

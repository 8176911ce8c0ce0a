"""Render a :class:`BarkConfig` as a Ray Serve config file (``serve deploy`` / RayService serveConfigV2).

One deployment entry per stage, the orchestrator, the batch worker and the voice encoder, each
with its replicas (or autoscaling), queue limits and ``ray_actor_options``
whose custom resource ``bark_pool_<pool>`` pins it to its pool. The whole
BarkConfig travels as the application's ``args``, so the replicas build
their engines from the same values. The Helm chart renders the same
structure from its ``bark:`` values (tests/helm checks that both agree).
"""

from __future__ import annotations

import os

from bark_serve.cluster.placement import POOL_RESOURCE_UNITS, pool_resource_map
from bark_serve.stages.constants import STAGES

from .config import BATCH_WORKER_NAME, DEPLOYMENT_NAMES, INGRESS_NAME, VOICE_ENCODER_NAME, BarkConfig, Placement

IMPORT_PATH = "bark_serve.serving.app:build_app"


def deployment_options(p: Placement) -> dict:
    """A deployment's Serve options (replicas or autoscaling, queue limits, ray_actor_options)."""
    actor: dict = {"num_cpus": p.num_cpus}
    if p.num_gpus:
        actor["num_gpus"] = p.num_gpus
    if p.pool_resource:
        actor["resources"] = {p.pool_resource: POOL_RESOURCE_UNITS}
    options: dict = {}
    if p.autoscaling is not None:
        options["autoscaling_config"] = p.autoscaling.model_dump(mode="json")
    else:
        options["num_replicas"] = p.num_replicas
    options["max_ongoing_requests"] = p.max_ongoing_requests
    options["max_queued_requests"] = p.max_queued_requests
    options["ray_actor_options"] = actor
    return options


def deployment_entry(name: str, p: Placement) -> dict:
    """One ``deployments:`` item of the Serve config."""
    return {"name": name, **deployment_options(p)}


def deployment_entries(cfg: BarkConfig) -> list[dict]:
    entries = [deployment_entry(INGRESS_NAME, cfg.orchestrator)]
    entries += [deployment_entry(DEPLOYMENT_NAMES[s], cfg.stage(s)) for s in STAGES]
    if cfg.batch.enabled:
        entries.append(deployment_entry(BATCH_WORKER_NAME, cfg.batch.worker))
    if cfg.voice_cloning.enabled:
        entries.append(deployment_entry(VOICE_ENCODER_NAME, cfg.voice_cloning))
    return entries


def render_serve_config(cfg: BarkConfig) -> dict:
    """The Serve config document (a dict ready for yaml.safe_dump)."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.http_host, "port": cfg.http_port},
        "applications": [{
            "name": cfg.app_name,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": cfg.model_dump(mode="json"),
            "deployments": deployment_entries(cfg),
        }],
    }


# Serve checks a new HTTP proxy's readiness 3 times, each given RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S (5 s by
# default), then kills and restarts it. On a host whose cores are all busy the proxy takes longer than that to
# import and answer, so it is restarted over and over and serve.start gives up after its fixed 60 s (measured
# on 2 cores beside a 2-thread GEMM loop: never up in two tries; with 30 s, up in 60 s and 65 s).
PROXY_READY_ENV = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"
PROXY_READY_S = "30"


def patient_proxy_start() -> None:
    """Before ``ray.init`` starts a local instance: its processes (which inherit this environment) give a
    starting Serve proxy PROXY_READY_S to answer, unless the variable is set already."""
    os.environ.setdefault(PROXY_READY_ENV, PROXY_READY_S)


def pool_resources(cfg: BarkConfig, units_per_pool: int = 64) -> dict[str, float]:
    """Custom resources a single local node advertises so that every pool of ``cfg`` fits on it."""
    return pool_resource_map(cfg.pools(), units_per_pool)


def replica_asks(cfg: BarkConfig) -> list[tuple[str, int, dict[str, float]]]:
    """(deployment, replicas it starts with, what one replica asks: ``CPU``, ``GPU``, custom resources)."""
    out = []
    for entry in deployment_entries(cfg):
        actor = entry["ray_actor_options"]
        ask = {"CPU": float(actor.get("num_cpus", 1.0))}
        if actor.get("num_gpus"):
            ask["GPU"] = float(actor["num_gpus"])
        ask.update({k: float(v) for k, v in actor.get("resources", {}).items()})
        auto = entry.get("autoscaling_config") or {}
        replicas = entry.get("num_replicas") or auto.get("initial_replicas") or auto.get("min_replicas") or 0
        out.append((entry["name"], max(int(replicas), 1), {k: v for k, v in ask.items() if v > 0}))
    return out


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items())) or "nothing"


def placement_problems(cfg: BarkConfig, nodes: list[dict[str, float]]) -> list[str]:
    """Why the deployments of ``cfg`` cannot all start on a cluster of ``nodes`` (each node's total
    resources, as ``ray.nodes()`` gives them); [] when nothing is certainly wrong. Two certain
    problems: a replica that no single node can hold, and a resource that all starting replicas
    together ask more of than the whole cluster has. (A cluster that is big enough in sum but
    fragmented is left to Serve, which reports replicas waiting to be scheduled after 30 s.)"""
    problems = []
    asks = replica_asks(cfg)
    for name, _, ask in asks:
        if not any(all(node.get(k, 0.0) >= v for k, v in ask.items()) for node in nodes):
            largest = {k: max((node.get(k, 0.0) for node in nodes), default=0.0) for k in ask}
            problems.append(f"deployment {name} cannot be placed: one replica asks {_fmt(ask)}, and no node has it "
                            f"(the most any node has: {_fmt(largest)})")
    totals: dict[str, float] = {}
    for node in nodes:
        for k, v in node.items():
            totals[k] = totals.get(k, 0.0) + v
    demand: dict[str, float] = {}
    for _, replicas, ask in asks:
        for k, v in ask.items():
            demand[k] = demand.get(k, 0.0) + replicas * v
    for k, need in sorted(demand.items()):
        if need > totals.get(k, 0.0) + 1e-9:
            who = ", ".join(f"{name} {replicas} x {ask[k]:g}" for name, replicas, ask in asks if k in ask)
            problems.append(f"the deployments ask {need:g} {k} in all ({who}), the cluster has "
                            f"{totals.get(k, 0.0):g}")
    return problems


def live_placement_problems(cfg: BarkConfig) -> list[str]:
    """:func:`placement_problems` on the live nodes of the Ray cluster this process is connected to."""
    import ray

    return placement_problems(cfg, [n["Resources"] for n in ray.nodes() if n.get("Alive")])

"""Pools: where on the cluster each deployment (or Ray Data stage) runs.

A pool is a Ray custom resource, ``bark_pool_<name>``, that the nodes of that
pool advertise (KubeRay worker groups, or one local node advertising all of
them) and that every replica of a deployment placed there asks one unit of.
"""

from __future__ import annotations

from collections.abc import Iterable

POOL_RESOURCE_PREFIX = "bark_pool_"
POOL_RESOURCE_UNITS = 1  # each replica takes one unit of its pool's resource


def pool_resource(pool: str) -> str:
    """The custom resource that pins a replica to ``pool``."""
    return f"{POOL_RESOURCE_PREFIX}{pool}"


def pool_resource_map(pools: Iterable[str], units_per_pool: int = 64) -> dict[str, float]:
    """Custom resources one node advertises so that every replica of these pools fits on it."""
    return {pool_resource(pool): float(units_per_pool) for pool in pools}


def ray_placement() -> dict:
    """What Ray gave the calling process (a Serve replica): its resources (CPU and GPU shares, pool units) and
    GPU ids; {} outside a Ray worker."""
    import ray

    if not ray.is_initialized():
        return {}
    ctx = ray.get_runtime_context()
    return {"assigned_resources": {k: round(v, 4) for k, v in ctx.get_assigned_resources().items()},
            "gpu_ids": [str(i) for i in ctx.get_accelerator_ids().get("GPU", [])]}

"""Each stage's replicas run only on the node of its pool (a multi-node Ray cluster on one machine)."""

from __future__ import annotations

import pytest

from bark_serve.cluster.ports import free_port
from tests.ray_cluster import local_cluster
from tests.serving.conftest import e2e_config

pytestmark = pytest.mark.slow
POOLS = ("semantic", "coarse", "fine", "codec")


def test_stage_replicas_land_on_their_pool_nodes(tiny_ckpt):
    from bark_serve.cluster.placement import pool_resource

    with local_cluster(1) as cluster:
        pool_nodes = {pool: cluster.add_node(num_cpus=1, resources={pool_resource(pool): 4}) for pool in POOLS}
        _check_placement(tiny_ckpt, cluster, pool_nodes)


def _check_placement(tiny_ckpt, cluster, pool_nodes):
    import ray
    from ray import serve

    from bark_serve.serving.app import build_app
    from bark_serve.serving.config import parse_config

    try:
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        raw = e2e_config(str(tiny_ckpt), port)
        raw["semantic"]["num_replicas"] = 2  # two replicas, both must go to the semantic node
        cfg = parse_config(raw)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg), name="bark", route_prefix="/")
        for pool, node in pool_nodes.items():
            handle = serve.get_deployment_handle(f"{pool.capitalize()}Server", app_name="bark")
            seen = {(s["pid"], s["node_id"]) for s in (handle.stats.remote().result() for _ in range(24))}
            assert {node_id for _, node_id in seen} == {node.node_id}, pool
            if pool == "semantic":
                assert len(seen) == 2  # both replicas answered, from the semantic node
        head_id = cluster.head_node.node_id
        orch = serve.get_app_handle("bark")
        out = orch.synthesize.remote("Placed.", max_semantic_tokens=5).result()
        assert out["sample_rate"] == 24000
        assert head_id not in {n.node_id for n in pool_nodes.values()}
    finally:
        serve.shutdown()
        ray.shutdown()

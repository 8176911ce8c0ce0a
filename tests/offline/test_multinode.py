"""A three-node Ray cluster (ray.cluster_utils.Cluster): each stage's actors run only on the node that
advertises its pool resource; the head (no pool) plans."""

from __future__ import annotations

import json

import pytest

from bark_serve.offline.run import RunOptions, run_dataset
from bark_serve.serving.config import parse_config
from tests.offline.conftest import manifest, offline_config
from tests.ray_cluster import local_cluster

pytestmark = pytest.mark.slow


def test_each_stage_runs_only_where_its_pool_is(tiny_ckpt, tmp_path):
    import ray

    with local_cluster(2) as cluster:
        gen = cluster.add_node(num_cpus=2, resources={"bark_pool_gen": 4})
        dec = cluster.add_node(num_cpus=2, resources={"bark_pool_dec": 4})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        try:
            raw = offline_config(str(tiny_ckpt))
            for stage, pool in (("semantic", "gen"), ("coarse", "gen"), ("fine", "dec"), ("codec", "dec")):
                raw[stage]["pool"] = pool
            src = tmp_path / "in.jsonl"
            src.write_text("".join(json.dumps({"id": f"n{i}", "text": f"Placed row {i}.", "seed": i,
                                               "options": {"max_semantic_tokens": 6}}) + "\n" for i in range(4)))
            summary = run_dataset(parse_config(raw), RunOptions(str(src), str(tmp_path / "out"), progress=False))
            assert summary.rows_ok == 4
            assert summary.nodes == {"semantic": [gen.node_id], "coarse": [gen.node_id],
                                     "fine": [dec.node_id], "codec": [dec.node_id]}
            assert all(r["status"] == "ok" for r in manifest(tmp_path / "out").values())
        finally:
            ray.shutdown()

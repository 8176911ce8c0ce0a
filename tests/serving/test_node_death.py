"""A worker node dies (issue 25): a head and worker nodes on this machine (ray.cluster_utils.Cluster starts
each node's own GCS-registered raylet, as `ray start` does), the stages in a pool that two worker nodes
offer, the orchestrator and batch workers on the head. The node holding the stage replicas is killed
(its raylet and every process it started, no goodbye) once under interactive load and once during a batch
job. What clients see, what is lost (a batch job: nothing lost, nothing duplicated) and how long recovery
takes are printed for docs/RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import Counter

import httpx
import pytest

from bark_serve.cluster.placement import pool_resource_map
from bark_serve.cluster.ports import free_port
from tests.cluster.redis_server import RedisServer
from tests.ray_cluster import local_cluster
from tests.serving.conftest import API_KEY, e2e_config
from tests.serving.e2e_helpers import AUTH

pytestmark = pytest.mark.slow

OPTS = {"max_semantic_tokens": 10, "temperature": 0, "min_eos_p": None}


def node_config(tiny_ckpt, port: int, redis_url: str) -> dict:
    raw = e2e_config(str(tiny_ckpt), port)
    for stage in ("semantic", "coarse", "fine", "codec"):
        raw[stage]["pool"] = "work"  # two worker nodes offer it
    raw["orchestrator"]["pool"] = "head"
    raw["batch"] = {"enabled": True, "redis_url": redis_url, "claim_timeout_s": 6, "max_in_flight": 4,
                    "worker": {"num_replicas": 1, "num_cpus": 0.1, "pool": "head"}}
    return raw


def work_node(cluster):
    return cluster.add_node(num_cpus=2, resources=pool_resource_map(["work"], 8))


@contextlib.contextmanager
def cluster_app(raw: dict):
    import ray
    from ray import serve

    from bark_serve.serving.app import build_app
    from bark_serve.serving.config import parse_config

    os.environ["BARK_E2E_API_KEYS"] = f"{API_KEY},second-key"  # before the nodes start: their workers inherit it
    with local_cluster(2, pool_resource_map(["head"], 8)) as cluster:
        nodes = [work_node(cluster), work_node(cluster)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        try:
            cfg = parse_config(raw)
            serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": cfg.http_port})
            serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")
            yield f"http://127.0.0.1:{cfg.http_port}", cluster, nodes
        finally:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()


def stage_nodes() -> Counter:
    """Node id -> how many stage replicas (of the four stage deployments) are alive there."""
    from ray._private import state

    return Counter(a["Address"]["NodeID"] for a in state.actors().values()
                   if a["State"] == "ALIVE" and "ServeReplica" in a["ActorClassName"]
                   and any(s in a["ActorClassName"] for s in ("Semantic", "Coarse", "Fine", "Codec")))


def kill_busiest(cluster, nodes: list):
    """Kill (no graceful stop) the worker node that holds the most stage replicas; -> (node, replicas it held)."""
    held = stage_nodes()
    victim = max(nodes, key=lambda n: held.get(n.node_id, 0))
    assert held.get(victim.node_id, 0) > 0, held
    cluster.remove_node(victim, allow_graceful=False)
    nodes.remove(victim)
    return victim, held[victim.node_id]


def tts(url: str, i: int) -> tuple[int, float, str | None]:
    """-> (status, when it was sent, its Retry-After header)"""
    t0 = time.monotonic()
    try:
        r = httpx.post(url + "/v1/tts", json={"text": f"Node death request {i}.", **OPTS, "seed": i}, headers=AUTH,
                       timeout=180)
        return r.status_code, t0, r.headers.get("retry-after")
    except httpx.HTTPError:
        return -1, t0, None  # a broken connection


def test_a_worker_node_dies_under_load_and_during_a_batch_job(tiny_ckpt, tmp_path):
    redis_srv = RedisServer(tmp_path / "redis").start()
    try:
        with cluster_app(node_config(tiny_ckpt, free_port(), redis_srv.url)) as (url, cluster, nodes):
            assert tts(url, 0)[0] == 200
            # --- under interactive load --------------------------------------------------------------
            answers: list[tuple[int, float, float]] = []  # (status, started, finished)
            refusals: list[str | None] = []  # each 503's Retry-After
            stop = threading.Event()

            def client(k: int):
                i = k * 1000
                while not stop.is_set():
                    status, t0, retry_after = tts(url, i)
                    answers.append((status, t0, time.monotonic()))
                    if status == 503:
                        refusals.append(retry_after)
                    i += 1

            threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
            for t in threads:
                t.start()
            time.sleep(6)
            victim, held = kill_busiest(cluster, nodes)
            t_kill = time.monotonic()
            recovered = None
            while time.monotonic() - t_kill < 240:  # recovered: a request started after the kill answered 200
                done = [a for a in answers if a[1] > t_kill and a[0] == 200]
                if done:
                    recovered = min(a[2] for a in done) - t_kill
                    break
                time.sleep(0.2)
            time.sleep(3)
            stop.set()
            for t in threads:
                t.join(200)
            statuses = Counter(a[0] for a in answers)
            in_flight = Counter(a[0] for a in answers if a[1] < t_kill < a[2])
            print(f"\nnode death under load: {held} stage replicas on the killed node; answers {dict(statuses)} "
                  f"(in flight at the kill: {dict(in_flight)}); a new request answered 200 "
                  f"{recovered:.1f} s after the kill" if recovered is not None else "never recovered")
            assert recovered is not None, statuses
            assert set(statuses) <= {200, 503}, statuses  # retried or refused with Retry-After, never a 500
            assert all(r is not None and int(r) >= 1 for r in refusals), refusals
            assert statuses[200] > len(in_flight) and in_flight.get(200, 0) >= 1
            # --- during a batch job (a replacement node joined, as an autoscaler would add one) ---------
            nodes.append(work_node(cluster))
            cluster.wait_for_nodes()
            n = 24
            body = "".join(json.dumps({"id": f"n{i:02d}", "text": f"Batch line {i}.", "seed": i, "options": OPTS})
                           + "\n" for i in range(n))
            job = httpx.post(url + "/v1/batches", content=body, timeout=60,
                             headers={**AUTH, "Content-Type": "application/jsonl"}).json()
            deadline = time.monotonic() + 300
            while httpx.get(f"{url}/v1/batches/{job['id']}", headers=AUTH).json()["counts"]["succeeded"] < 4:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            victim, held = kill_busiest(cluster, nodes)
            t_kill = time.monotonic()
            while (info := httpx.get(f"{url}/v1/batches/{job['id']}", headers=AUTH).json())["status"] != "completed":
                assert time.monotonic() < deadline, info
                time.sleep(0.5)
            took = time.monotonic() - t_kill
            lines = httpx.get(f"{url}/v1/batches/{job['id']}/results", headers=AUTH, timeout=60).text.splitlines()
            results = [json.loads(x) for x in lines if json.loads(x)["type"] == "result"]
            ids = [r["id"] for r in results]
            attempts = Counter(r["attempts"] for r in results)
            print(f"node death during a batch job: {held} stage replicas on the killed node; {n} items: "
                  f"{info['counts']}; attempts {dict(attempts)}; finished {took:.1f} s after the kill")
            assert sorted(ids) == [f"n{i:02d}" for i in range(n)]  # nothing lost, nothing twice
            assert info["counts"]["succeeded"] == n and all(r["state"] == "succeeded" for r in results)
    finally:
        redis_srv.stop(kill=True)

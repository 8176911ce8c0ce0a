"""``bark-serve batch submit`` rides out outages; a batch item whose stage replica died is retried, not failed.

Fast tests (real Redis, real uvicorn, no Ray): the CLI survives a Redis SIGKILL + restart (AOF) with exit 0
and one notice line; with Redis down past ``--timeout`` it exits 3 (resumable), not 1; an item whose
synthesis raised Ray's ActorDiedError is retried (after a backoff) and succeeds.
End to end (real Ray, the real app, real Redis): a ``batch submit`` subprocess survives a killed BatchWorker
replica, a killed ingress replica and a Redis SIGKILL + restart in one run: exit 0, one result per item.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from bark_serve.cli.batch import add_batch_commands, run
from bark_serve.cluster.batch_types import BatchKeys, ItemState
from bark_serve.cluster.batch_worker import BatchWorkerLoop
from bark_serve.cluster.jobs import JobStore
from bark_serve.cluster.queue import WorkQueue
from tests.cli.test_batch_cli import LiveServer
from tests.cluster.helpers import FakeSynth, all_results, expected_audio, records, wait_finished
from tests.cluster.redis_server import RedisServer, own_redis, prefix, redis_server  # noqa: F401  (fixtures)
from tests.serving.conftest import API_KEY
from tests.serving.e2e_helpers import running_app
from tests.serving.test_batch_e2e import batch_config

AUTH = {"Authorization": f"Bearer {API_KEY}"}
OPTS = {"max_semantic_tokens": 12, "temperature": 0, "min_eos_p": None}


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="bark-serve")
    add_batch_commands(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(list(argv)))


def write_items(path: Path, n: int, prefix: str = "s") -> Path:
    path.write_text("".join(json.dumps({"id": f"{prefix}{i:02d}", "text": f"say {i}"}) + "\n" for i in range(n)))
    return path


def outage(server: RedisServer, after_s: float, down_s: float) -> threading.Thread:
    """In a thread: after ``after_s``, SIGKILL redis-server, keep it down ``down_s``, start it again (same AOF)."""

    def run_outage():
        time.sleep(after_s)
        server.stop(kill=True)
        time.sleep(down_s)
        server.start()

    thread = threading.Thread(target=run_outage, daemon=True)
    thread.start()
    return thread


def test_submit_rides_out_a_redis_kill_and_restart(own_redis, tmp_path, capsys):
    synth = FakeSynth(delay_s=0.1)  # 30 items, 2 at a time: ~1.5 s of work
    src, out = write_items(tmp_path / "items.jsonl", 30), tmp_path / "out"
    with LiveServer(own_redis.url, "rr", synth, max_in_flight=2) as server:
        down = outage(own_redis, after_s=0.6, down_s=2.0)
        code = cli("batch", "submit", str(src), "--out", str(out), "--url", server.url, "--quiet", "--timeout", "120")
        down.join()
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Traceback" not in err and 1 <= err.count("notice: server unavailable") <= 2, err
    assert sorted(p.name for p in out.glob("*.wav")) == [f"s{i:02d}.wav" for i in range(30)]
    assert all((out / f"s{i:02d}.wav").read_bytes() == expected_audio(f"s{i:02d}", f"say {i}") for i in range(30))
    assert not (out / "failed.jsonl").exists()


def test_an_outage_longer_than_the_timeout_exits_3_and_a_rerun_finishes(own_redis, tmp_path, capsys):
    src, out = write_items(tmp_path / "items.jsonl", 6), tmp_path / "out"
    with LiveServer(own_redis.url, "rt", FakeSynth(), max_in_flight=2) as server:
        own_redis.stop(kill=True)
        t0 = time.monotonic()
        code = cli("batch", "submit", str(src), "--out", str(out), "--url", server.url, "--quiet", "--timeout", "3")
        waited = time.monotonic() - t0
        err = capsys.readouterr().err
        assert code == 3 and 2.0 < waited < 10, (code, waited, err)
        assert err.count("notice: server unavailable") == 1 and "503" in err and "Traceback" not in err
        own_redis.start()
        assert cli("batch", "submit", str(src), "--out", str(out), "--url", server.url, "--quiet") == 0
    assert len(list(out.glob("*.wav"))) == 6


def test_an_item_whose_stage_replica_died_is_retried_not_failed(redis_server, prefix):
    from ray.exceptions import ActorDiedError

    calls: dict[str, int] = {}

    async def synthesize(item):
        calls[item.item_id] = calls.get(item.item_id, 0) + 1
        if item.item_id == "i001" and item.attempt == 1:
            raise ActorDiedError()  # what a stage call raises when its replica was SIGKILLed
        return await FakeSynth()(item)

    async def scenario():
        client = aioredis.Redis.from_url(redis_server.url)
        keys = BatchKeys(prefix)
        store, queue = JobStore(client, keys=keys), WorkQueue(client, keys=keys)
        job = (await store.submit(records(["a", "b", "c"]))).job
        worker = BatchWorkerLoop(queue, synthesize, max_in_flight=2, claim_timeout_s=5, retry_backoff_s=0.3)
        task = asyncio.create_task(worker.run())
        t0 = time.monotonic()
        info = await wait_finished(store, job.job_id, timeout_s=30)
        elapsed = time.monotonic() - t0
        results = await all_results(store, job.job_id)
        await worker.stop(grace_s=1)
        await task
        await client.aclose()
        return info, results, worker.stats, elapsed

    info, results, stats, elapsed = asyncio.run(scenario())
    by_id = {r.item_id: r for r in results}
    assert info.counts.succeeded == 3 and info.counts.failed == 0
    assert by_id["i001"].state is ItemState.SUCCEEDED and by_id["i001"].attempts == 2 and calls["i001"] == 2
    assert stats.retried == 1 and stats.failed == 0 and elapsed >= 0.3  # requeued after the backoff


# -- end to end ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batch_stack(tiny_ckpt, tmp_path_factory):
    """Redis (AOF) + a Ray instance of its own with the app and two BatchWorker replicas."""
    redis_srv = RedisServer(tmp_path_factory.mktemp("redis-faults")).start()
    try:
        with running_app(batch_config(tiny_ckpt, redis_srv)) as url:
            yield url, redis_srv
    finally:
        redis_srv.stop(kill=True)


def kill_replica(deployment: str) -> None:
    """Kill one replica actor of ``deployment`` (Serve starts a new one)."""
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if deployment in a["name"]]
    assert names, f"no {deployment} replica found"
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=False)


def wait_files(out: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while len(list(out.glob("*.wav"))) < n:
        assert proc.poll() is None, f"the CLI ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"fewer than {n} results after {timeout} s"
        time.sleep(0.2)


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def wait_healthy(url: str, timeout: float = 120) -> float:
    """Poll /healthz until it fails (the kill took effect; ray.kill is asynchronous) and then answers 200
    again; -> the monotonic time it did."""
    deadline = time.monotonic() + 10
    while healthy(url) and time.monotonic() < deadline:
        time.sleep(0.05)
    deadline = time.monotonic() + timeout
    while not healthy(url):
        assert time.monotonic() < deadline, f"/healthz not 200 within {timeout} s"
        time.sleep(0.1)
    return time.monotonic()


def get_json(url: str, tries: int = 20) -> tuple[int, list[dict]]:
    """GET JSON / JSONL from the API, waiting out 503s; -> (503 answers seen, records)."""
    for busy in range(tries):
        r = httpx.get(url, headers=AUTH, timeout=120)
        if r.status_code != 503:
            assert r.status_code == 200, r.text[:300]
            return busy, [json.loads(line) for line in r.text.splitlines() if line.strip()]
        time.sleep(0.5)
    raise AssertionError(f"{url} answered 503 {tries} times")


@pytest.mark.slow
def test_cli_submit_survives_worker_redis_and_ingress_kills(batch_stack, tmp_path):
    url, redis_srv = batch_stack
    n = 48
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"id": f"f{i:02d}", "text": f"Fault line number {i}.", "options": OPTS}) + "\n"
                             for i in range(n)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bark_serve.cli", "batch", "submit", str(items), "--out", str(out),
           "--url", url, "--api-key", API_KEY, "--quiet", "--timeout", "400"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_files(out, 4, proc)
        kill_replica("BatchWorker")  # its items are taken over after claim_timeout_s
        wait_files(out, 10, proc)
        redis_srv.stop(kill=True)  # SIGKILL: what was acknowledged is in the AOF
        time.sleep(3.0)  # the CLI, the API and the workers all see Redis down
        redis_srv.start()
        wait_files(out, 20, proc)
        kill_replica("Orchestrator")  # the CLI's HTTP server: broken streams / 5xx until Serve restarts it
        t_kill = time.monotonic()
        ingress_back_s = wait_healthy(url) - t_kill
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    elapsed = time.monotonic() - t0
    print(f"\nbatch submit of {n} items through a worker kill, a Redis kill and an ingress kill: exit "
          f"{proc.returncode} in {elapsed:.1f} s; the killed ingress answered /healthz again after "
          f"{ingress_back_s:.1f} s\n{stderr}")
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and stderr.count("notice: server unavailable") >= 2, stderr  # Redis, ingress
    assert sorted(p.name for p in out.glob("*.wav")) == [f"f{i:02d}.wav" for i in range(n)]
    job_id = json.loads((out / ".bark-batch.json").read_text())["job_id"]
    busy, records = get_json(f"{url}/v1/batches/{job_id}/results")
    ids = [rec["id"] for rec in records if rec.get("type") == "result"]
    assert len(ids) == len(set(ids)) == n  # exactly one result per item
    _, (status,) = get_json(f"{url}/v1/batches/{job_id}")
    assert status["status"] == "completed" and status["counts"]["succeeded"] == n
    print(f"503 answers to the first status reads after the run: {busy}")

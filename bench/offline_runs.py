"""(5) Whole-dataset paths: ``bark-serve dataset`` (Ray Data) and ``/v1/batches`` (Serve + Redis), same workload.

Both take the workload as a table of items (greedy, the workload's semantic length) and report the
throughput of the whole job, from start to the last item. The transformers baselines (1) and (2) of
the same bench run are the reference the ratios use. Each run starts its own local Ray instance.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from bark_serve.cluster.ports import free_port
from bark_serve.stages.constants import STAGES

from .workload import SEGMENT_TOKENS, Run, Workload

RAW = {"trim_silence": False, "crossfade_ms": 0, "normalize_loudness": False}  # the model's samples, as (1)-(4)


def workload_rows(work: Workload, n: int) -> list[dict]:
    """The workload's first n requests as items: greedy, each with its own semantic cap, raw samples."""
    return [{"id": f"w{i}", "text": r.text, **({"voice": r.voice} if r.voice else {}),
             "options": {"temperature": 0, "min_eos_p": None, "max_semantic_tokens": r.semantic_tokens, **RAW}}
            for i, r in enumerate(work.requests(n))]


def _config(model_dir: str, dtype: str, max_batch: int, **overrides):
    from bark_serve.serving.config import load_config

    base = load_config("local-cpu")
    stages = {s: {**base.stage(s).model_dump(), "dtype": dtype, "max_batch": max_batch, "num_cpus": 0.1}
              for s in STAGES}
    # every sentence of the workload one segment, as in the served runs (bench/workload.py)
    orchestrator = {"segment_max_tokens": SEGMENT_TOKENS, "first_segment_max_tokens": None}
    return load_config("local-cpu", {"model": model_dir, **stages, "orchestrator": orchestrator, **overrides})


def _ray_init(cfg, tmp: str) -> None:
    import ray

    from bark_serve.serving.serve_config import patient_proxy_start, pool_resources

    patient_proxy_start()
    ray.init(address="local", resources=pool_resources(cfg), include_dashboard=False, log_to_driver=False,
             configure_logging=False, _temp_dir=tmp)


def dataset_run(model_dir: str, work: Workload, n: int, dtype: str, max_batch: int) -> Run:
    """``bark-serve dataset`` on a JSONL of the workload (Ray startup excluded, actor startup included)."""
    import ray

    from bark_serve.offline.run import RunOptions, run_dataset

    cfg = _config(model_dir, dtype, max_batch)
    tmp = tempfile.mkdtemp(prefix="bark-bench-", dir="/tmp")
    src = Path(tmp) / "items.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in workload_rows(work, n)))
    _ray_init(cfg, tmp)
    try:
        summary = run_dataset(cfg, RunOptions(str(src), str(Path(tmp) / "out"), progress=False))
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    run = Run(f"dataset_batch{max_batch}_{dtype}", audio_s=summary.audio_s, wall_s=summary.wall_s,
              extra={"dtype": dtype, "batch": max_batch, "failed_requests": summary.rows_failed,
                     "stages_busy_s": {k: round(v, 3) for k, v in summary.busy_s.items()}})
    run.latencies = [summary.wall_s] * summary.rows_ok  # a job: every item is done when the job is
    return run


def batches_run(model_dir: str, work: Workload, n: int, dtype: str, max_batch: int) -> Run:
    """The same items as one ``/v1/batches`` job on the served app with a local Redis (app startup excluded)."""
    import httpx
    import ray
    from ray import serve

    from bark_serve.cluster.local_redis import LocalRedis
    from bark_serve.serving.app import make_app

    tmp = tempfile.mkdtemp(prefix="bark-bench-", dir="/tmp")
    redis = LocalRedis.start(Path(tmp) / "redis")
    port = free_port()
    cfg = _config(model_dir, dtype, max_batch, http_host="127.0.0.1", http_port=port,
                  batch={"enabled": True, "redis_url": redis.url, "max_in_flight": max_batch,
                         "worker": {"num_cpus": 0.1}})
    _ray_init(cfg, tmp)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(make_app(cfg), name=cfg.app_name, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        body = "".join(json.dumps(r) + "\n" for r in workload_rows(work, n))
        t0 = time.perf_counter()
        job = httpx.post(url + "/v1/batches", content=body, headers={"Content-Type": "application/jsonl"},
                         timeout=120).json()
        while (info := httpx.get(f"{url}/v1/batches/{job['id']}", timeout=60).json())["status"] != "completed":
            time.sleep(0.2)
        wall = time.perf_counter() - t0
        lines = httpx.get(f"{url}/v1/batches/{job['id']}/results", timeout=120).text.splitlines()
        results = [json.loads(line) for line in lines if line.strip()]
        audio_s = sum(r.get("duration_s") or 0.0 for r in results if r.get("state") == "succeeded")
    finally:
        serve.shutdown()
        ray.shutdown()
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    run = Run(f"batches_inflight{max_batch}_{dtype}", audio_s=audio_s, wall_s=wall,
              extra={"dtype": dtype, "batch": max_batch, "failed_requests": info["counts"]["failed"]})
    run.latencies = [wall] * info["counts"]["succeeded"]
    return run

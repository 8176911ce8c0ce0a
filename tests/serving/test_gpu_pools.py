"""Issue 22: the `single-gpu` profile is four stage pools on one GPU. On a local Ray node that advertises one
(fake) GPU, each stage replica lands on its own pool with its fractional share of GPU 0, the voice encoder
takes the share the stages leave, the orchestrator takes none, and every replica reports where it computes
(its stats and /metrics). Only the stages' torch device is overridden to CPU: this machine has no CUDA."""

from __future__ import annotations

import time

import httpx
import pytest

from bark_serve.cluster.ports import free_port
from tests.serving.conftest import API_KEY, e2e_config

pytestmark = pytest.mark.slow
STAGES = ("semantic", "coarse", "fine", "codec")
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def single_gpu_on_cpu(model: str, port: int) -> dict:
    """The single-gpu profile as shipped, with the torch device (not the placement) moved to the CPU."""
    from bark_serve.serving.config import load_config

    raw = load_config("single-gpu").model_dump(mode="json")
    base = e2e_config(model, port)
    for stage in STAGES:
        raw[stage].update(device="cpu", dtype="float32", torch_threads=1, max_batch=4, batch_wait_ms=5)
    raw["voice_cloning"].update(device="cpu", store_dir=base["voice_cloning"]["store_dir"])
    raw.update(model=model, http_host="127.0.0.1", http_port=port,
               orchestrator={**raw["orchestrator"], "api_keys_env": "BARK_E2E_API_KEYS"})
    return raw


def test_the_single_gpu_profile_gives_each_stage_its_own_pool_and_a_share_of_the_one_gpu(tiny_ckpt):
    import ray
    from ray import serve

    from bark_serve.serving.config import load_config
    from tests.serving.e2e_helpers import running_app

    profile = load_config("single-gpu")
    pools = {s: profile.stage(s).pool for s in STAGES}
    assert len(set(pools.values())) == 4 and profile.orchestrator.num_gpus == 0
    shares = {s: profile.stage(s).num_gpus for s in STAGES}
    assert all(0 < v < 1 for v in shares.values())
    assert abs(sum(shares.values()) + profile.voice_cloning.num_gpus - 1.0) < 1e-9  # the encoder's share is left
    assert profile.stage("semantic").max_batch == 64 and profile.stage("semantic").dtype == "auto"

    raw = single_gpu_on_cpu(str(tiny_ckpt), free_port())
    metrics_port = free_port()
    with running_app(raw, metrics_port=metrics_port, num_cpus=6, num_gpus=1) as url:
        assert ray.cluster_resources().get("GPU") == 1.0
        out = httpx.post(url + "/v1/tts", json={"text": "On one GPU.", "max_semantic_tokens": 6}, headers=AUTH,
                         timeout=120)
        assert out.status_code == 200 and out.content[:4] == b"RIFF"
        for stage in STAGES:
            handle = serve.get_deployment_handle(f"{stage.capitalize()}Server", app_name="bark")
            report = handle.stats.remote().result()["device"]
            assigned = report["assigned_resources"]
            assert assigned.get("GPU") == pytest.approx(shares[stage]), (stage, assigned)
            assert assigned.get(f"bark_pool_{pools[stage]}") == 1.0, (stage, assigned)
            assert not any(k.startswith("bark_pool_") and k != f"bark_pool_{pools[stage]}" for k in assigned)
            assert report["gpu_ids"] == ["0"] and report["cuda_visible_devices"] == "0", report  # the one GPU
            assert report["device"] == "cpu" and report["torch_threads"] == 1
        orchestrator = serve.get_app_handle("bark").stats.remote().result(timeout_s=30)
        assert "GPU" not in orchestrator["assigned_resources"] and orchestrator["gpu_ids"] == [], orchestrator
        encoder = serve.get_deployment_handle("VoiceEncoder", app_name="bark").stats.remote().result(timeout_s=30)
        assert encoder["assigned_resources"].get("GPU") == pytest.approx(profile.voice_cloning.num_gpus)
        assert encoder["assigned_resources"].get(f"bark_pool_{profile.voice_cloning.pool}") == 1.0
        assert encoder["gpu_ids"] == ["0"]

        # /metrics: where each stage computes, its GPU ids and share
        deadline, lines = time.time() + 90, []
        while time.time() < deadline:
            text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
            lines = [line for line in text.splitlines() if line.startswith("ray_bark_stage_device_info{")]
            if {s for s in STAGES if any(f'stage="{s}"' in line for line in lines)} == set(STAGES):
                break
            httpx.post(url + "/v1/tts", json={"text": "again", "max_semantic_tokens": 4}, headers=AUTH, timeout=120)
            time.sleep(2)
        for stage in STAGES:
            [line] = [line for line in lines if f'stage="{stage}"' in line]
            assert 'gpu_ids="0"' in line and f'gpu_share="{shares[stage]:g}"' in line and 'device="cpu"' in line


def test_a_cuda_replica_reports_its_gpus_name_and_memory(monkeypatch):
    """The CUDA branch of the device report (only a GPU machine takes it; no CUDA here, so torch.cuda's
    queries answer as one H200 would): what a stage replica logs at start and exports."""
    import torch

    from bark_serve.serving.stage_server import _describe
    from bark_serve.stages.engine import device_report

    gib = 2**30
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (asked.append(i), (100 * gib, 140 * gib))[1])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 4 * gib)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    report = device_report("cuda")  # a replica's engine device: "cuda", index None
    assert report["index"] == 0 and asked == [0] and report["name"] == "NVIDIA H200"
    assert (report["free_bytes"], report["total_bytes"]) == (100 * gib, 140 * gib)
    assert (report["allocated_bytes"], report["reserved_bytes"]) == (3 * gib, 4 * gib)
    assert device_report("cuda:1")["index"] == 1 and asked[-1] == 1
    line = _describe({**report, "assigned_resources": {"GPU": 0.3, "bark_pool_semantic": 1.0}, "gpu_ids": ["0"]})
    assert line == ("cuda; NVIDIA H200, 3.00 GiB allocated, 4.00 GiB reserved, 100.0 of 140.0 GiB free; "
                    "CUDA_VISIBLE_DEVICES=0; Ray resources {'GPU': 0.3, 'bark_pool_semantic': 1.0}, GPU ids ['0']")
    assert "name" not in device_report("cpu") and _describe(device_report("cpu")).startswith("cpu; CUDA_VISIBLE")

"""The benchmark runs end to end and reports every number it promises (its speed is not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bench_runs_all_four_configurations(tiny_ckpt, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "bark_serve.cli", "bench", "--model", str(tiny_ckpt), "--semantic-tokens", "8",
           "--hf-requests", "2", "--hf-batches", "2", "--engine-batches", "1,2", "--engine-requests", "2",
           "--concurrency", "1,2", "--served-requests", "2", "--gemm-seconds", "0.2", "--skip", "offline",
           "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(res.stdout) == report
    assert report["gemm_peak_tflops"]["float32"] > 0
    names = [r["name"] for r in report["runs"]]
    assert names[0] == "transformers_sequential_float32" and names[1].startswith("transformers_batch2_")
    assert any(n.startswith("engines_batch2") for n in names)
    assert any(n.startswith("served_concurrency2") for n in names)
    for run in report["runs"]:
        assert run["requests"] >= 1 and run["audio_s"] > 0 and run["throughput_audio_s_per_s"] > 0
        assert run["latency_p95_s"] >= run["latency_p50_s"] > 0
    served = next(r for r in report["runs"] if r["name"].startswith("served_concurrency2"))
    assert 0 < served["ttfa_p50_s"] <= served["latency_p50_s"]
    assert set(served["stages"]) == {"semantic", "coarse", "fine", "codec"}
    assert served["stages"]["fine"]["window_tflops"] > 0 and served["stages"]["coarse"]["prefill_tflops"] > 0
    assert all(v > 0 for v in served["peak_rss_mb_per_replica"].values())
    assert report["dtype"] in report["gemm_peak_tflops"]  # auto: the dtype with the faster measured peak
    assert f"served_concurrency2_{report['dtype']}_vs_transformers_sequential" in report["ratios"]


def test_bench_offline_row_runs_dataset_and_batches(tiny_ckpt, tmp_path):
    """(5): the same items through `bark-serve dataset` and through one /v1/batches job, beside transformers."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "bark_serve.cli", "bench", "--model", str(tiny_ckpt), "--semantic-tokens", "6",
           "--hf-requests", "2", "--hf-batches", "", "--engine-batches", "2", "--offline-requests", "3",
           "--skip", "engines,served", "--gemm-seconds", "0.1", "--dtype", "float32", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = {r["name"]: r for r in report["runs"]}
    assert set(runs) == {"transformers_sequential_float32", "dataset_batch2_float32", "batches_inflight2_float32"}
    for name in ("dataset_batch2_float32", "batches_inflight2_float32"):
        assert runs[name]["requests"] == 3 and runs[name]["failed_requests"] == 0
        assert runs[name]["audio_s"] > 0 and runs[name]["throughput_audio_s_per_s"] > 0
        assert f"{name}_vs_transformers_sequential" in report["ratios"]
    assert all(v > 0 for v in runs["dataset_batch2_float32"]["stages_busy_s"].values())

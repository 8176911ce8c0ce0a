"""The benchmark runs end to end and reports every number it promises (its speed is not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bark_serve.bench.workload import SEGMENT_TOKENS, Workload, mix_named, poisson_arrivals

pytestmark = pytest.mark.slow


def test_bench_runs_every_configuration_and_draws_its_plots(tiny_ckpt, tmp_path):
    out, plots = tmp_path / "bench.json", tmp_path / "plots"
    cmd = [sys.executable, "-m", "bark_serve.cli", "bench", "--model", str(tiny_ckpt), "--mix", "ci-tiny",
           "--hf-requests", "2", "--hf-batches", "2", "--hf-orders", "given,sorted", "--engine-batches", "2",
           "--engine-requests", "2", "--engine-orders", "longest,given", "--cuda-graphs", "off,on",
           "--decode-steps", "3",
           "--concurrency", "1,2", "--served-requests", "3", "--rate-fractions", "0.5,0.7",
           "--gemm-seconds", "0.2", "--skip", "offline", "--max-batch", "2,fine=1",
           "--out", str(out), "--plots", str(plots)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(res.stdout) == report
    assert report["gemm_peak_tflops"]["float32"] > 0
    assert report["workload"]["mix"] == "ci-tiny" and "lognormal" in report["workload"]["distribution"]
    names = [r["name"] for r in report["runs"]]
    # the engines first (a run cut short keeps them), once per --cuda-graphs setting and admission order,
    # then transformers
    assert names[0].startswith("engines_batch2_") and names[0].endswith("_graphs-off")
    assert names[1].startswith("engines_batch2_") and names[1].endswith("_graphs-off_given")
    assert names[2].startswith("engines_batch2_") and names[2].endswith("_graphs-on")
    assert names[3].startswith("engines_batch2_") and names[3].endswith("_graphs-on_given")
    assert [r["order"] for r in report["runs"][:4]] == ["longest", "given"] * 2
    assert names[4] == "transformers_sequential_float32" and names[5].startswith("transformers_batch2_")
    given, by_length = report["runs"][5], report["runs"][6]  # the same segments, batched in two orders
    assert (given["order"], by_length["order"]) == ("given", "sorted") and by_length["name"].endswith("_sorted")
    assert by_length["audio_s"] == pytest.approx(given["audio_s"], rel=1e-3)
    assert set(report["floors"]["engines_vs_transformers_best_batch_by_order"]) == {"given", "sorted"}
    for run in report["runs"][:4]:  # no admission order runs fewer steps than the bound
        assert set(run["steps_bound"]) == {"semantic", "coarse"}
        assert all(b["steps"] >= b["bound"] >= b["longest_request"] > 0 for b in run["steps_bound"].values())
    steps = report["decode_steps"]  # CPU: wall time only; the fixed-shape path runs eagerly ("on")
    assert {(r["stage"], r["setting"]) for r in steps} == {(s, g) for s in ("semantic", "coarse", "fine")
                                                           for g in ("off", "on")}
    assert all(r["batch"] == 2 and r["wall_ms"] > 0 and r["gpu_ms"] is None and not r["cuda_graphs"] for r in steps)
    assert all(r["replayed_steps"] == 0 and r["copy_ms"] is None and "error" not in r for r in steps)
    assert "failures" not in report
    assert report["floors"]["engines_vs_transformers_best_batch"] > 0
    assert any(n.startswith("served_concurrency2") for n in names)
    for run in report["runs"]:
        assert run["requests"] >= 1 and run["audio_s"] > 0 and run["throughput_audio_s_per_s"] > 0
        assert run["latency_p99_s"] >= run["latency_p95_s"] >= run["latency_p50_s"] > 0
    served = next(r for r in report["runs"] if r["name"].startswith("served_concurrency2"))
    assert 0 < served["ttfa_p50_s"] <= served["latency_p50_s"]
    assert served["max_batch"] == {"semantic": 2, "coarse": 2, "fine": 1, "codec": 2}
    assert set(served["stages"]) == {"semantic", "coarse", "fine", "codec"}
    assert served["stages"]["fine"]["window_tflops"] > 0 and served["stages"]["coarse"]["prefill_tflops"] > 0
    assert 0 < served["stages"]["coarse"]["busy_frac"] <= 1.5  # step time / wall (two replicas may overlap)
    for stage, row in served["stages"].items():  # where the time goes: step length, batch fill, graph replays
        assert row["step_ms"] > 0 and 1 <= row["mean_rows"] <= served["max_batch"][stage], (stage, row)
        assert row["graph_step_frac"] == 0.0  # CPU: no graph replays
    assert served["hops"]["handoff"]["semantic->coarse"]["n"] == served["segments"]
    assert served["hops"]["hop"]["semantic->coarse"]["n"] == served["requests"]
    assert all(v["p95_ms"] >= v["p50_ms"] >= 0 for v in served["hops"]["queue_wait"].values())
    last = served["last_request"]  # the request the run ended with: its share of the wall time
    assert 0 < last["share_of_wall"] <= 1.0 and last["segments"] >= 1 and last["latency_s"] > 0
    app = report["served_app"]  # what the served runs ran on, per stage
    assert app["warmup_request_s"] > 0
    assert set(app["stages"]) == {"semantic", "coarse", "fine", "codec"}
    assert app["stages"]["fine"]["config"]["max_batch"] == 1 and app["stages"]["semantic"]["capacity"] == 2
    assert app["stages"]["semantic"]["device"]["device"] == "cpu"
    # the served runs in the order the floors need: the lone loop, the saturating one, then the Poisson rates
    served_names = [n for n in names if n.startswith("served_")]
    assert served_names[0].startswith("served_concurrency1_") and served_names[1].startswith("served_concurrency2_")
    assert all(n.startswith("served_poisson") for n in served_names[2:])
    assert set(report["timelines"]) == set(served_names)  # every served run keeps its timeline
    assert report["skipped"] == []
    assert 0 < served["roofline"]["frac_of_roofline"] < 1 and served["roofline"]["roofline_audio_s_per_s"] > 0
    assert all(v > 0 for v in served["peak_rss_mb_per_replica"].values())
    kv = served["kv"]["semantic"]
    assert kv["slots_per_gb_at_peak"] > kv["slots_per_gb_at_max_len"] > 0  # short requests reserve short caches
    poisson = [r for r in report["runs"] if r.get("mode") == "poisson"]
    assert [r["rate_fraction_of_saturation"] for r in poisson] == [0.5, 0.7]
    assert report["saturation_rps"] > 0 and report["slo"]["lone_ttfa_p95_s"] > 0
    assert {row["fraction"] for row in report["slo"]["rates"]} == {0.5, 0.7}
    assert set(report["floors"]) >= {"served_frac_of_roofline", "served_vs_transformers_best_batch",
                                     "ttfa_p95_vs_lone_near_70pct"}
    for run in report["runs"]:  # 3 requests, 1 or 2 clients: each closed loop has steady figures
        if run.get("mode") == "closed":
            steady = run["steady"]
            assert (steady["requests"], steady["concurrency"]) == (run["requests"], run["concurrency"])
            assert steady["throughput_audio_s_per_s"] > 0 and steady["requests_per_s"] > 0
    closed = [r for r in report["runs"] if r.get("mode") == "closed"]
    floors = report["floors"]  # whole runs (makespan, as the engines and transformers), the steady figures beside
    assert floors["served_audio_s_per_s"] == max(r["throughput_audio_s_per_s"] for r in closed)
    steady = floors["served_steady"]
    assert steady["served_audio_s_per_s"] == max(r["steady"]["throughput_audio_s_per_s"] for r in closed)
    assert steady["served_vs_transformers_best_batch"] > 0 and 0 < steady["served_frac_of_roofline"] < 1
    saturating = max(closed, key=lambda r: r["steady"]["throughput_audio_s_per_s"])
    assert report["saturation_audio_s_per_s"] == saturating["steady"]["throughput_audio_s_per_s"]
    assert report["saturation_rps"] == saturating["steady"]["requests_per_s"]
    for run in poisson:  # the rates are fractions of that audio throughput, offered as the runs' own requests
        assert run["offered_audio_s_per_s"] == pytest.approx(
            run["rate_fraction_of_saturation"] * report["saturation_audio_s_per_s"], rel=2e-3)
    assert report["dtype"] in report["gemm_peak_tflops"]  # auto: the dtype with the faster measured peak
    assert f"served_concurrency2_{report['dtype']}_vs_transformers_sequential" in report["ratios"]
    drawn = sorted(p.name for p in plots.iterdir())
    assert drawn == ["throughput_latency.png", "timeline.png", "ttfa_cdf.png"]
    assert all((plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in drawn)
    again = tmp_path / "again"  # redrawn from the saved report, measuring nothing
    res = subprocess.run([sys.executable, "-m", "bark_serve.cli", "bench", "--replot", str(out), "--plots", str(again)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in again.iterdir()) == drawn

    # a later report takes the transformers and engine runs of this one (same machine, dtype, workload)
    later = tmp_path / "later.json"
    base = [sys.executable, "-m", "bark_serve.cli", "bench", "--model", str(tiny_ckpt), "--mix", "ci-tiny",
            "--gemm-seconds", "0.1", "--skip", "hf,engines,served,offline", "--dtype", report["dtype"],
            "--reuse-runs", str(out)]
    res = subprocess.run([*base, "--out", str(later)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    reused = json.loads(later.read_text())
    assert [r["name"] for r in reused["runs"]] == [n for n in names if n.startswith(("engines_", "transformers_"))]
    assert all(r["reused_from"] == str(out) for r in reused["runs"])
    key = "engines_vs_transformers_best_batch"
    assert reused["floors"][key] == report["floors"][key]
    for other in (["--mix", "fixed-8"], ["--seed", "7"]):  # another workload: refused, exit 2, the difference named
        res = subprocess.run([*base, *other], capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and "--reuse-runs" in res.stderr and "workload" in res.stderr, res.stderr[-2000:]
        assert "Traceback" not in res.stderr
    bad_run = {**reused, "runs": [{**reused["runs"][0], "throughput_audio_s_per_s": float("nan")}]}
    hostile = {"junk.json": ("{not json", "cannot read a bench report"),
               "deep.json": ("[" * 100_000 + "]" * 100_000, "cannot read a bench report"),
               "norun.json": (json.dumps({"runs": "x"}), "no runs list"),
               "nan.json": (json.dumps(bad_run), "no positive throughput")}
    for name, (text, message) in hostile.items():
        (tmp_path / name).write_text(text)
        res = subprocess.run([*base[:-1], str(tmp_path / name)], capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and message in res.stderr, (name, res.stderr[-2000:])
        assert "Traceback" not in res.stderr, (name, res.stderr[-2000:])


@pytest.mark.parametrize("flag", ["--max-batch", "--stage-threads"])
@pytest.mark.parametrize("value", ["fine=0", "vocoder=2", "fine=two", "4,fine=-1"])
def test_bad_per_stage_values_are_usage_errors(flag, value):
    res = subprocess.run([sys.executable, "-m", "bark_serve.cli", "bench", flag, value], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert flag in res.stderr and ("stage" in res.stderr or "number" in res.stderr or "at least 1" in res.stderr)


@pytest.mark.parametrize("flag,value,choices", [("--hf-orders", "", "given, sorted"),
                                                ("--hf-orders", "given,longest", "given, sorted"),
                                                ("--engine-orders", "sorted", "longest, given"),
                                                ("--engine-orders", ",", "longest, given")])
def test_bad_orders_are_usage_errors(flag, value, choices):
    res = subprocess.run([sys.executable, "-m", "bark_serve.cli", "bench", flag, value], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert flag in res.stderr and choices in res.stderr


def test_a_closed_loops_steady_figures_follow_littles_law():
    """Two clients, four requests: with both clients always busy, requests/s = 2 / mean latency and
    audio-s/s = 2 x audio / summed latency, whatever the run's start and end (here a 20 s request ends it)."""
    from bark_serve.bench.cli import saturation_figures
    from bark_serve.bench.served_runs import Outcome, steady_window

    outcomes = [Outcome(latency_s=w, ttfa_s=1.0, audio_s=a, sent_at=0.0) for w, a in
                [(5, 2.0), (20, 14.0), (4, 2.5), (3, 3.0)]]
    steady = steady_window(outcomes, concurrency=2)
    assert steady == {"requests": 4, "concurrency": 2, "throughput_audio_s_per_s": round(2 * 21.5 / 32, 4),
                      "requests_per_s": round(2 * 4 / 32, 4)}
    one = [Outcome(latency_s=w, ttfa_s=1.0, audio_s=a, sent_at=0.0) for w, a in [(3, 1.0), (5, 1.0), (4, 2.0)]]
    assert steady_window(one, concurrency=1)["throughput_audio_s_per_s"] == round(4.0 / 12, 4)  # = audio / wall
    assert steady_window(outcomes[:2], concurrency=2) is None  # one wave: never a full loop to speak of
    whole = {"throughput_audio_s_per_s": 0.5, "requests_per_s": 0.2}
    assert saturation_figures(whole) == (0.5, 0.2, "whole run")
    assert saturation_figures({**whole, "steady": steady}) == (steady["throughput_audio_s_per_s"],
                                                               steady["requests_per_s"], "steady")


def test_hops_say_how_long_segments_waited_in_queues_and_between_stages():
    from bark_serve.bench.served_runs import Outcome, hops

    def seg(t0: float, wait: float, hop: float) -> dict:  # each stage: queued, waits, runs 1 s, then a hop
        out, t = {}, t0
        for stage in ("semantic", "coarse", "fine", "codec"):
            out[stage] = {"queued_at": t, "started": t + wait, "finished": t + wait + 1.0}
            t += wait + 1.0 + hop
        return out

    # request 1: two segments, the second one's hops long (it waited for the first one's tokens)
    outcomes = [Outcome(9.0, 1.0, 3.0, 0.0, [seg(0.0, 0.1, 0.01), seg(5.0, 0.3, 2.0)]),
                Outcome(9.0, 1.0, 3.0, 0.0, [seg(2.0, 0.2, 0.02)])]
    h = hops(outcomes)
    assert set(h["queue_wait"]) == {"semantic", "coarse", "fine", "codec"}
    assert h["queue_wait"]["coarse"] == {"p50_ms": 200.0, "p95_ms": pytest.approx(290.0), "mean_ms": 200.0, "n": 3}
    assert set(h["hop"]) == set(h["handoff"]) == {"semantic->coarse", "coarse->fine", "fine->codec"}
    # hop: first segments only (the Ray call alone); handoff: every segment, the chained one's wait included
    assert h["hop"]["fine->codec"]["n"] == 2 and h["hop"]["fine->codec"]["mean_ms"] == pytest.approx(15.0)
    assert h["handoff"]["fine->codec"]["n"] == 3 and h["handoff"]["fine->codec"]["p50_ms"] == pytest.approx(20.0)
    assert h["handoff"]["fine->codec"]["mean_ms"] == pytest.approx((10 + 2000 + 20) / 3, rel=1e-3)
    assert hops([])["hop"]["semantic->coarse"] is None  # no segment: no figure, not a zero


def test_step_figures_say_how_full_and_how_long_a_stages_steps_were():
    from bark_serve.bench.workload import step_figures

    totals = {"steps": 10.0, "step_s": 0.5, "batch": 320.0, "graph_steps": 8.0, "decode_only_steps": 8.0,
              "decode_only_s": 0.32}
    assert step_figures(totals) == {"step_ms": 50.0, "mean_rows": 32.0, "graph_step_frac": 0.8,
                                    "decode_only_ms": 40.0}
    assert step_figures({}) == {}


def test_a_failing_configuration_is_recorded_and_the_others_still_run(tmp_path):
    import json

    from bark_serve.bench.cli import _Runs
    from bark_serve.bench.workload import Run

    report: dict = {"runs": []}
    runs = _Runs(report, str(tmp_path / "r.json"))

    def boom():
        raise RuntimeError("CUDA graph capture failed")

    runs.attempt("engines batch 64", boom)
    runs.attempt("engines batch 16", lambda: Run("engines_batch16_x", [1.0], [0.5], 2.0, 1.0))
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["failures"] == [{"what": "engines batch 64", "error": "RuntimeError: CUDA graph capture failed"}]
    assert [r["name"] for r in saved["runs"]] == ["engines_batch16_x"]
    assert "floors" in saved and "ratios" in saved  # saved after each run: a run cut short keeps its summaries


def test_a_deadline_skips_runs_that_would_end_past_it():
    from bark_serve.bench.cli import Deadline

    now = [100.0]
    skipped: list = []
    saves = []
    d = Deadline(60.0, skipped, lambda: saves.append(1), clock=lambda: now[0])
    assert d.fits("c1", None)  # no estimate: run it
    now[0] = 130.0  # 30 s left
    assert d.fits("c64", 25.0) and not d.fits("Poisson 0.9", 45.0)
    assert skipped == [{"run": "Poisson 0.9", "expected_s": 45.0, "left_s": 30.0}] and saves == [1]
    assert Deadline(None, [], clock=lambda: now[0]).fits("anything", 1e9)


def test_dtype_auto_follows_the_engines_rule(monkeypatch):
    """CPU: the faster measured peak. A GPU with native bfloat16: bfloat16, even where float16 measured a little
    faster (the engines never run float16 there), unless float32 beats it by more than 10%."""
    import torch

    from bark_serve.bench.cli import auto_dtype

    assert auto_dtype({"float32": 1.0, "bfloat16": 0.5}, "cpu") == "float32"
    assert auto_dtype({"float32": 1.0, "bfloat16": 3.0}, "cpu") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert auto_dtype({"float32": 51.0, "bfloat16": 778.0, "float16": 790.0}, "cuda") == "bfloat16"
    assert auto_dtype({"float32": 900.0, "bfloat16": 778.0, "float16": 790.0}, "cuda") == "float32"


def test_per_stage_values_parse_with_a_default():
    import argparse

    from bark_serve.bench.cli import _for_stages, per_batch, per_stage, stage_threads

    assert per_stage("16,fine=1") == {"*": 16, "fine": 1}
    assert _for_stages(per_stage("16,fine=1"), 8) == {"semantic": 16, "coarse": 16, "fine": 1, "codec": 16}
    assert _for_stages(per_stage("fine=1"), 8) == {"semantic": 8, "coarse": 8, "fine": 1, "codec": 8}
    assert _for_stages(per_stage("coarse=2"), None) == {"coarse": 2}
    assert _for_stages(per_stage(""), None) == {}
    assert stage_threads("shared,fine=2") == {"*": "shared", "fine": 2}  # the words only --stage-threads takes
    with pytest.raises(argparse.ArgumentTypeError, match="shared"):
        stage_threads("fine=many")
    with pytest.raises(argparse.ArgumentTypeError):
        per_stage("shared")
    assert per_batch("32,1=4,64=64") == {"*": 32, 1: 4, 64: 64}  # --served-requests: per concurrency level


def test_the_workload_is_deterministic_for_a_seed_and_follows_its_mix():
    a, b = Workload(seed=3).requests(400), Workload(seed=3).requests(400)
    assert a == b and a != Workload(seed=4).requests(400)
    assert Workload(seed=3).requests(10, offset=390) == a[390:]
    spec = mix_named("bark-mix-v1")
    caps = [r.semantic_tokens for r in a]
    assert min(caps) >= spec.lo and max(caps) <= spec.hi and 250 < sorted(caps)[200] < 400  # median near 320
    long = [r for r in a if r.segments > 1]
    assert 0.07 < len(long) / len(a) < 0.2 and all(4 <= r.segments <= 8 for r in long)
    assert all(r.text.count(".") >= r.segments for r in long)  # one sentence per segment
    fixed = Workload(mix="fixed-32").requests(20)
    assert {r.semantic_tokens for r in fixed} == {32} and {r.segments for r in fixed} == {1}
    with pytest.raises(ValueError, match="unknown workload mix"):
        Workload(mix="nope").requests(1)


def test_long_texts_split_into_one_segment_per_sentence(tiny_ckpt):
    from bark_serve.stages.longform import split_text
    from bark_serve.stages.text import TextPreparer
    from bark_serve.stages.weights import Checkpoint

    count = TextPreparer.from_checkpoint(Checkpoint.open(tiny_ckpt)).count
    for req in Workload().requests(200):
        assert split_text(req.text, count, SEGMENT_TOKENS) == list(req.parts)


def test_poisson_arrivals_are_seeded_and_have_the_asked_rate():
    a = poisson_arrivals(4.0, 4000, seed=1)
    assert a == poisson_arrivals(4.0, 4000, seed=1) and a != poisson_arrivals(4.0, 4000, seed=2)
    assert all(x < y for x, y in zip(a, a[1:]))
    assert abs(len(a) / a[-1] - 4.0) < 0.25
    with pytest.raises(ValueError):
        poisson_arrivals(0, 3)


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


@pytest.mark.parametrize("profile", ["local-cpu", "single-gpu", "pipelined-gpu"])
def test_the_served_bench_config_on_cpu_asks_for_no_gpu_and_places_on_a_gpu_less_node(profile):
    """`bench --device cpu --profile single-gpu` (the device script rehearsed on CPU) once hung in serve.run:
    the voice encoder kept its GPU share. On a CPU every deployment asks for no GPU and fits one 2-core node;
    on the GPU the profile's shares stay."""
    from bark_serve.bench.served_runs import served_config
    from bark_serve.serving.config import load_config
    from bark_serve.serving.serve_config import placement_problems, pool_resources, replica_asks

    cfg = served_config("ckpt", "float32", {"fine": 4}, profile, device="cpu", port=9)
    asks = replica_asks(cfg)
    assert asks and not [name for name, _, ask in asks if "GPU" in ask]
    devices = {cfg.stage(s).device for s in ("semantic", "coarse", "fine", "codec")} | {cfg.voice_cloning.device}
    assert devices == {"cpu"}
    assert cfg.stage("fine").max_batch == 4 and cfg.http_port == 9
    profile_encoder = load_config(profile).voice_cloning  # only its GPU share and device change
    assert cfg.voice_cloning.model_dump() == {**profile_encoder.model_dump(), "num_gpus": 0, "device": "cpu"}
    assert placement_problems(cfg, [{"CPU": 2.0, **pool_resources(cfg)}]) == []
    if profile == "single-gpu":
        on_gpu = served_config("ckpt", "float32", {}, profile, device="cuda")
        shares = {name: ask.get("GPU", 0.0) for name, _, ask in replica_asks(on_gpu)}
        assert shares["VoiceEncoder"] > 0 and 0.99 < sum(shares.values()) <= 1.0 + 1e-9
        assert placement_problems(on_gpu, [{"CPU": 2.0, **pool_resources(on_gpu)}])  # no GPU: refused, not hung


def test_the_device_scripts_parse():
    """The device call is one shot on a lent machine: its scripts (bench/*.sh) at least parse as bash here."""
    from pathlib import Path

    scripts = sorted((Path(__file__).resolve().parents[2] / "bench").glob("*.sh"))
    assert {p.name for p in scripts} >= {"device_check.sh", "device_graphs.sh", "device_served.sh",
                                         "device_rehearsal.sh"}
    for script in scripts:
        res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, (script.name, res.stderr)

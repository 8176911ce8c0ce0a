"""The config file: every shipped profile loads, and per-stage engine settings resolve as documented."""

from __future__ import annotations

import os

import pytest

from bark_serve.serving.config import BarkConfig, ConfigError, load_config, parse_config, profiles
from bark_serve.serving.stage_server import engine_options, resolve_threads


def _node(cpus: float, gpus: float, *pools: str) -> dict:
    return {"CPU": cpus, "GPU": gpus, "memory": 1e11, **{f"bark_pool_{p}": 64.0 for p in pools}}


# Each profile on the cluster it is written for (docs/CONFIGURATION.md), and on one it does not fit.
PROFILE_CLUSTERS = {
    "local-cpu": ([_node(2, 0, "semantic", "coarse", "fine", "codec")], [_node(0.5, 0, "semantic", "coarse", "fine",
                                                                                "codec")], "CPU"),
    "single-gpu": ([_node(16, 1, "semantic", "coarse", "fine", "codec", "voice")],
                   [_node(16, 0.5, "semantic", "coarse", "fine", "codec", "voice")], "GPU"),
    "pipelined-gpu": ([_node(4, 1, s) for s in ("semantic", "coarse", "fine", "codec")],
                      [_node(16, 1, "semantic", "coarse", "fine", "codec")], "GPU"),
}


@pytest.mark.parametrize("name", ["local-cpu", "pipelined-gpu", "single-gpu"])
def test_profiles_load_and_place_on_the_cluster_they_are_written_for(name):
    from bark_serve.serving.serve_config import placement_problems

    assert name in profiles()
    cfg = load_config(name)
    stages = ("semantic", "coarse", "fine", "codec")
    assert len({cfg.stage(s).pool for s in stages}) == 4  # every stage its own pool (the mission's layout)
    fits, too_small, short_of = PROFILE_CLUSTERS[name]
    assert placement_problems(cfg, fits) == []
    problems = placement_problems(cfg, too_small)
    assert problems and any("the cluster has" in p and short_of in p for p in problems), problems
    if name != "local-cpu":  # the GPU profiles: every stage on a GPU share, the orchestrator on none
        assert all(cfg.stage(s).num_gpus > 0 and cfg.stage(s).device == "cuda" for s in stages)
        assert cfg.orchestrator.num_gpus == 0


def test_torch_threads_auto_and_shared_start_from_every_core_of_the_process():
    """local-cpu shares the host's cores among its stage replicas (leased per step on CPU, cluster/cores.py);
    an engine starts on every core either way."""
    from bark_serve.serving.stage_server import core_budget, shares_cores

    cores = len(os.sched_getaffinity(0))
    cfg = load_config("local-cpu")
    assert cfg.stage("fine").torch_threads == "shared"
    assert engine_options(cfg.stage("fine")).torch_threads == cores
    # batch_invariant's probe then runs at every thread count a step may get (stages/invariance.py)
    assert engine_options(cfg.stage("fine")).shared_threads
    assert not engine_options(parse_config({"fine": {"torch_threads": "auto"}}).stage("fine")).shared_threads
    assert shares_cores(cfg.stage("fine"), "cpu") and not shares_cores(cfg.stage("fine"), "cuda:0")
    assert resolve_threads("auto") == cores and resolve_threads(3) == 3 and resolve_threads(None) is None
    budget = core_budget(cfg.stage("fine"), "cpu")
    assert budget is not None and budget.cores == cores
    budget.close()
    assert core_budget(cfg.stage("fine"), "cuda:0") is None  # a GPU replica's steps are not leased
    assert core_budget(parse_config({"fine": {"torch_threads": "auto"}}).stage("fine"), "cpu") is None


def test_stage_engine_settings_reach_the_engine_and_bad_ones_are_refused():
    cfg = parse_config({"fine": {"torch_threads": 2, "max_forward_tokens": 1024, "max_batch": 3, "dtype": "float32"}})
    opts = engine_options(cfg.stage("fine"))
    assert (opts.torch_threads, opts.max_forward_tokens, opts.capacity, opts.dtype) == (2, 1024, 3, "float32")
    for bad in ({"torch_threads": 0}, {"torch_threads": "many"}, {"max_forward_tokens": 0}):
        with pytest.raises(ConfigError, match="fine"):
            parse_config({"fine": bad})


def test_public_model_never_shows_a_local_path(tmp_path):
    """Issue 25: GET / and model_not_found answers showed the checkpoint's local path."""
    ckpt = tmp_path / "ckpts" / "my-bark"
    ckpt.mkdir(parents=True)
    assert BarkConfig(model=str(ckpt)).public_model == "my-bark"
    assert BarkConfig(model=str(ckpt) + "/").public_model == "my-bark"
    assert BarkConfig(model="./ckpts/my-bark").public_model == "my-bark"
    assert BarkConfig(model="suno/bark-small").public_model == "suno/bark-small"  # a hub id is as configured


def test_a_config_file_may_start_from_a_profile_and_override_only_what_it_names(tmp_path):
    """Issue 25: a file with only `model` and an orchestrator block got stage defaults of num_cpus 1, which a
    2-core machine cannot place; `profile:` gives it a whole, placeable deployment to change."""
    path = tmp_path / "mine.yaml"
    path.write_text("profile: local-cpu\nmodel: /models/mine\nsemantic: {max_batch: 4}\n"
                    "orchestrator: {max_active_requests: 7}\n")
    cfg, base = load_config(path), load_config("local-cpu")
    assert cfg.model == "/models/mine" and cfg.semantic.max_batch == 4 and cfg.orchestrator.max_active_requests == 7
    assert cfg.semantic.num_cpus == base.semantic.num_cpus and cfg.semantic.pool == base.semantic.pool  # kept
    assert cfg.coarse == base.coarse and cfg.http_host == base.http_host
    assert cfg.orchestrator.request_timeout_s == base.orchestrator.request_timeout_s
    for bad, says in (("profile: nosuch\n", "not one of"), ("profile: [1]\n", "not one of"), ("- a\n", "mapping")):
        path.write_text(bad)
        with pytest.raises(ConfigError, match=says):
            load_config(path)


def test_placement_problems_name_the_deployment_its_ask_and_what_the_cluster_has():
    from bark_serve.serving.serve_config import placement_problems

    two_cores = [{"CPU": 2.0, "bark_pool_semantic": 64.0, "bark_pool_coarse": 64.0, "bark_pool_fine": 64.0,
                  "bark_pool_codec": 64.0, "memory": 1e10}]
    assert placement_problems(load_config("local-cpu"), two_cores) == []
    # the file: only model and an orchestrator block, so every stage asks num_cpus 1
    bare = parse_config({"model": "m", "orchestrator": {"num_cpus": 0.1}})
    [problem] = placement_problems(bare, [{"CPU": 2.0, **{f"bark_pool_{s}": 64.0 for s in STAGE_POOLS}}])
    assert "ask 4.2 CPU in all" in problem and "SemanticServer 1 x 1" in problem and "has 2" in problem
    assert "VoiceEncoder 1 x 0.1" in problem
    big = parse_config({**load_config("local-cpu").model_dump(), "semantic": {"num_cpus": 64, "pool": "semantic"}})
    problems = placement_problems(big, two_cores)
    assert any("deployment SemanticServer cannot be placed" in p and "CPU 64" in p and "CPU 2" in p for p in problems)
    gpu = parse_config({**load_config("local-cpu").model_dump(), "coarse": {"num_gpus": 1, "pool": "coarse"}})
    assert any("CoarseServer" in p and "GPU 1" in p for p in placement_problems(gpu, two_cores))
    # two nodes: big enough together, and each replica fits one of them (but neither holds them all)
    assert placement_problems(load_config("local-cpu"), [{**two_cores[0], "CPU": 1.0}, {"CPU": 1.0}]) == []
    [short] = placement_problems(load_config("local-cpu"), [{**two_cores[0], "CPU": 1.0}])
    assert "CPU in all" in short and "the cluster has 1" in short


STAGE_POOLS = ("semantic", "coarse", "fine", "codec")


def test_a_local_instance_gives_a_starting_proxy_30_s_unless_told_otherwise(monkeypatch):
    from bark_serve.serving.serve_config import PROXY_READY_ENV, patient_proxy_start

    monkeypatch.delenv(PROXY_READY_ENV, raising=False)
    patient_proxy_start()
    assert os.environ[PROXY_READY_ENV] == "30"
    monkeypatch.setenv(PROXY_READY_ENV, "7")
    patient_proxy_start()
    assert os.environ[PROXY_READY_ENV] == "7"

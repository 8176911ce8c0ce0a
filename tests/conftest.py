"""Shared fixtures: tiny random Bark checkpoints in the real Hugging Face layout, made at test time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_VOICES = REPO.parent / "shared" / "data" / "voices"
TEST_VOICES = REPO / "tests" / "data" / "voices"


def voices_dir() -> Path:
    """Bark's own .npz presets: ../shared/data/voices beside the checkout, else the copy under tests/data."""
    return SHARED_VOICES if (SHARED_VOICES / "v2").is_dir() else TEST_VOICES


# The longest work units (a module, or the SHARED_APP group: "shared-app"), by their mean time over three fresh-clone
# CI runs on 2 cores (2026-12-07/08), run first: .ci/run hands whole units to two pytest-xdist workers in this
# order, and a long unit taken last leaves one worker idle.
LONGEST_FIRST = (
    "tests/offline/test_dataset.py", "tests/bench/test_bench.py", "shared-app", "tests/offline/test_cli.py",
    "tests/test_readme.py", "tests/serving/test_playground.py", "tests/bench/test_device_pack.py",
    "tests/serving/test_hostile_input.py", "tests/serving/test_ray_client.py", "tests/cli/test_up_unplaced.py",
    "tests/serving/test_overload.py", "tests/serving/test_batch_e2e.py", "tests/cli/test_synth_cli.py",
    "tests/serving/test_node_death.py",
)

# Modules whose tests share one running app (tests/serving/conftest.py's ``served``: the default e2e config,
# nothing killed or reconfigured): they run one after another in one worker, and the app starts once (an app
# start is 30-120 s on 2 cores). It stops when a module outside this group starts there, or at the end.
SHARED_APP = ("tests/serving/test_app.py", "tests/serving/test_audio_out.py", "tests/serving/test_openai_inputs.py")


def work_unit(path) -> str:
    """What one xdist worker takes whole: a module, or the SHARED_APP group."""
    rel = Path(os.path.relpath(path, REPO)).as_posix()
    return "shared-app" if rel in SHARED_APP else rel


def pytest_xdist_make_scheduler(config, log):
    """xdist's --dist loadfile, with the SHARED_APP modules as one unit. (Its own --dist loadgroup cannot be
    used: it renames test ids, which pytest 9.2 no longer lets a plugin do.)"""
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(REPO / nodeid.split("::", 1)[0])

    return WorkUnitScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """Work units (modules, and the SHARED_APP group as one) of LONGEST_FIRST first, in its order; every other
    unit after them, where its first test was collected (a stable sort: the tests of a unit keep their order):
    xdist hands the units to its workers in that order."""
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    units = {id(item): work_unit(item.path) for item in items}
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        first.setdefault(units[id(item)], i)
    items.sort(key=lambda item: (rank.get(units[id(item)], len(rank)), first[units[id(item)]]))


@pytest.fixture(scope="module", autouse=True)
def _shared_app_only_in_its_group(request):
    """Stop the SHARED_APP group's app before a module outside the group (one Ray per test process), and at the
    end of the session."""
    import sys

    helpers = sys.modules.get("tests.serving.e2e_helpers")
    if helpers is not None and work_unit(request.path) != "shared-app":
        helpers.stop_shared_app()
    yield


@pytest.fixture(scope="session", autouse=True)
def _shared_app_stopped_at_the_end():
    import sys

    yield
    helpers = sys.modules.get("tests.serving.e2e_helpers")
    if helpers is not None:
        helpers.stop_shared_app()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from bark_serve.stages.random_checkpoint import make_checkpoint

    cache = os.environ.get("BARK_TEST_CKPT_CACHE")
    if cache:  # reuse across local runs; CI always builds it fresh
        path = Path(cache) / "tiny-seed0"
        if not (path / "model.safetensors").exists():
            make_checkpoint(path, "tiny", seed=0)
        return path
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def preset_dir() -> Path:
    return voices_dir()


@pytest.fixture(scope="module")
def pipe_capacity() -> int:
    """How many requests each engine of ``pipe`` holds at once. A test module (or a folder's conftest.py)
    that needs another number overrides this fixture."""
    return 8


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Every test leaves torch's thread count as it found it. float32 GEMMs on 1 and 2 threads round
    differently, and on a random tiny model a greedy token can follow: a count leaked by one test (an engine
    built with ``torch_threads``) once decided whether a later module's parity checks passed."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe_batch_invariant() -> bool:
    """``batch_invariant`` of ``pipe``'s engines: off, as the served stages under test run. A module that
    compares sampled tokens across batch compositions overrides this fixture (stages/invariance.py)."""
    return False


@pytest.fixture(scope="module")
def pipe(tiny_ckpt, pipe_capacity, pipe_batch_invariant):
    """The in-process BarkPipeline on the tiny checkpoint, float32 and one torch thread (as the served stage
    replicas under test run: float32 pinned by the e2e and offline configs, one thread from Ray's
    OMP_NUM_THREADS for a fractional CPU), its engines holding ``pipe_capacity`` requests. One per test
    module: the engines keep state between tests. The thread count is restored after the module."""
    import torch

    from bark_serve.stages.engine import EngineOptions
    from bark_serve.stages.pipeline import BarkPipeline

    threads = torch.get_num_threads()
    yield BarkPipeline.from_pretrained(
        str(tiny_ckpt), EngineOptions(capacity=pipe_capacity, dtype="float32", torch_threads=1,
                                      batch_invariant=pipe_batch_invariant))
    torch.set_num_threads(threads)

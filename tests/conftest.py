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


# The longest test modules (measured by .ci/run's --durations on 2 cores), run first: .ci/run hands whole modules
# to two pytest-xdist workers in collection order, and a long module taken last leaves one worker idle.
LONGEST_FIRST = (
    "tests/test_readme.py", "tests/bench/test_bench.py", "tests/bench/test_device_pack.py",
    "tests/serving/test_playground.py", "tests/cli/test_up_unplaced.py", "tests/offline/test_cli.py",
    "tests/offline/test_dataset.py", "tests/serving/test_ray_client.py", "tests/serving/test_hostile_input.py",
    "tests/serving/test_node_death.py", "tests/serving/test_overload.py", "tests/cli/test_synth_cli.py",
)


def pytest_collection_modifyitems(config, items):
    """Modules of LONGEST_FIRST first, in its order; every other module after them, in collection order (a
    stable sort: the tests of a module keep their order)."""
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}

    def key(item) -> int:
        return rank.get(Path(os.path.relpath(item.path, REPO)).as_posix(), len(rank))

    items.sort(key=key)


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

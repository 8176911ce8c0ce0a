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

"""A real local Ray with the whole bark-serve app on a tiny checkpoint, shared by the end-to-end tests."""

from __future__ import annotations

import atexit
import shutil
import tempfile

import pytest

from bark_serve.cluster.ports import free_port

API_KEY = "test-key-123"

_voice_stores: list[str] = []  # this test process's parent folder of every e2e app's voice store


def voice_store_dir() -> str:
    """A fresh, empty voice-store folder under one parent per test process, removed when the process exits
    (an app's store must not outlive its tests in /tmp)."""
    if not _voice_stores:
        _voice_stores.append(tempfile.mkdtemp(prefix="bark-voices-", dir="/tmp"))
        atexit.register(shutil.rmtree, _voice_stores[0], True)
    return tempfile.mkdtemp(dir=_voice_stores[0])


@pytest.fixture(scope="module")
def redis_srv(tmp_path_factory):
    """A real redis-server for one test module's batch jobs."""
    from tests.cluster.redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def e2e_config(model: str, port: int, **overrides) -> dict:
    # float32 and one torch thread pinned: tests compare with the in-process pipeline (tests/conftest.py's
    # pipe, float32 on one thread); "auto" picks bfloat16 on CPUs with AMX / AVX512-BF16, and GEMMs on
    # another thread count round differently.
    small = {"num_cpus": 0.1, "max_batch": 8, "batch_wait_ms": 5, "dtype": "float32", "torch_threads": 1}
    cfg = {
        "model": model, "http_host": "127.0.0.1", "http_port": port,
        "orchestrator": {"num_cpus": 0.1, "max_active_requests": 24, "segment_max_tokens": 24,
                         "api_keys_env": "BARK_E2E_API_KEYS", "max_text_chars": 4000, "max_body_bytes": 200_000},
        "semantic": {"pool": "semantic", **small}, "coarse": {"pool": "coarse", **small},
        "fine": {"pool": "fine", **small, "max_batch": 4}, "codec": {"pool": "codec", **small},
        # registered voices in a folder of this app's own (never ~/.cache); cloning weights that do not exist
        # (POST /v1/voices answers 503, tests/serving/test_app.py); a test that clones passes its own block, whose
        # weights default to the checkpoint's voice_cloning/ (make_checkpoint writes them)
        "voice_cloning": {"num_cpus": 0.1, "store_dir": voice_store_dir(),
                          "hubert": "/nonexistent/hubert", "quantizer": "/nonexistent/no-quantizer.pth"},
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def served(tiny_ckpt):
    """Ray + Serve with the app on ``e2e_config``; (base_url, metrics_url). Shared by the modules of
    tests/conftest.py's SHARED_APP, which run one after another in one worker: started by the first (or again
    if it stopped answering), stopped when a module outside the group starts in that worker, or at the end."""
    from tests.serving.e2e_helpers import running_app, shared_app

    def start(stack):
        metrics_port = free_port()
        url = stack.enter_context(running_app(e2e_config(str(tiny_ckpt), free_port()), metrics_port=metrics_port))
        return url, f"http://127.0.0.1:{metrics_port}/metrics"

    return shared_app(("e2e", str(tiny_ckpt)), start)

"""A real local Ray with the whole bark-serve app on a tiny checkpoint, shared by the end-to-end tests."""

from __future__ import annotations

import os
import socket
import time

import pytest

API_KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def e2e_config(model: str, port: int, **overrides) -> dict:
    # float32 pinned: tests compare with the in-process float32 pipeline, and "auto" picks bfloat16
    # on CPUs with AMX / AVX512-BF16.
    small = {"num_cpus": 0.1, "max_batch": 8, "batch_wait_ms": 5, "dtype": "float32"}
    cfg = {
        "model": model, "http_host": "127.0.0.1", "http_port": port,
        "orchestrator": {"num_cpus": 0.1, "max_active_requests": 24, "segment_max_tokens": 24,
                         "api_keys_env": "BARK_E2E_API_KEYS", "max_text_chars": 4000, "max_body_bytes": 200_000},
        "semantic": {"pool": "semantic", **small}, "coarse": {"pool": "coarse", **small},
        "fine": {"pool": "fine", **small, "max_batch": 4}, "codec": {"pool": "codec", **small},
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def served(tiny_ckpt):
    """Start Ray + Serve with the app; yields (base_url, metrics_url). Torn down after the module."""
    import ray
    from ray import serve

    from bark_serve.serving.app import build_app
    from bark_serve.serving.config import parse_config
    from bark_serve.serving.serve_config import pool_resources

    os.environ["BARK_E2E_API_KEYS"] = f"{API_KEY},second-key"  # inherited by the Ray workers started below
    port, metrics_port = free_port(), free_port()
    cfg = parse_config(e2e_config(str(tiny_ckpt), port))
    ray.init(address="local", num_cpus=4, resources=pool_resources(cfg), include_dashboard=False,
             _metrics_export_port=metrics_port, configure_logging=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t0 = time.time()
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")
    print(f"bark app up in {time.time() - t0:.1f} s")
    try:
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        serve.shutdown()
        ray.shutdown()

"""The causal stages' KV cache is sized to what the held requests can reach, not to capacity x maximum length.

An idle engine holds no KV memory; a short request reserves a short cache; a request that joins
mid-flight and needs more makes the cache grow without changing anyone's tokens; the memory goes back
when the engine empties.
"""

from __future__ import annotations

import numpy as np
import pytest

from bark_serve.stages.requests import stage_request
from bark_serve.stages.types import GenerationParams


@pytest.fixture(scope="module")
def pipe_capacity() -> int:
    return 16


def _semantic(pipe, rid: str, text: str, max_tokens: int):
    params = GenerationParams.greedy(max_semantic_tokens=max_tokens, min_eos_p=None)
    return stage_request("semantic", rid, pipe.text.encode(text), None, params, 0)


def _drain(engine) -> dict[str, np.ndarray]:
    out = {}
    while engine.num_active:
        for res in engine.step():
            assert res.ok, res.error
            out[res.request_id] = res.output
    return out


def test_idle_engine_holds_no_kv_memory_and_short_requests_reserve_little(pipe):
    engine = pipe.engines["semantic"]
    assert engine.capacity == 16 and engine.cache.nbytes() == 0
    engine.admit(_semantic(pipe, "short", "Hello there.", 20))
    reserved = engine.cache.nbytes()
    prompt = pipe.spec.max_input_semantic_length + 1
    assert reserved == engine.cache.bytes_per_token() * engine.cache.length
    assert prompt + 20 <= engine.cache.length < prompt + 20 + engine.cache.LENGTH_STEP
    assert reserved < engine.kv_bytes_per_slot() / 2  # the stage's maximum length would reserve 1024 positions
    _drain(engine)
    assert engine.cache.nbytes() == 0  # given back when the engine empties


def test_growing_mid_flight_keeps_every_request_exact(pipe):
    engine = pipe.engines["semantic"]
    alone = {}
    for rid, n in (("a", 12), ("b", 150)):
        engine.admit(_semantic(pipe, rid, "The quick brown fox.", n))
        alone.update(_drain(engine))
    engine.admit(_semantic(pipe, "a", "The quick brown fox.", 12))
    for _ in range(3):
        engine.step()
    small = engine.cache.length
    engine.admit(_semantic(pipe, "b", "The quick brown fox.", 150))  # longer reach: the cache grows mid-flight
    assert engine.cache.length > small
    together = _drain(engine)
    for rid in ("a", "b"):
        np.testing.assert_array_equal(together[rid], alone[rid])


def test_coarse_reach_follows_the_request_length(pipe):
    engine = pipe.engines["coarse"]
    params = GenerationParams.greedy()
    short = stage_request("coarse", "s", np.arange(30), None, params, 0)
    engine.admit(short)
    short_len = engine.cache.length
    _drain(engine)
    engine.admit(stage_request("coarse", "l", np.arange(600), None, params, 0))
    assert short_len < engine.cache.length <= engine.max_len
    _drain(engine)

"""Continuous batching is exact, and seeds are per request.

A request's tokens are the same whether it ran alone, in a static batch, or
joined a running batch mid-flight; greedy and seeded sampling alike. Exact to the
bit with ``batch_invariant`` (this module's engines): without it a row's logits may
differ in their last bits between batch sizes, and once in a few ten thousand
sampled tokens that picks another token (stages/invariance.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from bark_serve.stages.engine import EngineOptions
from bark_serve.stages.pipeline import BarkPipeline, load_engines
from bark_serve.stages.types import CoarseRequest, FineRequest, GenerationParams, SamplingParams, SemanticRequest
from bark_serve.stages.weights import Checkpoint

SAMPLED = SamplingParams(temperature=0.8, top_k=200, top_p=0.95)


@pytest.fixture(scope="module")
def pipe_batch_invariant() -> bool:
    return True


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return Checkpoint.open(tiny_ckpt)


def _staggered(engine, requests, join_every: int):
    """Admit one request, step ``join_every`` times, admit the next... then drain. -> {id: output}"""
    out, pending = {}, list(requests)
    while pending or engine.num_active:
        if pending:
            engine.admit(pending.pop(0))
        for _ in range(join_every if pending else 1):
            for res in engine.step():
                assert res.ok, res.error
                out[res.request_id] = res.output
    return out


def _alone(engine, req):
    [res] = engine.run([req])
    assert res.ok, res.error
    return res.output


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.0), SAMPLED], ids=["greedy", "sampled"])
def test_semantic_join_mid_flight_is_exact(pipe, sampling):
    eng = pipe.engines["semantic"]
    voice = pipe.voices.resolve("v2/en_speaker_1")
    reqs = [SemanticRequest(f"s{i}", pipe.text.encode(t), voice if i % 2 else None, sampling, None, n, seed=i)
            for i, (t, n) in enumerate([("Hello there.", 50), ("A different, longer sentence here.", 23),
                                        ("♪ la la la ♪", 37), ("[laughs] ok", 41)])]
    joined = _staggered(eng, reqs, join_every=7)
    for r in reqs:
        np.testing.assert_array_equal(joined[r.request_id], _alone(eng, r))
        assert len(joined[r.request_id]) == r.max_new_tokens


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.0), SAMPLED], ids=["greedy", "sampled"])
def test_coarse_join_mid_flight_is_exact(pipe, sampling):
    eng = pipe.engines["coarse"]
    voice = pipe.voices.resolve("announcer")
    rng = np.random.default_rng(0)
    reqs = [CoarseRequest(f"c{i}", rng.integers(0, 10_000, n).astype(np.int32), voice if i % 2 else None,
                          sampling, seed=10 + i) for i, n in enumerate([70, 33, 95])]
    joined = _staggered(eng, reqs, join_every=45)  # joins land inside the 60-token windows of the others
    for r in reqs:
        np.testing.assert_array_equal(joined[r.request_id], _alone(eng, r))


@pytest.mark.parametrize("join_every", [1, 4, 6], ids=["mid-window-1", "mid-window-4", "at-window"])
@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.0), SamplingParams(temperature=0.5)],
                         ids=["greedy", "sampled"])
def test_fine_join_mid_flight_is_exact(pipe, sampling, join_every):
    """A step is one codebook pass, so joins land mid-window: rows at different passes share a batch."""
    eng = pipe.engines["fine"]
    voice = pipe.voices.resolve("v2/en_speaker_6")
    rng = np.random.default_rng(1)
    # 900 frames with a voice needs three windows, so later requests join in its first or second window.
    reqs = [FineRequest(f"f{i}", rng.integers(0, 1024, (2, n)).astype(np.int32), voice if i == 0 else None,
                        sampling, seed=i) for i, n in enumerate([900, 120, 1300])]
    joined = _staggered(eng, reqs, join_every=join_every)
    for r in reqs:
        np.testing.assert_array_equal(joined[r.request_id], _alone(eng, r))


def test_fine_request_is_not_held_back_by_a_running_window(pipe):
    """A request admitted while another is mid-window runs in the very next step (one pass), and finishes
    after its own six passes, not after the other's window."""
    eng = pipe.engines["fine"]
    passes = pipe.spec.n_fine_codebooks - pipe.spec.n_coarse_codebooks
    rng = np.random.default_rng(2)
    first, second = (FineRequest(f"h{i}", rng.integers(0, 1024, (2, 200)).astype(np.int32), None,
                                 SamplingParams(temperature=0.0), seed=i) for i in range(2))
    eng.admit(first)
    for _ in range(2):
        assert eng.step() == [] and eng.last_step["batch"] == 1
    eng.admit(second)
    done: dict[str, int] = {}
    for step in range(1, passes + 1):
        for res in eng.step():
            done[res.request_id] = step
        assert eng.last_step["batch"] == (2 if step <= passes - 2 else 1)
    assert done == {"h0": passes - 2, "h1": passes}
    assert eng.num_active == 0


def test_same_seed_same_tokens_different_seed_different(pipe):
    params = GenerationParams(max_semantic_tokens=40, seed=7)
    a = pipe.generate("Hello, my dog is cute.", "v2/en_speaker_6", params)[0]
    b = pipe.generate(["Something else first.", "Hello, my dog is cute."], [None, "v2/en_speaker_6"],
                      [GenerationParams(max_semantic_tokens=25, seed=1), params])[1]
    c = pipe.generate("Hello, my dog is cute.", "v2/en_speaker_6", GenerationParams(max_semantic_tokens=40, seed=8))[0]
    for stage in ("semantic", "coarse", "fine"):
        np.testing.assert_array_equal(getattr(a, stage), getattr(b, stage))
    np.testing.assert_allclose(a.audio, b.audio, atol=1e-5)  # batched decode: float noise only
    assert not np.array_equal(a.semantic, c.semantic)
    assert not np.array_equal(a.fine, c.fine)


def test_sampling_is_not_greedy_and_temperature_matters(pipe):
    text = "Hello, my dog is cute."
    greedy = pipe.generate(text, None, GenerationParams.greedy(max_semantic_tokens=40, min_eos_p=None))[0]
    hot = pipe.generate(text, None, GenerationParams(max_semantic_tokens=40, min_eos_p=None, seed=3))[0]
    assert not np.array_equal(greedy.semantic, hot.semantic)
    top1 = SamplingParams(temperature=1.0, top_k=1)  # top-k 1 is greedy whatever the temperature
    forced = pipe.generate(text, None, GenerationParams(semantic=top1, coarse=top1, fine=SamplingParams(0.0),
                                                        min_eos_p=None, max_semantic_tokens=40, seed=5))[0]
    np.testing.assert_array_equal(forced.semantic, greedy.semantic)
    np.testing.assert_array_equal(forced.coarse, greedy.coarse)


def test_engines_hold_only_their_own_weights(ckpt):
    from transformers import BarkModel

    hf = BarkModel.from_pretrained(str(ckpt.local_dir))
    engines = load_engines(ckpt, EngineOptions(capacity=1))
    pairs = {"semantic": hf.semantic, "coarse": hf.coarse_acoustics, "fine": hf.fine_acoustics}
    for stage, sub in pairs.items():
        n_ours = sum(p.numel() for p in engines[stage].model.parameters())
        n_hf = sum(p.numel() for p in sub.parameters())
        assert n_ours == n_hf, stage
    codec = engines["codec"].model
    assert not hasattr(codec, "encoder")  # the codec replica reads no EnCodec encoder
    n_codec = sum(p.numel() for p in codec.parameters())
    assert n_codec == sum(p.numel() for p in hf.codec_model.decoder.parameters())
    for stage in ("semantic", "coarse", "fine", "codec"):
        keys = ckpt.state_dict(stage).keys()
        assert keys and all(not k.startswith(("semantic.", "coarse_acoustics.", "fine_acoustics.")) for k in keys)


def test_bfloat16_runs_and_stays_close_to_float32(tiny_ckpt):
    fp32 = BarkPipeline.from_pretrained(str(tiny_ckpt), EngineOptions(capacity=2))
    bf16 = BarkPipeline.from_pretrained(str(tiny_ckpt), EngineOptions(capacity=2, dtype="bfloat16"))
    params = GenerationParams.greedy(max_semantic_tokens=30, min_eos_p=None)
    a = fp32.generate("Hello, my dog is cute.", None, params)[0]
    b = bf16.generate("Hello, my dog is cute.", None, params)[0]
    assert b.audio.dtype == np.float32 and np.isfinite(b.audio).all()
    assert b.semantic.shape == a.semantic.shape and b.fine.shape == a.fine.shape
    # Greedy paths of random weights fork at the first near-tie, so compare the models' outputs on
    # the same inputs instead: bfloat16 logits stay within a few percent of float32's.
    import torch

    def rel_err(x, y):
        return float((x.float() - y.float()).norm() / y.float().norm())

    codes = torch.from_numpy(a.fine.T[None].astype(np.int64))  # (1, T, 8)
    with torch.inference_mode():
        for codebook in (2, 7):
            got = bf16.engines["fine"].model(codes, codebook)
            assert rel_err(got, fp32.engines["fine"].model(codes, codebook)) < 0.05
        ids = torch.from_numpy(a.semantic.astype(np.int64))[None]  # (1, T)
        for p in (bf16, fp32):
            p.engines["semantic"].cache.reserve(1, ids.shape[1])  # the cache is empty while no request is held
        logits = [p.engines["semantic"].model.prefill(p.engines["semantic"].model.input_embeds_layer(ids),
                                                      torch.tensor([ids.shape[1]]), p.engines["semantic"].cache,
                                                      torch.tensor([0])) for p in (bf16, fp32)]
        assert rel_err(*logits) < 0.05


def test_cpu_offload_gives_the_same_tokens(tiny_ckpt):
    plain = BarkPipeline.from_pretrained(str(tiny_ckpt), EngineOptions(capacity=2))
    offload = BarkPipeline.from_pretrained(str(tiny_ckpt), EngineOptions(capacity=2, cpu_offload=True))
    params = GenerationParams.greedy(max_semantic_tokens=20, min_eos_p=None)
    a = plain.generate("Hello there.", "v2/en_speaker_0", params)[0]
    b = offload.generate("Hello there.", "v2/en_speaker_0", params)[0]
    np.testing.assert_array_equal(a.fine, b.fine)
    # and the weights really were offloaded: accelerate's hooks hold them, the modules keep meta tensors
    for stage in ("semantic", "coarse", "fine"):
        model = offload.engines[stage].model
        assert all(p.device.type == "meta" for p in model.parameters()), stage
        assert any(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in model.modules()), stage
        assert all(p.device.type == "cpu" for p in plain.engines[stage].model.parameters()), stage


def test_progress_callbacks_follow_the_stages(pipe):
    """synthesize reports every engine step (stage by stage, segment by segment) and every segment."""
    steps, segments = [], []
    text = "First sentence here. " * 3 + "And a second one."
    gen = pipe.synthesize(text, None, GenerationParams.greedy(max_semantic_tokens=12, seed=1),
                          max_segment_tokens=16, on_segment=lambda i, n: segments.append((i, n)),
                          on_step=steps.append)
    n = len(segments) - 1
    assert n >= 2 and segments == [(i, n) for i in range(n + 1)]
    runs = [s for i, s in enumerate(steps) if i == 0 or steps[i - 1] != s]  # collapse repeats
    assert runs == ["semantic", "coarse", "fine", "codec"] * n
    # random weights never emit EOS: semantic steps = 1 prefill + 11 decodes per segment
    assert steps.count("semantic") == 12 * n and len(gen.semantic) == 12 * n


def test_chunked_forwards_give_the_same_tokens(tiny_ckpt, pipe):
    """Prefills and fine windows split into one-row forwards (max_forward_tokens=1) change nothing."""
    chunked = BarkPipeline.from_pretrained(str(tiny_ckpt), EngineOptions(capacity=8, max_forward_tokens=1,
                                                                         batch_invariant=True))
    texts = ["Hello there.", "A different, longer sentence here.", "♪ la la la ♪"]
    voices = [None, "v2/en_speaker_1", "announcer"]
    params = [GenerationParams.greedy(max_semantic_tokens=n, seed=i) for i, n in enumerate([30, 45, 20])]
    for a, b in zip(pipe.generate(texts, voices, params), chunked.generate(texts, voices, params)):
        np.testing.assert_array_equal(a.semantic, b.semantic)
        np.testing.assert_array_equal(a.coarse, b.coarse)
        np.testing.assert_array_equal(a.fine, b.fine)
        np.testing.assert_allclose(a.audio, b.audio, atol=1e-5)


def test_forward_token_budget():
    import torch

    from bark_serve.stages.engine import forward_token_budget

    # bark-small (hidden 768): bf16 MLP activation of 4096 rows = 24 MiB; fp32 halves the rows
    assert forward_token_budget(None, "cpu", torch.bfloat16, 768) == 4096
    assert forward_token_budget(None, "cpu", torch.float32, 768) == 2048
    assert forward_token_budget(None, "cpu", torch.float32, 1024) == 1536
    assert forward_token_budget(None, "cuda", torch.bfloat16, 768) >= 1 << 20  # no chunking on GPUs
    assert forward_token_budget(7, "cpu", torch.float32, 768) == 7


@pytest.mark.parametrize("setting,expected", [("1", "True"), ("0", "False")])
def test_malloc_tuning_applies_once_and_can_be_turned_off(setting, expected):
    import os
    import subprocess
    import sys

    code = "from bark_serve.stages.engine import tune_cpu_malloc as t; print(t(), t())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "BARK_MALLOC_TUNING": setting}).stdout.split()
    assert out == [expected, expected]  # glibc on Linux: applied (or not) once, the same answer after


@pytest.mark.parametrize("n_coarse", [0, 1, 59, 630, 631, 2000])
def test_coarse_window_length_is_the_prefill_length(ckpt, n_coarse):
    """Prefill chunking sizes coarse prompts without building them; the two must agree."""
    from bark_serve.stages import tokens as T

    spec = ckpt.spec
    plan = T.coarse_window_plan(0, 0, 60, spec)
    ids = T.coarse_window_input(np.arange(300) % 10, np.arange(n_coarse) % 1024, plan, spec)
    assert T.coarse_window_length(n_coarse, spec) == len(ids)


def _fifo_steps(engine, requests) -> tuple[int, dict]:
    """Admit in the given order whenever a place frees up (iter_run before it admitted the longest first).
    -> (steps, {id: output})"""
    out, pending, steps = {}, list(requests), 0
    while pending or engine.num_active:
        while pending and engine.free > 0:
            engine.admit(pending.pop(0))
        steps += 1
        for res in engine.step():
            assert res.ok, res.error
            out[res.request_id] = res.output
    return steps, out


@pytest.mark.parametrize("stage", ["semantic", "coarse"])
def test_run_admits_the_longest_first_and_keeps_the_given_order(ckpt, pipe, stage):
    """Two places, two short requests given before a long one: in the given order the long one starts
    when the short ones end and runs alone; longest first it starts at once and the short ones run
    beside it, one after the other. Same tokens, results in the given order, fewer steps."""
    [eng] = load_engines(ckpt, EngineOptions(capacity=2, torch_threads=1, batch_invariant=True), [stage]).values()
    if stage == "semantic":
        text = pipe.text.encode("Hello there.")
        reqs = [SemanticRequest(f"s{i}", text, None, SAMPLED, None, n, seed=i) for i, n in enumerate([6, 7, 30])]
    else:
        rng = np.random.default_rng(1)
        reqs = [CoarseRequest(f"c{i}", rng.integers(0, 10_000, n).astype(np.int32), None, SAMPLED, seed=i)
                for i, n in enumerate([20, 22, 90])]
    assert sum(eng.steps_estimate(r) for r in reqs[:2]) < eng.steps_estimate(reqs[2])
    fifo_steps, fifo = _fifo_steps(eng, reqs)
    before = eng.totals["steps"]
    results = eng.run(reqs)
    steps = eng.totals["steps"] - before
    assert [r.request_id for r in results] == [r.request_id for r in reqs]
    for r in results:
        np.testing.assert_array_equal(r.output, fifo[r.request_id])
    short_a, short_b, long = (eng.steps_estimate(r) for r in reqs)
    assert fifo_steps >= min(short_a, short_b) + long  # the long one waited for a place, then ran alone
    assert steps == long < fifo_steps  # the short ones ran one after the other beside it (6 + 7 < 30)
    before = eng.totals["steps"]
    in_order = eng.run(reqs, longest_first=False)
    assert eng.totals["steps"] - before == fifo_steps
    assert [r.request_id for r in in_order] == [r.request_id for r in reqs]


def test_a_malformed_request_is_estimated_as_zero_and_refused_by_admit(ckpt, pipe):
    [eng] = load_engines(ckpt, EngineOptions(capacity=2, torch_threads=1), ["coarse"]).values()
    bad = CoarseRequest("bad", None, None, SAMPLED, seed=0)  # type: ignore[arg-type]
    good = CoarseRequest("good", np.arange(12, dtype=np.int32), None, SAMPLED, seed=0)
    assert eng.steps_estimate(bad) == 0 and eng.steps_estimate(good) > 0
    bad_res, good_res = eng.run([bad, good])
    assert "semantic_tokens" in str(bad_res.error) and good_res.ok

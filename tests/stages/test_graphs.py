"""The fixed-shape step path (stages/graphs.py) gives the same tokens as the eager path and as transformers.

On CPU ``cuda_graphs="on"`` runs exactly what a CUDA graph would replay, without capture: a
static whole-length KV cache, every step padded to a captured shape (rows to a bucket, decode
spans and prompt lengths to multiples of 128), per-slot state and pre-drawn uniforms on the device.
These tests check that this path is exact (its engines batch-invariant, stages/invariance.py, so
"exact" is to the bit whatever shares a step):

- greedy tokens equal transformers' Bark and the eager path, audio within 1e-4;
- seeded sampling does not depend on the batch, the bucket, the padding or the path;
- requests that join and leave mid-flight (the bucket growing and shrinking under them) get the
  tokens they get alone, in the semantic, coarse and fine engines;
- a cancelled request frees its slot, and the next request in it is unaffected;
- every step here returns its graph's one output tensor, overwritten by the next run of that graph, as a
  replay does on CUDA (tests/stages/conftest.py's ``replay_outputs``): prefill chunks of one shape keep
  their own tokens;
- the CUDA-only pieces a CPU run can reach: graphs off with cpu_offload, a fine step's device sync, the
  causal steps' part timing by CUDA events;
- the pieces: bucket and span choice, the cuda_graphs setting, the sampler's modes and the pre-drawn uniforms.
"""

from __future__ import annotations

import functools
import time
import types

import numpy as np
import pytest
import torch

from bark_serve.stages.engine import EngineOptions, PartTimer
from bark_serve.stages.graphs import (
    DEFAULT_BUCKETS,
    StepGraphs,
    buckets_for,
    dispatched_ops,
    fit,
    spans_for,
    use_graphs,
)
from bark_serve.stages.modeling import decode_attention
from bark_serve.stages.pipeline import BarkPipeline, load_engines
from bark_serve.stages.sampling import NO_TOP_K, RowSampling, SampleMode, predraw, sample_tokens
from bark_serve.stages.slot_table import SlotTable
from bark_serve.stages.types import (
    GREEDY,
    CoarseRequest,
    FineRequest,
    GenerationParams,
    SamplingParams,
    SemanticRequest,
)
from bark_serve.stages.weights import Checkpoint
from tests.hf_reference import HFBark
from tests.stages.test_parity import CASES, _assert_same, _voice

SAMPLED = SamplingParams(temperature=0.8, top_k=200, top_p=0.95)
PARITY_CASES = [CASES[1], CASES[2], CASES[4]]  # a checkpoint voice, an .npz voice, the long one (420 tokens)


# -- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf(tiny_ckpt):
    return HFBark(tiny_ckpt)


@pytest.fixture(scope="module")
def refs(hf, preset_dir):
    """transformers' greedy generations, computed once per case."""
    memo = {}

    def get(case):
        text, voice, n_sem = case
        if case not in memo:
            memo[case] = hf.generate(text, _voice(preset_dir, voice), max_semantic_tokens=n_sem)
        return memo[case]

    return get


def _pipeline(tiny_ckpt, preset_dir, **options) -> BarkPipeline:
    """Batch-invariant engines (stages/invariance.py): the exactness asserted here is to the bit, across
    batch sizes and buckets."""
    return BarkPipeline.from_pretrained(str(tiny_ckpt), EngineOptions(batch_invariant=True, **options),
                                        preset_dirs=[preset_dir])


@pytest.fixture(scope="module")
def eager(tiny_ckpt, preset_dir):
    """cuda_graphs left at "auto": off on CPU."""
    return _pipeline(tiny_ckpt, preset_dir, capacity=8)


@pytest.fixture(scope="module")
def fixed(tiny_ckpt, preset_dir):
    return _pipeline(tiny_ckpt, preset_dir, capacity=8, cuda_graphs="on")


@pytest.fixture(scope="module")
def fixed3(tiny_ckpt, preset_dir):
    """Buckets 2 and 3 only: one row runs padded to two."""
    return _pipeline(tiny_ckpt, preset_dir, capacity=3, cuda_graphs="on", graph_buckets=(2,))


@pytest.fixture(scope="module")
def gemv(tiny_ckpt, preset_dir):
    """The fixed-shape path with CUDA's decode attention (``decode_attention``: two batched GEMVs, the
    mask inverted once per step, the KV rows written by ``index_put_``), run on CPU."""
    pipe = _pipeline(tiny_ckpt, preset_dir, capacity=4, cuda_graphs="on")
    for stage in ("semantic", "coarse"):
        pipe.engines[stage].model.gemv_decode = True
    return pipe


@pytest.fixture(autouse=True)
def _replayed(replay_outputs):
    """Every fixed-shape step here returns its graph's one output tensor, overwritten by the graph's next run,
    as a replay on CUDA does (tests/stages/conftest.py)."""
    return replay_outputs


@pytest.fixture(autouse=True)
def _drained(request):
    """A test that fails mid-flight leaves no request in a shared engine for the next test."""
    yield
    for name in ("eager", "fixed", "fixed3", "gemv"):
        if name in request.fixturenames:
            for stage in ("semantic", "coarse", "fine"):
                eng = request.getfixturevalue(name).engines[stage]
                held = [s.request for s in getattr(eng, "slots", [])] + [j.request for j in getattr(eng, "jobs", [])]
                for req in held:
                    eng.cancel(req.request_id)
                eng.step()  # hands back results finished on admission, if any
                assert eng.num_active == 0


def _alone(engine, req):
    [res] = engine.run([req])
    assert res.ok, res.error
    return res.output


def _assert_same_tokens(a, b):
    for stage in ("semantic", "coarse", "fine"):
        np.testing.assert_array_equal(getattr(a, stage), getattr(b, stage), err_msg=stage)


# -- which path runs ------------------------------------------------------------------------------------
def test_auto_is_eager_on_cpu_and_on_is_the_fixed_shape_path(eager, fixed, fixed3):
    for stage in ("semantic", "coarse", "fine"):
        assert eager.engines[stage].graph_stats() is None
        for pipe, buckets in ((fixed, (1, 2, 4, 8)), (fixed3, (2, 3))):
            eng = pipe.engines[stage]
            assert eng.row_buckets == buckets
            assert eng.graph_stats()["cuda_graphs"] == 0  # nothing captured on CPU: the same steps run eagerly
    assert eager.engines["fine"].graphs is None and fixed.engines["fine"].graphs is not None
    for pipe in (eager, fixed, fixed3):
        for stage in ("semantic", "coarse", "fine"):
            assert pipe.engines[stage].row_floor is not None, f"no batch-invariant GEMM row count on this CPU ({stage})"
    for stage in ("semantic", "coarse"):
        eng = fixed.engines[stage]
        assert eager.engines[stage].decode_graphs is None and eager.engines[stage].prefill_graphs is None
        assert not eager.engines[stage].cache.static
        # max_batch slots and the scratch slot a padded prefill's padding rows write (never decoded)
        assert eng.cache.static and eng.cache.n_slots == 9 and eng.scratch == 8 and eng.cache.length == eng.max_len
        assert eng.spans[-1] == eng.max_len  # every decode span fits a captured one


# -- greedy parity -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: f"{c[1]}-{c[2]}")
def test_fixed_shape_greedy_matches_transformers_and_eager(fixed, eager, refs, preset_dir, case):
    text, voice, n_sem = case
    params = GenerationParams.greedy(max_semantic_tokens=n_sem, min_eos_p=None)
    ours = fixed.generate(text, _voice(preset_dir, voice), params)[0]
    assert len(ours.semantic) == n_sem
    _assert_same(ours, refs(case))
    _assert_same_tokens(ours, eager.generate(text, _voice(preset_dir, voice), params)[0])


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: f"{c[1]}-{c[2]}")
def test_gemv_decode_greedy_matches_transformers_and_eager(gemv, eager, refs, preset_dir, case):
    """CUDA's decode attention, run on CPU, decodes what SDPA does (the parity case of 420 tokens
    spans four 128-position decode spans)."""
    text, voice, n_sem = case
    params = GenerationParams.greedy(max_semantic_tokens=n_sem, min_eos_p=None)
    ours = gemv.generate(text, _voice(preset_dir, voice), params)[0]
    _assert_same(ours, refs(case))
    _assert_same_tokens(ours, eager.generate(text, _voice(preset_dir, voice), params)[0])


def test_fixed_shape_greedy_batch_matches_transformers(fixed, refs, preset_dir):
    """The three cases in one batch: three rows padded to bucket 4, leaving at different steps."""
    voices = [_voice(preset_dir, v) for _, v, _ in PARITY_CASES]
    params = [GenerationParams.greedy(max_semantic_tokens=n, min_eos_p=None) for *_, n in PARITY_CASES]
    buckets = []
    ours = fixed.generate([t for t, _, _ in PARITY_CASES], voices, params,
                          on_step=lambda s: buckets.append(fixed.engines[s].last_step.get("bucket")))
    assert 4.0 in buckets
    for out, case in zip(ours, PARITY_CASES):
        _assert_same(out, refs(case))


# -- seeded sampling: independent of batch, bucket, padding and path ---------------------------------
MIXED = [
    ("Hello, my dog is cute.", None, GenerationParams.greedy(max_semantic_tokens=30, min_eos_p=None, seed=11)),
    ("A different, longer sentence here.", "v2/en_speaker_1",
     GenerationParams(semantic=SamplingParams(0.8, top_k=50, top_p=0.9),
                      coarse=SamplingParams(0.8, top_k=100, top_p=0.95), fine=SamplingParams(0.5),
                      max_semantic_tokens=55, min_eos_p=None, seed=12)),
    ("♪ la la la ♪", "announcer",
     GenerationParams(semantic=SamplingParams(0.7), coarse=SamplingParams(0.7), fine=SamplingParams(0.5),
                      max_semantic_tokens=70, seed=13)),  # Bark's default min_eos_p
    ("[laughs] ok", "v2/en_speaker_6",
     GenerationParams(semantic=GREEDY, coarse=SamplingParams(1.0, top_p=0.8), fine=SamplingParams(0.5),
                      max_semantic_tokens=20, min_eos_p=None, seed=14)),
]


def test_seeded_sampling_is_independent_of_batch_bucket_padding_and_path(eager, fixed, fixed3, gemv):
    texts, voices, params = (list(x) for x in zip(*MIXED))
    steps = []

    def record(stage):
        st = fixed3.engines[stage].last_step
        steps.append((stage, st["batch"], st.get("bucket")))

    runs = {"eager capacity 8": eager.generate(texts, voices, params),
            "fixed capacity 8": fixed.generate(texts, voices, params),
            "fixed capacity 3, buckets 2 and 3": fixed3.generate(texts, voices, params, on_step=record),
            "fixed capacity 4, CUDA's decode attention": gemv.generate(texts, voices, params)}
    alone = [eager.generate(t, v, p)[0] for t, v, p in MIXED]
    for name, outs in runs.items():
        for i, (out, ref) in enumerate(zip(outs, alone)):
            try:
                _assert_same_tokens(out, ref)
            except AssertionError as exc:
                raise AssertionError(f"{name}, request {i}: {exc}") from None
    # capacity 3 really ran at both buckets and padded a lone row (fine: one request left, bucket 2)
    assert {b for _, _, b in steps if b is not None} == {2.0, 3.0}
    assert any(s == "fine" and batch == 1 and b == 2 for s, batch, b in steps)
    # and the sampled requests did sample
    greedy_twin = eager.generate(MIXED[2][0], MIXED[2][1], GenerationParams.greedy(max_semantic_tokens=70))[0]
    assert not np.array_equal(alone[2].semantic, greedy_twin.semantic)


# -- joins and leaves mid-flight on the fixed path ---------------------------------------------------
def _staggered_fixed(engine, requests, join_every: int):
    """Admit one request, step ``join_every`` times, admit the next... then drain, checking each step's bucket.

    -> ({id: output}, the decode bucket of every step that decoded)
    """
    out, pending, seen = {}, list(requests), []
    while pending or engine.num_active:
        if pending:
            engine.admit(pending.pop(0))
        for _ in range(join_every if pending else 1):
            if not engine.slots:
                break
            decoding = [i for i, s in enumerate(engine.slots) if not s.needs_prefill]
            held = len(engine.slots)
            for res in engine.step():
                assert res.ok, res.error
                out[res.request_id] = res.output
            st = engine.last_step
            assert st["batch"] == held  # decode rows and prefill rows
            if decoding:  # the decode covers slots 0..n-1 (rows waiting for a prefill among them are inactive)
                n = decoding[-1] + 1
                bucket = st["bucket"]
                assert bucket in engine.row_buckets and bucket == fit(engine.row_buckets, n)
                assert bucket >= n >= len(decoding)
                assert st["graph_steps"] == 0  # CPU: nothing replayed
                seen.append(int(bucket))
            else:
                assert "bucket" not in st
    return out, seen


def _rose_then_fell(seen: list[int]) -> bool:
    peak = seen.index(max(seen))
    return min(seen[:peak], default=max(seen)) < seen[peak] and min(seen[peak:]) < seen[peak]


@pytest.mark.parametrize("path", ["fixed", "gemv"])
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_semantic_joins_and_leaves_on_the_fixed_path(request, eager, sampling, path):
    fixed = request.getfixturevalue(path)
    eng = fixed.engines["semantic"]
    voice = fixed.voices.resolve("v2/en_speaker_1")
    reqs = [SemanticRequest(f"s{i}", fixed.text.encode(t), voice if i % 2 else None, sampling, None, n, seed=i)
            for i, (t, n) in enumerate([("Hello there.", 50), ("A different, longer sentence here.", 23),
                                        ("♪ la la la ♪", 37), ("[laughs] ok", 41)])]
    joined, seen = _staggered_fixed(eng, reqs, join_every=7)
    assert _rose_then_fell(seen), seen
    assert max(seen) == 4  # four rows held at once: bucket 4
    for r in reqs:
        assert len(joined[r.request_id]) == r.max_new_tokens
        np.testing.assert_array_equal(joined[r.request_id], _alone(eng, r))
        np.testing.assert_array_equal(joined[r.request_id], _alone(eager.engines["semantic"], r))


@pytest.mark.parametrize("path", ["fixed", "gemv"])
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_coarse_joins_and_leaves_on_the_fixed_path(request, eager, sampling, path):
    fixed = request.getfixturevalue(path)
    eng = fixed.engines["coarse"]
    voice = fixed.voices.resolve("announcer")
    rng = np.random.default_rng(0)
    reqs = [CoarseRequest(f"c{i}", rng.integers(0, 10_000, n).astype(np.int32), voice if i % 2 else None,
                          sampling, seed=10 + i) for i, n in enumerate([70, 33, 95])]
    joined, seen = _staggered_fixed(eng, reqs, join_every=45)  # joins land inside the others' 60-token windows
    assert _rose_then_fell(seen), seen
    for r in reqs:
        np.testing.assert_array_equal(joined[r.request_id], _alone(eng, r))
        np.testing.assert_array_equal(joined[r.request_id], _alone(eager.engines["coarse"], r))


@pytest.mark.parametrize("join_every", [1, 4], ids=["mid-window-1", "mid-window-4"])
@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=0.5)], ids=["greedy", "sampled"])
def test_fine_joins_on_the_fixed_path(fixed, fixed3, eager, sampling, join_every):
    """Rows at different passes share a fixed-shape pass; at capacity 3 (buckets 2 and 3) one row runs padded."""
    voice = fixed.voices.resolve("v2/en_speaker_6")
    rng = np.random.default_rng(1)
    reqs = [FineRequest(f"f{i}", rng.integers(0, 1024, (2, n)).astype(np.int32), voice if i == 0 else None,
                        sampling, seed=i) for i, n in enumerate([900, 120, 1300])]
    for pipe in (fixed, fixed3):
        eng = pipe.engines["fine"]
        out, pending, seen = {}, list(reqs), []
        while pending or eng.num_active:
            if pending:
                eng.admit(pending.pop(0))
            for _ in range(join_every if pending else 1):
                batch = eng.num_active
                for res in eng.step():
                    assert res.ok, res.error
                    out[res.request_id] = res.output
                assert eng.last_step["batch"] == batch
                bucket = eng.last_step["bucket"]
                assert bucket in eng.row_buckets and bucket == fit(eng.row_buckets, batch) and bucket >= batch
                seen.append(int(bucket))
        assert _rose_then_fell(seen), seen
        for r in reqs:
            np.testing.assert_array_equal(out[r.request_id], _alone(eng, r))
            np.testing.assert_array_equal(out[r.request_id], _alone(eager.engines["fine"], r))


# -- prefill chunks --------------------------------------------------------------------------------------
def test_prefill_chunks_of_one_shape_keep_their_own_tokens(tiny_ckpt, replay_outputs):
    """With ``max_forward_tokens`` set one step's prefill runs in chunks, and chunks of one shape replay one
    graph, whose output the next replay overwrites: each chunk keeps its own tokens (before, every request
    of a step's chunks got the last chunk's first token on CUDA, while its decode went on from its own)."""
    ckpt = Checkpoint.open(tiny_ckpt)
    reqs = [SemanticRequest(f"r{i}", (np.arange(3 + 7 * i) * (i + 3)) % 50, sampling=sampling, max_new_tokens=6,
                            seed=i) for i, sampling in enumerate([GREEDY, SAMPLED, GREEDY, SAMPLED])]

    def tokens(**options):
        eng = load_engines(ckpt, EngineOptions(capacity=4, graph_buckets=(1, 2, 4), batch_invariant=True,
                                               **options), ("semantic",))["semantic"]
        return [res.output.tolist() for res in eng.run(reqs)]

    eager = tokens()
    assert len({out[0] for out in eager}) > 1  # the requests' first tokens differ: a mix-up shows
    replay_outputs.runs.clear()
    assert tokens(cuda_graphs="on", max_forward_tokens=257) == eager  # a semantic prompt is 257: one row a chunk
    prefills = [run for run in replay_outputs.runs if run[0] == "semantic prefill"]
    assert len(prefills) == len(reqs) and len(set(prefills)) < len(prefills)  # chunks replayed one graph
    assert tokens(cuda_graphs="on") == eager


# -- padded prefills write no decoded row twice ---------------------------------------------------------
def test_a_padded_prefills_padding_rows_write_the_scratch_slot(tiny_ckpt, monkeypatch):
    """Three prompts in a bucket of four: the padding row goes to the scratch slot, so every row a step
    writes is written once (two writes of one index in one index_put_ are undefined on CUDA, and identical
    rows of a GEMM need not get identical bits there: the decoded token could differ from the recorded one)."""
    from bark_serve.stages.graphs import StepGraphs

    ckpt = Checkpoint.open(tiny_ckpt)
    eng = load_engines(ckpt, EngineOptions(capacity=4, graph_buckets=(1, 2, 4), cuda_graphs="on", batch_invariant=True),
                       ("semantic",))["semantic"]
    seen = []
    run = StepGraphs.run

    def spy(self, shape, mode):
        if self is eng.prefill_graphs:
            seen.append(eng._pf_rows[: shape[0]].tolist())
        return run(self, shape, mode)

    monkeypatch.setattr(StepGraphs, "run", spy)
    reqs = [SemanticRequest(f"r{i}", np.arange(5 + i) % 50, max_new_tokens=4, seed=i) for i in range(3)]
    single = load_engines(ckpt, EngineOptions(capacity=1, batch_invariant=True), ("semantic",))["semantic"]
    alone = [single.run([r])[0].output.tolist() for r in reqs]
    assert [res.output.tolist() for res in eng.run(reqs)] == alone
    assert len(seen) == 1 and sorted(seen[0][:3]) == [0, 1, 2] and seen[0][3] == eng.scratch == 4


# -- a fine step ends when its device work does -----------------------------------------------------------
@pytest.mark.parametrize("path", ["eager", "fixed"])
def test_a_fine_step_waits_for_its_device_work(request, path, monkeypatch):
    """A fine pass reads nothing back unless a request finishes, so on CUDA its step returned with the pass in
    flight: ``step_s`` was launch time and the next ``admit`` (on the replica's event loop) waited for the GPU.
    Every step now ends with ``_device_sync``, before it times itself."""
    eng = request.getfixturevalue(path).engines["fine"]
    steps_before = eng.totals.get("steps", 0.0)
    synced_at: list[float] = []  # steps recorded when each sync ran
    monkeypatch.setattr(eng, "_device_sync", lambda: synced_at.append(eng.totals.get("steps", 0.0)))
    rng = np.random.default_rng(6)
    reqs = [FineRequest(f"s{i}", rng.integers(0, 1024, (2, n)).astype(np.int32), None, SamplingParams(0.5), seed=i)
            for i, n in enumerate([100, 700])]
    assert all(res.ok for res in eng.run(reqs))
    steps = int(eng.totals["steps"] - steps_before)
    assert steps > 1 and synced_at == [steps_before + i for i in range(steps)]  # once a step, before its record


def test_device_sync_waits_for_the_stream_on_cuda_only(monkeypatch):
    from bark_serve.stages.engine import StageEngine

    synced = []

    class Stream:
        def synchronize(self):
            synced.append(True)

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    StageEngine._device_sync(types.SimpleNamespace(device=torch.device("cpu")))
    assert synced == []
    StageEngine._device_sync(types.SimpleNamespace(device=torch.device("cuda")))
    assert synced == [True]


def test_decode_and_prefill_times_come_from_cuda_events_on_cuda(tiny_ckpt):
    """On CUDA a causal step's parts are timed by CUDA events, read after the step's one device-to-host copy:
    by the wall clock the decode took its launch time only and its GPU time went to the prefill, whose first
    host-to-device copy waited for it. A fake event (its elapsed time: its wall-clock span plus one second)
    stands in for CUDA's here: the parts come from the events, under the keys the benchmark reads."""

    class Event:
        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, end) -> float:  # milliseconds, as CUDA's
            return (end.t - self.t) * 1e3 + 1e3

    eng = load_engines(Checkpoint.open(tiny_ckpt), EngineOptions(capacity=2), ("semantic",))["semantic"]
    eng._timer = PartTimer(torch.device("cuda"), event=Event)
    eng.admit(SemanticRequest("a", np.arange(5), max_new_tokens=4))
    eng.step()  # a's prefill alone
    first = dict(eng.last_step)
    eng.admit(SemanticRequest("b", np.arange(7), max_new_tokens=4))
    eng.step()  # a's decode and b's prefill
    mixed = dict(eng.last_step)
    while eng.num_active:
        eng.step()
    assert first["decode_s"] == 0.0 and first["prefill_s"] > 1.0 and first["decode_only_steps"] == 0.0
    assert mixed["decode_s"] > 1.0 and mixed["prefill_s"] > 1.0
    assert eng.last_step["decode_s"] > 1.0 and eng.last_step["prefill_s"] == 0.0  # decode only
    assert eng.totals["decode_s"] > 3.0 and set(mixed) >= {"decode_s", "prefill_s", "decode_flops", "prefill_flops"}


# -- cancel frees the slot ---------------------------------------------------------------------------
def _causal_requests(pipe, stage: str):
    if stage == "semantic":
        voice = pipe.voices.resolve("v2/en_speaker_1")
        return [SemanticRequest(f"k{i}", pipe.text.encode(t), voice if i == 1 else None, SAMPLED, None, n, seed=20 + i)
                for i, (t, n) in enumerate([("Hello there.", 30), ("Cancel me.", 40), ("♪ la ♪", 35),
                                            ("The one after.", 25)])]
    rng = np.random.default_rng(3)
    voice = pipe.voices.resolve("announcer")
    return [CoarseRequest(f"k{i}", rng.integers(0, 10_000, n).astype(np.int32), voice if i == 1 else None, SAMPLED,
                          seed=20 + i) for i, n in enumerate([40, 50, 45, 30])]


@pytest.mark.parametrize("stage", ["semantic", "coarse"])
def test_cancel_on_the_fixed_path_frees_the_slot(fixed, eager, stage):
    eng = fixed.engines[stage]
    first, victim, last, after = _causal_requests(fixed, stage)
    for r in (first, victim, last):
        eng.admit(r)
    out = {}
    for _ in range(5):
        for res in eng.step():
            out[res.request_id] = res.output
    assert eng.cancel(victim.request_id) and not eng.cancel(victim.request_id)
    assert [s.request.request_id for s in eng.slots] == [first.request_id, last.request_id]  # the last moved in
    t = eng.table
    assert t.active[:2].tolist() == [True, True]
    assert not bool(t.active[2]) and int(t.position[2]) == 0 and int(t.token[2]) == 0 and int(t.step[2]) == 0
    eng.admit(after)  # takes the freed row 2
    while eng.num_active:
        for res in eng.step():
            assert res.ok, res.error
            out[res.request_id] = res.output
    assert set(out) == {first.request_id, last.request_id, after.request_id}
    for r in (first, last, after):
        np.testing.assert_array_equal(out[r.request_id], _alone(eager.engines[stage], r))


def test_fine_cancel_on_the_fixed_path(fixed, eager):
    eng = fixed.engines["fine"]
    rng = np.random.default_rng(4)
    a, victim, after = (FineRequest(f"fk{i}", rng.integers(0, 1024, (2, n)).astype(np.int32), None,
                                    SamplingParams(temperature=0.5), seed=30 + i)
                        for i, n in enumerate([300, 700, 200]))
    eng.admit(a)
    eng.admit(victim)
    eng.step()
    eng.step()
    assert eng.cancel(victim.request_id) and eng.num_active == 1
    eng.admit(after)  # its window goes where the cancelled one's was in the static buffers
    out = {}
    while eng.num_active:
        for res in eng.step():
            out[res.request_id] = res.output
    assert set(out) == {a.request_id, after.request_id}
    for r in (a, after):
        np.testing.assert_array_equal(out[r.request_id], _alone(eager.engines["fine"], r))


# -- the pieces --------------------------------------------------------------------------------------
def test_buckets_for():
    assert buckets_for(8) == (1, 2, 4, 8)
    assert buckets_for(10) == (1, 2, 4, 8, 10)  # capacity itself is always a bucket
    assert buckets_for(1) == (1,)
    assert buckets_for(300) == (*DEFAULT_BUCKETS, 300)
    assert buckets_for(3, (2,)) == (2, 3)
    assert buckets_for(6, (4, 2, 2, 9, 0)) == (2, 4, 6)  # sorted, deduplicated, clipped to [1, capacity]
    assert buckets_for(4, (4,)) == (4,)


def test_fit_and_spans_for():
    sizes = (2, 3, 8)
    assert [fit(sizes, n) for n in range(1, 10)] == [2, 2, 3, 8, 8, 8, 8, 8, None]  # None: past the largest
    assert fit(buckets_for(8), 5) == 8 and fit(buckets_for(3, (2,)), 1) == 2
    assert spans_for(1, 300) == (128, 256, 300)  # multiples of 128 from the first >= lo, and hi itself
    assert spans_for(258, 1025) == (384, 512, 640, 768, 896, 1024, 1025)
    assert spans_for(257, 257) == (257,) and spans_for(256, 256) == (256,)
    assert spans_for(10, 100, step=32) == (32, 64, 96, 100)


def test_step_graphs_run_eagerly_on_cpu():
    calls = []

    def fn(shape, mode):
        calls.append((shape, mode))
        return torch.zeros(shape)

    graphs = StepGraphs.grid(fn, [(2, 3), (128, 256)], torch.device("cpu"), "test")
    assert sorted(graphs.shapes) == [(2, 128), (2, 256), (3, 128), (3, 256)] and graphs.shapes[0] == (3, 256)
    graphs.capture()  # CPU: nothing is captured, nothing is run
    assert graphs.graphs == {} and calls == []
    out, replayed = graphs.run((2, 128), SampleMode.SAMPLE)
    assert not replayed and out.shape == (2, 128) and calls == [((2, 128), SampleMode.SAMPLE)]
    out, replayed = graphs.run((11, 5), SampleMode.GREEDY)  # a shape past every captured one: run as it is
    assert not replayed and out.shape == (11, 5) and calls[-1] == ((11, 5), SampleMode.GREEDY)
    assert graphs.stats()["cuda_graphs"] == 0 and graphs.stats()["shapes"] == 4


def test_use_graphs():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)  # a device object needs no GPU
    assert not use_graphs("auto", cpu) and use_graphs("auto", cuda)
    assert use_graphs("on", cpu) and use_graphs("on", cuda)
    assert not use_graphs("off", cpu) and not use_graphs("off", cuda)
    for setting in ("auto", "on"):  # offload copies weights per forward: no graphs, even when asked for
        assert not use_graphs(setting, cuda, cpu_offload=True) and not use_graphs(setting, cpu, cpu_offload=True)
    for bad in ("true", "ON", "", "1"):
        with pytest.raises(ValueError, match="cuda_graphs"):
            use_graphs(bad, cpu)


def test_cuda_graphs_on_with_cpu_offload_runs_eagerly(tiny_ckpt, caplog):
    """``cuda_graphs: on`` with ``cpu_offload``: the offloaded weights are meta tensors between forwards, so the
    fine stage's stacked heads could not be built and every fine pass failed; now every stage runs its eager
    steps (and the causal stages keep a cache sized to their requests, not a static one), with a warning."""
    with caplog.at_level("WARNING", logger="bark_serve.stages.graphs"):
        engines = load_engines(Checkpoint.open(tiny_ckpt), EngineOptions(capacity=2, cuda_graphs="on",
                                                                          cpu_offload=True))
    fine = engines["fine"]
    rng = np.random.default_rng(5)
    [res] = fine.run([FineRequest("f", rng.integers(0, 1024, (2, 30)).astype(np.int32))])
    assert res.ok, res.error
    assert res.output.shape == (8, 30)
    assert fine.graphs is None and fine.graph_stats() is None
    assert "ignored with cpu_offload" in caplog.text
    for stage in ("semantic", "coarse"):
        eng = engines[stage]
        assert eng.decode_graphs is None and not eng.cache.static


def _rows(*params: SamplingParams) -> RowSampling:
    return RowSampling(torch.tensor([float(p.temperature) for p in params]),
                       torch.tensor([int(p.top_k or NO_TOP_K) for p in params]),
                       torch.tensor([float(p.top_p if p.top_p is not None else 1.0) for p in params]),
                       torch.tensor([p.greedy for p in params]))


def _take(params: RowSampling, i: int) -> RowSampling:
    """Row ``i`` alone."""
    return RowSampling(*(t[i: i + 1] for t in (params.temperature, params.top_k, params.top_p, params.greedy)))


def test_sampler_modes_agree_on_the_rows_they_share():
    """An unfiltered row draws the same token whether or not a filtering row shares its batch (SAMPLE vs
    FILTER), and a greedy row takes the argmax in every mode."""
    gen = torch.Generator().manual_seed(0)
    params = _rows(GREEDY, SamplingParams(0.9), SamplingParams(0.7, top_k=5), SamplingParams(1.2, top_p=0.8),
                   SamplingParams(1.0, top_k=1))
    r = len(params.greedy)
    for _ in range(200):
        logits = torch.randn((r, 300), generator=gen) * 3
        uniform = torch.rand((r,), generator=gen, dtype=torch.float64)
        argmax = torch.argmax(logits, dim=-1)
        by_mode = {m: sample_tokens(logits, params, uniform, m) for m in SampleMode}
        assert by_mode[SampleMode.SAMPLE][1] == by_mode[SampleMode.FILTER][1]
        alone = sample_tokens(logits[1:2], _take(params, 1), uniform[1:2], SampleMode.SAMPLE)
        assert alone[0] == by_mode[SampleMode.FILTER][1]
        for m in SampleMode:
            assert by_mode[m][0] == argmax[0]
        assert torch.equal(by_mode[SampleMode.GREEDY], argmax)
        top5 = torch.topk(logits[2], 5).indices
        assert by_mode[SampleMode.FILTER][2] in top5
        assert by_mode[SampleMode.FILTER][4] == argmax[4]  # top_k 1 is greedy


def test_sampler_draws_follow_the_uniform():
    """The uniform picks the token by inverse CDF: a spread of uniforms reaches many tokens, the same one the same."""
    logits = torch.zeros((1, 10))
    params = _rows(SamplingParams(1.0))
    picks = [int(sample_tokens(logits, params, torch.tensor([u], dtype=torch.float64), SampleMode.SAMPLE))
             for u in np.linspace(0.0, 0.999, 10)]
    assert picks == list(range(10))


def test_predraw_equals_single_draws():
    a, b = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(1234)
    for n in (1, 7, 1000):
        many = predraw(a, n)
        assert many.dtype == torch.float64 and many.shape == (n,)
        singles = torch.cat([torch.rand((1,), generator=b, dtype=torch.float64) for _ in range(n)])
        assert torch.equal(many, singles)


# -- the CUDA decode step's kernel count and its pieces ----------------------------------------------
def _reference_attention(q, k, v, visible):
    """What decode_attention computed before (scores to float32, then scaled and masked): the same bits."""
    scores = torch.matmul(q, k.transpose(-2, -1)).float() * (q.shape[-1] ** -0.5)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_decode_attention_is_exact(dtype):
    """Scale folded into the query (a power of two for Bark's head size 64), the mask inverted once per step,
    the softmax on the cache dtype's scores: bit for bit the earlier formulation, and within the dtype's
    rounding of float64 SDPA; a row that sees only its first key gets that key's value."""
    gen = torch.Generator().manual_seed(0)
    b, h, s, d = 6, 4, 200, 64
    q, k, v = (torch.randn(shape, generator=gen).to(dtype) * 2 for shape in ((b, h, 1, d), (b, h, s, d), (b, h, s, d)))
    positions = torch.tensor([0, 1, 57, 128, 198, 199])
    visible = (torch.arange(s)[None, :] <= positions[:, None])[:, None, None, :]
    ours = decode_attention(q, k, v, ~visible)
    assert torch.equal(ours, _reference_attention(q, k, v, visible))
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=visible)
    assert ((ours.double() - ref).norm() / ref.norm()).item() < (1e-6 if dtype == torch.float32 else 2e-2)
    assert torch.equal(ours[0], v[0, :, :1])


def test_cuda_decode_step_kernel_budget(tiny_ckpt):
    """The CUDA path's decode step (run here on CPU) dispatches 16 ops a layer, as many kernels on a GPU, where
    it dispatched 22 (3 copies of q, k and v, a float32 round trip, a mask inverted per layer) and the
    table's row gathers and scatters: a small model's GPU decode step is bound by its kernel count."""
    engines = load_engines(Checkpoint.open(tiny_ckpt), EngineOptions(capacity=4, cuda_graphs="on",
                                                                      graph_buckets=(4,)), ("semantic", "coarse"))
    for name, eng in engines.items():
        eng.model.gemv_decode = True
        shape = eng.decode_graphs.shapes[0]
        step = functools.partial(eng._decode_fixed, shape)
        counts = {mode: dispatched_ops(functools.partial(step, mode)) for mode in SampleMode}
        layers = eng.model.layers
        try:
            eng.model.layers = layers[:1]
            one_layer = dispatched_ops(functools.partial(step, SampleMode.GREEDY))
        finally:
            eng.model.layers = layers
        greedy = counts[SampleMode.GREEDY]
        per_layer = (sum(greedy.values()) - sum(one_layer.values())) // (len(layers) - 1)
        outside = sum(one_layer.values()) - per_layer
        assert per_layer == 16, (name, greedy)
        assert outside <= 20, (name, one_layer)  # embeddings, mask, head, sampling, the table
        # no copies of strided tensors, no gathers of table rows, no host syncs
        assert not {"aten::clone", "aten::index", "aten::_local_scalar_dense"} & set(greedy), greedy
        assert not {"aten::clone", "aten::index"} & set(counts[SampleMode.FILTER]), counts[SampleMode.FILTER]
        # a greedy step reads no sampling parameters and no draws
        assert sum(greedy.values()) < sum(counts[SampleMode.SAMPLE].values()) < sum(counts[SampleMode.FILTER].values())


def test_slot_table_slice_rows_equal_index_rows():
    """A decode's ``slice(0, n)`` reads and updates the same rows, the same way, as the index tensor 0..n-1."""
    gen = torch.Generator().manual_seed(5)
    tables = [SlotTable(6, 10, torch.device("cpu")) for _ in range(2)]
    for t in tables:
        for row, params in enumerate([GREEDY, SamplingParams(0.8, top_k=3), SamplingParams(1.1, top_p=0.7), GREEDY]):
            t.admit(row, params, torch.Generator().manual_seed(row), 10)
        t.start(torch.tensor([0, 1, 2]), torch.tensor([5, 9, 2]))  # row 3 waits for its prefill: inactive
    by_slice, by_index = tables
    for _ in range(4):
        logits = torch.randn((4, 50), generator=gen)
        rows = torch.arange(4)
        for mode in SampleMode:
            assert torch.equal(by_slice.sample(logits, slice(0, 4), mode), by_index.sample(logits, rows, mode))
        assert torch.equal(by_slice.uniform(slice(0, 4)), by_index.uniform(rows))
        tokens = by_index.sample(logits, rows, SampleMode.FILTER)
        by_slice.commit(slice(0, 4), tokens, decoded=True)
        by_index.commit(rows, tokens, decoded=True)
        for name in ("token", "position", "step", "in_window", "active"):
            assert torch.equal(getattr(by_slice, name), getattr(by_index, name)), name
    assert by_slice.position.tolist()[:4] == [9, 13, 6, 0] and by_slice.step.tolist()[:4] == [4, 4, 4, 0]


def test_right_padded_prefill_needs_no_mask(tiny_ckpt):
    """Causal attention alone is exact for right-padded prompts: each prompt's logits and the keys and
    values it leaves in its slot equal those of the prompt prefilled alone (unpadded), whatever the padding."""
    engines = load_engines(Checkpoint.open(tiny_ckpt), EngineOptions(capacity=3, cuda_graphs="on",
                                                                      graph_buckets=(3,)), ("coarse",))
    eng = engines["coarse"]
    model, cache = eng.model, eng.cache
    gen = torch.Generator().manual_seed(3)
    hidden = model.lm_head.weight.shape[1]
    lengths = [37, 90, 64]
    embeds = torch.randn((3, 96, hidden), generator=gen)  # padded to 96; the padding is noise, not zeros
    with torch.inference_mode():
        together = model.prefill(embeds, torch.tensor(lengths), cache, torch.tensor([0, 1, 2]))
        keys = [cache.k[:, i, :, :n].clone() for i, n in enumerate(lengths)]
        for i, n in enumerate(lengths):
            alone = model.prefill(embeds[i: i + 1, :n], torch.tensor([n]), cache, torch.tensor([i]))
            torch.testing.assert_close(together[i], alone[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(keys[i], cache.k[:, i, :, :n], rtol=1e-5, atol=1e-5)

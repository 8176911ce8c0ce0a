"""``batch_invariant`` by one shape per step kind (``EngineOptions.single_shape``, the default on CUDA).

On a GPU a padding floor for the linear layers does not make a row's logits independent of the batch: the
decode attention is two cuBLAS batched GEMMs whose kernels follow the row bucket and the span. So there the
fixed-shape path runs every decode at ``capacity`` rows over the whole reach, every prefill one prompt at
the longest length, and every fine pass at ``capacity`` windows: a row meets the same kernels whatever else is
held. The same path runs on CPU with ``single_shape=True`` (and CUDA's decode attention, ``gemv_decode``);
these tests check that every step there has its one shape, that a seed's tokens alone and in a batch are the
same, and that greedy tokens still match transformers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bark_serve.stages.engine import EngineOptions, invariance_summary, single_shape_for
from bark_serve.stages.invariance import RowLinear
from bark_serve.stages.pipeline import BarkPipeline
from bark_serve.stages.types import GenerationParams
from tests.hf_reference import HFBark
from tests.stages.test_graphs import MIXED, PARITY_CASES, _assert_same_tokens
from tests.stages.test_parity import _assert_same, _voice

CAPACITY = 4


@pytest.fixture(scope="module")
def single(tiny_ckpt, preset_dir):
    pipe = BarkPipeline.from_pretrained(
        str(tiny_ckpt), EngineOptions(capacity=CAPACITY, cuda_graphs="on", batch_invariant=True, single_shape=True),
        preset_dirs=[preset_dir])
    for stage in ("semantic", "coarse"):
        pipe.engines[stage].model.gemv_decode = True  # CUDA's decode attention, the one single_shape is for
    return pipe


@pytest.fixture(scope="module")
def eager(tiny_ckpt, preset_dir):
    return BarkPipeline.from_pretrained(str(tiny_ckpt), EngineOptions(capacity=8, batch_invariant=True),
                                        preset_dirs=[preset_dir])


@pytest.fixture(autouse=True)
def _replayed(replay_outputs):
    return replay_outputs


def test_the_rule_one_shape_on_cuda_on_the_fixed_shape_path_with_batch_invariant():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    on = EngineOptions(batch_invariant=True)
    assert single_shape_for(on, cuda, fixed_shape=True)
    assert not single_shape_for(on, cpu, fixed_shape=True)  # CPU: the probed padding floor (invariance.py)
    assert not single_shape_for(on, cuda, fixed_shape=False)  # eager steps: their shapes follow the batch
    assert not single_shape_for(EngineOptions(), cuda, fixed_shape=True)  # batch_invariant off
    assert single_shape_for(EngineOptions(batch_invariant=True, single_shape=True), cpu, fixed_shape=True)
    assert not single_shape_for(EngineOptions(batch_invariant=True, single_shape=False), cuda, fixed_shape=True)


def test_every_step_of_a_kind_runs_at_one_shape(single, replay_outputs):
    for stage in ("semantic", "coarse", "fine"):
        eng = single.engines[stage]
        assert eng.single_shape and eng.row_floor is None, stage  # no floor probed, nothing padded by RowLinear
        assert all(m.min_rows == 1 for m in eng.model.modules() if isinstance(m, RowLinear)), stage
        assert not any(getattr(m, "math_attention", False) for m in eng.model.modules()), stage
        assert eng.row_buckets == (CAPACITY,) and eng.graph_stats()["single_shape"], stage
        assert "one shape" in invariance_summary(eng)
    longest = {}
    for stage in ("semantic", "coarse"):
        eng = single.engines[stage]
        assert eng.prefill_buckets == (1,) and eng.spans == (eng.max_len,) and len(eng.prompt_lengths) == 1
        longest[stage] = eng.prompt_lengths[0]
    texts, voices, params = (list(x) for x in zip(*MIXED))
    buckets: dict[str, set] = {"semantic": set(), "coarse": set(), "fine": set(), "codec": set()}
    single.generate(texts[:1], voices[:1], params[:1],
                    on_step=lambda s: buckets[s].add(single.engines[s].last_step.get("bucket")))
    single.generate(texts, voices, params)
    shapes: dict[str, set] = {}
    for name, shape, _mode in replay_outputs.runs:
        shapes.setdefault(name, set()).add(shape)
    assert shapes == {"semantic decode": {(CAPACITY, single.engines["semantic"].max_len)},
                      "semantic prefill": {(1, longest["semantic"])},
                      "coarse decode": {(CAPACITY, single.engines["coarse"].max_len)},
                      "coarse prefill": {(1, longest["coarse"])},
                      "fine pass": {(CAPACITY,)}}
    # a lone request's steps computed the whole batch too (the step stats say so; prefill-only steps say none)
    assert buckets["fine"] == {float(CAPACITY)} and float(CAPACITY) in buckets["semantic"] & buckets["coarse"]


def test_a_seed_gives_the_same_tokens_alone_and_in_a_batch(single, eager):
    texts, voices, params = (list(x) for x in zip(*MIXED))
    together = single.generate(texts, voices, params)
    for i, (t, v, p) in enumerate(MIXED):
        alone = single.generate(t, v, p)[0]
        for ref, what in ((alone, "alone, one shape"), (eager.generate(t, v, p)[0], "alone, eager")):
            try:
                _assert_same_tokens(together[i], ref)
            except AssertionError as exc:
                raise AssertionError(f"request {i} in a batch of {len(MIXED)} vs {what}: {exc}") from None


def test_greedy_tokens_match_transformers(single, tiny_ckpt, preset_dir):
    """A whole-reach decode span and one-prompt prefills decode what transformers' Bark does (an .npz voice's
    history prompts, 90 semantic tokens and the coarse windows they take; every decode attends over far more
    masked positions than it fills)."""
    text, voice, n_sem = PARITY_CASES[1]
    ours = single.generate(text, _voice(preset_dir, voice), GenerationParams.greedy(max_semantic_tokens=n_sem,
                                                                                     min_eos_p=None))[0]
    assert len(ours.semantic) == n_sem
    _assert_same(ours, HFBark(tiny_ckpt).generate(text, _voice(preset_dir, voice), max_semantic_tokens=n_sem))
    assert np.asarray(ours.audio).size > 0

"""Batch-invariant engines (stages/invariance.py): a row's logits the same to the bit whatever shares its step.

- ``RowLinear`` is nn.Linear (same state dict) and pads fewer rows than its floor with zero rows;
- ``row_floor`` finds the row count from which this CPU's GEMM computes a row one way, and says None
  for a GEMM whose rows keep changing with the batch;
- with ``batch_invariant`` a semantic/coarse prefill and decode, and a fine pass, give row 0 the same
  logits alone and beside other rows, at every batch size up to the engine's;
- a replica whose thread count changes per step (``torch_threads: shared``) probes at every count it may
  get, and a row's logits are then the same at any batch and any of those counts;
- seeded requests that took another token beside others than alone on a 2-core EPYC (before this
  option existed) take the same tokens with it, on the eager and fixed-shape paths.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bark_serve.stages.engine import EngineOptions
from bark_serve.stages.invariance import FLOOR_CAP, RowLinear, apply_row_floor, row_floor
from bark_serve.stages.modeling import SlotKVCache
from bark_serve.stages.pipeline import BarkPipeline
from bark_serve.stages.types import SamplingParams, SemanticRequest

SAMPLED = SamplingParams(temperature=0.8, top_k=200, top_p=0.95)


def _linear(n_in: int, n_out: int, bias: bool = True) -> RowLinear:
    torch.manual_seed(0)
    return RowLinear(n_in, n_out, bias=bias)


def test_row_linear_is_nn_linear_and_pads_to_its_floor():
    layer = _linear(32, 96)
    plain = torch.nn.Linear(32, 96)
    plain.load_state_dict(layer.state_dict())
    assert isinstance(layer, torch.nn.Linear) and layer.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(8, 32)
    with torch.inference_mode():
        assert torch.equal(layer(x), plain(x))  # min_rows 1: F.linear as is
        layer.min_rows = 8
        full = layer(x)
        assert torch.equal(full, F.linear(x, layer.weight, layer.bias))
        one = layer(x[:1])  # padded to 8 rows: the 8-row GEMM's first row
        assert one.shape == (1, 96) and torch.equal(one, F.linear(torch.cat([x[:1], x.new_zeros(7, 32)]),
                                                                   layer.weight, layer.bias)[:1])
        steps = layer(x[:3, None, :])  # a decode step's (n, 1, C): leading dimensions kept
        assert steps.shape == (3, 1, 96) and torch.equal(steps[:, 0], layer(x[:3]))
        assert layer(x[:0]).shape == (0, 96)


@pytest.mark.parametrize("shape,bias", [((32, 96), True), ((32, 2000), False), ((768, 3072), True)],
                         ids=["tiny-qkv", "tiny-head", "small-mlp"])
def test_row_floor_makes_every_batch_size_compute_a_row_alike(shape, bias):
    layer = _linear(*shape, bias=bias)
    floor = row_floor(layer.weight, layer.bias, max_rows=24)
    assert floor is not None and 1 <= floor <= FLOOR_CAP, "no batch-invariant GEMM row count on this CPU"
    layer.min_rows = floor
    x = torch.randn(24, shape[0])
    with torch.inference_mode():
        ref = layer(x)
        for n in range(1, 25):
            assert torch.equal(layer(x[:n]), ref[:n]), n


def test_row_floor_is_none_for_a_gemm_whose_rows_change_with_the_batch():
    layer = _linear(32, 96)

    def drifting(x, w, b):  # a row's result moves with the row count, as a kernel per tile size would
        return F.linear(x, w, b) + x.shape[0] * 1e-6

    assert row_floor(layer.weight, layer.bias, max_rows=16, fn=drifting) is None
    assert row_floor(layer.weight, layer.bias, max_rows=16) is not None


def test_row_floor_over_thread_counts_holds_at_each_of_them():
    layer = _linear(768, 3072)
    floor = row_floor(layer.weight, layer.bias, max_rows=24, threads=(1, 2))
    assert floor is not None, "no row count computes a row alike at 1 and 2 threads on this CPU"
    assert floor >= max(row_floor(layer.weight, layer.bias, max_rows=24, threads=(t,)) or 0 for t in (1, 2))
    layer.min_rows = floor
    x = torch.randn(24, 768)
    with torch.inference_mode():
        torch.set_num_threads(2)
        ref = layer(x)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for n in range(1, 25):
                assert torch.equal(layer(x[:n]), ref[:n]), (threads, n)

    def by_threads(x, w, b):  # a GEMM whose rows move with the thread count, whatever the batch
        return F.linear(x, w, b) + torch.get_num_threads() * 1e-6

    assert row_floor(layer.weight, layer.bias, max_rows=16, fn=by_threads, threads=(1,)) is not None
    assert row_floor(layer.weight, layer.bias, max_rows=16, fn=by_threads, threads=(1, 2)) is None


def test_apply_sets_every_layer_and_the_attention(eager_pair):
    plain, inv = eager_pair
    model = inv.engines["semantic"].model
    floor = inv.engines["semantic"].row_floor
    assert floor == apply_row_floor(model, inv.engines["semantic"].capacity)
    layers = [m for m in model.modules() if isinstance(m, RowLinear)]
    assert len(layers) == 4 * len(model.layers) + 1 and all(m.min_rows == floor for m in layers)
    assert all(block.attn.math_attention for block in model.layers)
    assert plain.engines["semantic"].row_floor is None
    assert all(m.min_rows == 1 for m in plain.engines["semantic"].model.modules() if isinstance(m, RowLinear))


@pytest.fixture(scope="module")
def eager_pair(tiny_ckpt, preset_dir):
    """The same checkpoint without and with batch_invariant."""
    return tuple(BarkPipeline.from_pretrained(str(tiny_ckpt), EngineOptions(capacity=8, batch_invariant=inv),
                                              preset_dirs=[preset_dir]) for inv in (False, True))


@torch.inference_mode()
def _prefill_and_decode(model, embeds: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal model's logits (n, V) for a prefill of ``embeds`` (n, t, C) into a fresh cache, then for one
    decode step of ``tokens`` (n,)."""
    n, t, hidden = embeds.shape
    cache = SlotKVCache(len(model.layers), n, model.n_heads, t + 1, hidden // model.n_heads, torch.float32, "cpu")
    lengths = torch.full((n,), t)
    first = model.prefill(embeds, lengths, cache, torch.arange(n))
    return first, model.decode(tokens, lengths, cache)


@pytest.mark.parametrize("stage", ["semantic", "coarse"])
def test_prefill_and_decode_logits_of_a_row_do_not_depend_on_the_batch(eager_pair, stage):
    model = eager_pair[1].engines[stage].model
    vocab, hidden = model.input_embeds_layer.weight.shape
    gen = torch.Generator().manual_seed(1)
    t = 40
    embeds = torch.randn((8, t, hidden), generator=gen)
    tokens = torch.randint(0, vocab, (8,), generator=gen)
    got = {n: _prefill_and_decode(model, embeds[:n], tokens[:n]) for n in (1, 2, 3, 5, 8)}
    for n in (1, 2, 3, 5):  # every row of a smaller batch as in the batch of 8 (a tail row rounds otherwise)
        assert torch.equal(got[n][0], got[8][0][:n]), f"prefill, batch {n}"
        assert torch.equal(got[n][1], got[8][1][:n]), f"decode, batch {n}"


def test_a_shared_threads_engine_gives_a_row_its_logits_at_any_batch_and_thread_count(tiny_ckpt, preset_dir):
    """torch_threads: shared lends a replica 1 to all of the host's cores per step (cluster/cores.py)."""
    pipe = BarkPipeline.from_pretrained(str(tiny_ckpt), EngineOptions(capacity=8, torch_threads=2, shared_threads=True,
                                                                      batch_invariant=True),
                                        preset_dirs=[preset_dir])
    model = pipe.engines["semantic"].model
    assert pipe.engines["semantic"].row_floor is not None
    gen = torch.Generator().manual_seed(3)
    embeds = torch.randn((8, 30, model.input_embeds_layer.weight.shape[1]), generator=gen)
    tokens = torch.randint(0, 100, (8,), generator=gen)
    got = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for n in (1, 3, 5, 6, 8):
            got[threads, n] = _prefill_and_decode(model, embeds[:n], tokens[:n])
    for (threads, n), (first, step) in got.items():  # every row, not only the first: a tail row rounds otherwise
        ref_first, ref_step = got[2, 8]
        assert torch.equal(first, ref_first[:n]) and torch.equal(step, ref_step[:n]), (threads, n)


def test_fine_logits_of_a_row_do_not_depend_on_the_batch(eager_pair):
    model = eager_pair[1].engines["fine"].model
    codes = torch.randint(0, 1024, (4, 256, 8), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        alone = model.forward_rows(codes[:1], [3])
        for n in (2, 4):
            assert torch.equal(model.forward_rows(codes[:n], [3, 5, 2, 7][:n])[:1], alone), n


# Groups of four seeds (base, base + 1, ...) in which one request took another token beside the others than
# alone, without batch_invariant (2-core AVX512 EPYC, docs/BENCHMARKS.md): s526 and s706 on the eager path,
# s439 and s600 on the fixed-shape one.
FORKED = {"off": [524, 704], "on": [436, 600]}
TEXTS = ["Hello there.", "A different, longer sentence here.", "♪ la la la ♪", "[laughs] ok"]


@pytest.mark.parametrize("cuda_graphs", ["off", "on"], ids=["eager", "fixed-shape"])
def test_seeds_that_forked_beside_others_take_their_lone_tokens(tiny_ckpt, preset_dir, cuda_graphs):
    pipe = BarkPipeline.from_pretrained(str(tiny_ckpt), EngineOptions(capacity=8, cuda_graphs=cuda_graphs,
                                                                      batch_invariant=True),
                                        preset_dirs=[preset_dir])
    eng = pipe.engines["semantic"]
    for base in FORKED[cuda_graphs]:
        reqs = [SemanticRequest(f"s{base + i}", pipe.text.encode(text), None, SAMPLED, None, 60, seed=base + i)
                for i, text in enumerate(TEXTS)]
        together = {r.request_id: r.output for r in eng.run(reqs)}
        for r in reqs:
            [alone] = eng.run([r])
            np.testing.assert_array_equal(together[r.request_id], alone.output, err_msg=r.request_id)

"""Every fixed-shape step can be captured as a CUDA graph: checked on CPU.

A capture fails on CUDA when a step copies host data to the device (``t[rows] = 0`` makes a CPU
tensor first), reads a value back (``.item()``, ``bool(t)``) or makes a data-dependent shape. The
first H200 run of the prefill graphs failed that way (``SlotTable.start`` filled rows from a Python
scalar) and fell back to eager prefills; ``StepGraphs.check_capturable`` runs each captured
(shape, mode) once under a guard that raises on those ops, so CI catches it without a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bark_serve.stages.engine import EngineOptions
from bark_serve.stages.graphs import HostTrafficError, StepGraphs
from bark_serve.stages.pipeline import load_engines
from bark_serve.stages.sampling import SampleMode
from bark_serve.stages.slot_table import SlotTable
from bark_serve.stages.types import CoarseRequest, SamplingParams, SemanticRequest
from bark_serve.stages.weights import Checkpoint


@pytest.fixture(scope="module")
def engines(tiny_ckpt):
    opts = EngineOptions(capacity=3, cuda_graphs="on", graph_buckets=(1, 2))
    return load_engines(Checkpoint.open(tiny_ckpt), opts, ("semantic", "coarse", "fine"))


@pytest.mark.parametrize("gemv", [False, True], ids=["sdpa-decode", "cuda-decode"])
def test_every_fixed_shape_step_is_capturable(engines, gemv):
    """Both decode attentions: SDPA (CPU's) and ``decode_attention`` with ``index_put_`` KV writes (CUDA's)."""
    for name in ("semantic", "coarse"):
        eng = engines[name]
        eng.model.gemv_decode = gemv
        try:
            assert eng.decode_graphs.check_capturable() == len(eng.decode_graphs.shapes) * len(SampleMode)
            assert eng.prefill_graphs.check_capturable() == len(eng.prefill_graphs.shapes) * len(SampleMode)
        finally:
            eng.model.gemv_decode = None
    assert engines["fine"].graphs.check_capturable() == len(engines["fine"].graphs.shapes) * len(SampleMode)


def test_capturable_steps_with_requests_held(engines):
    """The same with live rows (sampled, filtered, mid-window): the guard then sees the steps' real sampling
    parameters and positions. The checks run every step once and so advance the held rows past what the host
    recorded (a CUDA replica captures at start, holding nothing); the requests are cancelled after, and the
    engines serve the next ones as a fresh engine does."""
    sem, coarse = engines["semantic"], engines["coarse"]
    sampled = SamplingParams(temperature=0.7, top_k=5, top_p=0.9)
    make = {"semantic": lambda rid: SemanticRequest(rid, np.arange(5), sampling=sampled, max_new_tokens=4, seed=1),
            "coarse": lambda rid: CoarseRequest(rid, np.arange(30), sampling=sampled, seed=2)}
    before = {name: engines[name].run([make[name]("before")])[0].output for name in make}
    for name, eng in (("semantic", sem), ("coarse", coarse)):
        eng.admit(make[name]("held"))
        eng.step()  # the prefill; then every captured step once, as a replay would run it
        for graphs in (eng.decode_graphs, eng.prefill_graphs):
            assert graphs.check_capturable() == len(graphs.shapes) * len(SampleMode)
        assert eng.cancel("held") and eng.num_active == 0
        [after] = eng.run([make[name]("after")])
        assert after.ok, after.error
        np.testing.assert_array_equal(after.output, before[name])  # the checks left nothing behind


def test_the_guard_catches_host_data_in_a_step():
    table = SlotTable(4, 8, torch.device("cpu"))
    rows = table.rows[:2]

    def scalar_fill(shape, mode):  # what SlotTable.start did before the fix
        table.in_window[rows] = 0
        return table.token[: shape[0]]

    def host_read(shape, mode):
        return table.token[: int(table.position.max().item()) + 1]

    for fn in (scalar_fill, host_read):
        with pytest.raises(HostTrafficError):
            StepGraphs(fn, [(2,)], torch.device("cpu")).check_capturable()
    lengths = torch.tensor([3, 4])  # a static buffer, made before the step

    def start(shape, mode):  # the fixed start: index fills, no host data
        table.start(rows, lengths)
        return table.token[: shape[0]]

    assert StepGraphs(start, [(2,)], torch.device("cpu")).check_capturable() == len(SampleMode)
    assert table.position[:2].tolist() == [3, 4] and table.active[:2].all() and not table.in_window.any()

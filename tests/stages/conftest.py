"""Fixtures of the stage tests."""

from __future__ import annotations

import pytest
import torch


class ReplayedOutputs:
    """What ``replay_outputs`` patched in: the persistent output per (StepGraphs, shape, mode), and every run
    as (graphs' name, shape, mode), in order."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.runs: list[tuple] = []


@pytest.fixture
def replay_outputs(monkeypatch) -> ReplayedOutputs:
    """CUDA graph replay's output semantics on CPU: ``StepGraphs.run`` returns, for each (graphs, shape, mode),
    one persistent tensor that every later run of that key overwrites, as a replayed graph writes its one
    static output. Without this a CPU run returns a fresh tensor each time, so a step that keeps a replay's
    output past the next replay of the same graph (and reads another step's tokens on CUDA) passes here."""
    from bark_serve.stages.graphs import StepGraphs

    run = StepGraphs.run
    seen = ReplayedOutputs()

    def replay(self, shape, mode):
        out, replayed = run(self, shape, mode)
        key = (self, tuple(shape), mode)  # holds the StepGraphs: no id reused by another one
        seen.runs.append((self.name, tuple(shape), mode))
        with torch.inference_mode():  # as the engines' steps run (the buffer is written in place every time)
            if key not in seen.buffers:
                seen.buffers[key] = torch.empty_like(out)
            buffer = seen.buffers[key]
            assert buffer.shape == out.shape, f"{self.name} {shape}: a step's output changed shape"
            buffer.copy_(out)
        return buffer, replayed

    monkeypatch.setattr(StepGraphs, "run", replay)
    return seen

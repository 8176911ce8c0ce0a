"""Per-slot decoding state of a causal stage, kept on the device and updated there in place.

How this works: row ``i`` of every tensor belongs to KV-cache slot ``i``. A decode step reads the
rows' last tokens and positions, samples with the rows' own parameters and pre-drawn uniforms, and
writes the new tokens back and advances positions and step counters, all on the device (so a CUDA
graph can replay it). The host writes a row only when something happens to its request: admission,
a prefill, a pause before a coarse window's re-prefill, a move when slots are compacted.

An ``active`` row is decoding; an inactive row (waiting for a prefill, or free) stays at position
0 and token 0, so a step that covers it (the rows before the last decoding one, or a bucket's
padding) writes only position 0 of its own slot, which its prefill overwrites, and changes none
of its state.
"""

from __future__ import annotations

import torch

from .sampling import NO_TOP_K, RowSampling, SampleMode, is_greedy, predraw, sample_tokens
from .types import SamplingParams

NO_EOS_THRESHOLD = 2.0  # above any probability: EOS is only taken when it is the sampled token
# Which rows a step covers: an index tensor (a prefill's rows), or ``slice(0, n)`` (a decode step's rows
# 0..n-1: reads are views and updates run in place, where an index costs a gather and a scatter each;
# a CUDA decode step is bound by its kernel count)
Rows = torch.Tensor | slice


class SlotTable:
    """Device tensors (n_slots,) of per-slot state, and (n_slots, max_draws) of pre-drawn uniforms."""

    def __init__(self, n_slots: int, max_draws: int, device):
        def zeros(dtype):
            return torch.zeros((n_slots,), dtype=dtype, device=device)

        self.token, self.position, self.step = zeros(torch.long), zeros(torch.long), zeros(torch.long)
        self.in_window = zeros(torch.long)  # coarse: tokens generated in the current window
        self.active = zeros(torch.bool)
        self.temperature, self.top_p, self.min_eos = zeros(torch.float32), zeros(torch.float32), zeros(torch.float32)
        self.top_k, self.greedy = zeros(torch.long), zeros(torch.bool)
        self.draws = torch.zeros((n_slots, max(max_draws, 1)), dtype=torch.float64, device=device)
        self.rows = torch.arange(n_slots, device=device)  # a static index for whole-table steps
        self._all = [self.token, self.position, self.step, self.in_window, self.active, self.temperature,
                     self.top_p, self.min_eos, self.top_k, self.greedy, self.draws]
        self.clear(slice(None))

    @property
    def max_draws(self) -> int:
        return self.draws.shape[1]

    def admit(self, row: int, sampling: SamplingParams, generator: torch.Generator, n_draws: int,
              min_eos_p: float | None = None) -> None:
        """A new request in ``row``: its parameters, and its draws (none for a greedy request)."""
        self.clear(row)
        greedy = is_greedy(sampling)
        self.temperature[row] = float(sampling.temperature)
        self.top_k[row] = int(sampling.top_k or NO_TOP_K)
        self.top_p[row] = float(sampling.top_p if sampling.top_p is not None else 1.0)
        self.greedy[row] = greedy
        self.min_eos[row] = float(min_eos_p) if min_eos_p is not None else NO_EOS_THRESHOLD
        if not greedy:
            assert n_draws <= self.max_draws, "a request can take no more steps than the table has draws"
            self.draws[row, :n_draws] = predraw(generator, n_draws).to(self.draws.device)

    def start(self, rows: torch.Tensor, positions: torch.Tensor) -> None:
        """Rows whose prefill just ran: decoding from ``positions``, a new window (coarse)."""
        self.position[rows] = positions
        self.in_window.index_fill_(0, rows, 0)  # a fill, not ``[rows] = 0``: no host scalar crosses (graph-safe)
        self.active.index_fill_(0, rows, True)

    def pause(self, rows: torch.Tensor) -> None:
        """Rows waiting for a re-prefill: they stop decoding and sit at position 0."""
        self.active[rows] = False
        self.position[rows] = 0
        self.token[rows] = 0

    def move(self, src: int, dst: int) -> None:
        for t in self._all:
            t[dst] = t[src]

    def clear(self, rows) -> None:
        """Free rows: inactive, position 0, token 0, greedy."""
        for t in self._all:
            t[rows] = 0
        self.greedy[rows] = True
        self.min_eos[rows] = NO_EOS_THRESHOLD

    def sampling(self, rows: Rows) -> RowSampling:
        return RowSampling(self.temperature[rows], self.top_k[rows], self.top_p[rows], self.greedy[rows])

    def uniform(self, rows: Rows) -> torch.Tensor:
        """Each row's next draw (its step counter indexes its draws). -> (R,) float64"""
        steps = self.step[rows].clamp(max=self.max_draws - 1)
        if isinstance(rows, slice):
            return self.draws[rows].gather(1, steps[:, None])[:, 0]
        return self.draws[rows, steps]

    def sample(self, logits: torch.Tensor, rows: Rows, mode: SampleMode) -> torch.Tensor:
        """``sample_tokens`` with the rows' own parameters and draws (read only where ``mode`` samples). -> (R,)"""
        if mode == SampleMode.GREEDY:
            return torch.argmax(logits.float(), dim=-1)
        return sample_tokens(logits, self.sampling(rows), self.uniform(rows), mode)

    def commit(self, rows: Rows, tokens: torch.Tensor, decoded: bool) -> None:
        """After sampling ``tokens`` for ``rows``: active rows take them and advance one step (and one
        position when the token came from a decode; a prefill's rows were placed by ``start``)."""
        act = self.active[rows]
        if isinstance(rows, slice):  # views, updated in place: a kernel each
            token = self.token[rows]
            torch.where(act, tokens, token, out=token)
            updated = [self.step[rows], self.in_window[rows]] + ([self.position[rows]] if decoded else [])
            for t in updated:
                t.add_(act)  # True counts 1
            return
        inc = act.long()
        self.token[rows] = torch.where(act, tokens, self.token[rows])
        self.step[rows] += inc
        self.in_window[rows] += inc
        if decoded:
            self.position[rows] += inc

"""Per-request sampling that does not depend on what else is in the batch, and runs on the device.

Every request owns a CPU ``torch.Generator`` per stage. At admission the engine draws, from that
generator, every uniform number the request can consume (one per sampled token, in order) and
copies them to the device once; a step reads its row's next draw there and inverts the CDF of
that row. The draws of one request therefore depend only on its seed and its own steps, never on
the batch it shares, the bucket it is padded to, or whether the step runs eagerly or as a
captured CUDA graph; and no step does per-row work on the host.

Which branches a step takes (all greedy, sampling, sampling with top-k/top-p) is a host-side
``SampleMode`` chosen from the held requests, so a captured graph has no data-dependent control
flow. A row's result is the same in every mode that covers it: greedy rows take the argmax in any
mode, and the top-k/top-p filter leaves a row without those settings bit for bit unchanged.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .constants import STAGES
from .types import SamplingParams

# Below this, temperature sampling is argmax in all but name, and dividing float32 logits by it can
# overflow to inf (softmax then gives NaN and every draw lands on the last token: an empty answer).
GREEDY_BELOW = 1e-4
NO_TOP_K = 1 << 30  # a top_k that removes nothing


def is_greedy(params: SamplingParams) -> bool:
    """Temperature 0, or one so small that sampling would pick the argmax anyway."""
    return params.greedy or params.temperature < GREEDY_BELOW


class SampleMode(enum.IntEnum):
    """What a batch's sampling must compute: the greatest of its rows' needs (host-side, per step)."""

    GREEDY = 0  # every row takes the argmax
    SAMPLE = 1  # some rows sample from the tempered distribution
    FILTER = 2  # and some of those also apply top-k / top-p

    @classmethod
    def of(cls, params: SamplingParams) -> "SampleMode":
        if is_greedy(params):
            return cls.GREEDY
        if params.top_k or (params.top_p is not None and params.top_p < 1.0):
            return cls.FILTER
        return cls.SAMPLE


def stage_generator(seed: int, stage: str, segment: int = 0) -> torch.Generator:
    """A generator for one request, stage and long-form segment, from one user seed."""
    state = np.random.SeedSequence([int(seed), STAGES.index(stage), int(segment)]).generate_state(1, np.uint64)[0]
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(state))
    return gen


def predraw(generator: torch.Generator, n: int) -> torch.Tensor:
    """The first ``n`` uniform draws of ``generator``, in order (equal to n draws of one). -> (n,) float64"""
    return torch.rand((n,), generator=generator, dtype=torch.float64)


@dataclass
class RowSampling:
    """Sampling parameters of R rows as tensors on the device (R,)."""

    temperature: torch.Tensor  # float32; any value on greedy rows
    top_k: torch.Tensor  # int64; NO_TOP_K for none
    top_p: torch.Tensor  # float32; 1.0 for none
    greedy: torch.Tensor  # bool

    @classmethod
    def repeat(cls, params: SamplingParams, n: int, device) -> "RowSampling":
        """One request's parameters for ``n`` rows (the fine stage samples a window's frames at once)."""
        return cls(torch.full((n,), float(params.temperature), device=device),
                   torch.full((n,), int(params.top_k or NO_TOP_K), device=device),
                   torch.full((n,), float(params.top_p if params.top_p is not None else 1.0), device=device),
                   torch.full((n,), is_greedy(params), device=device))

    def head(self, n: int) -> "RowSampling":
        """The first ``n`` rows (views)."""
        return RowSampling(self.temperature[:n], self.top_k[:n], self.top_p[:n], self.greedy[:n])

    def assign(self, n: int, rows: Sequence["RowSampling"]) -> None:
        """Rows 0..n-1 take the first row of each of ``rows`` (in place: a captured graph reads them)."""
        for name in ("temperature", "top_k", "top_p", "greedy"):
            getattr(self, name)[:n].copy_(torch.stack([getattr(r, name)[0] for r in rows]))

    def expand(self, n: int) -> "RowSampling":
        """Each row repeated ``n`` times in a row: (R,) -> (R * n,)."""
        def rep(t: torch.Tensor) -> torch.Tensor:
            return t[:, None].expand(t.shape[0], n).reshape(-1)
        return RowSampling(rep(self.temperature), rep(self.top_k), rep(self.top_p), rep(self.greedy))


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (-inf) what top-k / top-p remove, row by row. logits (R, V) already tempered.

    A row with top_k NO_TOP_K and top_p 1.0 comes back bit for bit unchanged (its top-p test is
    skipped, not compared against a cumulative sum that rounding can push past 1.0)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # (R, V)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]  # (1, V)
    remove = ranks >= top_k[:, None]
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each token
    remove |= (before > top_p[:, None]) & (top_p < 1.0)[:, None]
    remove[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample_tokens(logits: torch.Tensor, params: RowSampling, uniform: torch.Tensor,
                  mode: SampleMode = SampleMode.FILTER) -> torch.Tensor:
    """Pick one token per row. logits (R, V); params and uniform (R,) float64 on the same device. -> (R,)

    Greedy rows take the argmax and ignore their draw, and so does a row whose distribution is not
    finite. No host synchronisation and no data-dependent branch: safe inside a CUDA graph.
    """
    logits = logits.float()
    choice = torch.argmax(logits, dim=-1)  # (R,)
    if mode == SampleMode.GREEDY:
        return choice
    temps = params.temperature.clamp_min(GREEDY_BELOW)  # greedy rows: any finite divisor
    tempered = logits / temps[:, None]  # (R, V)
    if mode == SampleMode.FILTER:
        tempered = _filter_top_k_top_p(tempered, params.top_k, params.top_p)
    cdf = torch.cumsum(torch.softmax(tempered, dim=-1, dtype=torch.float64), dim=-1)  # (R, V)
    target = uniform.to(cdf.dtype)[:, None] * cdf[:, -1:]  # (R, 1)
    picked = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
    finite = torch.isfinite(cdf[:, -1])  # (R,) a NaN row would pick the last token, whatever the logits
    return torch.where(finite & ~params.greedy, picked, choice)


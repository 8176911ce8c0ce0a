"""Per-request sampling that does not depend on what else is in the batch.

Every request owns a CPU ``torch.Generator`` per stage; a step draws one uniform
number per sampled token from it and inverts the CDF of that row. The draws of
one request therefore depend only on its seed and its own steps, never on the
batch it shares (unlike ``torch.multinomial`` on a batch, which consumes the
global or a shared stream).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .constants import STAGES
from .types import SamplingParams

# Below this, temperature sampling is argmax in all but name, and dividing float32 logits by it can
# overflow to inf (softmax then gives NaN and every draw lands on the last token: an empty answer).
GREEDY_BELOW = 1e-4


def is_greedy(params: SamplingParams) -> bool:
    """Temperature 0, or one so small that sampling would pick the argmax anyway."""
    return params.greedy or params.temperature < GREEDY_BELOW


def stage_generator(seed: int, stage: str, segment: int = 0) -> torch.Generator:
    """A generator for one request, stage and long-form segment, from one user seed."""
    state = np.random.SeedSequence([int(seed), STAGES.index(stage), int(segment)]).generate_state(1, np.uint64)[0]
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(state))
    return gen


def draw_uniform(generators: Sequence[torch.Generator], counts: Sequence[int], device: torch.device) -> torch.Tensor:
    """One uniform draw per sampled row, request by request. -> (sum(counts),) float64"""
    parts = [torch.rand((n,), generator=g, dtype=torch.float64) for g, n in zip(generators, counts)]
    return torch.cat(parts).to(device)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (-inf) what top-k / top-p remove, row by row. logits (R, V) already tempered."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (R, V)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]  # (1, V)
    remove = ranks >= top_k[:, None]
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each token
    remove |= before > top_p[:, None]
    remove[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams], uniform: torch.Tensor) -> torch.Tensor:
    """Pick one token per row. logits (R, V) float; params and uniform one per row.

    Greedy rows (temperature under ``GREEDY_BELOW``) take the argmax and ignore their draw, and so
    does a row whose distribution is not finite.
    """
    logits = logits.float()
    choice = torch.argmax(logits, dim=-1)  # (R,)
    sampled_rows = [i for i, p in enumerate(params) if not is_greedy(p)]
    if not sampled_rows:
        return choice
    idx = torch.tensor(sampled_rows, device=logits.device)
    rows = [params[i] for i in sampled_rows]
    temps = torch.tensor([p.temperature for p in rows], device=logits.device, dtype=torch.float32)
    sub = logits.index_select(0, idx) / temps[:, None]  # (S, V)
    if any(p.top_k or (p.top_p is not None and p.top_p < 1.0) for p in rows):
        vocab = logits.shape[-1]
        top_k = torch.tensor([min(p.top_k or vocab, vocab) for p in rows], device=logits.device)
        top_p = torch.tensor([p.top_p if p.top_p is not None else 1.0 for p in rows], device=logits.device)
        sub = _filter_top_k_top_p(sub, top_k, top_p.float())
    cdf = torch.cumsum(torch.softmax(sub, dim=-1, dtype=torch.float64), dim=-1)  # (S, V)
    target = uniform.index_select(0, idx).to(cdf.dtype)[:, None] * cdf[:, -1:]
    picked = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
    finite = torch.isfinite(cdf[:, -1])  # (S,) a NaN row would pick the last token, whatever the logits
    choice[idx] = torch.where(finite, picked, choice.index_select(0, idx))
    return choice

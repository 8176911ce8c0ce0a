"""Batch-invariant linear layers: a row's output bit for bit the same whatever rows share its GEMM.

Why: sampling draws per request (stages/sampling.py), so a seed's tokens depend only on its own
logits. But a GEMM library picks its kernel by the number of rows: with MKL on a 2-core EPYC a row of a
1-row GEMM (a GEMV), of a 2-3-row one and the tail rows of 5-7 and 9-11 rows each get other last bits
than in a larger GEMM, and CPU's flash SDPA splits a small batch's work otherwise than a large one's.
Mostly that changes nothing; now and then a draw lands in the sliver between two tokens' cumulative
probabilities and the request takes another path from there (4 of 1,600 seeded 60-token requests,
alone against four at a time: docs/BENCHMARKS.md, ``python -m bark_serve.bench.batch_invariance``).

``batch_invariant`` (an engine option, off by default) removes that: at engine start
:func:`apply_row_floor` probes each distinct linear shape of the model on its own device, dtype and
thread count for the smallest row count from which every larger one (up to the engine's batch and a
few prefill sizes) computes a row identically (12 there with two threads), every :class:`RowLinear`
then pads fewer rows to it with zeros, and attention goes through SDPA's math kernel. The cost is a
lone request's speed (a bark-small decode step at batch 1 took 1.6x to 2x as long there); a step
that already holds that many rows pays only the math attention (not measurable at 12 rows).
Where no such floor exists up to ``FLOOR_CAP`` rows (a GPU library whose kernels change with every
tile size), nothing is padded and the engine says so (``row_floor`` is None). On CUDA's fixed-shape path
none of this runs: the engines give every step of a kind one shape instead (``engine.single_shape_for``),
because there the decode attention's batched GEMMs follow the row bucket and span too.

The floor depends on the thread count too (on that EPYC: 4 rows with one thread, 12 with two, and a
row of 5-7 or 9-11 rows gets other bits at one thread than at two). A replica with ``torch_threads:
shared`` runs each step on the cores it is lent, one to all of them, so its probe runs at every such
count and the floor must give a row the same bits at all of them; where none does, nothing is padded.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

FLOOR_CAP = 16  # the most rows a lone row is padded to
PREFILL_ROWS = (128, 512, 2048)  # prefills run whole prompts: these larger row counts must agree too
EXHAUSTIVE_ROWS = 64  # every row count up to this is probed; beyond it, every eighth


class RowLinear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict names) that pads inputs of fewer than ``min_rows``
    rows (leading dimensions flattened) with zero rows, and drops their outputs."""

    min_rows: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if rows >= self.min_rows or rows == 0:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.shape[-1])
        padded = torch.cat([flat, flat.new_zeros((self.min_rows - rows, flat.shape[1]))])
        y = F.linear(padded, self.weight, self.bias)[:rows]
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _probe_sizes(max_rows: int, cap: int) -> list[int]:
    """Every row count up to the cap (a small engine is padded past its own batch) and up to EXHAUSTIVE_ROWS
    of the engine's batch, every eighth beyond, and the prefill sizes."""
    sizes = set(range(1, max(cap, min(max_rows, EXHAUSTIVE_ROWS)) + 1))
    sizes |= set(range(EXHAUSTIVE_ROWS, max_rows + 1, 8))
    return sorted(sizes | {max_rows, *PREFILL_ROWS})


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` (None: as it is) for the block, then restored."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def row_floor(weight: torch.Tensor, bias: torch.Tensor | None, max_rows: int, cap: int = FLOOR_CAP,
              fn=F.linear, threads: Sequence[int] = ()) -> int | None:
    """The smallest row count r <= cap such that a GEMM of any probed count m >= r rows computes each row as
    the largest probed GEMM does (and zero rows padding one real row to r change nothing); None if none.
    ``threads``: the torch thread counts the GEMM may run with (empty: only the current one); the floor must
    hold at each of them, against one reference. ``fn(x, weight, bias)`` is the GEMM (F.linear; a test
    passes one whose rows drift with the batch or the threads)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    sizes = _probe_sizes(max_rows, cap)
    x = torch.randn((sizes[-1], weight.shape[1]), generator=gen).to(weight.device, weight.dtype)
    counts: list[int | None] = list(threads) or [None]
    with _threads(counts[0]):
        ref = fn(x, weight, bias)
    floor = 0
    for count in counts:  # the floor at each thread count; the largest holds at all of them
        at_count = None
        with _threads(count):
            for m in reversed(sizes):
                if not torch.equal(fn(x[:m], weight, bias), ref[:m]):
                    break
                at_count = m
        if at_count is None:  # the largest GEMM itself changes with the thread count
            return None
        floor = max(floor, at_count)
    if floor > cap:
        return None
    padded = torch.cat([x[:1], x.new_zeros((floor - 1, x.shape[1]))])
    for count in counts:
        with _threads(count):
            if not torch.equal(fn(padded, weight, bias)[:1], ref[:1]):
                return None
    return floor


def model_floors(model: nn.Module, max_rows: int, threads: Sequence[int] = ()) -> dict[tuple, int | None]:
    """The floor (:func:`row_floor`, at each of ``threads``) of every distinct RowLinear shape of ``model``:
    (out, in), bias, dtype, device -> floor or None."""
    floors: dict[tuple, int | None] = {}
    for layer in model.modules():
        if isinstance(layer, RowLinear):
            key = (tuple(layer.weight.shape), layer.bias is not None, layer.weight.dtype, layer.weight.device)
            if key not in floors:
                floors[key] = row_floor(layer.weight, layer.bias, max_rows, threads=threads)
    return floors


def common_floor(floors: dict[tuple, int | None]) -> int | None:
    """The row count every shape agrees from (the largest floor), or None if some shape has none."""
    found = [f for f in floors.values() if f is not None]
    return max(found) if found and len(found) == len(floors) else None


def apply_row_floor(model: nn.Module, max_rows: int, threads: Sequence[int] = ()) -> int | None:
    """Probe every distinct RowLinear shape of ``model`` (at each of ``threads``, see :func:`row_floor`) and
    pad them all to the largest floor found.
    -> that floor, or None (then nothing is padded: no floor up to FLOOR_CAP on this device)."""
    floors = model_floors(model, max_rows, threads)
    floor = common_floor(floors)
    for layer in model.modules():
        if isinstance(layer, RowLinear):
            layer.min_rows = floor or 1
    for module in model.modules():  # attention through SDPA's math kernel, whose rows do not depend on the batch
        if hasattr(module, "math_attention"):
            module.math_attention = floor is not None  # type: ignore[assignment]  # SelfAttention (modeling.py)
    if floor is None:
        missing = [k[0] for k, f in floors.items() if f is None]
        where = next(iter(floors))[3] if floors else "this device"
        log.warning("batch_invariant: no row count up to %d gives these GEMMs (out, in) = %s the same rows on "
                    "%s%s; steps are not padded, and a seed's sampled tokens may depend on the batch",
                    FLOOR_CAP, missing, where, _at(threads))
    else:
        log.info("batch_invariant: GEMMs of fewer than %d rows are padded to %d%s", floor, floor, _at(threads))
    return floor


def _at(threads: Sequence[int]) -> str:
    return f" at {min(threads)} to {max(threads)} torch threads" if len(threads) > 1 else ""

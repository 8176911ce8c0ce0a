"""Continuous batching for Bark's two causal stages (semantic, coarse).

How this works:
- each held request owns one KV-cache slot; slots ``0..n-1`` are always the
  held requests (a leaving request's slot is filled by moving the last one in);
- a slot is either waiting for a prefill (a new request, or a coarse window
  boundary) or decoding;
- ``step`` runs one batched decode over the decoding slots and one batched,
  right-padded prefill over the waiting ones, then samples one token for every
  slot with that request's own generator. Both forwards produce exactly one
  new token per slot, so a request that joins mid-flight simply starts with a
  prefill row in the next step.
Subclasses say what a prefill contains, which tokens are allowed, and when a
request is done.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
import torch

from .engine import EngineOptions, StageEngine
from .flops import Shape, decode_flops, prefill_flops
from .modeling import CausalLM
from .sampling import draw_uniform
from .types import CoarseRequest, EngineResult, SemanticRequest

StateT = TypeVar("StateT")


@dataclass
class Slot(Generic[StateT]):
    """Per-request decoding state; each engine keeps its own bookkeeping in a typed ``state``."""

    request: SemanticRequest | CoarseRequest
    generator: torch.Generator
    state: StateT
    position: int = 0  # tokens in the cache; the next decode writes here
    reach: int = 0  # cache positions reserved: the most this request can use
    last_token: int = 0
    needs_prefill: bool = True
    started: float = field(default_factory=time.perf_counter)


class CausalEngine(StageEngine):
    """Shared slot, prefill and decode machinery of the semantic and coarse engines."""

    def __init__(self, options: EngineOptions, model: CausalLM, max_len: int):
        super().__init__(options)
        self.model = model
        self.max_len = min(max_len, model.block_size)
        # empty until requests come: reserve() sizes it to the held requests' reach (stages/modeling.py)
        self.cache = _new_cache(model, options.capacity, self.max_len, self.dtype, self.device)
        self.slots: list[Slot] = []
        self._ready: list[EngineResult] = []
        self.shape = Shape.of(model)
        self._work: dict[str, float] = {}

    # -- interface -------------------------------------------------------------------------------
    @property
    def num_active(self) -> int:
        return len(self.slots) + len(self._ready)

    def modules_for_accounting(self):
        return [self.model]

    def admit(self, request: SemanticRequest | CoarseRequest) -> None:
        assert self.free > 0, "admit() called on a full engine"
        slot = self._new_slot(request)
        if slot is None:
            return
        slot.reach = min(self.max_len, self._reach(slot))
        self.cache.reserve(len(self.slots) + 1, max(s.reach for s in [*self.slots, slot]))
        self.slots.append(slot)

    def cancel(self, request_id: str) -> bool:
        for i, slot in enumerate(self.slots):
            if slot.request.request_id == request_id:
                self._release(i)
                return True
        return False

    @torch.inference_mode()
    def step(self) -> list[EngineResult]:
        results, self._ready = self._ready, []
        if not self.slots:
            return results
        t0 = time.perf_counter()
        rows, logits = self._forward()
        tokens = self._select([self.slots[i] for i in rows], logits).tolist()
        finished = []
        for i, tok in zip(rows, tokens):
            slot = self.slots[i]
            slot.last_token = tok
            if self._advance(slot, tok):
                finished.append(i)
        for i in sorted(finished, reverse=True):
            results.append(EngineResult(self.slots[i].request.request_id, output=self._output(self.slots[i]),
                                       timings={"latency_s": time.perf_counter() - self.slots[i].started}))
            self._release(i)
        self._record({"batch": float(len(rows)), "tokens": float(len(rows)), "step_s": time.perf_counter() - t0,
                          **self._work})
        return results

    # -- subclass hooks --------------------------------------------------------------------------
    @abc.abstractmethod
    def _new_slot(self, request: SemanticRequest | CoarseRequest) -> Slot | None:
        """Validate a request and build its slot (None if it finished on admission)."""

    @abc.abstractmethod
    def _prefill_embeds(self, slots: list[Slot]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded prompt embeddings (B, T, C) and lengths (B,) of slots awaiting a prefill."""

    @abc.abstractmethod
    def _select(self, slots: list[Slot], logits: torch.Tensor) -> torch.Tensor:
        """Next token (R,) for each slot from its logits (R, V)."""

    @abc.abstractmethod
    def _advance(self, slot: Slot, token: int) -> bool:
        """Record a sampled token; True when the request is done."""

    @abc.abstractmethod
    def _output(self, slot: Slot) -> np.ndarray:
        """The finished request's output array."""

    # -- machinery -------------------------------------------------------------------------------
    def _finish_now(self, request_id: str, output: np.ndarray) -> None:
        self._ready.append(EngineResult(request_id, output=output))

    def _forward(self) -> tuple[list[int], torch.Tensor]:
        decode_rows = [i for i, s in enumerate(self.slots) if not s.needs_prefill]
        prefill_rows = [i for i, s in enumerate(self.slots) if s.needs_prefill]
        parts_rows, parts_logits = [], []
        work = {"prefill_flops": 0.0, "prefill_s": 0.0, "decode_flops": 0.0, "decode_s": 0.0}
        if decode_rows:
            t0 = time.perf_counter()
            n = decode_rows[-1] + 1  # slots 0..n-1; prefill rows among them decode a throwaway token
            toks = torch.tensor([s.last_token if not s.needs_prefill else 0 for s in self.slots[:n]],
                                device=self.device)
            pos = torch.tensor([s.position if not s.needs_prefill else 0 for s in self.slots[:n]],
                               device=self.device)
            out = self.model.decode(toks, pos, self.cache)  # (n, V)
            parts_rows += decode_rows
            parts_logits.append(out[decode_rows])
            work["decode_flops"] = decode_flops(self.shape, [self.slots[i].position for i in decode_rows])
            for i in decode_rows:
                self.slots[i].position += 1
            work["decode_s"] = time.perf_counter() - t0
        if prefill_rows:
            t0 = time.perf_counter()
            all_lengths = []
            for chunk in self._prefill_chunks(prefill_rows):
                waiting = [self.slots[i] for i in chunk]
                embeds, lengths = self._prefill_embeds(waiting)
                slots = torch.tensor(chunk, device=self.device)
                parts_logits.append(self.model.prefill(embeds, lengths.to(self.device), self.cache, slots))
                parts_rows += chunk
                for slot, n in zip(waiting, lengths.tolist()):
                    slot.position, slot.needs_prefill = n, False
                all_lengths += lengths.tolist()
            work["prefill_flops"] = prefill_flops(self.shape, all_lengths)
            work["prefill_s"] = time.perf_counter() - t0
        self._work = work
        return parts_rows, torch.cat(parts_logits).float()

    def _prefill_chunks(self, rows: list[int]) -> list[list[int]]:
        """Split waiting slots into prefills of at most ``max_forward_tokens`` padded rows each."""
        budget = self.forward_token_budget(self.shape.hidden)
        length = {i: self._prompt_length(self.slots[i]) for i in rows}
        chunks: list[list[int]] = []
        longest = 0
        for i in sorted(rows, key=length.get):  # equal lengths together
            n = length[i]
            if chunks and max(longest, n) * (len(chunks[-1]) + 1) <= budget:
                chunks[-1].append(i)
                longest = max(longest, n)
            else:
                chunks.append([i])
                longest = n
        return chunks

    def _prompt_length(self, slot: Slot) -> int:
        """Tokens the slot's next prefill holds (for chunking); subclasses with varying prompts override."""
        return self.max_len

    def _reach(self, slot: Slot) -> int:
        """The most cache positions this request can ever use (its KV reservation); subclasses bound it."""
        return self.max_len

    def kv_bytes_per_slot(self, reach: int | None = None) -> int:
        """KV memory of one slot reserved for ``reach`` positions (default: the stage's maximum)."""
        return self.cache.bytes_per_token() * (reach or self.max_len)

    def kv_stats(self) -> dict:
        """KV memory now and at its peak, and slots per GB: at the peak's mix vs a cache sized to the maximum."""
        c = self.cache
        per_slot_at_peak = c.peak_bytes / c.peak_slots if c.peak_slots else 0
        return {"bytes": c.nbytes(), "peak_bytes": c.peak_bytes, "peak_slots": c.peak_slots,
                "bytes_per_slot_at_max_len": self.kv_bytes_per_slot(),
                "slots_per_gb_at_max_len": round(1e9 / self.kv_bytes_per_slot(), 2),
                "slots_per_gb_at_peak": round(1e9 / per_slot_at_peak, 2) if per_slot_at_peak else None}

    def _release(self, i: int) -> None:
        last = len(self.slots) - 1
        if i != last:
            self.cache.move(last, i)
            self.slots[i] = self.slots[last]
        self.slots.pop()
        if not self.slots:
            self.cache.shrink()  # an idle replica holds no KV memory

    def _uniform(self, slots: list[Slot]) -> torch.Tensor:
        return draw_uniform([s.generator for s in slots], [1] * len(slots), self.device)


def _new_cache(model: CausalLM, n_slots: int, max_len: int, dtype, device):
    from .modeling import SlotKVCache

    hidden = model.lm_head.weight.shape[1]
    return SlotKVCache(len(model.layers), 0, model.n_heads, max_len, hidden // model.n_heads, dtype, device,
                       max_slots=n_slots)


def pad_right(rows: list[torch.Tensor], value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (T_i, C) tensors right-padded to the longest. -> (B, T, C), lengths (B,)"""
    lengths = torch.tensor([r.shape[0] for r in rows])
    out = rows[0].new_full((len(rows), int(lengths.max()), rows[0].shape[-1]), value)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out, lengths

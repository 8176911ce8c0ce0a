"""Continuous batching for Bark's two causal stages (semantic, coarse).

How this works:
- each held request owns one KV-cache slot and one row of the ``SlotTable`` (its last token,
  position, step counter, sampling parameters and pre-drawn uniforms, on the device); slots
  ``0..n-1`` are always the held requests (a leaving request's slot is filled by moving the last one);
- a slot is either waiting for a prefill (a new request, or a coarse window boundary) or decoding;
- ``step`` runs one decode over slots ``0..n-1`` and one batched, right-padded prefill over the
  waiting ones; both sample one token per slot on the device, with that request's own parameters
  and draws, and the tokens cross to the host in one copy. A request that joins mid-flight simply
  starts with a prefill row in the next step.
- the decode is a fixed-shape step (a whole-length static cache, the rows padded to a bucket)
  replayed as a CUDA graph when ``cuda_graphs`` is on (stages/graphs.py), else an eager step over a
  cache sized to what the held requests reach. Prefills always run eagerly.
Subclasses say what a prefill contains, which tokens are allowed, and when a request is done.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from .engine import EngineOptions, PartTimer, StageEngine, single_shape_for
from .flops import Shape, decode_flops, prefill_flops
from .graphs import StepGraphs, buckets_for, fit, spans_for, use_graphs
from .modeling import CausalLM, SlotKVCache
from .sampling import SampleMode
from .slot_table import Rows, SlotTable
from .types import CoarseRequest, EngineResult, SemanticRequest

CausalRequestT = TypeVar("CausalRequestT", bound=SemanticRequest | CoarseRequest)
StateT = TypeVar("StateT")


@dataclass
class Slot(Generic[CausalRequestT, StateT]):
    """Per-request decoding state on the host; each engine keeps its own bookkeeping in a typed ``state``."""

    request: CausalRequestT
    generator: torch.Generator
    state: StateT
    position: int = 0  # tokens in the cache; the next decode writes here
    reach: int = 0  # cache positions reserved: the most this request can use
    needs_prefill: bool = True
    mode: SampleMode = SampleMode.GREEDY  # what sampling this request needs
    started: float = field(default_factory=time.perf_counter)


class CausalEngine(StageEngine[CausalRequestT]):
    """Shared slot, prefill and decode machinery of the semantic and coarse engines.

    Subclasses set ``self.spec`` before calling this constructor: capturing the decode graphs runs
    their ``_select``.
    """

    def __init__(self, options: EngineOptions, model: CausalLM, max_len: int, max_steps: int):
        super().__init__(options)
        self.model = model
        self.max_len = min(max_len, model.block_size)
        self.fixed_shape = use_graphs(options.cuda_graphs, self.device, options.cpu_offload)
        self.single_shape = single_shape_for(options, self.device, self.fixed_shape)
        if not self.single_shape:  # one shape per step kind needs no padding floor
            self.row_floor = self._batch_invariant(model, max(buckets_for(options.capacity, options.graph_buckets)))
        # eager: empty until requests come, reserve() sizes it to the held requests' reach; fixed shape:
        # every slot at max_len from the start (a graph holds its address), and one more slot than the
        # capacity, never admitted or decoded: a padded prefill's padding rows write there (``_prefill_padded``)
        self.scratch = options.capacity if self.fixed_shape else None
        n_slots = options.capacity + (1 if self.fixed_shape else 0)
        self.cache = _new_cache(model, n_slots, self.max_len, self.dtype, self.device, self.fixed_shape)
        self.table = SlotTable(n_slots, max_steps, self.device)
        self.slots: list[Slot[CausalRequestT, Any]] = []
        self._ready: list[EngineResult] = []
        self.shape = Shape.of(model)
        self._work: dict[str, float] = {}
        self._timer = PartTimer(self.device)  # decode_s and prefill_s (CUDA events on a GPU)
        self.decode_graphs: StepGraphs | None = None
        self.prefill_graphs: StepGraphs | None = None
        if self.fixed_shape:
            self._fixed_shapes(options)

    def _fixed_shapes(self, options: EngineOptions) -> None:
        """Static prompt buffers, the shapes a step is padded to, and (on CUDA) their captured graphs:
        decode rows x span, prefill rows x prompt length, every sample mode, in one memory pool. With
        ``single_shape`` one of each: every decode at ``capacity`` rows over the whole reach, every prefill one
        prompt at the longest length (``batch_invariant`` on CUDA: a row then meets the same kernels whatever
        else is held; a lone request pays a full-batch decode, which on a GPU costs about what one row does)."""
        shortest, longest, width = self._prompt_bounds()
        cap = options.capacity
        self.row_buckets: tuple[int, ...]
        self.prefill_buckets: tuple[int, ...]
        self.spans: tuple[int, ...]
        self.prompt_lengths: tuple[int, ...]
        if self.single_shape:
            self.row_buckets, self.prefill_buckets = (cap,), (1,)
            self.spans, self.prompt_lengths = (self.max_len,), (longest,)
        else:
            self.row_buckets = self.prefill_buckets = buckets_for(cap, options.graph_buckets)
            self.spans = spans_for(shortest + 1, self.max_len)
            self.prompt_lengths = spans_for(shortest, longest)
        self._pf_ids = torch.zeros((cap, width), dtype=torch.long, device=self.device)
        self._pf_rows = torch.zeros((cap,), dtype=torch.long, device=self.device)
        self._pf_len = torch.full((cap,), longest, dtype=torch.long, device=self.device)
        self.decode_graphs = StepGraphs.grid(self._decode_fixed, [self.row_buckets, self.spans], self.device,
                                             f"{self.name} decode")
        self.prefill_graphs = StepGraphs.grid(self._prefill_fixed, [self.prefill_buckets, self.prompt_lengths],
                                              self.device, f"{self.name} prefill")
        if self.device.type == "cuda":  # one pool, so one capture stream (StepGraphs.capture)
            pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(self.device)
            with torch.inference_mode():
                self.decode_graphs.capture(pool=pool, stream=stream)
                self.prefill_graphs.capture(pool=pool, stream=stream)

    # -- interface -------------------------------------------------------------------------------
    @property
    def num_active(self) -> int:
        return len(self.slots) + len(self._ready)

    def modules_for_accounting(self):
        return [self.model]

    def admit(self, request: CausalRequestT) -> None:
        assert self.free > 0, "admit() called on a full engine"
        slot = self._new_slot(request)
        if slot is None:
            return
        slot.reach = min(self.max_len, self._reach(slot))
        slot.mode = SampleMode.of(request.sampling)
        self.cache.reserve(len(self.slots) + 1, max(s.reach for s in [*self.slots, slot]))
        self.table.admit(len(self.slots), request.sampling, slot.generator, self._max_steps(slot),
                         getattr(request, "min_eos_p", None))
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
        rows, tokens = self._forward()
        finished, paused = [], []
        for i, tok in zip(rows, tokens):
            slot = self.slots[i]
            if self._advance(slot, tok):
                finished.append(i)
            elif slot.needs_prefill:
                paused.append(i)
        if paused:  # a coarse window ended: decode no further until its re-prefill
            self.table.pause(torch.tensor(paused, device=self.device))
        for i in sorted(finished, reverse=True):
            results.append(EngineResult(self.slots[i].request.request_id, output=self._output(self.slots[i]),
                                       timings={"latency_s": time.perf_counter() - self.slots[i].started}))
            self._release(i)
        step_s = time.perf_counter() - t0
        decode_only = float(self._work.get("prefill_s", 0.0) == 0.0)
        self._record({"batch": float(len(rows)), "tokens": float(len(rows)), "step_s": step_s,
                      "decode_only_steps": decode_only, "decode_only_s": step_s * decode_only, **self._work})
        return results

    def graph_stats(self) -> dict | None:
        """Captured graphs, capture seconds and graph memory (None when the decode runs eagerly)."""
        if self.decode_graphs is None or self.prefill_graphs is None:
            return None
        d, p = self.decode_graphs.stats(), self.prefill_graphs.stats()
        out = {"cuda_graphs": d["cuda_graphs"] + p["cuda_graphs"], "decode": d, "prefill": p,
               "row_buckets": list(self.row_buckets), "prefill_buckets": list(self.prefill_buckets),
               "spans": list(self.spans), "single_shape": self.single_shape,
               "prompt_lengths": list(self.prompt_lengths), "capture_s": round(d["capture_s"] + p["capture_s"], 4),
               "graph_bytes": d["graph_bytes"] + p["graph_bytes"]}
        return out

    # -- subclass hooks --------------------------------------------------------------------------
    @abc.abstractmethod
    def _new_slot(self, request: CausalRequestT) -> Slot[CausalRequestT, Any] | None:
        """Validate a request and build its slot (None if it finished on admission)."""

    @abc.abstractmethod
    def _prompt(self, slot: Slot) -> tuple[np.ndarray, int]:
        """The ids of the slot's next prefill (1-D, at most the prompt width) and the prompt's length in
        positions; starts the slot's window where the stage has windows."""

    @abc.abstractmethod
    def _embed(self, ids: torch.Tensor, length: int) -> torch.Tensor:
        """Prompt embeddings (B, length, C) of right-padded prompt ids (B, W)."""

    @abc.abstractmethod
    def _prompt_bounds(self) -> tuple[int, int, int]:
        """Shortest and longest prompt (positions) and the widest prompt's ids."""

    @abc.abstractmethod
    def _select(self, logits: torch.Tensor, rows: Rows, mode: SampleMode) -> torch.Tensor:
        """Next token (R,) of table rows ``rows`` (R indices, or a decode's ``slice(0, n)``) from their
        logits (R, V), on the device with no host synchronisation (it runs inside the decode graph)."""

    @abc.abstractmethod
    def _max_steps(self, slot: Slot) -> int:
        """The most tokens this request can sample (its pre-drawn uniforms)."""

    @abc.abstractmethod
    def _advance(self, slot: Slot, token: int) -> bool:
        """Record a sampled token; True when the request is done."""

    @abc.abstractmethod
    def _output(self, slot: Slot) -> np.ndarray:
        """The finished request's output array."""

    # -- machinery -------------------------------------------------------------------------------
    def _finish_now(self, request_id: str, output: np.ndarray) -> None:
        self._ready.append(EngineResult(request_id, output=output))

    def _forward(self) -> tuple[list[int], list[int]]:
        """Decode the decoding slots, prefill the waiting ones. -> (slot rows, their new tokens)"""
        slots = self.slots  # the host's per-row work here runs while the GPU waits: kept to one pass or two
        decode_rows = [i for i, s in enumerate(slots) if not s.needs_prefill]
        prefill_rows = [i for i, s in enumerate(slots) if s.needs_prefill]
        mode = max(s.mode for s in slots)
        parts, order = [], []
        work = {"prefill_flops": 0.0, "prefill_s": 0.0, "decode_flops": 0.0, "decode_s": 0.0, "graph_steps": 0.0}
        n = decode_rows[-1] + 1 if decode_rows else 0  # slots 0..n-1; waiting rows among them are inactive
        timer = self._timer
        timer.reset()
        if decode_rows:
            timer.start("decode_s")
            positions = [slots[i].position for i in decode_rows]
            out, replayed, rows = self._decode(n, max(positions) + 1, mode)  # the span: no device sync
            parts.append(out[:n])
            work["decode_flops"] = decode_flops(self.shape, positions)
            work["graph_steps"], work["bucket"] = float(replayed), float(rows)
            for i in decode_rows:
                slots[i].position += 1
            timer.stop("decode_s")
        if prefill_rows:
            timer.start("prefill_s")
            all_lengths: list[int] = []
            for chunk in self._prefill_chunks(prefill_rows):
                parts.append(self._prefill(chunk, mode, all_lengths))
                order += chunk
            work["prefill_flops"] = prefill_flops(self.shape, all_lengths)
            timer.stop("prefill_s")
        tokens = (parts[0] if len(parts) == 1 else torch.cat(parts)).tolist()  # the step's one device-to-host copy
        work.update(timer.seconds())  # after that copy: on CUDA the parts' events have completed
        self._work = work
        return decode_rows + order, [tokens[i] for i in decode_rows] + tokens[n:]

    def _decode(self, n: int, span: int, mode: SampleMode) -> tuple[torch.Tensor, bool, int]:
        """Decode rows 0..n-1 seeing ``span`` positions; fixed shape: padded to a captured (rows, span).
        -> (tokens of >= n rows, replayed?, rows computed)"""
        if self.decode_graphs is None:
            return self._decode_rows(n, mode, span), False, n
        shape = (fit(self.row_buckets, n) or n, fit(self.spans, span) or span)
        out, replayed = self.decode_graphs.run(shape, mode)
        return out, replayed, shape[0]

    def _decode_fixed(self, shape: tuple[int, ...], mode: SampleMode) -> torch.Tensor:
        rows, span = shape
        return self._decode_rows(rows, mode, span)

    def _decode_rows(self, n: int, mode: SampleMode, span: int) -> torch.Tensor:
        """Decode table rows 0..n-1, sample, and advance the active ones, all on the device. -> (n,)"""
        t = self.table
        rows = slice(0, n)  # views of the table's rows, updated in place
        logits = self.model.decode(t.token[:n], t.position[:n], self.cache, span)  # (n, V)
        tokens = self._select(logits.float(), rows, mode)  # (n,)
        t.commit(rows, tokens, decoded=True)
        return tokens

    def _prefill(self, chunk: list[int], mode: SampleMode, all_lengths: list[int]) -> torch.Tensor:
        """Prefill slots ``chunk`` and sample each one's first token of the (new) window. -> (len(chunk),)"""
        waiting = [self.slots[i] for i in chunk]
        prompts = [self._prompt(s) for s in waiting]
        lengths = [length for _, length in prompts]
        width = max(len(ids) for ids, _ in prompts)
        ids = np.zeros((len(chunk), width), dtype=np.int64)  # right-padded with 0 (masked)
        for i, (row, _) in enumerate(prompts):
            ids[i, : len(row)] = row
        if self.prefill_graphs is not None:
            tokens = self._prefill_padded(chunk, ids, lengths, mode)
        else:
            rows = torch.tensor(chunk, device=self.device)
            lengths_dev = torch.tensor(lengths, device=self.device)
            embeds = self._embed(torch.from_numpy(ids).to(self.device), max(lengths))  # (R, T, C)
            logits = self.model.prefill(embeds, lengths_dev, self.cache, rows)  # (R, V)
            self.table.start(rows, lengths_dev)
            tokens = self._select(logits.float(), rows, mode)
            self.table.commit(rows, tokens, decoded=False)
        for slot, length in zip(waiting, lengths):
            slot.position, slot.needs_prefill = length, False
        all_lengths += lengths
        return tokens

    def _prefill_padded(self, chunk: list[int], ids: np.ndarray, lengths: list[int], mode: SampleMode):
        """The fixed-shape prefill: the chunk's prompts in the static buffers, padded to a captured
        (rows, length). Padding rows repeat row 0's prompt into the scratch slot (one past the capacity, never
        decoded): had they written row 0's own slot, its cache and table rows would each get two writes of one
        index, and on CUDA which one lands is undefined (and the GEMMs need not give identical rows identical
        bits), so the token decoding went on from could differ from the one the host recorded.
        -> the chunk's tokens, in a tensor of their own"""
        r = len(chunk)
        shape = (fit(self.prefill_buckets, r) or r, fit(self.prompt_lengths, max(lengths)) or max(lengths))
        assert self.prefill_graphs is not None, "the fixed-shape path has prefill graphs"
        pad = [0] * (shape[0] - r)
        self._pf_ids[: shape[0]].zero_()
        self._pf_ids[: shape[0], : ids.shape[1]].copy_(torch.from_numpy(ids[list(range(r)) + pad]))
        self._pf_rows[: shape[0]].copy_(torch.tensor([*chunk, *(self.scratch for _ in pad)]))
        self._pf_len[: shape[0]].copy_(torch.tensor([*lengths, *(lengths[0] for _ in pad)]))
        out, _ = self.prefill_graphs.run(shape, mode)
        # A copy: a replay writes the graph's one static output, so the next chunk of this step with the same
        # shape would overwrite these tokens before the step reads them (one tiny kernel).
        return out[:r].clone()

    def _prefill_fixed(self, shape: tuple[int, ...], mode: SampleMode) -> torch.Tensor:
        """The fixed-shape prefill a graph captures: rows 0..r-1 of the static prompt buffers, every
        prompt padded to ``length`` and masked (no host sync). -> (r,)"""
        r, length = shape
        rows = self._pf_rows[:r]
        lengths = self._pf_len[:r].clamp(max=length)  # the buffer's stale lengths at warm-up may be longer
        embeds = self._embed(self._pf_ids[:r], length)  # (r, length, C)
        logits = self.model.prefill(embeds, lengths, self.cache, rows)  # (r, V)
        self.table.start(rows, lengths)
        tokens = self._select(logits.float(), rows, mode)
        self.table.commit(rows, tokens, decoded=False)
        return tokens

    def _prefill_chunks(self, rows: list[int]) -> list[list[int]]:
        """Split waiting slots into prefills of at most ``max_forward_tokens`` padded rows each (one prompt each
        with ``single_shape``)."""
        if self.single_shape:
            return [[i] for i in rows]
        budget = self.forward_token_budget(self.shape.hidden)
        length = {i: self._prompt_length(self.slots[i]) for i in rows}
        chunks: list[list[int]] = []
        longest = 0
        for i in sorted(rows, key=length.__getitem__):  # equal lengths together
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
        return {"bytes": c.nbytes(), "peak_bytes": c.peak_bytes, "peak_slots": c.peak_slots, "static": c.static,
                "bytes_per_slot_at_max_len": self.kv_bytes_per_slot(),
                "slots_per_gb_at_max_len": round(1e9 / self.kv_bytes_per_slot(), 2),
                "slots_per_gb_at_peak": round(1e9 / per_slot_at_peak, 2) if per_slot_at_peak else None}

    def _release(self, i: int) -> None:
        last = len(self.slots) - 1
        if i != last:
            self.cache.move(last, i)
            self.table.move(last, i)
            self.slots[i] = self.slots[last]
        self.table.clear(last)
        self.slots.pop()
        if not self.slots:
            self.cache.shrink()  # an idle replica holds no KV memory (a fixed-shape cache keeps it)


def _new_cache(model: CausalLM, n_slots: int, max_len: int, dtype, device, static: bool) -> SlotKVCache:
    hidden = model.lm_head.weight.shape[1]
    return SlotKVCache(len(model.layers), 0, model.n_heads, max_len, hidden // model.n_heads, dtype, device,
                       max_slots=n_slots, static=static)


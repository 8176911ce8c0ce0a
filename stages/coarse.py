"""Coarse stage: semantic tokens (+ voice histories) -> EnCodec codebooks 0 and 1.

How this works: Bark generates the coarse tokens in sliding windows of 60.
Each window is a fresh prompt (re-prefill): up to 256 semantic tokens around
the current position (padded), the coarse-infer token, and the last 630
coarse tokens (voice history + generated so far). Inside a window tokens
alternate between codebook 0 and codebook 1, each restricted to its own 1024
ids. Window re-prefills of different requests are batched together; a request
at a window boundary simply waits for a prefill row in the next step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import tokens as T
from .causal import CausalEngine, Slot
from .constants import BarkSpec
from .engine import EngineOptions, check_int_array, load_for
from .modeling import CausalLM, ModelConfig
from .sampling import SampleMode, stage_generator
from .slot_table import Rows
from .types import CoarseRequest
from .weights import Checkpoint


@dataclass
class CoarseState:
    semantic_all: np.ndarray  # (H_s + T_s,) semantic history then this request's semantic tokens
    coarse_all: list[int]  # flattened coarse history then the tokens generated so far
    base: int  # semantic history length (where this request's own tokens start)
    n_history: int  # coarse history length
    target: int  # coarse tokens (flattened) to generate
    window_left: int = 0  # tokens left in the current sliding window
    in_window: int = 0  # tokens generated in the current window (which codebook comes next)


CoarseSlot = Slot[CoarseRequest, CoarseState]


class CoarseEngine(CausalEngine[CoarseRequest]):
    name = "coarse"

    def __init__(self, options: EngineOptions, model: CausalLM, spec: BarkSpec):
        max_len = spec.max_coarse_input_length + 1 + spec.max_coarse_history + spec.sliding_window_len
        self.spec = spec
        super().__init__(options, model, max_len, T.coarse_output_length(spec.max_semantic_tokens, spec))

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, options: EngineOptions) -> "CoarseEngine":
        cfg = ModelConfig.from_hf(ckpt.submodel_config("coarse"))
        model = load_for(options, lambda: CausalLM(cfg), ckpt.state_dict("coarse"))
        return cls(options, model, ckpt.spec)

    def expected_steps(self, request: CoarseRequest) -> int:
        return T.coarse_output_length(len(request.semantic_tokens), self.spec)

    def _new_slot(self, req: CoarseRequest) -> CoarseSlot | None:
        spec = self.spec
        sem = check_int_array("semantic_tokens", req.semantic_tokens, 1, 0, spec.semantic_vocab_size, min_len=0,
                              max_len=spec.max_semantic_tokens)
        voice = req.voice
        if voice is not None:
            check_int_array("voice semantic_prompt", voice.semantic, 1, 0, spec.semantic_vocab_size)
            check_int_array("voice coarse_prompt", voice.coarse, 2, 0, spec.codebook_size, rows=spec.n_coarse_codebooks)
        sem_hist, coarse_hist = T.coarse_histories(voice.semantic if voice else None, voice.coarse if voice else None,
                                                   spec)
        target = T.coarse_output_length(len(sem), spec)
        if target == 0:
            self._finish_now(req.request_id, np.zeros((spec.n_coarse_codebooks, 0), dtype=np.int32))
            return None
        state = CoarseState(np.concatenate([sem_hist, sem.astype(np.int64)]), list(coarse_hist), base=len(sem_hist),
                            n_history=len(coarse_hist), target=target)
        return Slot(req, stage_generator(req.seed, self.name), state)

    def _prompt(self, slot: CoarseSlot) -> tuple[np.ndarray, int]:
        """The next window's prompt (semantic context, infer token, coarse history); starts the window."""
        st = slot.state
        generated = len(st.coarse_all) - st.n_history
        plan = T.coarse_window_plan(st.base, generated, st.target, self.spec)
        coarse_all = np.asarray(st.coarse_all, dtype=np.int64)
        ids = T.coarse_window_input(st.semantic_all, coarse_all, plan, self.spec)
        st.window_left, st.in_window = plan.n_new, 0
        return ids, len(ids)

    def _embed(self, ids: torch.Tensor, length: int) -> torch.Tensor:
        return self.model.input_embeds_layer(ids[:, :length])  # (B, L, C)

    def _prompt_bounds(self) -> tuple[int, int, int]:
        spec = self.spec
        longest = spec.max_coarse_input_length + 1 + spec.max_coarse_history
        return spec.max_coarse_input_length + 1, longest, longest

    def _prompt_length(self, slot: CoarseSlot) -> int:
        return T.coarse_window_length(len(slot.state.coarse_all), self.spec)

    def _reach(self, slot: CoarseSlot) -> int:
        """The last window's prompt (history + all but its new tokens, at most 630) plus its new tokens."""
        st = slot.state
        return T.coarse_window_length(st.n_history + st.target, self.spec) + self.spec.sliding_window_len

    def _select(self, logits: torch.Tensor, rows: Rows, mode: SampleMode) -> torch.Tensor:
        spec = self.spec
        codebook, lo = T.coarse_codebook(self.table.in_window[rows], spec)  # (R,) each: this step's per row
        first, size, n_books = spec.semantic_vocab_size, spec.codebook_size, spec.n_coarse_codebooks
        books = logits[:, first: first + n_books * size].view(-1, n_books, size)  # (R, 2, 1024)
        allowed = books.gather(1, codebook[:, None, None].expand(-1, 1, size))[:, 0]  # (R, 1024): that codebook
        return self.table.sample(allowed, rows, mode) + lo

    def _max_steps(self, slot: CoarseSlot) -> int:
        return slot.state.target

    def _advance(self, slot: CoarseSlot, token: int) -> bool:
        st = slot.state
        st.coarse_all.append(token)
        st.in_window += 1
        st.window_left -= 1
        if len(st.coarse_all) - st.n_history >= st.target:
            return True
        if st.window_left == 0:
            slot.needs_prefill = True
        return False

    def _output(self, slot: CoarseSlot) -> np.ndarray:
        st = slot.state
        generated = np.asarray(st.coarse_all[st.n_history:], dtype=np.int64)
        return T.unflatten_coarse(generated, self.spec).astype(np.int32)  # (2, T)

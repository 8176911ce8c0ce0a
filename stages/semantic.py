"""Semantic stage: text ids (+ voice semantic history) -> semantic tokens.

How this works: the prompt is Bark's "merged context": for each of 256
positions the embedding of the (offset, padded) text token plus the embedding
of the voice's semantic history token, then the semantic-infer token, 257
positions in all, the same length for every request. Decoding allows the
10,000 semantic tokens and EOS; it stops at EOS, when EOS is more likely than
``min_eos_p``, or after ``max_new_tokens`` (768 at most).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import tokens as T
from .causal import CausalEngine, Slot
from .constants import BarkSpec
from .engine import EngineOptions, check_int_array, load_for
from .modeling import CausalLM, ModelConfig
from .sampling import SampleMode, stage_generator
from .slot_table import Rows
from .types import InvalidRequestError, SemanticRequest
from .weights import Checkpoint


@dataclass
class SemanticState:
    prompt: np.ndarray  # (2, 256): text window and semantic history window
    tokens: list[int] = field(default_factory=list)  # generated so far


SemanticSlot = Slot[SemanticRequest, SemanticState]


class SemanticEngine(CausalEngine[SemanticRequest]):
    name = "semantic"

    def __init__(self, options: EngineOptions, model: CausalLM, spec: BarkSpec):
        self.spec = spec
        super().__init__(options, model, spec.max_input_semantic_length + 1 + spec.max_semantic_tokens,
                         spec.max_semantic_tokens)
        self.text_vocab = model.input_embeds_layer.num_embeddings - spec.text_encoding_offset
        assert spec.semantic_eos_token == spec.semantic_vocab_size, "EOS must follow the semantic vocabulary"

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, options: EngineOptions) -> "SemanticEngine":
        cfg = ModelConfig.from_hf(ckpt.submodel_config("semantic"))
        model = load_for(options, lambda: CausalLM(cfg), ckpt.state_dict("semantic"))
        return cls(options, model, ckpt.spec)

    def expected_steps(self, request: SemanticRequest) -> int:
        return int(request.max_new_tokens)  # at most: EOS may come sooner

    def _new_slot(self, req: SemanticRequest) -> SemanticSlot:
        spec = self.spec
        check_int_array("text_ids", req.text_ids, 1, 0, self.text_vocab, max_len=spec.max_input_semantic_length)
        if not (1 <= req.max_new_tokens <= spec.max_semantic_tokens):
            raise InvalidRequestError(f"max_new_tokens must be in [1, {spec.max_semantic_tokens}]")
        history = None
        if req.voice is not None:
            history = check_int_array("voice semantic_prompt", req.voice.semantic, 1, 0, spec.semantic_vocab_size)
        prompt = np.stack([T.text_window(req.text_ids, spec), T.semantic_history_window(history, spec)])
        return Slot(req, stage_generator(req.seed, self.name), SemanticState(prompt))

    def _prompt(self, slot: SemanticSlot) -> tuple[np.ndarray, int]:
        """Text window, then semantic history window, then the infer token (merged in ``_embed``)."""
        ids = np.concatenate([slot.state.prompt.reshape(-1), [self.spec.semantic_infer_token]])  # (513,)
        return ids.astype(np.int64), self._prompt_length(slot)

    def _embed(self, ids: torch.Tensor, length: int) -> torch.Tensor:
        """(B, 513) ids -> (B, 257, C): text and history embeddings summed position by position, then infer."""
        n = self.spec.max_input_semantic_length
        emb = self.model.input_embeds_layer
        merged = emb(ids[:, :n]) + emb(ids[:, n: 2 * n])  # (B, 256, C)
        return torch.cat([merged, emb(ids[:, 2 * n: 2 * n + 1])], dim=1)  # (B, 257, C)

    def _prompt_bounds(self) -> tuple[int, int, int]:
        length = self.spec.max_input_semantic_length + 1
        return length, length, 2 * self.spec.max_input_semantic_length + 1

    def _prompt_length(self, slot: SemanticSlot) -> int:
        return self.spec.max_input_semantic_length + 1  # every prompt: 256 merged positions + infer token

    def _reach(self, slot: SemanticSlot) -> int:
        return self._prompt_length(slot) + slot.request.max_new_tokens

    def _select(self, logits: torch.Tensor, rows: Rows, mode: SampleMode) -> torch.Tensor:
        eos = self.spec.semantic_eos_token
        allowed = logits[:, : eos + 1]  # (R, 10001): the semantic vocabulary and EOS
        picked = self.table.sample(allowed, rows, mode)
        p_eos = torch.softmax(allowed, dim=-1)[:, eos]  # (R,)
        return torch.where(p_eos > self.table.min_eos[rows], torch.full_like(picked, eos), picked)

    def _max_steps(self, slot: SemanticSlot) -> int:
        return slot.request.max_new_tokens

    def _advance(self, slot: SemanticSlot, token: int) -> bool:
        if token == self.spec.semantic_eos_token:
            return True
        slot.state.tokens.append(token)
        return len(slot.state.tokens) >= slot.request.max_new_tokens

    def _output(self, slot: SemanticSlot) -> np.ndarray:
        return np.asarray(slot.state.tokens, dtype=np.int32)  # (T_s,)

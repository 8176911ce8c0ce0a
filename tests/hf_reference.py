"""transformers' own Bark as the reference: per-stage outputs of BarkModel.generate for one request."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import BarkModel, BarkProcessor
from transformers.models.bark.generation_configuration_bark import (
    BarkCoarseGenerationConfig,
    BarkFineGenerationConfig,
    BarkSemanticGenerationConfig,
)


@dataclass
class Reference:
    semantic: np.ndarray  # (T_s,) without EOS/pad
    coarse: np.ndarray  # (2, T)
    fine: np.ndarray  # (8, T)
    audio: np.ndarray


class HFBark:
    """Greedy decoding through transformers, stage by stage, exactly as BarkModel.generate chains them."""

    def __init__(self, ckpt_dir):
        self.model = BarkModel.from_pretrained(str(ckpt_dir)).eval()
        self.processor = BarkProcessor.from_pretrained(str(ckpt_dir))
        gc = self.model.generation_config
        self.sem_cfg = BarkSemanticGenerationConfig(**gc.semantic_config)
        self.coarse_cfg = BarkCoarseGenerationConfig(**gc.coarse_acoustics_config)
        self.fine_cfg = BarkFineGenerationConfig(**gc.fine_acoustics_config)
        self.codebook_size = gc.codebook_size

    def _semantic(self, inputs, max_semantic_tokens: int, min_eos_p: float | None):
        return self.model.semantic.generate(
            inputs["input_ids"], history_prompt=inputs.get("history_prompt"), semantic_generation_config=self.sem_cfg,
            attention_mask=inputs["attention_mask"], max_new_tokens=max_semantic_tokens, min_eos_p=min_eos_p,
            do_sample=False)

    @torch.no_grad()
    def semantic_length(self, text: str, max_semantic_tokens: int, min_eos_p: float | None) -> int:
        """How many semantic tokens greedy decoding makes before it stops (semantic stage only)."""
        sem = self._semantic(self.processor(text), max_semantic_tokens, min_eos_p)[0].numpy()
        return int((sem != self.sem_cfg.semantic_pad_token).sum())

    @torch.no_grad()
    def generate(self, text: str, voice=None, max_semantic_tokens: int = 768, min_eos_p: float | None = None):
        inputs = self.processor(text, voice_preset=voice)
        history = inputs.get("history_prompt")
        m = self.model
        sem = self._semantic(inputs, max_semantic_tokens, min_eos_p)
        coarse = m.coarse_acoustics.generate(sem.clone(), history_prompt=history,
                                             semantic_generation_config=self.sem_cfg,
                                             coarse_generation_config=self.coarse_cfg,
                                             codebook_size=self.codebook_size, do_sample=False)
        fine = m.fine_acoustics.generate(coarse, history_prompt=history, semantic_generation_config=self.sem_cfg,
                                         coarse_generation_config=self.coarse_cfg,
                                         fine_generation_config=self.fine_cfg, codebook_size=self.codebook_size)
        audio = m.codec_decode(fine)
        sem_np = sem[0].numpy()
        sem_np = sem_np[sem_np != self.sem_cfg.semantic_pad_token]
        coarse_codes = np.remainder(coarse[0].numpy().reshape(-1, 2) - self.sem_cfg.semantic_vocab_size,
                                    self.codebook_size).T
        return Reference(sem_np, coarse_codes, fine[0].numpy(), audio[0].numpy())

    @torch.no_grad()
    def generate_end_to_end(self, text: str, voice=None, max_semantic_tokens: int = 768):
        """BarkModel.generate itself (greedy), to show the per-stage chaining above is the same thing."""
        inputs = self.processor(text, voice_preset=voice)
        return self.model.generate(**inputs, semantic_max_new_tokens=max_semantic_tokens, do_sample=False)[0].numpy()

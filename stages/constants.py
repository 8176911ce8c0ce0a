"""Bark's named constants, in one place.

The defaults are Bark's own (suno-ai/bark generation.py and the hub's
generation_config.json). A checkpoint may override them through its
generation_config.json; :class:`BarkSpec` is what the stages read, never the bare
numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

# Text (semantic stage input)
TEXT_ENCODING_OFFSET = 10_048
TEXT_PAD_TOKEN = 129_595
SEMANTIC_INFER_TOKEN = 129_599
MAX_TEXT_TOKENS = 256  # max_input_semantic_length: text window and semantic history window

# Semantic tokens
SEMANTIC_VOCAB_SIZE = 10_000
SEMANTIC_EOS_TOKEN = 10_000  # also the semantic pad token
SEMANTIC_RATE_HZ = 49.9
MAX_SEMANTIC_TOKENS = 768  # max_new_tokens of the semantic stage
SEED_LIMIT = 2**63  # seeds are in [0, SEED_LIMIT): they seed torch generators (int64)

# Coarse tokens
CODEBOOK_SIZE = 1024
N_COARSE_CODEBOOKS = 2
COARSE_RATE_HZ = 75
COARSE_SEMANTIC_PAD_TOKEN = 12_048
COARSE_INFER_TOKEN = 12_050
MAX_COARSE_INPUT_LENGTH = 256
MAX_COARSE_HISTORY = 630
SLIDING_WINDOW_LEN = 60

# Fine tokens
N_FINE_CODEBOOKS = 8
MAX_FINE_INPUT_LENGTH = 1024
MAX_FINE_HISTORY_LENGTH = 512
FINE_PAD_TOKEN = CODEBOOK_SIZE  # fine windows are padded with codebook_size

# Audio
SAMPLE_RATE = 24_000
SAMPLES_PER_FRAME = 320  # EnCodec 24 kHz hop: 24000 / 75

# Bark's own sampling defaults (generate_audio / generate_text_semantic)
DEFAULT_SEMANTIC_TEMPERATURE = 0.7
DEFAULT_COARSE_TEMPERATURE = 0.7
DEFAULT_FINE_TEMPERATURE = 0.5
DEFAULT_MIN_EOS_P = 0.2

STAGES = ("semantic", "coarse", "fine", "codec")


@dataclass(frozen=True)
class BarkSpec:
    """Token layout of one checkpoint (from its generation_config.json)."""

    text_encoding_offset: int = TEXT_ENCODING_OFFSET
    text_pad_token: int = TEXT_PAD_TOKEN
    semantic_infer_token: int = SEMANTIC_INFER_TOKEN
    max_input_semantic_length: int = MAX_TEXT_TOKENS
    semantic_vocab_size: int = SEMANTIC_VOCAB_SIZE
    semantic_pad_token: int = SEMANTIC_EOS_TOKEN
    semantic_rate_hz: float = SEMANTIC_RATE_HZ
    max_semantic_tokens: int = MAX_SEMANTIC_TOKENS
    codebook_size: int = CODEBOOK_SIZE
    n_coarse_codebooks: int = N_COARSE_CODEBOOKS
    coarse_rate_hz: float = COARSE_RATE_HZ
    coarse_semantic_pad_token: int = COARSE_SEMANTIC_PAD_TOKEN
    coarse_infer_token: int = COARSE_INFER_TOKEN
    max_coarse_input_length: int = MAX_COARSE_INPUT_LENGTH
    max_coarse_history: int = MAX_COARSE_HISTORY
    sliding_window_len: int = SLIDING_WINDOW_LEN
    n_fine_codebooks: int = N_FINE_CODEBOOKS
    max_fine_input_length: int = MAX_FINE_INPUT_LENGTH
    max_fine_history_length: int = MAX_FINE_HISTORY_LENGTH
    sample_rate: int = SAMPLE_RATE

    @property
    def semantic_eos_token(self) -> int:
        return self.semantic_pad_token

    @property
    def fine_pad_token(self) -> int:
        return self.codebook_size

    @property
    def semantic_to_coarse_ratio(self) -> float:
        """Coarse tokens (both codebooks, flattened) per semantic token: 75 / 49.9 * 2."""
        return self.coarse_rate_hz / self.semantic_rate_hz * self.n_coarse_codebooks

    @property
    def max_semantic_history(self) -> int:
        return int(self.max_coarse_history // self.semantic_to_coarse_ratio)

    @classmethod
    def from_generation_config(cls, data: dict) -> "BarkSpec":
        """Build from the hub's generation_config.json (sub-configs as dicts)."""
        sem = data.get("semantic_config", {}) or {}
        coarse = data.get("coarse_acoustics_config", {}) or {}
        fine = data.get("fine_acoustics_config", {}) or {}
        merged = {**fine, **coarse, **sem}
        merged["max_semantic_tokens"] = sem.get("max_new_tokens", MAX_SEMANTIC_TOKENS)
        merged["semantic_pad_token"] = sem.get("semantic_pad_token", sem.get("eos_token_id", SEMANTIC_EOS_TOKEN))
        for key in ("codebook_size", "sample_rate"):
            if key in data:
                merged[key] = data[key]
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in merged.items() if k in names and v is not None})

    @classmethod
    def from_dir(cls, directory: str | Path) -> "BarkSpec":
        path = Path(directory) / "generation_config.json"
        if not path.exists():
            return cls()
        return cls.from_generation_config(json.loads(path.read_text()))

    def to_generation_config(self) -> dict:
        """The hub's generation_config.json shape (what BarkModel.generate needs)."""
        return {
            "semantic_config": {
                "eos_token_id": self.semantic_pad_token,
                "semantic_pad_token": self.semantic_pad_token,
                "max_new_tokens": self.max_semantic_tokens,
                "text_encoding_offset": self.text_encoding_offset,
                "text_pad_token": self.text_pad_token,
                "semantic_infer_token": self.semantic_infer_token,
                "semantic_vocab_size": self.semantic_vocab_size,
                "max_input_semantic_length": self.max_input_semantic_length,
                "semantic_rate_hz": self.semantic_rate_hz,
                "renormalize_logits": True,
            },
            "coarse_acoustics_config": {
                "coarse_semantic_pad_token": self.coarse_semantic_pad_token,
                "coarse_rate_hz": self.coarse_rate_hz,
                "n_coarse_codebooks": self.n_coarse_codebooks,
                "coarse_infer_token": self.coarse_infer_token,
                "max_coarse_input_length": self.max_coarse_input_length,
                "max_coarse_history": self.max_coarse_history,
                "sliding_window_len": self.sliding_window_len,
                "renormalize_logits": True,
            },
            "fine_acoustics_config": {
                "temperature": 1.0,
                "max_fine_history_length": self.max_fine_history_length,
                "max_fine_input_length": self.max_fine_input_length,
                "n_fine_codebooks": self.n_fine_codebooks,
            },
            "sample_rate": self.sample_rate,
            "codebook_size": self.codebook_size,
        }

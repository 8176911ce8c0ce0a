"""Typed requests and results that travel between the stages.

Everything here is small: integer numpy arrays and a few scalars, cheap to
pickle between Ray actors. Validation of user input happens where requests are
built (text, voices, the serving layer); engines re-check shapes and ranges in
``admit`` because a stage server can be called directly through a handle.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import constants as C


class CheckpointError(RuntimeError):
    """The checkpoint is missing, incomplete or not a Bark checkpoint.

    A deployment's problem, not a request's: the server answers it with a 500 (and says so in its
    log), the CLI with a one-line message and exit code 2.
    """


class Priority(str, enum.Enum):
    """Where a request waits in every stage queue: interactive work before batch work."""

    INTERACTIVE = "interactive"
    BATCH = "batch"

    @property
    def rank(self) -> int:
        """Queue order: lower goes first."""
        return 0 if self is Priority.INTERACTIVE else 1


class RequestCrashedStage(RuntimeError):
    """A request whose stage replica died under it, and died again when it was retried alone: it is taken
    to be what kills the replica, and is not sent again (neither by the stage calls nor by batch retries)."""


MAX_REPR_CHARS = 100  # a user value quoted in an error message is cut here


def clip(text: str, limit: int = MAX_REPR_CHARS) -> str:
    """``text`` cut to ``limit`` characters (marked with an ellipsis)."""
    return text if len(text) <= limit else text[:limit] + "…"


def short_repr(value: Any, limit: int = MAX_REPR_CHARS) -> str:
    """``repr(value)`` cut to about ``limit`` characters: error messages never echo big user input."""
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit]
        return repr(value)[:-1] + f"…' ({len(value)}+ characters)"
    try:
        text = repr(value)
    except RecursionError:  # a deeply nested value cannot even be printed
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "…"


class CloningUnavailable(RuntimeError):
    """Voice cloning cannot run here: HuBERT, the quantizer or the codec's encoder is missing or unreadable
    (the server answers 503 with this message; everything else keeps working)."""


class InvalidRequestError(ValueError):
    """The request itself is wrong (bad text, voice, tensor or parameter).

    The serving layer answers it with HTTP 4xx; it never takes a replica down.
    """


def check_seed(seed: int | None) -> int | None:
    """The one seed rule: None (a random seed is drawn) or an integer in [0, 2**63)."""
    if seed is not None and not (0 <= seed < C.SEED_LIMIT):
        raise InvalidRequestError(f"seed must be in [0, 2**63), got {str(seed)[:40]}")
    return seed


@dataclass(frozen=True)
class SamplingParams:
    """Sampling of one stage. ``temperature == 0`` means greedy (argmax)."""

    temperature: float = 0.7
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0) or self.temperature > 100.0:
            raise InvalidRequestError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise InvalidRequestError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingParams(temperature=0.0)


@dataclass(frozen=True)
class GenerationParams:
    """Per-request knobs for the whole pipeline (Bark's defaults)."""

    semantic: SamplingParams = SamplingParams(C.DEFAULT_SEMANTIC_TEMPERATURE)
    coarse: SamplingParams = SamplingParams(C.DEFAULT_COARSE_TEMPERATURE)
    fine: SamplingParams = SamplingParams(C.DEFAULT_FINE_TEMPERATURE)
    min_eos_p: float | None = C.DEFAULT_MIN_EOS_P
    max_semantic_tokens: int = C.MAX_SEMANTIC_TOKENS
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.min_eos_p is not None and not (0.0 < self.min_eos_p <= 1.0):
            raise InvalidRequestError(f"min_eos_p must be in (0, 1], got {self.min_eos_p}")
        if not (1 <= self.max_semantic_tokens <= C.MAX_SEMANTIC_TOKENS):
            raise InvalidRequestError(
                f"max_semantic_tokens must be in [1, {C.MAX_SEMANTIC_TOKENS}], got {self.max_semantic_tokens}"
            )
        check_seed(self.seed)

    @classmethod
    def greedy(cls, **kwargs) -> "GenerationParams":
        return cls(semantic=GREEDY, coarse=GREEDY, fine=GREEDY, **kwargs)


@dataclass(frozen=True)
class VoicePrompt:
    """A Bark history prompt: semantic (T_s,), coarse (2, T_c), fine (8, T_f) tokens."""

    semantic: np.ndarray
    coarse: np.ndarray
    fine: np.ndarray
    name: str | None = None

    def as_npz_dict(self) -> dict[str, np.ndarray]:
        """Keys as in Bark's .npz presets (and transformers' history_prompt)."""
        return {
            "semantic_prompt": self.semantic.astype(np.int64),
            "coarse_prompt": self.coarse.astype(np.int64),
            "fine_prompt": self.fine.astype(np.int32),
        }


@dataclass(frozen=True)
class SemanticRequest:
    request_id: str
    text_ids: np.ndarray  # (T_text,) tokenizer ids, without offset, T_text <= 256
    voice: VoicePrompt | None = None
    sampling: SamplingParams = GREEDY
    min_eos_p: float | None = None
    max_new_tokens: int = C.MAX_SEMANTIC_TOKENS
    seed: int = 0
    segment: int = 0  # index of the segment in its request: every stage queue serves lower segments first


@dataclass(frozen=True)
class CoarseRequest:
    request_id: str
    semantic_tokens: np.ndarray  # (T_s,) in [0, semantic_vocab_size)
    voice: VoicePrompt | None = None
    sampling: SamplingParams = GREEDY
    seed: int = 0
    segment: int = 0  # index of the segment in its request: every stage queue serves lower segments first


@dataclass(frozen=True)
class FineRequest:
    request_id: str
    coarse_codes: np.ndarray  # (2, T) in [0, codebook_size)
    voice: VoicePrompt | None = None
    sampling: SamplingParams = GREEDY
    seed: int = 0
    segment: int = 0  # index of the segment in its request: every stage queue serves lower segments first


@dataclass(frozen=True)
class CodecRequest:
    request_id: str
    fine_codes: np.ndarray  # (8, T) in [0, codebook_size)
    segment: int = 0  # index of the segment in its request: every stage queue serves lower segments first


StageRequest = SemanticRequest | CoarseRequest | FineRequest | CodecRequest


@dataclass
class EngineResult:
    """What an engine hands back for one request: an output or an error."""

    request_id: str
    output: np.ndarray | None = None
    error: Exception | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

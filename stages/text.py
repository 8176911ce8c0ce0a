"""Text preparation, equivalent to transformers' BarkProcessor.

The checkpoint's BERT (multilingual, cased) WordPiece tokenizer turns text into
ids, without special tokens; the semantic stage shifts them by the text offset
and pads to 256. Multilingual text, music notes (♪) and cues such as
[laughter] pass through unchanged: Bark learned them as plain text.
"""

from __future__ import annotations

import re

import numpy as np

from .constants import BarkSpec
from .types import InvalidRequestError
from .weights import Checkpoint, CheckpointError

_WHITESPACE = re.compile(r"\s+")


class TextTooLongError(InvalidRequestError):
    """More tokens than one semantic generation takes (split the text first)."""


def normalize_text(text: str) -> str:
    """Collapse runs of whitespace, as Bark does before tokenizing."""
    return _WHITESPACE.sub(" ", text).strip()


class TextPreparer:
    """Tokenizes and checks text for the semantic stage."""

    def __init__(self, tokenizer, spec: BarkSpec):
        self.tokenizer = tokenizer
        self.spec = spec

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> "TextPreparer":
        from transformers import AutoTokenizer

        source = ckpt.local_dir if ckpt.local_dir is not None else ckpt.name
        try:
            tok = AutoTokenizer.from_pretrained(str(source))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load the tokenizer of {ckpt.name!r}: {exc}") from None
        return cls(tok, ckpt.spec)

    @property
    def max_tokens(self) -> int:
        return self.spec.max_input_semantic_length

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(normalize_text(text), add_special_tokens=False))

    def encode(self, text: str) -> np.ndarray:
        """Token ids of one generation's text. (T,) int64, 1 <= T <= 256"""
        if not isinstance(text, str):
            raise InvalidRequestError(f"text must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (a CLI argument, say) makes the tokenizer raise TypeError
            raise InvalidRequestError("text: strings must be valid Unicode (a lone surrogate such as \\ud800 "
                                      "is not)") from None
        clean = normalize_text(text)
        if not clean:
            raise InvalidRequestError("text is empty")
        ids = self.tokenizer.encode(clean, add_special_tokens=False)
        if not ids:
            raise InvalidRequestError("text has no tokens")
        if len(ids) > self.max_tokens:
            raise TextTooLongError(
                f"text has {len(ids)} tokens; one generation takes at most {self.max_tokens} "
                "(the server splits long text at sentence boundaries; in-process, split it first)"
            )
        return np.asarray(ids, dtype=np.int64)

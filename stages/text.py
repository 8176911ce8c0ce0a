"""Text preparation, equivalent to transformers' BarkProcessor.

The checkpoint's BERT (multilingual, cased) WordPiece tokenizer turns text into
ids, without special tokens; the semantic stage shifts them by the text offset
and pads to 256. Multilingual text, music notes (♪) and cues such as
[laughter] pass through unchanged: Bark learned them as plain text.
"""

from __future__ import annotations

import json
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
        """The checkpoint's tokenizer: its ``tokenizer.json`` read by the tokenizers library when the
        checkpoint has one and its tokenizer_config.json agrees with it (the same backend transformers' fast
        tokenizer runs, without importing transformers and torch: the orchestrator loads no weights), else
        transformers' AutoTokenizer."""
        backend = _backend_tokenizer(ckpt)
        if backend is not None:
            return cls(backend, ckpt.spec)
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


# tokenizer_config.json keys of BERT that transformers' fast tokenizer enforces on tokenizer.json's normalizer
_NORMALIZER_KEYS = {"do_lower_case": "lowercase", "strip_accents": "strip_accents",
                    "tokenize_chinese_chars": "handle_chinese_chars"}


class _Backend:
    """A ``tokenizers.Tokenizer`` behind the one call TextPreparer makes (transformers' ``encode``)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids


def _backend_tokenizer(ckpt: Checkpoint) -> _Backend | None:
    """``tokenizer.json`` through the tokenizers library, or None where transformers must build the tokenizer:
    no such file, a tokenizer class other than BERT's, or a config whose normalizer settings differ from the
    file's (transformers rebuilds the normalizer then)."""
    path = ckpt.file("tokenizer.json", required=False)
    if path is None:
        return None
    cfg_path = ckpt.file("tokenizer_config.json", required=False)
    try:
        text = path.read_text(encoding="utf-8")
        spec = json.loads(text)
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path is not None else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # let transformers say what is wrong with it
    normalizer = spec.get("normalizer") if isinstance(spec, dict) else None
    if not isinstance(cfg, dict) or not isinstance(normalizer, dict) or normalizer.get("type") != "BertNormalizer":
        return None
    if cfg.get("tokenizer_class") not in (None, "BertTokenizer", "BertTokenizerFast"):
        return None
    for key, field in _NORMALIZER_KEYS.items():
        if key in cfg and cfg[key] != normalizer.get(field):
            return None
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(text)
    except Exception:  # noqa: BLE001 - a file the library cannot read: transformers reports it
        return None
    tok.no_truncation()  # transformers' encode without truncation= or padding= does neither
    tok.no_padding()
    return _Backend(tok)

"""Long text: split at sentence boundaries into segments that fit one generation, chain the voice.

Bark's long-form recipe generates sentence by sentence and uses each
segment's full output (semantic, coarse and fine tokens) as the history
prompt of the next, so the voice carries over. A sentence longer than a
segment is cut at clause punctuation, then between words.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .types import VoicePrompt

_SENTENCE_END = re.compile(r"(?<=[.!?…。！？])[\"'”’)\]]*\s+|(?<=[。！？])")
_CLAUSE_END = re.compile(r"(?<=[,;:，；：—])\s*")


def _pieces(text: str, pattern: re.Pattern) -> list[str]:
    return [p.strip() for p in pattern.split(text) if p and p.strip()]


_CHARS_PER_PIECE = 8  # a cut looks at most this many characters per token of budget


def _cut_long_word(word: str, count: Callable[[str], int], max_tokens: int) -> tuple[list[str], str]:
    """A "word" longer than a segment (e.g. CJK without spaces) cut into pieces that fit -> (pieces, rest).

    Each cut tokenizes only a bounded window, never the whole remainder: 20k characters of CJK took 37 s
    when every cut re-tokenized all that was left.
    """
    window = max_tokens * _CHARS_PER_PIECE
    pieces = []
    while count(word[:window]) > max_tokens or (len(word) > window and count(word) > max_tokens):
        cut = max(1, len(word) // 2) if len(word) <= window else window
        while cut > 1 and count(word[:cut]) > max_tokens:
            cut //= 2
        pieces.append(word[:cut])
        word = word[cut:]
    return pieces, word


def _split_words(sentence: str, count: Callable[[str], int], max_tokens: int) -> list[str]:
    out, cur = [], ""
    for word in sentence.split(" "):
        cand = f"{cur} {word}".strip()
        if cur and count(cand) > max_tokens:
            out.append(cur)
            cand = word
        pieces, cand = _cut_long_word(cand, count, max_tokens)
        out += pieces
        cur = cand
    if cur:
        out.append(cur)
    return out


def _fit(piece: str, count: Callable[[str], int], max_tokens: int) -> list[str]:
    if count(piece) <= max_tokens:
        return [piece]
    out = []
    for clause in _pieces(piece, _CLAUSE_END):
        out += [clause] if count(clause) <= max_tokens else _split_words(clause, count, max_tokens)
    return out


def split_text(text: str, count: Callable[[str], int], max_tokens: int, first_max_tokens: int | None = None,
               ) -> list[str]:
    """Segments of at most ``max_tokens`` tokens, cut at sentence ends where possible, packed greedily.

    ``first_max_tokens`` (smaller than ``max_tokens``) caps the first segment only: a long text's
    first audio then comes from a short segment, so it starts sooner; the rest is packed as usual.
    """
    first = min(first_max_tokens or max_tokens, max_tokens)
    units: list[str] = []
    for sentence in _pieces(" ".join(text.split()), _SENTENCE_END):
        units += _fit(sentence, count, first if not units else max_tokens)  # the opening sentence: the finer cut
    segments: list[str] = []
    cur = ""
    for unit in units:
        limit = first if not segments else max_tokens
        cand = f"{cur} {unit}".strip()
        if cur and count(cand) > limit:
            segments.append(cur)
            cand = unit
        cur = cand
    if cur:
        segments.append(cur)
    return segments


# Bark's long-form rule: segment i continues segment i-1's voice, using i-1's own output as its
# history prompt. An output of fewer than 2 semantic tokens (so at most 1 coarse frame) is no voice
# to continue; the segment after it keeps the history segment i-1 had. Two semantic tokens make 3
# coarse frames and 3 fine frames, so the semantic length alone decides.
MIN_CARRY_SEMANTIC = 2


def carries_voice(semantic: np.ndarray) -> bool:
    """Whether a segment's semantic output is long enough to be the next segment's history."""
    return len(semantic) >= MIN_CARRY_SEMANTIC


def history_prompt(semantic: np.ndarray, coarse: np.ndarray | None = None,
                   fine: np.ndarray | None = None) -> VoicePrompt:
    """A segment's output as a history prompt. A stage reads only its own parts of it (semantic reads
    the semantic tokens, coarse also the coarse codes), so parts not yet known may be left out."""
    coarse = np.zeros((2, 0), np.int64) if coarse is None else coarse
    fine = np.zeros((8, 0), np.int64) if fine is None else fine
    return VoicePrompt(np.asarray(semantic, dtype=np.int64), np.asarray(coarse, dtype=np.int64),
                       np.asarray(fine, dtype=np.int64), name="carried")


def segment_seed(seed: int, index: int) -> int:
    """A distinct, reproducible seed for each segment of one request."""
    if index == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), index]).generate_state(1, np.uint64)[0] >> 1)


# Multi-speaker scripts: each line is split like a text, and each speaker (identified by its voice key)
# continues only its own previous segment's voice, never another speaker's.
@dataclass(frozen=True)
class ScriptSegment:
    speaker: int  # index into the script's distinct speakers, in order of first appearance
    line: int  # the script line this segment belongs to
    text: str


def script_segments(lines: Sequence[tuple[Hashable, str]], count: Callable[[str], int],
                    max_tokens: int, first_max_tokens: int | None = None) -> tuple[list[Hashable], list[ScriptSegment]]:
    """(speaker keys, segments in script order) of ``lines`` = (speaker key, text) pairs.

    A line is split as ``split_text`` splits a text; segments never span two lines. ``first_max_tokens``
    cuts the script's first segment only (its first audio comes sooner).
    """
    speakers: list[Hashable] = []
    segments: list[ScriptSegment] = []
    for n, (key, text) in enumerate(lines):
        if key not in speakers:
            speakers.append(key)
        first = first_max_tokens if n == 0 else None
        segments += [ScriptSegment(speakers.index(key), n, s) for s in split_text(text, count, max_tokens, first)]
    return speakers, segments


def speaker_key(voice, aliases: Mapping[str, str] | None = None) -> Hashable:
    """Who speaks a line: lines with the same voice name (after ``aliases``) are one speaker; a prompt
    object given inline is a speaker of its own."""
    if isinstance(voice, str):
        return (aliases or {}).get(voice, voice)
    return None if voice is None else ("inline", id(voice))


def split_script(lines: Sequence[tuple[object, str]], count: Callable[[str], int], max_tokens: int,
                 first_max_tokens: int | None = None, aliases: Mapping[str, str] | None = None,
                 ) -> tuple[list[object], list[ScriptSegment]]:
    """(each speaker's voice as the script gives it, segments in script order) of (voice, text) lines."""
    keys = [(speaker_key(v, aliases), t) for v, t in lines]
    speakers, segments = script_segments(keys, count, max_tokens, first_max_tokens)
    by_key = {speaker_key(v, aliases): v for v, _ in lines}
    return [by_key[k] for k in speakers], segments


def previous_of_speaker(speakers: Sequence[int]) -> list[int | None]:
    """For each segment, the index of the same speaker's previous segment (None for its first)."""
    last: dict[int, int] = {}
    out: list[int | None] = []
    for i, speaker in enumerate(speakers):
        out.append(last.get(speaker))
        last[speaker] = i
    return out

"""Token bookkeeping of Bark, as pure functions on numpy arrays.

Offsets, pads, windows and the flatten/unflatten of codebooks live here and
nowhere else, so the engines only move tensors. Every function follows the
algorithm of transformers' Bark (models/bark/modeling_bark.py), which follows
suno-ai/bark generation.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .constants import BarkSpec

# ---------------------------------------------------------------- semantic


def text_window(text_ids: np.ndarray, spec: BarkSpec) -> np.ndarray:
    """Text ids shifted by the text offset and right-padded to the text window. (256,)"""
    n = spec.max_input_semantic_length
    out = np.full((n,), spec.text_pad_token, dtype=np.int64)
    ids = np.asarray(text_ids, dtype=np.int64)[:n]
    out[: len(ids)] = ids + spec.text_encoding_offset
    return out


def semantic_history_window(semantic_prompt: np.ndarray | None, spec: BarkSpec) -> np.ndarray:
    """Last 256 semantic tokens of the voice, right-padded with the semantic pad. (256,)"""
    n = spec.max_input_semantic_length
    out = np.full((n,), spec.semantic_pad_token, dtype=np.int64)
    if semantic_prompt is not None and len(semantic_prompt):
        hist = np.asarray(semantic_prompt, dtype=np.int64)[-n:]
        out[: len(hist)] = hist
    return out


# ---------------------------------------------------------------- coarse


def flatten_coarse(codes: np.ndarray, spec: BarkSpec) -> np.ndarray:
    """(2, T) codes in [0, 1024) -> (2T,) interleaved coarse-vocabulary tokens.

    Codebook n is shifted by n * codebook_size, then everything by the semantic
    vocabulary size: [c0_t0, c1_t0, c0_t1, c1_t1, ...].
    """
    codes = np.asarray(codes, dtype=np.int64)
    offsets = np.arange(codes.shape[0], dtype=np.int64)[:, None] * spec.codebook_size
    return ((codes + offsets).T.reshape(-1) + spec.semantic_vocab_size).astype(np.int64)


def unflatten_coarse(tokens: np.ndarray, spec: BarkSpec) -> np.ndarray:
    """(2T,) interleaved coarse tokens -> (2, T) codes in [0, codebook_size)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    frames = tokens.reshape(-1, spec.n_coarse_codebooks)  # (T, 2)
    return np.remainder(frames - spec.semantic_vocab_size, spec.codebook_size).T.copy()


def coarse_output_length(n_semantic: int, spec: BarkSpec) -> int:
    """Number of flattened coarse tokens Bark generates for n semantic tokens."""
    frames = math.floor(n_semantic * spec.semantic_to_coarse_ratio / spec.n_coarse_codebooks)
    return int(round(frames * spec.n_coarse_codebooks))


def coarse_histories(
    semantic_prompt: np.ndarray | None, coarse_prompt: np.ndarray | None, spec: BarkSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Trim a voice's semantic and coarse prompts to aligned coarse-stage histories.

    Returns (semantic history (S,), flattened coarse history (K,)); both empty
    without a voice.
    """
    empty = np.zeros((0,), dtype=np.int64)
    if semantic_prompt is None or coarse_prompt is None:
        return empty, empty
    sem = np.asarray(semantic_prompt, dtype=np.int64)
    flat = flatten_coarse(coarse_prompt, spec)
    ratio = spec.semantic_to_coarse_ratio
    n_sem = min(spec.max_semantic_history, len(sem) - len(sem) % 2, int(math.floor(len(flat) / ratio)))
    if n_sem <= 0:
        return empty, empty
    n_coarse = int(round(n_sem * ratio))
    # Bark drops the last two coarse tokens "for time alignment (sounds better)".
    return sem[-n_sem:], flat[-n_coarse:][:-2]


@dataclass(frozen=True)
class CoarseWindowPlan:
    """Where the next coarse window reads its semantic context, and how much it writes."""

    semantic_start: int
    n_new: int


def coarse_window_plan(base_semantic_idx: int, generated: int, target: int, spec: BarkSpec) -> CoarseWindowPlan:
    """The next sliding window, given `generated` of `target` coarse tokens done."""
    semantic_idx = base_semantic_idx + int(round(generated / spec.semantic_to_coarse_ratio))
    return CoarseWindowPlan(
        semantic_start=max(0, semantic_idx - spec.max_semantic_history),
        n_new=min(spec.sliding_window_len, target - generated),
    )


def coarse_window_length(n_coarse: int, spec: BarkSpec) -> int:
    """Length of ``coarse_window_input`` with ``n_coarse`` coarse tokens so far (history included)."""
    return spec.max_coarse_input_length + 1 + min(n_coarse, spec.max_coarse_history)


def coarse_window_input(
    semantic_all: np.ndarray, coarse_all: np.ndarray, plan: CoarseWindowPlan, spec: BarkSpec
) -> np.ndarray:
    """Prefill tokens of one window: 256 semantic (padded), the infer token, <=630 coarse. (L,)"""
    n = spec.max_coarse_input_length
    sem = np.full((n,), spec.coarse_semantic_pad_token, dtype=np.int64)
    ctx = semantic_all[plan.semantic_start :][:n]
    sem[: len(ctx)] = ctx
    hist = coarse_all[-spec.max_coarse_history :] if len(coarse_all) else coarse_all
    return np.concatenate([sem, np.array([spec.coarse_infer_token], dtype=np.int64), hist.astype(np.int64)])


def coarse_codebook(n_generated_in_window, spec: BarkSpec):
    """The next coarse token's codebook and the first id of its range [lo, lo + codebook_size): codebooks
    alternate, 0 first. An int, or a tensor of counts (one per row: the coarse engine's step, on the
    device) for tensors. -> (codebook, lo)"""
    codebook = n_generated_in_window % spec.n_coarse_codebooks
    return codebook, spec.semantic_vocab_size + codebook * spec.codebook_size


# ---------------------------------------------------------------- fine


@dataclass(frozen=True)
class FineWindow:
    start: int  # first row of the 1024-row window in the padded sequence
    fill_from: int  # first row (relative to start) this window writes


@dataclass(frozen=True)
class FinePlan:
    """Padded fine sequence and its windows for one request."""

    sequence: np.ndarray  # (L, 8) history + coarse (+ pad), L >= 1024
    n_history: int
    n_frames: int
    windows: tuple[FineWindow, ...]


def fine_plan(coarse_codes: np.ndarray, fine_prompt: np.ndarray | None, spec: BarkSpec) -> FinePlan:
    """Lay out history, coarse codes and padding, and the overlapping 1024/512 windows."""
    coarse = np.asarray(coarse_codes, dtype=np.int64).T  # (T, 2)
    n_frames = coarse.shape[0]
    seq = np.full((n_frames, spec.n_fine_codebooks), spec.fine_pad_token, dtype=np.int64)
    seq[:, : spec.n_coarse_codebooks] = coarse
    n_history = 0
    if fine_prompt is not None and fine_prompt.shape[-1] > 0:
        hist = np.asarray(fine_prompt, dtype=np.int64).T[-spec.max_fine_history_length :]  # (H, 8)
        n_history = hist.shape[0]
        seq = np.concatenate([hist, seq], axis=0)
    win, step = spec.max_fine_input_length, spec.max_fine_history_length
    if seq.shape[0] < win:
        pad = np.full((win - seq.shape[0], spec.n_fine_codebooks), spec.fine_pad_token, dtype=np.int64)
        seq = np.concatenate([seq, pad], axis=0)
    n_loops = max(0, math.ceil((n_frames - (win - n_history)) / step)) + 1
    windows = []
    for i in range(n_loops):
        start = min(i * step, seq.shape[0] - win)
        fill = min(n_history + i * step, seq.shape[0] - step)
        windows.append(FineWindow(start=start, fill_from=fill - start))
    return FinePlan(sequence=seq, n_history=n_history, n_frames=n_frames, windows=tuple(windows))


def fine_output(plan: FinePlan, sequence: np.ndarray) -> np.ndarray:
    """Cut history and padding off a filled fine sequence. -> (8, T)"""
    return sequence[plan.n_history : plan.n_history + plan.n_frames].T.copy()

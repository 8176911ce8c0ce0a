"""Greedy parity with transformers' Bark: tokens of every stage equal, audio within 1e-4.

The tiny checkpoint is random, so EOS rarely wins: lengths are set with
max_semantic_tokens, and one case uses min_eos_p to stop on EOS.
"""

from __future__ import annotations

import numpy as np
import pytest

from bark_serve.stages.types import GenerationParams
from tests.hf_reference import HFBark

AUDIO_TOL = 1e-4


@pytest.fixture(scope="module")
def hf(tiny_ckpt):
    return HFBark(tiny_ckpt)


def _voice(preset_dir, name):
    """'ckpt:NAME' is a preset from the checkpoint's speaker_embeddings/, 'npz:NAME' a suno .npz file."""
    if name is None:
        return None
    kind, _, rest = name.partition(":")
    return rest if kind == "ckpt" else str(preset_dir / f"{rest}.npz")


CASES = [
    ("Hello, my dog is cute.", None, 40),
    ("Hello, my name is Suno. And, uh — and I like pizza. [laughs]", "ckpt:v2/en_speaker_1", 120),
    ("♪ In the jungle, the mighty jungle ♪", "npz:v2/en_speaker_6", 90),
    ("你好，我叫Suno。Привет! Bonjour, je m'appelle Suno.", "npz:v2/de_speaker_3", 60),
    ("[clears throat] A long one, so the coarse windows slide many times and fine needs two windows.",
     "ckpt:announcer", 420),
]


def _assert_same(ours, ref):
    np.testing.assert_array_equal(ours.semantic, ref.semantic)
    np.testing.assert_array_equal(ours.coarse, ref.coarse)
    np.testing.assert_array_equal(ours.fine, ref.fine)
    assert ours.audio.shape == ref.audio.shape
    assert np.max(np.abs(ours.audio - ref.audio)) <= AUDIO_TOL


@pytest.mark.parametrize("text,voice,n_sem", CASES)
def test_alone_matches_transformers(pipe, hf, preset_dir, text, voice, n_sem):
    v = _voice(preset_dir, voice)
    ref = hf.generate(text, v, max_semantic_tokens=n_sem)
    ours = pipe.generate(text, v, GenerationParams.greedy(max_semantic_tokens=n_sem, min_eos_p=None))[0]
    assert len(ref.semantic) == n_sem
    _assert_same(ours, ref)
    assert np.std(ours.audio) > 1e-3  # real, varied audio, not a constant


def test_batch_of_mixed_lengths_and_voices_matches_transformers_alone(pipe, hf, preset_dir):
    voices = [_voice(preset_dir, v) for _, v, _ in CASES]
    params = [GenerationParams.greedy(max_semantic_tokens=n, min_eos_p=None) for *_, n in CASES]
    ours = pipe.generate([t for t, _, _ in CASES], voices, params)
    for out, (text, _, n), v in zip(ours, CASES, voices):
        _assert_same(out, hf.generate(text, v, max_semantic_tokens=n))


def test_eos_with_min_eos_p_matches_transformers(pipe, hf):
    """Random weights never pick EOS, but min_eos_p stops them once P(EOS) exceeds it.

    Greedy paths of random weights depend on float noise (threads, CPU kernels), so the threshold
    is chosen from transformers' own run here: in the middle of the widest range of thresholds
    that all stop at the same step, so that our P(EOS) need only agree to a few percent.
    """
    text, limit = "Hello, my dog is cute.", 300
    coarse_grid = [1e-2 / 1.5 ** i for i in range(30)]
    early = [t for t in coarse_grid if 0 < hf.semantic_length(text, limit, t) < limit]
    assert early, "no threshold stops this text early"
    lo, hi = early[-1], early[0] * 1.5
    grid = [hi / 1.04 ** i for i in range(200) if hi / 1.04 ** i >= lo]
    lengths = [hf.semantic_length(text, limit, t) for t in grid]
    runs, start = [], 0  # (run length, first index) of equal stopping steps
    for i in range(1, len(grid) + 1):
        if i == len(grid) or lengths[i] != lengths[start]:
            if 0 < lengths[start] < limit:
                runs.append((i - start, start))
            start = i
    width, first = max(runs)
    assert width >= 3, f"no stable threshold: {list(zip(grid, lengths))}"
    threshold = grid[first + width // 2]
    ref = hf.generate(text, None, max_semantic_tokens=limit, min_eos_p=threshold)
    ours = pipe.generate(text, None, GenerationParams.greedy(max_semantic_tokens=limit, min_eos_p=threshold))[0]
    assert 0 < len(ref.semantic) < limit
    _assert_same(ours, ref)


def test_per_stage_chain_equals_barkmodel_generate(hf):
    text = "Hello, my dog is cute."
    staged = hf.generate(text, "v2/en_speaker_6", max_semantic_tokens=40)
    whole = hf.generate_end_to_end(text, "v2/en_speaker_6", max_semantic_tokens=40)
    np.testing.assert_allclose(staged.audio, whole, atol=1e-6)

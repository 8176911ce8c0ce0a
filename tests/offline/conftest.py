"""Helpers of the dataset tests: a small config, the in-process reference, reading a run's output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

SEGMENT_TOKENS = 24  # small, so a few sentences make several segments (the voice carries across them)
QUANT = 2 / 32767  # 16-bit PCM quantization
MIN_SNR_DB = 20.0  # see assert_same_audio


def assert_same_audio(actual: np.ndarray, desired: np.ndarray) -> None:
    """The stage loops' audio is the in-process pipeline's: equal within 16-bit quantization where the CPU's
    float kernels give a row the same numbers whether it is batched with others or not (the AVX2 machines
    here), else the same length and an error at least MIN_SNR_DB below the signal. On one CI machine the
    long sampled row (768 semantic tokens, thousands of draws, loudness-normalized as a whole) came out
    within 0.05 of the reference everywhere but not within quantization (not reproduced on the machines
    here; the likely cause is kernels that round a batch of 2 rows, as the stage loops run, differently from
    the reference's lone row). A wrong row, voice, seed or segment order is different audio, at an SNR
    near 0 dB."""
    actual, desired = np.asarray(actual, dtype=np.float64), np.asarray(desired, dtype=np.float64)
    assert actual.shape == desired.shape, (actual.shape, desired.shape)
    if np.allclose(actual, desired, rtol=0, atol=QUANT):
        return
    noise = float(np.sum((actual - desired) ** 2))
    snr = 10 * np.log10(max(float(np.sum(desired ** 2)), 1e-30) / max(noise, 1e-30))
    assert snr >= MIN_SNR_DB, (f"audio differs beyond quantization at an SNR of {snr:.1f} dB (< {MIN_SNR_DB} dB); "
                               f"max |diff| {np.max(np.abs(actual - desired)):.4g}")


def offline_config(model: str, **overrides) -> dict:
    """float32 pinned (the reference pipeline is float32), one torch thread, small batches, tiny CPU shares,
    batch-invariant engines (as ``pipe`` here): a sampled row batched with another takes the tokens it takes
    alone in the reference to the bit (stages/invariance.py)."""
    stage = {"num_cpus": 0.25, "max_batch": 2, "dtype": "float32", "device": "cpu", "torch_threads": 1,
             "batch_invariant": True}
    cfg = {"model": model, "orchestrator": {"num_cpus": 0.25, "segment_max_tokens": SEGMENT_TOKENS},
           **{s: {"pool": s, **stage} for s in ("semantic", "coarse", "fine", "codec")}}
    cfg.update(overrides)
    return cfg


# Rows every input format carries: greedy and seeded, one and several segments, presets and an alias.
GOOD_ROWS = [
    {"id": "long", "text": "The first sentence is here. A second one follows it. And a third ends the row.",
     "voice": "v2/en_speaker_6", "options": {"temperature": 0, "max_semantic_tokens": 10}},
    {"id": "short", "text": "Hello there.", "seed": 3, "options": {"temperature": 0, "max_semantic_tokens": 12}},
    {"id": "sampled", "text": "Sampled with a seed, not greedy.", "seed": 7, "voice": "alloy",
     "options": {"max_semantic_tokens": 9}},
    {"id": 42, "text": "An integer id and no options at all.", "seed": 11},
    {"id": "raw", "text": "Raw samples, then. No joins at all.", "seed": 5,
     "options": {"max_semantic_tokens": 8, "trim_silence": False, "crossfade_ms": 0, "normalize_loudness": False}},
]


# A two-speaker script row (greedy): its second speaker is named by an alias; the first speaks twice, and its
# first line makes two segments, so each speaker's history walk is seen.
SCRIPT_ROW = {"id": "script", "options": {"temperature": 0, "max_semantic_tokens": 10}, "script": [
    {"voice": "v2/en_speaker_6", "text": "Good morning to you. How has the day been so far, my friend?"},
    {"voice": "ash", "text": "Quite good, thank you."},
    {"voice": "v2/en_speaker_6", "text": "Glad to hear it."}]}


@pytest.fixture(scope="module")
def pipe_capacity() -> int:
    return 4


@pytest.fixture(scope="module")
def pipe_batch_invariant() -> bool:
    return True


def reference(pipe, row: dict, aliases: dict | None = None) -> np.ndarray:
    """The in-process pipeline's audio for an input row (same options, seed and segment budget), its segments
    joined as the served app joins them (the config's default audio block and the row's output options)."""
    import torch

    from bark_serve.offline.rows import row_params, row_post_process
    from bark_serve.serving.config import AudioConfig, BarkConfig
    from bark_serve.stages.audio import join_segments

    aliases = aliases or BarkConfig().voice_aliases
    options = json.dumps(row["options"]) if row.get("options") else None
    voice = aliases.get(row.get("voice"), row.get("voice"))
    # one torch thread, as the stage workers under test run (offline_config): float32 GEMMs on 1 and 2 threads
    # round differently, and a sampled row's tokens can follow; the thread count this process was left with by
    # earlier tests decided whether the parity tests passed
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params = row_params(options, row.get("seed"))
        if "script" in row:
            lines = [(aliases.get(line["voice"], line["voice"]), line["text"]) for line in row["script"]]
            gen = pipe.synthesize_script(lines, params, max_segment_tokens=SEGMENT_TOKENS)
        else:
            gen = pipe.synthesize(row["text"], voice, params, max_segment_tokens=SEGMENT_TOKENS)
    finally:
        torch.set_num_threads(threads)
    segments = np.split(gen.audio, np.cumsum(gen.segment_samples)[:-1])
    return join_segments(segments, gen.sample_rate, row_post_process(options, AudioConfig()))


def manifest(out: Path) -> dict[str, dict]:
    import pyarrow.parquet as pq

    records = pq.read_table(out / "manifest.parquet").to_pylist()
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), f"an id recorded twice: {ids}"
    return {r["id"]: r for r in records}


def audio_of(out: Path, record: dict) -> np.ndarray:
    import soundfile as sf

    data, rate = sf.read(out / record["path"], dtype="float32")
    assert rate == 24_000
    return data

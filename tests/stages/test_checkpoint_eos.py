"""`make-checkpoint` writes checkpoints whose semantic stage ends by itself (quick demo requests),
at text-dependent lengths, and `--full-length` keeps the old weights that run to the cap."""

from __future__ import annotations

import numpy as np
import pytest

from bark_serve.serving.config import BarkConfig
from bark_serve.stages.engine import EngineOptions
from bark_serve.stages.random_checkpoint import PRESETS, make_checkpoint
from bark_serve.stages.semantic import SemanticEngine
from bark_serve.stages.text import TextPreparer
from bark_serve.stages.types import GREEDY, GenerationParams, SemanticRequest
from bark_serve.stages.weights import Checkpoint

SHORT = "Hello, my dog is cute [laughs]"  # the README's demo text
LONGER = "Hello, my name is Suno. And, uh — and I like pizza. [laughs] But I also have other interests."


@pytest.fixture(scope="module")
def eos_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("eos") / "tiny", "tiny", seed=0, eos=True)


def _lengths(ckpt_dir, texts, sampling, seed=3, min_eos_p=0.2):
    ckpt = Checkpoint.open(ckpt_dir)
    engine = SemanticEngine.from_checkpoint(ckpt, EngineOptions(capacity=len(texts)))
    text = TextPreparer.from_checkpoint(ckpt)
    cap = GenerationParams().max_semantic_tokens
    reqs = [SemanticRequest(f"r{i}", text.encode(t), None, sampling, min_eos_p, cap, seed) for i, t in enumerate(texts)]
    return [len(r.output) for r in engine.run(reqs)]


def test_a_short_text_stops_by_itself_after_1_to_4_seconds(eos_ckpt):
    sampled = GenerationParams().semantic  # Bark's default temperature, as a demo request uses
    for sampling in (sampled, GREEDY):
        short, longer = _lengths(eos_ckpt, [SHORT, LONGER], sampling)
        assert 50 <= short <= 200, short  # 1-4 s of audio at 49.9 tokens/s
        assert short != longer and longer < 768  # text-dependent, and still below the cap
        assert longer > short  # more text, more speech


def test_the_eos_checkpoint_keeps_parity_with_transformers(eos_ckpt):
    """transformers' BarkModel stops at the same step on the tuned weights (greedy, min_eos_p 0.2)."""
    from tests.hf_reference import HFBark

    ours = _lengths(eos_ckpt, [SHORT], GREEDY)[0]
    assert HFBark(eos_ckpt).semantic_length(SHORT, 768, 0.2) == ours


def test_full_length_checkpoints_run_to_the_cap(tiny_ckpt):
    """The default of make_checkpoint() (and `make-checkpoint --full-length`): no end of speech."""
    assert _lengths(tiny_ckpt, [SHORT], GenerationParams().semantic) == [768]


def test_readme_in_the_checkpoint_says_how_it_ends(eos_ckpt, tiny_ckpt):
    assert "end by itself" in (eos_ckpt / "README.md").read_text()
    assert "--full-length" in (tiny_ckpt / "README.md").read_text()


@pytest.mark.parametrize("alias_target", sorted(set(BarkConfig().voice_aliases.values())))
def test_every_default_voice_alias_resolves_on_a_fresh_checkpoint(eos_ckpt, alias_target):
    from bark_serve.stages.voices import VoiceLibrary

    ckpt = Checkpoint.open(eos_ckpt)
    voice = VoiceLibrary(ckpt.spec, ckpt, []).resolve(alias_target)
    assert alias_target in PRESETS and voice is not None and len(voice.semantic) > 0
    assert np.asarray(voice.fine).shape[0] == 8

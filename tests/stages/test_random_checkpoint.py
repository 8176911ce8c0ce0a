"""A seed writes one checkpoint: the same files in any process, whatever that process drew from torch's
generator before, and without moving that generator.

Before, transformers initialised the codec from torch's global generator (so the tiny test checkpoint
of one pytest worker depended on the tests it had run before: once its audio sat past full scale and the
served WAV, clipped, no longer equalled the in-process audio), and the ``tokenizers`` trainer broke ties
in hash order (953, 955 or 957 tokens, and other ids, in each process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bark_serve.stages.random_checkpoint import CORPUS, make_checkpoint, wordpiece_vocab

BYTE_EQUAL = ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json",
              "generation_config.json", "voice_cloning/hubert/model.safetensors")


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
def test_a_seed_writes_the_same_checkpoint_in_any_process_and_leaves_the_callers_generator(tmp_path):
    torch.manual_seed(1234)
    torch.randn(4321)  # a process that has drawn before
    expected_next = torch.random.get_rng_state()
    here = make_checkpoint(tmp_path / "here", "tiny", seed=3)
    assert torch.equal(torch.random.get_rng_state(), expected_next)  # the caller's generator did not move

    code = "import sys; from bark_serve.stages.random_checkpoint import make_checkpoint; " \
           "make_checkpoint(sys.argv[1], 'tiny', seed=3)"
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "there")], capture_output=True, text=True,
                         timeout=300)  # a fresh generator, another hash seed for Python and for tokenizers
    assert res.returncode == 0, res.stderr[-2000:]
    there = tmp_path / "there"

    assert _files(here) == _files(there)
    for name in BYTE_EQUAL:
        assert (here / name).read_bytes() == (there / name).read_bytes(), name
    for npy in (here / "speaker_embeddings").glob("*.npy"):
        assert np.array_equal(np.load(npy), np.load(there / "speaker_embeddings" / npy.name)), npy.name
    for pth in (here / "voice_cloning" / "quantizer").glob("*.pth"):  # torch.save writes an id of its own
        a, b = torch.load(pth, weights_only=True), torch.load(there / pth.relative_to(here), weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), pth.name

    other = make_checkpoint(tmp_path / "other", "tiny", seed=4)
    assert (other / "model.safetensors").read_bytes() != (here / "model.safetensors").read_bytes()


def test_the_vocabulary_covers_every_character_of_its_corpus_and_ties_go_to_the_first_pair():
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    vocab = wordpiece_vocab(lines, 2000)
    assert len(vocab) == len(set(vocab)) and vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert {c for line in lines for c in line if not c.isspace()} <= set(vocab)  # any word can start anywhere
    start = len(wordpiece_vocab(lines, 0))  # the special tokens and the characters, before any merge
    assert start < len(vocab) and wordpiece_vocab(lines, start + 30) == vocab[:start + 30]  # the size cuts merges
    # "ab" and "cd" are as frequent: "ab" sorts first, so it is merged first
    start = len(wordpiece_vocab(["cd ab"], 0))
    assert wordpiece_vocab(["cd ab"], start + 1)[start:] == ["ab"]
    assert wordpiece_vocab(["cd ab", "cd"], start + 1)[start:] == ["cd"]  # unless the other is more frequent
    assert wordpiece_vocab(["cd ab"], 100)[start:] == ["ab", "cd"]  # no pair left: it stops below the size

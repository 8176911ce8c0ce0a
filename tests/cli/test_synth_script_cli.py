"""``bark-serve synth --script FILE.json``: a multi-speaker script in this process, as a real subprocess."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import soundfile as sf

from bark_serve.stages.engine import EngineOptions
from bark_serve.stages.pipeline import BarkPipeline
from bark_serve.stages.types import GenerationParams
from tests.cli.test_synth_cli import run_cli

SCRIPT = [{"voice": "v2/en_speaker_6", "text": "Welcome to the show."},
          {"voice": "v2/de_speaker_3", "text": "Danke, schön hier zu sein."},
          {"voice": "v2/en_speaker_6", "text": "Let us begin."}]


def test_synth_script_writes_the_in_process_script_audio(tiny_ckpt, tmp_path):
    path, out = tmp_path / "script.json", tmp_path / "dialogue.wav"
    path.write_text(json.dumps(SCRIPT))
    res = run_cli("synth", "--script", path, "-o", out, "--model", tiny_ckpt, "--temperature", "0",
                  "--min-eos-p", "none", "--max-semantic-tokens", "12", "--dtype", "float32", "--raw")
    assert res.returncode == 0, res.stderr
    audio, sr = sf.read(out, dtype="float32")
    ref = BarkPipeline.from_pretrained(str(tiny_ckpt), EngineOptions()).synthesize_script(
        [(line["voice"], line["text"]) for line in SCRIPT], GenerationParams.greedy(max_semantic_tokens=12,
                                                                                    min_eos_p=None))
    assert sr == 24000 and audio.shape == ref.audio.shape
    assert np.max(np.abs(audio - ref.audio)) < 2 / 32767  # 16-bit quantization only


def deep(n):
    value = "x"
    for _ in range(n):
        value = [value]
    return value


@pytest.mark.parametrize("content,message", [
    ("[]", "at least 1 item"),
    ('[{"voice": "v2/en_speaker_6", "text": ""}]', "at least 1 character"),
    ('[{"voice": "v2/en_speaker_6", "text": "   "}]', "script line 0: text is empty"),
    ('[{"voice": "nobody", "text": "hi"}]', "unknown voice 'nobody'"),
    ('[{"voice": 6, "text": "hi"}]', "valid string"),
    ('{"voice": "v2/en_speaker_6", "text": "hi"}', "valid list"),
    ('[{"voice": "v2/en_speaker_6", "text": "hi", "speed": 2}]', "Extra inputs"),
    (json.dumps([{"voice": "v2/en_speaker_6", "text": "hi"}] * 1001), "at most 1000 items"),
    (json.dumps([{"voice": "v2/en_speaker_6", "text": deep(40)}]), "nested more than"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("not json", "not valid JSON"),
])
def test_bad_script_files_exit_2_with_one_line(tiny_ckpt, tmp_path, content, message):
    path = tmp_path / "script.json"
    path.write_text(content)
    res = run_cli("synth", "--script", path, "-o", tmp_path / "x.wav", "--model", tiny_ckpt,
                  "--max-semantic-tokens", "4")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize("args,message", [
    (["hello", "--script", "s.json"], "not both"),
    ([], "give the text to speak"),
    (["--script", "s.json", "--voice", "v2/en_speaker_6"], "--voice and --save-voice do not apply"),
    (["--script", "missing.json"], "No such file"),
])
def test_script_argument_mistakes_exit_2(tiny_ckpt, tmp_path, args, message):
    (tmp_path / "s.json").write_text(json.dumps(SCRIPT))
    args = [str(tmp_path / a) if a.endswith(".json") else a for a in args]
    res = run_cli("synth", *args, "-o", tmp_path / "x.wav", "--model", tiny_ckpt)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert re.search(message, res.stderr), res.stderr

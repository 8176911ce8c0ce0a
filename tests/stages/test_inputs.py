"""Text, voices and checkpoints: what is accepted, and a clear error for everything else."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bark_serve.stages.constants import BarkSpec
from bark_serve.stages.engine import EngineOptions, parse_device, parse_dtype
from bark_serve.stages.longform import split_text
from bark_serve.stages.pipeline import BarkPipeline
from bark_serve.stages.text import TextPreparer, TextTooLongError
from bark_serve.stages.types import (
    CoarseRequest,
    FineRequest,
    GenerationParams,
    InvalidRequestError,
    SamplingParams,
    SemanticRequest,
    VoicePrompt,
)
from bark_serve.stages.voices import UnknownVoiceError, VoiceLibrary, load_npz, save_npz
from bark_serve.stages.weights import Checkpoint, CheckpointError

SPEC = BarkSpec()


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return Checkpoint.open(tiny_ckpt)


@pytest.fixture(scope="module")
def text(ckpt):
    return TextPreparer.from_checkpoint(ckpt)


HARD_TEXTS = ["Hello, my dog is cute [laughter]", "♪ la la ♪", "你好，世界", "Привет, мир", "  spaced   out  ",
              "Café naïve coöperate — e\u0301 (a combining accent)", "[CLS] and [SEP] [MASK] typed as text",
              "emoji 😀👍🏽 and \u200b zero width, \u00a0 no-break", "tab\tand\x07bell and \x00 NUL",
              "日本語のテキストと한국어 텍스트", "ALL CAPS Mixed CaSe", "[music] [sighs] [gasps] ... — ♪"]


def test_text_matches_barkprocessor(ckpt, text):
    """The tokenizer read from tokenizer.json by the tokenizers library (no transformers, no torch: what the
    orchestrator runs) gives BarkProcessor's ids, on text that stresses normalization and added tokens."""
    from transformers import BarkProcessor

    from bark_serve.stages.text import _Backend

    assert isinstance(text.tokenizer, _Backend)
    proc = BarkProcessor.from_pretrained(str(ckpt.local_dir))
    for s in HARD_TEXTS:
        ref = proc(s)
        n = int(ref["attention_mask"].sum())
        np.testing.assert_array_equal(text.encode(s), ref["input_ids"][0, :n].numpy(), err_msg=s)


def test_token_counts_of_long_text_match_transformers_without_truncation(ckpt, text):
    """tokenizer.json may carry a truncation setting; counting a long text must see every token, as
    transformers' encode does (the planner splits text by these counts)."""
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(ckpt.local_dir))
    long = " ".join(HARD_TEXTS) * 12
    assert text.count(long) == len(ref.encode(long, add_special_tokens=False)) > 512


def test_the_tokenizer_falls_back_to_transformers_where_the_file_cannot_be_trusted(tiny_ckpt, tmp_path):
    """No tokenizer.json, or a tokenizer_config.json whose normalizer settings differ from the file's (which
    transformers would apply): transformers builds the tokenizer, and the ids still match it."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from bark_serve.stages.text import _Backend

    for case in ("no-file", "lowercase"):
        ckdir = tmp_path / case
        shutil.copytree(tiny_ckpt, ckdir)
        if case == "no-file":
            (ckdir / "tokenizer.json").unlink()
        else:
            cfg = json.loads((ckdir / "tokenizer_config.json").read_text())
            (ckdir / "tokenizer_config.json").write_text(json.dumps({**cfg, "do_lower_case": True}))
        prep = TextPreparer.from_checkpoint(Checkpoint.open(ckdir))
        assert not isinstance(prep.tokenizer, _Backend), case
        ref = AutoTokenizer.from_pretrained(str(ckdir))
        for s in HARD_TEXTS[:6]:
            assert list(prep.encode(s)) == ref.encode(" ".join(s.split()), add_special_tokens=False), (case, s)


def test_text_errors(text):
    for bad in ["", "   \n\t "]:
        with pytest.raises(InvalidRequestError, match="empty"):
            text.encode(bad)
    with pytest.raises(InvalidRequestError, match="string"):
        text.encode(None)
    with pytest.raises(TextTooLongError, match="at most 256"):
        text.encode("word " * 400)


def test_split_text_respects_limits_and_sentences(text):
    sentences = [f"This is sentence number {i}, and it talks about dogs." for i in range(40)]
    long_text = " ".join(sentences) + " " + "x" * 3000
    segments = split_text(long_text, text.count, 60)
    assert all(text.count(s) <= 60 for s in segments)
    assert segments[0].startswith("This is sentence number 0,") and segments[0].endswith(".")
    assert "".join(s.replace(" ", "") for s in segments) == long_text.replace(" ", "")  # nothing lost
    assert split_text("你好。今天天气很好！我们去公园吧。", text.count, 4)[0] == "你好。"


def test_voice_sources(ckpt, preset_dir, tmp_path):
    lib = VoiceLibrary(ckpt.spec, ckpt, [preset_dir], allow_paths=True)
    hf = lib.resolve("v2/en_speaker_6")  # the checkpoint's speaker_embeddings/ wins over the .npz dir
    assert hf.semantic.shape[0] > 2 and hf.coarse.shape[0] == 2 and hf.fine.shape[0] == 8
    de = lib.resolve("v2/de_speaker_3")
    assert de.name == "v2/de_speaker_3"
    npz = lib.resolve(str(preset_dir / "v2" / "en_speaker_6.npz"))
    assert npz.semantic.shape == (309,) and npz.coarse.shape == (2, 464)
    as_dict = lib.resolve(npz.as_npz_dict())
    np.testing.assert_array_equal(as_dict.fine, npz.fine)
    save_npz(npz, tmp_path / "mine.npz")
    np.testing.assert_array_equal(load_npz(tmp_path / "mine.npz", SPEC).coarse, npz.coarse)
    assert "announcer" in lib.names() and "v2/en_speaker_6" in lib.names()
    assert lib.resolve(None) is None


def test_voice_errors(ckpt, preset_dir, tmp_path):
    lib = VoiceLibrary(ckpt.spec, ckpt, [preset_dir], allow_paths=False)
    with pytest.raises(UnknownVoiceError, match="unknown voice 'v9/nobody'; available: announcer"):
        lib.resolve("v9/nobody")
    with pytest.raises(UnknownVoiceError):  # a server never reads arbitrary paths
        lib.resolve(str(preset_dir / "v2" / "en_speaker_6.npz"))
    with pytest.raises(UnknownVoiceError):
        lib.resolve("../../etc/passwd")
    good = load_npz(preset_dir / "v2" / "en_speaker_6.npz", SPEC).as_npz_dict()
    cases = {
        "lacks fine_prompt": {k: v for k, v in good.items() if k != "fine_prompt"},
        "must have shape \\(2, T\\)": {**good, "coarse_prompt": good["coarse_prompt"][0]},
        "must have shape \\(8, T\\)": {**good, "fine_prompt": good["fine_prompt"][:7]},
        "must hold integers": {**good, "semantic_prompt": good["semantic_prompt"].astype(np.float32)},
        "tokens must be in \\[0, 10000\\)": {**good, "semantic_prompt": good["semantic_prompt"] + 20_000},
        "tokens must be in \\[0, 1024\\)": {**good, "coarse_prompt": -good["coarse_prompt"] - 1},
        "length must be": {**good, "semantic_prompt": good["semantic_prompt"][:1]},
    }
    for message, data in cases.items():
        with pytest.raises(InvalidRequestError, match=message):
            lib.resolve(data)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip file")
    with pytest.raises(InvalidRequestError, match=r"is not an \.npz \(a zip archive") as not_npz:
        load_npz(bad, SPEC)
    assert "pickle" not in str(not_npz.value)  # numpy's own message calls any non-zip bytes pickled data
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, semantic_prompt=np.array([{"evil": 1}], dtype=object), coarse_prompt=good["coarse_prompt"],
             fine_prompt=good["fine_prompt"])
    with pytest.raises(InvalidRequestError, match="without pickles"):
        load_npz(pickled, SPEC)


def test_engines_reject_bad_tensors_alone(tiny_ckpt):
    pipe = BarkPipeline.from_pretrained(str(tiny_ckpt), EngineOptions(capacity=4))
    good_voice = pipe.voices.resolve("announcer")
    bad_voice = VoicePrompt(good_voice.semantic, good_voice.coarse[:1], good_voice.fine)
    sem, coarse, fine = pipe.engines["semantic"], pipe.engines["coarse"], pipe.engines["fine"]
    results = sem.run([
        SemanticRequest("ok", np.array([5, 6, 7]), None, SamplingParams(0.0), None, 5),
        SemanticRequest("float", np.array([5.0, 6.0]), None, SamplingParams(0.0), None, 5),
        SemanticRequest("range", np.array([5, 10**7]), None, SamplingParams(0.0), None, 5),
        SemanticRequest("long", np.arange(300), None, SamplingParams(0.0), None, 5),
    ])
    assert [r.ok for r in results] == [True, False, False, False]
    assert "integers" in str(results[1].error) and "values must be in" in str(results[2].error)
    results = coarse.run([CoarseRequest("bad", np.array([1, 2, 3]), bad_voice, SamplingParams(0.0)),
                          CoarseRequest("ok", np.array([1, 2, 3]), good_voice, SamplingParams(0.0))])
    assert [r.ok for r in results] == [False, True] and "2 rows" in str(results[0].error)
    results = fine.run([FineRequest("bad", np.zeros((3, 5), dtype=np.int64)),
                        FineRequest("ok", np.zeros((2, 5), dtype=np.int64))])
    assert [r.ok for r in results] == [False, True] and results[1].output.shape == (8, 5)


def test_empty_semantic_output_gives_empty_audio(tiny_ckpt):
    pipe = BarkPipeline.from_pretrained(str(tiny_ckpt), EngineOptions(capacity=2))
    coarse = pipe.engines["coarse"].run([CoarseRequest("e", np.zeros((0,), dtype=np.int64))])[0]
    assert coarse.ok and coarse.output.shape == (2, 0)
    fine = pipe.engines["fine"].run([FineRequest("e", coarse.output)])[0]
    assert fine.output.shape == (8, 0)


def test_params_and_options_errors():
    with pytest.raises(InvalidRequestError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(InvalidRequestError, match="min_eos_p"):
        GenerationParams(min_eos_p=0.0)
    with pytest.raises(InvalidRequestError, match="max_semantic_tokens"):
        GenerationParams(max_semantic_tokens=769)
    with pytest.raises(InvalidRequestError, match="unknown dtype"):
        parse_dtype("float8")
    with pytest.raises(InvalidRequestError, match="unknown device|unsupported device"):
        parse_device("tpu")


def test_checkpoint_errors(tiny_ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        Checkpoint.open(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        Checkpoint.open(broken).state_dict("semantic")
    (broken / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="not a Bark config"):
        Checkpoint.open(broken)
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        Checkpoint.open(broken)


def test_a_first_segment_budget_cuts_only_the_first_segment(tiny_ckpt):
    """A long text's first segment is cut to the smaller budget (its audio starts sooner); the rest pack
    as usual, and no word is lost or moved."""
    from bark_serve.stages.longform import split_text
    from bark_serve.stages.text import TextPreparer
    from bark_serve.stages.weights import Checkpoint

    count = TextPreparer.from_checkpoint(Checkpoint.open(tiny_ckpt)).count
    text = ("This opening sentence is rather long, with several clauses, and more words than a first budget allows. "
            "Then a second sentence follows. A third one is here. And the fourth closes the paragraph.")
    plain = split_text(text, count, 40)
    first = split_text(text, count, 40, first_max_tokens=10)
    assert count(plain[0]) > 10 and count(first[0]) <= 10
    assert all(count(s) <= 40 for s in first[1:])
    assert " ".join(first).split() == " ".join(plain).split() == text.split()
    assert split_text("Short.", count, 40, first_max_tokens=10) == ["Short."]
    assert split_text(text, count, 40, first_max_tokens=400) == plain  # a budget above the others changes nothing

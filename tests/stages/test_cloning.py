"""Voice cloning (stages/cloning.py) on tiny random weights made at test time, against references.

- the quantizer against gitmylo's published CustomTokenizer (below), same weights, both versions, files in
  their format with and without ``.info``;
- HuBERT's layer against transformers' full model (``hidden_states[9]``) and a loop written from fairseq's
  ``output_layer`` semantics;
- EnCodec codes against transformers' ``EncodecModel.encode`` on the checkpoint's codec (loaded by transformers'
  own BarkModel), and the prompts' end alignment and 13 s cut against tokens and codes computed directly;
- a voice cloned from audio bark-serve made gives the same greedy tokens passed as arrays, as npz bytes and as
  an .npz path.
"""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from bark_serve.stages.audio_in import resample
from bark_serve.stages.cloning import (
    HUBERT_HIDDEN_STATE,
    MAX_PROMPT_SECONDS,
    CloningUnavailable,
    Quantizer,
    VoiceCloner,
    load_quantizer,
    save_quantizer,
)
from bark_serve.stages.constants import BarkSpec
from bark_serve.stages.random_cloning import QUANTIZER_FILES, make_cloning_weights
from bark_serve.stages.types import InvalidRequestError, VoicePrompt
from bark_serve.stages.voices import voice_from_npz_bytes, voice_npz_bytes

# ---------------------------------------------------------------------------------------------------------------
# The reference: gitmylo's CustomTokenizer and Data, from bark_hubert_quantizer/customtokenizer.py of
# https://github.com/gitmylo/bark-voice-cloning-HuBERT-quantizer (MIT License, Copyright (c) gitmylo), the inference
# half and save/load as published. One change: version 1's intermediate width (their fixed 4096) is a parameter
# with that default, so that tiny random quantizers stay a few MB.


class CustomTokenizer(nn.Module):
    def __init__(self, hidden_size=1024, input_size=768, output_size=10000, version=0, intermediate_size=4096):
        super(CustomTokenizer, self).__init__()
        next_size = input_size
        if version == 0:
            self.lstm = nn.LSTM(input_size, hidden_size, 2, batch_first=True)
            next_size = hidden_size
        if version == 1:
            self.lstm = nn.LSTM(input_size, hidden_size, 2, batch_first=True)
            self.intermediate = nn.Linear(hidden_size, intermediate_size)
            next_size = intermediate_size

        self.fc = nn.Linear(next_size, output_size)
        self.softmax = nn.LogSoftmax(dim=1)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.output_size = output_size
        self.version = version

    def forward(self, x):
        x, _ = self.lstm(x)
        if self.version == 1:
            x = self.intermediate(x)
        x = self.fc(x)
        x = self.softmax(x)
        return x

    @torch.no_grad()
    def get_token(self, x):
        return torch.argmax(self(x), dim=1)

    def save(self, path):
        info_path = '.'.join(os.path.basename(path).split('.')[:-1]) + '/.info'
        torch.save(self.state_dict(), path)
        data_from_model = Data(self.input_size, self.hidden_size, self.output_size, self.version)
        with zipfile.ZipFile(path, 'a') as model_zip:
            model_zip.writestr(info_path, data_from_model.save())
            model_zip.close()

    @staticmethod
    def load_from_checkpoint(path, map_location=None, intermediate_size=4096):
        old = True
        with zipfile.ZipFile(path) as model_zip:
            filesMatch = [file for file in model_zip.namelist() if file.endswith('/.info')]
            file = filesMatch[0] if filesMatch else None
            if file:
                old = False
                data_from_model = Data.load(model_zip.read(file).decode('utf-8'))
            model_zip.close()
        if old:
            model = CustomTokenizer()
        else:
            model = CustomTokenizer(data_from_model.hidden_size, data_from_model.input_size,
                                    data_from_model.output_size, data_from_model.version,
                                    intermediate_size=intermediate_size)
        model.load_state_dict(torch.load(path, map_location=map_location))
        if map_location:
            model = model.to(map_location)
        return model


class Data:
    def __init__(self, input_size=768, hidden_size=1024, output_size=10000, version=0):
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.output_size = output_size
        self.version = version

    @staticmethod
    def load(string):
        data = json.loads(string)
        return Data(data['input_size'], data['hidden_size'], data['output_size'], data['version'])

    def save(self):
        data = {
            'input_size': self.input_size,
            'hidden_size': self.hidden_size,
            'output_size': self.output_size,
            'version': self.version,
        }
        return json.dumps(data)

# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread (conftest restores the count after each test): these tiny models' many small ops are
    several times faster so on a busy 2-core machine, and every comparison here runs in the same setting."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_cloning_weights(tmp_path_factory.mktemp("cloning"), "tiny", seed=0)


@pytest.fixture(scope="module")
def codec_ckpt(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint with EnCodec codebooks placed where its random encoder's outputs lie. The random
    codec's encoder barely varies (a temporal spread of about 0.002 around a fixed point) and its N(0, 1)
    codebooks are far away, so every frame would get the same codes; here the first codebook is centred on
    the encoder's mean and the residual codebooks shrink with the residual, so the codes vary from frame to
    frame and a wrong cut or shift cannot go unnoticed."""
    import shutil

    from safetensors.torch import load_file, save_file

    from bark_serve.stages.cloning import load_encodec
    from bark_serve.stages.weights import Checkpoint

    path = tmp_path_factory.mktemp("codec-ckpt") / "tiny"
    shutil.copytree(tiny_ckpt, path, ignore=shutil.ignore_patterns("model.safetensors"))
    with torch.inference_mode():
        emb = load_encodec(Checkpoint.open(tiny_ckpt), torch.device("cpu")).encoder(
            torch.from_numpy(speechlike(2.0, 24_000, seed=99))[None, None])[0]  # (D, T)
    mean, spread = emb.mean(dim=1), emb.std(dim=1).mean()
    state = load_file(str(tiny_ckpt / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    for k in range(32):
        key = f"codec_model.quantizer.layers.{k}.codebook."
        if key + "embed" not in state:
            break
        embed = (mean if k == 0 else 0.0) + torch.randn(state[key + "embed"].shape, generator=gen) * spread * 0.6 ** k
        state[key + "embed"], state[key + "embed_avg"] = embed.contiguous(), embed.clone()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def cloner(codec_ckpt, weights):
    return VoiceCloner.from_pretrained(str(codec_ckpt), weights["hubert"], weights["quantizer_v1"])


@pytest.fixture(scope="module")
def bark_codec(codec_ckpt):
    """The checkpoint's EnCodec as transformers itself loads it (BarkModel.from_pretrained)."""
    from transformers import BarkModel

    return BarkModel.from_pretrained(str(codec_ckpt)).codec_model.eval()


@pytest.fixture(scope="module")
def full_hubert(weights):
    from transformers import HubertModel

    return HubertModel.from_pretrained(str(weights["hubert"])).eval()


def speechlike(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * rate))) / rate
    phase = 2 * np.pi * np.cumsum(140 + 40 * np.sin(2 * np.pi * 0.4 * t + seed)) / rate
    tone = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3.5 * t) ** 2)
    return (0.2 * tone + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def spread(model: nn.Module) -> nn.Module:
    """N(0, 1/fan_in) weights, zero biases: a random quantizer that gives many different tokens."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, p.shape[1] ** -0.5) if p.dim() >= 2 else p.zero_()
    return model


def features_for(quantizer_input: int, frames: int, seed: int) -> torch.Tensor:
    return torch.randn(frames, quantizer_input, generator=torch.Generator().manual_seed(seed))  # (T, D)


# --- the quantizer ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [0, 1])
def test_quantizer_tokens_equal_the_reference(tmp_path, version):
    """A quantizer written by their save() (with .info) loads with its sizes, and its tokens are theirs."""
    torch.manual_seed(version)
    ref = spread(CustomTokenizer(hidden_size=48, input_size=24, output_size=10000, version=version,
                                 intermediate_size=40))
    path = tmp_path / f"quantifier_v{version}.pth"
    ref.save(str(path))
    ours = load_quantizer(path)
    assert ours.info() == {"input_size": 24, "hidden_size": 48, "output_size": 10000, "version": version}
    features = features_for(24, 200, seed=version)
    expected = ref.get_token(features)  # (T,)
    got = ours.tokens(features[None])[0]  # (T,)
    assert torch.equal(got, expected)
    assert len(torch.unique(expected)) > 20  # a real test: many different tokens


def test_quantizer_without_info_has_version_0_published_sizes(tmp_path):
    """Their v0 files (quantifier_hubert_base_ls960_14.pth) carry no .info: 768 -> 1024 -> 10000, version 0."""
    torch.manual_seed(3)
    ref = spread(CustomTokenizer())  # their defaults
    path = tmp_path / "quantifier_hubert_base_ls960_14.pth"
    torch.save(ref.state_dict(), path)
    ours = load_quantizer(path)
    assert ours.info() == {"input_size": 768, "hidden_size": 1024, "output_size": 10000, "version": 0}
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    features = features_for(768, 60, seed=3)
    assert torch.equal(ours.tokens(features[None])[0], ref.get_token(features))
    legacy = tmp_path / "legacy.pth"  # torch's pre-1.6 format, not a zip: no .info either
    torch.save(ref.state_dict(), legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_quantizer(legacy).tokens(features[None])[0], ref.get_token(features))


def test_published_v1_shapes_load(tmp_path):
    """Version 1 at the published sizes (768 -> 1024 -> 4096 -> 10000), written by their save()."""
    torch.manual_seed(4)
    ref = spread(CustomTokenizer(version=1))
    path = tmp_path / "quantifier_V1_hubert_base_ls960_23.pth"
    ref.save(str(path))
    ours = load_quantizer(path)
    assert ours.info()["version"] == 1 and ours.fc.weight.shape == (10000, 4096)
    features = features_for(768, 40, seed=4)
    assert torch.equal(ours.tokens(features[None])[0], ref.get_token(features))


def test_random_quantizer_files_are_in_the_published_format(weights):
    """make_cloning_weights' files load in their loader (state dict names and shapes, .info) and give our tokens."""
    for version in (0, 1):
        path = weights[f"quantizer_v{version}"]
        assert path.name == QUANTIZER_FILES[version]
        ref = CustomTokenizer.load_from_checkpoint(str(path), intermediate_size=64)
        ours = load_quantizer(path)
        assert (ref.version, ref.input_size, ref.hidden_size, ref.output_size) == (
            version, 32, 64, BarkSpec().semantic_vocab_size)
        features = features_for(32, 120, seed=10 + version)
        assert torch.equal(ours.tokens(features[None])[0], ref.get_token(features))
    assert weights["quantizer"] == weights["quantizer_v1"]
    total = sum(p.stat().st_size for p in weights["hubert"].parent.rglob("*") if p.is_file())
    assert total < 8 << 20, f"tiny cloning weights take {total} bytes"


def test_save_quantizer_without_info_only_for_published_sizes(tmp_path):
    q = Quantizer(16, 32, 10000, version=1, intermediate_size=24)
    path = save_quantizer(q, tmp_path / "mine.pth")
    with zipfile.ZipFile(path) as archive:
        assert json.loads(archive.read("mine/.info")) == q.info()
    assert load_quantizer(path).info() == q.info()


def test_quantizer_files_refused_clearly(tmp_path):
    with pytest.raises(CloningUnavailable, match="does not exist"):
        load_quantizer(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CloningUnavailable, match="not a readable quantizer"):
        load_quantizer(tmp_path / "junk.pth")
    torch.save({"model": CustomTokenizer(32, 16, 100)}, tmp_path / "pickled.pth")  # a pickled module: code
    with pytest.raises(CloningUnavailable, match="not a readable quantizer"):
        load_quantizer(tmp_path / "pickled.pth")
    # .info sizes that do not match the weights
    torch.save(CustomTokenizer(64, 16, 10000).state_dict(), tmp_path / "other.pth")
    data = Data(16, 32, 10000, 0).save()
    with zipfile.ZipFile(tmp_path / "other.pth", "a") as archive:
        archive.writestr("other/.info", data)
    with pytest.raises(CloningUnavailable, match="shape"):
        load_quantizer(tmp_path / "other.pth")


# --- HuBERT ------------------------------------------------------------------------------------------------------

def test_hubert_features_are_fairseq_output_layer_9(cloner, full_hubert):
    """Our features = transformers' hidden_states[9] = fairseq's output_layer=9 (a loop that breaks after the
    9th layer); not a neighbouring layer, not the last one. The waveform goes in unnormalised, as theirs."""
    wav = torch.from_numpy(speechlike(2.0, 16_000))[None]  # (1, N)
    with torch.inference_mode():
        ours = cloner.hubert(wav, output_hidden_states=True).hidden_states[HUBERT_HIDDEN_STATE]  # (1, T, D)
        hidden = full_hubert(wav, output_hidden_states=True).hidden_states
        # fairseq: features -> layer norm + projection -> x + pos_conv(x) -> layer norm -> layers, break at 9 - 1
        x = full_hubert.feature_projection(full_hubert.feature_extractor(wav).transpose(1, 2))
        encoder = full_hubert.encoder
        x = encoder.layer_norm(x + encoder.pos_conv_embed(x))
        for i, layer in enumerate(encoder.layers):
            x = layer(x)
            if i == 9 - 1:
                break
    assert HUBERT_HIDDEN_STATE == 9 and len(hidden) == 13
    assert ours.shape == (1, 99, 32)  # 50 frames a second: floor((32000 - 400) / 320) + 1
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, hidden[9], rtol=0, atol=1e-6)
    for other in (8, 10, 12):
        assert (ours - hidden[other]).abs().max() > 1e-2
    assert len(cloner.hubert.encoder.layers) == 9  # layers 10-12 are never run


# --- EnCodec codes, alignment and cuts ---------------------------------------------------------------------------

def bark_frames(n_semantic: int) -> int:
    """Bark's generate_coarse, verbatim in its arithmetic: coarse tokens for n semantic tokens, / 2 codebooks."""
    semantic_to_coarse_ratio = 75 / 49.9 * 2
    return int(round(np.floor(n_semantic * semantic_to_coarse_ratio / 2) * 2)) // 2


@pytest.mark.parametrize("seconds,rate", [(2.0, 24_000), (3.3, 44_100), (15.2, 16_000)])
def test_prompts_are_codes_and_tokens_computed_directly(cloner, weights, bark_codec, full_hubert, seconds, rate):
    audio = speechlike(seconds, rate, seed=int(seconds))
    voice = cloner.clone(audio, rate)
    # directly: the last 13 s, resampled; HuBERT layer 9 -> their quantizer; transformers' EnCodec at 6 kbps
    kept = audio[-int(round(MAX_PROMPT_SECONDS * rate)):]
    assert len(kept) == min(len(audio), MAX_PROMPT_SECONDS * rate)
    wav16 = torch.from_numpy(resample(kept, rate, 16_000))[None]
    wav24 = torch.from_numpy(resample(kept, rate, 24_000))[None, None]
    ref = CustomTokenizer.load_from_checkpoint(str(weights["quantizer_v1"]), intermediate_size=64)
    with torch.inference_mode():
        tokens = ref.get_token(full_hubert(wav16, output_hidden_states=True).hidden_states[9][0]).numpy()
        codes = bark_codec.encode(wav24, bandwidth=6.0).audio_codes[0, 0].numpy()  # (8, T_e)
    assert codes.shape == (8, -(-wav24.shape[-1] // 320))
    n_sem, n_frames = len(voice.semantic), voice.fine.shape[1]
    assert n_frames == bark_frames(n_sem) <= codes.shape[1]  # Bark's pairing of the two lengths
    assert n_sem == len(tokens) or bark_frames(n_sem + 1) > codes.shape[1]  # as many tokens as fit
    assert len(tokens) - n_sem <= 1 and codes.shape[1] - n_frames <= 2  # little is lost at the start
    np.testing.assert_array_equal(voice.semantic, tokens[-n_sem:])  # end-aligned
    np.testing.assert_array_equal(voice.fine, codes[:, -n_frames:])
    np.testing.assert_array_equal(voice.coarse, codes[:2, -n_frames:])
    assert n_frames / 75 <= MAX_PROMPT_SECONDS + 0.02 and n_frames / 75 >= min(seconds, MAX_PROMPT_SECONDS) - 0.05
    assert voice.semantic.dtype == voice.coarse.dtype == voice.fine.dtype == np.int64
    assert all(len(np.unique(row)) > 5 for row in voice.fine) and len(np.unique(voice.semantic)) > 5


def test_clone_batch_equals_one_by_one(cloner):
    clips = [(speechlike(2.0, 24_000, 1), 24_000), (speechlike(2.0, 24_000, 2), 24_000),
             (speechlike(3.3, 44_100, 3), 44_100), (speechlike(14.0, 16_000, 4), 16_000),
             (speechlike(20.0, 16_000, 5), 16_000)]  # 1 and 2 of equal length, and so 4 and 5 after the cut
    batch = cloner.clone_batch(clips, names=["a", "b", "c", "d", "e"])
    assert [v.name for v in batch] == ["a", "b", "c", "d", "e"]
    for (audio, rate), voice in zip(clips, batch):
        alone = cloner.clone(audio, rate)
        for key in ("semantic", "coarse", "fine"):
            np.testing.assert_array_equal(getattr(voice, key), getattr(alone, key))
    assert not np.array_equal(batch[0].fine, batch[1].fine)
    with pytest.raises(InvalidRequestError, match="NaN"):  # one bad clip fails the call before any work
        cloner.clone_batch([clips[0], (np.full(24_000, np.inf, dtype=np.float32), 24_000)])


def test_encodec_encodes_without_tf32_convolutions(cloner, monkeypatch):
    """On CUDA cuDNN runs float32 convolutions in TF32 by default, and the codeword search then flips codes near
    ties: a voice cloned on a GPU differed from the same clip cloned on a CPU. The encode runs with cuDNN's TF32
    off, and the setting is as it was afterwards."""
    encode, seen = cloner.codec.encode, []

    def spy(*args, **kwargs):
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cudnn.enabled))
        return encode(*args, **kwargs)

    before = (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark)
    monkeypatch.setattr(cloner.codec, "encode", spy)
    cloner.clone(speechlike(2.0, 24_000, 7), 24_000)
    assert seen == [(False, before[1])]
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark) == before


def test_overlapping_encodes_keep_tf32_off_until_the_last_one_ends():
    """Clones run in several threads at once: one encode ending must not turn TF32 back on under another."""
    from bark_serve.stages.cloning import EXACT_CONVOLUTIONS

    before = torch.backends.cudnn.allow_tf32
    first, second = EXACT_CONVOLUTIONS, EXACT_CONVOLUTIONS
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert torch.backends.cudnn.allow_tf32 is False
    second.__exit__(None, None, None)
    assert torch.backends.cudnn.allow_tf32 == before


def test_clone_refuses_bad_samples(cloner):
    with pytest.raises(InvalidRequestError, match="NaN"):
        cloner.clone(np.full(24_000, np.nan, dtype=np.float32), 24_000)
    with pytest.raises(InvalidRequestError, match="sample rate"):
        cloner.clone(speechlike(2.0, 8_000), 8_000)
    with pytest.raises(InvalidRequestError, match="mono"):
        cloner.clone(np.zeros((2, 24_000), dtype=np.float32), 24_000)


# --- npz, and the whole loop through the pipeline -------------------------------------------------------------

def test_npz_bytes_round_trip_and_refusals(cloner):
    spec = BarkSpec()
    voice = cloner.clone(speechlike(2.0, 24_000), 24_000)
    data = voice_npz_bytes(voice)
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        assert sorted(npz.files) == ["coarse_prompt", "fine_prompt", "semantic_prompt"]
        assert npz["fine_prompt"].dtype == np.int32  # Bark's own presets' dtypes
    back = voice_from_npz_bytes(data, spec, name="me")
    assert back.name == "me"
    for key in ("semantic", "coarse", "fine"):
        np.testing.assert_array_equal(getattr(back, key), getattr(voice, key))
    with pytest.raises(InvalidRequestError, match="npz"):
        voice_from_npz_bytes(b"garbage", spec)
    buf = io.BytesIO()
    np.savez(buf, semantic_prompt=np.array([object()], dtype=object), coarse_prompt=voice.coarse,
             fine_prompt=voice.fine)
    with pytest.raises(InvalidRequestError, match="pickle"):
        voice_from_npz_bytes(buf.getvalue(), spec)
    buf = io.BytesIO()
    np.savez(buf, semantic_prompt=voice.semantic, coarse_prompt=voice.coarse)
    with pytest.raises(InvalidRequestError, match="lacks fine_prompt"):
        voice_from_npz_bytes(buf.getvalue(), spec)
    buf = io.BytesIO()
    np.savez(buf, semantic_prompt=np.zeros(100_000, dtype=np.int64), coarse_prompt=voice.coarse,
             fine_prompt=voice.fine)
    with pytest.raises(InvalidRequestError, match="bigger arrays"):
        voice_from_npz_bytes(buf.getvalue(), spec)


def test_cloned_voice_same_tokens_by_arrays_bytes_and_path(pipe, cloner, tmp_path):
    """Audio bark-serve made, encoded as a file, decoded as an upload, cloned; the voice speaks the same
    greedy tokens whether passed as arrays, as a VoicePrompt read back from npz bytes, or as an .npz path."""
    from bark_serve.stages.audio_in import decode_clip
    from bark_serve.stages.encoders import encode
    from bark_serve.stages.types import GenerationParams

    made = pipe.synthesize("A voice to clone, spoken by the tiny model.", "v2/en_speaker_6",
                           GenerationParams.greedy(max_semantic_tokens=110))
    audio, rate = decode_clip(encode(made.audio, made.sample_rate, "flac"), max_bytes=10 << 20, max_s=60)
    voice = cloner.clone(audio, rate)
    assert voice.fine.shape[1] >= 150  # at least 2 s of prompt
    path = tmp_path / "cloned.npz"
    path.write_bytes(voice_npz_bytes(voice))
    params = GenerationParams.greedy(max_semantic_tokens=40)
    text = "Now say something new."
    by_arrays = pipe.synthesize(text, voice.as_npz_dict(), params)
    by_bytes = pipe.synthesize(text, voice_from_npz_bytes(path.read_bytes(), pipe.spec), params)
    by_path = pipe.synthesize(text, str(path), params)
    for other in (by_bytes, by_path):
        np.testing.assert_array_equal(other.semantic, by_arrays.semantic)
        np.testing.assert_array_equal(other.coarse, by_arrays.coarse)
        np.testing.assert_array_equal(other.fine, by_arrays.fine)
        np.testing.assert_array_equal(other.audio, by_arrays.audio)
    without = pipe.synthesize(text, None, params)
    assert not np.array_equal(without.coarse, by_arrays.coarse)  # the voice was used


# --- loading failures -----------------------------------------------------------------------------------------

def test_cloning_unavailable_when_models_are_missing(tiny_ckpt, weights, tmp_path, monkeypatch):
    with pytest.raises(CloningUnavailable, match="quantizer"):
        VoiceCloner.from_pretrained(str(tiny_ckpt), weights["hubert"], tmp_path / "nowhere.pth")
    with pytest.raises(CloningUnavailable, match="HuBERT"):
        VoiceCloner.from_pretrained(str(tiny_ckpt), tmp_path, weights["quantizer"])  # a directory without a model
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the hub unreachable, nothing cached
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CloningUnavailable, match="HuBERT 'nobody-here/no-such-hubert'"):
        VoiceCloner.from_pretrained(str(tiny_ckpt), "nobody-here/no-such-hubert", weights["quantizer"])
    with pytest.raises(CloningUnavailable, match="cannot fetch quantizer"):
        VoiceCloner.from_pretrained(str(tiny_ckpt), weights["hubert"], "nobody-here/no-such-repo/q.pth")
    small = Quantizer(48, 64, 10000)  # features of another width than the tiny HuBERT's 32
    save_quantizer(small, tmp_path / "wide.pth")
    with pytest.raises(CloningUnavailable, match="do not belong together"):
        VoiceCloner.from_pretrained(str(tiny_ckpt), weights["hubert"], tmp_path / "wide.pth")


def test_cloning_unavailable_without_codec_encoder(tiny_ckpt, weights, tmp_path):
    """A Bark checkpoint whose codec lacks the encoder (only the decoder is needed to speak) cannot clone."""
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "no-encoder"
    shutil.copytree(tiny_ckpt, ckpt, ignore=shutil.ignore_patterns("model.safetensors"))
    state = load_file(str(tiny_ckpt / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("codec_model.encoder.")},
              str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CloningUnavailable, match="no EnCodec encoder"):
        VoiceCloner.from_pretrained(str(ckpt), weights["hubert"], weights["quantizer"])


def test_voice_prompt_type_is_returned(cloner):
    voice = cloner.clone(speechlike(1.0, 48_000), 48_000, name="one-second")
    assert isinstance(voice, VoicePrompt) and voice.name == "one-second"
    assert len(voice.semantic) >= 40

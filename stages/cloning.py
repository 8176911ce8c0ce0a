"""Voice cloning: a recording -> a Bark voice (semantic, coarse and fine prompts).

The community's method (gitmylo/bark-voice-cloning-HuBERT-quantizer), made exact:

- **Semantic prompt**: HuBERT base features at 16 kHz (their ``CustomHubert``: fairseq ``hubert_base_ls960``,
  ``output_layer=9``, features only, no masking) through their quantizer (``CustomTokenizer``: a 2-layer LSTM,
  in version 1 a Linear to 4096, a Linear to Bark's 10000 semantic tokens, argmax per frame). HuBERT here is
  transformers' ``HubertModel`` in the Hugging Face layout; fairseq's ``output_layer=9`` stops after its 9th
  transformer layer, which is ``hidden_states[9]`` (:data:`HUBERT_HIDDEN_STATE`; see there). The waveform goes
  in as it is, in [-1, 1]: their code does not normalise it (fairseq's base model was trained without; its
  first convolution's group norm over time makes the features nearly indifferent to gain and offset anyway).
- **Coarse and fine prompts**: EnCodec 24 kHz at 6 kbps (8 codebooks at 75 Hz), transformers'
  ``EncodecModel.encode`` with the Bark checkpoint's own codec weights: the 8 codebooks are ``fine_prompt``,
  the first 2 ``coarse_prompt``.

**Long audio.** Only the last :data:`MAX_PROMPT_SECONDS` (13 s) of a clip are encoded. Bark continues a voice
from the end of its prompt (each stage reads the prompt's tail: the last 256 semantic tokens, 630 coarse
tokens, 512 fine frames), so the end of the recording is what matters, and a recording that ends cleanly (a
sentence's end) keeps that ending. 13 s covers every tail Bark reads with room to spare (Bark's own presets
hold 6-8 s).

**Alignment.** HuBERT gives 50 frames a second, EnCodec 75; Bark pairs ``n`` semantic tokens with
``floor(n * 75 / 49.9)`` coarse frames (its ``generate_coarse``), and reads both histories from their ends. So
the prompts are end-aligned: ``T_s`` is the most semantic tokens (at most all HuBERT frames) whose Bark
frame count ``T_c = floor(T_s * 75 / 49.9)`` fits in the EnCodec frames, and the prompts are the last ``T_s``
tokens and the last ``T_c`` frames.

**Batches** run clip by clip. Batching is exact only in exact arithmetic: clips of different lengths would
need padding, which HuBERT base's first group norm (over time) would see, and even equal-length clips go
through batched convolutions and GEMMs that round differently from one clip's, so near-ties of EnCodec's
nearest-codeword search or the quantizer's argmax flip (measured: 2 of 296 codes of a batch of two differed on
CPU). A voice must not depend on what it was cloned beside, as no request's tokens depend on its batch.
"""

from __future__ import annotations

import json
import os
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .audio_in import check_clip, resample
from .constants import BarkSpec
from .engine import EngineOptions
from .types import CheckpointError, CloningUnavailable, InvalidRequestError, VoicePrompt
from .voices import validate_voice
from .weights import HUBERT_HUB_ID, QUANTIZER_HUB_FILE, Checkpoint, hub_reachable, load_module

# fairseq's HubertModel(output_layer=9) runs the encoder with tgt_layer = 9 - 1 and breaks out of its layer
# loop after layer index 8, the 9th layer (the base model is post-norm: no final layer norm either way).
# transformers' hidden_states[0] is the input of layer 0 (after the positional convolution and the layer
# norm) and hidden_states[i] the output of the i-th layer, so the same tensor is hidden_states[9].
HUBERT_OUTPUT_LAYER = 9
HUBERT_HIDDEN_STATE = HUBERT_OUTPUT_LAYER
HUBERT_SAMPLE_RATE = 16_000
ENCODEC_BANDWIDTH = 6.0  # kbps: 8 codebooks of 1024 at 75 Hz
MAX_PROMPT_SECONDS = 13.0
MIN_CLONE_SECONDS = 0.1  # enough frames for a valid prompt; uploads are held to decode_clip's min_s (1 s)
DEFAULT_HUBERT = HUBERT_HUB_ID
DEFAULT_QUANTIZER = QUANTIZER_HUB_FILE  # hub repo + file
V0_SIZES = {"input_size": 768, "hidden_size": 1024, "output_size": 10_000}  # a checkpoint without .info
V1_INTERMEDIATE = 4096  # their version 1's fixed width (random tiny quantizers use less; read from the weights)
WEIGHTS_HINT = ("give a local HuBERT directory and quantizer file, or random ones with the same layout "
                "(bark_serve.stages.random_cloning.make_cloning_weights)")


class Quantizer(nn.Module):
    """gitmylo's ``CustomTokenizer`` (inference half), with its parameter names: HuBERT features -> tokens."""

    def __init__(self, input_size: int = 768, hidden_size: int = 1024, output_size: int = 10_000, version: int = 0,
                 intermediate_size: int = V1_INTERMEDIATE):
        super().__init__()
        if version not in (0, 1):
            raise ValueError(f"quantizer version must be 0 or 1, got {version}")
        self.input_size, self.hidden_size, self.output_size = input_size, hidden_size, output_size
        self.version = version
        self.lstm = nn.LSTM(input_size, hidden_size, 2, batch_first=True)
        self.intermediate = nn.Linear(hidden_size, intermediate_size) if version == 1 else None
        self.fc = nn.Linear(intermediate_size if version == 1 else hidden_size, output_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, T, input_size) -> log-probabilities (B, T, output_size)"""
        x, _ = self.lstm(features)  # (B, T, hidden)
        if self.intermediate is not None:
            x = self.intermediate(x)  # (B, T, 4096)
        return torch.log_softmax(self.fc(x), dim=-1)  # (B, T, V)

    @torch.inference_mode()
    def tokens(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, T, input_size) -> semantic tokens (B, T), the argmax per frame."""
        return self(features).argmax(dim=-1)

    def info(self) -> dict[str, int]:
        return {"input_size": self.input_size, "hidden_size": self.hidden_size, "output_size": self.output_size,
                "version": self.version}


def load_quantizer(path: str | os.PathLike) -> Quantizer:
    """A quantizer in the published format: a torch.save'd state dict (a zip) with an optional ``<name>/.info``
    JSON of its sizes and version (none: version 0's 768/1024/10000). Read without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise CloningUnavailable(f"quantizer file {str(path)!r} does not exist")
    try:
        sizes = _quantizer_info(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any file at all may be named here: whatever the reader trips on (an IndexError too)
        raise CloningUnavailable(f"quantizer {str(path)!r} is not a readable quantizer checkpoint: "
                                 f"{str(exc)[:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CloningUnavailable(f"quantizer {str(path)!r} does not hold a state dict of tensors")
    if sizes["version"] not in (0, 1):
        raise CloningUnavailable(f"quantizer {str(path)!r}: unknown version {sizes['version']} (0 and 1 are known)")
    width = state["intermediate.weight"].shape[0] if "intermediate.weight" in state else V1_INTERMEDIATE
    try:
        return load_module(lambda: Quantizer(**sizes, intermediate_size=width), state, torch.float32,
                           torch.device("cpu"))
    except CheckpointError as exc:
        raise CloningUnavailable(f"quantizer {str(path)!r} (version {sizes['version']}, sizes {sizes}): "
                                 f"{exc}") from None


def _quantizer_info(path: Path) -> dict[str, int]:
    """The sizes and version in the checkpoint's ``*/.info`` entry, as their loader reads it (the first entry
    named so, wherever it is); a file without one, or no zip at all (torch's legacy format), is version 0."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = [n for n in archive.namelist() if n.endswith("/.info")]
            if not infos:
                return dict(V0_SIZES, version=0)
            data = json.loads(archive.read(infos[0]).decode("utf-8"))
    except zipfile.BadZipFile:
        return dict(V0_SIZES, version=0)
    if not isinstance(data, dict):
        raise ValueError(".info is not a JSON object")
    return {k: int(data[k]) for k in ("input_size", "hidden_size", "output_size", "version")}


def save_quantizer(quantizer: Quantizer, path: str | os.PathLike, info: bool = True) -> Path:
    """Write ``quantizer`` as their ``CustomTokenizer.save`` does (state dict, then ``<file stem>/.info``)."""
    path = Path(path)
    torch.save(quantizer.state_dict(), path)
    if info:
        with zipfile.ZipFile(path, "a") as archive:
            archive.writestr(f"{path.name.rsplit('.', 1)[0]}/.info", json.dumps(quantizer.info()))
    return path


def resolve_quantizer(name: str | os.PathLike) -> Path:
    """A local quantizer file, or ``owner/repo/file.pth`` on the hub (fetched once, then from the cache)."""
    path = Path(name).expanduser()
    if path.exists() or os.fspath(name).count("/") != 2:
        return path
    from huggingface_hub import hf_hub_download

    owner, repo, filename = os.fspath(name).split("/")
    try:
        return Path(hf_hub_download(f"{owner}/{repo}", filename, local_files_only=not hub_reachable()))
    except Exception as exc:  # offline and not cached, no such repo or file, network errors: all one answer
        raise CloningUnavailable(f"cannot fetch quantizer {os.fspath(name)!r} (no such local file, and the hub "
                                 f"file is unavailable: {type(exc).__name__}); {WEIGHTS_HINT}") from None


def load_hubert(name: str | os.PathLike, device: torch.device, dtype: torch.dtype) -> Any:
    """transformers' HubertModel (a local HF directory or a hub id), cut after layer 9: nothing later is read."""
    from transformers import HubertModel

    path = Path(name).expanduser()
    local = path.is_dir()
    if not local and path.exists():
        raise CloningUnavailable(f"hubert {os.fspath(name)!r} is a file; give a Hugging Face model directory "
                                 "(config.json + model.safetensors) or a hub id")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar on a server's or the CLI's stderr
    try:
        model: Any = HubertModel.from_pretrained(str(path) if local else os.fspath(name),
                                                 local_files_only=local or not hub_reachable())
    except (OSError, ValueError) as exc:
        raise CloningUnavailable(f"cannot load HuBERT {os.fspath(name)!r}: {str(exc).splitlines()[0][:300]} "
                                 f"({WEIGHTS_HINT})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if model.config.num_hidden_layers < HUBERT_OUTPUT_LAYER:
        raise CloningUnavailable(f"HuBERT {os.fspath(name)!r} has {model.config.num_hidden_layers} layers; the "
                                 f"quantizer reads layer {HUBERT_OUTPUT_LAYER}")
    model.encoder.layers = model.encoder.layers[:HUBERT_OUTPUT_LAYER]
    model.config.num_hidden_layers = HUBERT_OUTPUT_LAYER
    model.to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


def load_encodec(ckpt: Checkpoint, device: torch.device) -> Any:
    """The Bark checkpoint's EnCodec, encoder included, as transformers' EncodecModel (float32: the nearest-
    codeword search of its quantizer picks other codes in half precision)."""
    from transformers import EncodecConfig, EncodecModel

    legacy = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}
    state = {}
    for key, value in ckpt.state_dict("codec").items():
        head, _, leaf = key.rpartition(".")
        state[f"{head}.{legacy[leaf]}" if leaf in legacy else key] = value
    if not any(k.startswith("encoder.") for k in state):
        raise CloningUnavailable(f"checkpoint {ckpt.name!r} holds no EnCodec encoder weights (codec_model.encoder.*)")
    config = EncodecConfig(**ckpt.submodel_config("codec"))
    return load_module(lambda: EncodecModel(config), state, torch.float32, device, on_meta=False)


class _ExactConvolutions:
    """cuDNN convolutions in full float32 while any thread is inside (``with EXACT_CONVOLUTIONS:``).

    On CUDA cuDNN runs float32 convolutions in TF32 by default (a 10-bit mantissa), and EnCodec's codeword
    search then picks other codes near ties, as in half precision (``load_encodec``): a voice cloned on a GPU
    differed from the same clip cloned on a CPU. The setting is process-wide and the voice encoder clones in
    several threads at once (``asyncio.to_thread``), so ``torch.backends.cudnn.flags`` (save, set, restore on
    exit) could restore TF32 under another thread's encode: here the first thread in turns it off and the last
    one out restores it. Every other cuDNN setting is left alone; matmuls keep torch's default (no TF32). No
    effect off CUDA."""

    def __init__(self):
        self._lock = threading.Lock()
        self._inside = 0
        self._saved = True

    def __enter__(self) -> None:
        with self._lock:
            if self._inside == 0:
                self._saved = torch.backends.cudnn.allow_tf32
                torch.backends.cudnn.allow_tf32 = False
            self._inside += 1

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._inside -= 1
            if self._inside == 0:
                torch.backends.cudnn.allow_tf32 = self._saved


EXACT_CONVOLUTIONS = _ExactConvolutions()


def coarse_frames(n_semantic: int, spec: BarkSpec) -> int:
    """Coarse frames Bark's generate_coarse pairs with ``n_semantic`` tokens: floor(n * 75 / 49.9)."""
    return int(np.floor(n_semantic * spec.semantic_to_coarse_ratio / spec.n_coarse_codebooks))


def align_prompt(semantic: np.ndarray, codes: np.ndarray, spec: BarkSpec, name: str | None = None) -> VoicePrompt:
    """HuBERT tokens (T_h,) and EnCodec codes (8, T_e) of one clip -> end-aligned prompts (module docstring)."""
    n_sem = len(semantic)
    while n_sem > 0 and coarse_frames(n_sem, spec) > codes.shape[1]:
        n_sem -= 1
    n_frames = coarse_frames(n_sem, spec)
    if n_sem < 2 or n_frames < 2:
        raise InvalidRequestError("the audio is too short to clone a voice from")
    fine = codes[:, codes.shape[1] - n_frames:]  # (8, T_c)
    data = {"semantic_prompt": semantic[-n_sem:], "coarse_prompt": fine[: spec.n_coarse_codebooks],
            "fine_prompt": fine}
    return validate_voice(data, spec, name)


class VoiceCloner:
    """HuBERT + quantizer + EnCodec in one process: clips in, :class:`VoicePrompt` s out."""

    def __init__(self, hubert: Any, quantizer: Quantizer, codec: Any, spec: BarkSpec,
                 device: torch.device, dtype: torch.dtype):
        hidden = hubert.config.hidden_size
        if quantizer.input_size != hidden:
            raise CloningUnavailable(f"the quantizer reads {quantizer.input_size}-wide features, but HuBERT gives "
                                     f"{hidden}: they do not belong together")
        if quantizer.output_size > spec.semantic_vocab_size:
            raise CloningUnavailable(f"the quantizer has {quantizer.output_size} tokens; the checkpoint's semantic "
                                     f"vocabulary has {spec.semantic_vocab_size}")
        self.hubert, self.codec, self.spec = hubert, codec, spec
        self.quantizer: Quantizer = quantizer.to(device)
        self.device, self.dtype = device, dtype
        self.codec_rate = int(codec.config.sampling_rate)

    @classmethod
    def from_pretrained(cls, checkpoint: str | os.PathLike | Checkpoint, hubert: str | os.PathLike = DEFAULT_HUBERT,
                        quantizer: str | os.PathLike = DEFAULT_QUANTIZER,
                        options: EngineOptions = EngineOptions()) -> "VoiceCloner":
        """Load from a Bark checkpoint (its codec), a HuBERT directory or hub id and a quantizer file (or
        ``owner/repo/file``); HuBERT runs in ``options``' device and dtype (resolved, not "auto"), the rest in
        float32."""
        if options.torch_threads:
            torch.set_num_threads(options.torch_threads)
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.open(checkpoint)
        device, dtype = options.torch_device(), options.torch_dtype()
        quant = load_quantizer(resolve_quantizer(quantizer))
        return cls(load_hubert(hubert, device, dtype), quant, load_encodec(ckpt, device), ckpt.spec, device, dtype)

    def clone(self, audio: np.ndarray, sample_rate: int, name: str | None = None) -> VoicePrompt:
        """One clip (mono float samples) -> its voice."""
        return self.clone_batch([(audio, sample_rate)], [name])[0]

    def clone_batch(self, clips: Sequence[tuple[np.ndarray, int]],
                    names: Sequence[str | None] | None = None) -> list[VoicePrompt]:
        """Several clips, each exactly as :meth:`clone` makes it (one by one: see "Batches" above). Every clip
        is checked before any is encoded, so one bad clip fails the call before the work starts."""
        names = list(names) if names is not None else [None] * len(clips)
        inputs = [self._prepare(audio, rate) for audio, rate in clips]
        out = []
        for (wav16, wav24), name in zip(inputs, names):
            tokens, codes = self._encode(wav16, wav24)
            out.append(align_prompt(tokens, codes, self.spec, name))
        return out

    def _prepare(self, audio: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
        """The last MAX_PROMPT_SECONDS of a clip, at 16 kHz (HuBERT) and at the codec's 24 kHz."""
        audio = check_clip(audio, sample_rate, min_s=MIN_CLONE_SECONDS)
        audio = audio[-int(round(MAX_PROMPT_SECONDS * sample_rate)):]
        return resample(audio, sample_rate, HUBERT_SAMPLE_RATE), resample(audio, sample_rate, self.codec_rate)

    @torch.inference_mode()
    def _encode(self, wav16: np.ndarray, wav24: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One clip at 16 and 24 kHz -> semantic tokens (T_h,) and EnCodec codes (8, T_e)."""
        x16 = torch.from_numpy(wav16)[None].to(self.device, self.dtype)  # (1, N16)
        features = self.hubert(x16, output_hidden_states=True).hidden_states[HUBERT_HIDDEN_STATE]  # (1, T_h, D)
        tokens = self.quantizer.tokens(features.float())[0]  # (T_h,)
        x24 = torch.from_numpy(wav24)[None, None].to(self.device)  # (1, 1, N24)
        with EXACT_CONVOLUTIONS:
            codes = self.codec.encode(x24, bandwidth=ENCODEC_BANDWIDTH).audio_codes[0, 0]  # (8, T_e)
        return tokens.cpu().numpy().astype(np.int64), codes.cpu().numpy().astype(np.int64)

    def sizes(self) -> dict[str, int]:
        """Parameter counts and shapes (the benchmark's report)."""
        def count(m: nn.Module) -> int:
            return sum(p.numel() for p in m.parameters())

        return {"hubert_params": count(self.hubert), "hubert_hidden": int(self.hubert.config.hidden_size),
                "hubert_layers_run": len(self.hubert.encoder.layers), "quantizer_params": count(self.quantizer),
                "quantizer_version": self.quantizer.version, "codec_params": count(self.codec)}

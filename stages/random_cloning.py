"""Random-weight voice-cloning models in the published layouts, for hosts without the hub (tests, CI, demos).

``make_cloning_weights`` writes beside a random Bark checkpoint (stages/random_checkpoint.py):

- ``hubert/``: transformers' HubertModel (config.json + model.safetensors, ``save_pretrained``);
- ``quantizer/quantifier_hubert_base_ls960_14.pth`` (version 0) and
  ``quantizer/quantifier_V1_hubert_base_ls960_23.pth`` (version 1): gitmylo's quantizer format, a torch.save'd
  state dict with its ``<name>/.info`` sizes (version 0 at the published sizes has none, like theirs).

``small`` and ``large`` have the real shapes (HuBERT base: 768 wide, 12 layers, about 95 M parameters; the
quantizers 768 -> 1024 -> (4096) -> 10000). ``tiny`` keeps every structural feature (12 layers, the 7
convolutions of stride 320 that give 50 frames a second, both quantizer versions) at a few MB in all. The
weights are random: the voices they clone are noise, but every path of cloning runs on them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .cloning import V0_SIZES, V1_INTERMEDIATE, Quantizer, save_quantizer
from .constants import BarkSpec

QUANTIZER_FILES = {0: "quantifier_hubert_base_ls960_14.pth", 1: "quantifier_V1_hubert_base_ls960_23.pth"}
# HubertConfig overrides per size (the defaults are HuBERT base's, facebook/hubert-base-ls960), and the
# quantizers' (hidden, version-1 intermediate) widths; their input width is HuBERT's hidden size.
HUBERT_SIZES: dict[str, dict] = {
    "tiny": {"hidden_size": 32, "num_hidden_layers": 12, "num_attention_heads": 2, "intermediate_size": 64,
             "conv_dim": (16,) * 7, "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2},
    "small": {},
    "large": {},  # Bark's large model uses the same HuBERT base
}
QUANTIZER_SIZES = {"tiny": (64, 64), "small": (V0_SIZES["hidden_size"], V1_INTERMEDIATE),
                   "large": (V0_SIZES["hidden_size"], V1_INTERMEDIATE)}


def hubert_config(size: str):
    from transformers import HubertConfig

    return HubertConfig(**HUBERT_SIZES[size])


def spread_weights(module: torch.nn.Module) -> None:
    """Weights N(0, 1/fan_in) and zero biases (from the current torch seed): PyTorch's default LSTM and Linear
    init leaves the biases dominant, and a random quantizer would give one token for nearly every frame; a
    trained one gives many. These give hundreds for a few hundred frames."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
            else:
                p.zero_()


def make_cloning_weights(directory: str | Path, size: str = "tiny", seed: int = 0) -> dict[str, Path]:
    """Write a random HuBERT and random quantizers of both versions under ``directory``.

    Returns their paths: ``hubert`` (the model directory), ``quantizer_v0``, ``quantizer_v1`` and
    ``quantizer`` (the default one: version 1, the published quantizer trained longest, which the served
    config's ``voice_cloning`` also defaults to).
    """
    from transformers import HubertModel

    if size not in HUBERT_SIZES:
        raise ValueError(f"size must be one of {', '.join(HUBERT_SIZES)}, got {size!r}")
    directory = Path(directory)
    (directory / "quantizer").mkdir(parents=True, exist_ok=True)
    config = hubert_config(size)
    with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's generator
        torch.manual_seed(seed)
        hubert = HubertModel(config).eval()
        hubert.save_pretrained(str(directory / "hubert"), safe_serialization=True)
        hidden, intermediate = QUANTIZER_SIZES[size]
        out = {"hubert": directory / "hubert"}
        for version, filename in QUANTIZER_FILES.items():
            quantizer = Quantizer(config.hidden_size, hidden, BarkSpec().semantic_vocab_size, version,
                                  intermediate_size=intermediate)
            spread_weights(quantizer)
            published_sizes = quantizer.info() == dict(V0_SIZES, version=0)
            out[f"quantizer_v{version}"] = save_quantizer(quantizer, directory / "quantizer" / filename,
                                                          info=not published_sizes)
    out["quantizer"] = out["quantizer_v1"]
    return out

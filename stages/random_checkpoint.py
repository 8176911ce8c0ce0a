"""Random-weight Bark checkpoints in the exact Hugging Face layout.

Real weights cannot be downloaded everywhere (CI has no hub), so tests and
benchmarks write their own checkpoints with transformers' own Bark classes:
config.json, generation_config.json (the hub's shape, sub-configs as dicts),
model.safetensors, a real BERT WordPiece tokenizer trained on a small
multilingual corpus, and speaker_embeddings/ presets. ``small`` and ``large``
have the shapes of suno/bark-small and suno/bark.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch

from .constants import BarkSpec


class _Size(TypedDict):
    gpt: tuple[int, int, int]
    codec: tuple[int, int, int]
    vocab: int


# (hidden, layers, heads) of the three GPTs; the codec's (hidden_size, num_filters, lstm layers).
SIZES: dict[str, _Size] = {
    "tiny": {"gpt": (32, 2, 2), "codec": (32, 4, 1), "vocab": 2000},
    "small": {"gpt": (768, 12, 12), "codec": (128, 32, 2), "vocab": 8000},
    "large": {"gpt": (1024, 24, 16), "codec": (128, 32, 2), "vocab": 8000},
}
# Every preset the default OpenAI voice aliases name (serving/config.py) is here. New names go at the
# end: presets are drawn in this order from one generator, so earlier ones stay the same.
PRESETS = ("announcer", "v2/en_speaker_0", "v2/en_speaker_1", "v2/en_speaker_6", "v2/de_speaker_3", "v2/zh_speaker_1",
           "v2/en_speaker_2", "v2/en_speaker_3", "v2/en_speaker_9", "v2/en_speaker_4", "v2/en_speaker_5",
           "v2/en_speaker_7", "v2/en_speaker_8")
WEIGHT_STD = 0.2  # peakier attention than 0.02, so outputs depend on the text and the voice
# End of speech on random weights (see _tune_semantic_eos): one residual dimension of the semantic
# GPT is a clock that counts generated tokens, set back by the share of text tokens; the EOS logit reads it.
EOS_CLOCK_TOKENS = 100.0  # the clock gains one unit (the residual's spread) per this many generated tokens
EOS_TEXT_GAIN = 10.0      # how far back the share of text tokens sets the clock
EOS_TARGET_TOKENS = 180   # where P(EOS) should cross min_eos_p for a short (8-token) text
EOS_MIN_P = 0.2           # Bark's default min_eos_p, the threshold the tuning aims at
CORPUS = Path(__file__).parent / "data" / "tokenizer_corpus.txt"
# Bumped whenever a seed starts to write other files (2: the codec's draws seeded and the vocabulary learnt
# the same in every process), so that caches of made checkpoints (bench/cli.py) are made again.
CHECKPOINT_REVISION = 2


def bark_config(size: str, spec: BarkSpec):
    from transformers import BarkConfig, EncodecConfig

    hidden, layers, heads = SIZES[size]["gpt"]
    c_hidden, c_filters, c_lstm = SIZES[size]["codec"]
    common = dict(hidden_size=hidden, num_layers=layers, num_heads=heads, block_size=1024, bias=False)
    semantic = dict(common, input_vocab_size=spec.semantic_infer_token + 1,
                    output_vocab_size=spec.semantic_vocab_size + 48)
    coarse_vocab = spec.semantic_vocab_size + spec.n_coarse_codebooks * spec.codebook_size + 48
    coarse = dict(common, input_vocab_size=coarse_vocab, output_vocab_size=coarse_vocab)
    fine = dict(common, input_vocab_size=spec.codebook_size + 32, output_vocab_size=spec.codebook_size + 32,
                n_codes_total=spec.n_fine_codebooks, n_codes_given=1)
    codec = EncodecConfig(hidden_size=c_hidden, num_filters=c_filters, num_lstm_layers=c_lstm,
                          sampling_rate=spec.sample_rate, codebook_size=spec.codebook_size)
    return BarkConfig(semantic_config=semantic, coarse_acoustics_config=coarse, fine_acoustics_config=fine,
                      codec_config=codec.to_dict())


def _randomize(model, spec: BarkSpec, gen: torch.Generator) -> None:
    """Make random weights behave like a trained Bark where the algorithm relies on it."""
    with torch.no_grad():
        for sub in (model.semantic, model.coarse_acoustics, model.fine_acoustics):
            for p in sub.parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * WEIGHT_STD)
        # The codec keeps transformers' initialisation (its weight norms make audible, varied output).
        # A trained coarse model never predicts past the second codebook; Bark samples
        # strictly inside each codebook, so zero those rows (logit 0 never wins the argmax).
        model.coarse_acoustics.lm_head.weight[spec.semantic_vocab_size + 2 * spec.codebook_size:] = 0
        for layer in model.codec_model.quantizer.layers:
            cb = layer.codebook
            cb.embed.copy_(torch.randn(cb.embed.shape, generator=gen))
            cb.embed_avg.copy_(cb.embed)
            cb.cluster_size.fill_(1.0)
            cb.inited.fill_(1.0)


def _tune_semantic_eos(semantic, spec: BarkSpec) -> None:
    """Make the random semantic GPT end its speech by itself, after a text-dependent length.

    Random weights never make EOS likely, so every request would run to the 768-token cap
    (15 s of audio, minutes on a CPU). Two residual dimensions get a meaning instead:

    - a text marker: 1 in the embedding of every text token, 0 elsewhere;
    - a clock: its position embedding grows linearly with the generated tokens (0 over the
      prompt), minus what head 0 of layer 0 reads from the marker. That head attends uniformly
      (zero queries), so it subtracts EOS_TEXT_GAIN x (share of text tokens so far): longer text
      starts the clock lower, and speaks longer.

    Nothing else writes into either dimension, and only the EOS row of ``lm_head`` reads the
    clock. The clock's unit is the spread of the residual stream before the final layer norm
    (about 3 in tiny, 190 in small), measured on a probe prompt, and the EOS gain is set from the
    same probe so that P(EOS) crosses min_eos_p near EOS_TARGET_TOKENS for a short text.
    transformers' BarkModel runs these weights unchanged, so parity with it holds either way.
    """
    clock = semantic.config.hidden_size - 1
    _wire_eos(semantic, spec, unit=0.0)  # the clock silent: measure the residual spread and the logits
    spread, logsumexp, _ = _probe(semantic, spec, clock)
    _wire_eos(semantic, spec, unit=spread)
    _, _, clock_at_start = _probe(semantic, spec, clock)  # layer-normed clock after the prompt
    needed = logsumexp + math.log(EOS_MIN_P / (1 - EOS_MIN_P))  # the EOS logit where P(EOS) = min_eos_p
    rise = max(EOS_TARGET_TOKENS / EOS_CLOCK_TOKENS + clock_at_start, 0.25)
    semantic.lm_head.weight[spec.semantic_eos_token, clock] = needed / rise


def _wire_eos(semantic, spec: BarkSpec, unit: float) -> None:
    """The clock and text-marker dimensions of :func:`_tune_semantic_eos`, the clock in units of ``unit``."""
    hidden = semantic.config.hidden_size
    head = hidden // semantic.config.num_heads
    clock, marker = hidden - 1, hidden - 2
    prompt = spec.max_input_semantic_length + 1  # positions 0..256: merged text/history + infer token
    positions = torch.arange(semantic.position_embeds_layer.num_embeddings, dtype=torch.float32)
    semantic.position_embeds_layer.weight[:, marker] = 0
    semantic.position_embeds_layer.weight[:, clock] = (positions - (prompt - 1)).clamp(min=0) / EOS_CLOCK_TOKENS * unit
    semantic.input_embeds_layer.weight[:, [clock, marker]] = 0
    semantic.input_embeds_layer.weight[spec.text_encoding_offset:spec.text_pad_token, marker] = 1.0
    for layer in semantic.layers:  # nothing writes into the two dimensions ...
        layer.attn.out_proj.weight[[clock, marker], :] = 0
        layer.mlp.out_proj.weight[[clock, marker], :] = 0
    attn = semantic.layers[0].attn  # ... but head 0 of layer 0, from the marker into the clock
    attn.att_proj.weight[:head] = 0  # zero queries: uniform attention over the positions so far
    attn.att_proj.weight[2 * hidden] = 0
    attn.att_proj.weight[2 * hidden, marker] = 1.0  # its first value reads the marker
    attn.out_proj.weight[:, 0] = 0
    attn.out_proj.weight[clock, 0] = -EOS_TEXT_GAIN * unit
    semantic.lm_head.weight[:, [clock, marker]] = 0  # no token logit reads them
    semantic.lm_head.weight[spec.semantic_eos_token] = 0


def _probe(semantic, spec: BarkSpec, clock: int, n_text: int = 8) -> tuple[float, float, float]:
    """One forward of a short-text prompt: (spread of the residual before the final layer norm,
    logsumexp of the semantic logits, the layer-normed clock) at the last prompt position."""
    text = torch.full((spec.max_input_semantic_length,), spec.text_pad_token)
    text[:n_text] = torch.arange(n_text) * 37 % 1000 + spec.text_encoding_offset
    history = torch.full_like(text, spec.semantic_pad_token)
    emb = semantic.input_embeds_layer
    embeds = torch.cat([emb(text) + emb(history), emb(torch.tensor([spec.semantic_infer_token]))])[None]
    seen: dict[str, torch.Tensor] = {}
    hook = semantic.layernorm_final.register_forward_hook(lambda mod, args, out: seen.update(h=args[0], y=out))
    try:
        logits = semantic(inputs_embeds=embeds).logits[0, -1]  # (V,)
    finally:
        hook.remove()
    residual = seen["h"][0, -1]  # (C,)
    return (residual.std().item(), torch.logsumexp(logits[: spec.semantic_vocab_size], 0).item(),
            seen["y"][0, -1, clock].item())


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def wordpiece_vocab(lines: list[str], vocab_size: int) -> list[str]:
    """A cased multilingual BERT WordPiece vocabulary learnt from ``lines``, the same for the same lines.

    The words are split as the BERT tokenizer splits them (its normalizer and pre-tokenizer), then pieces
    are merged as WordPiece training does (a word starts as its first character and ``##``-prefixed
    continuations; the most frequent adjacent pair is merged, over and over) until ``vocab_size`` tokens or
    no pair is left. Ties go to the pair that sorts first. (The ``tokenizers`` trainer breaks ties in hash
    order, so it learnt a different vocabulary in each process, and a seed did not give one checkpoint.)
    """
    from collections import Counter

    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    norm = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False)
    split = BertPreTokenizer()
    counts = Counter(w for line in lines for w, _ in split.pre_tokenize_str(norm.normalize_str(line)))
    words = {w: [w[0], *("##" + c for c in w[1:])] for w in counts}
    vocab = [*SPECIAL_TOKENS, *sorted({c for w in counts for c in w}),  # every character can start a word
             *sorted({p for pieces in words.values() for p in pieces[1:]})]
    known = set(vocab)
    while len(vocab) < vocab_size:
        pairs: Counter = Counter()
        for w, pieces in words.items():
            for pair in zip(pieces, pieces[1:]):
                pairs[pair] += counts[w]
        if not pairs:
            break
        a, b = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merged = a + b[2:]
        for pieces in words.values():
            i = 0
            while i < len(pieces) - 1:
                if pieces[i] == a and pieces[i + 1] == b:
                    pieces[i:i + 2] = [merged]
                i += 1
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
    return vocab


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A cased multilingual BERT WordPiece tokenizer (:func:`wordpiece_vocab` on the corpus) in HF format."""
    from transformers import BertTokenizer  # the tokenizers-backed BERT tokenizer in transformers 5

    vocab = wordpiece_vocab(CORPUS.read_text(encoding="utf-8").splitlines(), vocab_size)
    fast = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=False,
                         strip_accents=False, tokenize_chinese_chars=True, model_max_length=512)
    fast.save_pretrained(str(directory))


def random_voice(spec: BarkSpec, rng: np.random.Generator, n_semantic: int) -> dict[str, np.ndarray]:
    n_frames = int(n_semantic * spec.semantic_to_coarse_ratio / spec.n_coarse_codebooks)
    return {
        "semantic_prompt": rng.integers(0, spec.semantic_vocab_size, n_semantic, dtype=np.int64),
        "coarse_prompt": rng.integers(0, spec.codebook_size, (spec.n_coarse_codebooks, n_frames), dtype=np.int64),
        "fine_prompt": rng.integers(0, spec.codebook_size, (spec.n_fine_codebooks, n_frames)).astype(np.int32),
    }


def write_speaker_embeddings(directory: Path, spec: BarkSpec, rng: np.random.Generator) -> None:
    index: dict = {"repo_or_path": str(directory)}
    for name in PRESETS:
        voice = random_voice(spec, rng, int(rng.integers(200, 340)))
        entry = {}
        for key, arr in voice.items():
            rel = f"speaker_embeddings/{name}_{key}.npy"
            (directory / rel).parent.mkdir(parents=True, exist_ok=True)
            np.save(directory / rel, arr, allow_pickle=False)
            entry[key] = rel
        index[name] = entry
    (directory / "speaker_embeddings_path.json").write_text(json.dumps(index, indent=2))


def write_readme(directory: Path, size: str, seed: int, eos: bool) -> None:
    """Say in the checkpoint itself what it is, so nobody mistakes it for Bark."""
    if eos:
        ending = ("The semantic stage is tuned to end by itself (see `_tune_semantic_eos` in "
                  "bark_serve/stages/random_checkpoint.py): with the default `min_eos_p` 0.2 a short text stops after "
                  "roughly 50-200 semantic tokens (1-4 s of audio at 49.9 tokens/s), longer texts later. "
                  "Made without `--full-length`.")
    else:
        ending = ("The semantic stage never ends by itself: every request runs to `max_semantic_tokens` "
                  "(768 by default, 15 s of audio). Made with `--full-length` (benchmarks need full-length requests).")
    (directory / "README.md").write_text(
        f"{README_TITLE}{size}, seed {seed})\n\n"
        "Written by `bark-serve make-checkpoint`. The weights are random: the audio is noise, not speech, but "
        "every path of bark-serve (and transformers' BarkModel) runs on it.\n\n"
        f"{ending}\n\nVoice presets: {', '.join(PRESETS)}.\n\nVoice cloning (`voice_cloning/`, unless made with "
        "`--no-voice-cloning`): a random HuBERT in the Hugging Face layout and random quantizers of both published "
        "versions; a cloned voice is as random as the rest.\n")


README_TITLE = "# Random Bark checkpoint ("


def is_random_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds a checkpoint this module wrote (its README says so): one it may write again."""
    try:
        return (directory / "README.md").read_text(encoding="utf-8").startswith(README_TITLE)
    except (OSError, UnicodeDecodeError):
        return False


def make_checkpoint(directory: str | Path, size: str = "tiny", seed: int = 0, dtype: str = "float32",
                    eos: bool = False, cloning: bool = True) -> Path:
    """Write a random Bark checkpoint that transformers' BarkModel/BarkProcessor load.

    ``cloning``: also the voice-cloning weights under ``voice_cloning/`` (stages/random_cloning.py: a random
    HuBERT and quantizers of both published versions, in their shapes), which the server finds there.

    ``eos=True`` (the ``make-checkpoint`` command's default) tunes the semantic GPT so that
    requests end by themselves after about 1-4 s of audio (:func:`_tune_semantic_eos`).
    The default here, ``False``, keeps the plain random weights, where requests run to
    ``max_semantic_tokens``: tests that set lengths with it and benchmarks rely on that.
    """
    from transformers import BarkModel

    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec = BarkSpec()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    gen = torch.Generator().manual_seed(seed)
    # transformers initialises the codec (and what _randomize leaves alone) from torch's global generator:
    # seeded here, so that a seed always writes the same checkpoint whatever the process drew before
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BarkModel(bark_config(size, spec))
    _randomize(model, spec, gen)
    if eos:
        with torch.no_grad():
            _tune_semantic_eos(model.semantic, spec)
    model.to(torch_dtype)  # type: ignore[arg-type]  # transformers' @wraps(Module.to) hides the signature
    model.config.save_pretrained(str(directory))
    model.save_pretrained(str(directory), safe_serialization=True)
    # transformers 5 cannot save a BarkGenerationConfig; write the hub's shape ourselves.
    (directory / "generation_config.json").write_text(json.dumps(spec.to_generation_config(), indent=2))
    write_tokenizer(directory, SIZES[size]["vocab"])
    write_speaker_embeddings(directory, spec, np.random.default_rng(seed))
    write_readme(directory, size, seed, eos)
    if cloning:
        from .random_cloning import make_cloning_weights

        make_cloning_weights(directory / "voice_cloning", size, seed)
    return directory

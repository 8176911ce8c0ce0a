"""``bark-serve voice clone``: a recording -> a Bark voice (.npz), in this process, no server.

The audio is read as the server reads an upload (stages/audio_in.py: any format PyAV reads, the same
refusals) and cloned by stages/cloning.py (HuBERT + quantizer for the semantic prompt, the checkpoint's
EnCodec for the coarse and fine prompts). The .npz works wherever a voice does (``synth --voice``, the API's
``voice``, batch items, dataset rows). ``add_voice_commands`` registers the ``voice`` family; the commands
that talk to a server register beside ``clone`` on the subparsers it returns.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .common import CliError, number

DEFAULT_MODEL = "suno/bark-small"


def add_voice_commands(subparsers) -> argparse._SubParsersAction:
    """Add ``voice clone`` to a CLI; returns the ``voice`` family's subparsers (for more voice commands)."""
    voice = subparsers.add_parser("voice", help="voices from recordings (clone a voice into a .npz)",
                                  description="Voices made from recordings of a speaker.")
    sub = voice.add_subparsers(dest="voice_command", required=True, metavar="SUBCOMMAND",
                               parser_class=type(voice))
    _add_clone(sub)
    return sub


def _add_clone(sub) -> None:
    p = sub.add_parser("clone", help="clone a voice from a recording into a Bark .npz (in process)",
                       description="Clone the speaker of AUDIO (wav, flac, mp3, ogg/opus, m4a; at least 1 s; "
                                   "the last 13 s are used) into a Bark voice file: HuBERT and the quantizer make "
                                   "the semantic prompt, the checkpoint's EnCodec the coarse and fine prompts. "
                                   "Runs in this process; no server is needed.")
    p.add_argument("audio", help="the recording (one speaker, clearly spoken; ideally ending after a sentence)")
    p.add_argument("-o", "--output", required=True, help="the voice file to write (.npz)")
    p.add_argument("--model", "--checkpoint", dest="model", default=DEFAULT_MODEL,
                   help=f"Bark checkpoint whose codec encodes the prompts: hub id or directory (default "
                        f"{DEFAULT_MODEL})")
    p.add_argument("--hubert", help="HuBERT base: a Hugging Face model directory or hub id (default: the "
                                    "checkpoint's voice_cloning/hubert, else facebook/hubert-base-ls960)")
    p.add_argument("--quantizer", help="quantizer checkpoint (.pth, gitmylo's format) or hub owner/repo/file (default: "
                                       "the checkpoint's voice_cloning/quantizer/, else GitMylo/bark-voice-cloning/"
                                       "quantifier_V1_hubert_base_ls960_23.pth)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                   help="HuBERT's dtype (default float32; the quantizer and EnCodec always run in float32)")
    p.add_argument("--max-seconds", type=number(float, 0, above=True),
                   help="refuse recordings longer than this (default 120)")
    p.set_defaults(func=clone)


def clone(args) -> int:
    """The ``voice clone`` handler: every failure is a CliError (one line, exit code 2)."""
    from bark_serve.stages.audio_in import DEFAULT_MAX_BYTES, DEFAULT_MAX_SECONDS, MissingPackage, decode_clip
    from bark_serve.stages.cloning import CloningUnavailable, VoiceCloner
    from bark_serve.stages.engine import EngineOptions, resolve_device, resolve_dtype
    from bark_serve.stages.types import CheckpointError, InvalidRequestError
    from bark_serve.stages.weights import cloning_weights

    out = Path(args.output)
    if out.suffix.lower() != ".npz":
        raise CliError(f"-o must name a .npz file, got {args.output!r}")
    try:
        data = Path(args.audio).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {args.audio!r}: {exc.strerror or exc}") from None
    try:
        audio, rate = decode_clip(data, max_bytes=DEFAULT_MAX_BYTES, max_s=args.max_seconds or DEFAULT_MAX_SECONDS)
        t0 = time.perf_counter()
        device = resolve_device(args.device)
        options = EngineOptions(device=device, dtype=resolve_dtype(args.dtype, device))
        cloner = VoiceCloner.from_pretrained(args.model, *cloning_weights(args.model, args.hubert, args.quantizer),
                                             options)
        t1 = time.perf_counter()
        voice = cloner.clone(audio, rate, name=out.stem)
    except InvalidRequestError as exc:
        raise CliError(f"{args.audio}: {exc}") from None
    except (MissingPackage, CloningUnavailable, CheckpointError) as exc:
        raise CliError(str(exc)) from None
    from bark_serve.stages.voices import voice_npz_bytes

    try:
        out.write_bytes(voice_npz_bytes(voice))
    except OSError as exc:
        raise CliError(f"cannot write {args.output!r}: {exc.strerror or exc}") from None
    frames = voice.fine.shape[1]
    print(f"wrote {args.output}: a voice of {frames / 75:.1f} s ({len(voice.semantic)} semantic tokens, {frames} "
          f"coarse/fine frames) from {len(audio) / rate:.1f} s of audio (load {t1 - t0:.1f} s, "
          f"clone {time.perf_counter() - t1:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m bark_serve.cli.voice clone ...``: the same as ``bark-serve voice clone ...``, with its errors."""
    parser = argparse.ArgumentParser(prog="bark-serve voice", description="Voices made from recordings.")
    _add_clone(parser.add_subparsers(dest="voice_command", required=True, metavar="SUBCOMMAND"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"bark-serve voice {args.voice_command}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"bark-serve voice {args.voice_command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


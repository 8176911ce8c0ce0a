"""``bark-serve``: the command line.

Subcommands: synth (in-process), make-checkpoint, up (serve locally), say
(HTTP client), render-config, voices, bench, batch, dataset (Ray Data), voice (cloning). Bad arguments and bad
input end with one line on stderr and exit code 2, never a stack trace.

Building the parser imports no torch, ray or transformers: each command's
module imports what it needs when it runs, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys

from .common import EXIT_USAGE, CliError, number

__all__ = ["EXIT_USAGE", "CliError", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage otherwise)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _float_or_none(value: str):
    return None if value.lower() in ("none", "off") else float(value)


def build_parser() -> argparse.ArgumentParser:
    from . import commands as cmd
    from . import dataset, up
    from .batch import add_batch_commands
    from .batch import run as run_batch
    from .voice import add_voice_commands
    from .voice_client import register as register_voice_client

    parser = _Parser(prog="bark-serve", description="Serve Suno's Bark text-to-speech at scale.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    _add_synth(sub, cmd)
    _add_checkpoint_commands(sub, cmd)
    up.register(sub)
    from bark_serve.bench.cli import register as register_bench  # argparse only: bench imports torch when it runs

    register_bench(sub)
    add_batch_commands(sub).set_defaults(func=run_batch)
    dataset.register(sub)
    register_voice_client(add_voice_commands(sub))
    return parser


def _add_synth(sub, cmd) -> None:
    p = sub.add_parser("synth", help="synthesize speech in this process and write an audio file",
                       description="Synthesize TEXT (or a --script of several speakers) with all four Bark stages "
                                   "in this process. Long text is split at sentence boundaries; each segment "
                                   "continues the previous one's voice (in a script: its own speaker's).")
    p.add_argument("text", nargs="?", help="the text to speak (multilingual; ♪ for music, cues like [laughter])")
    p.add_argument("--script", metavar="FILE.json",
                   help='instead of TEXT: a multi-speaker script, a JSON list of {"voice": ..., "text": ...} lines; '
                        "each speaker continues its own voice from its own previous lines")
    p.add_argument("-o", "--output", required=True,
                   help="output file: .wav, .flac, .mp3, .ogg/.opus, .aac (ADTS) or .pcm")
    _add_model_args(p)
    p.add_argument("--voice", help="preset name (v2/en_speaker_6, announcer), a .npz file, or the name of a voice "
                                   "registered on a server without API keys (its voice folder: $BARK_STATE_DIR/voices)")
    p.add_argument("--voices-dir", action="append", default=[], help="extra directory of suno-style .npz presets")
    p.add_argument("--seed", type=int, help="random seed (same seed, same output)")
    p.add_argument("--temperature", type=float,
                   help="temperature of every stage; 0 is greedy (default: Bark's 0.7 / 0.7 / 0.5)")
    for stage in ("semantic", "coarse", "fine"):
        p.add_argument(f"--{stage}-temperature", type=float, help=f"temperature of the {stage} stage only")
    p.add_argument("--top-k", type=int, help="top-k sampling in the semantic and coarse stages")
    p.add_argument("--top-p", type=float, help="nucleus sampling in the semantic and coarse stages")
    p.add_argument("--min-eos-p", type=_float_or_none, default=0.2,
                   help="stop when end-of-speech is this likely (default 0.2; 'none' to disable)")
    p.add_argument("--max-semantic-tokens", type=int, default=768,
                   help="cap on semantic tokens per segment (768, about 15 s)")
    p.add_argument("--save-voice", metavar="FILE.npz", help="also save the generated tokens as a voice preset")
    _add_join_args(p)
    p.set_defaults(func=cmd.synth)


def _add_join_args(p) -> None:
    """The long-form joining and speed of the HTTP API's output options (defaults: the config's audio block)."""
    p.add_argument("--speed", type=float, help="0.25-4: pitch-preserving time-stretch (default 1)")
    p.add_argument("--no-trim", dest="trim_silence", action="store_const", const=False,
                   help="keep each segment's leading and trailing silence")
    p.add_argument("--crossfade-ms", type=float, help="crossfade of the joins between segments (default 20; 0: none)")
    p.add_argument("--no-normalize", dest="normalize_loudness", action="store_const", const=False,
                   help="keep the model's loudness (default: normalised to --target-lufs)")
    p.add_argument("--target-lufs", type=float, help="integrated loudness target (ITU-R BS.1770; default -18)")
    p.add_argument("--raw", action="store_true",
                   help="the model's samples as they are: no trimming, crossfade, loudness or speed change")


def _add_checkpoint_commands(sub, cmd) -> None:
    p = sub.add_parser("make-checkpoint", help="write a random-weight Bark checkpoint (Hugging Face layout)",
                       description="Write a Bark checkpoint with random weights in the exact Hugging Face layout "
                                   "(config, safetensors, tokenizer, voice presets), for running every path of the "
                                   "system without the hub. Random weights give noise, not speech. By default the "
                                   "semantic stage ends by itself after about 1-4 s of audio, so demo requests are "
                                   "quick; --full-length makes every request run to the 768-token cap (benchmarks).")
    p.add_argument("directory", help="where to write the checkpoint (created if missing)")
    p.add_argument("--size", choices=["tiny", "small", "large"], default="tiny",
                   help="tiny for tests; small/large have the shapes of suno/bark-small and suno/bark")
    p.add_argument("--seed", type=number(int, 0, 2**63 - 1), default=0,
                   help="seed of the random weights and presets (default 0)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype the weights are stored in (default float32)")
    p.add_argument("--full-length", "--no-eos", dest="full_length", action="store_true",
                   help="no end-of-speech tuning: requests run to max_semantic_tokens (for benchmarks)")
    p.add_argument("--no-voice-cloning", dest="cloning", action="store_false",
                   help="skip the random voice-cloning weights (HuBERT and quantizers, voice_cloning/; about 700 MB "
                        "for small/large)")
    p.set_defaults(func=cmd.make_checkpoint)

    p = sub.add_parser("voices", help="list the voice presets of a checkpoint",
                       description="List the voice presets a checkpoint ships (speaker_embeddings/) and those in "
                                   "--voices-dir. A running server lists its voices and aliases at GET /v1/voices.")
    p.add_argument("--model", help="hub id (suno/bark-small) or local checkpoint directory (required)")
    p.add_argument("--voices-dir", action="append", default=[],
                   help="extra directory of suno-style .npz presets (repeatable)")
    p.set_defaults(func=cmd.voices)

    p = sub.add_parser("render-config", help="print the Ray Serve config (serve deploy / RayService) of a config",
                       description="Print the Ray Serve config (YAML) that `up` deploys, for `serve deploy` or a "
                                   "RayService's serveConfigV2.")
    p.add_argument("--config", help="YAML config file or profile name (default: local-cpu)")
    p.add_argument("--model", help="override the config's model")
    p.set_defaults(func=cmd.render_config)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="suno/bark-small", help="hub id (suno/bark, suno/bark-small) or local directory")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations (auto: bfloat16 where fast, else float32)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--cpu-offload", action="store_true",
                   help="keep weights in host memory and move them to the GPU layer by layer (small GPUs)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from bark_serve.serving.config import ConfigError
    from bark_serve.stages.types import CheckpointError, InvalidRequestError

    try:
        code = int(args.func(args) or 0)
    except CliError as exc:
        print(f"bark-serve {args.command}: error: {exc}", file=sys.stderr)
        code = exc.code
    except (InvalidRequestError, CheckpointError, ConfigError, FileNotFoundError, IsADirectoryError) as exc:
        print(f"bark-serve {args.command}: error: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        print(f"bark-serve {args.command}: interrupted", file=sys.stderr)
        code = 130
    except Exception as exc:  # never a stack trace: one line, and the trace on demand
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"bark-serve {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        code = EXIT_USAGE if isinstance(exc, OSError) and exc.filename else 1
    if getattr(args, "exit_at_once", False):
        _exit_at_once(code)
    return code


DEBUG_ENV = "BARK_DEBUG"


def _one_line(exc: Exception) -> str:
    """An error no command turned into a message of its own: a file the system refused (disk full, not a
    directory, no permission: the path the user gave), or a failure inside (its type, and how to see more)."""
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text} (set {DEBUG_ENV}=1 for the traceback)"


def _exit_at_once(code: int) -> None:
    """End the process without the interpreter's teardown, once a command has stopped everything it started.
    `up` stopped by a signal while ray.init or serve.run was under way leaves threads of Ray's C++ core and of
    the deploying thread running; tearing the interpreter down under them crashed the process with SIGSEGV
    after it had printed "stopped" (seen in CI). Logs and output are flushed first."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":  # run the imported module's main, so exception classes are the same objects
    from bark_serve.cli.main import main as _main

    sys.exit(_main())

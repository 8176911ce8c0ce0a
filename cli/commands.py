"""Handlers of the in-process CLI commands (synth, make-checkpoint, voices, render-config)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import yaml

from bark_serve.stages.types import GenerationParams, InvalidRequestError

from .common import CliError, check_output_path, check_text, write_output


def _engine_options(args, capacity: int = 4):
    from bark_serve.stages.engine import EngineOptions, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    return EngineOptions(device=device, dtype=resolve_dtype(args.dtype, device), capacity=capacity,
                         cpu_offload=args.cpu_offload)


def _generation_params(args) -> GenerationParams:
    """The same options, defaults and checks as the HTTP API's."""
    from pydantic import ValidationError

    from bark_serve.schema.options import BarkOptions
    from bark_serve.schema.untrusted import validation_message

    fields = {k: getattr(args, k) for k in ("seed", "temperature", "semantic_temperature", "coarse_temperature",
                                            "fine_temperature", "top_k", "top_p", "min_eos_p", "max_semantic_tokens")}
    try:
        return BarkOptions(**fields).generation_params()
    except ValidationError as exc:
        problems = validation_message(exc)
        raise InvalidRequestError(problems.replace("_", "-")) from None


def _post_process(args):
    """The output options of synth, checked like the HTTP API's; --raw turns every step off."""
    from pydantic import ValidationError

    from bark_serve.schema.options import OutputOptions
    from bark_serve.schema.untrusted import validation_message
    from bark_serve.serving.config import AudioConfig

    fields = {k: getattr(args, k) for k in ("speed", "trim_silence", "crossfade_ms", "normalize_loudness",
                                            "target_lufs")}
    try:
        options = OutputOptions(**fields)
    except ValidationError as exc:
        problems = validation_message(exc)
        raise InvalidRequestError(problems.replace("_", "-")) from None
    if args.raw:
        options = OutputOptions(speed=options.speed, trim_silence=False, crossfade_ms=0, normalize_loudness=False)
    return options.post_process(AudioConfig())


def read_script(path: str) -> list[tuple[str, str]]:
    """A script file: a JSON list of {"voice", "text"} lines, checked as the HTTP API checks one."""
    import json

    from pydantic import TypeAdapter, ValidationError

    from bark_serve.schema.fields import Script
    from bark_serve.schema.untrusted import check_plain_data, validation_message

    raw = Path(path).read_bytes()
    try:
        data = json.loads(raw)
    except RecursionError:
        raise InvalidRequestError(f"--script {path}: nested too deeply") from None
    except ValueError as exc:
        raise InvalidRequestError(f"--script {path}: not valid JSON: {str(exc)[:200]}") from None
    check_plain_data(data, where="script")
    try:
        lines = TypeAdapter(Script).validate_python(data)
    except ValidationError as exc:
        problems = validation_message(exc)
        raise InvalidRequestError(f"--script {path}: expected a list of {{voice, text}} lines: {problems}") from None
    return [(line.voice, line.text) for line in lines]


def synth(args) -> int:
    import numpy as np
    from tqdm import tqdm

    from bark_serve.schema.formats import format_for_path
    from bark_serve.stages.audio import join_segments
    from bark_serve.stages.encoders import encode
    from bark_serve.stages.pipeline import BarkPipeline
    from bark_serve.stages.voices import voice_npz_bytes

    fmt = format_for_path(args.output)
    check_output_path(args.output)
    params = _generation_params(args)
    post = _post_process(args)
    if args.save_voice and not args.save_voice.endswith(".npz"):
        raise InvalidRequestError("--save-voice must name a .npz file")
    if args.save_voice:
        check_output_path(args.save_voice, "--save-voice")
    if args.text is not None:
        check_text(args.text)
    if (args.text is None) == (args.script is None):
        raise InvalidRequestError("give the text to speak or --script FILE.json, not both" if args.script
                                  else "give the text to speak (or --script FILE.json)")
    if args.script and (args.voice or args.save_voice):
        raise InvalidRequestError("a script names each line's voice: --voice and --save-voice do not apply")
    script = read_script(args.script) if args.script else None
    t0 = time.perf_counter()
    pipe = BarkPipeline.from_pretrained(args.model, _engine_options(args), preset_dirs=args.voices_dir)
    own = _registered_voices(pipe, {args.voice} if args.voice else {v for v, _ in script or [] if isinstance(v, str)})
    t_load = time.perf_counter() - t0
    state = {"segment": 1, "segments": 1}
    with tqdm(total=None, unit="step", disable=None, file=sys.stderr,
              bar_format="{desc}{n_fmt} steps [{elapsed}, {rate_fmt}]") as bar:
        def on_segment(done, total):
            state.update(segment=min(done + 1, total), segments=total)

        def on_step(stage):  # one bar: which segment, which stage, engine steps so far and their rate
            bar.set_description(f"segment {state['segment']}/{state['segments']} {stage}", refresh=False)
            bar.update(1)

        if script is not None:
            gen = pipe.synthesize_script(script, params, on_segment=on_segment, on_step=on_step, own_voices=own)
        else:
            gen = pipe.synthesize(args.text, args.voice, params, on_segment=on_segment, on_step=on_step,
                                  own_voices=own)
    segments = np.split(gen.audio, np.cumsum(gen.segment_samples)[:-1]) if gen.segment_samples else [gen.audio]
    audio = join_segments(segments, gen.sample_rate, post)
    write_output(args.output, encode(audio, gen.sample_rate, fmt))
    if args.save_voice:
        write_output(args.save_voice, voice_npz_bytes(gen.as_voice()), "--save-voice")
    seconds = len(audio) / gen.sample_rate
    print(f"wrote {args.output}: {seconds:.2f} s of audio at {gen.sample_rate} Hz, seed {gen.seed} "
          f"(load {t_load:.1f} s, generate {time.perf_counter() - t0 - t_load:.1f} s)"
          + (f"; voice saved to {args.save_voice}" if args.save_voice else ""))
    return 0


def _registered_voices(pipe, names: set[str]) -> dict:
    """The registered voices (``POST /v1/voices`` on a server without API keys, kept in the voice folder:
    $BARK_STATE_DIR/voices, else ~/.cache/bark-serve/voices) among the voice ``names`` asked for."""
    if not names:
        return {}
    from bark_serve.cluster.voice_backends import DirVoiceStore
    from bark_serve.serving.config import BarkConfig
    from bark_serve.serving.voices_api import registered_voices_sync

    return registered_voices_sync(DirVoiceStore(BarkConfig().voice_store_dir()), names, {}, pipe.spec)


def make_checkpoint(args) -> int:
    from bark_serve.stages.random_checkpoint import is_random_checkpoint
    from bark_serve.stages.random_checkpoint import make_checkpoint as make

    target = Path(args.directory)
    if target.exists() and not target.is_dir():
        raise CliError(f"{args.directory!r} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not is_random_checkpoint(target):
        raise CliError(f"{args.directory!r} is not empty and holds no random checkpoint of bark-serve: writing "
                       "there would replace what it holds (a real checkpoint?); name a new or empty directory")
    path = make(args.directory, args.size, seed=args.seed, dtype=args.dtype, eos=not args.full_length,
                cloning=args.cloning)
    ending = "requests run to the semantic cap" if args.full_length else "requests end after about 1-4 s of audio"
    print(f"wrote a random {args.size} Bark checkpoint to {path} ({ending}; see {path}/README.md)")
    return 0


def voices(args) -> int:
    from bark_serve.stages.voices import VoiceLibrary
    from bark_serve.stages.weights import Checkpoint

    if not args.model:  # never a silent hub download: presets belong to a checkpoint
        raise CliError("give --model: a hub id (suno/bark-small) or a checkpoint directory "
                         "(`bark-serve make-checkpoint DIR` writes one); a running server lists its voices "
                         "at GET /v1/voices")
    ckpt = Checkpoint.open(args.model)
    for name in VoiceLibrary(ckpt.spec, ckpt, args.voices_dir).names():
        print(name)
    return 0


def render_config(args) -> int:
    from bark_serve.serving.config import load_config
    from bark_serve.serving.serve_config import render_serve_config

    cfg = load_config(args.config, {"model": args.model} if args.model else None)
    yaml.safe_dump(render_serve_config(cfg), sys.stdout, sort_keys=False)
    return 0


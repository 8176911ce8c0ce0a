"""Baselines (1) and (2): transformers' own BarkModel.generate, one at a time and in static batches."""

from __future__ import annotations

import time

import torch

from .workload import Run, Workload

SAMPLE_RATE = 24_000


def _load(model_dir: str, dtype: str):
    from transformers import BarkModel, BarkProcessor

    model = BarkModel.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    return model, BarkProcessor.from_pretrained(model_dir)


def _voice(proc, voice):
    return voice if voice in (proc.speaker_embeddings or {}) else None


def hf_sequential(model_dir: str, work: Workload, n: int, dtype: str = "float32") -> Run:
    """(1) The documented default: one request per generate call, float32."""
    model, proc = _load(model_dir, dtype)
    run = Run(f"transformers_sequential_{dtype}", extra={"dtype": dtype, "batch": 1})
    t_start = time.perf_counter()
    for text, voice in work.items(n):
        t0 = time.perf_counter()
        inputs = proc(text, voice_preset=_voice(proc, voice))
        with torch.inference_mode():
            audio = model.generate(**inputs, semantic_max_new_tokens=work.semantic_tokens)
        run.latencies.append(time.perf_counter() - t0)
        run.ttfa.append(run.latencies[-1])
        run.audio_s += audio.shape[-1] / SAMPLE_RATE
    run.wall_s = time.perf_counter() - t_start
    return run


def hf_batched(model_dir: str, work: Workload, n: int, batch: int, dtype: str) -> Run:
    """(2) Static batches: transformers takes one voice per batch, so each batch uses its first item's voice."""
    model, proc = _load(model_dir, dtype)
    run = Run(f"transformers_batch{batch}_{dtype}", extra={"dtype": dtype, "batch": batch})
    items = work.items(n)
    t_start = time.perf_counter()
    for i in range(0, n, batch):
        chunk = items[i:i + batch]
        t0 = time.perf_counter()
        inputs = proc([t for t, _ in chunk], voice_preset=_voice(proc, chunk[0][1]))
        with torch.inference_mode():
            _, lengths = model.generate(**inputs, semantic_max_new_tokens=work.semantic_tokens,
                                        return_output_lengths=True)
        dt = time.perf_counter() - t0
        run.latencies += [dt] * len(chunk)
        run.ttfa += [dt] * len(chunk)
        run.audio_s += sum(int(x) for x in lengths) / SAMPLE_RATE
    run.wall_s = time.perf_counter() - t_start
    return run

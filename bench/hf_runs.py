"""Baselines (1) and (2): transformers' own BarkModel.generate, one at a time and in static batches."""

from __future__ import annotations

import time

import torch

from .workload import Run, Workload

SAMPLE_RATE = 24_000


def segments_of(work: Workload, n: int) -> list[tuple[str, str | None, int]]:
    """(sentence, voice, semantic cap) of every segment of the first n requests, in order.

    transformers has no long-form: as its documentation suggests, each sentence is one generate call
    (without carrying the voice from sentence to sentence, which only makes it cheaper).
    """
    return [(part, r.voice, r.semantic_tokens) for r in work.requests(n) for part in r.parts]


def _load(model_dir: str, dtype: str, device: str = "cpu"):
    from transformers import BarkModel, BarkProcessor

    # transformers types to() as @wraps(Module.to), whose stub takes the device for self
    model = BarkModel.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()  # type: ignore[arg-type]
    return model, BarkProcessor.from_pretrained(model_dir)


def _on(inputs, device: str):
    """The processor's output (tensors and the nested voice preset) moved to ``device``."""
    if device == "cpu":
        return inputs
    return {k: (v.to(device) if hasattr(v, "to") else
                {kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in inputs.items()}


def _voice(proc, voice):
    return voice if voice in (proc.speaker_embeddings or {}) else None


def hf_sequential(model_dir: str, work: Workload, n: int, dtype: str = "float32", device: str = "cpu") -> Run:
    """(1) The documented default: one request per generate call, float32."""
    model, proc = _load(model_dir, dtype, device)
    run = Run(f"transformers_sequential_{dtype}", extra={"dtype": dtype, "batch": 1})
    t_start = time.perf_counter()
    for req in work.requests(n):
        t0 = time.perf_counter()
        for i, part in enumerate(req.parts):
            inputs = _on(proc(part, voice_preset=_voice(proc, req.voice)), device)
            with torch.inference_mode():
                audio = model.generate(**inputs, semantic_max_new_tokens=req.semantic_tokens)
            if i == 0:
                run.ttfa.append(time.perf_counter() - t0)
            run.audio_s += audio.shape[-1] / SAMPLE_RATE
        run.latencies.append(time.perf_counter() - t0)
    run.wall_s = time.perf_counter() - t_start
    return run


HF_ORDERS = ("given", "sorted")


def hf_batched(model_dir: str, work: Workload, n: int, batch: int, dtype: str, device: str = "cpu",
               order: str = "given") -> Run:
    """(2) Static batches of the requests' segments. transformers takes one voice and one semantic length
    per batch: each batch uses its first item's voice and runs to its longest cap. Only each segment's
    own share (its cap) counts as audio; the padding is the static batch's waste.

    ``order``: "given" batches the segments in workload order; "sorted" sorts them by cap, longest first,
    so each batch holds like lengths and pads less (what a user who knows the lengths does, and the
    baseline that matches the engines, which admit the longest first). Named ``..._sorted``."""
    if order not in HF_ORDERS:
        raise ValueError(f"order must be one of {', '.join(HF_ORDERS)}, got {order!r}")
    model, proc = _load(model_dir, dtype, device)
    suffix = "" if order == "given" else f"_{order}"
    run = Run(f"transformers_batch{batch}_{dtype}{suffix}", extra={"dtype": dtype, "batch": batch, "order": order})
    items = segments_of(work, n)
    if order == "sorted":
        items.sort(key=lambda item: -item[2])  # stable: like caps keep the workload's order
    t_start = time.perf_counter()
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        cap = max(c for _, _, c in chunk)
        t0 = time.perf_counter()
        inputs = _on(proc([t for t, _, _ in chunk], voice_preset=_voice(proc, chunk[0][1])), device)
        with torch.inference_mode():
            _, lengths = model.generate(**inputs, semantic_max_new_tokens=cap, return_output_lengths=True)
        dt = time.perf_counter() - t0
        run.latencies += [dt] * len(chunk)
        run.ttfa += [dt] * len(chunk)
        run.audio_s += sum(int(x) * own / cap for x, (_, _, own) in zip(lengths, chunk)) / SAMPLE_RATE
    run.wall_s = time.perf_counter() - t_start
    run.extra["segments"] = len(items)
    return run

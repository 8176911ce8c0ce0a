"""What every benchmark configuration synthesizes: a named, seeded mix of request lengths.

Random weights never emit EOS, so a request's semantic cap (``max_semantic_tokens``, 49.9 tokens
per second of audio) sets how much audio each of its segments makes. A *mix* draws, per request:

- ``bark-mix-v1`` (the default, stands for real use): the cap from a log-normal distribution with
  median 320 tokens (6.4 s) and sigma 0.5, clipped to [150, 768] tokens (3-15 s, Bark's range per
  segment); one request in eight (``long_share``) is a long text of 4 to 8 sentences, each its own
  segment, each with that cap. A request makes 7 s of audio at the median, 12 s on average.
- ``ci-tiny``: the same shape over 4-12 tokens, for the tests' tiny checkpoints.
- ``fixed-N`` (e.g. ``fixed-32``): every request one sentence and N tokens (the old 0.64 s row).

Voices cycle over presets and none; decoding is greedy everywhere, as transformers' default
generate. The same (mix, seed, n) always gives the same requests, and arrivals for an open-loop
run come from ``poisson_arrivals`` with their own seed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

TEXTS = (
    "Hello, my dog is cute and I need him in my life.",
    "The quick brown fox jumps over the lazy dog [laughs].",
    "♪ In the jungle, the mighty jungle, the lion sleeps tonight ♪",
    "Bonjour, je m'appelle Suno et j'aime la musique.",
    "It was the best of times, it was the worst of times.",
    "Chapter one: the audiobook begins with a long sentence.",
)
# Sentences of a long text: each ends a sentence and holds 13-19 tokens, so with the benchmark's
# segment budget (SEGMENT_TOKENS) every one is its own segment.
LONG_SENTENCES = tuple(t for t in TEXTS if t.endswith("."))
SEGMENT_TOKENS = 24
VOICES = ("v2/en_speaker_6", "v2/en_speaker_1", None, "announcer", "v2/de_speaker_3")
SEMANTIC_PER_AUDIO_S = 49.9


@dataclass(frozen=True)
class LengthMix:
    lo: int
    hi: int
    median: float
    sigma: float = 0.5
    long_share: float = 1 / 8
    long_segments: tuple[int, int] = (4, 8)

    def describe(self) -> str:
        return (f"semantic cap ~ lognormal(median {self.median:g}, sigma {self.sigma:g}) clipped to "
                f"[{self.lo}, {self.hi}]; {self.long_share:.3g} of requests are long texts of "
                f"{self.long_segments[0]}-{self.long_segments[1]} segments")


MIXES = {
    "bark-mix-v1": LengthMix(150, 768, 320.0),
    "ci-tiny": LengthMix(4, 12, 7.0),
}


def mix_named(name: str) -> LengthMix:
    if name.startswith("fixed-") and name[6:].isdigit():
        n = int(name[6:])
        return LengthMix(n, n, float(n), sigma=0.0, long_share=0.0)
    try:
        return MIXES[name]
    except KeyError:
        raise ValueError(f"unknown workload mix {name!r}: choose {', '.join(MIXES)} or fixed-N") from None


@dataclass(frozen=True)
class BenchRequest:
    parts: tuple[str, ...]  # sentences, each one segment at SEGMENT_TOKENS
    voice: str | None
    semantic_tokens: int  # the cap of every segment

    @property
    def text(self) -> str:
        return " ".join(self.parts)

    @property
    def segments(self) -> int:
        return len(self.parts)

    @property
    def audio_s(self) -> float:
        """Audio this request makes (random weights run every segment to its cap)."""
        return self.segments * self.semantic_tokens / SEMANTIC_PER_AUDIO_S


@dataclass(frozen=True)
class Workload:
    mix: str = "bark-mix-v1"
    seed: int = 0
    voices: tuple = VOICES
    texts: tuple = TEXTS

    def requests(self, n: int, offset: int = 0) -> list[BenchRequest]:
        """Requests ``offset .. offset+n-1`` of this workload's endless, seeded sequence."""
        spec = mix_named(self.mix)
        rng = np.random.default_rng(self.seed)
        out = []
        for i in range(offset + n):
            u_len, u_long, u_segs = rng.random(3)
            cap = int(np.clip(round(spec.median * np.exp(spec.sigma * _normal(u_len))), spec.lo, spec.hi))
            voice = self.voices[i % len(self.voices)]
            if u_long < spec.long_share:
                k = spec.long_segments[0] + int(u_segs * (spec.long_segments[1] - spec.long_segments[0] + 1))
                start = i % len(LONG_SENTENCES)
                req = BenchRequest(tuple(LONG_SENTENCES[(start + j) % len(LONG_SENTENCES)] for j in range(k)),
                                   voice, cap)
            else:
                req = BenchRequest((self.texts[i % len(self.texts)],), voice, cap)
            if i >= offset:
                out.append(req)
        return out

    def items(self, n: int) -> list[tuple[str, str | None]]:
        """(text, voice) of the first n requests."""
        return [(r.text, r.voice) for r in self.requests(n)]

    def describe(self) -> dict:
        return {"mix": self.mix, "seed": self.seed, "distribution": mix_named(self.mix).describe(),
                "segment_tokens": SEGMENT_TOKENS, "voices": list(self.voices)}


def _normal(u: float) -> float:
    """The standard normal quantile of u in (0, 1)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(min(max(u, 1e-9), 1 - 1e-9))


def poisson_arrivals(rate: float, n: int, seed: int = 0) -> list[float]:
    """Arrival times (seconds from the start) of n requests of an open-loop Poisson process at ``rate``/s."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    gaps = np.random.default_rng([seed, 7919]).exponential(1.0 / rate, size=n)
    return list(itertools.accumulate(float(g) for g in gaps))


@dataclass
class Run:
    """One configuration's measurements; ``summary`` is what the JSON shows."""

    name: str
    latencies: list[float] = field(default_factory=list)
    ttfa: list[float] = field(default_factory=list)
    audio_s: float = 0.0
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)
    timeline: list = field(default_factory=list)  # served runs: per request, its segments' stage timestamps

    def summary(self) -> dict:
        out = {"name": self.name, "requests": len(self.latencies), "audio_s": round(self.audio_s, 3),
               "wall_s": round(self.wall_s, 3),
               "throughput_audio_s_per_s": round(self.audio_s / self.wall_s, 4) if self.wall_s else None,
               "requests_per_s": round(len(self.latencies) / self.wall_s, 4) if self.wall_s else None}
        for key, values in (("latency", self.latencies), ("ttfa", self.ttfa)):
            if values:
                for q in (50, 95, 99):
                    out[f"{key}_p{q}_s"] = round(float(np.percentile(values, q)), 3)
        out.update(self.extra)
        return out


def stage_efficiency(totals: dict[str, dict], peaks: dict[str, float], dtypes: dict[str, str],
                     wall_s: float | None = None) -> dict:
    """Per stage: busy seconds (and fraction of ``wall_s``), achieved TFLOP/s against the measured GEMM peaks."""
    out = {}
    for stage, t in totals.items():
        row = {"busy_s": round(t.get("step_s", 0.0), 3), "steps": int(t.get("steps", 0)), "dtype": dtypes.get(stage)}
        if wall_s:
            row["busy_frac"] = round(t.get("step_s", 0.0) / wall_s, 3)
        row.update(step_figures(t))
        for part, flops_key, time_key in (("prefill", "prefill_flops", "prefill_s"),
                                          ("decode", "decode_flops", "decode_s"),
                                          ("window", "window_flops", "step_s")):
            if time_key != "step_s" and t.get(time_key):
                row[time_key] = round(t[time_key], 3)
            if t.get(flops_key) and t.get(time_key):
                tflops = t[flops_key] / t[time_key] / 1e12
                row[f"{part}_tflops"] = round(tflops, 4)
                row[f"{part}_frac_of_peak_{dtypes.get(stage)}"] = round(tflops / peaks[dtypes[stage]], 3)
        out[stage] = row
    return out


def step_figures(t: dict) -> dict:
    """Where a stage's step time goes, from its engine's totals: mean wall ms per step (host time included),
    mean rows per step (how full its batches ran), mean ms of a decode-only step (no prefill or window
    re-prefill rows in it) and the share of steps that replayed a CUDA graph."""
    steps = t.get("steps", 0.0)
    if not steps:
        return {}
    out = {"step_ms": round(1e3 * t.get("step_s", 0.0) / steps, 3), "mean_rows": round(t.get("batch", 0.0) / steps, 2),
           "graph_step_frac": round(t.get("graph_steps", 0.0) / steps, 3)}
    if t.get("decode_only_steps"):
        out["decode_only_ms"] = round(1e3 * t.get("decode_only_s", 0.0) / t["decode_only_steps"], 3)
    return out


def counted_flops(totals: dict[str, dict]) -> float:
    """The useful FLOPs of a run, as stages/flops.py counts them (prefill + decode + fine windows)."""
    return sum(t.get(k, 0.0) for t in totals.values() for k in ("prefill_flops", "decode_flops", "window_flops"))


def roofline(flops: float, audio_s: float, wall_s: float, peak_tflops: float) -> dict:
    """Throughput against the roofline the GEMM peak sets: audio-s/s if every counted FLOP ran at the peak."""
    if not (flops and audio_s and wall_s and peak_tflops):
        return {}
    per_audio_s = flops / audio_s
    limit = peak_tflops * 1e12 / per_audio_s
    return {"tflop_per_audio_s": round(per_audio_s / 1e12, 4), "roofline_audio_s_per_s": round(limit, 4),
            "achieved_tflops": round(flops / wall_s / 1e12, 4),
            "frac_of_roofline": round(audio_s / wall_s / limit, 3)}

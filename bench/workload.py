"""What every benchmark configuration synthesizes: the same texts, mixed voices, a fixed semantic length.

Random weights almost never emit EOS, so the semantic length is the knob that sets how much audio
a request makes (49.9 semantic tokens per second of audio); greedy decoding everywhere, as
transformers' default generate does.
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
VOICES = ("v2/en_speaker_6", "v2/en_speaker_1", None, "announcer", "v2/de_speaker_3")


@dataclass(frozen=True)
class Workload:
    semantic_tokens: int = 32
    voices: tuple = VOICES
    texts: tuple = TEXTS

    def items(self, n: int) -> list[tuple[str, str | None]]:
        pairs = zip(itertools.cycle(self.texts), itertools.cycle(self.voices))
        return list(itertools.islice(pairs, n))


@dataclass
class Run:
    """One configuration's measurements; ``summary`` is what the JSON shows."""

    name: str
    latencies: list[float] = field(default_factory=list)
    ttfa: list[float] = field(default_factory=list)
    audio_s: float = 0.0
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        out = {"name": self.name, "requests": len(self.latencies), "audio_s": round(self.audio_s, 3),
               "wall_s": round(self.wall_s, 3),
               "throughput_audio_s_per_s": round(self.audio_s / self.wall_s, 4) if self.wall_s else None}
        for key, values in (("latency", self.latencies), ("ttfa", self.ttfa)):
            if values:
                out[f"{key}_p50_s"] = round(float(np.percentile(values, 50)), 3)
                out[f"{key}_p95_s"] = round(float(np.percentile(values, 95)), 3)
        out.update(self.extra)
        return out


def stage_efficiency(totals: dict[str, dict], peaks: dict[str, float], dtypes: dict[str, str]) -> dict:
    """Per stage: busy seconds and achieved TFLOP/s against the measured GEMM peaks."""
    out = {}
    for stage, t in totals.items():
        row = {"busy_s": round(t.get("step_s", 0.0), 3), "steps": int(t.get("steps", 0)), "dtype": dtypes.get(stage)}
        for part, flops_key, time_key in (("prefill", "prefill_flops", "prefill_s"),
                                          ("decode", "decode_flops", "decode_s"),
                                          ("window", "window_flops", "step_s")):
            if t.get(flops_key) and t.get(time_key):
                tflops = t[flops_key] / t[time_key] / 1e12
                row[f"{part}_tflops"] = round(tflops, 4)
                row[f"{part}_frac_of_peak_{dtypes.get(stage)}"] = round(tflops / peaks[dtypes[stage]], 3)
                if "bfloat16" in peaks:
                    row[f"{part}_frac_of_peak_bfloat16"] = round(tflops / peaks["bfloat16"], 3)
        out[stage] = row
    return out

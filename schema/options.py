"""What a caller may ask besides the text: Bark's generation knobs and the output options.

Shared by every entry point: the HTTP models (serving/api_models.py), batch items' ``options``
(checked at submission), dataset rows' ``options`` (offline/rows.py) and the CLI's ``synth``.
"""

from __future__ import annotations

from typing import Annotated, Protocol

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from bark_serve.stages import constants as C
from bark_serve.stages.audio import PostProcess
from bark_serve.stages.types import GenerationParams, SamplingParams, check_seed

from .fields import NullMeansDefault


class AudioDefaults(Protocol):
    """The server's ``audio:`` block (serving/config.py AudioConfig): the joins a request did not set."""

    def post_process(self, **overrides) -> PostProcess: ...


class BarkOptions(NullMeansDefault):
    """Bark's knobs, accepted by both APIs (OpenAI-style requests carry them as extra fields).

    NaN and infinities are refused in every float field (Python's json accepts them). An optional
    field sent as null takes its default (``NullMeansDefault``); ``min_eos_p: null`` disables the threshold.
    """

    model_config = ConfigDict(allow_inf_nan=False)

    seed: Annotated[int | None, AfterValidator(check_seed)] = Field(None, description="same seed and input, same audio")
    temperature: float | None = Field(None, ge=0, le=100, description="every stage; 0 is greedy")
    semantic_temperature: float | None = Field(None, ge=0, le=100)
    coarse_temperature: float | None = Field(None, ge=0, le=100)
    fine_temperature: float | None = Field(None, ge=0, le=100)
    top_k: int | None = Field(None, ge=1, le=1_000_000, description="semantic and coarse stages")
    top_p: float | None = Field(None, gt=0, le=1, description="semantic and coarse stages")
    min_eos_p: float | None = Field(C.DEFAULT_MIN_EOS_P, gt=0, le=1, description="null disables the EOS threshold")
    max_semantic_tokens: int = Field(C.MAX_SEMANTIC_TOKENS, ge=1, le=C.MAX_SEMANTIC_TOKENS,
                                     description="cap per segment (768 is about 15 s)")

    def generation_params(self) -> GenerationParams:
        defaults = GenerationParams()
        stages = {}
        for stage in ("semantic", "coarse", "fine"):
            temp = getattr(self, f"{stage}_temperature")
            if temp is None:
                temp = self.temperature if self.temperature is not None else getattr(defaults, stage).temperature
            k, p = (self.top_k, self.top_p) if stage != "fine" else (None, None)
            stages[stage] = SamplingParams(temperature=temp, top_k=k, top_p=p)
        return GenerationParams(**stages, min_eos_p=self.min_eos_p, max_semantic_tokens=self.max_semantic_tokens,
                                seed=self.seed)


class OutputOptions(BaseModel):
    """How the audio comes out, on both APIs (and batch items' options): speed and the long-form joins.

    Every field left out or null takes the server's ``audio:`` config (serving/config.py AudioConfig, the
    ``AudioDefaults`` the methods take).
    ``trim_silence: false, crossfade_ms: 0, normalize_loudness: false`` (and speed 1) give the model's raw samples.
    """

    model_config = ConfigDict(allow_inf_nan=False)

    speed: float | None = Field(None, ge=0.25, le=4.0,
                                description="0.25-4, default 1: pitch-preserving time-stretch (Rubber Band)")
    trim_silence: bool | None = Field(None, description="cut each segment's leading and trailing silence")
    trim_threshold_db: float | None = Field(None, ge=-100, le=-1,
                                            description="silence: this many dB below the segment's loudest frame")
    crossfade_ms: float | None = Field(None, ge=0, le=500, description="segments join with a crossfade this long")
    normalize_loudness: bool | None = Field(None, description="bring the audio to target_lufs (ITU-R BS.1770)")
    target_lufs: float | None = Field(None, ge=-70, le=-5, description="integrated loudness target")

    def post_process(self, defaults: AudioDefaults) -> PostProcess:
        """This request's joining: ``defaults`` (an AudioConfig) with this request's values where given."""
        fields = ("trim_silence", "trim_threshold_db", "crossfade_ms", "normalize_loudness", "target_lufs")
        return defaults.post_process(speed=self.speed, **{k: getattr(self, k) for k in fields})


class SynthesisOptions(BarkOptions, OutputOptions):
    """Every option of one synthesis, on its own: a batch item's or a dataset row's ``options`` (unknown keys
    refused), and the base of the requests (schema/request.py)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

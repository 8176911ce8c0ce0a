"""The one configuration file of a bark-serve deployment (YAML, validated with pydantic).

The same file drives ``bark-serve up`` (local Ray), the rendered Ray Serve
config (``bark-serve render-config``, ``serve deploy``) and the Helm chart
(its ``bark:`` value block has this schema). Profiles live in
serving/configs/: ``local-cpu`` (the default), ``pipelined-gpu`` (one GPU pool
per stage) and ``single-gpu`` (all stages on one GPU, optional CPU offload).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bark_serve.cluster.placement import POOL_RESOURCE_PREFIX, pool_resource
from bark_serve.cluster.redis_conn import RedisSettings
from bark_serve.schema.untrusted import validation_message
from bark_serve.stages.audio import PostProcess
from bark_serve.stages.constants import STAGES
from bark_serve.stages.weights import cloning_weights

__all__ = ["POOL_RESOURCE_PREFIX", "AudioConfig", "BarkConfig", "BatchConfig", "ConfigError", "load_config",
           "parse_config"]

CONFIG_DIR = Path(__file__).parent / "configs"
DEPLOYMENT_NAMES = {"semantic": "SemanticServer", "coarse": "CoarseServer", "fine": "FineServer",
                    "codec": "CodecServer"}
INGRESS_NAME = "Orchestrator"
# OpenAI's voice names over Bark's ten English v2 presets (13 names, 10 presets: coral, nova and marin share
# en_speaker_9, onyx and cedar en_speaker_0). Bark presets are recorded speakers, so a name picks a timbre,
# not the OpenAI voice's style.
OPENAI_VOICES = {
    "alloy": "v2/en_speaker_6", "ash": "v2/en_speaker_4", "ballad": "v2/en_speaker_5", "coral": "v2/en_speaker_9",
    "echo": "v2/en_speaker_1", "fable": "v2/en_speaker_3", "onyx": "v2/en_speaker_0", "nova": "v2/en_speaker_9",
    "sage": "v2/en_speaker_8", "shimmer": "v2/en_speaker_2", "verse": "v2/en_speaker_7", "marin": "v2/en_speaker_9",
    "cedar": "v2/en_speaker_0",
}
BATCH_WORKER_NAME = "BatchWorker"
VOICE_ENCODER_NAME = "VoiceEncoder"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Autoscaling(_Strict):
    """Ray Serve autoscaling_config of one deployment."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(120.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError("autoscaling.max_replicas must be >= min_replicas")
        return self


class Placement(_Strict):
    """Where replicas run: their pool (a Ray custom resource) and what they reserve there."""

    pool: str | None = None  # None: no pool resource (runs anywhere, e.g. the head)
    num_replicas: int = Field(1, ge=1)
    autoscaling: Autoscaling | None = None
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(256, ge=-1)  # -1: unbounded (Ray Serve's default)

    @property
    def pool_resource(self) -> str | None:
        return pool_resource(self.pool) if self.pool else None


class StageConfig(Placement):
    """One stage deployment: placement plus how its engine runs."""

    max_batch: int = Field(8, ge=1, le=512)  # requests the engine holds (decodes) at once
    batch_wait_ms: float = Field(2.0, ge=0, le=1000)  # an idle loop waits this long to gather a batch
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # torch threads of the replica. "shared": on CPU, the host's cores leased per step among the stage
    # replicas of the host (cluster/cores.py: a lone replica gets every core, busy ones a fair share each,
    # never more threads than cores in all); on CUDA the same as "auto". "auto": every core this process
    # may use; None: torch's default, which under Ray is the replica's num_cpus (1 for a fractional num_cpus).
    torch_threads: Annotated[int, Field(ge=1)] | Literal["auto", "shared"] | None = None
    cpu_offload: bool = False  # accelerate CPU offload: weights on CPU, moved to the GPU per forward
    max_forward_tokens: int | None = Field(None, ge=1)  # rows per prefill/fine forward; None: automatic
    # fixed-shape steps replayed as CUDA graphs (stages/graphs.py): auto = on for CUDA, off on CPU
    cuda_graphs: Literal["auto", "on", "off"] = "auto"
    # batch sizes captured (a step is padded up to the next one); empty: 1, 2, 4, 8, 16, 24, 32, 48, 64, ...
    # up to max_batch, and max_batch itself
    graph_buckets: list[Annotated[int, Field(ge=1, le=512)]] = Field(default_factory=list, max_length=32)
    # a seed's sampled tokens bit for bit the same whatever requests share the batch (stages/invariance.py):
    # on CPU small batches padded and attention through SDPA's math kernel; on CUDA's fixed-shape path every
    # step of a kind at one shape (stages/engine.py, single_shape_for); a lone request decodes slower
    batch_invariant: bool = False


class OrchestratorConfig(Placement):
    max_ongoing_requests: int = Field(256, ge=1)
    max_queued_requests: int = Field(512, ge=-1)
    max_active_requests: int = Field(64, ge=1)  # synthesizing at once per replica; more get 429 + Retry-After
    max_text_chars: int = Field(20_000, ge=1)
    max_body_bytes: int = Field(2_000_000, ge=1024)
    segment_max_tokens: int = Field(200, ge=8, le=256)  # long text is split into segments of at most this
    # The first segment of a long text is cut shorter, so its audio (time to first audio) comes sooner;
    # null: the same budget as the others.
    first_segment_max_tokens: int | None = Field(48, ge=8, le=256)
    # calls one request has in each stage at once: a long text of many segments cannot fill a stage's queue
    max_segments_in_flight: int = Field(4, ge=1)
    request_timeout_s: float = Field(900.0, gt=0)
    api_keys_env: str | None = None  # env var holding comma-separated API keys; None or unset: no auth
    retry_after_s: int = Field(2, ge=1)


class AudioConfig(_Strict):
    """How long-form audio is joined (stages/audio.py): the defaults of every request, which may override each."""

    trim_silence: bool = True  # cut each segment's leading/trailing silence
    trim_threshold_db: float = Field(-40.0, ge=-100, le=-1)  # silence: this far below the segment's loudest frame
    trim_margin_ms: float = Field(40.0, ge=0, le=1000)  # kept around the sound
    crossfade_ms: float = Field(20.0, ge=0, le=500)  # joins fade over this long; 0: plain concatenation
    normalize_loudness: bool = True  # one gain per request, measured on its first audible segment
    target_lufs: float = Field(-18.0, ge=-70, le=-5)  # ITU-R BS.1770 integrated loudness
    max_gain_db: float = Field(30.0, ge=0, le=60)

    def post_process(self, **overrides) -> PostProcess:
        """The joining of one request: these defaults, with the request's own values where it gave them."""
        values = {**self.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
        return PostProcess(**values)


class BatchQuota(_Strict):
    """What one API key (one tenant; without keys, everyone together) may hold at once. null: no limit."""

    max_jobs_in_flight: int | None = Field(64, ge=1)  # jobs with items queued or running
    max_items_queued: int | None = Field(1_000_000, ge=1)  # items queued or running, over all its jobs
    max_result_bytes: int | None = Field(20 * 2**30, ge=1)  # results kept until their jobs expire
    # item requests kept in Redis by its jobs (cancelling drops them), until they expire; keep the sum over the
    # keys that submit below Redis's maxmemory (local_redis_maxmemory: 1gb), or one key can fill it for all
    max_request_bytes: int | None = Field(256 * 2**20, ge=1)
    max_follow_streams: int | None = Field(8, ge=1)  # concurrent `follow=true` result streams, per API replica

    def store_quota(self):
        """The part the job store checks at submission (cluster/quotas.py Quota)."""
        from bark_serve.cluster.quotas import Quota

        return Quota(self.max_jobs_in_flight, self.max_items_queued, self.max_result_bytes, self.max_request_bytes)


class BatchConfig(_Strict):
    """Durable batch jobs (Redis). Off unless enabled."""

    enabled: bool = False
    redis_url: str | None = None  # redis://[:password@]host:port/db, rediss:// for TLS; else $REDIS_URL
    redis_url_env: str | None = None  # env var holding the whole URL (e.g. from a Secret); beats redis_url
    redis_password_env: str | None = None  # env var holding the password; not REDIS_PASSWORD (KubeRay reserves it)
    redis_tls_ca_file: str | None = None
    key_prefix: str = Field("bark", pattern=r"^[A-Za-z0-9_.-]+$")  # two deployments may share one Redis
    # A folder every batch replica and API replica can read and write (one node, or a shared volume):
    # results bigger than inline_result_max_bytes are written there, not into Redis; files of expired jobs
    # are deleted. None: every result lives in Redis. `up` with its own Redis uses $BARK_STATE_DIR/results.
    results_dir: str | None = None
    inline_result_max_bytes: int = Field(256 * 1024, ge=0)  # 0: every result to results_dir
    # With a results_dir: once Redis holds more than this fraction of its maxmemory, results of any size go
    # there too, so that small results (mp3, opus) cannot fill Redis for every key. 1: off.
    inline_results_max_fraction: float = Field(0.5, gt=0, le=1)
    # The redis-server `up` starts itself (no redis_url): its memory cap. Policy noeviction: a full Redis
    # refuses writes (the API answers 503 store_full) instead of dropping queue state.
    local_redis_maxmemory: str = Field("1gb", pattern=r"^[0-9]+(b|kb|mb|gb|k|m|g)?$")
    result_ttl_s: int = Field(7 * 24 * 3600, ge=60)
    max_in_flight: int = Field(8, ge=1)  # items one worker replica has in the pipeline at once
    claim_timeout_s: float = Field(300.0, gt=0)  # an item held longer by a silent worker is reclaimed
    # One item's synthesis limit (then it is retried). None: no limit; heartbeats keep a live worker's item,
    # a dead worker's item is reclaimed after claim_timeout_s. orchestrator.request_timeout_s never applies.
    item_timeout_s: float | None = Field(None, gt=0)
    max_attempts: int = Field(3, ge=1)
    max_items: int = Field(100_000, ge=1)  # per submission
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)  # per submission
    quota: BatchQuota = BatchQuota()
    worker: Placement = Placement(num_cpus=0.25, max_ongoing_requests=4)  # num_replicas = number of workers

    def redis(self) -> RedisSettings:
        """The connection settings cluster/redis_conn.py takes."""
        return RedisSettings(self.redis_url, self.redis_url_env, self.redis_password_env, self.redis_tls_ca_file)


class VoiceCloningConfig(Placement):
    """Voice cloning (``POST /v1/voices``, stages/cloning.py): the VoiceEncoder deployment that turns a short
    recording into a Bark voice (HuBERT + the community's quantizer for the semantic prompt, EnCodec for
    the coarse and fine prompts), and where registered voices are kept."""

    enabled: bool = True
    # HuBERT base in the Hugging Face layout (a folder or a hub id) and the quantizer checkpoint (a file, or
    # "<hub repo>/<file>"); `bark-serve make-checkpoint` writes random ones under <checkpoint>/voice_cloning/.
    # None: <model>/voice_cloning/hubert and .../quantizer/quantifier_V1_hubert_base_ls960_23.pth when the
    # checkpoint is a folder that has them, else the hub ids below.
    hubert: str | None = None
    quantizer: str | None = None
    max_batch: int = Field(4, ge=1, le=64)  # clips one replica encodes at once (Serve's @serve.batch)
    batch_wait_ms: float = Field(20.0, ge=0, le=1000)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    max_upload_bytes: int = Field(16 * 1024 * 1024, ge=1024)  # a POST /v1/voices body, the file included
    min_audio_s: float = Field(1.0, gt=0)
    max_audio_s: float = Field(60.0, gt=0, le=600)  # longer clips are refused (the voice keeps at most ~13 s)
    max_voices_per_key: int | None = Field(100, ge=1)  # None: no quota
    # Registered voices live in the batch Redis when the config names one (batch enabled, or a redis_url),
    # else in this folder (None: $BARK_STATE_DIR/voices, else ~/.cache/bark-serve/voices).
    store_dir: str | None = None


class BarkConfig(_Strict):
    """The whole deployment."""

    app_name: str = "bark"
    model: str = "suno/bark-small"
    voices_dir: str | None = None  # extra directory of suno-style .npz presets
    # Every current OpenAI voice name -> a Bark preset (docs/API.md, "Voices"); a config may remap or add names.
    voice_aliases: dict[str, str] = Field(default_factory=lambda: dict(OPENAI_VOICES))
    http_host: str = "0.0.0.0"
    http_port: int = Field(8000, ge=1, le=65535)
    orchestrator: OrchestratorConfig = OrchestratorConfig()
    semantic: StageConfig = StageConfig(pool="semantic")
    coarse: StageConfig = StageConfig(pool="coarse")
    fine: StageConfig = StageConfig(pool="fine", max_batch=4)
    codec: StageConfig = StageConfig(pool="codec", max_batch=8)
    audio: AudioConfig = AudioConfig()
    batch: BatchConfig = BatchConfig()
    voice_cloning: VoiceCloningConfig = VoiceCloningConfig(num_cpus=0.1, max_ongoing_requests=16)

    @property
    def public_model(self) -> str:
        """The model's name as answers show it: the hub id as configured, or a local checkpoint's folder
        name (a local path tells a client about the server's disk)."""
        model = self.model.rstrip("/") or self.model
        local = model.startswith((".", "/", "~")) or Path(model).expanduser().is_dir()
        return Path(model).name if local else model

    def cloning_weights(self) -> tuple[str, str]:
        """(HuBERT, quantizer) as voice_cloning names them, else the checkpoint folder's voice_cloning/ (what
        ``make-checkpoint`` writes), else the hub's."""
        return cloning_weights(self.model, self.voice_cloning.hubert, self.voice_cloning.quantizer)

    def voice_store_redis(self) -> RedisSettings | None:
        """The Redis that keeps registered voices: the batch Redis when the config names one, else None."""
        b = self.batch
        return b.redis() if b.enabled or b.redis_url or b.redis_url_env else None

    def voice_store_dir(self) -> Path:
        """The folder that keeps registered voices when there is no Redis."""
        if self.voice_cloning.store_dir:
            return Path(self.voice_cloning.store_dir).expanduser()
        state = os.environ.get("BARK_STATE_DIR")
        return Path(state) / "voices" if state else Path.home() / ".cache" / "bark-serve" / "voices"

    def stage(self, name: str) -> StageConfig:
        if name not in STAGES:
            raise KeyError(name)
        return getattr(self, name)

    def pools(self) -> dict[str, list[str]]:
        """Pool name -> deployments placed on it."""
        out: dict[str, list[str]] = {}
        for name in STAGES:
            pool = self.stage(name).pool
            if pool:
                out.setdefault(pool, []).append(DEPLOYMENT_NAMES[name])
        placements: list[tuple[str, Placement]] = [(INGRESS_NAME, self.orchestrator)]
        if self.batch.enabled:
            placements.append((BATCH_WORKER_NAME, self.batch.worker))
        if self.voice_cloning.enabled:
            placements.append((VOICE_ENCODER_NAME, self.voice_cloning))
        for dep, placement in placements:
            if placement.pool:
                out.setdefault(placement.pool, []).append(dep)
        return out


class ConfigError(ValueError):
    """The configuration file is missing or invalid (the CLI exits with code 2)."""


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> BarkConfig:
    """Read a YAML config (a path or a profile name in serving/configs/); None gives the local-cpu profile.

    A file may start from a profile: ``profile: local-cpu`` takes that profile and then what the file
    names, block by block (``semantic: {max_batch: 4}`` changes that one field of the profile's block)."""
    path = _config_path(CONFIG_DIR / "local-cpu.yaml" if path is None else path)
    data = _read_yaml(path)
    if "profile" in data:
        name = data.pop("profile")
        if not isinstance(name, str) or name not in profiles():
            raise ConfigError(f"{path}: profile {str(name)[:60]!r} is not one of {', '.join(profiles())}")
        base = _read_yaml(CONFIG_DIR / f"{name}.yaml")
        base.pop("profile", None)
        data = merge_config(base, data)
    return parse_config({**data, **(overrides or {})}, source=str(path))


def merge_config(base: dict, override: dict) -> dict:
    """``override`` over ``base``, nested mappings merged key by key (a mapping over a non-mapping, or a
    list or a value anywhere, replaces)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = value
    return out


def _config_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists() and (CONFIG_DIR / f"{path}.yaml").exists():
        path = CONFIG_DIR / f"{path}.yaml"
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} not found (profiles: {', '.join(profiles())})")
    return path


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{at}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a config is UTF-8 YAML)") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file is a mapping of settings, not {type(data).__name__}")
    return data


def parse_config(data: dict, source: str = "config") -> BarkConfig:
    try:
        return BarkConfig.model_validate(data)
    except ValidationError as exc:
        problems = validation_message(exc)
        raise ConfigError(f"{source} is invalid: {problems}") from None


def profiles() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))

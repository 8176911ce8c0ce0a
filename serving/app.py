"""The Ray Serve application: four stage deployments and the orchestrator, from one BarkConfig.

``serve run bark_serve.serving.app:build_app`` / a Serve config's ``import_path`` call
:func:`build_app` with the config as ``args``; ``bark-serve up`` calls it too.
"""

from __future__ import annotations

from typing import cast

from ray.serve import Application, Deployment

from bark_serve.stages.constants import STAGES

from .config import BATCH_WORKER_NAME, DEPLOYMENT_NAMES, INGRESS_NAME, VOICE_ENCODER_NAME, BarkConfig, parse_config
from .orchestrator import Orchestrator
from .serve_config import deployment_options as _options
from .stage_server import StageServer, load_engine


def build_app(args: dict | BarkConfig) -> Application:
    """The Serve application builder (``import_path: bark_serve.serving.app:build_app``; ``args`` is the BarkConfig)."""
    return make_app(args if isinstance(args, BarkConfig) else parse_config(dict(args or {})))


def _deployment(cls: type) -> Deployment:
    """A ``@serve.deployment`` class, which the decorator made a Deployment (its typing does not say so)."""
    return cast(Deployment, cls)


def make_app(cfg: BarkConfig, engine_factory=load_engine) -> Application:
    """The application from a config; ``engine_factory`` is injectable (tests pass a fake engine)."""
    data = cfg.model_dump(mode="json")
    stages = {}
    for stage in STAGES:
        name = DEPLOYMENT_NAMES[stage]
        stages[stage] = _deployment(StageServer).options(name=name, **_options(cfg.stage(stage))).bind(
            stage, data, engine_factory)
    batch = None
    if cfg.batch.enabled:
        from .batch_app import BatchWorker

        worker = _deployment(BatchWorker).options(name=BATCH_WORKER_NAME, **_options(cfg.batch.worker))
        batch = worker.bind(data, *(stages[s] for s in STAGES))
    encoder = None
    if cfg.voice_cloning.enabled:
        from .voice_server import VoiceEncoder

        encoder = _deployment(VoiceEncoder).options(name=VOICE_ENCODER_NAME, **_options(cfg.voice_cloning)).bind(data)
    ingress = _deployment(Orchestrator).options(name=INGRESS_NAME, **_options(cfg.orchestrator))
    return ingress.bind(data, stages["semantic"], stages["coarse"], stages["fine"], stages["codec"], batch, encoder)

"""bark_serve.serving: the Ray Serve application.

What lives here: the generic stage deployment and its batching scheduler
(stage_server.py, scheduler.py: the scheduler is plain Python), the
orchestrator/ingress with the HTTP API (orchestrator.py, http_api.py,
api_models.py, errors.py), the segment pipeline (synthesis.py), the
batch-job HTTP router and worker deployment (batch_api.py, batch_app.py), the
one config file (config.py, configs/), its rendering as a Ray Serve config
(serve_config.py) and the app builder (app.py: ``bark_serve.serving.app:build_app``).

Layer: above ``bark_serve.cluster`` and ``bark_serve.stages``, which it may
import; never the CLI, the benchmark or ``bark_serve.offline``. Enforced by import-linter
(pyproject.toml, run by .ci/run).
"""

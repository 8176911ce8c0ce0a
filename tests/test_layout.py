"""The installed import names: one distinctive root, nothing bare that another folder could shadow."""

from __future__ import annotations

import subprocess
import sys

BARE = ("stages", "schema", "serving", "cluster", "offline", "bench", "cli")

_IMPORT_ALL = """
import importlib, pkgutil, sys
import bark_serve.stages, bark_serve.schema, bark_serve.cluster, bark_serve.serving, bark_serve.offline
import bark_serve.bench, bark_serve.cli
roots = [bark_serve.stages, bark_serve.schema, bark_serve.cluster, bark_serve.serving, bark_serve.offline,
         bark_serve.bench, bark_serve.cli]
for root in roots:
    for info in pkgutil.walk_packages(root.__path__, root.__name__ + "."):
        if not info.name.endswith(".__main__"):  # running it is `python -m`, not an import
            importlib.import_module(info.name)
print(sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1:])))
"""


def test_every_module_imports_under_bark_serve_and_nothing_bare(tmp_path):
    # From an empty directory, so that the checkout's folders are not on sys.path.
    out = subprocess.run([sys.executable, "-c", _IMPORT_ALL, *BARE], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_folder_named_serving_does_not_shadow_the_app(tmp_path):
    # A Ray working_dir or a user's project may hold a folder called serving/ or stages/.
    for name in ("serving", "stages", "cluster"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('the wrong package was imported')\n")
    code = "import bark_serve.serving.app, bark_serve.stages.pipeline, bark_serve.cluster.queue; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_the_request_schema_imports_no_torch():
    """bark_serve.schema is pydantic over stages' plain types: a client-side validator need not load torch."""
    code = ("import sys, bark_serve.schema.request, bark_serve.schema.formats, bark_serve.schema.untrusted; "
            "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-3000:])


def test_the_orchestrator_batch_worker_and_voice_encoder_start_without_torch(tiny_ckpt):
    """They load no weights, only the tokenizer and voice files: importing them and building their planner and
    synthesizer from a checkpoint must not load torch or transformers (about 3 s of CPU and 200 MB of memory
    per replica, on CPU-only orchestrator nodes too). Only stage replicas import torch at start; the voice
    encoder imports it with its weights, on the first clip."""
    code = ("import sys, bark_serve.serving.orchestrator, bark_serve.serving.batch_app\n"
            "import bark_serve.serving.voice_server\n"
            "from bark_serve.serving.config import parse_config\n"
            "from bark_serve.serving.stage_calls import make_synthesizer\n"
            f"synth = make_synthesizer(parse_config({{'model': {str(tiny_ckpt)!r}}}), handles={{}})\n"
            "plan = synth.planner.plan('Hello there. [laughter] How are you?', 'v2/en_speaker_6')\n"
            "print(len(plan.text_ids[0]) > 0, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "True []", (out.stdout, out.stderr[-3000:])


def test_no_test_session_module_is_bare():
    assert not {m.split(".")[0] for m in sys.modules} & set(BARE)


def test_the_image_copies_every_package_folder():
    """helm/Dockerfile installs the wheel from the folders it copies: each package folder must be there."""
    from pathlib import Path

    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    repo = Path(__file__).resolve().parents[1]
    folders = set(tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    dockerfile = (repo / "helm" / "Dockerfile").read_text()
    ignore = (repo / "helm" / "Dockerfile.dockerignore").read_text().split()
    for folder in folders:
        assert f"COPY --chown=1000:100 {folder} ./{folder}" in dockerfile, folder
        assert f"!{folder}/" in ignore, folder

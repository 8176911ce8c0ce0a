"""bark_serve.cli: the ``bark-serve`` command, the thin top layer.

What lives here: the parser (main.py) and one module per family of commands:
commands.py (synth, make-checkpoint, voices, render-config), up.py (up, say),
batch.py (batch submit/status/cancel) with its HTTP client in batch_client.py; common.py holds what they
share. ``bark-serve bench`` is registered from ``bark_serve.bench``.

Layer: the top. It may import every other ``bark_serve`` package, and nothing
imports it. Each command imports its heavy modules (torch, ray, transformers)
only when it runs, so ``--help`` answers at once. Enforced by import-linter
(pyproject.toml, run by .ci/run).
"""

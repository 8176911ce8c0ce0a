"""bark_serve.bench: the benchmark behind ``bark-serve bench``.

What lives here: transformers baselines, the engines in process, the served
app over HTTP, the whole-dataset paths (``bark-serve dataset`` and a
``/v1/batches`` job, offline_runs.py), GEMM peaks and the JSON report.

Layer: above ``bark_serve.offline`` (it may import offline, serving, cluster
and stages), below the CLI. Enforced by import-linter (pyproject.toml).
"""

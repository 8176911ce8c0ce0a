"""bark_serve.bench: the benchmark behind ``bark-serve bench``.

What lives here: transformers baselines, the engines in process, the served
app over HTTP, GEMM peaks and the JSON report.

Layer: above ``bark_serve.serving`` (it may import serving, cluster and
stages), below the CLI. Enforced by import-linter (pyproject.toml).
"""

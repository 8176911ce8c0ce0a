"""bark_serve.offline: dataset-scale offline synthesis on Ray Data (``bark-serve dataset``).

What lives here: reading a table of texts (JSONL, CSV, Parquet), validating its
rows as batch items are validated (rows.py), the five ``map_batches`` stages
(plan, then semantic, coarse, fine and codec over actor pools holding the stage
engines of ``bark_serve.stages``; udfs.py, stage_run.py), their resources from
the serving config (settings.py), the Parquet manifest and resume (manifest.py)
and the run itself with its summary (run.py).

Layer: above ``bark_serve.serving`` (it reuses the serving config, request
planning, audio encoding and the segment joins of stages/audio.py), below ``bark_serve.bench`` and the CLI. Enforced
by import-linter (pyproject.toml).
"""

"""The class-based UDFs of the ``map_batches`` stages: one planner, one stage worker per engine stage.

Ray Data builds one instance per actor of the pool; ``__call__`` takes one batch (a pyarrow Table)
and returns one with ``WORK_SCHEMA``. The codec worker also encodes each row's audio
(stages/audio.py) and writes it under the output directory, so waveforms never travel.
"""

from __future__ import annotations

import functools

import pyarrow as pa

from bark_serve.serving.config import parse_config
from bark_serve.stages.audio import join_segments
from bark_serve.stages.constants import STAGES
from bark_serve.stages.encoders import encode

from .outdir import OutDir
from .rows import (
    WORK_SCHEMA,
    Status,
    declared_id,
    failed_row,
    plan_row,
    raw_from_line,
    raw_from_table,
    row_post_process,
)
from .stage_run import run_stage


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in WORK_SCHEMA.names} for r in rows], schema=WORK_SCHEMA)


class RowPlanner:
    """Validate and plan input rows; drop those already done (resume)."""

    def __init__(self, config: dict, source: str, default_format: str, done_ids: frozenset[str] = frozenset()):
        from bark_serve.serving.stage_calls import make_planner
        from bark_serve.serving.voices_api import registered_voices_sync, voice_store

        cfg = parse_config(config)
        self.planner = make_planner(cfg)
        self.source, self.default_format, self.done = source, default_format, done_ids
        store = voice_store(cfg) if cfg.voice_cloning.enabled else None
        # rows may name the shared owner's registered voices (a server without API keys: POST /v1/voices)
        self.own_voices = None if store is None else functools.partial(
            registered_voices_sync, store, aliases=self.planner.aliases, spec=self.planner.text.spec)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for record in batch.to_pylist():
            if self.source == "jsonl":
                line = record["text"]
                if not line.strip():
                    continue
                raw, error = raw_from_line(line)
            else:
                raw, error, line = raw_from_table(record), None, None
            if declared_id(raw) in self.done:  # done in an earlier run: not planned (tokenized) again
                continue
            row = plan_row(raw, error, self.planner, self.default_format, line, self.own_voices)
            if row["id"] not in self.done:  # a made-up id of a bad row, recorded before
                out.append(row)
        return _table(out)


class StageWorker:
    """One engine stage over batches of rows (a subclass per stage names the stage in Ray's progress bars)."""

    stage = ""

    def __init__(self, config: dict, out: str | None = None):
        from bark_serve.serving.stage_server import core_budget, engine_options, load_engine
        from bark_serve.stages.weights import Checkpoint

        cfg = parse_config(config)
        options = engine_options(cfg.stage(self.stage))
        self.engine = load_engine(self.stage, cfg, options)
        self.cores = core_budget(cfg.stage(self.stage), options.device)  # torch_threads: shared
        self.sample_rate = Checkpoint.open(cfg.model).spec.sample_rate
        self.audio_config = cfg.audio
        self.out = OutDir(out) if out else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        busy = run_stage(self.engine, self.stage, rows, self.cores)
        node = _node_id()
        share = busy / max(1, len(rows))
        for row in rows:
            row[f"busy_s_{self.stage}"] = share
            row[f"node_{self.stage}"] = node
            if self.stage == "codec":
                self._write(row)
        return _table(rows)

    def _write(self, row: dict) -> None:
        segments = row.pop("audio", None)
        if row["status"] != Status.PENDING.value or segments is None:
            return
        try:
            # joined as the served app and batch jobs join them: trim, speed, loudness, crossfade
            audio = join_segments(segments, self.sample_rate, row_post_process(row["options"], self.audio_config))
            data = encode(audio, self.sample_rate, row["format"])
        except Exception as exc:  # this row's failure, never the run's (Ray Data does not retry a raising UDF)
            row.update(failed_row(row, f"joining or encoding the audio failed: {exc}"))
            return
        if self.out is None:
            raise RuntimeError("the codec worker writes audio: it needs an output directory (out)")
        try:
            row["path"] = self.out.write_audio(row["id"], row["format"], data)
        except OSError as exc:
            row.update(failed_row(row, f"writing the audio failed: {exc}"))
            return
        row.update(status=Status.OK.value, duration_s=len(audio) / self.sample_rate, voices=None,
                   speakers=None, text_ids=None, **{s: None for s in STAGES[:-1]})


class SemanticWorker(StageWorker):
    stage = "semantic"


class CoarseWorker(StageWorker):
    stage = "coarse"


class FineWorker(StageWorker):
    stage = "fine"


class CodecWorker(StageWorker):
    stage = "codec"


WORKERS = {w.stage: w for w in (SemanticWorker, CoarseWorker, FineWorker, CodecWorker)}

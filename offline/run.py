"""A dataset run: read the input, plan, four engine stages on Ray Data, write audio and the manifest.

::

    read (JSONL lines / CSV / Parquet) ─▶ plan ─▶ semantic ─▶ coarse ─▶ fine ─▶ codec+write ─▶ driver
                                         (each a map_batches over an actor pool on its own resources)
    driver: manifest parts as rows arrive, compaction and summary at the end

Ray Data's streaming executor runs the stages at once, with backpressure between them; the driver
receives only the small manifest columns (audio is written by the codec actors).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from bark_serve.schema.untrusted import clip
from bark_serve.serving.config import BarkConfig
from bark_serve.stages.constants import STAGES

from .manifest import MANIFEST, ManifestWriter, compact, done_ids, readable_manifest
from .outdir import OutDir, absolute, is_uri
from .rows import Status, declared_ids
from .settings import MapSpec, plan_spec, stage_specs
from .udfs import WORKERS, RowPlanner

INPUT_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet",
               ".pq": "parquet"}
COMPRESSION = (".gz", ".bz2", ".zst", ".lz4")
READ_CPUS = 0.25  # reading is light; a whole CPU per read task starves the stage actors on small machines
# Small blocks: a map task's outputs are merged into blocks of up to this size and handed on only when
# full or when the task ends, and a task takes whole blocks. Ray Data's 128 MiB default would hold
# thousands of rows in one block, so rows would reach the next stage (and the manifest) in big lumps.
BLOCK_BYTES = 64 << 10  # the default of RunOptions.block_bytes
RESULT_COLUMNS = ["id", "path", "format", "duration_s", "seed", "voice", "text", "options", "segments",
                  "semantic_tokens", "status", "error",
                  *[f"busy_s_{s}" for s in STAGES], *[f"node_{s}" for s in STAGES]]


class DatasetInputError(ValueError):
    """The input cannot be read as asked (the CLI exits with code 2)."""


@dataclass(frozen=True)
class RunOptions:
    input: str
    out: str
    input_kind: str = "auto"
    default_format: str = "wav"
    limit: int | None = None
    progress: bool = True
    flush_rows: int = 1000
    flush_s: float = 10.0
    block_bytes: int = BLOCK_BYTES


@dataclass
class Summary:
    rows_ok: int = 0
    rows_failed: int = 0
    rows_skipped: int = 0  # already ok in the manifest (resume)
    audio_s: float = 0.0
    wall_s: float = 0.0
    busy_s: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    nodes: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in STAGES})
    errors: dict[str, int] = field(default_factory=dict)  # most common failure reasons (first 5)
    manifest: str = ""

    @property
    def audio_hours(self) -> float:
        return self.audio_s / 3600

    @property
    def audio_s_per_wall_s(self) -> float:
        return self.audio_s / self.wall_s if self.wall_s else 0.0

    def add(self, batch: pa.Table) -> None:
        status = batch["status"].to_pylist()
        self.rows_ok += status.count(Status.OK.value)
        self.rows_failed += status.count(Status.FAILED.value)
        self.audio_s += sum(d for d, s in zip(batch["duration_s"].to_pylist(), status) if s == Status.OK.value and d)
        for stage in STAGES:
            self.busy_s[stage] += sum(x for x in batch[f"busy_s_{stage}"].to_pylist() if x)
            seen = set(self.nodes[stage])
            self.nodes[stage] += sorted({n for n in batch[f"node_{stage}"].to_pylist() if n and n not in seen})
        for error in batch["error"].to_pylist():
            if error and (error in self.errors or len(self.errors) < 5):
                self.errors[error] = self.errors.get(error, 0) + 1

    def as_dict(self) -> dict:
        return {**asdict(self), "audio_hours": round(self.audio_hours, 6),
                "audio_s_per_wall_s": round(self.audio_s_per_wall_s, 4),
                "busy_s": {k: round(v, 3) for k, v in self.busy_s.items()}}

    @property
    def exit_code(self) -> int:
        """What ``bark-serve dataset`` exits with: 1 when any row failed (as ``batch submit`` does, so that a
        pipeline notices), else 0."""
        return 1 if self.rows_failed else 0

    def lines(self) -> list[str]:
        busy = ", ".join(f"{s} {self.busy_s[s]:.1f} s" for s in STAGES)
        return [f"rows: {self.rows_ok} ok, {self.rows_failed} failed, {self.rows_skipped} already done (skipped)",
                f"audio: {self.audio_hours:.4f} h ({self.audio_s:.1f} s) in {self.wall_s:.1f} s wall = "
                f"{self.audio_s_per_wall_s:.3f} audio-s per wall-s",
                f"stage busy time: {busy}",
                *[f"failed {n}x: {e}" for e, n in self.errors.items()],
                f"manifest: {self.manifest}"]


def input_kind(path: str, kind: str = "auto") -> str:
    if kind != "auto":
        return kind
    name = path.rstrip("/").lower()
    for comp in COMPRESSION:
        name = name.removesuffix(comp)
    for ext, found in INPUT_KINDS.items():
        if name.endswith(ext):
            return found
    raise DatasetInputError(f"cannot tell the format of {path!r} from its name: pass --input-format "
                            "jsonl, csv or parquet")


def check_input(opts: RunOptions) -> tuple[str, str]:
    """(path, kind) of the input, or DatasetInputError before anything starts."""
    path = opts.input if is_uri(opts.input) else absolute(opts.input)
    if not is_uri(path) and not os.path.exists(path):
        raise DatasetInputError(f"input {opts.input!r} not found")
    kind = input_kind(opts.input, opts.input_kind)
    if kind == "parquet" and not is_uri(path):
        _check_parquet(path, opts.input)
    return path, kind


def _check_parquet(path: str, given: str) -> None:
    """A local Parquet input whose footers can be read (a file, or a folder of them), else DatasetInputError."""
    import pyarrow as pa
    import pyarrow.dataset as pds

    try:
        pds.dataset(path, format="parquet").schema  # noqa: B018  (reads every file's footer)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DatasetInputError(f"input {given!r} cannot be read as Parquet: {' '.join(str(exc).split())[:200]}") \
            from None


def check_out(opts: RunOptions) -> None:
    """An output folder whose manifest.parquet, if it has one, is a manifest this command wrote (else a
    DatasetInputError: a run would take none of its rows as done and replace it at the end)."""
    out = OutDir(opts.out)
    if out.exists(MANIFEST) and not readable_manifest(out):
        raise DatasetInputError(f"--out {opts.out!r} holds a {MANIFEST} that is not a bark-serve dataset manifest "
                                "(or is damaged): use another --out, or move that file away")


def csv_convert_options():
    """CSV cells as written: ids 001 and 1 stay two ids, and a numeric text or voice stays a string (the row
    check parses seed and options)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    return pcsv.ConvertOptions(column_types={c: pa.string() for c in ("id", "text", "voice", "format", "options")})


def read_input(opts: RunOptions):
    import ray.data

    path, kind = check_input(opts)
    readers: dict[str, Callable[..., ray.data.Dataset]] = {"jsonl": ray.data.read_text, "csv": ray.data.read_csv,
                                                            "parquet": ray.data.read_parquet}
    extra = {"convert_options": csv_convert_options()} if kind == "csv" else {}
    ds = readers[kind](path, num_cpus=READ_CPUS, **extra)
    return (ds.limit(opts.limit) if opts.limit else ds), kind


def check_unique_ids(opts: RunOptions) -> None:
    """Refuse an input that declares one id twice, before any synthesis (as a batch submission is
    refused): one read of the input for its ids. Raises DatasetInputError naming up to five."""
    import functools
    from collections import Counter

    ds, kind = read_input(opts)
    ids = ds.map_batches(functools.partial(declared_ids, source="jsonl" if kind == "jsonl" else "table"),
                         batch_format="pyarrow", num_cpus=READ_CPUS)
    counts = Counter(row["id"] for row in ids.iter_rows())
    twice = sorted(i for i, n in counts.items() if n > 1)
    if twice:
        shown = ", ".join(repr(clip(i, 60)) for i in twice[:5])
        raise DatasetInputError(f"{len(twice)} id(s) appear more than once in {opts.input!r}: {shown}"
                                f"{' ...' if len(twice) > 5 else ''}; every row needs its own id")


def _map(ds, fn, spec: MapSpec, **constructor):
    return ds.map_batches(fn, fn_constructor_kwargs=constructor, batch_format="pyarrow", **spec.kwargs())


def build_dataset(cfg: BarkConfig, opts: RunOptions, skip: frozenset[str]):
    """The lazy pipeline: input rows in, result rows (manifest columns and stage accounting) out."""
    ds, kind = read_input(opts)
    if kind == "parquet":
        # Ray Data lists Parquet files in a task of one whole CPU, a figure no option changes; once the stage
        # actors hold a small machine's CPUs that task never starts (2 CPUs: the run hung). Read first, then.
        ds = ds.materialize()
    config = cfg.model_dump(mode="json")
    ds = _map(ds, RowPlanner, plan_spec(cfg), config=config, source="jsonl" if kind == "jsonl" else "table",
              default_format=opts.default_format, done_ids=skip)
    for stage, spec in stage_specs(cfg).items():
        ds = _map(ds, WORKERS[stage], spec, config=config, out=absolute(opts.out))
    return ds


def run_dataset(cfg: BarkConfig, opts: RunOptions, on_rows: Callable[[pa.Table], None] | None = None) -> Summary:
    """Synthesize every row of ``opts.input`` not yet ok in ``opts.out``'s manifest (Ray must be initialized)."""
    from ray.data import DataContext

    out = OutDir(opts.out)
    out.makedirs()
    check_unique_ids(opts)
    skip = done_ids(out)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = opts.progress
    ctx.target_max_block_size = opts.block_bytes
    summary = Summary(rows_skipped=len(skip))
    writer = ManifestWriter(out, opts.flush_rows, opts.flush_s)
    t0 = time.perf_counter()
    try:
        for batch in build_dataset(cfg, opts, skip).iter_batches(batch_size=None, batch_format="pyarrow"):
            batch = batch.select(RESULT_COLUMNS)
            writer.add(batch)
            summary.add(batch)
            if on_rows is not None:
                on_rows(batch)
    finally:
        writer.flush()
    summary.wall_s = time.perf_counter() - t0
    compact(out)
    summary.manifest = out.path(MANIFEST)
    out.write_bytes("summary.json", (json.dumps(summary.as_dict(), indent=2) + "\n").encode())
    return summary

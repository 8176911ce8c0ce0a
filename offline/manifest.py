"""The Parquet manifest: one record per row, written as the run goes, compacted at its end; resume reads it.

The driver writes finished rows into part files (``manifest/part-<run>-<n>.parquet``, each written
whole through a rename) every ``flush_rows`` rows or ``flush_s`` seconds, so a run that is killed
keeps every row it had recorded. The next run reads the compacted manifest and every part, skips
the ids whose latest record is ok, and at its end compacts all of them into ``manifest.parquet``:
the ok record of each id if it has one, else its latest failed one.
"""

from __future__ import annotations

import io
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .outdir import OutDir
from .rows import Status

MANIFEST = "manifest.parquet"
MANIFEST_SCHEMA = pa.schema([
    ("id", pa.string()), ("path", pa.string()), ("format", pa.string()), ("duration_s", pa.float64()),
    ("seed", pa.int64()), ("voice", pa.string()), ("text", pa.string()), ("options", pa.string()),
    ("segments", pa.int64()), ("semantic_tokens", pa.int64()), ("status", pa.string()), ("error", pa.string()),
    ("run", pa.string()), ("finished_at", pa.timestamp("s", tz="UTC")),
])


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _read(out: OutDir, rel: str) -> pa.Table | None:
    """One manifest file, or None if it cannot be read (then its rows are simply done again)."""
    try:
        return pq.read_table(io.BytesIO(out.read_bytes(rel))).select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    except (OSError, pa.ArrowException, KeyError):
        return None


def readable_manifest(out: OutDir) -> bool:
    """Whether the compacted manifest reads as one (with the manifest's columns)."""
    return _read(out, MANIFEST) is not None


def part_files(out: OutDir) -> list[str]:
    return out.list("manifest", ".parquet")


def read_all(out: OutDir) -> pa.Table:
    """The compacted manifest and every part, oldest first."""
    files = ([MANIFEST] if out.exists(MANIFEST) else []) + part_files(out)
    tables = [t for t in (_read(out, f) for f in files) if t is not None]
    return pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()


def latest(records: pa.Table) -> pa.Table:
    """One record per id: its ok record if any, else its latest one."""
    keep: dict[str, int] = {}
    ids, statuses = records["id"].to_pylist(), records["status"].to_pylist()
    for i, (rid, status) in enumerate(zip(ids, statuses)):
        prev = keep.get(rid)
        if prev is None or status == Status.OK.value or statuses[prev] != Status.OK.value:
            keep[rid] = i
    return records.take(pa.array(sorted(keep.values()), pa.int64()))  # typed: an empty run has no rows


def done_ids(out: OutDir) -> frozenset[str]:
    records = read_all(out)
    ok = records.filter(pc.equal(records["status"], Status.OK.value))
    return frozenset(ok["id"].to_pylist())


def compact(out: OutDir) -> pa.Table:
    """Fold every part into manifest.parquet (written whole, then the parts are removed)."""
    parts = part_files(out)
    table = latest(read_all(out))
    out.write_bytes(MANIFEST, _parquet_bytes(table))
    for rel in parts:
        out.delete(rel)
    return table


class ManifestWriter:
    """Buffers finished rows and writes them as part files."""

    def __init__(self, out: OutDir, flush_rows: int = 1000, flush_s: float = 10.0):
        self.out, self.flush_rows, self.flush_s = out, flush_rows, flush_s
        self.run = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.parts = 0
        self.last_flush = time.monotonic()

    def add(self, rows: pa.Table) -> None:
        n = rows.num_rows
        extra = {"run": pa.array([self.run] * n, pa.string()),
                 "finished_at": pa.array([int(time.time())] * n, pa.int64()).cast(pa.timestamp("s", tz="UTC"))}
        cols = [extra[name] if name in extra else rows[name].cast(MANIFEST_SCHEMA.field(name).type)
                for name in MANIFEST_SCHEMA.names]
        self.buffer.append(pa.Table.from_arrays(cols, schema=MANIFEST_SCHEMA))
        self.buffered += n
        if self.buffered >= self.flush_rows or time.monotonic() - self.last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.buffered:
            return
        table = pa.concat_tables(self.buffer)
        self.out.write_bytes(f"manifest/part-{self.run}-{self.parts:06d}.parquet", _parquet_bytes(table))
        self.parts += 1
        self.buffer, self.buffered = [], 0

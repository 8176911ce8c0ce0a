"""The output directory of a run, on any filesystem pyarrow reads and writes (local, s3://, gs://, hdfs://).

Layout::

    OUT/audio/<id>.<ext>        one file per ok row (written by the codec actors)
    OUT/manifest/part-*.parquet manifest rows as the run goes (written by the driver)
    OUT/manifest.parquet        the compacted manifest (the latest record of every id), after each run
    OUT/summary.json            the last run's summary

On a cluster, OUT must be storage every node can write (a shared volume or an object store).
"""

from __future__ import annotations

import os
import uuid

import pyarrow.fs as pafs

EXTENSIONS = {"opus": "ogg"}  # format -> file extension where they differ


def is_uri(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    """A local path made absolute (actors on other processes resolve it the same way); URIs as given."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


class OutDir:
    def __init__(self, root: str):
        self.uri = absolute(root)
        self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
        self.root = self.root.rstrip("/")

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def makedirs(self) -> None:
        for sub in ("", "audio", "manifest"):
            self.fs.create_dir(self.path(sub) if sub else self.root, recursive=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write through a temporary name and rename, so a reader never sees half a file."""
        final = self.path(rel)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, final)

    def write_audio(self, row_id: str, fmt: str, data: bytes) -> str:
        """Write one row's audio; returns its path relative to OUT."""
        rel = f"audio/{row_id}.{EXTENSIONS.get(fmt, fmt)}"
        self.write_bytes(rel, data)
        return rel

    def list(self, sub: str, suffix: str) -> list[str]:
        """Paths (relative to OUT) of the files directly in ``sub`` ending in ``suffix``, sorted."""
        selector = pafs.FileSelector(self.path(sub), allow_not_found=True)
        names = [info.base_name for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File]
        return sorted(f"{sub}/{n}" for n in names if n.endswith(suffix))

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_file(self.path(rel)) as f:
            return f.read()

    def delete(self, rel: str) -> None:
        self.fs.delete_file(self.path(rel))

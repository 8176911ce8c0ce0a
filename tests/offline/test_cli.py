"""``bark-serve dataset`` as a user runs it: bad arguments exit 2 at once; a run killed midway and run
again ends with every row recorded once, none synthesized twice, none missing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.offline.conftest import manifest, offline_config

CLI = [sys.executable, "-m", "bark_serve.cli", "dataset"]


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["missing.jsonl"], "input 'missing.jsonl' not found"),
    (["{src}", "--format", "midi"], "unsupported response_format 'midi'"),
    (["{src}", "--limit", "0"], "--limit must be at least 1"),
    (["{txt}"], "cannot tell the format"),
    (["{src}", "--config", "no-such-profile"], "not found"),
    (["{src}", "--model", "{tmp}/no-model"], "no-model"),
])
def test_bad_arguments_exit_2_with_one_line(args, message, tmp_path):
    (tmp_path / "in.jsonl").write_text('{"id": "a", "text": "hi"}\n')
    (tmp_path / "in.txt").write_text("hi\n")
    args = [a.format(src=tmp_path / "in.jsonl", txt=tmp_path / "in.txt", tmp=tmp_path) for a in args]
    res = cli(*args, "--out", str(tmp_path / "out"))
    assert res.returncode == 2, res.stderr[-2000:]
    assert message in res.stderr and "Traceback" not in res.stderr
    assert "Ray instance" not in res.stderr  # refused before Ray starts


def test_a_local_ray_that_cannot_start_exits_2_and_leaves_no_temp_dir(tiny_ckpt, tmp_path):
    long = tmp_path / ("x" * 100)  # Ray's socket paths must stay under 108 bytes: none fits under this dir
    long.mkdir()
    (tmp_path / "in.jsonl").write_text('{"id": "a", "text": "hi"}\n')
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(long)}
    res = subprocess.run([*CLI, str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out"), "--model", str(tiny_ckpt)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "could not start a local Ray instance" in res.stderr and "Traceback" not in res.stderr
    assert list(long.iterdir()) == []


def test_help_imports_no_torch_or_ray():
    from tests.cli.test_cli_help import HEAVY, _imported_modules

    loaded = _imported_modules("dataset", "--help")
    assert not [m for m in HEAVY if m in loaded]


def _ray_pids(marker: str) -> list[int]:
    """Processes of the killed run's Ray instance (their command lines name its temp dir)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.fixture
def short_ray_tmp():
    """A RAY_TMPDIR short enough for Ray's socket paths (tmp_path is too long), removed after the test."""
    path = tempfile.mkdtemp(prefix="bark-dsr-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_a_killed_run_resumes_without_doing_a_row_twice(tiny_ckpt, tmp_path, short_ray_tmp):
    n = 24  # enough that the first rows are out long before the last (each stage takes one row per call)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"row{i}", "text": f"Sentence number {i}.", "seed": i,
                                       "options": {"max_semantic_tokens": 24}}) + "\n" for i in range(n)))
    stages = {s: {**offline_config(str(tiny_ckpt))[s], "max_batch": 1} for s in ("semantic", "coarse", "fine", "codec")}
    config = tmp_path / "bark.yaml"
    config.write_text(yaml.safe_dump({**offline_config(str(tiny_ckpt)), **stages}))
    out = tmp_path / "out"
    ray_tmp = short_ray_tmp
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    args = [*CLI, str(src), "--out", str(out), "--config", str(config), "--num-cpus", "4", "--no-progress",
            "--manifest-flush-s", "0", "--block-bytes", "1"]  # rows move on one by one

    first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list((out / "manifest").glob("part-*.parquet")) and time.time() < deadline:
            assert first.poll() is None, "the first run ended before it was interrupted"
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before it was interrupted"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
        for pid in _ray_pids(ray_tmp):  # whatever of its Ray instance outlived the process group
            os.kill(pid, signal.SIGKILL)
    parts = [pq.read_table(p).to_pylist() for p in sorted((out / "manifest").glob("part-*.parquet"))]
    done_first = {r["id"]: r["run"] for part in parts for r in part if r["status"] == "ok"}
    assert 0 < len(done_first) < n and not (out / "manifest.parquet").exists()

    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"rows: {n - len(done_first)} ok, 0 failed, {len(done_first)} already done" in second.stdout
    records = manifest(out)  # asserts no id twice
    assert sorted(records) == sorted(f"row{i}" for i in range(n)) and all(r["status"] == "ok" for r in records.values())
    for rid, run in done_first.items():
        assert records[rid]["run"] == run  # kept from the first run, not synthesized again
    assert len({r["run"] for r in records.values()}) == 2
    assert sorted(p.name for p in (out / "audio").iterdir()) == sorted(f"{rid}.wav" for rid in records)
    assert list((out / "manifest").iterdir()) == []


@pytest.mark.slow
def test_parquet_input_on_two_cpus_with_the_default_profile(tiny_ckpt, tmp_path, short_ray_tmp):
    """The local-cpu profile's stage actors take both CPUs of a 2-CPU instance; Ray Data lists Parquet files in a
    task of one whole CPU, which then never started: the run hung (JSONL and CSV ran). The input is now read
    before the stage actors start."""
    rows = [{"id": f"p{i}", "text": f"Parquet row {i}.", "options": {"max_semantic_tokens": 8}} for i in range(2)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    env = {**os.environ, "RAY_TMPDIR": short_ray_tmp}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "out"
    res = subprocess.run([*CLI, str(tmp_path / "in.parquet"), "--out", str(out), "--model", str(tiny_ckpt),
                          "--num-cpus", "2", "--no-progress"], env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rows: 2 ok, 0 failed" in res.stdout, res.stdout
    assert sorted(manifest(out)) == ["p0", "p1"]

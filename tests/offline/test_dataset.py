"""Dataset runs on a real local Ray (one instance for the module): JSONL and Parquet inputs, bad rows,
audio equal to the in-process pipeline, the summary, and a stage actor killed mid-run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bark_serve.offline.run import DatasetInputError, RunOptions, run_dataset
from bark_serve.serving.config import parse_config
from tests.offline.conftest import (
    GOOD_ROWS,
    SCRIPT_ROW,
    assert_same_audio,
    audio_of,
    manifest,
    offline_config,
    reference,
)

pytestmark = pytest.mark.slow

BAD_LINES = [json.dumps({"id": "empty", "text": " "}), json.dumps({"id": "voice", "text": "hi", "voice": "nobody"}),
             json.dumps({"id": "opts", "text": "hi", "options": {"temperature": "hot"}}), "{broken"]


@pytest.fixture(scope="module")
def ray_local(tiny_ckpt):
    import ray

    from bark_serve.serving.serve_config import pool_resources

    cfg = parse_config(offline_config(str(tiny_ckpt)))
    tmp = tempfile.mkdtemp(prefix="bark-ds-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    ray.init(address="local", num_cpus=4, resources=pool_resources(cfg), include_dashboard=False,
             configure_logging=False, log_to_driver=False, _temp_dir=tmp)
    yield cfg
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def check_good_rows(out: Path, records: dict, pipe) -> None:
    for row in GOOD_ROWS:
        rec = records[str(row["id"])]
        assert rec["status"] == "ok" and rec["error"] is None, rec
        assert rec["path"] == f"audio/{row['id']}.wav" and rec["format"] == "wav"
        audio = audio_of(out, rec)
        assert rec["duration_s"] == pytest.approx(len(audio) / 24_000)
        assert rec["seed"] == row.get("seed", rec["seed"]) and rec["semantic_tokens"] > 0
        assert rec["options"] == (json.dumps(row["options"], sort_keys=True) if "options" in row else None)
        ref = np.clip(reference(pipe, {**row, "seed": rec["seed"]}), -1, 1)  # 16-bit files clip at full scale
        assert_same_audio(audio, ref)
    assert records["long"]["segments"] >= 2 and records["long"]["voice"] == "v2/en_speaker_6"


def test_jsonl_rows_bad_rows_and_summary(ray_local, pipe, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([json.dumps(r) for r in [*GOOD_ROWS, SCRIPT_ROW]] + BAD_LINES) + "\n")
    out = tmp_path / "out"
    summary = run_dataset(ray_local, RunOptions(str(src), str(out), progress=False))
    records = manifest(out)
    check_good_rows(out, records, pipe)
    script = records["script"]  # a multi-speaker script row: the in-process pipeline's script audio
    assert script["status"] == "ok" and script["segments"] == 4, script
    assert_same_audio(audio_of(out, script), np.clip(reference(pipe, SCRIPT_ROW), -1, 1))
    failed = {k: r["error"] for k, r in records.items() if r["status"] == "failed"}
    assert len(failed) == 4 and failed["empty"] == "text is empty" and "nobody" in failed["voice"]
    assert "temperature" in failed["opts"] and all(r["path"] is None for r in records.values() if r["error"])
    written = sorted(p.name for p in (out / "audio").iterdir())
    assert written == sorted(f"{r['id']}.wav" for r in [*GOOD_ROWS, SCRIPT_ROW])
    assert list((out / "manifest").iterdir()) == []  # compacted
    assert (summary.rows_ok, summary.rows_failed, summary.rows_skipped) == (len(GOOD_ROWS) + 1, 4, 0)
    assert summary.exit_code == 1  # `bark-serve dataset` exits 1 when rows failed (it exited 0: issue 25)
    assert summary.audio_s == pytest.approx(sum(r["duration_s"] for r in records.values() if r["duration_s"]))
    assert all(summary.busy_s[s] > 0 and len(summary.nodes[s]) == 1 for s in summary.busy_s)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["rows_ok"] == len(GOOD_ROWS) + 1 and saved["audio_s_per_wall_s"] > 0

    # The same command again: everything ok is skipped, the failed rows are tried (and fail) again.
    again = run_dataset(ray_local, RunOptions(str(src), str(out), progress=False))
    assert (again.rows_ok, again.rows_failed, again.rows_skipped) == (0, 4, len(GOOD_ROWS) + 1)
    assert manifest(out) == {**records, **{k: manifest(out)[k] for k in failed}}
    assert {k: r["run"] for k, r in manifest(out).items() if r["status"] == "ok"} == \
        {k: r["run"] for k, r in records.items() if r["status"] == "ok"}


def test_parquet_input_with_struct_options(ray_local, pipe, tmp_path):
    # options: a struct column (a field a row lacks is null there); seed: nullable int64
    table = pa.Table.from_pylist([{"id": str(r["id"]), **{k: r.get(k) for k in ("text", "voice", "seed", "options")}}
                                  for r in GOOD_ROWS])
    assert pa.types.is_struct(table.schema.field("options").type)
    pq.write_table(table, tmp_path / "in.parquet")
    out = tmp_path / "out"
    summary = run_dataset(ray_local, RunOptions(str(tmp_path / "in.parquet"), str(out), progress=False, limit=10))
    assert (summary.rows_ok, summary.rows_failed) == (len(GOOD_ROWS), 0) and summary.exit_code == 0
    check_good_rows(out, manifest(out), pipe)


def _fine_actors() -> list[dict]:
    from ray._private import state

    return [a for a in state.actors().values() if "FineWorker" in a["ActorClassName"]]


def _kill_fine_once_busy(killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the fine actor 1 s after it is up (loading its engine or working on its first rows)."""
    while not stop.is_set():
        alive = [a for a in _fine_actors() if a["State"] == "ALIVE"]
        if alive:
            time.sleep(1.0)
            os.kill(alive[0]["Pid"], signal.SIGKILL)
            killed.append(alive[0]["Pid"])
            return
        time.sleep(0.2)


def test_a_stage_actor_killed_mid_run_costs_only_a_retry(ray_local, tiny_ckpt, tmp_path):
    """SIGKILL the fine actor mid-run: Ray restarts it and retries its batches; every row ends ok exactly once."""
    rows = [{"id": f"r{i}", "text": f"Row number {i} of the killed run.", "seed": i,
             "options": {"temperature": 0, "max_semantic_tokens": 6}} for i in range(16)]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    killed: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_kill_fine_once_busy, args=(killed, stop), daemon=True)
    watcher.start()
    # fine takes one row per call, so it has work queued for a while
    cfg = ray_local.model_copy(update={"fine": ray_local.fine.model_copy(update={"max_batch": 1})})
    try:
        summary = run_dataset(cfg, RunOptions(str(tmp_path / "in.jsonl"), str(tmp_path / "out"), progress=False))
    finally:
        stop.set()
        watcher.join()
    assert killed, "the fine actor never came up"
    assert summary.rows_ok == 16 and summary.rows_failed == 0
    records = manifest(tmp_path / "out")
    assert sorted(records) == sorted(r["id"] for r in rows) and all(r["status"] == "ok" for r in records.values())
    fine = [{k: a.get(k) for k in ("ActorID", "State", "Pid", "NumRestarts")} for a in _fine_actors()]
    assert any(int(a["NumRestarts"] or 0) >= 1 for a in fine), fine  # the same actor, restarted in a new process


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_duplicate_ids_are_refused_before_any_synthesis(ray_local, tmp_path, kind):
    """Issue 25: dataset accepted duplicate ids (the second row overwrote the first's audio); batch jobs refuse them."""
    rows = [{"id": "a", "text": "one"}, {"id": "b", "text": "two"}, {"id": "a", "text": "three"},
            {"id": "7", "text": "four"}, {"id": "7", "text": "five"}, {"id": "c", "text": "six"}]
    src = tmp_path / f"in.{kind}"
    if kind == "jsonl":
        src.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    else:
        src.write_text("id,text\n" + "".join(f"{r['id']},{r['text']}\n" for r in rows))
    out = tmp_path / "out"
    with pytest.raises(DatasetInputError, match=r"2 id\(s\) appear more than once.*'7', 'a'"):
        run_dataset(ray_local, RunOptions(str(src), str(out), progress=False))
    assert not list((out / "audio").glob("*")) and not (out / "manifest.parquet").exists()


@pytest.mark.parametrize("content", ["", "\n\n", "id,text\n"], ids=["empty", "blank-lines", "csv-header-only"])
def test_an_input_without_rows_ends_with_zero_rows(ray_local, tmp_path, content):
    """No rows (an empty file, blank lines, a CSV header alone): a run of zero rows and an empty manifest. It
    crashed in compaction (pyarrow's take of an untyped empty index)."""
    src = tmp_path / ("in.csv" if content.startswith("id,") else "in.jsonl")
    src.write_text(content)
    out = tmp_path / "out"
    summary = run_dataset(ray_local, RunOptions(str(src), str(out), progress=False))
    assert (summary.rows_ok, summary.rows_failed) == (0, 0)
    assert manifest(out) == {} and json.loads((out / "summary.json").read_text())["rows_ok"] == 0

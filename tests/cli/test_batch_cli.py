"""The batch CLI against a real server on localhost: uvicorn + the batch router + an in-process worker."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI

from bark_serve.cli.batch import BatchClient, add_batch_commands, run, submit_and_fetch
from bark_serve.cluster.batch_types import BatchKeys
from bark_serve.cluster.batch_worker import BatchWorkerLoop
from bark_serve.cluster.jobs import JobStore
from bark_serve.cluster.ports import free_port
from bark_serve.cluster.queue import WorkQueue
from bark_serve.serving.batch_api import batch_router
from tests.cluster.helpers import FakeSynth, expected_audio
from tests.cluster.redis_server import prefix, redis_server  # noqa: F401  (fixtures)


class LiveServer:
    """The router on a real uvicorn (own thread and loop), with one worker loop running in its lifespan."""

    def __init__(self, redis_url: str, prefix: str, synth: FakeSynth, max_in_flight: int = 4):
        keys = BatchKeys(prefix)

        @contextlib.asynccontextmanager
        async def lifespan(app):
            client = aioredis.Redis.from_url(redis_url)
            worker = BatchWorkerLoop(WorkQueue(client, keys=keys), synth, max_in_flight=max_in_flight,
                                     claim_timeout_s=5)
            task = asyncio.create_task(worker.run())
            yield
            await worker.stop(grace_s=0.5)
            await task
            await client.aclose()

        app = FastAPI(lifespan=lifespan)
        app.include_router(batch_router(lambda: JobStore(aioredis.Redis.from_url(redis_url), keys=keys)))
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def synth() -> FakeSynth:
    return FakeSynth(delay_s=0.005)


@pytest.fixture
def server(redis_server, prefix, synth):
    with LiveServer(redis_server.url, prefix, synth, max_in_flight=2) as live:
        yield live


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="bark-serve")
    add_batch_commands(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(list(argv)))


def write_items(path: Path, items: list) -> Path:
    path.write_text("".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items))
    return path


def test_submit_writes_audio_metadata_and_failures(server, synth, tmp_path, capsys):
    items = [{"id": f"s{n}", "text": f"say {n}", "format": "flac" if n % 2 else "wav"} for n in range(22)]
    items += [{"id": "empty", "text": ""}, {"id": "fmt", "text": "x", "format": "ogg"},
              {"id": "bad", "text": "INVALID voice", "voice": "nobody"}, {"text": "id from the line index"}]
    src = write_items(tmp_path / "items.jsonl", items)
    out = tmp_path / "out"
    assert cli("batch", "submit", str(src), "--out", str(out), "--url", server.url, "--quiet") == 1  # some failed
    err = capsys.readouterr().err
    assert "23/26 items" in err and "3 failed" in err and "failed.jsonl" in err
    for n in range(22):
        fmt = "flac" if n % 2 else "wav"
        assert (out / f"s{n}.{fmt}").read_bytes() == expected_audio(f"s{n}", f"say {n}")
        meta = json.loads((out / f"s{n}.json").read_text())
        assert meta["id"] == f"s{n}" and meta["format"] == fmt and meta["sample_rate"] == 24000
    assert (out / "25.wav").read_bytes() == expected_audio("25", "id from the line index")
    failed = {json.loads(line)["id"]: json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()}
    assert set(failed) == {"empty", "fmt", "bad"}
    assert "unknown voice" in failed["bad"]["error"]["message"]
    calls = sum(synth.calls.values())
    # a re-run has nothing left to send or fetch, and the server does no work twice
    assert cli("batch", "submit", str(src), "--out", str(out), "--url", server.url, "--quiet") == 1
    assert "23/26 items" in capsys.readouterr().err
    assert sum(synth.calls.values()) == calls == 24  # 23 succeeded + the one synthesize refused

    job_id = json.loads((out / ".bark-batch.json").read_text())["job_id"]
    assert cli("batch", "status", job_id, "--url", server.url) == 0
    assert "completed; 23 succeeded, 3 failed" in capsys.readouterr().out


def test_submit_resumes_after_interruption(server, synth, tmp_path):
    synth.delay_s = 0.15  # 24 items, 2 at a time: ~1.8 s of work
    src = write_items(tmp_path / "items.jsonl", [{"id": f"r{n:02d}", "text": f"resume {n}"} for n in range(24)])
    out = tmp_path / "out"
    client = BatchClient(server.url)
    first = submit_and_fetch(src, out, client, timeout_s=0.6, progress=False)
    assert not first.complete and 0 < first.written < 24
    cursor = json.loads((out / ".bark-batch.json").read_text())["cursor"]
    assert cursor != "0"
    second = submit_and_fetch(src, out, client, progress=False)
    assert second.complete and second.status == "completed" and second.job_id == first.job_id
    assert second.skipped == first.written and second.written == 24 - first.written  # nothing fetched twice
    assert sorted(p.name for p in out.glob("*.wav")) == [f"r{n:02d}.wav" for n in range(24)]
    assert all(count == 1 for count in synth.calls.values()) and len(synth.calls) == 24
    # an output file lost after the fact is fetched again (from before the saved cursor), not recomputed
    (out / "r03.wav").unlink()
    third = submit_and_fetch(src, out, client, progress=False)
    assert third.complete and third.written == 1 and (out / "r03.wav").read_bytes() == expected_audio("r03", "resume 3")
    assert len(synth.calls) == 24 and sum(synth.calls.values()) == 24


def test_status_cancel_and_errors(server, synth, tmp_path, capsys):
    synth.delay_s = 5.0  # nothing finishes during this test
    src = write_items(tmp_path / "items.jsonl", [{"text": f"t{n}"} for n in range(6)])
    assert cli("batch", "submit", str(src), "--out", str(tmp_path / "o"), "--url", server.url, "--no-wait") == 0
    job_id = capsys.readouterr().out.strip()
    assert job_id.startswith("b_")
    assert cli("batch", "cancel", job_id, "--url", server.url) == 0
    assert "cancelled" in capsys.readouterr().out
    assert cli("batch", "status", job_id, "--url", server.url, "--json") == 0
    assert json.loads(capsys.readouterr().out)["counts"]["cancelled"] == 6

    def one_line_error(code: int, *argv: str) -> str:
        assert cli(*argv) == code
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"bark-serve batch {argv[1]}: error: ")
        assert "Traceback" not in err
        return err

    assert "404" in one_line_error(2, "batch", "status", "b_" + "0" * 32, "--url", server.url)
    assert "cannot read" in one_line_error(2, "batch", "submit", str(tmp_path / "nope.jsonl"), "--out", "o",
                                           "--url", server.url)
    bad = write_items(tmp_path / "bad.jsonl", [{"text": "ok"}, "{oops"])
    assert "bad.jsonl:2: not valid JSON" in one_line_error(2, "batch", "submit", str(bad), "--out",
                                                          str(tmp_path / "o2"), "--url", server.url)
    assert "cannot reach" in one_line_error(1, "batch", "status", job_id, "--url", f"http://127.0.0.1:{free_port()}")

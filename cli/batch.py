"""``bark-serve batch submit|status|cancel``: the client side of durable batch jobs.

``submit items.jsonl --out DIR`` sends the items (JSONL, one object a line,
``id`` defaulting to the line's 0-based index) in chunks under one job key
(``--job-key``, default a hash of the file), then streams the results into
DIR: ``<id>.<format>`` (audio) and ``<id>.json`` (metadata); failed items are
listed in ``DIR/failed.jsonl``. It is resumable: DIR/.bark-batch.json keeps
the job id and the results cursor, a re-run sends only items with no audio in
DIR (the server skips ids it already has) and fetches results from the saved
cursor. Exit codes: 0 all done, 1 some items failed / job cancelled / server
unreachable, 2 bad input, 3 ``--timeout`` ran out (re-run to resume).

A running submit rides out outages (Redis restarting, the ingress or a worker
restarting, overload): connection errors and 5xx/429 answers are retried with
exponential backoff and jitter until ``--timeout`` (without it, until one
outage has lasted ``MAX_OUTAGE_S``), with one notice line per outage on
stderr. Re-sending a chunk is harmless: the job key makes submission
idempotent. Only items the job reports as failed count as failures.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

from bark_serve.cluster.batch_types import AUDIO_FORMATS, ITEM_ID_RE

from .batch_client import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    TRANSIENT,
    BatchClient,
    OutOfTime,
    Retrier,
    ServerBusy,
)
from .common import DEFAULT_URL, URL_ENV, CliError, number, server_url

STATE_FILE = ".bark-batch.json"
FAILED_FILE = "failed.jsonl"
CHUNK_ITEMS = 1000
CHUNK_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class LocalItem:
    id: str
    line: str  # the JSON object to send (with its id made explicit)
    format: str


@dataclass
class SubmitSummary:
    """What one ``submit`` run did."""

    job_id: str | None = None
    total: int = 0
    skipped: int = 0  # audio already in DIR (or listed as failed) before this run
    sent: int = 0
    fetched: int = 0  # results received in this run
    written: int = 0
    failed_ids: set[str] = field(default_factory=set)
    present: int = 0  # items whose audio is in DIR at the end
    status: str = "unknown"
    complete: bool = False


def read_items(path: Path) -> list[LocalItem]:
    """Items of a JSONL file, ids made explicit; CliError (exit 2) on anything unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read {path}: {exc}") from None
    items, seen = [], set()
    for index, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise CliError(f"{path}:{index + 1}: not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise CliError(f"{path}:{index + 1}: expected a JSON object")
        item_id = obj.get("id", index)
        if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or not ITEM_ID_RE.match(str(item_id)):
            raise CliError(f"{path}:{index + 1}: id must be a string or integer matching {ITEM_ID_RE.pattern}")
        item_id = str(item_id)
        if item_id in seen:
            raise CliError(f"{path}:{index + 1}: duplicate id {item_id!r}")
        seen.add(item_id)
        fmt = obj.get("format", "wav")
        items.append(LocalItem(item_id, json.dumps({**obj, "id": item_id}), fmt if fmt in AUDIO_FORMATS else "wav"))
    if not items:
        raise CliError(f"{path} has no items")
    return items


def _chunks(items: list[LocalItem]):
    chunk: list[str] = []
    size = 0
    for item in items:
        if chunk and (len(chunk) >= CHUNK_ITEMS or size + len(item.line) > CHUNK_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(item.line)
        size += len(item.line) + 1
    if chunk:
        yield chunk


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class OutputDir:
    """DIR: audio + metadata per item, failed.jsonl, and the resume state."""

    def __init__(self, path: Path):
        self.path = path
        if path.exists() and not path.is_dir():
            raise CliError(f"--out {str(path)!r} exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        self.state = self._load_json(path / STATE_FILE) or {}
        self.failed: dict[str, dict] = {}
        if (path / FAILED_FILE).exists():
            for n, line in enumerate((path / FAILED_FILE).read_text(errors="replace").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    self.failed[str(rec["id"])] = rec
                except (ValueError, KeyError, TypeError):
                    raise CliError(f"{path / FAILED_FILE}:{n} is not a record this command wrote (an object with "
                                   "an id); move the file away, or use another --out") from None

    @staticmethod
    def _load_json(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def has(self, item: LocalItem) -> bool:
        return (self.path / f"{item.id}.{item.format}").exists()

    def save_state(self, **changes) -> None:
        self.state.update(changes)
        _write_atomic(self.path / STATE_FILE, json.dumps(self.state).encode())

    def write_result(self, rec: dict) -> None:
        """A succeeded record -> <id>.json then <id>.<format> (the audio marks the item as done)."""
        meta = {k: v for k, v in rec.items() if k not in ("audio", "type")}
        _write_atomic(self.path / f"{rec['id']}.json", json.dumps(meta, indent=1).encode())
        _write_atomic(self.path / f"{rec['id']}.{rec['format']}", base64.b64decode(rec["audio"]))
        if self.failed.pop(rec["id"], None) is not None:
            self._write_failed()

    def write_failure(self, rec: dict) -> None:
        self.failed[rec["id"]] = {"id": rec["id"], "error": rec.get("error"), "attempts": rec.get("attempts")}
        self._write_failed()

    def _write_failed(self) -> None:
        lines = "".join(json.dumps(r) + "\n" for r in self.failed.values())
        _write_atomic(self.path / FAILED_FILE, lines.encode())


def submit_and_fetch(items_path: Path, out: Path, client: BatchClient, *, job_key: str | None = None,
                     wait: bool = True, timeout_s: float | None = None, progress: bool = True) -> SubmitSummary:
    """Submit what DIR lacks and fetch results until the job is finished (or ``timeout_s``)."""
    items = read_items(items_path)
    outdir = OutputDir(out)
    job_key = job_key or "cli-" + hashlib.sha256(items_path.read_bytes()).hexdigest()[:32]
    summary = SubmitSummary(total=len(items))
    todo = [i for i in items if not outdir.has(i) and i.id not in outdir.failed]
    summary.skipped = len(items) - len(todo)
    same_job = outdir.state.get("job_key") == job_key
    job_id, cursor = (outdir.state.get("job_id"), outdir.state.get("cursor", "0")) if same_job else (None, "0")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    retrier = Retrier(deadline)
    try:
        for chunk in _chunks(todo):
            answer = retrier.call(client.submit, chunk, job_key)  # idempotent under the job key
            if answer["id"] != job_id:  # a new job (first run, or the old one expired or was cancelled)
                job_id, cursor = answer["id"], "0"
                outdir.save_state(job_key=job_key, job_id=job_id, cursor=cursor)
            summary.sent += len(chunk)
    except OutOfTime:  # not everything is sent: a re-run sends the rest
        summary.job_id, summary.status = job_id, "submitting"
        summary.failed_ids = set(outdir.failed)
        summary.present = sum(outdir.has(i) for i in items)
        return summary
    summary.job_id = job_id
    if job_id is None or not todo or not wait:
        summary.complete = not todo
        summary.status = "completed" if not todo else "submitted"
        summary.failed_ids = set(outdir.failed)
        summary.present = sum(outdir.has(i) for i in items)
        return summary
    bar = tqdm(total=len(items), initial=summary.skipped, unit="item", disable=not progress or None,
               desc=job_id[:12], file=sys.stderr)
    try:
        resumed = cursor != "0"
        _follow(client, job_id, cursor, outdir, bar, retrier, summary, {i.id for i in todo}, save=True)
        missing = {i.id for i in todo if not outdir.has(i) and i.id not in outdir.failed}
        if summary.complete and resumed and missing:  # results before the saved cursor whose files were lost
            summary.complete = False
            _follow(client, job_id, "0", outdir, bar, retrier, summary, missing, save=False)
    except OutOfTime:
        pass  # summary.complete stays False: exit 3, a re-run resumes from the saved cursor
    finally:
        bar.close()
    summary.failed_ids = set(outdir.failed)
    summary.present = sum(outdir.has(i) for i in items)
    return summary


def _follow(client: BatchClient, job_id: str, cursor: str, outdir: OutputDir, bar, retrier: Retrier,
            summary: SubmitSummary, wanted: set[str], save: bool) -> None:
    """Stream results from ``cursor`` into DIR until the end record says complete.

    A broken stream, an in-band error record or a 5xx/429 answer is an outage: ``retrier`` waits it out
    (or raises OutOfTime) and the stream resumes from the last cursor, so no result is fetched twice.
    """
    while not summary.complete:
        remaining = None if retrier.deadline is None else retrier.deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return
        try:
            for rec in client.results(job_id, cursor, wait_s=min(remaining or 120.0, 120.0)):
                if rec["type"] != "error":
                    retrier.ok()
                if rec["type"] == "result" and (save or rec["id"] in wanted):
                    summary.fetched += 1
                    if rec["state"] == "succeeded" and "error" not in rec:
                        outdir.write_result(rec)
                        summary.written += 1
                    else:
                        outdir.write_failure(rec)
                    bar.update(1 if rec["id"] in wanted else 0)
                elif rec["type"] == "end":
                    summary.status, summary.complete = rec["status"], rec["complete"]
                if rec.get("cursor", cursor) != cursor:
                    cursor = rec["cursor"]
                    if save:
                        outdir.save_state(cursor=cursor)
                if rec["type"] == "error":  # the server lost its store mid-stream: an outage like any other
                    raise ServerBusy(f"the server's job store broke mid-stream: {rec['error']['message']}")
        except TRANSIENT as exc:  # resume from the cursor once the server is back
            retrier.wait(exc)


def _client(args) -> BatchClient:
    return BatchClient(server_url(args.url), args.api_key or os.environ.get("BARK_API_KEY"))


def cmd_submit(args) -> int:
    s = submit_and_fetch(Path(args.items), Path(args.out), _client(args), job_key=args.job_key,
                         wait=not args.no_wait, timeout_s=args.timeout, progress=not args.quiet)
    if args.no_wait:
        print(s.job_id or "nothing to submit")
        return EXIT_OK
    line = (f"{s.job_id or 'no job yet'}: {s.status}; {s.present}/{s.total} items in {args.out}, "
            f"{len(s.failed_ids)} failed")
    if not s.complete:
        print(f"{line}; not finished, re-run the same command to resume", file=sys.stderr)
        return EXIT_TIMEOUT
    if s.status == "cancelled":
        print(f"{line}; the job was cancelled", file=sys.stderr)
        return EXIT_FAILED
    if s.failed_ids:
        print(f"{line} (see {Path(args.out) / FAILED_FILE})", file=sys.stderr)
        return EXIT_FAILED
    print(line, file=sys.stderr)
    return EXIT_OK


def format_status(job: dict) -> str:
    c = job["counts"]
    text = (f"{job['id']}: {job['status']}; {c['succeeded']} succeeded, {c['failed']} failed, "
            f"{c['queued']} queued, {c['running']} running, {c['cancelled']} cancelled of {c['total']}")
    stages = {k: v for k, v in (job.get("stages") or {}).items() if v}
    if stages:  # where the running items are: semantic 3, coarse 1, ...
        text += " (" + ", ".join(f"{k} {v}" for k, v in stages.items()) + ")"
    if job.get("rate_items_per_s"):
        text += f"; {job['rate_items_per_s']:.2f} items/s"
    if job.get("eta_s") is not None:
        text += f", ETA {job['eta_s']:.0f} s"
    return text


def cmd_status(args) -> int:
    job = _client(args).status(args.job_id)
    print(json.dumps(job, indent=1) if args.json else format_status(job))
    return EXIT_OK


def cmd_cancel(args) -> int:
    print(format_status(_client(args).cancel(args.job_id)))
    return EXIT_OK


def add_batch_commands(subparsers) -> argparse.ArgumentParser:
    """Add ``batch submit|status|cancel`` to a CLI; each sets ``args.handler`` (call :func:`run` with args)."""
    batch = subparsers.add_parser("batch", help="durable batch jobs (submit a JSONL file, follow, cancel)",
                                  description="Durable batch jobs on a server started with batch enabled "
                                              "(`bark-serve up --batch`). Items are kept in Redis and each result "
                                              "is written exactly once; submit resumes where it stopped.")
    sub = batch.add_subparsers(dest="batch_command", required=True, metavar="SUBCOMMAND")

    def common(p):
        p.add_argument("--url", help=f"server URL (default ${URL_ENV}, else {DEFAULT_URL})")
        p.add_argument("--api-key", help="API key (default $BARK_API_KEY)")

    p = sub.add_parser("submit", help="submit items.jsonl and write results to --out (resumable)",
                       description="Submit the items of a JSONL file as one job, follow it with a progress bar "
                                   "and write <id>.<format>, <id>.json and failed.jsonl into --out. Re-running the "
                                   "same command resumes. Exit codes: 0 done, 1 failed items or cancelled, "
                                   "2 bad input, 3 --timeout ran out.")
    p.add_argument("items", help="JSONL file: one {id?, text or script, voice?, seed?, format?, options?} a line")
    p.add_argument("--out", required=True, help="directory for <id>.<format>, <id>.json and failed.jsonl")
    p.add_argument("--job-key", help="idempotency key of the job (default: a hash of the file)")
    p.add_argument("--timeout", type=number(float, 0, above=True),
                   help="stop waiting after this many seconds (exit 3; re-run resumes)")
    p.add_argument("--no-wait", action="store_true", help="submit, print the job id and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    common(p)
    p.set_defaults(handler=cmd_submit)
    for name, handler, text in (("status", cmd_status, "show a job's status and progress"),
                                ("cancel", cmd_cancel, "cancel a job")):
        p = sub.add_parser(name, help=text, description=f"{text[0].upper()}{text[1:]} (the id `submit` printed).")
        p.add_argument("job_id", help="the job id (submit prints it; also in DIR/.bark-batch.json)")
        if name == "status":
            p.add_argument("--json", action="store_true", help="print the raw status object")
        common(p)
        p.set_defaults(handler=handler)
    return batch


def run(args) -> int:
    """Run the handler ``add_batch_commands`` chose; errors become one line on stderr and an exit code."""
    prefix = f"bark-serve batch {args.batch_command}"
    error = f"{prefix}: error:"  # the same shape as every other command's errors
    try:
        return args.handler(args)
    except CliError as exc:
        print(f"{error} {exc}", file=sys.stderr)
        return exc.code
    except httpx.HTTPError as exc:
        print(f"{error} cannot reach the server: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130

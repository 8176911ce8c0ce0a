"""The README is executable: its shell and Python examples run, as printed, against a live app.

Every ```bash / ```sh / ```python block runs, in order, in one temporary working directory (bash
with ``-euo pipefail``, Python with this interpreter), except a block right after a
``<!-- readme-test: skip ... -->`` comment (installing, the hub, the test suite itself). These
substitutions make it fast and let it run beside other test runs; they change no command:

- ``.venv/bin/`` is this interpreter's bin directory;
- ``localhost:8000`` / ``127.0.0.1:8000`` is a free port, and ``BARK_URL`` names it (the CLI's default
  server is port 8000);
- ``/tmp/bark-small`` is a temporary directory and ``--size small`` is ``--size tiny`` (a small
  checkpoint takes a minute to write, and every request several times longer);
- a ``bark-serve up ...`` line starts the test's one server in the background (with ``--port``,
  ``--num-cpus 2``, and ``--batch`` if any ``up`` line of the README has it; later ``up`` lines reuse
  it). The Ray address it prints is exported as ``RAY_ADDRESS``, with ``RAY_AUTH_MODE=token``, as its
  ready line tells the user to.

At the end the server gets SIGTERM, as from a script, and must stop cleanly.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import soundfile as sf

from bark_serve.cluster.ports import free_port
from tests.cli.up_process import UpProcess

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = "<!-- readme-test: skip"
BLOCK = re.compile(r"^```(bash|sh|python)\n(.*?)^```$", re.M | re.S)
UP_LINE = re.compile(r"^\s*(?:\S*/)?bark-serve up\b(.*)$")
MAX_SKIPS = 3


@dataclass
class Block:
    lang: str
    code: str
    line: int  # where it starts in README.md
    skipped: bool


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for m in BLOCK.finditer(text):
        before = text[: m.start()].rstrip().splitlines()
        skipped = bool(before) and before[-1].strip().startswith(SKIP)
        blocks.append(Block(m.group(1), m.group(2), text[: m.start()].count("\n") + 1, skipped))
    return blocks


def test_readme_blocks_are_found_and_few_are_skipped():
    blocks = readme_blocks(README.read_text())
    runnable = [b for b in blocks if not b.skipped]
    assert len(runnable) >= 8 and {b.lang for b in runnable} >= {"bash", "python"}
    assert sum(b.skipped for b in blocks) <= MAX_SKIPS
    for b in blocks:
        if b.lang == "python":
            compile(b.code, f"README.md:{b.line}", "exec")


class ReadmeRun:
    """Runs the blocks in order, holding the one server the README's `up` lines start."""

    def __init__(self, tmp: Path, wants_batch: bool):
        self.tmp, self.wants_batch = tmp, wants_batch
        self.cwd = tmp / "work"
        self.cwd.mkdir()
        self.port = free_port()
        self.up: UpProcess | None = None
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                    "BARK_STATE_DIR": str(tmp / "state"), "RAY_AUTH_MODE": "token"}
        for var in ("BARK_SERVE_URL", "RAY_ADDRESS"):
            self.env.pop(var, None)
        self.env["BARK_URL"] = f"http://127.0.0.1:{self.port}"

    def substitute(self, code: str) -> str:
        code = code.replace(".venv/bin/", f"{Path(sys.executable).parent}/")
        code = re.sub(r"(localhost|127\.0\.0\.1):8000", f"127.0.0.1:{self.port}", code)
        code = code.replace("/tmp/bark-small", str(self.tmp / "bark-small"))
        return code.replace("--size small", "--size tiny")

    def run_block(self, block: Block) -> None:
        code = self.substitute(block.code)
        if block.lang == "python":
            return self._run([sys.executable, "-c", code], block)
        script: list[str] = []
        for line in code.splitlines():
            up = UP_LINE.match(line)
            if up is None:
                script.append(line)
                continue
            self._run_bash(script, block)
            script = []
            self.start_up(up.group(1).split("#")[0].split())
        self._run_bash(script, block)

    def _run_bash(self, lines: list[str], block: Block) -> None:
        if any(line.strip() for line in lines):
            self._run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)], block)

    def _run(self, cmd: list[str], block: Block) -> None:
        res = subprocess.run(cmd, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, (f"README.md:{block.line} ({block.lang}) exited {res.returncode}\n"
                                     f"{block.code}\nstdout: {res.stdout[-2000:]}\nstderr: {res.stderr[-3000:]}")

    def start_up(self, args: list[str]) -> None:
        if self.up is not None:  # the README starts `up` more than once: the first server serves them all
            return
        args = [a for a in args if a != "--batch"] + (["--batch"] if self.wants_batch else [])
        self.up = UpProcess([*args, "--port", self.port, "--num-cpus", "2"], self.tmp / "up.log", env=self.env)
        ready = self.up.wait_ready(300)
        assert ready["url"] == f"http://127.0.0.1:{self.port}"
        assert ("/v1/batches" in ready["routes"]) == self.wants_batch
        exports = re.search(r"Python: export ((?:[A-Z_]+=\S+ ?)+)", self.up.log())
        assert exports and f"RAY_ADDRESS={ready['ray']}" in exports.group(1), self.up.log()[-2000:]
        for assignment in exports.group(1).split():  # what the ready line says to export
            name, value = assignment.split("=", 1)
            self.env[name] = value


@pytest.mark.slow
def test_readme_examples_run_against_a_live_app(tmp_path):
    text = README.read_text()
    blocks = [b for b in readme_blocks(text) if not b.skipped]
    wants_batch = any("--batch" in m.group(1) for b in blocks for m in map(UP_LINE.match, b.code.splitlines()) if m)
    run = ReadmeRun(tmp_path, wants_batch)
    try:
        for block in blocks:
            run.run_block(block)
        assert run.up is not None, "no README block starts `bark-serve up`"
        work = run.cwd
        assert sf.info(work / "hello.wav").samplerate == 24000
        assert 0.5 < sf.info(work / "hello.wav").duration < 8  # the checkpoint's own end of speech: ~1-4 s
        assert sf.info(work / "dialogue.wav").duration > 0 and sf.info(work / "dialogue.flac").duration > 0
        if wants_batch:
            assert (work / "results" / "p1.flac").exists() and (work / "results" / "p2.wav").exists()
            assert sf.info(work / "results" / "p3.wav").duration > 0  # a script item
        stopped = run.up.stop(signal.SIGTERM)  # as a script's `kill` would
        assert stopped.returncode == 0 and "bark-serve: stopped" in stopped.log, stopped.log[-3000:]
        assert stopped.seconds < 20, f"took {stopped.seconds:.1f} s"
        assert not stopped.leftovers, f"left behind: {stopped.leftovers}"
    finally:
        if run.up is not None:
            run.up.kill()

"""The README and the pages in docs/ are executable: their shell and Python examples run, as printed,
against a live app, and their relative links lead somewhere.

Every ```bash / ```sh / ```python block of README.md and then of docs/*.md (in name order) runs, in
order, in one temporary working directory (bash with ``-euo pipefail``, Python with this interpreter),
except a block right after a ``<!-- readme-test: skip ... -->`` comment (installing, the hub, the test
suite itself, benchmark runs). These substitutions make it fast and let it run beside other test runs;
they change no command:

- ``.venv/bin/`` is this interpreter's bin directory;
- ``localhost:8000`` / ``127.0.0.1:8000`` is a free port, and ``BARK_URL`` names it (the CLI's default
  server is port 8000);
- ``/tmp/bark-small`` is a temporary directory and ``--size small`` is ``--size tiny`` (a small
  checkpoint takes a minute to write, and every request several times longer);
- a ``bark-serve up ...`` line starts the test's one server in the background (with ``--port``,
  ``--num-cpus 2``, and ``--batch`` if any ``up`` line of any page has it; later ``up`` lines reuse
  it). The Ray address it prints is exported as ``RAY_ADDRESS``, with ``RAY_AUTH_MODE=token``, as its
  ready line tells the user to.

At the end the server gets SIGTERM, as from a script, and must stop cleanly.

Every relative link (``[text](path)``, ``[text](path#anchor)``, ``[text](#anchor)``, images too) in
README.md, docs/*.md and the chart's README must name a file or folder that exists and, when it names
an anchor in a Markdown file, a heading of that file (anchors as GitHub makes them).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest
import soundfile as sf

from bark_serve.cluster.ports import free_port
from tests.cli.up_process import UpProcess

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]  # whose examples run, in this order (the README makes the checkpoint and starts `up`)
LINKED = [*PAGES, ROOT / "helm" / "bark-serve" / "README.md"]  # whose relative links must resolve
SKIP = "<!-- readme-test: skip"
BLOCK = re.compile(r"^```(bash|sh|python)\n(.*?)^```$", re.M | re.S)
UP_LINE = re.compile(r"^\s*(?:\S*/)?bark-serve up\b(.*)$")
MAX_SKIPS = 3  # per page
MORE_SKIPS = {"docs/BENCHMARKS.md": 6}  # every block there is a benchmark run (minutes to hours, or the GPU machine)


@dataclass
class Block:
    lang: str
    code: str
    line: int  # where it starts in its page
    skipped: bool
    page: str = "README.md"  # relative to the repository root

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def readme_blocks(text: str, page: str = "README.md") -> list[Block]:
    blocks = []
    for m in BLOCK.finditer(text):
        before = text[: m.start()].rstrip().splitlines()
        skipped = bool(before) and before[-1].strip().startswith(SKIP)
        blocks.append(Block(m.group(1), m.group(2), text[: m.start()].count("\n") + 1, skipped, page))
    return blocks


def page_blocks(path: Path) -> list[Block]:
    return readme_blocks(path.read_text(), str(path.relative_to(ROOT)))


def test_readme_blocks_are_found_and_few_are_skipped():
    readme = [b for b in page_blocks(README) if not b.skipped]
    assert {b.lang for b in readme} >= {"bash", "python"}  # the front door's own examples run
    runnable = []
    for path in PAGES:
        blocks = page_blocks(path)
        page = str(path.relative_to(ROOT))
        assert sum(b.skipped for b in blocks) <= MORE_SKIPS.get(page, MAX_SKIPS), page
        runnable += [b for b in blocks if not b.skipped]
        for b in blocks:
            if b.lang == "python":
                compile(b.code, b.where, "exec")
    assert len(runnable) >= 8 and {b.lang for b in runnable} >= {"bash", "python"}


FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")


def prose(text: str) -> str:
    """The text outside fenced code blocks (a ``# comment`` there is no heading, a ``[x](y)`` no link)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the text as rendered, lower case, punctuation dropped, spaces as -."""
    text = CODE_SPAN.sub(lambda m: m.group(0).strip("`").strip(), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = prose(path.read_text())
    seen: dict[str, int] = {}
    out = set(HTML_ANCHOR.findall(text))
    for m in HEADING.finditer(text):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers repeated headings
    return out


def links(path: Path) -> list[tuple[int, str]]:
    text = CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), prose(path.read_text()))
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in LINK.finditer(text)]


def test_slug_matches_githubs_anchors():
    assert slug("Audio output: formats, streaming, speed, long-form joins") == \
        "audio-output-formats-streaming-speed-long-form-joins"
    assert slug("`POST /v1/audio/speech` (OpenAI-compatible)") == "post-v1audiospeech-openai-compatible"
    assert slug("EPYC, 2 cores, 2026-11-26 (the 0.64 s workload)") == "epyc-2-cores-2026-11-26-the-064-s-workload"
    assert slug("SIGTERM of `bark-serve up`") == "sigterm-of-bark-serve-up"


def test_relative_links_point_at_files_and_headings_that_exist():
    bad = []
    checked = 0
    for page in LINKED:
        for line, target in links(page):
            if not target or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            checked += 1
            path_part, _, anchor = unquote(target).partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            where = f"{page.relative_to(ROOT)}:{line}: ({target})"
            if not dest.exists():
                bad.append(f"{where} no such file")
            elif ROOT not in (dest, *dest.parents):
                bad.append(f"{where} points outside the repository")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{where} no heading with this anchor in {dest.relative_to(ROOT)}")
    assert checked >= 20, f"only {checked} relative links found: is the link pattern broken?"
    assert not bad, "\n".join(bad)


class ReadmeRun:
    """Runs the blocks in order, holding the one server the pages' `up` lines start."""

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
        assert res.returncode == 0, (f"{block.where} ({block.lang}) exited {res.returncode}\n"
                                     f"{block.code}\nstdout: {res.stdout[-2000:]}\nstderr: {res.stderr[-3000:]}")

    def start_up(self, args: list[str]) -> None:
        if self.up is not None:  # the pages start `up` more than once: the first server serves them all
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
    blocks = [b for path in PAGES for b in page_blocks(path) if not b.skipped]
    wants_batch = any("--batch" in m.group(1) for b in blocks for m in map(UP_LINE.match, b.code.splitlines()) if m)
    run = ReadmeRun(tmp_path, wants_batch)
    try:
        for block in blocks:
            run.run_block(block)
        assert run.up is not None, "no block of the README or docs/ starts `bark-serve up`"
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

"""`bark-serve up` as a background process of its own session, as a script would start it, and the
checks that it stops cleanly: exit 0, "stopped" printed, in a few seconds, nothing left behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

READY = re.compile(r"bark-serve is up: (?P<url>http://\S+)\s+Ray: (?P<ray>\S+)\s+app: '(?P<app>[^']+)'\s+"
                   r"routes: (?P<routes>.*)$", re.M)


@dataclass
class Stopped:
    returncode: int
    seconds: float
    log: str
    leftovers: list[str]  # "pid name" of processes of its session, or descendants, still alive


class UpProcess:
    """One `bark-serve up ARGS` in its own session (start_new_session), its output in a log file."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None):
        self.log_path = log_path
        self.log_file = open(log_path, "w+")
        cmd = [sys.executable, "-m", "bark_serve.cli", "up", *map(str, args)]
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        self.descendants: set[psutil.Process] = set()

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, pattern: str | re.Pattern, timeout_s: float) -> re.Match:
        """Wait until the log matches; remembers the process's descendants meanwhile (for the leftover check)."""
        deadline = time.time() + timeout_s
        while True:
            self._remember_descendants()
            m = re.search(pattern, self.log())
            if m:
                return m
            assert self.proc.poll() is None, f"up exited with {self.proc.returncode}:\n{self.log()[-3000:]}"
            assert time.time() < deadline, f"not seen in {timeout_s} s: {pattern}\n{self.log()[-3000:]}"
            time.sleep(0.5)

    def wait_ready(self, timeout_s: float = 300) -> re.Match:
        return self.wait_for(READY, timeout_s)

    def _remember_descendants(self) -> None:
        try:
            self.descendants.update(psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass

    def stop(self, sig: int, timeout_s: float = 60) -> Stopped:
        """Send ``sig`` to up alone (as `kill` from a script does) and wait; then look for leftovers."""
        self._remember_descendants()
        t0 = time.monotonic()
        os.kill(self.proc.pid, sig)
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            rc = -999
        seconds = time.monotonic() - t0
        _, alive = psutil.wait_procs(list(self.descendants), timeout=5)
        alive = set(alive) | set(self._session_members())
        return Stopped(rc, seconds, self.log(), sorted(f"{p.pid} {_name(p)}" for p in alive))

    def _session_members(self) -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == self.proc.pid and p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except (ProcessLookupError, psutil.Error):
                pass
        return out

    def listening(self) -> set[tuple[str, int, str]]:
        """(address, port, process name) of every socket up's processes listen on (session members included)."""
        self._remember_descendants()
        procs = {p.pid: p for p in [*self.descendants, *self._session_members()]}
        procs[self.proc.pid] = psutil.Process(self.proc.pid)
        out = set()
        for c in psutil.net_connections("inet"):
            if c.status == psutil.CONN_LISTEN and c.pid in procs:
                out.add((c.laddr.ip, c.laddr.port, _name(procs[c.pid])))
        return out

    def kill(self) -> None:
        """Last resort in a test's finally: kill the session and every remembered descendant."""
        for p in list(self.descendants) + self._session_members():
            try:
                p.kill()
            except psutil.Error:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.log_file.close()


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return "?"

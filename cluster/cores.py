"""One CPU host's cores, shared by the stage replicas that run on it (``torch_threads: shared``).

Stage replicas on one host that each run torch on every core oversubscribe it whenever several work at
once (measured on 2 cores: the fine stage lost a third of its GEMM rate while coarse ran), and replicas
given a fixed share leave cores idle whenever one works alone (a third less throughput). Here the cores
are leased per engine step instead:

- a replica with work is *busy*; before a step it asks for a fair share of the host's cores: the cores
  divided by the replicas busy now, rounded up, at least one;
- it takes that many of the free cores (fewer if fewer are free, never none), runs the step on that
  many torch threads, and gives them back. A lone replica gets every core; four busy replicas on two
  cores run two steps at a time, one core each;
- a replica that finds no core free waits, and waiters are served oldest first: a replica that has just
  given its cores back cannot take them again ahead of one that was waiting (no stage starves).

Between processes the state is a folder of files, one folder per host (``BARK_CORES_DIR``, default
``/dev/shm/bark-serve-cores-<uid>``): ``core-<i>``, locked (flock) by the step running on core ``i``;
``busy-<pid>-<id>``, locked by its replica while it has work; ``wait-<pid>-<id>``, locked while its
replica waits for a core, holding the time it began waiting. flock locks go with their process, so a
replica that dies mid-step frees its cores at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["CoreBudget", "default_folder", "host_cores"]

_STAMP = struct.Struct("<d")


def host_cores() -> int:
    """The cores this process may run on (its CPU affinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_folder() -> Path:
    """Where the replicas of this host meet: ``$BARK_CORES_DIR``, else a folder in /dev/shm (memory) per user."""
    if os.environ.get("BARK_CORES_DIR"):
        return Path(os.environ["BARK_CORES_DIR"])
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"bark-serve-cores-{os.getuid()}"


def _locked_by_another(path: str) -> bool | None:
    """True if some other open file holds a lock on ``path``; None if the file is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # drops the shared lock, if it was taken


class CoreBudget:
    """This replica's side of the host's cores. ``lease()`` around each engine step; ``idle()`` when it has no
    work left. One step at a time per budget (a replica steps its engine from one thread)."""

    def __init__(self, cores: int | None = None, folder: str | Path | None = None, poll_s: float = 0.0005,
                 on_grant: Callable[[int], None] | None = None):
        self.cores = max(1, cores or host_cores())
        self.folder = Path(folder) if folder else default_folder()
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.poll_s = poll_s
        self.on_grant = on_grant  # called with the thread count before each step (torch.set_num_threads)
        flags = os.O_RDWR | os.O_CREAT
        self._core_fds = [os.open(self.folder / f"core-{i}", flags, 0o600) for i in range(self.cores)]
        me = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._busy_path = str(self.folder / f"busy-{me}")
        self._wait_path = str(self.folder / f"wait-{me}")
        self._busy_fd = os.open(self._busy_path, flags, 0o600)
        self._wait_fd = os.open(self._wait_path, flags, 0o600)
        self._busy = False
        self._sweep()
        self._first = os.getpid() % self.cores  # where this replica starts looking: replicas spread over cores
        self.waited_s = 0.0  # time spent waiting for cores (the benchmark's figure)
        self.leases = 0
        self.threads_granted = 0

    def _sweep(self) -> None:
        """Remove the busy and wait files of replicas that are gone (they hold no lock any more)."""
        for entry in self._others(""):
            parts = entry.name.split("-")
            if parts[0] not in ("busy", "wait") or len(parts) != 3 or not parts[1].isdigit():
                continue
            try:
                os.kill(int(parts[1]), 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            except OSError:  # another user's process: alive
                pass

    # -- busy / idle ----------------------------------------------------------------------------
    def busy(self) -> None:
        if not self._busy:
            fcntl.flock(self._busy_fd, fcntl.LOCK_EX)  # blocks only while another replica is counting
            self._busy = True

    def idle(self) -> None:
        if self._busy:
            fcntl.flock(self._busy_fd, fcntl.LOCK_UN)
            self._busy = False

    def _others(self, prefix: str) -> Iterator[os.DirEntry]:
        mine = (self._busy_path, self._wait_path)
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if entry.name.startswith(prefix) and entry.path not in mine:
                    yield entry

    def busy_replicas(self) -> int:
        """Replicas of this host with work now, this one included if it has."""
        return int(self._busy) + sum(1 for e in self._others("busy-") if _locked_by_another(e.path))

    def share(self) -> int:
        """The cores one step may take now: the host's cores over the busy replicas, rounded up."""
        busy = max(1, self.busy_replicas())
        return max(1, -(-self.cores // busy))

    # -- leases ---------------------------------------------------------------------------------
    def _waiting_before(self, since: float) -> int:
        """Other replicas waiting for cores since before ``since``."""
        n = 0
        for entry in self._others("wait-"):
            try:
                fd = os.open(entry.path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    continue  # not waiting
                except BlockingIOError:
                    pass
                raw = os.pread(fd, _STAMP.size, 0)
                if len(raw) == _STAMP.size and _STAMP.unpack(raw)[0] < since:
                    n += 1
            finally:
                os.close(fd)
        return n

    def _grab(self, want: int) -> list[int]:
        taken = []
        for j in range(self.cores):
            i = (self._first + j) % self.cores
            try:
                fcntl.flock(self._core_fds[i], fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            taken.append(i)
            if len(taken) == want:
                break
        return taken

    def _release(self, cores: list[int]) -> None:
        for i in cores:
            fcntl.flock(self._core_fds[i], fcntl.LOCK_UN)

    @contextlib.contextmanager
    def lease(self) -> Iterator[int]:
        """Hold a fair share of the free cores for one step; yields how many (``on_grant`` got it too)."""
        self.busy()
        since = time.time()
        taken = self._grab(self.share()) if not self._waiting_before(since) else []
        if not taken:
            taken = self._wait(since)
        self.leases += 1
        self.threads_granted += len(taken)
        try:
            if self.on_grant is not None:
                self.on_grant(len(taken))
            yield len(taken)
        finally:
            self._release(taken)

    def _wait(self, since: float) -> list[int]:
        """Wait in line: take cores once some are free beyond those the replicas waiting longer will take."""
        os.pwrite(self._wait_fd, _STAMP.pack(since), 0)
        fcntl.flock(self._wait_fd, fcntl.LOCK_EX)
        t0 = time.perf_counter()
        try:
            while True:
                ahead = self._waiting_before(since)
                taken = self._grab(self.cores)
                keep = min(len(taken) - ahead, self.share())
                if keep > 0:
                    self._release(taken[keep:])
                    return taken[:keep]
                self._release(taken)
                time.sleep(self.poll_s)
        finally:
            fcntl.flock(self._wait_fd, fcntl.LOCK_UN)
            self.waited_s += time.perf_counter() - t0

    def stats(self) -> dict:
        return {"cores": self.cores, "leases": self.leases, "threads_granted": self.threads_granted,
                "waited_s": round(self.waited_s, 3)}

    def close(self) -> None:
        for fd in (*self._core_fds, self._busy_fd, self._wait_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        for path in (self._busy_path, self._wait_path):
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._core_fds = []

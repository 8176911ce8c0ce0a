"""The host's cores leased per step among its stage replicas (cluster/cores.py, ``torch_threads: shared``).

Each CoreBudget opens its own files, so several in one process behave as replicas in several processes
(flock locks belong to open files); one test uses a real second process that dies holding cores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from bark_serve.cluster.cores import CoreBudget


@pytest.fixture
def folder(tmp_path):
    return tmp_path / "cores"


def budgets(folder, n, cores):
    return [CoreBudget(cores=cores, folder=folder) for _ in range(n)]


def test_a_lone_replica_gets_every_core_and_busy_ones_a_fair_share(folder):
    a, b, c = budgets(folder, 3, cores=4)
    granted = []
    a.on_grant = granted.append
    with a.lease() as n:
        assert n == 4 and granted == [4]
    b.busy()
    with a.lease() as n:
        assert n == 2  # two busy replicas: 4 / 2
    c.busy()
    assert a.busy_replicas() == 3
    with a.lease() as n:
        assert n == 2  # 4 / 3, rounded up
    b.idle(), c.idle()
    with a.lease() as n:
        assert n == 4  # idle replicas do not count
    a.idle()
    assert a.busy_replicas() == 0


def test_leases_never_hold_more_cores_than_the_host_has(folder):
    """Four replicas on two cores, each stepping in its own thread: at no moment do their threads exceed 2."""
    reps = budgets(folder, 4, cores=2)
    lock = threading.Lock()
    running, peak, grants = [0], [0], []

    def work(b):
        for _ in range(15):
            with b.lease() as n:
                with lock:
                    running[0] += n
                    peak[0] = max(peak[0], running[0])
                    grants.append(n)
                time.sleep(0.003)
                with lock:
                    running[0] -= n
        b.idle()

    threads = [threading.Thread(target=work, args=(b,)) for b in reps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(grants) == 60 and peak[0] == 2
    assert set(grants) <= {1, 2}


def test_waiters_are_served_oldest_first_and_a_releaser_cannot_take_its_cores_back_ahead_of_them(folder):
    """One core. A steps back to back; B starts waiting during A's first step: B's step comes before A's
    second (without the line, A retakes the core within microseconds, over and over)."""
    a, b = budgets(folder, 2, cores=1)
    order = []
    a_in_first = threading.Event()

    def run_a():
        for i in range(4):
            with a.lease():
                order.append(f"a{i}")
                if i == 0:
                    a_in_first.set()
                    time.sleep(0.05)  # B begins to wait meanwhile
                else:
                    time.sleep(0.01)
        a.idle()

    def run_b():
        a_in_first.wait(5)
        with b.lease():
            order.append("b")
        b.idle()

    ta, tb = threading.Thread(target=run_a), threading.Thread(target=run_b)
    ta.start(), tb.start()
    ta.join(10), tb.join(10)
    assert order[:2] == ["a0", "b"], order
    assert b.waited_s > 0.02 and b.stats()["leases"] == 1


def test_a_replica_that_dies_mid_step_frees_its_cores_at_once(folder):
    folder.mkdir()
    code = textwrap.dedent(f"""
        import sys, time
        from bark_serve.cluster.cores import CoreBudget
        b = CoreBudget(cores=2, folder={str(folder)!r})
        with b.lease() as n:
            print(n, flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "2"  # it holds both cores
        mine = CoreBudget(cores=2, folder=folder)
        assert mine.busy_replicas() == 1  # the other one, stepping
        got = []
        t = threading.Thread(target=lambda: got.append(mine.lease().__enter__()))
        t.start()
        time.sleep(0.2)
        assert not got  # waits: both cores are taken
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        t.join(5)
        # The waiter goes on at once. Its first grant may be 1: the kernel drops the dead process's locks
        # one file at a time, and the waiter can take the freed cores while the dead busy mark still counts.
        assert got in ([1], [2]), got
        assert mine.busy_replicas() == 1  # only this one: the dead replica's cores and busy mark went with it
        with mine.lease() as n:
            assert n == 2  # a lone replica again: every core
        mine2 = CoreBudget(cores=2, folder=folder)  # a new replica sweeps the dead one's files away
        assert not any(str(proc.pid) in p.name for p in folder.iterdir())
        mine2.close()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_close_removes_the_replicas_files(folder):
    a = CoreBudget(cores=2, folder=folder)
    with a.lease():
        pass
    a.close()
    assert sorted(p.name for p in folder.iterdir()) == ["core-0", "core-1"]


def test_the_scheduler_steps_on_leased_cores_and_is_idle_when_it_holds_nothing(folder):
    """StageScheduler with a budget: each step runs inside a lease (the grant reaches on_grant), and once its
    requests are done the replica no longer counts as busy for the others."""
    import asyncio

    from bark_serve.serving.scheduler import StageScheduler
    from bark_serve.stages.types import EngineResult

    other = CoreBudget(cores=2, folder=folder)
    grants = []
    mine = CoreBudget(cores=2, folder=folder, on_grant=grants.append)

    class Engine:
        name, capacity = "fake", 4

        def __init__(self):
            self.held: list = []
            self.seen_busy: list = []

        @property
        def free(self):
            return self.capacity - len(self.held)

        def admit(self, req):
            self.held.append(req.request_id)

        def cancel(self, rid):
            return rid in self.held and not self.held.remove(rid)

        def step(self):
            self.seen_busy.append(other.busy_replicas())
            done, self.held = self.held, []
            return [EngineResult(rid, output=rid) for rid in done]

    class Req:
        def __init__(self, rid):
            self.request_id = rid

    async def main():
        engine = Engine()
        sched = StageScheduler(engine, batch_wait_s=0, cores=mine)
        out = await asyncio.gather(*(sched.submit(Req(f"r{i}")) for i in range(3)))
        await asyncio.sleep(0.05)  # the loop goes idle
        busy_after = other.busy_replicas()
        await sched.stop()
        return engine, out, busy_after

    engine, out, busy_after = asyncio.run(main())
    assert [o.output for o in out] == ["r0", "r1", "r2"]
    assert grants and set(grants) == {2} and engine.seen_busy and set(engine.seen_busy) == {1}
    assert busy_after == 0

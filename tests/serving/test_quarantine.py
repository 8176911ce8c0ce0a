"""A request that kills its stage replica is quarantined (issue 25): retried once, alone in its engine, then
failed for good, so it takes down at most two replicas (before: it was resent up to 3 times, each time
killing its replica and everything batched with it), while the innocent requests of its batch succeed.

Real Ray Serve: a deployment running the real StageScheduler over an engine that exits its process when
a poison request is in the batch it steps, called through the real ``retrying_call``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bark_serve.serving.scheduler import StageScheduler
from bark_serve.serving.stage_calls import alone_marker, retrying_call
from bark_serve.stages.types import EngineResult, RequestCrashedStage


@dataclass(frozen=True)
class Req:
    request_id: str
    segment: int = 0


class PoisonEngine:
    """Steps every held request to the end in one step; a step with a ``poison`` request exits the process.
    Appends each step's batch (and each death) to ``log``, a file shared with the test."""

    name = "poison"

    def __init__(self, log: str, capacity: int = 8):
        self.log, self.capacity, self.held = log, capacity, []
        self.last_step = {}

    @property
    def free(self):
        return self.capacity - len(self.held)

    def admit(self, req):
        self.held.append(req.request_id)

    def cancel(self, rid):
        if rid in self.held:
            self.held.remove(rid)

    def step(self):
        time.sleep(0.3)  # a forward pass; the batch is whatever the scheduler admitted
        with open(self.log, "a") as f:
            f.write("batch " + " ".join(sorted(self.held)) + "\n")
            if any(r.startswith("poison") for r in self.held):
                f.write("died\n")
                f.flush()
                os._exit(1)
        done, self.held = [EngineResult(r, output=r.upper()) for r in self.held], []
        return done


class Crashy:
    def __init__(self, log: str):
        self.scheduler = StageScheduler(PoisonEngine(log), batch_wait_s=0.2, alone_hook=alone_marker("poison"))

    async def run(self, request, priority="interactive", isolated=False):
        return await self.scheduler.submit(request, priority, isolated=isolated)


@pytest.fixture
def crashy(tmp_path):
    import ray
    from ray import cloudpickle, serve

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the replicas need not import tests/
    ray_tmp = tempfile.mkdtemp(prefix="bark-q-", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=ray_tmp)
    try:
        log = tmp_path / "steps.log"
        log.touch()
        app = serve.deployment(Crashy, name="PoisonServer", max_ongoing_requests=32,
                               ray_actor_options={"num_cpus": 0.5}).bind(str(log))
        handle = serve.run(app, name="quarantine", route_prefix=None)
        yield handle, log
    finally:
        serve.shutdown()
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_request_that_kills_its_replica_is_tried_once_alone_then_failed(crashy):
    handle, log = crashy
    call = retrying_call({"poison": handle}, backoff_s=(0.5, 0.5))

    async def main():
        calls = [call("poison", Req(rid), "interactive") for rid in ("poison-1", "a", "b", "c")]
        return await asyncio.gather(*calls, return_exceptions=True)

    t0 = time.monotonic()
    poison, *innocent = asyncio.run(main())
    took = time.monotonic() - t0
    assert isinstance(poison, RequestCrashedStage) and "not retried" in str(poison), poison
    assert [o.output for o in innocent] == ["A", "B", "C"], innocent  # the poison's batch mates still succeed
    lines = Path(log).read_text().splitlines()
    assert lines.count("died") == 2, lines  # the first crash, and the poison alone; never a third
    first, second = (i for i, line in enumerate(lines) if line == "died")
    assert "poison-1" in lines[first - 1].split()  # the batch that killed the first replica held it
    assert lines[second - 1] == "batch poison-1"  # and the second time it ran alone
    after = [line.split()[1:] for line in lines[first + 1:] if line.startswith("batch")]
    assert all(len(b) == 1 for b in after), after  # every retry ran alone, one at a time
    ran = {r for line in lines if line.startswith("batch") for r in line.split()[1:]}
    assert ran == {"poison-1", "a", "b", "c"}
    print(f"quarantine: 2 replica deaths, 3 innocent requests served, {took:.1f} s in all")

"""A batch worker in its own process (for the kill test): ``python -m tests.cluster.worker_proc URL PREFIX NAME``.

Runs BatchWorkerLoop with the fake synthesize until SIGTERM (graceful) or SIGKILL (the test's point).
"""

from __future__ import annotations

import asyncio
import signal
import sys

from bark_serve.cluster.batch_worker import BatchWorkerLoop
from tests.cluster.helpers import FakeSynth, build


async def main(url: str, prefix: str, name: str, claim_timeout_s: float, delay_s: float) -> None:
    client, _, queue = build(url, prefix)
    loop = BatchWorkerLoop(queue, FakeSynth(delay_s=delay_s), max_in_flight=4, claim_timeout_s=claim_timeout_s,
                           consumer=name)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, loop.request_stop, 1.0)
    print("ready", flush=True)
    await loop.run()
    await client.aclose()


if __name__ == "__main__":
    url, prefix, name, timeout_s, delay_s = sys.argv[1:6]
    asyncio.run(main(url, prefix, name, float(timeout_s), float(delay_s)))

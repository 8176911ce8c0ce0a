"""What ``batch_invariant`` buys and costs here: ``python -m bark_serve.bench.batch_invariance``.

Prints one JSON object (progress on stderr):

- ``forks``: seeded, sampled semantic requests (``--requests``, 60 tokens each, on a random checkpoint of
  ``--fork-size``, tiny by default) run four at a time and then each alone; how many took other tokens
  beside others than alone, with the option off and on, and the first token where each did.
- ``steps``: the semantic engine's decode step (a random checkpoint of ``--size``, bark-small's shapes by
  default) at batch 1 and at the probed row floor (at the engines' capacity, 16, where the invariant engines
  run one shape per step kind), with the option off and on: median ms over ``--steps``.
- ``floors``: the row floor each causal engine probed (stages/invariance.py); ``single_shape``: whether it
  keeps the option by one shape per step kind instead (CUDA's fixed-shape path, ``single_shape_for``).
- ``floors_by_threads`` (CPU): the semantic model's row floor probed at each torch thread count from 1 to
  the bench's, and over all of them (``shared``: what a ``torch_threads: shared`` replica pads to).

A benchmark figure, not a timed test: compare the on/off numbers of one run only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

TEXTS = ["Hello there.", "A different, longer sentence here.", "♪ la la la ♪", "[laughs] ok"]
FORK_TOKENS = 60


def _log(msg: str) -> None:
    print(f"[batch_invariance {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _pipeline(model: str, device: str, invariant: bool, capacity: int = 8):
    from bark_serve.stages.engine import EngineOptions
    from bark_serve.stages.pipeline import BarkPipeline

    return BarkPipeline.from_pretrained(model, EngineOptions(device=device, capacity=capacity,
                                                             batch_invariant=invariant))


def _requests(pipe, first_seed: int, n: int, tokens: int):
    from bark_serve.stages.types import SamplingParams, SemanticRequest

    sampled = SamplingParams(temperature=0.8, top_k=200, top_p=0.95)
    return [SemanticRequest(f"s{first_seed + i}", pipe.text.encode(TEXTS[i % len(TEXTS)]), None, sampled, None,
                            tokens, seed=first_seed + i) for i in range(n)]


def forks(model: str, device: str, invariant: bool, n_requests: int) -> dict[str, Any]:
    """Requests in groups of four, then each alone: those whose tokens differ, and where they first do."""
    import numpy as np

    pipe = _pipeline(model, device, invariant)
    eng = pipe.engines["semantic"]
    forked: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for base in range(0, n_requests, 4):
        group = _requests(pipe, base, min(4, n_requests - base), FORK_TOKENS)
        together = {r.request_id: r.output for r in eng.run(group)}
        for req in group:
            [alone] = eng.run([req])
            diff = np.nonzero(np.asarray(alone.output) != np.asarray(together[req.request_id]))[0]
            if diff.size:
                forked.append({"request": req.request_id, "first_token": int(diff[0])})
        if base and base % 200 == 0:
            _log(f"forks, batch_invariant {invariant}: {base} of {n_requests} requests, {len(forked)} forked")
    return {"batch_invariant": invariant, "row_floor": eng.row_floor, "requests": n_requests,
            "tokens": n_requests * FORK_TOKENS, "forked": len(forked), "which": forked,
            "seconds": round(time.perf_counter() - t0, 2)}


def decode_steps(pipe, device: str, invariant: bool, batches: list[int], steps: int) -> list[dict[str, Any]]:
    """Median wall ms of a decode-only step of the semantic engine holding ``batch`` requests."""
    import torch

    eng = pipe.engines["semantic"]
    out = []
    for batch in batches:
        for req in _requests(pipe, 0, batch, steps + 3):
            eng.admit(req)
        eng.step()  # the prefill
        eng.step()  # one warm-up decode
        times = []
        for _ in range(steps):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            eng.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        for slot in list(eng.slots):
            eng.cancel(slot.request.request_id)
        out.append({"batch_invariant": invariant, "batch": batch, "row_floor": eng.row_floor,
                    "single_shape": eng.single_shape,
                    "median_ms": round(1000 * statistics.median(times), 3), "steps": steps})
    return out


def floors_by_threads(model, max_rows: int) -> dict[str, int | None]:
    """The model's row floor at each torch thread count up to the current one, and over all of them."""
    import torch

    from bark_serve.stages.invariance import common_floor, model_floors

    counts = range(1, torch.get_num_threads() + 1)
    out: dict[str, int | None] = {str(t): common_floor(model_floors(model, max_rows, (t,))) for t in counts}
    out["shared"] = common_floor(model_floors(model, max_rows, counts))
    return out


def run(args) -> dict[str, Any]:
    import torch

    from bark_serve.bench.cli import _checkpoint, _machine
    from bark_serve.stages.engine import resolve_device
    from bark_serve.stages.invariance import FLOOR_CAP

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    report: dict[str, Any] = {"benchmark": "batch_invariance", "machine": _machine(device, torch), "device": device}
    small = _checkpoint(argparse.Namespace(model=args.model, size=args.size))
    report["steps"] = []
    batches: list[int] = []
    for invariant in (True, False):  # the invariant engines first: their floor is the second batch timed
        pipe = _pipeline(small, device, invariant, capacity=FLOOR_CAP)
        if invariant:
            report["floors"] = {stage: pipe.engines[stage].row_floor for stage in ("semantic", "coarse")}
            report["single_shape"] = {stage: pipe.engines[stage].single_shape for stage in ("semantic", "coarse")}
            # one-shape engines (CUDA's fixed-shape path) compute every decode at their capacity: time that too
            second = FLOOR_CAP if report["single_shape"]["semantic"] else report["floors"]["semantic"]
            batches = sorted({1, second or 1})
            if device == "cpu":
                report["floors_by_threads"] = floors_by_threads(pipe.engines["semantic"].model, FLOOR_CAP)
        _log(f"decode steps of {small}, batches {batches}, batch_invariant {invariant}")
        report["steps"] += decode_steps(pipe, device, invariant, batches, args.steps)
        del pipe
    tiny = _checkpoint(argparse.Namespace(model=None, size=args.fork_size))
    report["forks"] = []
    for invariant in (False, True):
        _log(f"forks over {args.requests} requests of {tiny}, batch_invariant {invariant}")
        report["forks"].append(forks(tiny, device, invariant, args.requests))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bark_serve.bench.batch_invariance", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="Bark checkpoint for the step timings (default: a random one of --size, cached)")
    p.add_argument("--size", default="small", choices=["tiny", "small", "large"],
                   help="shapes of the random checkpoint timed (default small)")
    p.add_argument("--fork-size", default="tiny", choices=["tiny", "small", "large"],
                   help="shapes of the random checkpoint the forks are counted on (default tiny)")
    p.add_argument("--requests", type=int, default=1600, help="requests the forks are counted over (default 1600)")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per batch and setting (default 20)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.requests < 1 or args.steps < 1:
        p.error("--requests and --steps must be at least 1")
    print(json.dumps(run(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

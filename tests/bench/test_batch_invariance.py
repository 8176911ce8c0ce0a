"""``python -m bark_serve.bench.batch_invariance`` runs end to end on tiny checkpoints and prints its JSON."""

from __future__ import annotations

import json

from bark_serve.bench import batch_invariance


def test_bench_prints_floors_steps_and_forks(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BARK_BENCH_CACHE", str(tmp_path))
    assert batch_invariance.main(["--size", "tiny", "--requests", "6", "--steps", "2", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["benchmark"] == "batch_invariance" and report["device"] == "cpu"
    from bark_serve.stages.random_checkpoint import CHECKPOINT_REVISION

    # made once in the cache, under a name that changes when a seed starts to write other files
    assert [p.name for p in tmp_path.iterdir()] == [f"bench-tiny-r{CHECKPOINT_REVISION}"]
    floor = report["floors"]["semantic"]
    assert isinstance(floor, int) and floor >= 1 and isinstance(report["floors"]["coarse"], int)
    assert report["single_shape"] == {"semantic": False, "coarse": False}  # CPU, eager: the padding floor
    import torch

    by_threads = report["floors_by_threads"]  # each thread count, and all of them (torch_threads: shared)
    assert set(by_threads) == {*map(str, range(1, torch.get_num_threads() + 1)), "shared"}
    assert by_threads[str(torch.get_num_threads())] == floor
    assert by_threads["shared"] is None or by_threads["shared"] >= max(f or 0 for f in by_threads.values())
    steps = {(s["batch_invariant"], s["batch"]): s for s in report["steps"]}
    assert set(steps) == {(inv, b) for inv in (False, True) for b in sorted({1, floor})}
    assert all(s["median_ms"] > 0 and s["steps"] == 2 for s in steps.values())
    assert steps[(True, 1)]["row_floor"] == floor and steps[(False, 1)]["row_floor"] is None
    off, on = report["forks"]
    assert (off["batch_invariant"], on["batch_invariant"]) == (False, True)
    assert off["requests"] == on["requests"] == 6 and off["tokens"] == 6 * batch_invariance.FORK_TOKENS
    assert on["forked"] == 0 and on["which"] == []  # exact with the option, whatever the seeds
    assert off["forked"] == len(off["which"])


def test_bad_counts_are_a_usage_error(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        batch_invariance.main(["--requests", "0"])
    assert exc.value.code == 2 and "at least 1" in capsys.readouterr().err

"""``dtype: auto`` is measured: the probe times a GEMM per candidate dtype, keeps the faster, caches per host."""

from __future__ import annotations

import json

import pytest

from bark_serve.stages import dtype_probe as P
from bark_serve.stages.engine import resolve_dtype


class FakeClock:
    """Each reading advances by ``step`` seconds: every timed product "takes" exactly ``step``."""

    def __init__(self, step: float):
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def _timed(slow: str):
    """A rate function whose clock makes ``slow`` 100x slower than the other dtypes (as on an AVX2 EPYC)."""
    def rate(name: str, device: str) -> float:
        return P.gemm_rate(name, device, seconds=0.0, clock=FakeClock(0.1 if name == slow else 0.001))
    return rate


@pytest.mark.parametrize("slow, expected", [("bfloat16", "float32"), ("float32", "bfloat16")])
def test_the_probe_picks_the_dtype_whose_gemm_ran_faster(tmp_path, slow, expected):
    choice = P.choose_dtype("cpu", rate=_timed(slow), cache_file=tmp_path / "probe.json")
    assert choice.dtype == expected and not choice.cached
    flops = 2.0 * P.PROBE_ROWS * P.PROBE_HIDDEN * 4 * P.PROBE_HIDDEN
    assert choice.tflops[expected] == pytest.approx(flops / 0.001 / 1e12)
    assert choice.tflops[slow] == pytest.approx(flops / 0.1 / 1e12)


def test_the_choice_is_cached_per_host_and_thread_count(tmp_path, monkeypatch):
    cache = tmp_path / "probe.json"
    first = P.choose_dtype("cpu", rate=_timed("float32"), cache_file=cache)

    def never(name, device):
        raise AssertionError("measured again although the host's choice is cached")

    again = P.choose_dtype("cpu", rate=never, cache_file=cache)
    assert again.cached and again.dtype == first.dtype == "bfloat16"
    stored = json.loads(cache.read_text())
    assert list(stored) == [P.host_key("cpu")] and "threads" in P.host_key("cpu")
    monkeypatch.setattr(P.torch, "get_num_threads", lambda: 977)  # another thread count: another key, measured
    assert not P.choose_dtype("cpu", rate=_timed("bfloat16"), cache_file=cache).cached
    assert len(json.loads(cache.read_text())) == 2


def test_a_corrupt_cache_is_measured_over(tmp_path):
    cache = tmp_path / "probe.json"
    cache.write_text("{not json")
    assert P.choose_dtype("cpu", rate=_timed("bfloat16"), cache_file=cache).dtype == "float32"
    assert json.loads(cache.read_text())[P.host_key("cpu")]["dtype"] == "float32"


def test_an_explicit_dtype_is_an_override_and_measures_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "probe.json"
    monkeypatch.setenv(P.CACHE_ENV, str(cache))
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert not cache.exists()


def test_auto_measures_for_real_and_logs_the_rates(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(P.CACHE_ENV, str(tmp_path / "probe.json"))
    with caplog.at_level("INFO", logger=P.log.name):
        picked = resolve_dtype("auto", "cpu", torch_threads=1)
    assert picked in ("float32", "bfloat16")
    rates = json.loads((tmp_path / "probe.json").read_text())[P.host_key("cpu")]["tflops"]
    assert picked == max(rates, key=rates.get) and all(v > 0 for v in rates.values())
    assert f"dtype auto -> {picked}" in caplog.text


def test_probes_starting_together_measure_once_and_agree(tmp_path):
    """Replicas of one run probing at once on a cold cache: the first measures, the others wait for its
    choice, so noisy timings cannot give one stage float32 and another bfloat16. Threads stand in for the
    replicas' processes: the lock is an flock on a file each of them opens itself, which locks between the
    open files of threads exactly as between processes."""
    import threading
    import time

    cache, calls, lock = tmp_path / "probe.json", [], threading.Lock()

    def noisy(name: str, device: str) -> float:  # each measurement disagrees with the one before
        with lock:
            calls.append(name)
            turn = len(calls)
        time.sleep(0.05)
        return 2.0 if (name == "float32") == (turn % 4 in (1, 2)) else 1.0

    picked: list[P.DtypeChoice] = []
    threads = [threading.Thread(target=lambda: picked.append(P.choose_dtype("cpu", rate=noisy, cache_file=cache)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({c.dtype for c in picked}) == 1 and len(calls) == len(P.candidates("cpu"))
    assert sum(not c.cached for c in picked) == 1


def _gpu(monkeypatch, native_bf16: bool) -> None:
    """A CUDA device as the probe sees it, without one: its name, and whether it runs bfloat16 natively."""
    monkeypatch.setattr(P.torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(P.torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)


def _rates(**tflops: float):
    asked: list[str] = []

    def rate(name: str, device: str) -> float:
        asked.append(name)
        return tflops[name]

    return rate, asked


def test_a_gpu_with_native_bfloat16_keeps_it_unless_float32_is_much_faster(tmp_path, monkeypatch):
    """On the H200 bfloat16 and float16 measured 63 and 62 TFLOP/s: whichever a host cached first was a coin
    flip, and pure float16 (little range, never run) could serve. There bfloat16 is preferred: float16 is not
    even measured, and float32 must beat bfloat16 by more than PREFER_MARGIN."""
    _gpu(monkeypatch, native_bf16=True)
    rate, asked = _rates(float32=24.0, float16=62.5, bfloat16=62.0)
    choice = P.choose_dtype("cuda", rate=rate, cache_file=tmp_path / "a.json")
    assert choice.dtype == "bfloat16" and sorted(asked) == ["bfloat16", "float32"]
    noisy, _ = _rates(float32=62.0 * P.PREFER_MARGIN, bfloat16=62.0)  # within the margin: still bfloat16
    assert P.choose_dtype("cuda", rate=noisy, cache_file=tmp_path / "b.json").dtype == "bfloat16"
    slow, _ = _rates(float32=24.0, bfloat16=5.0)  # a broken bfloat16 path is still ruled out
    assert P.choose_dtype("cuda", rate=slow, cache_file=tmp_path / "c.json").dtype == "float32"
    cache = tmp_path / "d.json"  # a float16 cached before is measured over
    cache.write_text(json.dumps({P.host_key("cuda"): {"dtype": "float16", "tflops": {}}}))
    again, _ = _rates(float32=24.0, bfloat16=62.0)
    assert P.choose_dtype("cuda", rate=again, cache_file=cache).dtype == "bfloat16"


def test_a_gpu_without_native_bfloat16_takes_the_fastest(tmp_path, monkeypatch):
    """Older GPUs (float16 tensor cores, bfloat16 emulated): the probe decides, as before."""
    _gpu(monkeypatch, native_bf16=False)
    assert P.preferred("cuda") is None and P.candidates("cuda") == ["float32", "float16", "bfloat16"]
    rate, _ = _rates(float32=14.0, float16=112.0, bfloat16=3.0)
    assert P.choose_dtype("cuda", rate=rate, cache_file=tmp_path / "probe.json").dtype == "float16"
    assert P.preferred("cpu") is None  # CPUs: the fastest, whatever it is (test above)

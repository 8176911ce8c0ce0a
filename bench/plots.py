"""``bark-serve bench --plots DIR``: the report's pictures (matplotlib, no display needed).

- ``throughput_latency.png``: audio-s per wall-s and p50/p95 latency against concurrency (served,
  closed loop) or batch size (transformers, engines), one line per configuration;
- ``ttfa_cdf.png``: the time-to-first-audio distribution of every served run;
- ``timeline.png``: one served run as a Gantt chart, one row per stage and one bar per segment
  (coloured by request), which shows the stages working on different requests at once.

``bark-serve bench --replot bench.json --plots DIR`` redraws them from a saved report.
"""

from __future__ import annotations

from pathlib import Path

from bark_serve.stages.constants import STAGES


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_all(report: dict, folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = [throughput_latency(report, folder / "throughput_latency.png")]
    if any(r.get("ttfa_p50_s") for r in _served(report)):
        out.append(ttfa_cdf(report, folder / "ttfa_cdf.png"))
    if report.get("timelines"):
        out.append(timeline(report, folder / "timeline.png"))
    return out


def _served(report: dict) -> list[dict]:
    return [r for r in report["runs"] if r["name"].startswith("served_")]


def _series(report: dict) -> dict[str, list[tuple[float, dict]]]:
    """Configuration family -> [(x, run)]: concurrency for served closed loop, batch for the others."""
    fams: dict[str, list[tuple[float, dict]]] = {}
    for r in report["runs"]:
        if r.get("mode") == "closed":
            fams.setdefault("served (closed loop)", []).append((r["concurrency"], r))
        elif r["name"].startswith("engines_"):
            # one line per cuda_graphs setting and admission order: mixed, the line would zigzag at each batch
            graphs = {"on": ", CUDA graphs", "off": ", eager"}.get(str(r.get("cuda_graphs")), "")
            order = f", {r['order']} order" if r.get("order") not in (None, "longest") else ""
            fams.setdefault(f"engines in process{graphs}{order}", []).append((r["batch"], r))
        elif r["name"].startswith("transformers_batch"):
            sorted_ = ", sorted segments" if r.get("order") == "sorted" else ""
            fams.setdefault(f"transformers static batch{sorted_}", []).append((r["batch"], r))
        elif r["name"].startswith("transformers_sequential"):
            fams.setdefault("transformers sequential", []).append((1, r))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in fams.items()}


def _title(report: dict) -> str:
    m = report.get("machine", {})
    where = m.get("gpu") or m.get("cpu_model") or m.get("cpu", "")
    return f"{where}, {report.get('dtype')}, mix {report.get('workload', {}).get('mix', '?')}"


def throughput_latency(report: dict, path: Path) -> Path:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, points in _series(report).items():
        xs = [x for x, _ in points]
        ax1.plot(xs, [r["throughput_audio_s_per_s"] for _, r in points], marker="o", label=name)
        line, = ax2.plot(xs, [r.get("latency_p50_s") for _, r in points], marker="o", label=f"{name} p50")
        ax2.plot(xs, [r.get("latency_p95_s") for _, r in points], marker="x", linestyle="--",
                 color=line.get_color(), label=f"{name} p95")
    ax1.set(xlabel="concurrency (served) / batch size", ylabel="audio-s per wall-s", title="throughput")
    ax2.set(xlabel="concurrency (served) / batch size", ylabel="seconds", title="latency", yscale="log")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
    return _save(plt, fig, (ax1, ax2), report, path)


def _save(plt, fig, axes, report: dict, path: Path) -> Path:
    """Grid, legends and the machine/dtype/mix title, then write the PNG."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(_title(report), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ttfa_cdf(report: dict, path: Path) -> Path:
    """Empirical CDF of the clients' time to first audio, per served run (from the report's timelines)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, requests in (report.get("timelines") or {}).items():
        ttfa = sorted(req["ttfa_s"] for req in requests if req.get("ttfa_s"))
        if ttfa:
            ax.step(ttfa, [(i + 1) / len(ttfa) for i in range(len(ttfa))], where="post", label=name)
    slo = (report.get("slo") or {}).get("ttfa_p95_bound_s")
    if slo:
        ax.axvline(slo, color="grey", linestyle=":", label=f"SLO bound {slo:g} s")
    ax.set(xlabel="time to first audio (s)", ylabel="fraction of requests", title="time to first audio")
    return _save(plt, fig, (ax,), report, path)


def timeline(report: dict, path: Path, run: str | None = None) -> Path:
    """Gantt of one served run (the Poisson run nearest 70% of saturation, else the last one stored)."""
    plt = _plt()
    timelines = report["timelines"]
    run = run or _pick_run(report)
    requests = timelines[run]
    t0 = min(req["sent_at"] for req in requests)
    fig, ax = plt.subplots(figsize=(12, 3.5))
    cmap = plt.get_cmap("tab20")
    for r_idx, req in enumerate(requests):
        for seg in req["segments"]:
            for row, stage in enumerate(STAGES):
                t = seg.get(stage)
                if t:
                    ax.broken_barh([(t["started"] - t0, max(t["finished"] - t["started"], 1e-3))],
                                   (row - 0.4, 0.8), facecolors=cmap(r_idx % 20), edgecolor="black", linewidth=0.2)
    ax.set_yticks(range(len(STAGES)), STAGES)
    ax.invert_yaxis()
    ax.set(xlabel="seconds since the first request was sent",
           title=f"{run}: one bar per segment and stage, one colour per request")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pick_run(report: dict) -> str:
    names = list(report["timelines"])
    fractions = {r["name"]: r.get("rate_fraction_of_saturation") for r in report["runs"] if r.get("mode") == "poisson"}
    poisson = [n for n in names if fractions.get(n) is not None]
    if poisson:
        return min(poisson, key=lambda n: abs(fractions[n] - 0.7))
    return names[-1]

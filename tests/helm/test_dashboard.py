"""The Grafana dashboard (helm/bark-serve/dashboards/bark-serve.json) and its ConfigMap in the chart.

Every metric a panel queries must exist: either Prometheus gets it from our code, which this test proves
by constructing serving/metrics.py's metric objects on a real local Ray, recording into them (the batch
metrics through a real BatchWorkerLoop on a real Redis) and scraping Ray's metrics export port, or it is
one of Ray Serve's own metrics from RAY_SERVE_METRICS, each checked against the panels Ray 2.60 ships.
"""

from __future__ import annotations

import asyncio
import json
import re
import runpy
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from bark_serve.cluster.ports import free_port
from tests.helm.test_chart import CHART, REPO, helm, rendered

DASHBOARD = CHART / "dashboards" / "bark-serve.json"
# Ray Serve's own metrics that the dashboard's "Ray Serve" row queries (names as Ray 2.60 exports them).
RAY_SERVE_METRICS = frozenset({
    "ray_serve_num_http_requests_total", "ray_serve_http_request_latency_ms_bucket",
    "ray_serve_num_ongoing_http_requests", "ray_serve_replica_processing_queries",
    "ray_serve_deployment_queued_queries", "ray_serve_deployment_replica_healthy",
    "ray_serve_deployment_processing_latency_ms_bucket", "ray_serve_deployment_request_counter_total",
    "ray_serve_deployment_error_counter_total",
})
PROMQL_WORDS = frozenset({
    "sum", "min", "max", "avg", "count", "stddev", "topk", "bottomk", "quantile", "by", "without", "on",
    "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool",
})
GRAFANA_VARIABLES = frozenset({"__rate_interval", "__range", "__interval"})  # Grafana's own


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(board: dict) -> list[str]:
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords, labels or numbers)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings (label values)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # label matchers, ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    expr = re.sub(r"\boffset\s+-?[\w$]+", "", expr)  # offset 5m
    expr = re.sub(r"\$\w+|\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b", "", expr)  # Grafana variables, numbers
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if not expr[m.end():].lstrip().startswith("(") and m.group() not in PROMQL_WORDS:
            names.add(m.group())
    return names


def dashboard_metrics(board: dict) -> set[str]:
    names = set().union(*map(metric_names, queries(board)))
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            names |= set(re.findall(r"label_values\((\w+)\s*,", var["definition"]))
    return names


# --- the file -----------------------------------------------------------------------------------

def test_dashboard_is_fresh():
    render = runpy.run_path(str(REPO / "helm/tools/gen_dashboard.py"))["render"]
    assert DASHBOARD.read_text() == render(), "run: python helm/tools/gen_dashboard.py"


def test_dashboard_is_a_well_formed_grafana_dashboard():
    board = dashboard()
    assert board["uid"] == "bark-serve" and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    defined = {v["name"] for v in board["templating"]["list"]} | GRAFANA_VARIABLES
    for p in board["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            used = set(re.findall(r"\$\{?(\w+)", t["expr"]))
            assert used <= defined, (p["title"], used - defined)
    titles = " | ".join(p["title"].lower() for p in board["panels"])
    for topic in ("queue length", "batch size", "step time", "tokens", "request latency", "time to first audio",
                  "audio produced", "error answers by status code", "batch items", "ray serve"):
        assert topic in titles, topic


def test_the_metric_name_extractor():
    expr = ('histogram_quantile(0.95, sum by (stage, le) (rate(ray_x_bucket{application=~"$application", '
            'stage="coarse"}[$__rate_interval]))) / ignoring(le) ray_y + 1e3 * sum without (a) (ray_z offset 5m)')
    assert metric_names(expr) == {"ray_x_bucket", "ray_y", "ray_z"}
    assert metric_names("sum(rate(ray_bark_stage_queue_lenght[5m]))") == {"ray_bark_stage_queue_lenght"}


def test_stated_ray_serve_metrics_are_those_ray_itself_charts():
    """Each name in RAY_SERVE_METRICS is queried by the Serve dashboards that the installed Ray ships."""
    import ray.dashboard.modules.metrics.dashboards as ray_dashboards

    folder = Path(ray_dashboards.__file__).parent
    ray_text = "".join(f.read_text() for f in [folder / "serve_dashboard_panels.py",
                                                  folder / "serve_deployment_dashboard_panels.py"])
    charted = set(re.findall(r"ray_serve_\w+", ray_text))
    assert RAY_SERVE_METRICS <= charted, sorted(RAY_SERVE_METRICS - charted)


# --- every queried metric is registered -----------------------------------------------------------

async def run_batch_worker(redis_url: str, texts: list[str]) -> dict:
    """A real BatchWorkerLoop on Redis with a fake synthesize, publishing through BatchProgressReporter."""
    from bark_serve.cluster.batch_worker import BatchWorkerLoop
    from bark_serve.serving.metrics import BatchMetrics, BatchProgressReporter, read_worker_progress
    from tests.cluster.helpers import FakeSynth, build, records, wait_finished

    client, store, queue = build(redis_url, "dash")
    worker = BatchWorkerLoop(queue, FakeSynth(delay_s=0.01), max_in_flight=2, claim_timeout_s=5.0, consumer="w0")
    reporter = BatchProgressReporter(lambda: read_worker_progress(worker), BatchMetrics())
    job = (await store.submit(records(texts))).job
    before = await reporter.publish()  # nothing claimed yet: every item is waiting
    task = asyncio.create_task(worker.run())
    await wait_finished(store, job.job_id)
    after = await reporter.publish()
    await worker.stop(grace_s=0.5)
    await task
    await client.aclose()
    return {"before": before, "after": after}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Prometheus text from a local Ray in which every metric of serving/metrics.py was recorded."""
    import ray

    from bark_serve.serving.metrics import RequestMetrics, StageMetrics
    from tests.cluster.redis_server import RedisServer

    port, tmp = free_port(), tempfile.mkdtemp(prefix="bark-dash-", dir="/tmp")
    redis_srv = RedisServer(tmp_path_factory.mktemp("redis-dash")).start()
    ray.init(address="local", num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False,
             _temp_dir=tmp, _metrics_export_port=port, _system_config={"metrics_report_interval_ms": 500})
    try:
        stage = StageMetrics("semantic")
        stage.queue_length(2)
        stage.step(batch=3, tokens=30, seconds=0.05)
        stage.request_done(0.2, ok=True)
        req = RequestMetrics()
        req.request("tts", 1.5)
        req.first_audio(0.4)
        req.audio(2.0)
        req.error(422)
        texts = ["one", "two", "three", "INVALID voice", "four"]
        batch = asyncio.run(run_batch_worker(redis_srv.url, texts))
        text, deadline = "", time.time() + 60
        while time.time() < deadline:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            if 'outcome="failed"' in text and "ray_bark_batch_queue_waiting" in text and "ray_bark_http_errors" in text:
                break
            time.sleep(0.5)
        yield {"text": text, "batch": batch}
    finally:
        ray.shutdown()
        redis_srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def exported_names(text: str) -> set[str]:
    return set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.M))


def sample(text: str, name: str, **labels) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total, found = total + float(line.rsplit(" ", 1)[1]), True
    assert found, f"no sample {name}{labels}"
    return total


@pytest.mark.slow
def test_every_queried_metric_is_registered_by_the_code_or_is_ray_serves(exported):
    ours = {n for n in exported_names(exported["text"]) if n.startswith("ray_bark_")}
    queried = dashboard_metrics(dashboard())
    unknown = queried - ours - RAY_SERVE_METRICS
    assert not unknown, f"the dashboard queries metrics nothing registers: {sorted(unknown)}"
    # and the other way round: every metric of serving/metrics.py has a panel
    base = {re.sub(r"_(bucket|sum|count)$", "", n) for n in ours}
    charted = {re.sub(r"_(bucket|sum|count)$", "", n) for n in queried}
    assert base <= charted, f"metrics without a panel: {sorted(base - charted)}"
    assert len(base) == 14, sorted(base)  # serving/metrics.py's 10 request/stage metrics and 4 batch metrics


@pytest.mark.slow
def test_batch_worker_progress_reaches_prometheus(exported):
    before, after = exported["batch"]["before"], exported["batch"]["after"]
    assert (before.waiting, before.pending, before.in_flight) == (5, 0, 0)
    assert after.outcomes["succeeded"] == 4 and after.outcomes["failed"] == 1
    assert (after.waiting, after.pending, after.in_flight) == (0, 0, 0)
    text = exported["text"]
    assert sample(text, "ray_bark_batch_items_total", outcome="succeeded") == 4
    assert sample(text, "ray_bark_batch_items_total", outcome="failed") == 1
    assert sample(text, "ray_bark_batch_queue_waiting") == 0 and sample(text, "ray_bark_batch_queue_pending") == 0


# --- the chart's ConfigMap ------------------------------------------------------------------------

def configmaps(*sets: str) -> list[dict]:
    args = [a for s in sets for a in ("--set", s)]
    out = helm("template", "rel", str(CHART), "--namespace", "bark", *args).stdout
    return [d for d in yaml.safe_load_all(out) if d and d["kind"] == "ConfigMap"]


def test_dashboard_configmap_is_off_by_default():
    assert not [d for d in rendered("default") if d["kind"] == "ConfigMap"]


def test_dashboard_configmap_carries_the_file_and_the_sidecar_label():
    (cm,) = configmaps("grafanaDashboard.enabled=true")
    assert cm["metadata"]["name"] == "rel-bark-serve-grafana-dashboard"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["bark-serve.json"]) == dashboard()
    (cm,) = configmaps("grafanaDashboard.enabled=true", "grafanaDashboard.labelKey=example.com/dashboards",
                       "grafanaDashboard.labelValue=bark", "grafanaDashboard.namespace=monitoring",
                       "grafanaDashboard.annotations.grafana_folder=TTS")
    meta = cm["metadata"]
    assert meta["labels"]["example.com/dashboards"] == "bark" and "grafana_dashboard" not in meta["labels"]
    assert meta["namespace"] == "monitoring" and meta["annotations"] == {"grafana_folder": "TTS"}


def test_dashboard_configmap_is_a_valid_kubernetes_object():
    import kubernetes_validate

    (cm,) = configmaps("grafanaDashboard.enabled=true")
    for version in ("1.25.0", kubernetes_validate.utils.latest_version()):
        kubernetes_validate.validate(cm, version, strict=True)
    assert len(json.dumps(cm).encode()) < 1024 * 1024  # a ConfigMap holds at most 1 MiB


@pytest.mark.parametrize("sets, message", [
    (["grafanaDashboard.enabled=yes"], "grafanaDashboard/enabled"),
    (["grafanaDashboard.labelKey=bad key"], "grafanaDashboard/labelKey"),
    (["grafanaDashboard.namespace=Monitoring"], "grafanaDashboard/namespace"),
    (["grafanaDashboard.lable=x"], "lable"),
])
def test_bad_dashboard_values_fail_with_a_clear_message(sets, message):
    proc = helm("template", "rel", str(CHART), *[a for s in sets for a in ("--set", s)], check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr

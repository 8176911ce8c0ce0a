"""Write helm/bark-serve/dashboards/bark-serve.json: the Grafana dashboard of bark-serve.

The file is both what the chart ships (a ConfigMap for Grafana's dashboard sidecar, grafanaDashboard.* in
values.yaml) and the file to import by hand (Dashboards > New > Import). Panels query the names Ray 2.60
exports: ``ray_`` + the name given in serving/metrics.py (``_bucket`` / ``_sum`` / ``_count`` for
histograms), and Ray Serve's own ``ray_serve_*`` metrics. tests/helm/test_dashboard.py fails when the file
is stale or a query names a metric that nothing registers:   python helm/tools/gen_dashboard.py
"""

from __future__ import annotations

import json
from pathlib import Path

TARGET = Path(__file__).resolve().parents[1] / "bark-serve" / "dashboards" / "bark-serve.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
APP = 'application=~"$application"'
RATE = "$__rate_interval"


def quantiles(metric: str, by: str = "", qs=(0.5, 0.95, 0.99)) -> list[tuple[str, str]]:
    """histogram_quantile over ``<metric>_bucket``, one query per quantile (grouped by ``by`` too)."""
    group = f"{by}, le" if by else "le"
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{APP}}}[{RATE}])))",
             f"p{round(q * 100)} {{{{{by}}}}}" if by else f"p{round(q * 100)}") for q in qs]


def panel(title: str, targets: list[tuple[str, str]], unit: str = "short", kind: str = "timeseries",
          description: str = "", width: int = 8) -> dict:
    return {"type": kind, "title": title, "description": description, "datasource": DS, "width": width,
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
            "targets": [{"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
                        for i, (expr, legend) in enumerate(targets)]}


def rows() -> list[tuple[str, list[dict]]]:
    return [
        ("Requests (orchestrator)", [
            panel("Requests per second by API", [
                (f"sum by (api) (rate(ray_bark_request_seconds_count{{{APP}}}[{RATE}]))", "{{api}}")], "reqps"),
            panel("Request latency", quantiles("ray_bark_request_seconds"), "s",
                  description="Whole request, from admission to the last audio byte."),
            panel("Time to first audio", quantiles("ray_bark_time_to_first_audio_seconds"), "s",
                  description="Until the first segment's audio is ready (streams start playing here)."),
            panel("Audio produced (audio-s per second)", [
                (f"sum(rate(ray_bark_audio_seconds_total{{{APP}}}[{RATE}]))", "audio-s / s")], "short",
                  description="Above 1: faster than real time, summed over every request (non-streamed answers)."),
            panel("Error answers by status code", [
                (f"sum by (code) (rate(ray_bark_http_errors_total{{{APP}}}[{RATE}]))", "{{code}}")], "reqps"),
            panel("Error ratio", [
                (f"sum(rate(ray_bark_http_errors_total{{{APP}}}[{RATE}])) / "
                 f"(sum(rate(ray_bark_request_seconds_count{{{APP}}}[{RATE}])) + "
                 f"sum(rate(ray_bark_http_errors_total{{{APP}}}[{RATE}])))", "errors / requests")], "percentunit"),
        ]),
        ("Stages (semantic, coarse, fine, codec)", [
            panel("Queue length by stage", [
                (f"sum by (stage) (ray_bark_stage_queue_length{{{APP}}})", "{{stage}}")], "short",
                  description="Requests waiting for a place in the batch, over all replicas of the stage."),
            panel("Mean batch size by stage", [
                (f"sum by (stage) (rate(ray_bark_stage_batch_size_sum{{{APP}}}[{RATE}])) / "
                 f"sum by (stage) (rate(ray_bark_stage_batch_size_count{{{APP}}}[{RATE}]))", "{{stage}}")],
                  "short"),
            panel("Tokens (frames) per second by stage", [
                (f"sum by (stage) (rate(ray_bark_stage_tokens_total{{{APP}}}[{RATE}]))", "{{stage}}")], "short",
                  description="Tokens for semantic and coarse, frames for fine and codec."),
            panel("Step time p50 / p95 by stage",
                  quantiles("ray_bark_stage_step_seconds", "stage", (0.5, 0.95)), "s"),
            panel("Request time in stage (queue + work) p95",
                  quantiles("ray_bark_stage_request_seconds", "stage", (0.95,)), "s"),
            panel("Stage requests by outcome", [
                (f"sum by (stage, outcome) (rate(ray_bark_stage_requests_total{{{APP}}}[{RATE}]))",
                 "{{stage}} {{outcome}}")], "reqps"),
        ]),
        ("Batch jobs", [
            panel("Batch items finished per second by outcome", [
                (f"sum by (outcome) (rate(ray_bark_batch_items_total{{{APP}}}[{RATE}]))", "{{outcome}}")], "short",
                  description="succeeded and failed are final; retried items go back to the queue."),
            panel("Batch queue", [
                (f"max(ray_bark_batch_queue_waiting{{{APP}}})", "waiting (unclaimed)"),
                (f"max(ray_bark_batch_queue_pending{{{APP}}})", "claimed, not finished"),
                (f"sum(ray_bark_batch_items_in_flight{{{APP}}})", "in the pipeline")], "short",
                  description="waiting and claimed are read from Redis by every worker (all jobs): max, not sum."),
            panel("Batch items in this time range", [
                (f"sum by (outcome) (increase(ray_bark_batch_items_total{{{APP}}}[$__range]))", "{{outcome}}")],
                  "short", kind="stat"),
        ]),
        ("Ray Serve (its own metrics; Ray's dashboards: Serve, Serve Deployment)", [
            panel("HTTP requests per second by route and code", [
                (f"sum by (route, status_code) (rate(ray_serve_num_http_requests_total{{{APP}}}[{RATE}]))",
                 "{{route}} {{status_code}}")], "reqps"),
            panel("HTTP latency p95 by route (proxy)", [
                (f"histogram_quantile(0.95, sum by (route, le) "
                 f"(rate(ray_serve_http_request_latency_ms_bucket{{{APP}}}[{RATE}])))", "{{route}}")], "ms"),
            panel("Ongoing HTTP requests (proxies)", [
                ("sum(ray_serve_num_ongoing_http_requests)", "ongoing")], "short"),
            panel("Requests processing per deployment", [
                (f"sum by (deployment) (ray_serve_replica_processing_queries{{{APP}}})", "{{deployment}}")],
                  "short"),
            panel("Requests queued in handles per deployment", [
                (f"sum by (deployment) (ray_serve_deployment_queued_queries{{{APP}}})", "{{deployment}}")],
                  "short"),
            panel("Healthy replicas per deployment", [
                (f"sum by (deployment) (ray_serve_deployment_replica_healthy{{{APP}}})", "{{deployment}}")],
                  "short"),
            panel("Replica processing latency p95 per deployment", [
                (f"histogram_quantile(0.95, sum by (deployment, le) "
                 f"(rate(ray_serve_deployment_processing_latency_ms_bucket{{{APP}}}[{RATE}])))", "{{deployment}}")],
                  "ms"),
            panel("Replica requests and errors per deployment", [
                (f"sum by (deployment) (rate(ray_serve_deployment_request_counter_total{{{APP}}}[{RATE}]))",
                 "{{deployment}} requests"),
                (f"sum by (deployment) (rate(ray_serve_deployment_error_counter_total{{{APP}}}[{RATE}]))",
                 "{{deployment}} errors")], "reqps"),
        ]),
    ]


def layout(sections: list[tuple[str, list[dict]]]) -> list[dict]:
    """Grafana's grid: 24 columns; a row header, then its panels left to right, 8 units high."""
    out, y, pid = [], 0, 1
    for title, panels in sections:
        out.append({"type": "row", "title": title, "id": pid, "collapsed": False, "panels": [],
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid, y, x = pid + 1, y + 1, 0
        for p in panels:
            w = p.pop("width")
            if x + w > 24:
                x, y = 0, y + 8
            out.append({**p, "id": pid, "gridPos": {"h": 8, "w": w, "x": x, "y": y}})
            pid, x = pid + 1, x + w
        y += 8
    return out


def dashboard() -> dict:
    variables = [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0},
        {"name": "application", "label": "Serve application", "type": "query", "datasource": DS,
         "query": {"query": "label_values(ray_bark_request_seconds_count, application)", "refId": "apps"},
         "definition": "label_values(ray_bark_request_seconds_count, application)",
         "includeAll": True, "allValue": ".*", "multi": True, "refresh": 2, "current": {}, "hide": 0},
    ]
    links = [{"title": "Ray Serve", "type": "link", "url": "/d/rayServeDashboard", "targetBlank": False,
              "tooltip": "Ray's own Serve dashboard (ray metrics launch-prometheus / Ray's Grafana setup)"},
             {"title": "Ray Serve deployments", "type": "link", "url": "/d/rayServeDeploymentDashboard",
              "targetBlank": False, "tooltip": "Ray's own per-deployment dashboard"}]
    return {"uid": "bark-serve", "title": "bark-serve", "tags": ["bark-serve", "ray", "tts"],
            "description": "Bark text-to-speech on Ray Serve: requests, stages, batch jobs and Ray Serve itself.",
            "editable": True, "schemaVersion": 39, "version": 1, "refresh": "30s", "timezone": "",
            "time": {"from": "now-1h", "to": "now"}, "templating": {"list": variables}, "links": links,
            "annotations": {"list": []}, "panels": layout(rows())}


def render() -> str:
    return json.dumps(dashboard(), indent=1) + "\n"


if __name__ == "__main__":
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text(render())
    print(TARGET)

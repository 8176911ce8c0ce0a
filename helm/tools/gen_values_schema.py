"""Write helm/bark-serve/values.schema.json: the `bark:` block's JSON schema, from BarkConfig.

Helm checks values against it on install, upgrade, lint and template, so a typo
(`max_batchs`) or a wrong type fails there, not later inside the RayService.
Only `bark` and the small `grafanaDashboard`, `datasetJob` and `serveHttp` blocks are constrained; other
values are free.
tests/helm fails when the
file is stale:   python helm/tools/gen_values_schema.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TARGET = REPO / "helm" / "bark-serve" / "values.schema.json"


def values_schema() -> dict:
    sys.path.insert(0, str(REPO))
    from bark_serve.serving.config import BarkConfig

    bark = BarkConfig.model_json_schema()
    defs = bark.pop("$defs")  # its "#/$defs/..." refs stay valid at the top level
    defs["BarkConfig"] = bark
    return {"type": "object", "properties": {"bark": {"$ref": "#/$defs/BarkConfig"},
                                             "grafanaDashboard": GRAFANA_DASHBOARD, "datasetJob": DATASET_JOB,
                                             "serveHttp": SERVE_HTTP},
            "$defs": defs}


# Serve's http_options beyond bark.http_host/http_port (templates/_serveconfig.tpl). keep_alive_timeout_s is
# an int in Ray Serve's HTTPOptions; 0 would close every connection after its first answer.
SERVE_HTTP = {
    "type": "object", "additionalProperties": False,
    "properties": {"keepAliveTimeoutS": {"type": ["integer", "null"], "minimum": 1}},
}


# The RayJob of `bark-serve dataset` (templates/rayjob.yaml).
DATASET_JOB = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "enabled": {"type": "boolean"},
        "input": {"type": "string"},
        "output": {"type": "string"},
        "format": {"type": "string", "enum": ["wav", "flac", "mp3", "opus", "pcm", "aac"]},
        "limit": {"type": ["integer", "null"], "minimum": 1},
        "extraArgs": {"type": "array", "items": {"type": "string"}},
        "submissionMode": {"type": "string", "enum": ["K8sJobMode", "HTTPMode"]},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "backoffLimit": {"type": "integer", "minimum": 0},
        "activeDeadlineSeconds": {"type": ["integer", "null"], "minimum": 1},
        "submitterResources": {"type": "object"},
    },
}


# The dashboard ConfigMap's values (templates/grafana-dashboard.yaml): a label is a DNS-style key and a
# string value, so a typo or a bare number fails at install time rather than in the API server.
GRAFANA_DASHBOARD = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "enabled": {"type": "boolean"},
        "labelKey": {"type": "string", "maxLength": 316,
                     "pattern": r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"},
        "labelValue": {"type": ["string", "integer"], "maxLength": 63,
                       "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"},
        "namespace": {"type": "string", "pattern": r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$", "maxLength": 63},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def render() -> str:
    return json.dumps(values_schema(), indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    TARGET.write_text(render())
    print(TARGET)

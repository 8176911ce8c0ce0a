"""Write helm/bark-serve/values.schema.json: the `bark:` block's JSON schema, from BarkConfig, and
hand-written schemas of the chart's other blocks.

Helm checks values against it on install, upgrade, lint and template, so a typo
(`max_batchs`, `redis.internal.enable`) or a wrong type fails there, not later inside the RayService
(or, worse, is ignored). The chart's own keys are closed (additionalProperties: false); Kubernetes
objects passed through as they are (resources, tolerations, affinity, nodeSelector, pod labels and
annotations, rayStartParams, volumes, security contexts, extraEnv items) are only typed. The top level
stays open (a parent chart passes `global`). Helm drops a key set to null where values.yaml has one, so
keys the templates read without a guard are `required` (a null there fails here, not in a template).
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
    defs["Pool"] = POOL
    return {"type": "object", "properties": {"bark": {"$ref": "#/$defs/BarkConfig"},
                                             "grafanaDashboard": GRAFANA_DASHBOARD, "datasetJob": DATASET_JOB,
                                             "serveHttp": SERVE_HTTP, **CHART_BLOCKS},
            "$defs": defs}


def _obj(properties: dict, **extra) -> dict:
    """A block of the chart's own keys: no others (a misspelt key fails instead of doing nothing)."""
    return {"type": "object", "additionalProperties": False, "properties": properties, **extra}


# Kubernetes objects the templates pass through (toYaml): only their type is checked. Those read with
# `with` may be null (nothing rendered); resources are deep-copied and may not.
K8S_OBJECT = {"type": "object"}
K8S_OBJECT_OR_NULL = {"type": ["object", "null"]}
K8S_LIST_OR_NULL = {"type": ["array", "null"]}
STRING_MAP_OR_NULL = {"type": ["object", "null"], "additionalProperties": {"type": "string"}}  # labels, annotations
NAME = {"type": "string", "minLength": 1}
PULL_POLICY = {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]}
COUNT = {"type": "integer", "minimum": 0}

# A worker group (templates/rayservice.yaml, rayjob.yaml; checked in _validate.tpl), merged over
# poolDefaults. Counts are whole numbers (the templates cut them with `int`). gpu.count stays a number:
# _validate.tpl names the pool and suggests fractional num_gpus for a fractional count.
POOL_PROPERTIES = {
    "replicas": COUNT,
    "minReplicas": COUNT,
    "maxReplicas": COUNT,
    "resourceUnits": {"type": "integer", "minimum": 1},
    "gpu": _obj({"count": {"type": "number", "minimum": 0}, "resourceName": NAME}),
    "resources": K8S_OBJECT,
    "nodeSelector": K8S_OBJECT_OR_NULL,
    "tolerations": K8S_LIST_OR_NULL,
    "affinity": K8S_OBJECT_OR_NULL,
    "rayStartParams": K8S_OBJECT,
    "podLabels": STRING_MAP_OR_NULL,
    "podAnnotations": STRING_MAP_OR_NULL,
}
POOL = _obj(POOL_PROPERTIES) | {"type": ["object", "null"]}  # pools.<name>: null leaves the pool undefined

# Helm drops a key set to null when values.yaml has it, so `poolDefaults.resources=null` reaches the
# schema as a missing key: what the templates read without a guard is required.
POOL_DEFAULTS = _obj(POOL_PROPERTIES | {"gpu": _obj(POOL_PROPERTIES["gpu"]["properties"],
                                                     required=["count", "resourceName"])},
                     required=["replicas", "minReplicas", "maxReplicas", "resourceUnits", "gpu", "resources",
                               "rayStartParams"])

PROBE = _obj({
    "enabled": {"type": "boolean"},
    "path": {"type": "string", "pattern": "^/"},
    "initialDelaySeconds": COUNT,
    "periodSeconds": {"type": "integer", "minimum": 1},
    "timeoutSeconds": {"type": "integer", "minimum": 1},
    "failureThreshold": {"type": "integer", "minimum": 1},
}, required=["path", "initialDelaySeconds", "periodSeconds", "timeoutSeconds", "failureThreshold"])

CHART_BLOCKS = {
    # Worker groups by pool name (_validate.tpl checks the names of the pools in use).
    "pools": {"type": "object", "additionalProperties": {"$ref": "#/$defs/Pool"}},
    "poolDefaults": POOL_DEFAULTS,
    "head": _obj({
        "resources": K8S_OBJECT,
        "rayStartParams": K8S_OBJECT,
        "serveTraffic": {"type": "boolean"},
        "nodeSelector": K8S_OBJECT_OR_NULL,
        "tolerations": K8S_LIST_OR_NULL,
        "affinity": K8S_OBJECT_OR_NULL,
        "podLabels": STRING_MAP_OR_NULL,
        "podAnnotations": STRING_MAP_OR_NULL,
    }, required=["resources", "rayStartParams"]),
    # Worker probes on the serve port (templates/_pod.tpl bark-serve.httpProbe); Kubernetes' minimums.
    "probes": _obj({"readiness": PROBE, "liveness": PROBE}, required=["readiness", "liveness"]),
    "networkPolicy": _obj({
        "enabled": {"type": "boolean"},
        "operatorNamespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "operatorPodLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "httpFrom": {"type": ["array", "null"], "items": {"type": "object"}},  # NetworkPolicyPeers
    }, required=["operatorNamespace", "operatorPodLabels"]),
    # Secret names and keys are strings (`--set redis.auth.password=1234` is an integer: use --set-string).
    "redis": _obj({
        "auth": _obj({"enabled": {"type": "boolean"}, "existingSecret": {"type": "string"}, "secretKey": NAME,
                      "password": {"type": "string"}}, required=["secretKey"]),
        "internal": _obj({
            "enabled": {"type": "boolean"},
            "image": NAME,
            "pullPolicy": PULL_POLICY,
            "persistence": _obj({"size": {"type": ["string", "integer"]},
                                 "storageClassName": {"type": ["string", "null"]}}, required=["size"]),
            "maxmemory": {"type": ["string", "integer"]},
            "resources": K8S_OBJECT,
            "nodeSelector": K8S_OBJECT_OR_NULL,
            "tolerations": K8S_LIST_OR_NULL,
        }, required=["image", "persistence", "maxmemory", "resources"]),
        "external": _obj({"address": {"type": "string"}}),
    }, required=["auth", "internal", "external"]),
    "gcsFaultTolerance": _obj({"enabled": {"type": "boolean"}, "redisAddress": {"type": "string"},
                               "externalStorageNamespace": {"type": "string"}}),
    "image": _obj({"repository": NAME, "tag": {"type": ["string", "null"]}, "pullPolicy": PULL_POLICY},
                  required=["repository", "pullPolicy"]),
    "autoscaler": _obj({"enabled": {"type": "boolean"}, "idleTimeoutSeconds": COUNT,
                        "upscalingMode": {"type": "string", "enum": ["Default", "Aggressive", "Conservative"]},
                        "resources": K8S_OBJECT}, required=["idleTimeoutSeconds", "upscalingMode", "resources"]),
    "service": _obj({"type": {"type": "string", "enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                     "annotations": STRING_MAP_OR_NULL}, required=["type"]),
    "rayAuth": _obj({"enabled": {"type": "boolean"}, "existingSecret": {"type": "string"}}),
    "apiKeys": _obj({"existingSecret": {"type": "string"}, "secretKey": NAME,
                     "keys": {"type": ["array", "null"], "items": {"type": "string"}}}, required=["secretKey"]),
    "weights": _obj({
        "mountPath": {"type": "string", "pattern": "^/"},
        "hfHome": {"type": "string", "pattern": "^/"},
        "volume": K8S_OBJECT,  # a pod volume source
        "readOnly": {"type": "boolean"},
        "offline": {"type": "boolean"},
        "hfToken": _obj({"secretName": {"type": ["string", "null"]}, "secretKey": NAME}),
    }, required=["mountPath", "hfHome", "volume", "hfToken"]),
    "tests": _obj({"enabled": {"type": "boolean"}}),
    "podSecurityContext": K8S_OBJECT_OR_NULL,
    "containerSecurityContext": K8S_OBJECT_OR_NULL,
    "imagePullSecrets": K8S_LIST_OR_NULL,
    "extraEnv": {"type": ["array", "null"], "items": {"type": "object"}},
    "extraVolumes": {"type": ["array", "null"], "items": {"type": "object"}},
    "extraVolumeMounts": {"type": ["array", "null"], "items": {"type": "object"}},
    "commonLabels": STRING_MAP_OR_NULL,
    "nameOverride": {"type": ["string", "null"]},
    "fullnameOverride": {"type": ["string", "null"]},
    "rayVersion": {"type": "string", "pattern": r"^[0-9]+\.[0-9]+"},
}


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

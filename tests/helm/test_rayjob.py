"""The chart's RayJob for ``bark-serve dataset`` (off by default): it renders, its cluster is valid against
KubeRay's CRD, each pool's worker group offers the resource its stage asks for, and the entrypoint is
the command the README documents.

The whole RayJob spec is validated against KubeRay's RayJob CRD (../shared/kuberay/ray.io_rayjobs.yaml,
beside the RayService CRD), and its ``spec.rayClusterSpec`` also against the RayService CRD's
``rayClusterConfig`` (the same RayClusterSpec type, which the RayService's tests validate too).
"""

from __future__ import annotations

import shlex

import jsonschema
import kubernetes_validate
import pytest
import yaml

from bark_serve.serving.config import parse_config
from bark_serve.stages.constants import STAGES
from tests.helm.test_chart import (
    CHART,
    CRD,
    K8S_VERSIONS,
    RELEASE,
    crd_schema,
    helm,
    pool_resources,
    unknown_fields,
)

# KubeRay ray.io/v1 RayJobSpec (ray-operator/apis/ray/v1/rayjob_types.go).
RAYJOB_SPEC_FIELDS = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                      "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
                      "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
                      "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"}
JOB_SETS = ["datasetJob.enabled=true", "datasetJob.input=s3://bucket/texts.parquet",
            "datasetJob.output=s3://bucket/audio", "datasetJob.limit=1000",
            "datasetJob.extraArgs={--input-format,parquet}"]


def render(*sets: str) -> list[dict]:
    out = helm("template", RELEASE, str(CHART), "--namespace", "bark", *[a for s in sets for a in ("--set", s)]).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def rayjob(*sets: str) -> tuple[dict, dict]:
    docs = render(*sets)
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dataset-config")]
    return job, cm


def test_off_by_default():
    assert not [d for d in render() if d["kind"] == "RayJob"]


def test_rayjob_containers_give_a_starting_proxy_30_s():
    job, _ = rayjob(*JOB_SETS)
    spec = job["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    containers = [c for g in groups for c in g["template"]["spec"]["containers"]]
    assert containers and all([e["value"] for e in c["env"] if e["name"] == "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"]
                              == ["30"] for c in containers)


def test_rayjob_cluster_matches_the_kuberay_crd():
    job, _ = rayjob(*JOB_SETS)
    assert set(job["spec"]) <= RAYJOB_SPEC_FIELDS
    cluster_schema = crd_schema()["properties"]["spec"]["properties"]["rayClusterConfig"]
    cluster = job["spec"]["rayClusterSpec"]
    errors = list(jsonschema.Draft7Validator(cluster_schema).iter_errors(cluster))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    assert unknown_fields(cluster, cluster_schema) == []


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rayjob_pods_and_configmap_match_kubernetes_schemas(version):
    job, cm = rayjob(*JOB_SETS)
    cluster = job["spec"]["rayClusterSpec"]
    objs = [cm, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "submitter"},
                 "spec": job["spec"]["submitterPodTemplate"]["spec"]}]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        objs.append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": group.get("groupName", "head")},
                     "spec": group["template"]["spec"]})
    for obj in objs:
        kubernetes_validate.validate(obj, version, strict=True)


def test_entrypoint_config_and_pools():
    job, cm = rayjob(*JOB_SETS)
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:5] == ["bark-serve", "dataset", "s3://bucket/texts.parquet", "--out", "s3://bucket/audio"]
    assert argv[argv.index("--config") + 1] == "/etc/bark/bark.yaml"
    assert argv[argv.index("--limit") + 1] == "1000" and argv[-2:] == ["--input-format", "parquet"]
    # the mounted config is the bark: block, as the dataset command parses it
    cfg = parse_config(yaml.safe_load(cm["data"]["bark.yaml"]))
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = {"name": "dataset-config", "mountPath": "/etc/bark", "readOnly": True}
    assert mount in head["containers"][0]["volumeMounts"]
    assert {"name": "dataset-config", "configMap": {"name": cm["metadata"]["name"]}} in head["volumes"]
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    for stage in STAGES:  # every stage's pool resource is offered by its own worker group
        pool = cfg.stage(stage).pool
        assert pool_resources(groups[pool]["rayStartParams"]).get(f"bark_pool_{pool}", 0) >= 1
    for g in groups.values():
        assert g["replicas"] == g["minReplicas"] == g["maxReplicas"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["submissionMode"] == "K8sJobMode"


@pytest.mark.parametrize("sets, message", [
    (["datasetJob.enabled=true"], "needs datasetJob.input and datasetJob.output"),
    (["datasetJob.format=midi"], "datasetJob/format"),
    (["datasetJob.inputs=x"], "inputs"),
])
def test_misconfigured_job_fails_with_a_clear_message(sets, message):
    proc = helm("template", RELEASE, str(CHART), *[a for s in sets for a in ("--set", s)], check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_network_policy_lets_the_submitter_reach_the_dashboard():
    """K8sJobMode: the submitter pod runs `ray job submit` against the head's dashboard (8265)."""
    docs = render(*JOB_SETS, "networkPolicy.enabled=true")
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith("-ray")]
    submitter = job["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert selects(policy["spec"]["podSelector"], head), "the policy guards the job's head"
    assert not selects(policy["spec"]["podSelector"], submitter), "the submitter is no Ray pod"
    allowed = [rule for rule in policy["spec"]["ingress"]
               if any(set(peer) == {"podSelector"} and selects(peer["podSelector"], submitter)
                      for peer in rule.get("from", []))]
    assert allowed and all({"port": 8265, "protocol": "TCP"} in rule.get("ports", [{"port": 8265, "protocol": "TCP"}])
                           for rule in allowed)
    # without the dataset job no rule mentions the submitter
    (plain,) = [d for d in render("networkPolicy.enabled=true") if d["kind"] == "NetworkPolicy"]
    assert "dataset-submitter" not in yaml.safe_dump(plain)


def _rayjob_spec_schema() -> dict:
    crd_path = CRD.parent / "ray.io_rayjobs.yaml"
    if not crd_path.exists():
        pytest.skip(f"no RayJob CRD at {crd_path}")
    (v1,) = [v for v in yaml.safe_load(crd_path.read_text())["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]["properties"]["spec"]


def test_the_whole_rayjob_spec_matches_the_rayjob_crd():
    schema = _rayjob_spec_schema()
    job, _ = rayjob(*JOB_SETS)
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(job["spec"]))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    assert unknown_fields(job["spec"], schema) == []  # nothing the API server would prune
    assert set(job["spec"]) <= set(schema["properties"])


def test_submitter_pod_template_matches_the_rayjob_crd():
    schema = _rayjob_spec_schema()["properties"]["submitterPodTemplate"]
    job, _ = rayjob(*JOB_SETS)
    template = job["spec"]["submitterPodTemplate"]
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(template))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    assert unknown_fields(template, schema) == []
    assert template["metadata"]["labels"]["app.kubernetes.io/component"] == "dataset-submitter"

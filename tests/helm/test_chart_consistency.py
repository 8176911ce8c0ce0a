"""What an outside audit of the chart found, each checked on the rendered objects: Secrets the pods
reference are rendered (or named as existing ones), GPUs reach Ray whatever the resource's name, pools
hold their deployments, names fit KubeRay's and Kubernetes' limits for long release names, the API keys
reach only the pods that can run an Orchestrator, and NOTES warn about registered voices that would not
last and about a Redis or Ray open to every pod. (Validator messages: test_chart.py's misconfiguration table.)
"""

from __future__ import annotations

import re

import pytest
import yaml

from tests.helm.test_chart import CHART, RELEASE, SETS, helm, rendered

DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
JOB = ["datasetJob.enabled=true", "datasetJob.input=s3://bucket/in.parquet", "datasetJob.output=s3://bucket/out"]


def template(*sets: str, release: str = RELEASE, json_sets: tuple[str, ...] = ()) -> list[dict]:
    args = [a for s in sets for a in ("--set", s)] + [a for s in json_sets for a in ("--set-json", s)]
    out = helm("template", release, str(CHART), "--namespace", "bark", *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def fails(*sets: str, json_sets: tuple[str, ...] = ()) -> str:
    args = [a for s in sets for a in ("--set", s)] + [a for s in json_sets for a in ("--set-json", s)]
    proc = helm("template", RELEASE, str(CHART), *args, check=False)
    assert proc.returncode != 0, "rendered, but should have failed"
    return proc.stderr


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def secret_refs(obj) -> set[str]:
    """Names of every Secret an object refers to (secretKeyRef, KubeRay's authOptions.secretName)."""
    found: set[str] = set()
    if isinstance(obj, dict):
        if isinstance(obj.get("secretKeyRef"), dict):
            found.add(obj["secretKeyRef"]["name"])
        if "mode" in obj and "secretName" in obj:
            found.add(obj["secretName"])
        for v in obj.values():
            found |= secret_refs(v)
    elif isinstance(obj, list):
        for v in obj:
            found |= secret_refs(v)
    return found


def worker_groups(docs: list[dict]) -> list[dict]:
    groups = []
    for rs in of_kind(docs, "RayService"):
        groups += rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    for job in of_kind(docs, "RayJob"):
        groups += job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return groups


# --- Redis: every Secret a pod reads is rendered, or named by the user ---------------------------

# Secrets the user names (existing ones); every other Secret a pod reads must be in the render.
EXISTING = {"shared-redis", "bark-api-keys", "hf-token"}

REDIS_SETS = {
    # a password env on an external Redis whose password the chart-made Secret holds
    "external-password": ["bark.batch.redis_url=redis://redis.data:6379/0",
                          "bark.batch.redis_password_env=BARK_REDIS_PASSWORD", "redis.auth.password=s3cret"],
    # voices only (batch off) on the in-chart Redis
    "internal-voices": ["bark.batch.redis_url=redis://rel-bark-serve-redis:6379/0",
                        "bark.batch.redis_password_env=BARK_REDIS_PASSWORD", "redis.internal.enabled=true"],
    # the URL from an env var the user adds (extraEnv); password from the in-chart Redis's Secret
    "url-env": ["bark.batch.enabled=true", "bark.batch.redis_url_env=BARK_REDIS_URL",
                "bark.batch.redis_password_env=BARK_REDIS_PASSWORD", "redis.internal.enabled=true",
                "extraEnv[0].name=BARK_REDIS_URL", "extraEnv[0].value=redis://rel-bark-serve-redis:6379/0", *JOB],
}


@pytest.mark.parametrize("name", SETS)
def test_value_sets_render_every_secret_their_pods_read(name):
    docs = list(rendered(name))
    made = {d["metadata"]["name"] for d in of_kind(docs, "Secret")}
    missing = secret_refs(docs) - made - EXISTING
    assert not missing, f"pods read Secrets nobody renders: {missing}"


@pytest.mark.parametrize("name", sorted(REDIS_SETS))
def test_a_wired_redis_password_env_reads_a_rendered_secret(name):
    docs = template(*REDIS_SETS[name])
    made = {d["metadata"]["name"]: d for d in of_kind(docs, "Secret")}
    assert "rel-bark-serve-redis" in made and "redis-password" in made["rel-bark-serve-redis"]["data"]
    assert not secret_refs(docs) - set(made) - EXISTING
    env = [e for g in worker_groups(docs) for c in g["template"]["spec"]["containers"] for e in c["env"]
           if e["name"] == "BARK_REDIS_PASSWORD"]
    assert env and all(e["valueFrom"]["secretKeyRef"] == {"name": "rel-bark-serve-redis", "key": "redis-password"}
                       for e in env)


def test_redis_password_env_is_not_needed_without_auth():
    docs = template("bark.batch.enabled=true", "bark.batch.redis_url=redis://rel-bark-serve-redis:6379/0",
                    "redis.internal.enabled=true", "redis.auth.enabled=false")
    assert not [d for d in of_kind(docs, "Secret") if d["metadata"]["name"].endswith("-redis")]
    (sts,) = of_kind(docs, "StatefulSet")
    assert "--requirepass" not in sts["spec"]["template"]["spec"]["containers"][0]["args"]


def test_batch_accepts_redis_url_env_instead_of_redis_url():
    docs = template("bark.batch.enabled=true", "bark.batch.redis_url_env=BARK_REDIS_URL", "redis.auth.enabled=false")
    (rs,) = of_kind(docs, "RayService")
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["batch"]["enabled"] is True and args["batch"]["redis_url_env"] == "BARK_REDIS_URL"
    assert "BatchWorker" in [d["name"] for d in yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]
                             ["deployments"]]
    assert "needs bark.batch.redis_url, or bark.batch.redis_url_env" in fails("bark.batch.enabled=true")


# --- GPUs reach Ray: num-gpus from gpu.count, whole numbers only ---------------------------------

def test_num_gpus_is_passed_to_ray_whatever_the_gpu_resource_is_called():
    docs = template("pools.codec.gpu.resourceName=nvidia.com/mig-1g.10gb", "pools.fine.gpu.count=2", *JOB)
    groups = worker_groups(docs)
    assert len(groups) == 8  # four pools, in the RayService and in the dataset RayJob
    for g in groups:
        (c,) = g["template"]["spec"]["containers"]
        count = {"codec": 1, "fine": 2}.get(g["groupName"], 1)
        assert g["rayStartParams"]["num-gpus"] == str(count), g["groupName"]
        name = "nvidia.com/mig-1g.10gb" if g["groupName"] == "codec" else "nvidia.com/gpu"
        assert c["resources"]["limits"][name] == count


def test_cpu_pools_get_no_num_gpus():
    (cpu,) = [g for g in worker_groups(list(rendered("internal-redis-batch"))) if g["groupName"] == "cpu"]
    assert "num-gpus" not in cpu["rayStartParams"]
    assert not [k for k in cpu["template"]["spec"]["containers"][0]["resources"].get("limits", {}) if "gpu" in k]


@pytest.mark.parametrize("count", ["0.5", "1.5"])
def test_a_fractional_gpu_count_fails(count):
    err = fails(json_sets=(f"pools.fine.gpu.count={count}", "bark.fine.num_gpus=0.5"))
    assert f"pools.fine.gpu.count={count}: a pod can only ask for a whole number of GPUs" in err, err


# --- pools hold their deployments -----------------------------------------------------------------

def test_pool_capacity_counts_every_deployment_at_its_most_replicas():
    # what fails with maxReplicas 1 fits with 2 (fine: 2 replicas x 1 GPU)
    assert "pool fine cannot hold its replicas" in fails("bark.fine.num_replicas=2")
    template("bark.fine.num_replicas=2", "pools.fine.maxReplicas=2")
    # fractions that add up to exactly the pool's GPUs fit (0.3 + 0.3 + 0.3 + 0.1 is not 1.0 in floats)
    single = str(CHART / "values-single-pool.yaml")
    out = helm("template", RELEASE, str(CHART), "-f", single, check=False)
    assert out.returncode == 0, out.stderr
    out = helm("template", RELEASE, str(CHART), "-f", single, "--set-json", "bark.codec.num_gpus=0.2", check=False)
    assert out.returncode and "pool main cannot hold its replicas: up to 1.1 GPUs" in out.stderr, out.stderr
    # a disabled deployment takes no room
    template("bark.batch.worker.pool=fine", "bark.batch.worker.num_gpus=1", "bark.batch.worker.num_replicas=3")


# --- names fit for long release names ------------------------------------------------------------

def test_long_release_names_keep_names_within_limits():
    release = "a" * 18 + "-" + "b" * 21  # 40 characters
    assert len(release) == 40
    docs = template("redis.internal.enabled=true", "gcsFaultTolerance.enabled=true", *JOB,
                    "bark.batch.enabled=true", "bark.batch.redis_password_env=BARK_REDIS_PASSWORD",
                    "bark.batch.redis_url=redis://x:6379/0", release=release)
    (job,) = of_kind(docs, "RayJob")
    (sts,) = of_kind(docs, "StatefulSet")
    redis_svc = [d for d in of_kind(docs, "Service") if d["metadata"]["name"] == sts["spec"]["serviceName"]]
    assert len(job["metadata"]["name"]) <= 47 and job["metadata"]["name"].endswith("-dataset")
    assert len(sts["metadata"]["name"]) <= 52 and sts["metadata"]["name"].endswith("-redis")
    for name in (job["metadata"]["name"], sts["metadata"]["name"]):
        assert re.fullmatch(DNS_LABEL, name), name
    assert redis_svc, "the StatefulSet's governing Service is rendered under the same name"
    (rs,) = of_kind(docs, "RayService")
    address = rs["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAddress"]
    assert address == f"{sts['metadata']['name']}:6379"
    # short release names keep the plain names
    short = template("redis.internal.enabled=true", *JOB)
    assert [d["metadata"]["name"] for d in of_kind(short, "RayJob")] == ["rel-bark-serve-dataset"]
    assert [d["metadata"]["name"] for d in of_kind(short, "StatefulSet")] == ["rel-bark-serve-redis"]


# --- NOTES warn about registered voices that would not last ---------------------------------------

def notes(*sets: str) -> str:
    args = [a for s in sets for a in ("--set", s)]
    out = helm("install", RELEASE, str(CHART), "--namespace", "bark", "--dry-run=client", *args).stdout
    assert "\nNOTES:\n" in out, out[-2000:]
    return out.split("\nNOTES:\n", 1)[1]


def test_notes_warn_when_registered_voices_have_no_durable_store():
    text = notes()
    assert "WARNING: voice cloning is on" in text and "bark.voice_cloning.store_dir" in text
    assert "ReadWriteMany" in text and "bark.batch.redis_url" in text
    for durable in (["bark.voice_cloning.store_dir=/voices"], ["bark.voice_cloning.enabled=false"],
                    ["bark.batch.redis_url=redis://rel-bark-serve-redis:6379/0", "redis.internal.enabled=true",
                     "bark.batch.redis_password_env=BARK_REDIS_PASSWORD"],
                    ["bark.batch.redis_url_env=BARK_REDIS_URL", "redis.auth.enabled=false"]):
        assert "voice cloning is on" not in notes(*durable), durable


def test_readme_tells_how_to_make_voices_durable():
    readme = (CHART / "README.md").read_text()
    section = readme.split("## Registered voices (voice cloning)", 1)[1].split("\n## ", 1)[0]
    for words in ("bark.batch.redis_url", "bark.voice_cloning.store_dir", "ReadWriteMany", "extraVolumes",
                  "extraVolumeMounts"):
        assert words in section, words


def test_notes_warn_when_gcs_and_batch_results_share_the_in_chart_redis():
    shared = ["gcsFaultTolerance.enabled=true", "redis.internal.enabled=true", "bark.batch.enabled=true",
              "bark.batch.redis_url=redis://rel-bark-serve-redis:6379/0",
              "bark.batch.redis_password_env=BARK_REDIS_PASSWORD"]
    assert "WARNING: GCS fault tolerance and batch jobs share the in-chart Redis" in notes(*shared)
    for apart in (["bark.batch.results_dir=/results"], ["gcsFaultTolerance.redisAddress=gcs-redis.data:6379"]):
        assert "share the in-chart Redis" not in notes(*shared, *apart), apart
    assert "share the in-chart Redis" not in notes()  # neither on


# --- The API keys reach only the pods that can run an Orchestrator replica --------------------------

def _key_holders(docs: list[dict]) -> dict[str, list[str]]:
    """Per RayService/RayJob: the head and worker groups whose container env holds BARK_API_KEYS."""
    out: dict[str, list[str]] = {}
    for d in docs:
        if d["kind"] not in ("RayService", "RayJob"):
            continue
        spec = d["spec"].get("rayClusterConfig") or d["spec"]["rayClusterSpec"]
        groups = [("head", spec["headGroupSpec"])] + [(w["groupName"], w) for w in spec["workerGroupSpecs"]]
        out[d["kind"]] = [name for name, g in groups
                          if any(e["name"] == "BARK_API_KEYS" for c in g["template"]["spec"]["containers"]
                                 for e in c.get("env", []))]
    return out


def test_api_keys_reach_only_the_orchestrators_pool_and_never_the_dataset_job():
    # orchestrator.pool null (the default): a replica may land on any node, so every RayService pod has them
    default = _key_holders(template(*JOB))
    assert default["RayService"] == ["head", "coarse", "codec", "fine", "semantic"]
    assert default["RayJob"] == []  # the dataset job runs no Orchestrator
    pinned = _key_holders(template("bark.orchestrator.pool=semantic", *JOB))
    assert pinned == {"RayService": ["semantic"], "RayJob": []}
    assert _key_holders(template("bark.orchestrator.api_keys_env=null")) == {"RayService": []}


# --- NOTES warn when Redis or Ray is open to the whole cluster ---------------------------------------

def test_notes_warn_when_redis_or_ray_is_open_to_every_pod():
    open_redis = ["redis.internal.enabled=true", "redis.auth.enabled=false"]
    text = notes(*open_redis)
    assert "WARNING: networkPolicy.enabled is false" in text
    assert "rel-bark-serve-redis:6379" in text and "has no password" in text and "dashboard on 8265" not in text
    both = notes(*open_redis, "rayAuth.enabled=false", "gcsFaultTolerance.enabled=true")
    assert "the GCS metadata" in both and "dashboard on 8265 accepts job submissions" in both
    for closed in ([], ["redis.internal.enabled=true"], [*open_redis, "networkPolicy.enabled=true"],
                   ["rayAuth.enabled=false", "networkPolicy.enabled=true"]):
        assert "networkPolicy.enabled is false" not in notes(*closed), closed

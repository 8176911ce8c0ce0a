"""values.schema.json beyond `bark:` (helm/tools/gen_values_schema.py): the chart's own blocks are
closed, so a misspelt key or a wrong type fails `helm lint` / `helm template` with a message naming it
instead of doing nothing; Kubernetes objects passed through (resources, tolerations, rayStartParams,
...) stay free. (Freshness of the file: test_chart.py::test_values_schema_is_fresh.)
"""

from __future__ import annotations

import pytest
import yaml

from tests.helm.test_chart import CHART, RELEASE, helm

SCHEMA_ERROR = "values don't meet the specifications of the schema"


def args(sets: tuple[str, ...], json_sets: tuple[str, ...]) -> list[str]:
    return [a for s in sets for a in ("--set", s)] + [a for s in json_sets for a in ("--set-json", s)]


def schema_error(*sets: str, json_sets: tuple[str, ...] = ()) -> str:
    proc = helm("template", RELEASE, str(CHART), *args(sets, json_sets), check=False)
    assert proc.returncode != 0, f"rendered, but {sets + json_sets} should have failed"
    assert SCHEMA_ERROR in proc.stderr, proc.stderr
    return proc.stderr


def render(*sets: str, json_sets: tuple[str, ...] = ()) -> list[dict]:
    out = helm("template", RELEASE, str(CHART), "--namespace", "bark", *args(sets, json_sets)).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("typo, where, key", [
    ("redis.internal.enable=true", "/redis/internal", "enable"),
    ("redis.auth.existingSecrets=my-redis", "/redis/auth", "existingSecrets"),
    ("redis.external.adress=redis:6379", "/redis/external", "adress"),
    ("redis.internal.persistence.storageClass=fast", "/redis/internal/persistence", "storageClass"),
    ("networkPolicy.enable=true", "/networkPolicy", "enable"),
    ("networkPolicy.operatorNamespaces=ray", "/networkPolicy", "operatorNamespaces"),
    ("pools.semantic.replica=2", "/pools/semantic", "replica"),
    ("pools.mine.maxReplica=2", "/pools/mine", "maxReplica"),  # a new pool is checked too
    ("pools.codec.gpu.resource=nvidia.com/mig-1g.10gb", "/pools/codec/gpu", "resource"),
    ("poolDefaults.gpu.cnt=1", "/poolDefaults/gpu", "cnt"),
    ("poolDefaults.resourceUnit=8", "/poolDefaults", "resourceUnit"),
    ("probes.readiness.periodSecond=5", "/probes/readiness", "periodSecond"),
    ("probes.liveness.enable=true", "/probes/liveness", "enable"),
    ("probes.startup.enabled=true", "/probes", "startup"),
    ("head.serveTrafic=false", "/head", "serveTrafic"),
    ("head.nodeSelectors.pool=cpu", "/head", "nodeSelectors"),
    ("image.pullpolicy=Always", "/image", "pullpolicy"),
    ("autoscaler.idleTimeout=30", "/autoscaler", "idleTimeout"),
    ("service.annotation.a=b", "/service", "annotation"),
    ("rayAuth.enable=false", "/rayAuth", "enable"),
    ("apiKeys.key={a}", "/apiKeys", "key"),
    ("gcsFaultTolerance.enable=true", "/gcsFaultTolerance", "enable"),
    ("weights.readonly=true", "/weights", "readonly"),
    ("weights.hfToken.secret=hf", "/weights/hfToken", "secret"),
    ("tests.enable=false", "/tests", "enable"),
])
def test_misspelt_key_fails_naming_it(typo, where, key):
    err = schema_error(typo)
    assert f"at '{where}': additional properties '{key}' not allowed" in err, err


def test_helm_lint_reports_the_typo_too():
    proc = helm("lint", str(CHART), "--set", "redis.internal.enable=true", check=False)
    assert proc.returncode != 0 and "additional properties 'enable' not allowed" in proc.stdout + proc.stderr


@pytest.mark.parametrize("sets, json_sets, where", [
    ((), ("pools.semantic.replicas=1.5",), "/pools/semantic/replicas"),
    (("pools.semantic.minReplicas=-1",), (), "/pools/semantic/minReplicas"),
    (("poolDefaults.resourceUnits=0",), (), "/poolDefaults/resourceUnits"),
    (("poolDefaults.gpu.count=-1",), (), "/poolDefaults/gpu/count"),
    (("pools.fine.gpu.count=one",), (), "/pools/fine/gpu/count"),
    (("probes.readiness.periodSeconds=0",), (), "/probes/readiness/periodSeconds"),
    (("probes.readiness.path=readyz",), (), "/probes/readiness/path"),
    (("probes.liveness.enabled=yes",), (), "/probes/liveness/enabled"),
    (("redis.internal.pullPolicy=Sometimes",), (), "/redis/internal/pullPolicy"),
    (("redis.auth.password=123456",), (), "/redis/auth/password"),  # an integer: --set-string it
    (("networkPolicy.operatorNamespace=Kuberay_System",), (), "/networkPolicy/operatorNamespace"),
    (("networkPolicy.httpFrom=everyone",), (), "/networkPolicy/httpFrom"),
    (("head.serveTraffic=no",), (), "/head/serveTraffic"),
    (("head.podLabels.tier=1",), (), "/head/podLabels/tier"),  # a label value must be a string
    (("service.type=Ingress",), (), "/service/type"),
    (("image.tag=123",), (), "/image/tag"),  # would render bark-serve:%!s(int64=123)
])
def test_wrong_type_or_value_fails_naming_the_key(sets, json_sets, where):
    err = schema_error(*sets, json_sets=json_sets)
    assert f"at '{where}'" in err, err


@pytest.mark.parametrize("json_set, message", [
    # Helm drops a null over a key values.yaml has: the schema sees the key missing.
    ("poolDefaults.resources=null", "at '/poolDefaults': missing property 'resources'"),
    ("poolDefaults.gpu=null", "at '/poolDefaults': missing property 'gpu'"),
    ("poolDefaults.rayStartParams=null", "at '/poolDefaults': missing property 'rayStartParams'"),
    ("head.rayStartParams=null", "at '/head': missing property 'rayStartParams'"),
    ("probes.readiness=null", "at '/probes': missing property 'readiness'"),
    ("redis.internal=null", "at '/redis': missing property 'internal'"),
    # A pool's own null (no default under it) reaches the schema as null.
    ("pools.fine.resources=null", "at '/pools/fine/resources'"),
    ("pools.fine.gpu=null", "at '/pools/fine/gpu'"),
])
def test_null_where_a_template_needs_a_value_is_a_schema_error_not_a_crash(json_set, message):
    err = schema_error(json_sets=(json_set,))
    assert message in err and "deepCopy" not in err and "nil pointer" not in err, err


def test_null_is_accepted_where_the_templates_skip_it():
    docs = render(json_sets=("head.nodeSelector=null", "head.tolerations=null", "pools.fine.tolerations=null",
                             "pools.semantic.affinity=null", "networkPolicy.httpFrom=null", "pools.unused=null",
                             "redis.internal.persistence.storageClassName=null", "apiKeys.keys=null"))
    assert [d for d in docs if d["kind"] == "RayService"]


def test_kubernetes_pass_through_objects_stay_free():
    docs = render("poolDefaults.resources.limits.example\\.com/fpga=1", "head.rayStartParams.num-cpus=0",
                  "pools.fine.rayStartParams.object-store-memory=1000000000", "pools.fine.podAnnotations.a=b",
                  "redis.internal.enabled=true", "redis.internal.maxmemory=1073741824",
                  "redis.internal.persistence.size=10", "service.type=LoadBalancer",
                  json_sets=('pools.fine.affinity={"nodeAffinity": {"anything": ["goes"]}}',
                             'extraEnv=[{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]',
                             'weights.volume={"persistentVolumeClaim": {"claimName": "w"}}',
                             'networkPolicy.httpFrom=[{"ipBlock": {"cidr": "10.0.0.0/8"}}]'))
    (rs,) = [d for d in docs if d["kind"] == "RayService"]
    (fine,) = [g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == "fine"]
    assert fine["template"]["spec"]["affinity"] == {"nodeAffinity": {"anything": ["goes"]}}
    assert fine["template"]["spec"]["containers"][0]["resources"]["limits"]["example.com/fpga"] == 1


def test_a_fractional_gpu_count_keeps_the_templates_message():
    """gpu.count is a number in the schema: _validate.tpl's message names the pool and the way out."""
    proc = helm("template", RELEASE, str(CHART), "--set-json", "poolDefaults.gpu.count=0.5",
                "--set-json", "bark.fine.num_gpus=0.5", check=False)
    assert proc.returncode != 0 and "a pod can only ask for a whole number of GPUs" in proc.stderr, proc.stderr

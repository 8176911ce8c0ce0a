"""The chart's Serve HTTP options and ports (issue 25): keep_alive_timeout_s from serveHttp, the one
serveConfigV2 field outside the ``bark:`` block, and the container ports the chart's README and
values.yaml account for.
"""

from __future__ import annotations

import re

import pytest
import yaml

from bark_serve.serving.config import parse_config
from bark_serve.serving.serve_config import render_serve_config
from tests.helm.test_chart import CHART, RELEASE, canon, helm, intended_values, rayservice


def serve_config(files: tuple) -> dict:
    return yaml.safe_load(rayservice(files)["spec"]["serveConfigV2"])


def test_keep_alive_is_serves_default_unless_set(tmp_path):
    assert "keep_alive_timeout_s" not in serve_config(())["http_options"]
    values = tmp_path / "keep-alive.yaml"
    values.write_text("serveHttp: {keepAliveTimeoutS: 75}\n")
    actual = serve_config((values,))
    assert actual["http_options"] == {"host": "0.0.0.0", "port": 8000, "keep_alive_timeout_s": 75}
    expected = render_serve_config(parse_config(intended_values((values,))["bark"]))
    expected["http_options"]["keep_alive_timeout_s"] = 75
    assert canon(actual) == canon(expected)  # the rest is still the Python rendering


def test_keep_alive_is_what_ray_serve_takes():
    from ray.serve.config import HTTPOptions

    assert HTTPOptions(keep_alive_timeout_s=75).keep_alive_timeout_s == 75
    # and Serve has no header or body read timeout to set (the README's reason for an ingress in front)
    assert not [f for f in HTTPOptions.model_fields if "header" in f or "body" in f]


@pytest.mark.parametrize("value", ["0", "seventy", "1.5"])
def test_keep_alive_must_be_a_positive_whole_number(value):
    proc = helm("template", RELEASE, str(CHART), "--set", f"serveHttp.keepAliveTimeoutS={value}", check=False)
    assert proc.returncode != 0 and "keepAliveTimeoutS" in proc.stderr, proc.stderr


def declared_ports() -> set[int]:
    cluster = rayservice("default")["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return {p["containerPort"] for g in groups for c in g["template"]["spec"]["containers"] for p in c.get("ports", [])}


def test_every_declared_port_is_explained_in_the_readme_and_values():
    ports = declared_ports()
    assert ports == {6379, 8265, 10001, 8000}
    readme = (CHART / "README.md").read_text()
    table = readme.split("## Ports: what the chart keeps, and why", 1)[1].split("\n## ", 1)[0]
    documented = {int(n) for n in re.findall(r"^\| [^|]*?\b(\d{4,5})\b", table, re.M)}
    values = (CHART / "values.yaml").read_text()
    commented = {int(n) for n in re.findall(r"^#\s+(?:bark\.http_port \()?(\d{4,5})\b", values, re.M)}
    assert ports | {8080} <= documented and ports | {8080} <= commented, (documented, commented)

"""A multi-node Ray cluster on this machine for the tests (``ray.cluster_utils.Cluster``: a head and worker
nodes, each its own raylet registered with the head's GCS, as `ray start` makes them), in a temp dir of its
own: never /tmp/ray, which other Ray instances on the machine share (and may remove)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def local_cluster(num_cpus: float = 2, resources: dict[str, float] | None = None):
    """Yields the Cluster with its head (``num_cpus``, ``resources``); add worker nodes with ``add_node``."""
    from ray.cluster_utils import Cluster

    from bark_serve.serving.serve_config import patient_proxy_start

    patient_proxy_start()  # as every local instance the project starts (a test may start Serve on it)
    tmp = tempfile.mkdtemp(prefix="bark-cl-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp  # Cluster writes the cluster's address file under RAY_TMPDIR/ray
    os.makedirs(os.path.join(tmp, "ray"), exist_ok=True)
    cluster = None
    try:
        head = {"num_cpus": num_cpus, "temp_dir": tmp, "include_dashboard": False}
        if resources:
            head["resources"] = resources
        cluster = Cluster(initialize_head=True, head_node_args=head)
        yield cluster
    finally:
        if cluster is not None:
            cluster.shutdown()
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old
        shutil.rmtree(tmp, ignore_errors=True)

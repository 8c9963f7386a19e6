"""Fixtures for the operator's end-to-end tests: the control plane, test kubelet, Kueue, S3,
Prometheus, JobSet and the deployed operator (the tiny model comes from tests/operator/conftest.py)."""

import pytest
from support.cluster import kube_cluster  # noqa: F401
from support.jobset import jobset  # noqa: F401
from support.kueue import kueue  # noqa: F401
from support.mot_e2e import mot_e2e  # noqa: F401
from support.node import LocalNode, kube_node, pod_dns_problem  # noqa: F401
from support.prometheus import prometheus_factory  # noqa: F401
from support.s3 import s3_server  # noqa: F401


@pytest.fixture(scope="module")
def second_node(kube_cluster, kube_node, tmp_path_factory):  # noqa: F811 (the fixtures imported above)
    """A second test kubelet (`mot-node-2`, as the session's `mot-node-1`) for a module's multi-node
    branches: two nodes, one rank each. Skips where Pods cannot get DNS names (their rank 0's)."""
    problem = pod_dns_problem()
    if problem:
        pytest.skip(f"the test kubelet cannot give Pods DNS names here ({problem}): a multi-node branch "
                    "cannot find its rank 0")
    node = LocalNode(kube_cluster, tmp_path_factory.mktemp("mot-node-2"), name="mot-node-2").start()
    try:
        yield node
    finally:
        node.stop()

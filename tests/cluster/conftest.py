"""Fixtures for the test cluster's own tests: the control plane, test kubelet, JobSet and Kueue; a
fresh namespace per test, and a second test kubelet for the tests that need two nodes."""

import uuid

import pytest
from support.cluster import kube_cluster  # noqa: F401
from support.jobset import jobset  # noqa: F401
from support.kueue import kueue  # noqa: F401
from support.node import LocalNode, kube_node  # noqa: F401


@pytest.fixture
def namespace(kube_cluster, request):  # noqa: F811 (the fixture imported above)
    """A fresh namespace named after the test module (test_kueue -> kueue-1a2b3c), deleted afterwards."""
    name = f"{request.module.__name__.rpartition('.')[2].removeprefix('test_').replace('_', '-')}-{uuid.uuid4().hex[:6]}"
    kube_cluster.kubectl("create", "namespace", name)
    yield name
    kube_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def second_node(kube_cluster, kube_node, tmp_path):  # noqa: F811 (the fixtures imported above)
    """A second test kubelet, node `mot-node-2` (CPU only), for this test only: the session's
    `mot-node-1` and this one make two nodes."""
    node = LocalNode(kube_cluster, tmp_path / "mot-node-2", name="mot-node-2", gpus=0, max_parallel=1).start()
    try:
        yield node
    finally:
        node.stop()

"""Fixtures for the test cluster's own tests: the control plane, test kubelet and Kueue."""

from support.cluster import kube_cluster  # noqa: F401
from support.jobset import jobset  # noqa: F401
from support.kueue import kueue  # noqa: F401
from support.node import kube_node  # noqa: F401

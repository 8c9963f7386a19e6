"""Fixtures for the operator's end-to-end tests: the control plane, test kubelet, Kueue, S3,
Prometheus, JobSet and the deployed operator (the tiny model comes from tests/operator/conftest.py)."""

from support.cluster import kube_cluster  # noqa: F401
from support.jobset import jobset  # noqa: F401
from support.kueue import kueue  # noqa: F401
from support.mot_e2e import mot_e2e  # noqa: F401
from support.node import kube_node  # noqa: F401
from support.prometheus import prometheus_factory  # noqa: F401
from support.s3 import s3_server  # noqa: F401

"""The real control plane (tests/support/cluster.py) works as test infrastructure: the MoTRun CRD
installs with `kubectl apply`, the apiserver itself admits a valid MoTRun and refuses invalid ones
naming the field, RBAC applies to ServiceAccount tokens, and the real Job controller and scheduler
run (a Job gets a Pod, which stays Unschedulable: no Node matches its nodeSelector; the session may
have the test kubelet's Node, support/node.py, registered or not)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from support.processes import wait_until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "motruns.mot.dev.yaml"
MINIMAL = ROOT / "examples" / "minimal.yaml"
NAMESPACE = "cluster-smoke"


def refused(cluster, *args: str, manifest: dict | None = None) -> str:
    """Run kubectl expecting the apiserver to refuse; its stderr (printed for the record)."""
    result = cluster.kubectl(*args, input=json.dumps(manifest) if manifest else None, check=False)
    print(f"\n$ kubectl {' '.join(args)}\nexit {result.returncode}\n{result.stderr.rstrip()}")
    assert result.returncode != 0, f"apiserver admitted it:\n{result.stdout}"
    return result.stderr


def test_real_control_plane(kube_cluster):
    cluster = kube_cluster
    print(f"\ncontrol plane {cluster.version} at {cluster.server}, started in {cluster.startup_seconds:.1f}s")
    cluster.kubectl("create", "namespace", NAMESPACE)

    # The CRD, as users install it.
    cluster.kubectl("apply", "-f", str(CRD))
    cluster.kubectl("wait", "--for=condition=Established", "crd/motruns.mot.dev", "--timeout=60s")
    assert cluster.kubectl("get", "--raw", "/openapi/v2").stdout.startswith("{")

    # A valid MoTRun is created, with the schema's defaults filled in by the apiserver.
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(MINIMAL))
    created = cluster.get_json("motrun", "minimal", "-n", NAMESPACE)
    assert [t["name"] for t in created["spec"]["teachers"]] == ["teacher-a", "teacher-b"]
    assert created["spec"]["training"]["steps"] == 50

    base = yaml.safe_load(MINIMAL.read_text())

    duplicate = json.loads(json.dumps(base))
    duplicate["metadata"]["name"] = "duplicate-teachers"
    duplicate["spec"]["teachers"][1]["name"] = duplicate["spec"]["teachers"][0]["name"]
    message = refused(cluster, "apply", "-n", NAMESPACE, "-f", "-", manifest=duplicate)
    assert "spec.teachers[1]" in message

    multinode = json.loads(json.dumps(base))
    multinode["metadata"]["name"] = "multinode-no-gpus"
    multinode["spec"]["resources"] = {"branch": {"nodes": 2}}
    message = refused(cluster, "apply", "-n", NAMESPACE, "-f", "-", manifest=multinode)
    assert "spec.resources.branch.nodes" in message

    message = refused(cluster, "patch", "motrun", "minimal", "-n", NAMESPACE, "--type=merge",
                      "-p", json.dumps({"spec": {"training": {"steps": 51}}}))
    assert "spec.training" in message
    assert cluster.get_json("motrun", "minimal", "-n", NAMESPACE)["spec"]["training"]["steps"] == 50

    # RBAC: a ServiceAccount token with no bindings is authenticated and then Forbidden.
    kubeconfig = cluster.service_account_kubeconfig("nobody", NAMESPACE)
    who = cluster.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig)
    assert json.loads(who.stdout)["status"]["userInfo"]["username"] == f"system:serviceaccount:{NAMESPACE}:nobody"
    message = refused(cluster, "get", "motruns", "-n", NAMESPACE, "--kubeconfig", str(kubeconfig))
    assert "Forbidden" in message or "forbidden" in message

    # The real Job controller makes the Pod; the real scheduler finds no Node for it.
    job = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "smoke", "namespace": NAMESPACE},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never",
            "nodeSelector": {"mot.dev/test-node": "none"},
            "containers": [{"name": "main", "image": "busybox", "command": ["true"]}],
        }}},
    }
    started = time.monotonic()
    cluster.kubectl("apply", "-f", "-", input=json.dumps(job))

    def unschedulable_pod():
        pods = cluster.get_json("pods", "-n", NAMESPACE, "-l", "batch.kubernetes.io/job-name=smoke")["items"]
        for pod in pods:
            for condition in pod.get("status", {}).get("conditions", []):
                if condition["type"] == "PodScheduled" and condition.get("reason") == "Unschedulable":
                    return pod, condition
        return None

    pod, condition = wait_until(unschedulable_pod, timeout=60, what="the Job's Pod to be Unschedulable",
                                interval=0.5, on_timeout=lambda: cluster.logs(20))
    print(f"Job -> Pod {pod['metadata']['name']} ({pod['status']['phase']}) in {time.monotonic() - started:.1f}s: "
          f"{condition['reason']}: {condition.get('message')}")
    assert pod["status"]["phase"] == "Pending"
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "Job"
    assert condition["status"] == "False"
    # The session's other tests may run an operator and a test kubelet: leave them nothing to do.
    cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false")

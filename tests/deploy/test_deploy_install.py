"""End to end: `helm install` of the chart (Helm's Go SDK, the default `secret` storage driver, Helm's
server-side apply) into a real control plane (support/cluster.py), then the operator run with exactly
the command, args and env of the Deployment Helm created and a token of the chart's ServiceAccount,
so the apiserver enforces the chart's RBAC on every request it makes; a small MoTRun runs to
Succeeded through the real Job controller and scheduler, the test kubelet (support/node.py), the
real trainer on a tiny model and a real S3 (SeaweedFS).

The Deployment's own Pod is kept off the test node (a nodeSelector no node matches: it stays
Unschedulable): inside a Pod the operator would read the ServiceAccount token mounted at
/var/run/secrets/..., which the test kubelet cannot mount. Its container is run here by hand instead,
as the kubelet would run it, with a kubeconfig holding a token of the same ServiceAccount."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support.cluster import _die_with_parent, start_cluster
from support.deploy import CHART_DIR
from support.node import LocalNode
from support.processes import stop_process, wait_until
from support.prometheus import free_port

pytestmark = pytest.mark.e2e

RELEASE = "mot-operator"
RELEASE_NAMESPACE = "mot-system"
RUN_NAMESPACE = "ml-team"  # the operator is installed namespaced: it watches only this one
CREDENTIALS_SECRET = "mot-s3"
RUN_TIMEOUT_S = 150
NO_NODE = {"mot.dev/test-node": "none"}  # matches no node: the Deployment's Pod stays Unschedulable


def helm_install(kubeconfig: Path, values: dict) -> dict:
    """`helm install` through the Helm SDK, the release recorded in a Secret (the default driver)."""
    import helm_python as helm

    with helm.Config(kubeconfig_path=str(kubeconfig), namespace=RELEASE_NAMESPACE, storage_driver="secret") as config:
        return config.install(CHART_DIR, RELEASE, values, namespace=RELEASE_NAMESPACE, create_namespace=True,
                              timeout=60)


def container_process(deployment: dict, kubeconfig: Path) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the Deployment's container, as a kubelet would start it here."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    argv = list(container["command"]) + list(container.get("args", []))
    # The image puts its venv on PATH; here the venv running the tests is that venv.
    executable = shutil.which(argv[0], path=str(Path(sys.executable).parent))
    assert executable, f"{argv[0]} is not installed in {Path(sys.executable).parent}"
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
           "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "KUBECONFIG": str(kubeconfig)}
    for var in container["env"]:
        assert "valueFrom" not in var, f"env {var['name']} needs a Pod to resolve"
        env[var["name"]] = var["value"]
    return [executable, *argv[1:]], env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A control plane of its own: Helm installs the CRD into a cluster that has none, and the e2e
    stack's operator (it watches every namespace of the session's cluster) never sees this MoTRun."""
    cluster = start_cluster(tmp_path_factory.mktemp("deploy-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def node(cluster, tmp_path_factory):
    node = LocalNode(cluster, tmp_path_factory.mktemp("deploy-node"), name="deploy-node").start()
    try:
        yield node
    finally:
        node.stop()


def mine(items: list[dict]) -> list[tuple[str | None, str]]:
    """(namespace, name) of the objects Helm made for the release."""
    return sorted((i["metadata"].get("namespace"), i["metadata"]["name"]) for i in items
                  if (i["metadata"].get("labels") or {}).get("app.kubernetes.io/instance") == RELEASE)


def test_helm_install_then_the_deployed_operator_runs_a_motrun(cluster, node, s3_server, tiny_model, tiny_data,
                                                               tmp_path):
    client = kubernetes.config.new_client_from_config(config_file=str(cluster.kubeconfig))
    core, custom = kubernetes.client.CoreV1Api(client), kubernetes.client.CustomObjectsApi(client)
    bucket = s3_server.make_bucket("deploy-e2e")
    metrics_port = free_port()
    values = {
        "watchNamespaces": [RUN_NAMESPACE],
        "metrics": {"port": metrics_port},
        "defaults": {"storage": {"uri": bucket, "endpoint": s3_server.endpoint,
                                 "credentialsSecret": CREDENTIALS_SECRET}},
        "logFormat": "text",
        "nodeSelector": NO_NODE,
    }
    core.create_namespace({"metadata": {"name": RUN_NAMESPACE}})

    release = helm_install(cluster.kubeconfig, values)
    assert release["status"] == "deployed" and release["namespace"] == RELEASE_NAMESPACE, release
    assert "kubectl" in release["notes"]
    # The release record, in Helm's secret storage driver.
    secrets = cluster.get_json("secrets", "-n", RELEASE_NAMESPACE, "-l", f"owner=helm,name={RELEASE}")["items"]
    assert [(s["type"], s["metadata"]["labels"]["status"]) for s in secrets] == [("helm.sh/release.v1", "deployed")]

    # Helm created what the chart renders: the CRD from crds/, RBAC for the watched namespace only.
    crds = cluster.get_json("crd")["items"]
    assert [crd["metadata"]["name"] for crd in crds] == ["motruns.mot.dev"]
    assert mine(cluster.get_json("roles", "-A")["items"]) == [(RUN_NAMESPACE, RELEASE)]
    assert mine(cluster.get_json("rolebindings", "-A")["items"]) == [(RUN_NAMESPACE, RELEASE)]
    assert mine(cluster.get_json("clusterroles")["items"]) == []
    assert mine(cluster.get_json("services", "-n", RELEASE_NAMESPACE)["items"]) == \
        [(RELEASE_NAMESPACE, f"{RELEASE}-metrics")]
    deployment = cluster.get_json("deployment", RELEASE, "-n", RELEASE_NAMESPACE)
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert mine(cluster.get_json("serviceaccounts", "-n", RELEASE_NAMESPACE)["items"]) == \
        [(RELEASE_NAMESPACE, account)]

    # The Deployment and ReplicaSet controllers made its Pod; the scheduler found no node for it.
    def operator_pod_unschedulable():
        for pod in cluster.get_json("pods", "-n", RELEASE_NAMESPACE)["items"]:
            for condition in pod["status"].get("conditions") or []:
                if condition["type"] == "PodScheduled" and condition.get("reason") == "Unschedulable":
                    return pod, condition
        return None
    pod, condition = wait_until(operator_pod_unschedulable, 60, "the Deployment's Pod to be Unschedulable")
    print(f"\noperator Pod {pod['metadata']['name']}: {condition['message']}")
    assert pod["spec"]["serviceAccountName"] == account

    # RBAC, as the apiserver decides it for the chart's ServiceAccount.
    kubeconfig = cluster.service_account_kubeconfig(account, RELEASE_NAMESPACE, create=False)

    def can_i(*args: str) -> str:
        return cluster.kubectl("auth", "can-i", *args, check=False, kubeconfig=kubeconfig).stdout.strip()
    assert can_i("create", "jobs", "-n", RUN_NAMESPACE) == "yes"
    assert can_i("patch", "motruns.mot.dev/status", "-n", RUN_NAMESPACE) == "yes"
    assert can_i("create", "jobs", "-n", "default") == "no"      # namespaced install
    assert can_i("get", "secrets", "-n", RUN_NAMESPACE) == "no"  # the trainers read them, not the operator

    # The trainer Jobs read the S3 keys from this Secret, named by the chart's defaults.
    core.create_namespaced_secret(RUN_NAMESPACE, {
        "metadata": {"name": CREDENTIALS_SECRET},
        "stringData": {"AWS_ACCESS_KEY_ID": s3_server.access_key,
                       "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}})

    argv, env = container_process(deployment, kubeconfig)
    log_path = tmp_path / "operator.log"
    with log_path.open("w") as log:
        operator = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    preexec_fn=_die_with_parent)
    base = f"http://127.0.0.1:{metrics_port}"

    def operator_log() -> str:
        return log_path.read_text()[-6000:]

    def probe(path: str) -> bool:
        try:
            return requests.get(base + path, timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        # The Deployment's readiness probe path answers once Kopf watches.
        wait_until(lambda: operator.poll() is None and probe("/readyz"), 60, "the operator's /readyz",
                   on_timeout=operator_log)
        assert probe("/healthz")

        run = {
            "apiVersion": "mot.dev/v1alpha1", "kind": "MoTRun", "metadata": {"name": "first-run"},
            "spec": {
                # No storage in the spec: the chart's defaults (operator flags) supply it.
                "student": str(tiny_model),
                "teachers": [{"name": "alpha", "dataset": str(tiny_data)},
                             {"name": "beta", "dataset": str(tiny_data)}],
                "rounds": 2,
                "training": {"steps": 2, "gradAccum": 1, "microBatchSize": 4, "maxSeqLength": 128,
                             "threads": 1, "learningRate": 1e-3},
                "retryBackoffSeconds": 1,
            },
        }
        custom.create_namespaced_custom_object("mot.dev", "v1alpha1", RUN_NAMESPACE, "motruns", run)

        def status() -> dict:
            obj = custom.get_namespaced_custom_object("mot.dev", "v1alpha1", RUN_NAMESPACE, "motruns",
                                                      "first-run")
            return obj.get("status") or {}

        final = wait_until(lambda: status() if status().get("phase") in ("Succeeded", "Failed") else None,
                           RUN_TIMEOUT_S, "the MoTRun to finish",
                           on_timeout=lambda: f"status: {yaml.safe_dump(status())}\noperator log:\n{operator_log()}")
        assert final["phase"] == "Succeeded", yaml.safe_dump(final)
        assert operator.poll() is None, operator_log()

        # Every Job came from the operator with the chart's defaults: image and S3 settings.
        jobs = cluster.get_json("jobs", "-n", RUN_NAMESPACE)["items"]
        # The preflight, then two branches and one merge per round.
        stages = sorted(job["metadata"]["labels"]["mot.dev/stage"] for job in jobs)
        assert stages == ["merge"] * 2 + ["preflight"] + ["sft"] * 4, stages
        for job in jobs:
            (trainer,) = job["spec"]["template"]["spec"]["containers"]
            assert trainer["image"] == "ghcr.io/mot-operator/mot-trainer:0.1.0"
            job_env = {e["name"]: e for e in trainer["env"]}
            assert job_env["AWS_ENDPOINT_URL"]["value"] == s3_server.endpoint
            assert job_env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == CREDENTIALS_SECRET
            assert len(node.runs_of(job["metadata"]["name"], RUN_NAMESPACE)) == 1, job["metadata"]["name"]

        # The final merged model is in the default bucket, complete (manifest written last).
        from mot_trainer import storage

        final_model = f"{bucket}/{RUN_NAMESPACE}/first-run/round-2/merged"
        with pytest.MonkeyPatch.context() as patch:
            for key, value in s3_server.env.items():
                patch.setenv(key, value)
            assert storage.read_checkpoint_manifest(final_model)["kind"] == "merge"

        # What the chart's ServiceMonitor, dashboard and alerts read is on the metrics port.
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for family in
                   text_string_to_metric_families(requests.get(base + "/metrics", timeout=5).text)
                   for s in family.samples}
        assert samples[("mot_runs", (("phase", "Succeeded"),))] == 1
        assert samples[("mot_run_round", (("motrun", "first-run"), ("namespace", RUN_NAMESPACE)))] == 2
        assert samples[("mot_jobs_created_total", (("stage", "sft"),))] == 4
        assert samples[("mot_jobs_created_total", (("stage", "preflight"),))] == 1
        assert samples.get(("mot_reconcile_errors_total", ()), 0) == 0

        # The apiserver refused the operator nothing: the chart's Role grants all it does.
        log = log_path.read_text()
        assert "Forbidden" not in log and "forbidden" not in log, operator_log()
    finally:
        stop_process(operator, timeout=20)
        client.close()

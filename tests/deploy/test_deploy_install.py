"""End to end: `helm install` of the chart (Helm's Go SDK) into the test Kubernetes API server, then the
operator started with exactly the command, args and env of the Deployment Helm created (a real
`mot operator` process, KUBECONFIG pointing at the test API server), running a small MoTRun to
Succeeded with the test kubelet, the real trainer on a tiny model and a real S3 (SeaweedFS).

The test API server (tests/support/kube.py) runs no Pods, so the Deployment is "run" here by hand,
and the test kubelet runs the Jobs the operator creates."""

from __future__ import annotations

import json
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
from support.deploy import CHART_DIR
from support.kube import start_kube_api
from support.kubelet import LocalKubelet
from support.processes import stop_process, wait_until
from support.prometheus import free_port

pytestmark = pytest.mark.e2e

RELEASE = "mot-operator"
RELEASE_NAMESPACE = "mot-system"
RUN_NAMESPACE = "ml-team"  # the operator is installed namespaced: it watches only this one
CREDENTIALS_SECRET = "mot-s3"
RUN_TIMEOUT_S = 150
TEST_AGENT = "deploy-test"
# Clients that are not the operator: Helm, this test, the test kubelet.
NOT_OPERATOR = {"Helm", TEST_AGENT, "python-requests"}




def helm_install(kubeconfig: Path, values: dict) -> dict:
    """`helm install` through the Helm SDK.

    Two settings fit the test API server, not a real cluster: the release record is kept in Helm's
    `memory` storage driver (Helm writes its release Secret with protobuf, which the test server
    does not decode), and objects are created client-side (Helm 4's default server-side apply needs
    a PATCH that creates absent objects, which the test server does not do). helm-python-sdk's
    `Config.install` does not expose `server_side_apply`, so the option goes to the library call."""
    import helm_python as helm
    from helm_python import _native

    with helm.Config(kubeconfig_path=str(kubeconfig), namespace=RELEASE_NAMESPACE,
                     storage_driver="memory") as config:
        payload = _native.call_string(
            "helm_install", config._raw(), config._context_arg(None), _native.HANDLE(0), str(CHART_DIR),
            RELEASE, json.dumps(values),
            json.dumps({"namespace": RELEASE_NAMESPACE, "create_namespace": True, "timeout_seconds": 60,
                        "server_side_apply": False}))
    return json.loads(payload)


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
    """A test API server of its own, so no other test's operator sees this test's MoTRun."""
    api = start_kube_api(tmp_path_factory.mktemp("deploy-kube"), load_crd=False)
    yield api
    api.stop()


def test_helm_install_then_the_deployed_operator_runs_a_motrun(cluster, s3_server, tiny_model, tiny_data,
                                                               tmp_path):
    client = cluster.api_client()
    client.user_agent = TEST_AGENT  # tells this test's requests apart from the operator's
    core, custom = kubernetes.client.CoreV1Api(client), kubernetes.client.CustomObjectsApi(client)
    bucket = s3_server.make_bucket("deploy-e2e")
    metrics_port = free_port()
    values = {
        "watchNamespaces": [RUN_NAMESPACE],
        "metrics": {"port": metrics_port},
        "defaults": {"storage": {"uri": bucket, "endpoint": s3_server.endpoint,
                                 "credentialsSecret": CREDENTIALS_SECRET}},
        "logFormat": "text",
    }
    core.create_namespace({"metadata": {"name": RUN_NAMESPACE}})

    release = helm_install(cluster.kubeconfig, values)
    assert release["status"] == "deployed" and release["namespace"] == RELEASE_NAMESPACE
    assert "kubectl" in release["notes"]

    # Helm created what the chart renders: the CRD from crds/, RBAC for the watched namespace only.
    crds = cluster.objects("apiextensions.k8s.io/v1", "customresourcedefinitions")
    assert [crd["metadata"]["name"] for crd in crds] == ["motruns.mot.dev"]
    roles = cluster.objects("rbac.authorization.k8s.io/v1", "roles")
    assert [(r["metadata"]["namespace"], r["metadata"]["name"]) for r in roles] == [(RUN_NAMESPACE, RELEASE)]
    assert cluster.objects("rbac.authorization.k8s.io/v1", "clusterroles") == []
    (deployment,) = cluster.objects("apps/v1", "deployments", RELEASE_NAMESPACE)
    assert [s["metadata"]["name"] for s in cluster.objects("v1", "services", RELEASE_NAMESPACE)] == \
        [f"{RELEASE}-metrics"]

    # The trainer Jobs read the S3 keys from this Secret, named by the chart's defaults.
    core.create_namespaced_secret(RUN_NAMESPACE, {
        "metadata": {"name": CREDENTIALS_SECRET},
        "stringData": {"AWS_ACCESS_KEY_ID": s3_server.access_key,
                       "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}})

    argv, env = container_process(deployment, cluster.kubeconfig)
    log_path = tmp_path / "operator.log"
    kubelet = LocalKubelet(cluster.url, tmp_path / "kubelet", max_parallel=2, poll_seconds=1).start()
    with log_path.open("w") as log:
        operator = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
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
        jobs = cluster.objects("batch/v1", "jobs", RUN_NAMESPACE)
        assert len(jobs) == 2 * 2 + 2  # two branches and one merge per round
        for job in jobs:
            (trainer,) = job["spec"]["template"]["spec"]["containers"]
            assert trainer["image"] == "ghcr.io/mot-operator/mot-trainer:0.1.0"
            job_env = {e["name"]: e for e in trainer["env"]}
            assert job_env["AWS_ENDPOINT_URL"]["value"] == s3_server.endpoint
            assert job_env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == CREDENTIALS_SECRET
            assert len(kubelet.runs_of(job["metadata"]["name"])) == 1, job["metadata"]["name"]

        # The final merged model is in the default bucket, complete (manifest written last).
        from mot_trainer import manifest

        final_model = f"{bucket}/{RUN_NAMESPACE}/first-run/round-2/merged"
        with pytest.MonkeyPatch.context() as patch:
            for key, value in s3_server.env.items():
                patch.setenv(key, value)
            assert manifest.read_checkpoint_manifest(final_model)["kind"] == "merge"

        # What the chart's ServiceMonitor, dashboard and alerts read is on the metrics port.
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for family in
                   text_string_to_metric_families(requests.get(base + "/metrics", timeout=5).text)
                   for s in family.samples}
        assert samples[("mot_runs", (("phase", "Succeeded"),))] == 1
        assert samples[("mot_run_round", (("motrun", "first-run"), ("namespace", RUN_NAMESPACE)))] == 2
        assert samples[("mot_jobs_created_total", (("stage", "sft"),))] == 4

        # Every request the operator made is one the chart's Role allows (the test server does not
        # enforce RBAC, so compare what happened with what the chart grants).
        (role,) = roles
        granted: dict[str, set[str]] = {}
        for rule in role["rules"]:
            for resource in rule["resources"]:
                granted.setdefault(resource, set()).update(rule["verbs"])
        made = {(verb, resource) for (agent, verb, resource) in cluster.requests()
                if agent not in NOT_OPERATOR and verb != "discovery"}
        assert made, "no request from the operator was seen"
        denied = sorted((verb, resource) for verb, resource in made if verb not in granted.get(resource, ()))
        assert not denied, f"the operator made requests its RBAC would deny: {denied}"
    finally:
        stop_process(operator, timeout=20)
        kubelet.stop()

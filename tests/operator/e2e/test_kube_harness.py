"""The e2e harness itself, proven with the official clients: the test API server (kube_api) with the
`kubernetes` client and kubectl, the test kubelet running real processes, and the real Prometheus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import kubernetes
import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server
from support.kubelet import LocalKubelet
from support.processes import wait_until
from support.prometheus import free_port

KUBECTL = str(Path(sys.executable).parent / "kubectl")




@pytest.fixture
def namespace(kube_api):
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubernetes.client.CoreV1Api(kube_api.api_client()).create_namespace({"metadata": {"name": name}})
    return name


def job_manifest(name, command, *, env=None, labels=None, suspend=False):
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {"backoffLimit": 0, "suspend": suspend,
                     "podFailurePolicy": {"rules": [
                         {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                         {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In",
                                                               "values": [2]}}]},
                     "template": {"metadata": {"labels": labels or {}}, "spec": {
                         "restartPolicy": "Never",
                         "volumes": [{"name": "scratch", "emptyDir": {}}],
                         "containers": [{"name": "main", "image": "python", "command": command,
                                         "env": env or [], "terminationMessagePolicy": "FallbackToLogsOnError",
                                         "volumeMounts": [{"name": "scratch", "mountPath": "/tmp"}]}]}}}}


def api_error(call):
    with pytest.raises(kubernetes.client.ApiException) as info:
        call()
    return info.value.status, json.loads(info.value.body)


def test_api_server_answers_like_kubernetes(kube_api, namespace):
    client = kube_api.api_client()
    core, batch = kubernetes.client.CoreV1Api(client), kubernetes.client.BatchV1Api(client)

    assert namespace in [ns.metadata.name for ns in core.list_namespace().items]
    created = batch.create_namespaced_job(namespace, job_manifest("one", ["true"], labels={"tier": "a"}))
    assert created.metadata.uid and created.metadata.resource_version and created.metadata.creation_timestamp
    assert created.metadata.generation == 1
    batch.create_namespaced_job(namespace, job_manifest("two", ["true"], labels={"tier": "b"}))

    status, body = api_error(lambda: batch.create_namespaced_job(namespace, job_manifest("one", ["true"])))
    assert (status, body["reason"]) == (409, "AlreadyExists")
    status, body = api_error(lambda: batch.read_namespaced_job("missing", namespace))
    assert (status, body["reason"], body["details"]["name"]) == (404, "NotFound", "missing")

    assert [j.metadata.name for j in batch.list_namespaced_job(namespace, label_selector="tier=a").items] == ["one"]
    assert [j.metadata.name for j in batch.list_namespaced_job(namespace, label_selector="tier notin (a)").items] \
        == ["two"]
    assert [j.metadata.name for j in batch.list_namespaced_job(namespace, field_selector="metadata.name=two").items] \
        == ["two"]

    # The status subresource changes only the status; the main resource never does.
    batch.patch_namespaced_job_status("one", namespace, {"status": {"succeeded": 1}})
    patched = batch.patch_namespaced_job("one", namespace, {"status": {"succeeded": 5}, "metadata": {"labels": {"x": "y"}}})
    assert patched.status.succeeded == 1 and patched.metadata.labels["x"] == "y"

    # PUT with a stale resourceVersion is a Conflict.
    stale = batch.read_namespaced_job("two", namespace)
    batch.patch_namespaced_job("two", namespace, {"metadata": {"labels": {"bump": "1"}}})
    status, body = api_error(lambda: batch.replace_namespaced_job("two", namespace, stale))
    assert (status, body["reason"]) == (409, "Conflict")

    # A watch resumed from a list's resourceVersion sees what happened after it, in order.
    since = batch.list_namespaced_job(namespace).metadata.resource_version
    core.create_namespaced_pod(namespace, {"metadata": {"name": "one-pod", "ownerReferences": [
        {"apiVersion": "batch/v1", "kind": "Job", "name": "one", "uid": created.metadata.uid}]},
        "spec": {"containers": [{"name": "c", "image": "x"}]}})
    batch.delete_namespaced_job("one", namespace)
    events = [(e["type"], e["object"].metadata.name) for e in kubernetes.watch.Watch().stream(
        batch.list_namespaced_job, namespace, resource_version=since, timeout_seconds=1)]
    assert events == [("DELETED", "one")]
    # Owner references cascade: the Job's Pod went with it.
    assert core.list_namespaced_pod(namespace).items == []


def kubectl(kube_api, *args, stdin=None):
    env = dict(os.environ, KUBECONFIG=str(kube_api.kubeconfig))
    return subprocess.run([KUBECTL, *args], env=env, input=stdin, capture_output=True, text=True, timeout=60)


def test_kubectl_applies_motruns_and_the_schema_refuses_bad_ones(kube_api, namespace):
    run = """apiVersion: mot.dev/v1alpha1
kind: MoTRun
metadata: {name: harness}
spec:
  student: s3://models/student
  teachers: [{name: a, dataset: s3://data/a.jsonl}]
  rounds: 2
"""
    applied = kubectl(kube_api, "-n", namespace, "apply", "-f", "-", stdin=run)
    assert applied.returncode == 0, applied.stderr
    stored = json.loads(kubectl(kube_api, "-n", namespace, "get", "mot", "harness", "-o", "json").stdout)
    assert stored["spec"]["rounds"] == 2 and stored["spec"]["teachers"][0]["weight"] == 1  # CRD defaults applied

    refused = kubectl(kube_api, "-n", namespace, "apply", "-f", "-", stdin=run.replace("rounds: 2", "rounds: 0"))
    assert refused.returncode != 0 and "spec.rounds" in refused.stderr

    unknown = kubectl(kube_api, "-n", namespace, "apply", "-f", "-",
                      stdin=run.replace("name: harness", "name: other").replace("rounds: 2", "rounds: 2\n  color: red"))
    assert unknown.returncode != 0 and "spec.color" in unknown.stderr

    patched = kubectl(kube_api, "-n", namespace, "patch", "mot", "harness", "--type", "merge",
                      "-p", '{"spec": {"suspend": true}}')
    assert patched.returncode == 0, patched.stderr
    assert kubectl(kube_api, "-n", namespace, "get", "mot", "harness", "-o", "jsonpath={.spec.suspend}").stdout == "true"


@pytest.fixture
def kubelet(kube_api, tmp_path):
    kubelet = LocalKubelet(kube_api.url, tmp_path / "kubelet").start()
    yield kubelet
    kubelet.stop()


def job_status(kube_api, namespace, name):
    job = kubernetes.client.BatchV1Api(kube_api.api_client()).read_namespaced_job(name, namespace)
    return {c.type: c for c in job.status.conditions or []} if job.status else {}


def test_kubelet_runs_jobs_as_processes(kube_api, namespace, kubelet):
    client = kube_api.api_client()
    core, batch = kubernetes.client.CoreV1Api(client), kubernetes.client.BatchV1Api(client)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "creds"},
                                              "data": {"token": "c2VjcmV0"}})  # "secret"
    script = ("import os, pathlib; "
              "pathlib.Path(os.environ['MOT_TERMINATION_LOG']).write_text(os.environ['TOKEN'] + ' ' + "
              "os.environ['SCRATCH']); "
              "raise SystemExit(int(os.environ['CODE']))")
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
           {"name": "SCRATCH", "value": "/tmp/work"}]
    for name, code in (("ok", 0), ("invalid", 2), ("flaky", 1)):
        batch.create_namespaced_job(namespace, job_manifest(
            name, [sys.executable, "-c", script], env=env + [{"name": "CODE", "value": str(code)}],
            labels={"app": name}))

    ok = wait_until(lambda: job_status(kube_api, namespace, "ok").get("Complete"), what="ok completes")
    assert ok.reason == "CompletionsReached" and job_status(kube_api, namespace, "ok")["SuccessCriteriaMet"]
    invalid = wait_until(lambda: job_status(kube_api, namespace, "invalid").get("Failed"), what="invalid fails")
    assert invalid.reason == "PodFailurePolicy" and "exit code 2" in invalid.message
    flaky = wait_until(lambda: job_status(kube_api, namespace, "flaky").get("Failed"), what="flaky fails")
    assert flaky.reason == "BackoffLimitExceeded"

    pods = core.list_namespaced_pod(namespace, label_selector="batch.kubernetes.io/job-name=ok").items
    assert len(pods) == 1
    terminated = pods[0].status.container_statuses[0].state.terminated
    # The secret reached the process, and the emptyDir mount path was mapped to a local folder.
    token, scratch = terminated.message.split(" ")
    assert (terminated.exit_code, token) == (0, "secret")
    assert scratch != "/tmp/work" and scratch.startswith(str(kubelet.workdir)) and scratch.endswith("/scratch/work")
    assert [len(kubelet.runs_of(name)) for name in ("ok", "invalid", "flaky")] == [1, 1, 1]


def test_kubelet_honours_suspend_and_injected_failures(kube_api, namespace, kubelet):
    batch = kubernetes.client.BatchV1Api(kube_api.api_client())
    kubelet.inject_failure(lambda job: job["metadata"]["name"] == "doomed", exit_code=2, times=1, message="bad input")
    batch.create_namespaced_job(namespace, job_manifest("doomed", ["true"]))
    batch.create_namespaced_job(namespace, job_manifest("later", ["true"], suspend=True))

    doomed = wait_until(lambda: job_status(kube_api, namespace, "doomed").get("Failed"), what="doomed fails")
    assert doomed.reason == "PodFailurePolicy"
    wait_until(lambda: job_status(kube_api, namespace, "later").get("Suspended"), what="later suspended")
    assert kubelet.runs_of("later") == []

    batch.patch_namespaced_job("later", namespace, {"spec": {"suspend": False}})
    wait_until(lambda: job_status(kube_api, namespace, "later").get("Complete"), what="later completes")
    assert len(kubelet.runs_of("later")) == 1


def test_prometheus_scrapes_and_answers_queries(prometheus_factory):
    registry = CollectorRegistry()
    counter = Counter("mot_harness_checks", "harness checks", ["stage"], registry=registry)
    counter.labels(stage="sft").inc(3)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        prometheus = prometheus_factory(f"127.0.0.1:{port}")
        result = prometheus.wait_for('mot_harness_checks_total{stage="sft"}')
        assert float(result[0]["value"][1]) == 3.0
    finally:
        server.shutdown()


def test_kubectl_delete_waits_for_finalizers(kube_api, namespace):
    import threading

    custom = kubernetes.client.CustomObjectsApi(kube_api.api_client())
    custom.create_namespaced_custom_object("mot.dev", "v1alpha1", namespace, "motruns", {
        "apiVersion": "mot.dev/v1alpha1", "kind": "MoTRun", "metadata": {"name": "held", "finalizers": ["test/hold"]},
        "spec": {"student": "s3://m/s", "teachers": [{"name": "a", "dataset": "s3://d/a.jsonl"}]}})

    def release():  # what an operator does once it sees deletionTimestamp
        run = wait_until(lambda: custom.get_namespaced_custom_object(
            "mot.dev", "v1alpha1", namespace, "motruns", "held")["metadata"].get("deletionTimestamp"), what="delete")
        assert run
        custom.patch_namespaced_custom_object("mot.dev", "v1alpha1", namespace, "motruns", "held",
                                              {"metadata": {"finalizers": None}})

    releaser = threading.Thread(target=release)
    releaser.start()
    deleted = kubectl(kube_api, "-n", namespace, "delete", "motrun", "held", "--timeout=20s")
    releaser.join()
    assert deleted.returncode == 0, deleted.stderr
    status, body = api_error(lambda: custom.get_namespaced_custom_object("mot.dev", "v1alpha1", namespace,
                                                                         "motruns", "held"))
    assert (status, body["reason"]) == (404, "NotFound")


def test_secrets_and_server_side_apply_like_a_real_server(kube_api, namespace):
    core = kubernetes.client.CoreV1Api(kube_api.api_client())
    core.create_namespaced_secret(namespace, {"metadata": {"name": "plain"}, "stringData": {"key": "value"}})
    secret = core.read_namespaced_secret("plain", namespace)
    assert secret.data == {"key": "dmFsdWU="} and not secret.string_data  # stringData is write-only

    # Server-side apply of an absent object creates it.
    import requests

    response = requests.patch(
        f"{kube_api.url}/api/v1/namespaces/{namespace}/configmaps/applied?fieldManager=test",
        data="apiVersion: v1\nkind: ConfigMap\nmetadata: {name: applied}\ndata: {a: b}\n",
        headers={"Content-Type": "application/apply-patch+yaml"}, timeout=10)
    assert response.status_code == 201, response.text
    assert core.read_namespaced_config_map("applied", namespace).data == {"a": "b"}

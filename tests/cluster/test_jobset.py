"""A real JobSet controller (tests/support/jobset.py) on the real control plane, its Pods run by the test
kubelet (tests/support/node.py): a JobSet of one replicated job of 2 replicas (2 Pods each) completes,
its child Jobs and Pods carry JobSet's labels and its headless Service exists; a JobSet whose Pod
fails once under failurePolicy {maxRestarts: 1, BlockingRecreate} is restarted whole (every child
Job recreated with restart-attempt 1) and then completes; with a second test kubelet (two CPU nodes),
JobSet's exclusive placement (annotation alpha.jobset.sigs.k8s.io/exclusive-topology, its Pod
webhooks) puts each child Job's Pods on a node of their own.

The Pods print whether their `<hostname>.<subdomain>` resolves (the test kubelet's Pod DNS,
tests/support/node.py); the tests check the Service and the Pods' hostname/subdomain."""

from __future__ import annotations

import json
import time

import pytest
from support.jobset import (
    API_VERSION,
    JOB_INDEX_LABEL,
    JOBSET_NAME_LABEL,
    REPLICATED_JOB_LABEL,
    RESTART_ATTEMPT_LABEL,
)
from support.processes import wait_until

pytestmark = pytest.mark.e2e

# Each Pod prints what it knows of itself and whether its stable DNS name resolves (3 s at most).
REPORT = """
import json, os, socket, threading
fqdn = f"{os.environ['JOB_NAME']}-{os.environ['JOB_COMPLETION_INDEX']}.{os.environ['SUBDOMAIN']}"
answer = ["no answer within 3 s"]
def resolve():
    try:
        answer[0] = socket.gethostbyname(fqdn)
    except OSError as error:
        answer[0] = f"unresolved: {error}"
thread = threading.Thread(target=resolve, daemon=True)
thread.start()
thread.join(3)
print(json.dumps({"fqdn": fqdn, "dns": answer[0], "jobset": os.environ["JOBSET"],
                  "job_index": os.environ["JOB_INDEX"], "restart_attempt": os.environ["RESTART_ATTEMPT"]}))
"""

# Fails (exit 3) once: the Pod of child Job 1 in restart attempt 0; the other Pod of attempt 0 takes
# a while, so the restart finds it running; in attempt 1 both succeed.
FAIL_ONCE = """
import os, sys, time
attempt, index = os.environ["RESTART_ATTEMPT"], os.environ["JOB_INDEX"]
print(f"job-index {index} restart-attempt {attempt}", flush=True)
if attempt == "0":
    time.sleep(0.5 if index == "1" else 20)
    sys.exit(3 if index == "1" else 0)
"""


def label_env(name: str, key: str) -> dict:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{key}']"}}}


def jobset_manifest(name: str, code: str, *, replicas: int, pods: int, failure_policy: dict | None = None) -> dict:
    container = {"name": "main", "image": "python:3.11", "command": ["python", "-c", code], "env": [
        {"name": "SUBDOMAIN", "value": name},
        label_env("JOBSET", JOBSET_NAME_LABEL), label_env("JOB_INDEX", JOB_INDEX_LABEL),
        label_env("RESTART_ATTEMPT", RESTART_ATTEMPT_LABEL),
        label_env("JOB_NAME", "batch.kubernetes.io/job-name")]}
    spec = {"replicatedJobs": [{"name": "workers", "replicas": replicas, "template": {"spec": {
        "parallelism": pods, "completions": pods, "backoffLimit": 0,
        "template": {"spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 2,
                              "containers": [container]}}}}}]}
    if failure_policy:
        spec["failurePolicy"] = failure_policy
    return {"apiVersion": API_VERSION, "kind": "JobSet", "metadata": {"name": name}, "spec": spec}


def create(cluster, namespace: str, manifest: dict) -> dict:
    return json.loads(cluster.kubectl("create", "-n", namespace, "-o", "json", "-f", "-",
                                      input=json.dumps(manifest)).stdout)


def condition(obj: dict, kind: str) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == kind), None)


def completed(jobset, name: str, namespace: str) -> dict | None:
    current = jobset.get(name, namespace)
    failed = condition(current, "Failed")
    assert not (failed and failed["status"] == "True"), f"JobSet {name} failed: {failed}\n{jobset.logs()}"
    done = condition(current, "Completed")
    return current if done and done["status"] == "True" else None


def items(cluster, kind: str, namespace: str, name: str) -> list[dict]:
    return cluster.get_json(kind, "-n", namespace, "-l", f"{JOBSET_NAME_LABEL}={name}")["items"]


def show_state(cluster, jobset, namespace: str, name: str) -> str:
    jobs = [(j["metadata"]["name"], j["metadata"]["labels"].get(RESTART_ATTEMPT_LABEL), j.get("status"))
            for j in items(cluster, "jobs", namespace, name)]
    pods = [(p["metadata"]["name"], p["status"].get("phase")) for p in items(cluster, "pods", namespace, name)]
    return f"jobset status: {jobset.get(name, namespace).get('status')}\njobs: {jobs}\npods: {pods}\n{jobset.logs()}"


def test_jobset_of_two_replicas_completes_with_labels_and_service(jobset, kube_node, namespace):
    cluster = jobset.cluster
    print(f"\nJobSet {jobset.version} on Kubernetes {cluster.version}, started in {jobset.startup_seconds:.1f}s "
          f"({', '.join(f'{k} {v}s' for k, v in jobset.timings.items())})")
    name = "pair"
    started = time.monotonic()
    stored = create(cluster, namespace, jobset_manifest(name, REPORT, replicas=2, pods=2))
    template = stored["spec"]["replicatedJobs"][0]["template"]["spec"]
    print(f"stored (after the mutating webhook): completionMode={template.get('completionMode')} "
          f"network={stored['spec'].get('network')} successPolicy={stored['spec'].get('successPolicy')}")
    assert template["completionMode"] == "Indexed"

    done = wait_until(lambda: completed(jobset, name, namespace), timeout=60, what=f"JobSet {name} Completed",
                      on_timeout=lambda: show_state(cluster, jobset, namespace, name))
    print(f"Completed {time.monotonic() - started:.1f}s after create; status: {json.dumps(done['status'])}")
    assert done["status"].get("restarts", 0) == 0

    jobs = sorted(items(cluster, "jobs", namespace, name), key=lambda j: j["metadata"]["name"])
    assert [j["metadata"]["name"] for j in jobs] == [f"{name}-workers-0", f"{name}-workers-1"]
    for index, job in enumerate(jobs):
        labels = job["metadata"]["labels"]
        assert (labels[JOBSET_NAME_LABEL], labels[REPLICATED_JOB_LABEL], labels[JOB_INDEX_LABEL]) == (
            name, "workers", str(index)), labels
        assert job["status"].get("succeeded") == 2, job["status"]
        owner = job["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner.get("controller")) == ("JobSet", name, True)

    pods = items(cluster, "pods", namespace, name)
    assert len(pods) == 4, [p["metadata"]["name"] for p in pods]
    hostnames = set()
    for pod in pods:
        labels, spec = pod["metadata"]["labels"], pod["spec"]
        job_name = labels["batch.kubernetes.io/job-name"]
        assert labels[JOBSET_NAME_LABEL] == name and labels[REPLICATED_JOB_LABEL] == "workers"
        assert job_name == f"{name}-workers-{labels[JOB_INDEX_LABEL]}"
        assert pod["status"]["phase"] == "Succeeded"
        # Stable network identity: hostname <job>-<completion index>, subdomain = the Service.
        assert spec.get("subdomain") == name, spec.get("subdomain")
        index = pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
        assert spec.get("hostname") == f"{job_name}-{index}", spec.get("hostname")
        hostnames.add(spec["hostname"])
        log = cluster.kubectl("logs", "-n", namespace, pod["metadata"]["name"]).stdout.strip()
        report = json.loads(log.splitlines()[-1])
        print(f"pod {pod['metadata']['name']} on {spec.get('nodeName')}: hostname={spec['hostname']} "
              f"subdomain={spec['subdomain']}; inside: {report}")
        assert report["fqdn"] == f"{spec['hostname']}.{name}"
        assert (report["jobset"], report["job_index"], report["restart_attempt"]) == (
            name, labels[JOB_INDEX_LABEL], "0")
    assert hostnames == {f"{name}-workers-{j}-{i}" for j in range(2) for i in range(2)}

    service = cluster.get_json("service", name, "-n", namespace)
    print(f"Service {name}: clusterIP={service['spec'].get('clusterIP')} selector={service['spec'].get('selector')} "
          f"publishNotReadyAddresses={service['spec'].get('publishNotReadyAddresses')}")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {JOBSET_NAME_LABEL: name}
    assert service["metadata"]["ownerReferences"][0]["name"] == name


def test_failed_pod_restarts_the_whole_jobset_then_it_completes(jobset, kube_node, namespace):
    cluster = jobset.cluster
    name = "restart"
    policy = {"maxRestarts": 1, "restartStrategy": "BlockingRecreate"}
    started = time.monotonic()
    create(cluster, namespace, jobset_manifest(name, FAIL_ONCE, replicas=2, pods=1, failure_policy=policy))
    first = wait_until(lambda: (lambda js: {j["metadata"]["name"]: j["metadata"]["uid"] for j in js}
                                if len(js) == 2 else None)(items(cluster, "jobs", namespace, name)),
                       timeout=30, what="the 2 child Jobs of attempt 0")

    done = wait_until(lambda: completed(jobset, name, namespace), timeout=60, what=f"JobSet {name} Completed",
                      on_timeout=lambda: show_state(cluster, jobset, namespace, name))
    total = time.monotonic() - started
    status = done["status"]
    print(f"\nCompleted {total:.1f}s after create; status: {json.dumps(status)}")
    assert status["restarts"] == 1, status
    assert status.get("restartsCountTowardsMax") == 1, status

    jobs = items(cluster, "jobs", namespace, name)
    assert sorted(j["metadata"]["name"] for j in jobs) == sorted(first)
    for job in jobs:
        assert job["metadata"]["uid"] != first[job["metadata"]["name"]], f"{job['metadata']['name']} not recreated"
        assert job["metadata"]["labels"][RESTART_ATTEMPT_LABEL] == "1"
        assert job["status"].get("succeeded") == 1, job["status"]

    runs = [run for run in kube_node.runs if run.namespace == namespace]
    failed = [run for run in runs if run.exit_code == 3]
    assert len(failed) == 1 and failed[0].labels[RESTART_ATTEMPT_LABEL] == "0" and \
        failed[0].labels[JOB_INDEX_LABEL] == "1", [(r.pod, r.exit_code, r.labels) for r in runs]
    attempt0 = [run for run in runs if run.labels[RESTART_ATTEMPT_LABEL] == "0"]
    attempt1 = [run for run in runs if run.labels[RESTART_ATTEMPT_LABEL] == "1"]
    assert len(attempt0) == 2 and len(attempt1) == 2, [(r.pod, r.labels[RESTART_ATTEMPT_LABEL]) for r in runs]
    assert all(run.exit_code == 0 for run in attempt1), [(r.pod, r.exit_code) for r in attempt1]
    survivor = next(run for run in attempt0 if run is not failed[0])
    # The other Pod of attempt 0 was still running (20 s): BlockingRecreate deleted it (SIGTERM).
    assert survivor.deleted, (survivor.pod, survivor.exit_code)
    failure = failed[0].finished
    print(f"failure (pod {failed[0].pod} exit 3) -> other attempt-0 pod stopped: {survivor.finished - failure:.2f}s; "
          f"-> recreated pods started: {', '.join(f'{r.pod} +{r.started - failure:.2f}s' for r in attempt1)}; "
          f"-> recreated pods finished: {max(r.finished for r in attempt1) - failure:.2f}s")
    assert min(run.started for run in attempt1) >= survivor.finished, "BlockingRecreate started before the old Pods ended"


EXCLUSIVE_KEY = "alpha.jobset.sigs.k8s.io/exclusive-topology"
HOSTNAME_LABEL = "kubernetes.io/hostname"


def test_exclusive_placement_puts_each_job_on_its_own_node(jobset, kube_node, second_node, namespace):
    cluster = jobset.cluster
    name = "spread"
    manifest = jobset_manifest(name, REPORT, replicas=2, pods=2)
    manifest["metadata"]["annotations"] = {EXCLUSIVE_KEY: HOSTNAME_LABEL}
    started = time.monotonic()
    create(cluster, namespace, manifest)
    wait_until(lambda: completed(jobset, name, namespace), timeout=60, what=f"JobSet {name} Completed",
               on_timeout=lambda: show_state(cluster, jobset, namespace, name))
    print(f"\nCompleted {time.monotonic() - started:.1f}s after create on nodes {kube_node.name}, {second_node.name}")

    pods = items(cluster, "pods", namespace, name)
    assert len(pods) == 4, [p["metadata"]["name"] for p in pods]
    nodes: dict[str, set] = {}
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        labels, spec = pod["metadata"]["labels"], pod["spec"]
        index = pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
        nodes.setdefault(labels[JOB_INDEX_LABEL], set()).add(spec["nodeName"])
        affinity = spec.get("affinity") or {}
        print(f"pod {pod['metadata']['name']} (completion index {index}) on {spec['nodeName']}: "
              f"nodeSelector={spec.get('nodeSelector')} podAffinity={'podAffinity' in affinity} "
              f"podAntiAffinity={'podAntiAffinity' in affinity}")
        if index == "0":   # the leader: affinities set by JobSet's Pod webhook
            assert "podAffinity" in affinity and "podAntiAffinity" in affinity, affinity
        else:              # a follower: pinned to its leader's node by the webhook
            assert (spec.get("nodeSelector") or {}).get(HOSTNAME_LABEL) == spec["nodeName"], spec.get("nodeSelector")
    assert all(len(on) == 1 for on in nodes.values()), nodes
    assert {next(iter(on)) for on in nodes.values()} == {kube_node.name, second_node.name}, nodes

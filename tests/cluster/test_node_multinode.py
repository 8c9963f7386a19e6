"""Multi-node Jobs on two test kubelets (support/node.py): an Indexed Job's Pods find each other by
`<job>-<index>.<service>.<namespace>.svc` under a headless Service (the test kubelet's Pod DNS) and run
a real 2-process gloo all_reduce to completion; a Pod killed from outside (SIGKILL, exit code 137)
makes the real Job controller fail the Job (backoffLimit 0) and delete the other Pod; a Pod without a
Service, or of another namespace, gets no record."""

from __future__ import annotations

import time

import pytest
import requests
from support.cluster import free_port
from support.node import dns_records, pod_dns_problem
from support.processes import wait_until

pytestmark = pytest.mark.e2e

INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

# Waits for the master's name (the Pod of index 0 may get its record after this one starts), then
# rendezvous at MASTER_ADDR:MASTER_PORT and all_reduce (rank + 1) over gloo: 1 + 2 = 3.
GLOO = """
import datetime, os, socket, time
import torch
import torch.distributed as dist
master = os.environ["MASTER_ADDR"]
deadline = time.monotonic() + 60
while True:
    try:
        address = socket.gethostbyname(master)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
print(f"rank {os.environ['RANK']} on {socket.gethostname()}: {master} -> {address}", flush=True)
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
value = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(value)
assert value.item() == 3.0, value
print(f"all_reduce sum {value.item()}", flush=True)
dist.destroy_process_group()
"""

SLEEPER = "import time\nprint('started', flush=True)\nwhile True:\n    time.sleep(1)\n"


@pytest.fixture(autouse=True)
def needs_pod_dns():
    problem = pod_dns_problem()
    if problem:
        pytest.skip(problem)


class Api:
    """Direct reads of the apiserver (faster than kubectl for timing)."""

    def __init__(self, cluster):
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {cluster.admin_token}"
        self.session.verify = str(cluster.ca_file)
        self.session.trust_env = False
        self.server = cluster.server

    def get(self, path: str) -> dict:
        response = self.session.get(self.server + path, timeout=10)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict) -> dict:
        response = self.session.post(self.server + path, json=body, timeout=10)
        assert response.status_code < 300, response.text
        return response.json()

    def job_condition(self, namespace: str, name: str, kind: str) -> dict | None:
        status = self.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}").get("status") or {}
        return next((c for c in status.get("conditions") or [] if c["type"] == kind and c["status"] == "True"), None)

    def job_pods(self, namespace: str, job: str) -> list[dict]:
        return self.get(f"/api/v1/namespaces/{namespace}/pods?labelSelector=batch.kubernetes.io/job-name%3D{job}")[
            "items"]


def indexed_job(name: str, code: str, *, subdomain: str | None, env=(), cpu: str | None = None) -> dict:
    container = {"name": "main", "image": "python:3.11", "command": ["python", "-c", code], "env": [
        {"name": "RANK", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}},
        *env]}
    if cpu:
        container["resources"] = {"requests": {"cpu": cpu}}  # more than half a node: one Pod per node
    pod_spec = {"restartPolicy": "Never", "terminationGracePeriodSeconds": 5, "containers": [container]}
    if subdomain:
        pod_spec["subdomain"] = subdomain
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"completionMode": "Indexed", "completions": 2, "parallelism": 2, "backoffLimit": 0,
                     "template": {"spec": pod_spec}}}


def headless_service(name: str, job: str) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {"batch.kubernetes.io/job-name": job}}}


def create(api: Api, namespace: str, *objects: dict) -> None:
    for obj in objects:
        kind = obj["kind"].lower() + "s"
        group = "/api/v1" if obj["apiVersion"] == "v1" else f"/apis/{obj['apiVersion']}"
        api.post(f"{group}/namespaces/{namespace}/{kind}", obj)


def test_indexed_job_rendezvous_by_dns_and_all_reduces_over_gloo(kube_cluster, kube_node, second_node, namespace):
    api = Api(kube_cluster)
    job, service = "ring", "ring-workers"
    env = [{"name": "MASTER_ADDR", "value": f"{job}-0.{service}.{namespace}.svc"},
           {"name": "MASTER_PORT", "value": str(free_port())}, {"name": "WORLD_SIZE", "value": "2"}]
    started = time.monotonic()
    create(api, namespace, headless_service(service, job), indexed_job(job, GLOO, subdomain=service, env=env, cpu="9"))

    def runs():
        return kube_node.runs_of(job, namespace) + second_node.runs_of(job, namespace)

    def finished():
        if api.job_condition(namespace, job, "Failed"):
            logs = "\n".join(f"{r.pod} exit {r.exit_code}:\n{r.log.read_text() if r.log else ''}" for r in runs())
            pytest.fail(f"Job {job} failed:\n{logs}")
        return api.job_condition(namespace, job, "Complete")
    wait_until(finished, 240, f"Job {job} to complete",
               on_timeout=lambda: "\n".join(f"{r.pod}: {r.log.read_text() if r.log else ''}" for r in runs()))
    print(f"\n{job} complete {time.monotonic() - started:.1f}s after create")

    pods = api.job_pods(namespace, job)
    assert {p["spec"]["nodeName"] for p in pods} == {kube_node.name, second_node.name}
    assert sorted(p["spec"]["hostname"] for p in pods) == [f"{job}-0", f"{job}-1"]
    assert len(runs()) == 2
    for run in runs():
        log = run.log.read_text()
        print(f"{run.pod} ({run.ip}): {log.strip()}")
        assert run.exit_code == 0 and "all_reduce sum 3.0" in log, log
        index = run.pod.split("-")[1]
        assert f"rank {index} on {job}-{index}: {job}-0.{service}.{namespace}.svc -> " in log, log
    master = next(r for r in runs() if r.pod.startswith(f"{job}-0-"))
    assert f"-> {master.ip}" in runs()[0].log.read_text()
    # The records go with the Pods' runs.
    assert not [name for name in dns_records() if name.endswith(f".{namespace}.svc.cluster.local")]
    assert not kube_node.errors and not second_node.errors


def test_killed_pod_fails_the_job_and_its_other_pod_is_deleted(kube_cluster, kube_node, namespace):
    api = Api(kube_cluster)
    job = "victim"
    create(api, namespace, indexed_job(job, SLEEPER, subdomain=None))

    def both_started():
        runs = kube_node.runs_of(job, namespace)
        return len(runs) == 2 and all(r.log and r.log.exists() and "started" in r.log.read_text() for r in runs)
    wait_until(both_started, 120, "both Pods' processes to start")

    killed = kube_node.kill(lambda pod: pod["metadata"]["namespace"] == namespace
                            and pod["metadata"]["annotations"].get(INDEX_ANNOTATION) == "1")
    killed_at = time.monotonic()
    assert len(killed) == 1 and killed[0].startswith(f"{job}-1-"), killed

    def pods_left_running():
        return [p["metadata"]["name"] for p in api.job_pods(namespace, job)
                if p["status"].get("phase") in ("Pending", "Running")]
    failed = wait_until(lambda: api.job_condition(namespace, job, "Failed"), 60, f"Job {job} to fail", interval=0.05)
    to_failed = time.monotonic() - killed_at
    wait_until(lambda: not pods_left_running(), 60, "no Pod of the Job running", interval=0.05)
    to_no_pods = time.monotonic() - killed_at
    print(f"\nkill -> Job Failed ({failed['reason']}: {failed['message']}) {to_failed:.2f}s; "
          f"-> no Pod running {to_no_pods:.2f}s")
    assert failed["reason"] == "BackoffLimitExceeded"

    terminated = api.get(f"/api/v1/namespaces/{namespace}/pods/{killed[0]}")["status"]["containerStatuses"][0][
        "state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (137, "Error")
    other = next(r for r in kube_node.runs_of(job, namespace) if r.pod != killed[0])
    wait_until(lambda: other.exit_code is not None, 30, "the other Pod's process to end")
    assert other.deleted and other.exit_code == 143  # the Job controller deleted it: SIGTERM
    wait_until(lambda: [p["metadata"]["name"] for p in api.job_pods(namespace, job)] == killed, 30,
               "the other Pod to be deleted")
    assert not kube_node.errors


def test_records_only_under_a_service_and_short_names_only_within_the_namespace(kube_cluster, kube_node,
                                                                              namespace):
    api = Api(kube_cluster)
    other = f"{namespace}-b"
    kube_cluster.kubectl("create", "namespace", other)
    # Held: Running with their IP and hosts file, no process (no slot taken).
    release = kube_node.hold(lambda pod: pod["metadata"]["namespace"] in (namespace, other))
    try:
        create(api, namespace, indexed_job("lonely", "pass", subdomain="nosvc"),   # no Service named nosvc
               headless_service("svc-a", "paired"), indexed_job("paired", "pass", subdomain="svc-a"))
        create(api, other, headless_service("svc-b", "peer"), indexed_job("peer", "pass", subdomain="svc-b"))

        def ours():
            return {name: ip for name, ip in dns_records().items()
                    if name.endswith((f".{namespace}.svc.cluster.local", f".{other}.svc.cluster.local"))}
        expected = {f"paired-{i}.svc-a.{namespace}.svc.cluster.local" for i in range(2)} | \
            {f"peer-{i}.svc-b.{other}.svc.cluster.local" for i in range(2)}
        records = wait_until(lambda: (lambda r: r if set(r) == expected else None)(ours()), 60,
                             "records of paired and peer", on_timeout=lambda: repr(ours()))

        def by_hostname():  # an Indexed Job's Pod is named <job>-<index>-<random>
            found = {r.pod.rsplit("-", 1)[0]: r for r in kube_node.runs if r.namespace in (namespace, other)}
            return found if len(found) == 6 and all(r.ip for r in found.values()) else None
        runs = wait_until(by_hostname, 60, "the 6 Pods' runs")
        assert records[f"paired-0.svc-a.{namespace}.svc.cluster.local"] == runs["paired-0"].ip
        assert not [name for name in records if name.startswith("lonely-")]

        hosts = (runs["paired-0"].log.parent / "hosts").read_text()
        print(f"\nhosts file of {runs['paired-0'].pod}:\n{hosts}")
        lines = {line.split()[0]: line.split()[1:] for line in hosts.splitlines()
                 if line.strip() and not line.startswith("#")}
        # Its own entry, as a kubelet writes it; then the records.
        assert f"{runs['paired-0'].ip}\tpaired-0.svc-a.{namespace}.svc.cluster.local\tpaired-0" in hosts
        assert "paired-1.svc-a" in lines[runs["paired-1"].ip]          # same namespace: the short name too
        peer = lines[runs["peer-0"].ip]
        assert f"peer-0.svc-b.{other}.svc" in peer and f"peer-0.svc-b.{other}" in peer
        assert "peer-0.svc-b" not in peer                                # another namespace: qualified only
        assert "lonely" not in hosts

        kube_cluster.kubectl("delete", "namespace", other, "--wait=false")
        wait_until(lambda: not [name for name in ours() if name.endswith(f".{other}.svc.cluster.local")], 60,
                   "the other namespace's records to go with its Pods")
        assert f"peer-0.svc-b.{other}" not in (runs["paired-0"].log.parent / "hosts").read_text()  # rewritten
    finally:
        kube_cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)
        kube_cluster.kubectl("delete", "jobs", "--all", "-n", namespace, "--wait=false", check=False)
        release.set()
    assert not kube_node.errors

"""A real Kueue (tests/support/kueue.py) on the real control plane: a ClusterQueue with a quota of
2 GPUs admits two 1-GPU Jobs of three (unsuspends them, their Workloads Admitted) and keeps the
third pending, naming the quota; deleting an admitted Job frees its quota and the third is
admitted. A Job created unsuspended with the queue-name label is suspended by Kueue's webhook
before it is stored. A JobSet labelled for the queue is one Workload for all its Pods (a PodSet
counting both Pods of its 2-Pod Job), admitted whole, and a second such JobSet waits suspended,
without Pods, until the first is deleted. Admission needs no Node; the Pods select a node label
nothing has, so they never run, whatever other tests register."""

from __future__ import annotations

import json
import time

import pytest
from support.jobset import API_VERSION, JOBSET_NAME_LABEL
from support.kueue import condition
from support.processes import wait_until

pytestmark = pytest.mark.e2e

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


@pytest.fixture
def gpu_queue(kueue, namespace):
    """A LocalQueue `gpus` in the namespace whose ClusterQueue has 2 GPUs; yields the ClusterQueue."""
    with kueue.gpu_queue(namespace, gpus=2) as cluster_queue:
        yield cluster_queue


def job(name: str, queue: str | None, *, suspend: bool, gpus: int = 1) -> dict:
    labels = {QUEUE_LABEL: queue} if queue else {}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": labels},
            "spec": {"suspend": suspend, "backoffLimit": 0, "template": {"spec": {
                "restartPolicy": "Never",
                "nodeSelector": {"mot.dev/no-such-node": "true"},   # admitted, never run
                "containers": [{"name": "main", "image": "busybox", "command": ["sleep", "3600"],
                                "resources": {"requests": {"cpu": "100m", "memory": "64Mi", "nvidia.com/gpu": str(gpus)},
                                              "limits": {"nvidia.com/gpu": str(gpus)}}}]}}}}


def create(cluster, namespace: str, manifest: dict) -> dict:
    """kubectl create; the object as the apiserver stored it (after the mutating webhooks)."""
    return json.loads(cluster.kubectl("create", "-n", namespace, "-o", "json", "-f", "-",
                                      input=json.dumps(manifest)).stdout)


def state(kueue, namespace: str, jobs: dict[str, dict]) -> dict[str, tuple]:
    """name -> (spec.suspend, Workload QuotaReserved condition, Admitted condition) per Job."""
    result = {}
    for name, created in jobs.items():
        current = kueue.cluster.get_json("job", name, "-n", namespace)
        workload = kueue.workload_for(namespace, created["metadata"]["uid"])
        result[name] = (current["spec"].get("suspend"),
                        condition(workload, "QuotaReserved") if workload else None,
                        condition(workload, "Admitted") if workload else None)
    return result


def show(label: str, states: dict[str, tuple]) -> None:
    print(f"\n{label}:")
    for name, (suspend, reserved, admitted) in states.items():
        for kind, cond in (("QuotaReserved", reserved), ("Admitted", admitted)):
            text = f"{cond['status']} reason={cond['reason']} message={cond['message']!r}" if cond else "-"
            print(f"  job {name}: suspend={suspend}  Workload {kind}: {text}")


def admitted(entry: tuple) -> bool:
    suspend, _, cond = entry
    return suspend is False and bool(cond) and cond["status"] == "True"


def pending(entry: tuple) -> bool:
    suspend, reserved, cond = entry
    return (suspend is True and bool(reserved) and reserved["status"] == "False" and reserved["reason"] == "Pending"
            and (not cond or cond["status"] == "False"))


def test_gpu_quota_admits_two_of_three_then_the_third(kueue, namespace, gpu_queue):
    cluster = kueue.cluster
    print(f"\nKueue {kueue.version} on Kubernetes {cluster.version}, started in {kueue.startup_seconds:.1f}s "
          f"({', '.join(f'{k} {v}s' for k, v in kueue.timings.items())})")
    jobs = {}
    started = time.monotonic()
    for name in ("gpu-a", "gpu-b", "gpu-c"):
        jobs[name] = create(cluster, namespace, job(name, "gpus", suspend=True))
        assert jobs[name]["spec"]["suspend"] is True

    def two_and_one():
        current = state(kueue, namespace, jobs)
        ok = (sum(admitted(s) for s in current.values()) == 2 and sum(pending(s) for s in current.values()) == 1)
        return current if ok else None
    current = wait_until(two_and_one, timeout=60, what="two Jobs admitted, one pending",
                         on_timeout=lambda: f"{state(kueue, namespace, jobs)}\n{kueue.logs()}")
    show(f"{time.monotonic() - started:.1f}s after creating three 1-GPU Jobs against a 2-GPU quota", current)
    waiting = next(name for name, s in current.items() if pending(s))
    message = current[waiting][1]["message"]
    assert "nvidia.com/gpu" in message and "quota" in message, message

    # The ClusterQueue's status follows (Kueue writes it a moment later).
    def gpu_usage():
        status = cluster.get_json("clusterqueue", gpu_queue)["status"]
        gpus = [r["total"] for f in status.get("flavorsUsage", []) for r in f["resources"] if r["name"] == "nvidia.com/gpu"]
        return (status.get("admittedWorkloads"), status.get("pendingWorkloads"), gpus)
    usage = wait_until(lambda: (lambda u: u if u == (2, 1, ["2"]) else None)(gpu_usage()), timeout=30,
                       what=f"ClusterQueue {gpu_queue} status: 2 admitted, 1 pending, 2 GPUs used",
                       on_timeout=lambda: str(gpu_usage()))
    print(f"ClusterQueue {gpu_queue}: admittedWorkloads={usage[0]} pendingWorkloads={usage[1]} nvidia.com/gpu used={usage[2][0]}")

    # Free one admitted Job's GPU: the waiting one is admitted.
    gone = next(name for name, s in current.items() if admitted(s))
    started = time.monotonic()
    cluster.kubectl("delete", "job", gone, "-n", namespace, "--cascade=foreground", "--wait=false")
    rest = {name: created for name, created in jobs.items() if name != gone}
    current = wait_until(lambda: (lambda c: c if all(admitted(s) for s in c.values()) else None)(
        state(kueue, namespace, rest)), timeout=60, what=f"{waiting} admitted after {gone} was deleted",
        on_timeout=lambda: f"{state(kueue, namespace, rest)}\n{kueue.logs()}")
    show(f"{time.monotonic() - started:.1f}s after deleting {gone}", current)
    assert admitted(current[waiting])


def test_webhook_suspends_an_unsuspended_job_with_a_queue(kueue, namespace, gpu_queue):
    cluster = kueue.cluster
    created = create(cluster, namespace, job("unsuspended", "gpus", suspend=False, gpus=3))
    print(f"\ncreated with spec.suspend=false and {QUEUE_LABEL}=gpus; stored: spec.suspend={created['spec']['suspend']}")
    assert created["spec"]["suspend"] is True, "Kueue's webhook did not suspend the Job"

    # 3 GPUs against a quota of 2: it stays suspended and Kueue says why.
    workload = wait_until(lambda: (lambda w: w if w and condition(w, "QuotaReserved") else None)(
        kueue.workload_for(namespace, created["metadata"]["uid"])), timeout=30, what="its Workload's QuotaReserved",
        on_timeout=kueue.logs)
    reserved = condition(workload, "QuotaReserved")
    print(f"Workload {workload['metadata']['name']} QuotaReserved: {reserved['status']} "
          f"reason={reserved['reason']} message={reserved['message']!r}")
    assert reserved["status"] == "False" and "nvidia.com/gpu" in reserved["message"]
    assert cluster.get_json("job", "unsuspended", "-n", namespace)["spec"]["suspend"] is True

    # Without the label Kueue leaves a Job alone (manageJobsWithoutQueueName: false).
    plain = create(cluster, namespace, job("no-queue", None, suspend=False))
    print(f"created with spec.suspend=false and no queue label; stored: spec.suspend={plain['spec']['suspend']}")
    assert plain["spec"]["suspend"] is False


def gang(name: str, queue: str, *, pods: int = 2) -> dict:
    """A JobSet of one Indexed Job of `pods` 1-GPU Pods, labelled for `queue`."""
    template = job(name, None, suspend=False)["spec"]["template"]
    return {"apiVersion": API_VERSION, "kind": "JobSet", "metadata": {"name": name, "labels": {QUEUE_LABEL: queue}},
            "spec": {"replicatedJobs": [{"name": "ranks", "replicas": 1, "template": {"spec": {
                "parallelism": pods, "completions": pods, "backoffLimit": 0, "template": template}}}]}}


def test_a_queued_jobset_is_admitted_whole_as_one_workload(kueue, jobset, namespace, gpu_queue):
    cluster = kueue.cluster
    created = {name: create(cluster, namespace, gang(name, "gpus")) for name in ("gang-a", "gang-b")}
    assert all(c["spec"]["suspend"] is True for c in created.values()), "Kueue's webhook suspends queued JobSets"

    def jobset_state(name: str) -> tuple:
        current = jobset.get(name, namespace)
        workload = kueue.workload_for(namespace, created[name]["metadata"]["uid"])
        return current["spec"].get("suspend"), workload

    def one_admitted():
        states = {name: jobset_state(name) for name in created}
        running = [n for n, (suspend, w) in states.items() if suspend is False and w
                   and (condition(w, "Admitted") or {}).get("status") == "True"]
        waiting = [n for n, (suspend, w) in states.items() if suspend is True and w
                   and (condition(w, "QuotaReserved") or {}).get("reason") == "Pending"]
        return (running[0], waiting[0], states) if len(running) == 1 and len(waiting) == 1 else None
    started = time.monotonic()
    first, second, states = wait_until(one_admitted, timeout=60, what="one JobSet admitted, the other pending",
                                       on_timeout=kueue.logs)
    workload = states[first][1]
    print(f"\n{time.monotonic() - started:.1f}s after creating two 2-GPU JobSets against a 2-GPU quota: {first} "
          f"admitted (Workload {workload['metadata']['name']} podSets "
          f"{[(p['name'], p['count']) for p in workload['spec']['podSets']]}); {second} waiting: "
          f"{condition(states[second][1], 'QuotaReserved')['message']!r}")
    assert [p["count"] for p in workload["spec"]["podSets"]] == [2], "one PodSet of both Pods"
    assert "nvidia.com/gpu" in condition(states[second][1], "QuotaReserved")["message"]
    pods = cluster.get_json("pods", "-n", namespace, "-l", f"{JOBSET_NAME_LABEL}={second}")["items"]
    assert not pods, f"the waiting JobSet has Pods: {[p['metadata']['name'] for p in pods]}"

    started = time.monotonic()
    cluster.kubectl("delete", "jobset", first, "-n", namespace, "--wait=false")
    wait_until(lambda: (lambda s: s[0] is False and (condition(s[1], "Admitted") or {}).get("status") == "True")(
        jobset_state(second)), timeout=60, what=f"{second} admitted after {first} was deleted", on_timeout=kueue.logs)
    print(f"{second} admitted {time.monotonic() - started:.1f}s after {first} was deleted")

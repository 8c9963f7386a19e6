"""A running MoTRun says what it does and why it is stuck, on the shared real stack
(support/mot_e2e.py): training progress read from the branch Pod and moving in status; and each
stuck cause the real scheduler or the test kubelet produces as Kubernetes does (an unschedulable
branch, an image that cannot be pulled, a container OOM-killed for its memory limit, a Pod evicted
through the Eviction API, a Pod preempted by the scheduler for a higher-priority one) in the run's
reason, message, an Event and `kubectl get motruns -o wide`; `spec.pendingTimeoutSeconds` failing a
stage whose Pods never run. (Waiting for Kueue admission: test_operator_kueue.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from support.processes import wait_until

from mot_trainer.tiny import arithmetic_records

pytestmark = pytest.mark.e2e


def dataset(mot_e2e, seed: int, count: int = 12) -> str:
    records = arithmetic_records(count, seed=seed, style="steps")
    return mot_e2e.upload_text(f"data/observe-{seed}-{count}.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def status_of(mot_e2e, ns: str, name: str) -> dict:
    return mot_e2e.get(ns, name).get("status") or {}


def wide_row(mot_e2e, ns: str, name: str) -> dict[str, str]:
    """`kubectl get motrun NAME -o wide` as {column: value} (the columns a user sees)."""
    out = mot_e2e.kubectl("-n", ns, "get", "motrun", name, "-o", "wide").stdout.splitlines()
    header, row = out[0], out[1]
    starts = [header.index(column) for column in header.split()]
    ends = starts[1:] + [None]
    return {header[s:e].strip(): row[s:e].strip() for s, e in zip(starts, ends, strict=True)}


def wait_reason(mot_e2e, ns: str, name: str, reasons: tuple[str, ...], timeout: float = 90) -> dict:
    def reached():
        status = status_of(mot_e2e, ns, name)
        return status if status.get("reason") in reasons else None
    try:
        return wait_until(reached, timeout, f"MoTRun {ns}/{name} reason in {reasons}", interval=0.3)
    except AssertionError as error:
        raise AssertionError(f"{error}\nstatus: {json.dumps(status_of(mot_e2e, ns, name), indent=1)[:3000]}\n"
                             f"operator log:\n{mot_e2e.operator.log_tail()}") from None


def events_with(mot_e2e, ns: str, name: str, reason: str) -> list[dict]:
    return [e for e in mot_e2e.events(ns, name) if e["reason"] == reason]


def in_stage(ns: str, stage: str = "sft"):
    return lambda pod: (pod["metadata"]["namespace"] == ns
                        and (pod["metadata"].get("labels") or {}).get("mot.dev/stage") == stage)


def test_branch_progress_moves_in_status_while_it_trains(mot_e2e):
    """The operator reads the trainer's /progress from the branch Pod (its own IP, the metrics port)
    every --progress-interval (1 s here) and the status shows the steps advance."""
    ns = mot_e2e.namespace()
    steps = 400  # a few seconds of training on one thread: long enough to be seen twice
    mot_e2e.apply(ns, mot_e2e.motrun("progress", {"a": dataset(mot_e2e, 41, count=64)}, steps=steps,
                                     preflight={"enabled": False}))

    def step_seen(after: int):
        def seen():
            entry = ((status_of(mot_e2e, ns, "progress").get("rounds") or [{}])[0].get("branches") or {}).get("a")
            step = ((entry or {}).get("progress") or {}).get("step")
            return entry if step is not None and step > after else None
        return seen

    first = wait_until(step_seen(0), 120, "a first progress record in status", interval=0.2)
    second = wait_until(step_seen(first["progress"]["step"]), 60, "the step to advance", interval=0.2)
    print(f"\nprogress: step {first['progress']['step']} -> {second['progress']['step']} of {steps}")
    assert second["progress"]["totalSteps"] == steps and second["progress"]["loss"] > 0
    assert second["progress"]["tokensPerSecond"] > 0 and second["progress"]["etaSeconds"] >= 0
    status = status_of(mot_e2e, ns, "progress")
    assert 0 < status["progress"]["fraction"] < 1 and status["reason"] == "BranchesRunning"
    assert wide_row(mot_e2e, ns, "progress")["PROGRESS"].endswith("%") or "ETA" in \
        wide_row(mot_e2e, ns, "progress")["PROGRESS"]
    # The kubectl plugin shows the same, from the live MoTRun.
    shown = subprocess.run([str(Path(sys.executable).parent / "kubectl-mot"), "status", "progress", "-n", ns],
                           capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, KUBECONFIG=str(mot_e2e.cluster.kubeconfig)))
    assert shown.returncode == 0, shown.stderr
    [row] = [line for line in shown.stdout.splitlines() if line.split()[:3] == ["1", "branch", "a"]]
    assert f"/{steps}" in row and "Running" in row, shown.stdout
    done = mot_e2e.wait_phase(ns, "progress", ("Succeeded", "Failed"), timeout=240)["status"]
    assert done["phase"] == "Succeeded", done.get("message")
    assert done["rounds"][0]["branches"]["a"]["progress"]["step"] == steps
    assert done["progress"]["fraction"] == 1.0 and done["progressDisplay"] == "100%"


def test_an_unschedulable_branch_says_why_and_the_pending_timeout_fails_it(mot_e2e):
    """16 GPUs on a node with 8: the real scheduler leaves the Pod Pending with its reason; a pending
    timeout set later (it is mutable) fails the run with that reason."""
    ns = mot_e2e.namespace()
    manifest = mot_e2e.motrun("big", {"a": dataset(mot_e2e, 42)}, preflight={"enabled": False})
    manifest["spec"]["resources"] = {"branch": {"gpus": 16}}
    mot_e2e.apply(ns, manifest)
    status = wait_reason(mot_e2e, ns, "big", ("Unschedulable",))
    waiting = status["rounds"][0]["branches"]["a"]["waiting"]
    print(f"\nwaiting: {waiting}")
    assert "Insufficient nvidia.com/gpu" in waiting["message"]
    assert status["message"].startswith("round 1/1: 0/1 branches succeeded; branch 'a' of round 1: Unschedulable: ")
    [event] = events_with(mot_e2e, ns, "big", "Unschedulable")
    assert event["type"] == "Warning" and "Insufficient nvidia.com/gpu" in event["message"]
    row = wide_row(mot_e2e, ns, "big")
    assert row["PHASE"] == "Pending" and row["REASON"] == "Unschedulable" and "Insufficient" in row["MESSAGE"]

    mot_e2e.kubectl("-n", ns, "patch", "motrun", "big", "--type=merge", "-p", '{"spec":{"pendingTimeoutSeconds":2}}')
    failed = mot_e2e.wait_phase(ns, "big", ("Failed",), timeout=60)["status"]
    assert failed["reason"] == "Unschedulable"
    assert "none of its Pods has run for 2s (spec.pendingTimeoutSeconds): Unschedulable: " in failed["message"]
    assert {c["type"]: c["reason"] for c in failed["conditions"]}["Failed"] == "Unschedulable"
    wait_until(lambda: not mot_e2e.jobs(ns, "mot.dev/stage=sft") or all(
        (j.get("metadata") or {}).get("deletionTimestamp") for j in mot_e2e.jobs(ns, "mot.dev/stage=sft")),
        60, "the stuck branch Job deleted")


def test_an_image_that_cannot_be_pulled_says_so_and_times_out(mot_e2e):
    ns = mot_e2e.namespace()
    image = f"registry.invalid/mot-trainer:{uuid.uuid4().hex[:6]}"
    manifest = mot_e2e.motrun("pull", {"a": dataset(mot_e2e, 43)}, preflight={"enabled": False},
                              image=image, pendingTimeoutSeconds=20)
    mot_e2e.apply(ns, manifest)
    status = wait_reason(mot_e2e, ns, "pull", ("ErrImagePull", "ImagePullBackOff"))
    assert image in status["rounds"][0]["branches"]["a"]["waiting"]["message"]
    assert wide_row(mot_e2e, ns, "pull")["REASON"] in ("ErrImagePull", "ImagePullBackOff")
    failed = mot_e2e.wait_phase(ns, "pull", ("Failed",), timeout=90)["status"]
    print(f"\nfailed: {failed['reason']}: {failed['message']}")
    assert failed["reason"] in ("ErrImagePull", "ImagePullBackOff")
    assert "(spec.pendingTimeoutSeconds)" in failed["message"] and image in failed["message"]
    assert events_with(mot_e2e, ns, "pull", "ErrImagePull") or events_with(mot_e2e, ns, "pull", "ImagePullBackOff")


def test_an_oom_killed_branch_names_the_cause(mot_e2e):
    """A 64Mi memory limit: the trainer (torch alone takes more) is killed as a cgroup OOM kill is
    reported: reason OOMKilled, exit code 137."""
    ns = mot_e2e.namespace()
    manifest = mot_e2e.motrun("oom", {"a": dataset(mot_e2e, 44)}, preflight={"enabled": False}, max_retries=0)
    manifest["spec"]["resources"] = {"branch": {"memory": "64Mi"}}
    mot_e2e.apply(ns, manifest)
    failed = mot_e2e.wait_phase(ns, "oom", ("Failed", "Succeeded"), timeout=120)["status"]
    print(f"\nfailed: {failed['reason']}: {failed['message']}")
    assert failed["phase"] == "Failed" and failed["reason"] == "OOMKilled"
    assert "used more than its memory limit (64Mi)" in failed["message"]
    assert failed["rounds"][0]["branches"]["a"]["failureReason"] == "OOMKilled"
    [event] = events_with(mot_e2e, ns, "oom", "BranchFailed")
    assert "OOMKilled" in event["message"]
    assert wide_row(mot_e2e, ns, "oom")["REASON"] == "OOMKilled"


def _branch_pods(mot_e2e, ns: str) -> list[dict]:
    return [p for p in mot_e2e.pods(ns) if (p["metadata"].get("labels") or {}).get("mot.dev/stage") == "sft"]


def test_an_evicted_branch_pod_is_replaced_told_and_not_counted_as_a_failure(mot_e2e):
    ns = mot_e2e.namespace()
    release = mot_e2e.kubelet.hold(in_stage(ns))  # Running, its command not started, until released
    try:
        mot_e2e.apply(ns, mot_e2e.motrun("evict", {"a": dataset(mot_e2e, 45)}, preflight={"enabled": False}))
        [pod] = wait_until(lambda: [p for p in _branch_pods(mot_e2e, ns) if p["status"].get("phase") == "Running"],
                           90, "the branch Pod running")
        name = pod["metadata"]["name"]
        mot_e2e.evict(ns, name)

        def told():
            status = status_of(mot_e2e, ns, "evict")
            entry = status["rounds"][0]["branches"]["a"]
            return status if entry.get("disruptions") else None
        status = wait_until(told, 60, "the disruption in status", interval=0.3)
        [disruption] = status["rounds"][0]["branches"]["a"]["disruptions"]
        print(f"\ndisruption: {disruption}")
        assert disruption["pod"] == name and disruption["reason"] == "Evicted"
        assert "EvictionByEvictionAPI" in disruption["message"]
        [event] = wait_until(lambda: events_with(mot_e2e, ns, "evict", "BranchDisrupted"), 30, "the Event")
        assert f"Pod {name} was evicted" in event["message"] and event["type"] == "Warning"
    finally:
        release.set()
    done = mot_e2e.wait_phase(ns, "evict", ("Succeeded", "Failed"))["status"]
    assert done["phase"] == "Succeeded", done.get("message")
    branch = done["rounds"][0]["branches"]["a"]
    assert branch["attempt"] == 1 and len(branch["disruptions"]) == 1  # replaced by its Job, no new attempt
    assert not events_with(mot_e2e, ns, "evict", "BranchFailed")


def test_a_branch_preempted_by_the_scheduler_is_told_and_the_run_goes_on(mot_e2e):
    """The branch holds all 8 GPUs at a low priority; a higher-priority Pod asking for 8 makes the real
    scheduler preempt it (DisruptionTarget PreemptionByScheduler). Its replacement cannot be placed
    while the other Pod runs: the run says Unschedulable; when that Pod goes, the run finishes."""
    ns = mot_e2e.namespace()
    suffix = uuid.uuid4().hex[:6]
    low, high = f"mot-low-{suffix}", f"mot-high-{suffix}"
    classes = [{"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": n},
                "value": v, "preemptionPolicy": "PreemptLowerPriority"} for n, v in ((low, 10), (high, 1000))]
    mot_e2e.kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": classes}))
    release = mot_e2e.kubelet.hold(lambda pod: pod["metadata"]["namespace"] == ns)
    try:
        manifest = mot_e2e.motrun("preempt", {"a": dataset(mot_e2e, 46)}, preflight={"enabled": False})
        manifest["spec"]["resources"] = {"branch": {"gpus": 8, "priorityClassName": low}}
        mot_e2e.apply(ns, manifest)
        [pod] = wait_until(lambda: [p for p in _branch_pods(mot_e2e, ns) if p["status"].get("phase") == "Running"],
                           90, "the branch Pod running")
        urgent = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "urgent", "namespace": ns},
                  "spec": {"priorityClassName": high, "restartPolicy": "Never", "containers": [
                      {"name": "main", "image": "busybox", "command": ["sleep", "600"],
                       "resources": {"limits": {"nvidia.com/gpu": "8"}}}]}}
        mot_e2e.kubectl("apply", "-f", "-", stdin=json.dumps(urgent))

        def told():
            status = status_of(mot_e2e, ns, "preempt")
            entry = status["rounds"][0]["branches"]["a"]
            return status if entry.get("disruptions") and status.get("reason") in ("Unschedulable", "Preempted") \
                else None
        status = wait_until(told, 90, "the preemption in status", interval=0.3)
        [disruption] = status["rounds"][0]["branches"]["a"]["disruptions"]
        print(f"\npreempted: {disruption}; run reason {status['reason']}: {status['message']}")
        assert disruption["pod"] == pod["metadata"]["name"] and disruption["reason"] == "Preempted"
        assert "PreemptionByScheduler" in disruption["message"]
        [event] = wait_until(lambda: events_with(mot_e2e, ns, "preempt", "BranchDisrupted"), 30, "the Event")
        assert "was preempted" in event["message"]
        mot_e2e.kubectl("-n", ns, "delete", "pod", "urgent", "--wait=false")
    finally:
        release.set()
    done = mot_e2e.wait_phase(ns, "preempt", ("Succeeded", "Failed"))["status"]
    assert done["phase"] == "Succeeded", done.get("message")
    assert done["rounds"][0]["branches"]["a"]["attempt"] == 1
    mot_e2e.kubectl("delete", "priorityclass", low, high, "--wait=false")

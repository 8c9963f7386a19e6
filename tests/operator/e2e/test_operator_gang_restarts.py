"""Multi-node branches as one gang, end to end, with plain Jobs and with JobSets: a branch of two nodes
(two Pods, torchrun's static rendezvous at rank 0's DNS name, gloo) over two test kubelets, on the
real control plane with the real Job controller and, for the JobSet backend, the real JobSet
controller (tests/support/jobset.py).

- A rank killed mid-training (SIGKILL, exit code 137) ends the whole attempt: its Job (or JobSet)
  fails and the other rank is stopped within seconds (printed); the next attempt starts only once
  every Pod of the last one is gone (checked all along), trains, and the run succeeds; the Event
  names the Pod that failed, and no Pod is left running.
- A rank evicted mid-training (the Eviction API: DisruptionTarget) is not counted: with maxRetries 0
  the run still succeeds. A plain Job's attempt ends and the next attempt starts; a JobSet restarts
  all its Pods in place (status.restarts), the same attempt.
- Queued in a real Kueue (JobSet backend; tests/support/kueue.py manages JobSets beside the JobSet
  controller) with quota for one 2-Pod gang, a run of two teachers: Kueue admits each branch's JobSet
  whole (one Workload whose PodSet counts both Pods); the second waits suspended (WaitingForAdmission)
  with no Pod while the first runs and is admitted once it has finished; the run succeeds. (Two gangs
  must not run at once here anyway: their rank-0 rendezvous stores both bind port 29500 in the test
  kubelet's shared network namespace.)
"""

from __future__ import annotations

import json
import time

import pytest
from support.jobset import API_VERSION, JOBSET_NAME_LABEL
from support.processes import wait_until

from mot_trainer.tiny import arithmetic_records

pytestmark = pytest.mark.e2e

INDEX = "batch.kubernetes.io/job-completion-index"
# Long enough that a rank is killed mid-training, short enough for two attempts on 2 cores.
STEPS = 40
# Each rank asks for more than half a test node's 16 CPUs: one rank per node.
RANK_CPU = "9"
QUEUED_STEPS = 10
TEACHERS = ("a", "b")


@pytest.fixture(scope="module", params=["job", "jobset"])
def backend(request, mot_e2e, second_node):
    """What runs the branch. For "jobset" the shared operator runs with `--jobset` against a running
    JobSet controller."""
    if request.param == "job":
        yield "job"
        return
    request.getfixturevalue("jobset")
    with mot_e2e.operator_with_jobset():
        yield "jobset"


def dataset(mot_e2e, seed: int) -> str:
    records = arithmetic_records(32, seed=seed, style="steps")
    return mot_e2e.upload_text(f"data/gang-{seed}.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def gang_run(mot_e2e, name: str, backend: str, *, max_retries: int) -> dict:
    return mot_e2e.motrun(name, {"a": dataset(mot_e2e, 7)}, steps=STEPS, max_retries=max_retries,
                          preflight={"enabled": False},
                          resources={"branch": {"nodes": 2, "gpus": 1, "cpu": RANK_CPU, "backend": backend}})


def branch_pods(mot_e2e, ns: str, attempt: int | None = None) -> list[dict]:
    return [p for p in mot_e2e.pods(ns) if p["metadata"]["labels"].get("mot.dev/stage") == "sft"
            and (attempt is None or p["metadata"]["labels"].get("mot.dev/attempt") == str(attempt))]


def rank(pod: dict) -> str:
    meta = pod["metadata"]
    return (meta.get("labels") or {}).get(INDEX) or (meta.get("annotations") or {}).get(INDEX)


def live(pods: list[dict]) -> list[dict]:
    return [p for p in pods if p["status"].get("phase") not in ("Succeeded", "Failed")]


def branch(mot_e2e, ns: str, run: str) -> dict:
    rounds = (mot_e2e.get(ns, run).get("status") or {}).get("rounds") or [{}]
    return (rounds[0].get("branches") or {}).get("a") or {}


def training(mot_e2e, ns: str, run: str, attempt: int) -> list[dict]:
    """Both ranks of `attempt` running, rank 0 past its first steps (its progress in status)."""
    def both():
        entry = branch(mot_e2e, ns, run)
        pods = [p for p in branch_pods(mot_e2e, ns, attempt) if p["status"].get("phase") == "Running"]
        step = (entry.get("progress") or {}).get("step") or 0
        return pods if len(pods) == 2 and entry.get("attempt") == attempt and step >= 2 else None
    pods = wait_until(both, 240, f"both ranks of attempt {attempt} training", interval=0.3)
    assert {p["spec"]["nodeName"] for p in pods} == {"mot-node-1", "mot-node-2"}, "one rank per node"
    return pods


def owner_failed(mot_e2e, ns: str, backend: str, name: str) -> bool:
    if backend == "jobset":
        body = mot_e2e.api_get(f"/apis/jobset.x-k8s.io/v1alpha2/namespaces/{ns}/jobsets/{name}")
    else:
        body = mot_e2e.api_get(f"/apis/batch/v1/namespaces/{ns}/jobs/{name}")
    return any(c["type"] in ("Failed", "FailureTarget") and c["status"] == "True"
               for c in (body.get("status") or {}).get("conditions") or [])


def watch_attempts(mot_e2e, ns: str, run: str, since: float, until: float) -> dict:
    """Poll until the run ends: when (seconds after `since`) the last Pod of attempt 1 stopped, and
    whether a Pod of attempt 2 ever existed while one of attempt 1 was not stopped."""
    seen = {"overlap": False}
    while time.monotonic() < until:
        pods = branch_pods(mot_e2e, ns)
        first = live([p for p in pods if p["metadata"]["labels"]["mot.dev/attempt"] == "1"])
        second = [p for p in pods if p["metadata"]["labels"]["mot.dev/attempt"] == "2"]
        if first and second:
            seen["overlap"] = True
        if not first and "stopped" not in seen:
            seen["stopped"] = time.monotonic() - since
        if mot_e2e.phase(ns, run) in ("Succeeded", "Failed"):
            return seen
        time.sleep(0.2)
    raise AssertionError(f"MoTRun {ns}/{run} did not end; operator log:\n{mot_e2e.operator.log_tail()}")


def test_a_killed_rank_ends_the_whole_attempt_and_the_next_one_trains(mot_e2e, backend, second_node):
    ns = mot_e2e.namespace()
    mot_e2e.apply(ns, gang_run(mot_e2e, "killed", backend, max_retries=1))
    pods = training(mot_e2e, ns, "killed", attempt=1)
    pod = next(p for p in pods if rank(p) == "1")
    victim = pod["metadata"]["name"]
    kubelet = {"mot-node-1": mot_e2e.kubelet, "mot-node-2": second_node}[pod["spec"]["nodeName"]]
    owner = branch(mot_e2e, ns, "killed")["job"]

    killed_at = time.monotonic()
    assert kubelet.kill(lambda found: found["metadata"]["name"] == victim) == [victim]
    wait_until(lambda: owner_failed(mot_e2e, ns, backend, owner), 60, f"{owner} failed", interval=0.1)
    failed_after = time.monotonic() - killed_at
    seen = watch_attempts(mot_e2e, ns, "killed", since=killed_at, until=killed_at + 300)
    print(f"\n[{backend}] rank 1 killed: {owner} failed {failed_after:.1f}s after the kill, every Pod of "
          f"attempt 1 stopped {seen['stopped']:.1f}s after it")
    assert not seen["overlap"], "a Pod of attempt 2 existed while one of attempt 1 was still running"

    status = mot_e2e.get(ns, "killed")["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    entry = status["rounds"][0]["branches"]["a"]
    assert (entry["state"], entry["attempt"]) == ("Succeeded", 2)
    [failed] = [e for e in mot_e2e.events(ns, "killed") if e["reason"] == "BranchFailed"]
    assert f"Pod {victim} (exit code 137" in failed["message"], failed["message"]
    assert "attempt 1 of 2 failed" in failed["message"]
    assert not live(branch_pods(mot_e2e, ns)), "no Pod left running"


def test_an_evicted_rank_restarts_the_gang_without_counting_it(mot_e2e, backend):
    ns = mot_e2e.namespace()
    mot_e2e.apply(ns, gang_run(mot_e2e, "evicted", backend, max_retries=0))
    pods = training(mot_e2e, ns, "evicted", attempt=1)
    victim = next(p for p in pods if rank(p) == "0")["metadata"]["name"]
    mot_e2e.evict(ns, victim)

    status = mot_e2e.wait_phase(ns, "evicted", ("Succeeded", "Failed"), timeout=300)["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    entry = status["rounds"][0]["branches"]["a"]
    events = mot_e2e.events(ns, "evicted")
    disrupted = [e["message"] for e in events if e["reason"] == "BranchDisrupted"]
    print(f"\n[{backend}] rank 0 evicted: branch {json.dumps({k: entry.get(k) for k in ('attempt', 'restarts', 'disruptedAttempts')})}; "
          f"events: {disrupted}")
    assert any(f"Pod {victim} was evicted" in m for m in disrupted), disrupted
    assert not [e for e in events if e["reason"] == "BranchFailed"], "a disruption is not a failure"
    assert [d["pod"] for d in entry["disruptions"]] == [victim]
    if backend == "jobset":  # JobSet recreated every Pod itself: the same attempt, restarted once
        assert (entry["attempt"], entry.get("restarts")) == (1, 1)
        assert any(e["reason"] == "BranchRestarted" for e in events)
    else:  # the operator started attempt 2 once attempt 1's Pods were gone, not counted
        assert (entry["attempt"], entry.get("disruptedAttempts")) == (2, 1)
    assert not live(branch_pods(mot_e2e, ns)), "no Pod left running"


def finished(jobset: dict) -> bool:
    return any(c["type"] in ("Completed", "Failed") and c["status"] == "True"
               for c in (jobset.get("status") or {}).get("conditions") or [])


def watch_gangs(kueue, mot_e2e, ns: str, run: str, timeout: float) -> dict[str, dict]:
    """Poll until the run ends; per branch JobSet (by teacher): when (monotonic) it was first seen,
    admitted (unsuspended), had a Pod, finished; its Workload's PodSet counts when admitted; the
    branch's `waiting` while suspended; and the violations seen (a Pod of a suspended JobSet, Pods
    of both gangs alive at once)."""
    gangs: dict[str, dict] = {}
    violations: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Pods first: a Pod read before its JobSet is seen suspended existed while it was suspended
        # (an admitted JobSet is not suspended again here: nothing preempts it).
        pods = [p for p in mot_e2e.pods(ns) if JOBSET_NAME_LABEL in p["metadata"].get("labels", {})]
        jobsets = mot_e2e.api_get(f"/apis/{API_VERSION}/namespaces/{ns}/jobsets")["items"]
        status = mot_e2e.get(ns, run).get("status") or {}
        branches = ((status.get("rounds") or [{}])[0].get("branches")) or {}
        now = time.monotonic()
        branch_jobsets = [j for j in jobsets if j["metadata"]["labels"].get("mot.dev/stage") == "sft"]
        own = {j["metadata"]["name"]: [p for p in pods if p["metadata"]["labels"][JOBSET_NAME_LABEL]
                                       == j["metadata"]["name"]] for j in branch_jobsets}
        alive = {name: [p for p in found if p["status"].get("phase") not in ("Succeeded", "Failed")]
                 for name, found in own.items()}
        for jobset in branch_jobsets:
            name, teacher = jobset["metadata"]["name"], jobset["metadata"]["labels"]["mot.dev/teacher"]
            gang = gangs.setdefault(teacher, {"jobset": name, "created": now, "waiting": None,
                                              "waited_while_other_ran": False})
            if jobset["spec"].get("suspend"):
                if own[name]:
                    violations.append(f"{name} suspended with Pods {[p['metadata']['name'] for p in own[name]]}")
                waiting = (branches.get(teacher) or {}).get("waiting")
                if waiting and waiting.get("reason") == "WaitingForAdmission":
                    gang["waiting"] = waiting
                    if any(running for other, running in alive.items() if other != name):
                        gang["waited_while_other_ran"] = True
                continue
            if "admitted" not in gang:
                gang["admitted"] = now
                workload = kueue.workload_for(ns, jobset["metadata"]["uid"]) or {}
                gang["podsets"] = [p["count"] for p in (workload.get("spec") or {}).get("podSets") or []]
                gang["workload"] = workload.get("metadata", {}).get("name")
            if own[name] and "first_pod" not in gang:
                gang["first_pod"] = now
            if finished(jobset) and "finished" not in gang:
                gang["finished"] = now
        if sum(1 for running in alive.values() if running) > 1:
            violations.append(f"Pods of several gangs alive at once: {sorted(t for t, r in alive.items() if r)}")
        if status.get("phase") in ("Succeeded", "Failed"):
            return {"gangs": gangs, "violations": violations, "phase": status.get("phase"),
                    "message": status.get("message")}
        time.sleep(0.3)
    raise AssertionError(f"MoTRun {ns}/{run} did not end within {timeout:.0f}s; seen {gangs}; "
                         f"operator log:\n{mot_e2e.operator.log_tail()}\nKueue:\n{kueue.logs()}")


def test_kueue_admits_each_branch_jobset_whole_one_gang_at_a_time(backend, kueue, mot_e2e):
    if backend != "jobset":
        pytest.skip("Kueue admits a JobSet whole; a plain Job's gang is one Job anyway")
    ns = mot_e2e.namespace()
    records = arithmetic_records(32, seed=41, style="steps")
    data = mot_e2e.upload_text("data/kueue-jobset.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    manifest = mot_e2e.motrun("gangs", dict.fromkeys(TEACHERS, data), steps=QUEUED_STEPS, queueName="gpus",
                              preflight={"enabled": False},
                              resources={"branch": {"nodes": 2, "gpus": 1, "cpu": RANK_CPU, "backend": "jobset"}})
    with kueue.gpu_queue(ns, gpus=2):   # one 2-Pod gang of 1 GPU each at a time
        started = time.monotonic()
        mot_e2e.apply(ns, manifest)
        seen = watch_gangs(kueue, mot_e2e, ns, "gangs", timeout=480)
    gangs = seen["gangs"]
    first, second = sorted(gangs, key=lambda t: gangs[t].get("admitted", float("inf")))
    for teacher in (first, second):
        gang = gangs[teacher]
        print(f"\nbranch {teacher}: JobSet {gang['jobset']} Workload {gang.get('workload')} podSets "
              f"{gang.get('podsets')}; created +{gang['created'] - started:.1f}s, admitted "
              f"+{gang.get('admitted', float('nan')) - started:.1f}s, first Pod "
              f"+{gang.get('first_pod', float('nan')) - started:.1f}s, finished "
              f"+{gang.get('finished', float('nan')) - started:.1f}s; waiting {gang['waiting']}")
    gap = gangs[second]["admitted"] - gangs[first]["finished"]
    print(f"{gangs[second]['jobset']} admitted {gap:.1f}s after {gangs[first]['jobset']} finished; "
          f"run {seen['phase']} +{time.monotonic() - started:.1f}s")

    assert seen["phase"] == "Succeeded", seen["message"]
    assert not seen["violations"], seen["violations"]
    for teacher in TEACHERS:   # one Workload for the JobSet, its PodSet counting both Pods
        assert gangs[teacher].get("podsets") == [2], gangs[teacher]
    waited = gangs[second]
    assert waited["waiting"] and waited.get("waited_while_other_ran"), waited
    assert waited["waiting"]["message"].startswith("LocalQueue 'gpus'"), waited["waiting"]
    assert gap >= 0, "the second gang was admitted before the first finished"

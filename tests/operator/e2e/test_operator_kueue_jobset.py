"""Multi-node branches as JobSets queued in a real Kueue (tests/support/kueue.py, managing JobSets
beside the real JobSet controller, tests/support/jobset.py), end to end: the operator runs with
`--jobset`, each branch of two nodes (two 1-GPU Pods, one per test kubelet) is one JobSet labelled
for the LocalQueue and created suspended, and a ClusterQueue with quota for one such gang (2 GPUs)
gets a run of two teachers (4 Pods).

Kueue admits each JobSet whole, as one Workload whose PodSet counts both Pods; the second JobSet
waits suspended (its branch says WaitingForAdmission) while the first runs, no Pod of it exists
until it is admitted, and it is admitted once the first has finished; the run succeeds. Two gangs
must not run at once here anyway: their rank-0 rendezvous stores both bind port 29500 on the test
kubelet's shared network namespace.
"""

from __future__ import annotations

import json
import time

import pytest
from support.jobset import API_VERSION, JOBSET_NAME_LABEL

from mot_trainer.tiny import arithmetic_records

pytestmark = pytest.mark.e2e

STEPS = 10
# Each rank asks for more than half a test node's 16 CPUs: one rank per node.
RANK_CPU = "9"
TEACHERS = ("a", "b")


@pytest.fixture(scope="module")
def jobset_operator(mot_e2e, jobset, second_node):
    """The shared operator restarted with `--jobset` against the JobSet controller, beside a second
    test kubelet (one rank per node); restored afterwards."""
    with mot_e2e.operator_with_jobset() as operator:
        yield operator


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


def test_kueue_admits_each_branch_jobset_whole_one_gang_at_a_time(kueue, mot_e2e, jobset_operator):
    ns = mot_e2e.namespace()
    records = arithmetic_records(32, seed=41, style="steps")
    data = mot_e2e.upload_text("data/kueue-jobset.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    manifest = mot_e2e.motrun("gangs", dict.fromkeys(TEACHERS, data), steps=STEPS, queueName="gpus",
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

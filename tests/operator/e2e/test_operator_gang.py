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
"""

from __future__ import annotations

import json
import time

import pytest
from support.processes import wait_until

from mot_trainer.tiny import arithmetic_records

pytestmark = pytest.mark.e2e

INDEX = "batch.kubernetes.io/job-completion-index"
# Long enough that a rank is killed mid-training, short enough for two attempts on 2 cores.
STEPS = 40
# Each rank asks for more than half a test node's 16 CPUs: one rank per node.
RANK_CPU = "9"


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

"""Faults end to end, on the shared real stack (support/mot_e2e.py): a branch failing once then
succeeding, a branch always failing, the trainer's exit code 2, the operator SIGKILLed mid-round,
the operator SIGKILLed at every step of a two-round run, suspend then resume, and invalid MoTRuns
refused naming the field."""

from __future__ import annotations

import json
import time

import pytest
from support.processes import wait_until

from mot_trainer.tiny import arithmetic_records

pytestmark = pytest.mark.e2e


def dataset(mot_e2e, seed: int) -> str:
    records = arithmetic_records(12, seed=seed, style="steps")
    return mot_e2e.upload_text(f"data/faults-{seed}.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def in_namespace(ns: str, teacher: str | None = None, attempt: int | None = None, stage: str | None = None):
    """A kubelet fault matcher: Pods of this namespace (and teacher, attempt and stage: the Job's pod
    template carries the run's labels)."""
    def match(pod: dict) -> bool:
        labels = pod["metadata"].get("labels") or {}
        return (pod["metadata"]["namespace"] == ns
                and (teacher is None or labels.get("mot.dev/teacher") == teacher)
                and (attempt is None or labels.get("mot.dev/attempt") == str(attempt))
                and (stage is None or labels.get("mot.dev/stage") == stage))
    return match


def branch_jobs(mot_e2e, ns: str, teacher: str) -> list[str]:
    return sorted(j["metadata"]["name"] for j in mot_e2e.jobs(ns)
                  if j["metadata"]["labels"].get("mot.dev/teacher") == teacher)


def stage_jobs(mot_e2e, ns: str, stage: str) -> list[dict]:
    return [j for j in mot_e2e.jobs(ns) if j["metadata"]["labels"].get("mot.dev/stage") == stage]


def reasons(mot_e2e, ns: str, run: str) -> list[str]:
    return [e["reason"] for e in mot_e2e.events(ns, run)]


def test_branch_failing_once_is_retried_and_the_run_succeeds(mot_e2e):
    ns = mot_e2e.namespace()
    mot_e2e.kubelet.inject_failure(in_namespace(ns, "a", attempt=1), exit_code=1, message="CUDA error: flaky GPU")
    mot_e2e.apply(ns, mot_e2e.motrun("flaky", {"a": dataset(mot_e2e, 1)}, max_retries=2))

    status = mot_e2e.wait_phase(ns, "flaky", ("Succeeded", "Failed"))["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    branch = status["rounds"][0]["branches"]["a"]
    assert (branch["state"], branch["attempt"]) == ("Succeeded", 2)
    assert len(branch_jobs(mot_e2e, ns, "a")) == 2  # a new Job (new name) per attempt
    assert {"BranchFailed", "BranchRetried", "Succeeded"} <= set(reasons(mot_e2e, ns, "flaky"))
    failed = [e for e in mot_e2e.events(ns, "flaky") if e["reason"] == "BranchFailed"]
    assert failed[0]["type"] == "Warning" and "CUDA error: flaky GPU" in failed[0]["message"]
    # The retry is counted, as Prometheus reads it.
    assert mot_e2e.prometheus.wait_for('mot_job_retries_total{stage="sft"} >= 1')
    assert mot_e2e.prometheus.wait_for('mot_jobs_finished_total{stage="sft",result="failed"} >= 1')


def test_branch_always_failing_fails_the_run_with_a_clear_message(mot_e2e):
    ns = mot_e2e.namespace()
    mot_e2e.kubelet.inject_failure(in_namespace(ns, "b"), exit_code=1, message="disk quota exceeded")
    mot_e2e.kubelet.inject_failure(in_namespace(ns, "a"), exit_code=0, message=json.dumps({"final_loss": 1.5}))
    mot_e2e.apply(ns, mot_e2e.motrun("doomed", {"a": dataset(mot_e2e, 2), "b": dataset(mot_e2e, 3)},
                                     max_retries=1))

    status = mot_e2e.wait_phase(ns, "doomed", ("Succeeded", "Failed"))["status"]
    assert status["phase"] == "Failed"
    message = status["message"]
    assert "'b'" in message and "2 attempts" in message and "disk quota exceeded" in message, message
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Failed"]["status"] == "True" and conditions["Failed"]["reason"] == "BranchFailed"
    assert len(branch_jobs(mot_e2e, ns, "b")) == 2
    assert "Failed" in reasons(mot_e2e, ns, "doomed")
    assert not any(j["metadata"]["labels"].get("mot.dev/stage") == "merge" for j in mot_e2e.jobs(ns))


def test_invalid_input_exit_code_2_is_not_retried(mot_e2e):
    ns = mot_e2e.namespace()
    # A real trainer run on a dataset that is not JSONL: the trainer exits 2 (invalid input). The
    # preflight would refuse it before any branch (test_operator_preflight.py); without one, the
    # branch itself meets it.
    broken = mot_e2e.upload_text("data/broken.jsonl", "this is not json\n")
    mot_e2e.apply(ns, mot_e2e.motrun("broken", {"a": broken}, max_retries=3, preflight={"enabled": False}))

    status = mot_e2e.wait_phase(ns, "broken", ("Succeeded", "Failed"))["status"]
    assert status["phase"] == "Failed"
    assert status["rounds"][0]["branches"]["a"]["attempt"] == 1 and "preflight" not in status
    assert "broken.jsonl" in status["message"] and "not retried" in status["message"], status["message"]
    assert stage_jobs(mot_e2e, ns, "preflight") == []
    jobs = branch_jobs(mot_e2e, ns, "a")
    assert len(jobs) == 1
    [run] = mot_e2e.kubelet.runs_of(jobs[0], ns)
    assert run.exit_code == 2 and not run.injected
    # The real Job controller decided it: FailureTarget at once (what the operator acts on), Failed
    # once the Pod's tracking finalizer is gone, both by the podFailurePolicy's FailJob rule.
    def failed():
        job = next(j for j in mot_e2e.jobs(ns) if j["metadata"]["name"] == jobs[0])
        return [c for c in job["status"].get("conditions") or [] if c["type"] == "Failed" and c["status"] == "True"]
    [condition] = wait_until(failed, 30, "the Job's Failed condition")
    assert condition["reason"] == "PodFailurePolicy", condition
    assert "failed with exit code 2 matching FailJob rule at index 1" in condition["message"], condition


def test_operator_killed_mid_round_resumes_without_duplicates(mot_e2e):
    ns = mot_e2e.namespace()
    # Branches stay Running while the operator dies (the preflight before them is not held).
    release = mot_e2e.kubelet.hold(in_namespace(ns, stage="sft"))
    datasets = {"a": dataset(mot_e2e, 4), "b": dataset(mot_e2e, 5)}
    mot_e2e.apply(ns, mot_e2e.motrun("phoenix", datasets))
    try:
        wait_until(lambda: len(stage_jobs(mot_e2e, ns, "sft")) == 2, 90, "both branch Jobs to be created")
        mot_e2e.operator.kill()
        release.set()  # the branches finish while no operator is running
        wait_until(lambda: all(len(r) == 1 and r[0].exit_code is not None for r in
                               (mot_e2e.kubelet.runs_of(j["metadata"]["name"], ns)
                                for j in stage_jobs(mot_e2e, ns, "sft"))),
                   240, "both branches to finish")
    finally:
        release.set()
        if mot_e2e.operator.process.poll() is not None:
            mot_e2e.operator.start()

    status = mot_e2e.wait_phase(ns, "phoenix", ("Succeeded", "Failed"))["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    names = sorted(j["metadata"]["name"] for j in mot_e2e.jobs(ns))
    # The preflight, two branches and one merge, none created twice.
    assert len(names) == len(set(names)) == 4 and "phoenix-preflight-a1" in names, names
    for name in names:
        assert len(mot_e2e.kubelet.runs_of(name, ns)) == 1
    assert reasons(mot_e2e, ns, "phoenix").count("BranchStarted") == 2


def test_suspend_then_resume(mot_e2e):
    ns = mot_e2e.namespace()
    release = mot_e2e.kubelet.hold(in_namespace(ns, stage="sft"))
    mot_e2e.apply(ns, mot_e2e.motrun("nap", {"a": dataset(mot_e2e, 6)}, suspend=True))
    try:
        mot_e2e.wait_phase(ns, "nap", ("Suspended",), timeout=60)
        assert mot_e2e.jobs(ns) == []  # suspended from the start: nothing created, not even the preflight

        mot_e2e.kubectl("-n", ns, "patch", "motrun", "nap", "--type", "merge", "-p", '{"spec": {"suspend": false}}')
        wait_until(lambda: [r for j in stage_jobs(mot_e2e, ns, "sft")
                            for r in mot_e2e.kubelet.runs_of(j["metadata"]["name"], ns)],
                   90, "the branch Pod to run (after the preflight)")
        mot_e2e.kubectl("-n", ns, "patch", "motrun", "nap", "--type", "merge", "-p", '{"spec": {"suspend": true}}')
        mot_e2e.wait_phase(ns, "nap", ("Suspended",), timeout=60)
        wait_until(lambda: all(j["spec"].get("suspend") for j in stage_jobs(mot_e2e, ns, "sft")), 60,
                   "the running Job suspended")
        [job] = stage_jobs(mot_e2e, ns, "sft")
        [pod_run] = mot_e2e.kubelet.runs_of(job["metadata"]["name"], ns)
        wait_until(lambda: pod_run.exit_code is not None, 30, "the suspended Job's process to stop")
        assert pod_run.deleted  # the Job controller deleted the Pod; the kubelet stopped its container
        wait_until(lambda: any(c["type"] == "Suspended" and c["status"] == "True"
                               for c in stage_jobs(mot_e2e, ns, "sft")[0].get("status", {}).get("conditions") or []),
                   30, "the Job controller's Suspended condition")

        release.set()
        mot_e2e.kubectl("-n", ns, "patch", "motrun", "nap", "--type", "merge", "-p", '{"spec": {"suspend": false}}')
    finally:
        release.set()
    status = mot_e2e.wait_phase(ns, "nap", ("Succeeded", "Failed"))["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    # Resumed, the same Job got a new Pod from the Job controller (the suspension counted no failure).
    runs = mot_e2e.kubelet.runs_of(job["metadata"]["name"], ns)
    assert [(r.deleted, r.exit_code) for r in runs] == [(True, 143), (False, 0)]
    assert status["rounds"][0]["branches"]["a"]["attempt"] == 1
    assert {"Suspended", "Resumed"} <= set(reasons(mot_e2e, ns, "nap"))
    # The preflight had passed before the suspension and is not run again.
    assert [len(mot_e2e.kubelet.runs_of(j["metadata"]["name"], ns)) for j in stage_jobs(mot_e2e, ns, "preflight")] \
        == [1]
    assert status["preflight"]["state"] == "Succeeded"


def test_invalid_motruns_are_refused_naming_the_field(mot_e2e):
    ns = mot_e2e.namespace()
    data = dataset(mot_e2e, 7)
    # The API server's schema check (kubectl gets a 422 naming the field).
    refused = mot_e2e.kubectl("-n", ns, "apply", "-f", "-", check=False, stdin=json.dumps(
        mot_e2e.motrun("zero", {"a": data}, rounds=0)))
    assert refused.returncode != 0 and "spec.rounds" in refused.stderr, refused.stderr
    assert mot_e2e.kubectl("-n", ns, "get", "motrun", "zero", check=False).returncode != 0

    # Rules the schema's types and bounds cannot say (list keys, CEL) are the API server's too: the
    # apply is refused naming the exact field, and nothing is created.
    twice = mot_e2e.motrun("twice", {"a": data})
    twice["spec"]["teachers"].append({"name": "a", "dataset": data})
    refused = mot_e2e.kubectl("-n", ns, "apply", "-f", "-", check=False, stdin=json.dumps(twice))
    assert refused.returncode != 0 and "spec.teachers[1]: Duplicate value" in refused.stderr, refused.stderr
    wide = mot_e2e.motrun("wide", {"a": data})
    wide["spec"]["resources"] = {"branch": {"nodes": 2}}
    refused = mot_e2e.kubectl("-n", ns, "apply", "-f", "-", check=False, stdin=json.dumps(wide))
    assert refused.returncode != 0 and "spec.resources.branch.nodes: Invalid value" in refused.stderr, refused.stderr

    # An edit the CRD forbids (an immutable field) is refused too, naming it.
    mot_e2e.apply(ns, mot_e2e.motrun("fixed", {"a": data}, suspend=True))
    refused = mot_e2e.kubectl("-n", ns, "patch", "motrun", "fixed", "--type", "merge",
                              "-p", '{"spec": {"training": {"steps": 99}}}', check=False)
    assert refused.returncode != 0 and "spec.training: Invalid value" in refused.stderr, refused.stderr
    runs = mot_e2e.motruns(ns)
    assert [(r["metadata"]["name"], r["spec"]["training"]["steps"]) for r in runs] == [("fixed", 2)]
    assert mot_e2e.jobs(ns) == []


def test_operator_killed_at_every_step_of_a_two_round_run_creates_each_job_once(mot_e2e):
    """SIGKILL right after the first status write (before or while its Jobs are created), then each
    time new Jobs of the run appear (the preflight, round 1's branches, its merge, round 2's branches,
    its merge), restarting it at once: every Job is created once and runs once."""
    ns = mot_e2e.namespace()
    datasets = {"a": dataset(mot_e2e, 8), "b": dataset(mot_e2e, 9)}
    mot_e2e.apply(ns, mot_e2e.motrun("lazarus", datasets, rounds=2))
    kills, seen = 0, 0
    try:
        wait_until(lambda: (mot_e2e.get(ns, "lazarus").get("status") or {}).get("phase"), 60, "the first status")
        mot_e2e.operator.kill()
        kills += 1
        mot_e2e.operator.start()
        deadline = time.monotonic() + 300
        while mot_e2e.phase(ns, "lazarus") not in ("Succeeded", "Failed") and time.monotonic() < deadline:
            count = len(mot_e2e.jobs(ns))
            if count > seen:  # new Jobs: kill the operator that just created them
                seen = count
                mot_e2e.operator.kill()
                kills += 1
                mot_e2e.operator.start()
            time.sleep(0.2)
    finally:
        if mot_e2e.operator.process.poll() is not None:
            mot_e2e.operator.start()
    status = mot_e2e.wait_phase(ns, "lazarus", ("Succeeded", "Failed"))["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    assert kills >= 6, kills  # the first status, then five batches of new Jobs
    names = [j["metadata"]["name"] for j in mot_e2e.jobs(ns)]
    # The preflight and 2 rounds x (2 branches + merge), none twice.
    assert len(names) == len(set(names)) == 7, names
    for name in names:
        assert len(mot_e2e.kubelet.runs_of(name, ns)) == 1, name
    # No branch announced twice (an Event posted just before a kill may be lost, never repeated).
    assert reasons(mot_e2e, ns, "lazarus").count("BranchStarted") <= 4

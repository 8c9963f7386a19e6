"""A MoTRun with `queueName` under a real Kueue (tests/support/kueue.py): its preflight, one small
CPU Job, is not queued (no queue label, never suspended, no Workload) and runs at once; its branch and
merge Jobs are created suspended and labelled for the LocalQueue; a ClusterQueue with less GPU quota than one round admits
two of the three 2-GPU branches and keeps the third waiting, naming the quota; the operator leaves
the waiting Job suspended (it never fights Kueue over `suspend`); once a branch finishes, Kueue
admits the third, then the merge, and the run succeeds."""

from __future__ import annotations

import json
import time

import pytest
from support.kueue import condition
from support.processes import wait_until

from mot_trainer.tiny import arithmetic_records

pytestmark = pytest.mark.e2e


@pytest.fixture
def gpu_queue(kueue, mot_e2e):
    """A namespace of the e2e stack with a LocalQueue `gpus` whose ClusterQueue has 4 GPUs."""
    ns = mot_e2e.namespace()
    with kueue.gpu_queue(ns, gpus=4):
        yield ns


def stage_jobs(mot_e2e, ns: str, stage: str) -> list[dict]:
    return [j for j in mot_e2e.jobs(ns) if j["metadata"]["labels"].get("mot.dev/stage") == stage]


def branch_jobs(mot_e2e, ns: str) -> dict[str, dict]:
    return {j["metadata"]["labels"]["mot.dev/teacher"]: j for j in mot_e2e.jobs(ns)
            if j["metadata"]["labels"].get("mot.dev/stage") == "sft"}


def test_a_queued_run_waits_for_quota_and_the_operator_leaves_admission_to_kueue(kueue, mot_e2e, gpu_queue):
    ns = gpu_queue
    records = arithmetic_records(12, seed=31, style="steps")
    data = mot_e2e.upload_text("data/kueue.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    manifest = mot_e2e.motrun("queued", {"a": data, "b": data, "c": data}, queueName="gpus")
    manifest["spec"]["resources"] = {"branch": {"gpus": 2}}  # 3 branches x 2 GPUs > the queue's 4
    # The branches stay Running (holding their quota) until released; the preflight is not held.
    release = mot_e2e.kubelet.hold(lambda pod: pod["metadata"]["namespace"] == ns
                                   and (pod["metadata"].get("labels") or {}).get("mot.dev/stage") == "sft")
    mot_e2e.apply(ns, manifest)
    try:
        def two_admitted_one_waiting():
            jobs = branch_jobs(mot_e2e, ns)
            waiting = [t for t, j in jobs.items() if j["spec"].get("suspend")]
            return jobs if len(jobs) == 3 and len(waiting) == 1 else None

        jobs = wait_until(two_admitted_one_waiting, 90, "two branches admitted, one waiting",
                          on_timeout=kueue.logs)
        for job in jobs.values():  # created suspended, labelled for the queue
            assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpus"
        # The preflight before them was not queued: no queue label, not suspended, no Workload; it
        # ran once and passed.
        [preflight] = stage_jobs(mot_e2e, ns, "preflight")
        assert "kueue.x-k8s.io/queue-name" not in preflight["metadata"]["labels"]
        assert not preflight["spec"].get("suspend")
        assert kueue.workload_for(ns, preflight["metadata"]["uid"]) is None
        [preflight_run] = mot_e2e.kubelet.runs_of(preflight["metadata"]["name"], ns)
        assert preflight_run.exit_code == 0 and preflight_run.started
        assert mot_e2e.get(ns, "queued")["status"]["preflight"]["state"] == "Succeeded"
        [teacher] = [t for t, j in jobs.items() if j["spec"].get("suspend")]
        workload = kueue.workload_for(ns, jobs[teacher]["metadata"]["uid"])
        reserved = condition(workload, "QuotaReserved")
        print(f"\nwaiting branch {teacher}: QuotaReserved {reserved}")
        assert reserved["status"] == "False" and "insufficient unused quota for nvidia.com/gpu" in reserved["message"]

        # Left alone: several operator passes later (its Jobs' changes wake it), still suspended.
        time.sleep(5)
        assert branch_jobs(mot_e2e, ns)[teacher]["spec"]["suspend"] is True
        status = mot_e2e.get(ns, "queued")["status"]
        assert status["phase"] == "Running" and status["rounds"][0]["branches"][teacher]["state"] == "Suspended"
        # ... and says why, in Kueue's words (its Workload), in status, an Event and `-o wide`.
        waiting = status["rounds"][0]["branches"][teacher]["waiting"]
        assert waiting["reason"] == "WaitingForAdmission" and waiting["message"].startswith("LocalQueue 'gpus': ")
        assert "insufficient unused quota for nvidia.com/gpu" in waiting["message"]
        assert status["reason"] == "WaitingForAdmission" and "insufficient unused quota" in status["message"]
        # (Each branch waited for admission at first: one Event each, once.)
        events = [e for e in mot_e2e.events(ns, "queued") if e["reason"] == "WaitingForAdmission"]
        [event] = [e for e in events if f"branch '{teacher}' of round 1" in e["message"]]
        assert event["type"] == "Normal" and len(events) <= 3
        wide = mot_e2e.kubectl("-n", ns, "get", "motrun", "queued", "-o", "wide").stdout
        assert "WaitingForAdmission" in wide
    finally:
        release.set()
    status = mot_e2e.wait_phase(ns, "queued", ("Succeeded", "Failed"), timeout=300)["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    # Kueue admitted the waiting branch once quota was free, and the merge after the branches.
    admitted = condition(kueue.workload_for(ns, jobs[teacher]["metadata"]["uid"]) or {}, "Admitted")
    assert admitted is None or admitted["status"] == "True"  # (finished Workloads may be gone already)
    assert len(mot_e2e.kubelet.runs_of(jobs[teacher]["metadata"]["name"], ns)) == 1

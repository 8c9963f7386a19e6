"""`spec.rounds` changed while a MoTRun runs, on the real control plane: raised, the run goes on to
the new last round; lowered below the round in progress, that round's Jobs are deleted and the run
ends with the last kept round's merge."""

from __future__ import annotations

import json

import pytest
from support.processes import wait_until

from mot_trainer.tiny import arithmetic_records

pytestmark = pytest.mark.e2e


def dataset(mot_e2e, seed: int) -> str:
    records = arithmetic_records(12, seed=seed, style="steps")
    return mot_e2e.upload_text(f"data/rounds-{seed}.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def branches_of_round(ns: str, round_: int):
    """A test-kubelet matcher: the SFT branch Pods of one round of this namespace's run."""
    def match(pod: dict) -> bool:
        labels = pod["metadata"].get("labels") or {}
        return (pod["metadata"]["namespace"] == ns and labels.get("mot.dev/stage") == "sft"
                and labels.get("mot.dev/round") == str(round_))
    return match


def jobs_of_round(mot_e2e, ns: str, round_: int) -> list[str]:
    return sorted(j["metadata"]["name"] for j in mot_e2e.jobs(ns)
                  if j["metadata"]["labels"].get("mot.dev/round") == str(round_))


def set_rounds(mot_e2e, ns: str, name: str, rounds: int) -> None:
    mot_e2e.kubectl("-n", ns, "patch", "motrun", name, "--type", "merge", "-p", json.dumps({"spec": {"rounds": rounds}}))


def test_rounds_raised_mid_run_runs_the_extra_round(mot_e2e):
    ns = mot_e2e.namespace()
    release = mot_e2e.kubelet.hold(branches_of_round(ns, 1))
    mot_e2e.apply(ns, mot_e2e.motrun("longer", {"a": dataset(mot_e2e, 21)}, rounds=1))
    try:
        wait_until(lambda: jobs_of_round(mot_e2e, ns, 1), 60, "round 1's branch Job")
        set_rounds(mot_e2e, ns, "longer", 2)
        wait_until(lambda: mot_e2e.get(ns, "longer")["status"].get("roundDisplay") == "1/2", 60,
                   "the status to show 1/2")
    finally:
        release.set()
    status = mot_e2e.wait_phase(ns, "longer", ("Succeeded", "Failed"))["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    assert [r["round"] for r in status["rounds"]] == [1, 2] and status["round"] == 2
    assert status["finalModel"] == status["rounds"][1]["mergedCheckpoint"]
    assert jobs_of_round(mot_e2e, ns, 2)  # round 2's branch and merge ran as Jobs
    assert mot_e2e.checkpoint_manifest(status["finalModel"]) is not None


def test_rounds_lowered_below_the_round_in_progress_ends_with_the_last_kept_merge(mot_e2e):
    ns = mot_e2e.namespace()
    release = mot_e2e.kubelet.hold(branches_of_round(ns, 2))
    mot_e2e.apply(ns, mot_e2e.motrun("shorter", {"a": dataset(mot_e2e, 22)}, rounds=3))
    try:
        wait_until(lambda: [r for job in jobs_of_round(mot_e2e, ns, 2) for r in mot_e2e.kubelet.runs_of(job, ns)],
                   180, "round 2's branch Pod")
        round_two = jobs_of_round(mot_e2e, ns, 2)
        set_rounds(mot_e2e, ns, "shorter", 1)
        status = mot_e2e.wait_phase(ns, "shorter", ("Succeeded", "Failed"), timeout=120)["status"]
    finally:
        release.set()
    assert status["phase"] == "Succeeded", status.get("message")
    assert [r["round"] for r in status["rounds"]] == [1] and status["round"] == 1
    assert status["finalModel"] == status["rounds"][0]["mergedCheckpoint"]
    # Round 2's running branch Job was deleted (the real garbage collector takes its Pod).
    wait_until(lambda: not set(round_two) & {j["metadata"]["name"] for j in mot_e2e.jobs(ns)}, 60,
               "round 2's Jobs to go")
    assert not jobs_of_round(mot_e2e, ns, 3)
    assert "RoundsChanged" in [e["reason"] for e in mot_e2e.events(ns, "shorter")]

"""spec.merge.outer and spec.evaluation.selectBest in the cluster, on the shared real stack: each
round's merge Job gets the outer step's flags, writes its velocity to S3 beside the merged model
(round-N/outer-state, a manifest of kind "outer-state") and round 2's reads round 1's; at the end the
best-scoring of the student and the merged rounds is the final model (status.selected, a
ModelSelected Event, `kubectl mot status` marking its row)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.outer_select import OUTER, check_merge_args, check_selection, check_velocities

from mot_trainer.tiny import arithmetic_records

pytestmark = pytest.mark.e2e

def jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_outer_momentum_across_rounds_and_select_best(mot_e2e):
    ns, name = mot_e2e.namespace(), "outer"
    data = mot_e2e.upload_text("data/outer-select.jsonl", jsonl(arithmetic_records(8, seed=61, style="steps")))
    problems = mot_e2e.upload_text("data/outer-select-problems.jsonl",
                                   jsonl(arithmetic_records(4, seed=62, style="steps")))
    mot_e2e.apply(ns, mot_e2e.motrun(
        name, {"a": data}, rounds=2, preflight={"enabled": False}, merge={"outer": OUTER},
        evaluation={"dataset": problems, "samples": 1, "maxNewTokens": 8, "selectBest": True}))
    status = mot_e2e.wait_phase(ns, name, ("Succeeded", "Failed"), timeout=420)["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    assert [r["round"] for r in status["rounds"]] == [1, 2]
    states = {r: f"{mot_e2e.storage_uri}/{ns}/{name}/round-{r}/outer-state" for r in (1, 2)}

    # The merge Jobs: the outer flags, round 1 writes its velocity, round 2 reads it and writes its own.
    merges = {}
    for round_ in (1, 2):
        [job] = mot_e2e.jobs(ns, f"mot.dev/round={round_},mot.dev/stage=merge")
        merges[round_] = job["spec"]["template"]["spec"]["containers"][0]["args"]
    check_merge_args(merges, states, mot_e2e.student_uri, status)
    # Both velocities are in S3 with every listed file (checkpoint_manifest checks their sizes).
    check_velocities(mot_e2e.checkpoint_manifest, states, status)
    best = check_selection(status)
    selected = status["selected"]
    chosen = [e for e in mot_e2e.events(ns, name) if e["reason"] == "ModelSelected"]
    assert chosen and all(selected["checkpoint"] in e["message"] for e in chosen), chosen

    shown = subprocess.run([str(Path(sys.executable).parent / "kubectl-mot"), "status", name, "-n", ns],
                           capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, KUBECONFIG=str(mot_e2e.cluster.kubeconfig)))
    assert shown.returncode == 0, shown.stderr
    finals = [line for line in shown.stdout.splitlines() if "(final)" in line]
    assert len(finals) == 1, shown.stdout
    assert finals[0].split()[:3] == [str(best[0]), "student" if best[0] == 0 else "merged", "(final)"], shown.stdout
    assert f"final:     {selected['checkpoint']}" in shown.stdout.splitlines(), shown.stdout

"""Round 0 in the cluster, on the shared real stack: with spec.evaluation the operator evaluates the
student itself (Job `<run>-r0-eval-a1`, beside round 1's branches), so the run's status, Events and
`kubectl mot status` show where it started next to every round's score, as `mot run`'s report does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mot_trainer.tiny import arithmetic_records

pytestmark = pytest.mark.e2e


def test_the_student_is_evaluated_in_round_0_and_the_run_waits_for_it(mot_e2e):
    ns = mot_e2e.namespace()
    lines = "".join(json.dumps(r) + "\n" for r in arithmetic_records(8, seed=51, style="steps"))
    data = mot_e2e.upload_text("data/student-eval.jsonl", lines)
    problems = mot_e2e.upload_text("data/student-eval-problems.jsonl", "".join(
        json.dumps(r) + "\n" for r in arithmetic_records(4, seed=52, style="steps")))
    mot_e2e.apply(ns, mot_e2e.motrun("zero", {"a": data}, preflight={"enabled": False},
                                     evaluation={"dataset": problems, "samples": 1, "maxNewTokens": 8}))
    status = mot_e2e.wait_phase(ns, "zero", ("Succeeded", "Failed"), timeout=300)["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    student = status["student"]
    print(f"\nstudent: {json.dumps(student)}; round 1 eval score {status['rounds'][0].get('evalScore')}")
    assert student["model"] == mot_e2e.student_uri and student["eval"]["state"] == "Succeeded"
    assert 0.0 <= student["evalScore"] <= 1.0 and student["eval"]["job"] == "zero-r0-eval-a1"
    assert student["eval"]["checkpoint"] == f"{mot_e2e.storage_uri}/{ns}/zero/round-0/eval.json"
    [job] = mot_e2e.jobs(ns, "mot.dev/round=0")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert job["metadata"]["labels"]["mot.dev/stage"] == "eval" and args[args.index("--model") + 1] == \
        mot_e2e.student_uri
    started = [e for e in mot_e2e.events(ns, "zero") if e["reason"] == "EvalStarted"]
    assert any(e["message"].startswith("evaluation of the student (round 0) started") for e in started), started
    shown = subprocess.run([str(Path(sys.executable).parent / "kubectl-mot"), "status", "zero", "-n", ns],
                           capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, KUBECONFIG=str(mot_e2e.cluster.kubeconfig)))
    assert shown.returncode == 0, shown.stderr
    assert any(line.split()[:3] == ["0", "student", "Succeeded"] for line in shown.stdout.splitlines()), shown.stdout

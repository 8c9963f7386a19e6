"""The GPU memory from the nodes' labels, on the real control plane (support/mot_e2e.py): with the
test kubelet's Node labelled `nvidia.com/gpu.memory=1024` (MiB, as NVIDIA GPU Feature Discovery sets
it), a run whose branch asks for a GPU is refused by its preflight (the real `mot-train preflight`,
given --gpu-memory by the operator, which lists the Nodes with the chart's RBAC): the run Fails with
reason PreflightFailed, its message naming the spec fields to change, and no branch Job is created."""

from __future__ import annotations

import json
import time

import pytest
from support.processes import wait_until

from mot_operator.estimate import DOES_NOT_FIT, FIELDS_TO_CHANGE
from mot_trainer.tiny import arithmetic_records

pytestmark = pytest.mark.e2e

LABEL = "nvidia.com/gpu.memory"


def test_a_branch_that_fits_no_labelled_gpu_fails_at_the_preflight(mot_e2e):
    ns = mot_e2e.namespace()
    lines = "".join(json.dumps(r) + "\n" for r in arithmetic_records(8, seed=61, style="steps"))
    data = mot_e2e.upload_text(f"gpu-memory/{ns}/a.jsonl", lines)
    node = mot_e2e.kubelet.name
    mot_e2e.kubectl("label", "node", node, f"{LABEL}=1024", "--overwrite")
    try:
        with mot_e2e.watch_jobs(ns) as created:
            mot_e2e.apply(ns, mot_e2e.motrun("too-big", {"a": data}, resources={"branch": {"gpus": 1}}))
            run = mot_e2e.wait_phase(ns, "too-big", ("Succeeded", "Failed"), timeout=150)
    finally:
        mot_e2e.kubectl("label", "node", node, f"{LABEL}-")
        time.sleep(1.5)  # the operator's node listing (--gpu-memory-refresh 1) forgets the label
    status = run["status"]
    print(f"\nmessage: {status['message']}")
    assert status["phase"] == "Failed" and status["failure"]["stage"] == "preflight", status
    assert {c["reason"] for c in status["conditions"] if c["type"] == "Failed"} == {"PreflightFailed"}
    message = status["message"]
    assert "invalid input: not retried: " in message and "spec.resources.branch: one SFT branch needs " in message
    assert f"{DOES_NOT_FIT} of 1.00 GiB per GPU where it can run; change {', '.join(FIELDS_TO_CHANGE)}" in message
    assert [meta["labels"]["mot.dev/stage"] for meta in created] == ["preflight"]
    [job] = mot_e2e.jobs(ns)
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--gpu-memory") + 1] == str(1024 * 1024 ** 2) and args[args.index("--gpus") + 1] == "1"
    wait_until(lambda: "Failed" in [e["reason"] for e in mot_e2e.events(ns, "too-big")], 30, "the Failed Event")

"""End to end on real parts: `kubectl apply` of a MoTRun (3 teachers x 2 rounds, tiny model) passes
its preflight and ends Succeeded, with every checkpoint and manifest in S3, status and Events as
specified, and the operator's metrics read back from a real Prometheus."""

from __future__ import annotations

import json

import pytest
from support.mot_e2e import BUCKET
from support.processes import wait_until

from mot_trainer.tiny import arithmetic_records

pytestmark = pytest.mark.e2e

TEACHERS = ("alpha", "beta", "gamma")
ROUNDS = 2


def teacher_data(mot_e2e, name: str, seed: int, style: str = "steps") -> str:
    records = arithmetic_records(16, seed=seed, style=style)
    return mot_e2e.upload_text(f"data/{name}-{seed}.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def value(result: list[dict]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def test_three_teachers_two_rounds_succeed(mot_e2e):
    ns = mot_e2e.namespace()
    styles = {"alpha": "steps", "beta": "short", "gamma": "steps"}
    datasets = {t: teacher_data(mot_e2e, t, seed=i, style=styles[t]) for i, t in enumerate(TEACHERS)}
    mot_e2e.apply(ns, mot_e2e.motrun("tri", datasets, rounds=ROUNDS, steps=2))

    run = mot_e2e.wait_phase(ns, "tri", ("Succeeded", "Failed"), timeout=300)
    status = run["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    assert status["observedGeneration"] == run["metadata"]["generation"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True" and conditions["Failed"]["status"] == "False"
    assert all(c.get("reason") for c in conditions.values())

    # Every branch and merged checkpoint is complete in S3, at the documented layout.
    base = f"{mot_e2e.storage_uri}/{ns}/tri"
    rounds = {r["round"]: r for r in status["rounds"]}
    assert sorted(rounds) == [1, 2]
    for r in (1, 2):
        for teacher in TEACHERS:
            branch = rounds[r]["branches"][teacher]
            assert branch["state"] == "Succeeded" and branch["attempt"] == 1
            assert branch["checkpoint"] == f"{base}/round-{r}/branch-{teacher}"
            assert isinstance(branch["loss"], float)
            manifest = mot_e2e.checkpoint_manifest(branch["checkpoint"])
            assert manifest is not None and manifest["kind"] == "sft"
            assert any(f["path"].endswith(".safetensors") for f in manifest["files"])
        merged = mot_e2e.checkpoint_manifest(f"{base}/round-{r}/merged")
        assert merged is not None and merged["kind"] == "merge"
        assert rounds[r]["mergedCheckpoint"] == f"{base}/round-{r}/merged"
    # Round 2 branches started from round 1's merged model.
    assert rounds[2]["init"] == rounds[1]["mergedCheckpoint"]
    assert status["finalModel"] == f"{base}/round-2/merged"

    # The preflight (on by default) passed first, with each teacher's token statistics, and wrote
    # its report next to the checkpoints.
    preflight = status["preflight"]
    assert (preflight["job"], preflight["attempt"], preflight["state"]) == ("tri-preflight-a1", 1, "Succeeded")
    assert sorted(preflight["teachers"]) == sorted(TEACHERS)
    for teacher in TEACHERS:
        found = preflight["teachers"][teacher]
        assert found["records"] == 16 and 0 < found["p50"] <= found["p95"] <= found["max"], found
        assert found["truncated"] == 0, found
    assert preflight["storage"] == "writable"
    report = json.loads(mot_e2e.s3.client().get_object(
        Bucket=BUCKET, Key=f"runs/{ns}/tri/preflight.json")["Body"].read())
    assert report["teachers"] == preflight["teachers"] and report["max_seq_length"] == 128

    # The preflight, then one Job per branch per round plus one merge per round, each run exactly once.
    jobs = mot_e2e.jobs(ns)
    stages = sorted((j["metadata"]["labels"]["mot.dev/stage"], j["metadata"]["labels"]["mot.dev/round"]) for j in jobs)
    assert stages == sorted([("preflight", "0")] + [("sft", str(r)) for r in (1, 2) for _ in TEACHERS]
                            + [("merge", "1"), ("merge", "2")])
    [preflight_job] = [j for j in jobs if j["metadata"]["labels"]["mot.dev/stage"] == "preflight"]
    assert preflight_job["metadata"]["labels"]["app.kubernetes.io/component"] == "preflight"
    # A small CPU Pod (the defaults of spec.preflight), no GPU.
    container = preflight_job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}
    assert container["args"][:1] == ["preflight"] and "--max-seq-length" in container["args"]
    # It ran (once) and finished before any branch started.
    [preflight_run] = mot_e2e.kubelet.runs_of("tri-preflight-a1", ns)
    assert preflight_run.exit_code == 0
    assert all(preflight_run.finished <= run.started for j in jobs if j["metadata"]["labels"]["mot.dev/stage"] == "sft"
               for run in mot_e2e.kubelet.runs_of(j["metadata"]["name"], ns))
    for job in jobs:
        labels = job["metadata"]["labels"]
        assert labels["mot.dev/run"] == "tri" and labels["app.kubernetes.io/managed-by"] == "mot-operator"
        assert job["metadata"]["ownerReferences"][0]["uid"] == run["metadata"]["uid"]
        assert len(mot_e2e.kubelet.runs_of(job["metadata"]["name"], ns)) == 1

    # Events for every transition.
    reasons = [e["reason"] for e in mot_e2e.events(ns, "tri")]
    for reason in ("PreflightStarted", "PreflightPassed", "BranchStarted", "MergeStarted", "RoundCompleted",
                   "Succeeded"):
        assert reason in reasons, reasons
    [passed] = [e for e in mot_e2e.events(ns, "tri") if e["reason"] == "PreflightPassed"]
    assert passed["type"] == "Normal" and passed["message"].startswith("preflight passed: alpha 16 records, p95 "), passed
    assert reasons.count("BranchStarted") == len(TEACHERS) * ROUNDS
    assert reasons.count("RoundCompleted") == ROUNDS

    # The metrics, scraped by a real Prometheus and read back through its query API.
    prometheus = mot_e2e.prometheus
    run_labels = f'namespace="{ns}",motrun="tri"'
    assert value(prometheus.wait_for(f"mot_run_round{{{run_labels}}} == {ROUNDS}")) == ROUNDS
    losses = prometheus.wait_for(f"mot_branch_loss{{{run_labels}}}", lambda r: len(r) == len(TEACHERS))
    assert sorted(s["metric"]["teacher"] for s in losses) == sorted(TEACHERS)
    assert value(prometheus.wait_for('mot_runs{phase="Succeeded"} >= 1')) >= 1
    assert value(prometheus.wait_for('mot_jobs_created_total{stage="sft"} >= 6')) >= 6
    assert value(prometheus.wait_for('mot_jobs_created_total{stage="merge"} >= 2')) >= 2
    assert value(prometheus.wait_for('mot_jobs_created_total{stage="preflight"} >= 1')) >= 1
    assert value(prometheus.wait_for('mot_jobs_finished_total{stage="sft",result="succeeded"} >= 6')) >= 6
    assert value(prometheus.wait_for('mot_stage_duration_seconds_count{stage="merge"} >= 2')) >= 2
    # Exported while the run moved, dropped once it finished: the no-progress alert cannot fire on it.
    progress = "mot_run_last_progress_timestamp_seconds{" + run_labels + "}"
    assert prometheus.wait_for(f"last_over_time({progress}[10m])")
    assert prometheus.wait_for(f"absent({progress})")
    assert prometheus.query("mot_reconcile_errors_total") is not None

    # kubectl shows the CRD's printer columns.
    table = mot_e2e.kubectl("-n", ns, "get", "motrun", "tri").stdout.split()
    assert table[:5] == ["NAME", "PHASE", "ROUND", "TEACHERS", "AGE"] and table[6:9] == ["Succeeded", "2/2", "3"]
    wide = mot_e2e.kubectl("-n", ns, "get", "motruns", "-o", "wide").stdout.splitlines()
    assert wide[0].split() == ["NAME", "PHASE", "ROUND", "TEACHERS", "AGE", "REASON", "PROGRESS", "MESSAGE"], wide
    assert wide[1].split()[:4] == ["tri", "Succeeded", "2/2", "3"], wide
    assert wide[1].split()[5:7] == ["Succeeded", "100%"], wide
    assert status["message"] and wide[1].rstrip().endswith(status["message"]), (wide, status["message"])

    # Deleting the run: the garbage collector deletes its Jobs (owner references), then their Pods;
    # the operator removes its per-run series.
    mot_e2e.kubectl("-n", ns, "delete", "motrun", "tri")
    wait_until(lambda: mot_e2e.jobs(ns) == [] and mot_e2e.pods(ns) == [], 60, "the run's Jobs and Pods to go")
    wait_until(lambda: not [line for line in mot_e2e.operator.metrics().splitlines()
                            if run_labels in line and not line.startswith("#")],
               30, "the deleted run's series to go from /metrics")

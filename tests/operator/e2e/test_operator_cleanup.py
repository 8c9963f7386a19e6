"""Checkpoint cleanup on delete (spec.storage.cleanup) end to end, on the shared real stack
(support/mot_e2e.py): the cleanup Job is created even when the API server fails the first try, the
MoTRun is held until then, its daemon stops without being cancelled, and the Job deletes the run's
checkpoints in S3 and nothing else."""

from __future__ import annotations

import json

import pytest
from support.mot_e2e import BUCKET
from support.processes import wait_until

from mot_trainer.tiny import arithmetic_records

pytestmark = pytest.mark.e2e


def test_checkpoint_cleanup_on_delete_is_retried_after_an_api_error(mot_e2e):
    ns = mot_e2e.namespace()
    s3 = mot_e2e.s3.client()
    mine, other = f"runs/{ns}/tidy/", f"runs/{ns}/tidy-2/"
    mot_e2e.upload_text(f"{mine}round-1/branch-a/model.safetensors", "weights")
    mot_e2e.upload_text(f"{mine}round-1/branch-a/mot-manifest.json", "{}")
    mot_e2e.upload_text(f"{other}round-1/merged/model.safetensors", "another run's weights")
    records = arithmetic_records(12, seed=8, style="steps")
    data = mot_e2e.upload_text("data/cleanup.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    # The branch stays Running (its Pod held), so the daemon is live when the MoTRun is deleted.
    release = mot_e2e.kubelet.hold(lambda job: job["metadata"]["namespace"] == ns
                                   and (job["metadata"].get("labels") or {}).get("mot.dev/stage") == "sft")
    manifest = mot_e2e.motrun("tidy", {"a": data})
    manifest["spec"]["storage"]["cleanup"] = True
    mot_e2e.apply(ns, manifest)
    job_name = f"tidy-cleanup-{mot_e2e.get(ns, 'tidy')['metadata']['uid'][:8]}"
    try:
        mot_e2e.wait_phase(ns, "tidy", ("Running",), timeout=60)
        wait_until(lambda: len(mot_e2e.jobs(ns)) == 1, 60, "the branch Job")
        fault = mot_e2e.fail_next("create", "jobs", 500,
                                  match=lambda job: job["metadata"]["name"] == job_name)
        offset = mot_e2e.operator.log_size()
        mot_e2e.kubectl("-n", ns, "delete", "motrun", "tidy", "--wait=false")
        wait_until(lambda: mot_e2e.kubectl("-n", ns, "get", "motrun", "tidy", check=False).returncode != 0,
                   60, "the MoTRun to go", on_timeout=mot_e2e.operator.log_tail)
    finally:
        release.set()

    # What the operator logged about it (Kopf's and our lines; its debug chatter left out).
    log = "\n".join(line for line in mot_e2e.operator.log_since(offset).splitlines()
                    if " WARNING " in line or " ERROR " in line or "cleanup Job" in line)
    cleanup = [j for j in mot_e2e.jobs(ns) if j["metadata"]["name"] == job_name]
    assert len(cleanup) == 1, log
    assert "ownerReferences" not in cleanup[0]["metadata"]  # it outlives the MoTRun
    assert fault[-1] == 0, "the first create of the cleanup Job was not failed"
    assert "creating the cleanup Job of" in log and "HTTP 500" in log, log
    assert f"cleanup Job {job_name} created" in log, log
    assert "Will escalate" not in log and "did not exit in time" not in log, log  # the daemon just returned

    [run] = wait_until(lambda: [r for r in mot_e2e.kubelet.runs_of(job_name) if r.exit_code is not None],
                       60, "the cleanup Job to run")
    assert run.exit_code == 0, run.message
    assert not s3.list_objects_v2(Bucket=BUCKET, Prefix=mine).get("KeyCount")
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=other)["KeyCount"] == 1

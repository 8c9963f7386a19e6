"""Checkpoint cleanup on delete (spec.storage.cleanup) end to end, on the shared real stack
(support/mot_e2e.py): the cleanup Job is created only once the run's branch Pod has stopped, and
even when the apiserver refuses the first tries (the namespace has no Job quota left); the MoTRun is
held until then, its daemon stops without being cancelled, and the Job deletes the run's checkpoints
in S3 and nothing else."""

from __future__ import annotations

import json

import pytest
from support.mot_e2e import BUCKET
from support.processes import wait_until

from mot_trainer.tiny import arithmetic_records

pytestmark = pytest.mark.e2e


def test_checkpoint_cleanup_on_delete_is_retried_after_the_apiserver_refuses_it(mot_e2e):
    ns = mot_e2e.namespace()
    s3 = mot_e2e.s3.client()
    mine, other = f"runs/{ns}/tidy/", f"runs/{ns}/tidy-2/"
    mot_e2e.upload_text(f"{mine}round-1/branch-a/model.safetensors", "weights")
    mot_e2e.upload_text(f"{mine}round-1/branch-a/mot-manifest.json", "{}")
    mot_e2e.upload_text(f"{other}round-1/merged/model.safetensors", "another run's weights")
    records = arithmetic_records(12, seed=8, style="steps")
    data = mot_e2e.upload_text("data/cleanup.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    # The branch stays Running (its Pod held), so the daemon is live when the MoTRun is deleted.
    release = mot_e2e.kubelet.hold(lambda pod: pod["metadata"]["namespace"] == ns
                                   and (pod["metadata"].get("labels") or {}).get("mot.dev/stage") == "sft")
    manifest = mot_e2e.motrun("tidy", {"a": data})
    manifest["spec"]["storage"]["cleanup"] = True
    mot_e2e.apply(ns, manifest)
    job_name = f"tidy-cleanup-{mot_e2e.get(ns, 'tidy')['metadata']['uid'][:8]}"
    try:
        mot_e2e.wait_phase(ns, "tidy", ("Running",), timeout=60)
        # (after the preflight, which has finished: only the branch's Pod is still running)
        [branch_job] = wait_until(lambda: [j["metadata"]["name"] for j in mot_e2e.jobs(ns)
                                           if j["metadata"]["labels"]["mot.dev/stage"] == "sft"], 60, "the branch Job")
        [branch] = wait_until(lambda: [r for r in mot_e2e.kubelet.runs_of(branch_job, ns) if r.started], 60,
                              "the branch Pod to run")
        # No Job quota left in the namespace: the apiserver refuses the cleanup Job (403) until the
        # quota is lifted, after the operator has logged the refusal.
        with mot_e2e.no_job_quota(ns):
            offset = mot_e2e.operator.log_size()
            mot_e2e.kubectl("-n", ns, "delete", "motrun", "tidy", "--wait=false")
            wait_until(lambda: "creating the cleanup Job of" in mot_e2e.operator.log_since(offset), 60,
                       "the operator to log the refused cleanup Job", on_timeout=mot_e2e.operator.log_tail)
            # Held by Kopf's finalizer meanwhile.
            assert mot_e2e.get(ns, "tidy")["metadata"].get("deletionTimestamp")
        wait_until(lambda: mot_e2e.kubectl("-n", ns, "get", "motrun", "tidy", check=False).returncode != 0,
                   60, "the MoTRun to go", on_timeout=mot_e2e.operator.log_tail)
    finally:
        release.set()

    # What the operator logged about it (Kopf's and our lines; its debug chatter left out).
    log = "\n".join(line for line in mot_e2e.operator.log_since(offset).splitlines()
                    if " WARNING " in line or " ERROR " in line or (" INFO " in line and "cleanup Job" in line))
    print(f"\n{log}")
    cleanup = [j for j in mot_e2e.jobs(ns) if j["metadata"]["name"] == job_name]
    assert len(cleanup) == 1, log
    assert "ownerReferences" not in cleanup[0]["metadata"]  # it outlives the MoTRun
    # First the branch still running: its Job deleted, the cleanup waits until its Pod is gone ...
    assert f"waiting for 1 Pod(s) of {ns}/tidy to stop before its checkpoints are deleted (Jobs {branch_job} " \
           "deleted)" in log, log
    # ... then the refusal of the apiserver, retried ...
    assert f"creating the cleanup Job of {ns}/tidy failed: HTTP 403 Forbidden" in log, log
    assert f'jobs.batch "{job_name}" is forbidden: exceeded quota: jobs' in log, log
    # ... until it is created.
    assert f"cleanup Job {job_name} created" in log, log
    assert "Will escalate" not in log and "did not exit in time" not in log, log  # the daemon just returned
    assert branch_job not in [j["metadata"]["name"] for j in mot_e2e.jobs(ns)]

    [run] = wait_until(lambda: [r for r in mot_e2e.kubelet.runs_of(job_name, ns) if r.exit_code is not None],
                       60, "the cleanup Job to run")
    assert run.exit_code == 0, run.message
    # The branch's process was stopped (its Pod deleted) before the cleanup's started: it cannot write
    # a checkpoint after the cleanup has listed the run's objects.
    assert branch.deleted and branch.exit_code == 143 and branch.finished <= run.started, (branch, run)
    assert not s3.list_objects_v2(Bucket=BUCKET, Prefix=mine).get("KeyCount")
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=other)["KeyCount"] == 1

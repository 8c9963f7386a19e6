"""Controller logic without Kopf's loop: reading Job/Pod bodies, status merge patches, and one
reconcile pass against a recording fake of the Kubernetes API (the real API is covered by
tests/operator/e2e)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

from mot_operator import controller, kube_executor, observe
from mot_operator.jobs import OperatorConfig
from mot_operator.planner import Event

NOW = "2026-01-01T00:00:10Z"
PREFLIGHT = "demo-preflight-a1"
# The one line `mot-train preflight` writes to its termination log when every check passed.
PREFLIGHT_REPORT = {
    "teachers": {"a": {"records": 1200, "p50": 1830, "p95": 3900, "max": 6120, "truncated": 0.015},
                 "b": {"records": 800, "p50": 950, "p95": 2100, "max": 3980, "truncated": 0.0}},
    "max_seq_length": 4096, "storage": "writable", "seconds": 41.27,
}
# Round 1's branch mechanics, without the preflight in front of them (tested on its own below).
NO_PREFLIGHT = {"preflight": {"enabled": False}}


def job_body(name="demo-r1-sft-a-a1", stage="sft", round_="1", attempt="1", teacher="a", status=None, suspend=False):
    labels = {"mot.dev/run": "demo", "mot.dev/stage": stage, "mot.dev/round": round_, "mot.dev/attempt": attempt}
    if teacher:
        labels["mot.dev/teacher"] = teacher
    return {"metadata": {"name": name, "namespace": "ns", "labels": labels},
            "spec": {"suspend": suspend}, "status": status or {}}


def pod_body(exit_code, message, job="demo-r1-sft-a-a1", reason=None):
    """A finished Pod of `job`, as the Pod index holds it."""
    terminated = {"exitCode": exit_code, "message": message, **({"reason": reason} if reason else {})}
    return {"metadata": {"name": f"{job}-x", "labels": {"mot.dev/run": "demo", "batch.kubernetes.io/job-name": job}},
            "status": {"phase": "Succeeded" if exit_code == 0 else "Failed",
                       "containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}]}}


def live_pod(job="demo-r1-sft-a-a1", phase="Pending", conditions=(), waiting=None, ip=None, deleting=False):
    """A Pod of `job` that has not finished: scheduled or not, its container waiting or running."""
    state = {"waiting": waiting} if waiting else ({"running": {}} if phase == "Running" else {})
    meta = {"name": f"{job}-p", "labels": {"mot.dev/run": "demo", "mot.dev/stage": "sft",
                                           "batch.kubernetes.io/job-name": job}}
    if deleting:
        meta["deletionTimestamp"] = NOW
    return {"metadata": meta,
            "spec": {"containers": [{"name": "trainer", "ports": [{"name": "metrics", "containerPort": 9090}]}]},
            "status": {"phase": phase, "conditions": list(conditions), **({"podIP": ip} if ip else {}),
                       "containerStatuses": [{"name": "trainer", "state": state}] if state else []}}


def cond(kind, reason="", message=""):
    return {"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": NOW}


def preflight_body(status=None, suspend=False):
    return job_body(name=PREFLIGHT, stage="preflight", round_="0", teacher=None, status=status, suspend=suspend)


def compact(summary):
    """As mot_trainer.cli writes a summary to the termination log."""
    return json.dumps(summary, sort_keys=True, separators=(",", ":"))


def test_observe_pending_running_suspended():
    assert observe.observe_job(job_body()).state == "Pending"
    # Active Pods that do not run yet are Pending; Running needs a ready (running) Pod.
    assert observe.observe_job(job_body(status={"active": 1, "startTime": NOW})).state == "Pending"
    assert observe.observe_job(job_body(status={"active": 1, "ready": 1, "startTime": NOW})).state == "Running"
    assert observe.observe_job(job_body(status={"active": 1, "startTime": NOW}),
                                  [live_pod(phase="Running")]).state == "Running"
    assert observe.observe_job(job_body(suspend=True)).state == "Suspended"
    obs = observe.observe_job(job_body(status={"active": 1, "ready": 1, "startTime": NOW}))
    assert (obs.stage, obs.round, obs.teacher, obs.attempt) == ("sft", 1, "a", 1)
    assert obs.started_at == datetime(2026, 1, 1, 0, 0, 10, tzinfo=UTC)
    assert observe.observe_job({"metadata": {"name": "x", "labels": {}}}) is None


def test_observe_success_reads_metrics_from_the_termination_message():
    summary = json.dumps({"final_loss": 0.75, "tokens_per_second": 900})
    obs = observe.observe_job(job_body(status={"conditions": [cond("Complete")], "completionTime": NOW}),
                                 [pod_body(0, summary)])
    assert obs.state == "Succeeded" and obs.metrics["final_loss"] == 0.75 and obs.finished_at is not None


def test_observe_failure_reasons_and_permanence():
    failed = job_body(status={"conditions": [cond("Failed", "BackoffLimitExceeded", "Job has reached the limit")]})
    obs = observe.observe_job(failed, [pod_body(1, "Traceback...\nRetryableError: S3 timed out\n")])
    assert obs.state == "Failed" and not obs.permanent and obs.message == "RetryableError: S3 timed out"
    policy = job_body(status={"conditions": [cond("Failed", "PodFailurePolicy", "exit code 2")]})
    obs = observe.observe_job(policy, [pod_body(2, "data.jsonl line 3: not JSON")])
    assert obs.permanent and obs.message == "data.jsonl line 3: not JSON"
    deadline = job_body(status={"conditions": [cond("Failed", "DeadlineExceeded", "active too long")]})
    obs = observe.observe_job(deadline, [])
    assert obs.state == "Failed" and not obs.permanent and "DeadlineExceeded" in obs.message


def test_merge_patch_deletes_removed_keys_and_replaces_lists():
    old = {"phase": "Running", "failure": {"stage": "sft"}, "rounds": [{"round": 1}], "x": {"a": 1, "b": 2}}
    new = {"phase": "Failed", "rounds": [{"round": 1}, {"round": 2}], "x": {"a": 1}}
    assert observe.merge_patch(old, new) == {
        "phase": "Failed", "failure": None, "rounds": [{"round": 1}, {"round": 2}], "x": {"b": None}}


class FakeApi:
    """Records calls; `existing` Job names answer AlreadyExists; `pods` {job: [pod]} are what the Pod
    index holds; `records` {url: progress record} what trainers serve; `workloads` Kueue's."""

    def __init__(self, existing=(), pods=None, records=None, workloads=()):
        self.existing = set(existing)
        self.pods = pods or {}
        self.records = records or {}
        self.workload_items = list(workloads)
        self.calls = []
        self.objects = {}

    def pod_index(self):
        return {("ns", "demo"): [pod for pods in self.pods.values() for pod in pods]}

    async def progress(self, url):
        self.calls.append(("progress", url))
        return self.records.get(url)

    async def workloads(self, namespace, job_uid):
        self.calls.append(("workloads", job_uid))
        return self.workload_items

    async def run_pods(self, namespace, run_label):
        self.calls.append(("run_pods", run_label))
        return [pod for pods in self.pods.values() for pod in pods]

    async def patch_status(self, namespace, name, patch):
        self.calls.append(("patch_status", name, patch))

    async def create(self, obj):
        name = obj["metadata"]["name"]
        self.calls.append(("create", name))
        self.objects[name] = obj
        if name in self.existing:
            return False
        self.existing.add(name)
        return True

    async def set_suspend(self, namespace, job, suspend, kind="Job"):
        self.calls.append(("suspend" if suspend else "resume", job))

    async def delete_job(self, namespace, job, kind="Job"):
        self.calls.append(("delete", job))

    def event(self, body, event: Event):
        self.calls.append(("event", event.reason))


def motrun(spec_extra=None, status=None):
    spec = {"student": "s3://m/s", "teachers": [{"name": "a", "dataset": "d"}, {"name": "b", "dataset": "d"}],
            "rounds": 1}
    spec.update(spec_extra or {})
    return {"apiVersion": "mot.dev/v1alpha1", "kind": "MoTRun",
            "metadata": {"name": "demo", "namespace": "ns", "uid": "u-1", "generation": 1},
            "spec": spec, "status": status or {}}


def new_state(api, **config):
    return controller.ControllerState(config=OperatorConfig(default_storage_uri="s3://ckpt", **config), api=api)


def reconcile(body, api, jobs=(), state=None):
    state = state or new_state(api)
    index = {("ns", "demo"): list(jobs)}
    return asyncio.run(kube_executor.reconcile(body, body["status"], index, state, pod_index=api.pod_index()))


def test_reconcile_writes_status_before_creating_jobs_and_posts_events():
    api = FakeApi()
    status, _ = reconcile(motrun(), api)
    kinds = [c[0] for c in api.calls]
    assert kinds.index("patch_status") < kinds.index("create")
    assert [c[1] for c in api.calls if c[0] == "create"] == [PREFLIGHT]  # the preflight comes first
    assert [c[1] for c in api.calls if c[0] == "event"] == ["PreflightStarted"]
    assert status["preflight"]["checkpoint"] == "s3://ckpt/ns/demo/preflight.json" and status["rounds"] == []
    api = FakeApi()
    status, _ = reconcile(motrun(NO_PREFLIGHT), api)
    kinds = [c[0] for c in api.calls]
    assert kinds.index("patch_status") < kinds.index("create")
    assert [c[1] for c in api.calls if c[0] == "create"] == ["demo-r1-sft-a-a1", "demo-r1-sft-b-a1"]
    assert [c[1] for c in api.calls if c[0] == "event"] == ["BranchStarted", "BranchStarted"]
    assert status["rounds"][0]["branches"]["a"]["checkpoint"] == "s3://ckpt/ns/demo/round-1/branch-a"


def test_reconcile_after_a_restart_adopts_existing_jobs_without_duplicates():
    first = FakeApi()
    status, _ = reconcile(motrun(NO_PREFLIGHT), first)
    # Restart: status was written, only Job "a" was created before the crash.
    api = FakeApi(existing={"demo-r1-sft-a-a1"})
    body = motrun(NO_PREFLIGHT, status=status)
    _, result = reconcile(body, api, jobs=[job_body(status={"active": 1})])
    assert [c[1] for c in api.calls if c[0] == "create"] == ["demo-r1-sft-b-a1"]
    assert not [c for c in api.calls if c[0] == "event"]


def test_reconcile_of_an_invalid_spec_fails_the_run_naming_the_field():
    api = FakeApi()
    status, _ = reconcile(motrun({"teachers": [{"name": "a", "dataset": "d"}, {"name": "a", "dataset": "e"}]}), api)
    assert status["phase"] == "Failed" and "spec.teachers[1]: Duplicate value" in status["message"]
    assert not [c for c in api.calls if c[0] == "create"]


def test_reconcile_of_an_unchanged_run_writes_nothing():
    api = FakeApi()
    status, _ = reconcile(motrun(), api)
    api2 = FakeApi(existing=api.existing)
    status2, _ = reconcile(motrun(status=status), api2, jobs=[preflight_body()])
    assert api2.calls == [] and status2 == status  # the preflight's Job is there, not yet running
    api = FakeApi()
    status, _ = reconcile(motrun(NO_PREFLIGHT), api)
    api2 = FakeApi(existing=api.existing)
    jobs = [job_body(), job_body(name="demo-r1-sft-b-a1", teacher="b")]
    status2, _ = reconcile(motrun(NO_PREFLIGHT, status=status), api2, jobs=jobs)
    assert api2.calls == [] and status2 == status


def test_the_operator_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, mot_operator.operator_cmd, mot_operator.controller, mot_operator.kube_api, mot_operator.cli; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def first_branch_done():
    """Round 1 started; branch a's Job completed (its pod says loss 0.25), branch b's still runs."""
    status, _ = reconcile(motrun(NO_PREFLIGHT), FakeApi())
    done = {"conditions": [cond("Complete")], "completionTime": NOW}
    jobs = [job_body(status=done), job_body(name="demo-r1-sft-b-a1", teacher="b", status={"active": 1})]
    api = FakeApi(existing={"demo-r1-sft-a-a1", "demo-r1-sft-b-a1"},
                  pods={"demo-r1-sft-a-a1": [pod_body(0, json.dumps({"final_loss": 0.25}))]})
    return status, jobs, api


def test_finished_jobs_results_come_from_the_pod_index_without_api_calls():
    status, jobs, api = first_branch_done()
    status, _ = reconcile(motrun(NO_PREFLIGHT, status=status), api, jobs=jobs)
    assert status["rounds"][0]["branches"]["a"]["loss"] == 0.25
    assert [c[0] for c in api.calls] == ["patch_status"]  # no Pod list: the watch keeps them


def test_deleting_a_run_creates_a_cleanup_job_only_when_asked(monkeypatch):
    api = FakeApi()
    monkeypatch.setattr(controller, "STATE", controller.ControllerState(
        config=OperatorConfig(default_storage_uri="s3://ckpt"), api=api))
    asyncio.run(controller.cleanup_on_delete("ns", "demo", motrun()))
    assert api.calls == []
    asyncio.run(controller.cleanup_on_delete("ns", "demo", motrun({"storage": {"cleanup": True}})))
    assert api.calls == [("run_pods", "demo"), ("create", "demo-cleanup-u-1")]


def test_the_cleanup_job_waits_until_no_pod_of_the_run_runs(monkeypatch):
    """Its Jobs would go only once the MoTRun is gone (after the cleanup Job exists): a branch still
    running could write a checkpoint after the cleanup. So: delete their Jobs, retry until none runs."""
    import kopf
    import pytest

    def pod(job, phase, stage="sft", component=None):
        labels = {"mot.dev/run": "demo", "batch.kubernetes.io/job-name": job}
        if stage:
            labels["mot.dev/stage"] = stage
        if component:
            labels["app.kubernetes.io/component"] = component
        return {"metadata": {"labels": labels}, "status": {"phase": phase}}

    running = {"demo-r1-sft-a-a1": [pod("demo-r1-sft-a-a1", "Running")],
               "demo-r1-sft-b-a1": [pod("demo-r1-sft-b-a1", "Pending")],
               "demo-r1-sft-c-a1": [pod("demo-r1-sft-c-a1", "Succeeded")],   # finished: writes nothing more
               "demo-cleanup-u-1": [pod("demo-cleanup-u-1", "Running", stage=None, component="cleanup")]}
    api = FakeApi(pods=running)
    monkeypatch.setattr(controller, "STATE", controller.ControllerState(
        config=OperatorConfig(default_storage_uri="s3://ckpt"), api=api))
    body = motrun({"storage": {"cleanup": True}})
    with pytest.raises(kopf.TemporaryError) as raised:
        asyncio.run(controller.cleanup_checkpoints(namespace="ns", name="demo", body=body))
    assert str(raised.value) == ("waiting for 2 Pod(s) of ns/demo to stop before its checkpoints are deleted "
                                 "(Jobs demo-r1-sft-a-a1, demo-r1-sft-b-a1 deleted)")
    assert raised.value.delay == controller.CLEANUP_RETRY_SECONDS
    assert api.calls == [("run_pods", "demo"), ("delete", "demo-r1-sft-a-a1"), ("delete", "demo-r1-sft-b-a1")]

    api.pods = {"demo-r1-sft-c-a1": running["demo-r1-sft-c-a1"]}  # the garbage collector took the others
    api.calls.clear()
    asyncio.run(controller.cleanup_checkpoints(namespace="ns", name="demo", body=body))
    assert api.calls == [("run_pods", "demo"), ("create", "demo-cleanup-u-1")]


def test_a_deleted_run_leaves_nothing_behind(monkeypatch):
    state = controller.ControllerState(config=OperatorConfig(default_storage_uri="s3://ckpt"), api=FakeApi())
    monkeypatch.setattr(controller, "STATE", state)
    meta = {"name": "demo", "namespace": "ns", "generation": 1}

    async def life():
        state.waker("ns", "demo")  # the daemon starts
        await controller.run_changed(type="ADDED", namespace="ns", name="demo", meta=meta)
        await kube_executor.reconcile(motrun(), {}, {}, state)
        assert state.created  # its Jobs, until the watch shows them: it never will, once they are old
        state.created = {job: at - kube_executor.RECENT_CREATE_SECONDS for job, at in state.created.items()}
        await controller.run_changed(type="MODIFIED", namespace="ns", name="demo",
                                     meta={**meta, "deletionTimestamp": NOW})
        state.drop_waker("ns", "demo")  # the daemon exits
        await controller.run_changed(type="DELETED", namespace="ns", name="demo",
                                     meta={**meta, "deletionTimestamp": NOW})

    asyncio.run(life())
    assert (state.generations, state.wakers, state.by_label, state.disrupted, state.progress, state.specs,
            state.created) == ({}, {}, {}, {}, {}, {}, {})


class FailingCreates(FakeApi):
    """Create answers with `errors` (ApiExceptions) first, then as FakeApi does."""

    def __init__(self, *errors, **kwargs):
        super().__init__(**kwargs)
        self.errors = list(errors)

    async def create(self, obj):
        if self.errors:
            self.calls.append(("create failed", obj["metadata"]["name"]))
            raise self.errors.pop(0)
        return await super().create(obj)


def api_error(status, reason, body=None):
    from kubernetes.client.exceptions import ApiException

    error = ApiException(status=status, reason=reason)
    error.body = json.dumps(body or {"kind": "Status", "code": status, "message": f"{reason} (test)"})
    return error


def test_cleanup_on_delete_is_retried_until_the_job_exists(monkeypatch, caplog):
    import kopf
    import pytest

    api = FailingCreates(api_error(500, "Internal Server Error"))
    monkeypatch.setattr(controller, "STATE", controller.ControllerState(
        config=OperatorConfig(default_storage_uri="s3://ckpt"), api=api))
    body = motrun({"storage": {"cleanup": True}})
    with pytest.raises(kopf.TemporaryError) as raised:  # Kopf keeps the finalizer and calls again
        asyncio.run(controller.cleanup_checkpoints(namespace="ns", name="demo", body=body))
    assert raised.value.delay == controller.CLEANUP_RETRY_SECONDS
    assert "HTTP 500 Internal Server Error" in str(raised.value)
    with caplog.at_level("INFO", logger="mot_operator.controller"):
        asyncio.run(controller.cleanup_checkpoints(namespace="ns", name="demo", body=body))
        # A retry after a create that did land (its answer lost): AlreadyExists is success.
        asyncio.run(controller.cleanup_checkpoints(namespace="ns", name="demo", body=body))
    assert [c for c in api.calls if c[0] != "run_pods"] == [
        ("create failed", "demo-cleanup-u-1"), ("create", "demo-cleanup-u-1"), ("create", "demo-cleanup-u-1")]
    assert [r.getMessage() for r in caplog.records] == [
        "MoTRun ns/demo deleted: cleanup Job demo-cleanup-u-1 created",
        "MoTRun ns/demo deleted: cleanup Job demo-cleanup-u-1 already exists"]


def test_cleanup_gives_up_in_a_namespace_being_deleted(monkeypatch, caplog):
    """There the API server refuses every new object: retrying would hold the namespace forever."""
    import kopf
    import pytest

    terminating = api_error(403, "Forbidden", {
        "kind": "Status", "code": 403, "reason": "Forbidden",
        "message": 'jobs.batch "demo-cleanup-u-1" is forbidden: unable to create new content in namespace ns '
                   "because it is being terminated",
        "details": {"causes": [{"reason": "NamespaceTerminating", "field": "metadata.namespace"}]}})
    api = FailingCreates(terminating, api_error(403, "Forbidden"))
    monkeypatch.setattr(controller, "STATE", controller.ControllerState(
        config=OperatorConfig(default_storage_uri="s3://ckpt"), api=api))
    body = motrun({"storage": {"cleanup": True}})
    with caplog.at_level("WARNING", logger="mot_operator.controller"):
        asyncio.run(controller.cleanup_checkpoints(namespace="ns", name="demo", body=body))
    assert "checkpoints are kept" in caplog.text and "being terminated" in caplog.text
    with pytest.raises(kopf.TemporaryError):  # any other refusal (RBAC, say) may be fixed: retried
        asyncio.run(controller.cleanup_checkpoints(namespace="ns", name="demo", body=body))


def test_the_deletion_handler_only_takes_deleted_runs_that_ask_for_cleanup():
    cleanup = {"storage": {"cleanup": True}}
    assert controller._deleted_with_cleanup(meta={"deletionTimestamp": NOW}, spec=cleanup)
    assert not controller._deleted_with_cleanup(meta={}, spec=cleanup)
    assert not controller._deleted_with_cleanup(meta={"deletionTimestamp": NOW}, spec={"storage": {}})
    assert not controller._deleted_with_cleanup(meta={"deletionTimestamp": NOW}, spec={})


def test_a_job_seen_finished_before_its_pod_is_read_when_the_pod_has_ended():
    """Jobs and Pods come through two watches: a Job's Complete may arrive while its Pod still looks
    Running. The branch is then left as it was until the Pod's own event (which wakes the daemon)."""
    status, _ = reconcile(motrun(NO_PREFLIGHT), FakeApi())
    done = {"conditions": [cond("Complete")], "completionTime": NOW}
    jobs = [job_body(status=done), job_body(name="demo-r1-sft-b-a1", teacher="b", status=done)]
    b_done = [pod_body(0, json.dumps({"final_loss": 0.5}), job="demo-r1-sft-b-a1")]
    api = FakeApi(existing={"demo-r1-sft-a-a1", "demo-r1-sft-b-a1"},
                  pods={"demo-r1-sft-a-a1": [live_pod(phase="Running")], "demo-r1-sft-b-a1": b_done})
    status, _ = reconcile(motrun(NO_PREFLIGHT, status=status), api, jobs=jobs)
    assert status["rounds"][0]["branches"]["a"]["state"] == "Running"
    assert not [c for c in api.calls if c[0] == "create"]
    api = FakeApi(existing=api.existing, pods={"demo-r1-sft-a-a1": [pod_body(0, json.dumps({"final_loss": 0.25}))],
                                               "demo-r1-sft-b-a1": b_done})
    status, _ = reconcile(motrun(NO_PREFLIGHT, status=status), api, jobs=jobs)
    assert [c[1] for c in api.calls if c[0] == "create"] == ["demo-r1-merge-a1"]
    assert [b["loss"] for b in status["rounds"][0]["branches"].values()] == [0.25, 0.5]


def test_a_failed_jobs_message_is_read_before_deciding():
    status, _ = reconcile(motrun(NO_PREFLIGHT), FakeApi())
    failed = {"conditions": [cond("Failed", "PodFailurePolicy", "exit code 2")]}
    api = FakeApi(existing={"demo-r1-sft-a-a1", "demo-r1-sft-b-a1"},
                  pods={"demo-r1-sft-a-a1": [pod_body(2, "data.jsonl: line 1 is not JSON")]})
    status, _ = reconcile(motrun(NO_PREFLIGHT, status=status), api, jobs=[job_body(status=failed)])
    assert status["phase"] == "Failed" and "line 1 is not JSON" in status["message"]


def test_a_branch_finishing_before_the_others_is_recorded_in_one_status_write():
    """Only a round's last branch may start the merge; an earlier one's loss is read in the same pass."""
    status, jobs, api = first_branch_done()
    status, _ = reconcile(motrun(NO_PREFLIGHT, status=status), api, jobs=jobs)
    assert [c[0] for c in api.calls if c[0] in ("run_pods", "patch_status")] == ["patch_status"]
    assert status["rounds"][0]["branches"]["a"]["loss"] == 0.25


# ---------------------------------------------------------------------------------------------
# The preflight Job


def test_observe_a_preflight_job_reads_its_report_from_the_termination_message():
    done = {"conditions": [cond("Complete")], "completionTime": NOW, "startTime": "2026-01-01T00:00:02Z"}
    obs = observe.observe_job(preflight_body(status=done), [pod_body(0, compact(PREFLIGHT_REPORT), job=PREFLIGHT)])
    assert (obs.name, obs.stage, obs.round, obs.teacher, obs.attempt) == (PREFLIGHT, "preflight", 0, None, 1)
    assert obs.state == "Succeeded" and obs.metrics == PREFLIGHT_REPORT
    assert obs.finished_at == datetime(2026, 1, 1, 0, 0, 10, tzinfo=UTC)
    running = observe.observe_job(preflight_body(status={"active": 1, "ready": 1, "startTime": NOW}))
    assert (running.state, running.metrics) == ("Running", None)


def test_a_preflight_report_of_many_teachers_is_read_whole():
    """The report grows with the teachers (up to 32); the trainer writes up to 4000 characters of it,
    more than the 1024 kept of a failure's message, and a cut JSON would lose every finding."""
    names = [f"teacher-{i:02d}-reasoning-traces" for i in range(32)]
    report = {**PREFLIGHT_REPORT, "teachers": {
        n: {"records": 12000, "p50": 1830, "p95": 3900, "max": 16120, "truncated": 0.0125} for n in names}}
    line = compact(report)
    assert observe.MESSAGE_LIMIT < len(line) <= 4000
    done = {"conditions": [cond("Complete")], "completionTime": NOW}
    obs = observe.observe_job(preflight_body(status=done), [pod_body(0, line, job=PREFLIGHT)])
    assert obs.metrics == report


def test_a_passed_preflight_is_recorded_from_its_pod_and_round_1_starts_in_the_same_pass():
    from mot_operator import metrics

    def count(name, **labels):
        return metrics.REGISTRY.get_sample_value(name, labels) or 0

    created = count("mot_jobs_created_total", stage="preflight")
    succeeded = count("mot_jobs_finished_total", stage="preflight", result="succeeded")
    api = FakeApi()
    status, _ = reconcile(motrun({"queueName": "gpu"}), api)
    preflight_job = api.objects[PREFLIGHT]
    assert preflight_job["metadata"]["labels"]["app.kubernetes.io/component"] == "preflight"
    assert "kueue.x-k8s.io/queue-name" not in preflight_job["metadata"]["labels"]
    assert "suspend" not in preflight_job["spec"]  # runs at once, not through the GPU queue
    assert count("mot_jobs_created_total", stage="preflight") == created + 1
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Progressing"] == "PreflightRunning"

    done = {"conditions": [cond("Complete")], "completionTime": NOW, "startTime": "2026-01-01T00:00:02Z"}
    api = FakeApi(existing={PREFLIGHT}, pods={PREFLIGHT: [pod_body(0, compact(PREFLIGHT_REPORT), job=PREFLIGHT)]})
    status, _ = reconcile(motrun({"queueName": "gpu"}, status=status), api, jobs=[preflight_body(status=done)])
    calls = [c[:2] for c in api.calls if c[0] != "patch_status"]
    assert calls == [("event", "PreflightPassed"), ("event", "BranchStarted"),
                     ("event", "BranchStarted"), ("create", "demo-r1-sft-a-a1"), ("create", "demo-r1-sft-b-a1")]
    assert status["preflight"]["state"] == "Succeeded"
    assert status["preflight"]["teachers"] == PREFLIGHT_REPORT["teachers"]
    assert (status["preflight"]["storage"], status["preflight"]["seconds"]) == ("writable", 41.27)
    assert status["preflight"]["startTime"] == "2026-01-01T00:00:02Z"
    assert api.objects["demo-r1-sft-a-a1"]["spec"]["suspend"] is True  # the branches are queued
    assert count("mot_jobs_finished_total", stage="preflight", result="succeeded") == succeeded + 1


def test_a_preflight_exiting_2_fails_the_run_and_no_branch_job_is_created():
    status, _ = reconcile(motrun(), FakeApi())
    failed = {"conditions": [cond("Failed", "PodFailurePolicy", "exit code 2")]}
    reason = "invalid input: teacher b: s3://d/b line 3: not JSON"
    api = FakeApi(existing={PREFLIGHT}, pods={PREFLIGHT: [pod_body(2, reason, job=PREFLIGHT)]})
    status, _ = reconcile(motrun(status=status), api, jobs=[preflight_body(status=failed)])
    assert status["phase"] == "Failed"
    # "invalid input" said once: the trainer's prefix is dropped from the message, kept in failure.reason
    assert status["message"] == ("preflight failed after 1 attempt, invalid input: not retried: "
                                 "teacher b: s3://d/b line 3: not JSON")
    assert status["failure"] == {"stage": "preflight", "attempts": 1, "reason": reason}
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Failed"] == "PreflightFailed"
    assert not [c for c in api.calls if c[0] == "create"]
    assert [c[1] for c in api.calls if c[0] == "event"] == ["PreflightFailed", "Failed"]


# ---------------------------------------------------------------------------------------------
# Why a stage waits, what ended it, and its progress (from the Pod index)

STARTED = {"active": 1, "startTime": NOW}
UNSCHEDULABLE = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}
SCHEDULED = {"type": "PodScheduled", "status": "True"}


def started_round():
    status, _ = reconcile(motrun(NO_PREFLIGHT), FakeApi())
    return status


def test_a_pod_the_scheduler_cannot_place_is_the_runs_reason_and_an_event():
    api = FakeApi(existing={"demo-r1-sft-a-a1", "demo-r1-sft-b-a1"},
                  pods={"demo-r1-sft-a-a1": [live_pod(conditions=[UNSCHEDULABLE])]})
    jobs = [job_body(status=STARTED), job_body(name="demo-r1-sft-b-a1", teacher="b", status=STARTED)]
    status, _ = reconcile(motrun(NO_PREFLIGHT, status=started_round()), api, jobs=jobs)
    assert status["rounds"][0]["branches"]["a"]["waiting"]["reason"] == "Unschedulable"
    assert status["rounds"][0]["branches"]["b"]["waiting"]["reason"] == "PodPending"  # no Pod yet
    assert status["reason"] == "Unschedulable" and "Insufficient nvidia.com/gpu" in status["message"]
    assert ("event", "Unschedulable") in api.calls


def test_container_waiting_reasons_are_read_as_the_kubelet_reports_them():
    pull = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x.invalid/t:1"'}
    obs = observe.observe_job(job_body(status=STARTED), [live_pod(conditions=[SCHEDULED], waiting=pull)])
    assert obs.state == "Pending" and obs.waiting == pull
    creating = {"reason": "ContainerCreating"}
    obs = observe.observe_job(job_body(status=STARTED), [live_pod(conditions=[SCHEDULED], waiting=creating)])
    assert obs.waiting == {"reason": "ContainerCreating", "message": ""}
    # A stuck Pod is told over a starting one (an Indexed Job's ranks).
    obs = observe.observe_job(job_body(status=STARTED), [
        live_pod(conditions=[SCHEDULED], waiting=creating), live_pod(conditions=[SCHEDULED], waiting=pull)])
    assert obs.waiting["reason"] == "ImagePullBackOff"
    assert observe.observe_job(job_body(status={}), [live_pod(conditions=[UNSCHEDULABLE])]).waiting is None


def test_an_oom_killed_pod_names_the_cause_and_the_memory_limit():
    failed = job_body(status={"conditions": [cond("Failed", "BackoffLimitExceeded", "Job has reached the limit")]})
    pod = pod_body(137, "", reason="OOMKilled")
    pod["spec"] = {"containers": [{"name": "trainer", "resources": {"limits": {"memory": "8Gi"}}}]}
    obs = observe.observe_job(failed, [pod])
    assert obs.reason == "OOMKilled" and not obs.permanent
    assert obs.message == ("OOMKilled: the trainer container of Pod demo-r1-sft-a-a1-x used more than its memory "
                           "limit (8Gi) and was killed (exit code 137)")
    deadline = job_body(status={"conditions": [cond("Failed", "DeadlineExceeded", "active too long")]})
    assert observe.observe_job(deadline, []).reason == "DeadlineExceeded"


def test_a_disrupted_pod_is_remembered_from_its_event_and_told_once(monkeypatch):
    api = FakeApi(existing={"demo-r1-sft-a-a1", "demo-r1-sft-b-a1"})
    state = new_state(api)
    monkeypatch.setattr(controller, "STATE", state)
    preempted = live_pod(phase="Failed", conditions=[
        {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
         "message": "Kubernetes Scheduler: preempting to accommodate a higher priority pod"}])
    labels = preempted["metadata"]["labels"]
    asyncio.run(controller.pod_changed(namespace="ns", labels=labels, body=preempted))
    jobs = [job_body(status=STARTED), job_body(name="demo-r1-sft-b-a1", teacher="b", status=STARTED)]
    status, _ = reconcile(motrun(NO_PREFLIGHT, status=started_round()), api, jobs=jobs, state=state)
    entry = status["rounds"][0]["branches"]["a"]
    assert entry["disruptions"][0]["pod"] == "demo-r1-sft-a-a1-p" and entry["disruptions"][0]["reason"] == "Preempted"
    # The replacement has no Pod yet: the stage waits because of the preemption.
    assert entry["waiting"]["reason"] == "Preempted" and status["reason"] == "Preempted"
    api.calls.clear()
    reconcile(motrun(NO_PREFLIGHT, status=status), api, jobs=jobs, state=state)
    assert ("event", "BranchDisrupted") not in api.calls


def test_progress_is_read_from_the_rank_0_pod_once_per_interval():
    record = {"step": 3, "totalSteps": 10, "loss": 0.9, "learningRate": 1e-3, "tokensPerSecond": 500.0,
              "etaSeconds": 14.0, "time": "2026-01-01T00:00:09Z"}
    url = "http://127.1.0.7:9090/progress"
    api = FakeApi(existing={"demo-r1-sft-a-a1", "demo-r1-sft-b-a1"}, records={url: record},
                  pods={"demo-r1-sft-a-a1": [live_pod(phase="Running", ip="127.1.0.7")]})
    state = new_state(api, progress_interval_seconds=60)
    running = {"active": 1, "ready": 1, "startTime": NOW}
    jobs = [job_body(status=running), job_body(name="demo-r1-sft-b-a1", teacher="b", status=STARTED)]
    status, result = reconcile(motrun(NO_PREFLIGHT, status=started_round()), api, jobs=jobs, state=state)
    assert status["rounds"][0]["branches"]["a"]["progress"]["step"] == 3
    assert status["progress"]["fraction"] == 0.03  # 3 of 1 round x 2 branches x 50 steps (the default)
    assert result.requeue_after == 60  # read again in an interval
    assert [c for c in api.calls if c[0] == "progress"] == [("progress", url)]
    reconcile(motrun(NO_PREFLIGHT, status=status), api, jobs=jobs, state=state)
    assert len([c for c in api.calls if c[0] == "progress"]) == 1, "not again within the interval"


def test_a_job_queued_by_kueue_says_why_from_its_workload():
    workload = {"status": {"conditions": [{"type": "QuotaReserved", "status": "False", "reason": "Pending",
                                           "message": "couldn't assign flavors to pod set main: insufficient "
                                                      "quota for nvidia.com/gpu in flavor default"}]}}
    api = FakeApi(existing={"demo-r1-sft-a-a1", "demo-r1-sft-b-a1"}, workloads=[workload])
    spec = {**NO_PREFLIGHT, "queueName": "gpu"}
    status, _ = reconcile(motrun(spec), FakeApi())
    queued = job_body(suspend=True)
    queued["metadata"]["uid"] = "job-uid-a"
    jobs = [queued, job_body(name="demo-r1-sft-b-a1", teacher="b", suspend=True)]
    status, _ = reconcile(motrun(spec, status=status), api, jobs=jobs)
    waiting = status["rounds"][0]["branches"]["a"]["waiting"]
    assert waiting["reason"] == "WaitingForAdmission"
    assert waiting["message"] == ("LocalQueue 'gpu': couldn't assign flavors to pod set main: insufficient quota "
                                  "for nvidia.com/gpu in flavor default")
    assert status["rounds"][0]["branches"]["b"]["waiting"]["message"] == (
        "queued in LocalQueue 'gpu', waiting for Kueue to admit it")  # no uid known: no Workload read
    assert status["reason"] == "WaitingForAdmission" and ("workloads", "job-uid-a") in api.calls


# --- the GPU memory from the nodes' labels (NVIDIA GPU Feature Discovery), for the preflight ---------

MIB = 1024 ** 2
GPU_NODES = [
    {"nvidia.com/gpu.memory": "81559", "pool": "a100", "kubernetes.io/hostname": "n1"},
    {"nvidia.com/gpu.memory": "143771", "pool": "h200", "kubernetes.io/hostname": "n2"},
    {"nvidia.com/gpu.memory": "24564", "pool": "l4", "kubernetes.io/hostname": "n3"},
    {"nvidia.com/gpu.memory": "", "pool": "h200"},  # not digits: not a size
    {"pool": "cpu"},  # no label
]


def test_the_largest_gpu_the_node_selector_allows_from_the_node_labels():
    largest = kube_executor.largest_gpu_memory
    assert largest(GPU_NODES, {}) == 143771 * MIB  # no nodeSelector: every labelled node
    assert largest(GPU_NODES, {"pool": "a100"}) == 81559 * MIB
    assert largest(GPU_NODES, {"pool": "l4", "kubernetes.io/hostname": "n3"}) == 24564 * MIB
    assert largest(GPU_NODES, {"pool": "l4", "kubernetes.io/hostname": "n1"}) is None  # no node matches
    assert largest(GPU_NODES, {"pool": "cpu"}) is None  # matches, without the label: unknown
    assert largest([], {}) is None


class NodeApi(FakeApi):
    def __init__(self, nodes=(), fail=False):
        super().__init__()
        self.nodes_list = [{"metadata": {"name": f"n{i}", "labels": labels}} for i, labels in enumerate(nodes)]
        self.fail = fail

    async def nodes(self, label):
        self.calls.append(("nodes", label))
        if self.fail:
            raise RuntimeError("403 Forbidden: nodes is forbidden")
        return self.nodes_list


def preflight_args(api):
    return next(obj for name, obj in api.objects.items() if name == PREFLIGHT)["spec"]["template"]["spec"][
        "containers"][0]["args"]


def test_reconcile_passes_the_gpu_memory_to_the_preflight_and_lists_nodes_once_a_minute():
    api = NodeApi(GPU_NODES)
    state = new_state(api)
    body = motrun({"resources": {"branch": {"gpus": 2, "nodeSelector": {"pool": "a100"}}}})
    reconcile(body, api, state=state)
    args = preflight_args(api)
    assert args[args.index("--gpu-memory") + 1] == str(81559 * MIB) and args[args.index("--gpus") + 1] == "2"
    assert api.calls.count(("nodes", "nvidia.com/gpu.memory")) == 1
    other = motrun({"resources": {"branch": {"gpus": 1}}})
    other["metadata"].update(name="other", uid="u-2")
    asyncio.run(kube_executor.reconcile(other, {}, {}, state, pod_index={}))
    assert api.calls.count(("nodes", "nvidia.com/gpu.memory")) == 1  # within the minute: the cached list


def test_no_gpu_memory_when_turned_off_unlisted_or_the_branch_has_no_gpu():
    for api, config, branch in ((NodeApi(GPU_NODES), {"gpu_memory_from_node_labels": False}, {"gpus": 1}),
                                (NodeApi(fail=True), {}, {"gpus": 1}),  # no RBAC (a namespaced install)
                                (NodeApi([{"pool": "cpu"}]), {}, {"gpus": 1}),
                                (NodeApi(GPU_NODES), {}, {"gpus": 0})):
        reconcile(motrun({"resources": {"branch": branch}}), api, state=new_state(api, **config))
        assert "--gpu-memory" not in preflight_args(api)
        assert api.calls.count(("nodes", "nvidia.com/gpu.memory")) == (0 if config or not branch["gpus"] else 1)
    # Once the preflight passed (or with none), the nodes are not listed at all.
    api = NodeApi(GPU_NODES)
    reconcile(motrun({"resources": {"branch": {"gpus": 1}}, **NO_PREFLIGHT}), api)
    assert ("nodes", "nvidia.com/gpu.memory") not in api.calls

"""Multi-node branches as one gang per attempt (docs/architecture.md, "Multi-node branches: one gang
per attempt"), without a cluster: what runs a branch (spec.resources.branch.backend and the operator's
--jobset), the plain Job's and the JobSet's failure policies, reading a gang's end (disrupted,
invalid input, which rank failed first), the planner's uncounted attempt after a disruption, JobSet
restarts, and the executor observing and acting on JobSets."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime, timedelta

import kubernetes_validate
import pytest

from mot_operator import controller, kube_executor, naming, observe
from mot_operator import jobs as jobrender
from mot_operator.controller_state import ControllerState
from mot_operator.jobs import OperatorConfig, render
from mot_operator.planner import POD_GONE_POLL_SECONDS, ObservedJob, RunRef, plan
from mot_operator.spec import parse_spec

K8S_VERSION = "1.30.0"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
NOW = "2026-01-01T00:00:10Z"
RUN = RunRef(namespace="ns", name="demo", uid="uid-1", generation=1)
CONFIG = OperatorConfig(default_image="registry.local/mot-trainer:test", default_storage_uri="s3://ckpt")
JOB = "demo-r1-sft-a-a1"  # branch a's first attempt, whatever runs it
# The Job controller's Failed condition messages when a podFailurePolicy FailJob rule ends a Job
# (kubernetes pkg/controller/job), for rule 0 (DisruptionTarget) and rule 1 (exit code 2).
DISRUPTION_MESSAGE = f"Pod ns/{JOB}-1-x7k2p has condition DisruptionTarget matching FailJob rule at index 0"
INVALID_INPUT_MESSAGE = (f"Container trainer for pod ns/{JOB}-0-q8d7r failed with exit code 2 matching "
                         "FailJob rule at index 1")
# Kubernetes' DNS-1035 label: what JobSet's webhook requires of its generated Job and Pod names.
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# JobSet's webhook: a failure policy rule's name (jobset.x-k8s.io/v1alpha2 FailurePolicyRule.name).
JOBSET_RULE_NAME = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")


def gang_spec(backend="auto", nodes=2, gpus=8, **overrides):
    """One teacher, one round, no preflight; branch a on `nodes` nodes, run by `backend`."""
    spec = {"student": "s3://m/student", "teachers": [{"name": "a", "dataset": "s3://d/a"}], "rounds": 1,
            "storage": {"uri": "s3://ckpt"}, "preflight": {"enabled": False}, "maxRetries": 0,
            "retryBackoffSeconds": 10,
            "resources": {"branch": {"nodes": nodes, "gpus": gpus, "backend": backend}}}
    spec.update(overrides)
    return parse_spec(spec)


def branch_request(spec, jobset, run=RUN):
    """The request for branch a's first attempt."""
    (request,) = [r for r in plan(run, spec, {}, [], T0, jobset=jobset).create if r.stage == "sft"]
    return request


def env_of(pod_spec):
    return {e["name"]: e for e in pod_spec["containers"][0]["env"]}


def conditions_of(status):
    return {c["type"]: c for c in status.get("conditions") or []}


# ---------------------------------------------------------------------------------------------
# What runs a multi-node branch: spec.resources.branch.backend and the operator's --jobset


@pytest.mark.parametrize(("backend", "jobset", "kind"), [
    ("auto", True, "JobSet"),
    ("auto", False, "Job"),
    ("auto", None, "Job"),  # no cluster (`mot run`)
    ("job", True, "Job"),
    ("jobset", True, "JobSet"),
])
def test_the_backend_and_the_operator_choose_what_runs_a_multinode_branch(backend, jobset, kind):
    result = plan(RUN, gang_spec(backend), {}, [], T0, jobset=jobset)
    assert [(r.stage, r.kind) for r in result.create] == [("sft", kind)]
    assert result.status["phase"] != "Failed"


def test_single_node_branches_merges_and_evals_are_always_plain_jobs():
    assert branch_request(gang_spec("jobset", nodes=1), jobset=True).kind == "Job"
    spec = gang_spec("jobset", evaluation={"dataset": "s3://d/eval"})
    status, jobs, kinds = {}, [], {}
    for _ in range(4):  # round 0's eval and the branch, the merge, round 1's eval
        result = plan(RUN, spec, status, jobs, T0, jobset=True)
        kinds.update({r.stage: r.kind for r in result.create})
        status = result.status
        jobs += [ObservedJob(r.name, r.stage, r.round, r.teacher, r.attempt, "Succeeded",
                             metrics={"final_loss": 1.0, "accuracy": 0.5}) for r in result.create]
    assert kinds == {"sft": "JobSet", "merge": "Job", "eval": "Job"}


def test_backend_jobset_fails_the_run_naming_the_field_where_the_operator_runs_no_jobsets():
    result = plan(RUN, gang_spec("jobset"), {}, [], T0, jobset=False)
    assert result.create == []
    assert result.status["phase"] == "Failed"
    assert "spec.resources.branch.backend" in result.status["message"]
    assert conditions_of(result.status)["Failed"]["reason"] == "JobSetUnavailable"
    assert [e.reason for e in result.events] == ["Failed"]


def test_backend_jobset_fails_nothing_where_no_cluster_runs_the_jobs():
    result = plan(RUN, gang_spec("jobset"), {}, [], T0, jobset=None)
    assert result.status["phase"] != "Failed"
    assert [r.stage for r in result.create] == ["sft"]


def test_jobset_names_are_shortened_to_the_jobset_limit():
    long_run = RunRef(namespace="ns", name="a-rather-long-motrun-name-for-a-big-model", uid="u")
    spec = gang_spec("jobset", teachers=[{"name": "deepseek-r1-distill", "dataset": "d"}])
    request = branch_request(spec, jobset=True, run=long_run)
    assert request.kind == "JobSet"
    assert len(request.name) <= naming.MAX_JOBSET_NAME < naming.MAX_INDEXED_JOB_NAME
    assert request.name.startswith("a-rather-long-motrun")
    # The leader's hostname `<jobset>-node-0-0` fits in a DNS label.
    assert len(jobrender.leader_address(request, "ns").split(".")[0]) <= 63


@pytest.mark.parametrize("run_name", [
    "demo",
    "a-rather-long-motrun-name-for-a-big-model",
    "1st-run",
])
def test_jobset_names_give_the_dns_1035_job_and_pod_names_jobsets_webhook_requires(run_name):
    spec = gang_spec("jobset", nodes=4)
    name = branch_request(spec, jobset=True, run=RunRef(namespace="ns", name=run_name, uid="u")).name
    job = f"{name}-{jobrender.JOBSET_REPLICATED_JOB}-0"  # placement.GenJobName(jobset, "node", 0)
    pod = f"{job}-3-abcde"  # GenPodName(..., last pod index) plus the webhook's 5-character suffix
    for generated in (job, pod):
        assert len(generated) <= 63 and DNS_1035.match(generated), generated


# ---------------------------------------------------------------------------------------------
# Rendering: the plain Indexed Job and the JobSet


def test_a_multinode_job_ends_its_whole_attempt_on_a_disruption():
    spec = gang_spec("job", nodes=3)
    request = branch_request(spec, jobset=False)
    service, job = render(request, spec, RUN, CONFIG)
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    job_spec = job["spec"]
    rules = job_spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[1]["action"] == "FailJob"
    assert rules[1]["onExitCodes"] == {"containerName": "trainer", "operator": "In", "values": [2]}
    assert job_spec["backoffLimit"] == 0 and job_spec["parallelism"] == 3
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    pod = job_spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]
    env = env_of(pod)
    leader = jobrender.leader_address(request, "ns")
    assert leader == f"{JOB}-0.{service['metadata']['name']}.ns.svc"
    assert env["MASTER_ADDR"]["value"] == env["PET_MASTER_ADDR"]["value"] == leader


def test_a_single_node_job_ignores_a_disruption_and_its_job_replaces_the_pod():
    spec = gang_spec("job", nodes=1)
    (job,) = render(branch_request(spec, jobset=False), spec, RUN, CONFIG)
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "Ignore" and rules[0]["onPodConditions"][0]["type"] == "DisruptionTarget"
    assert rules[1]["action"] == "FailJob"


def test_a_jobset_holds_the_gangs_indexed_job_and_carries_what_the_job_would():
    spec = gang_spec("jobset", nodes=3, ttlSecondsAfterFinished=600)
    request = branch_request(spec, jobset=True)
    (jobset,) = render(request, spec, RUN, CONFIG)  # no Service: the JobSet makes its own
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and jobset["kind"] == "JobSet"
    labels = naming.job_labels("demo", 1, "sft", 1, "a")
    meta = jobset["metadata"]
    assert meta["name"] == JOB and meta["namespace"] == "ns" and meta["labels"] == labels
    assert meta["annotations"] == {jobrender.ANNOTATION_OUTPUT: request.output_uri}
    assert meta["ownerReferences"][0]["uid"] == "uid-1"
    js = jobset["spec"]
    assert js["network"]["enableDNSHostnames"] is True
    assert js["ttlSecondsAfterFinished"] == 600 and "suspend" not in js
    (replicated,) = js["replicatedJobs"]
    assert replicated["name"] == "node" and replicated["replicas"] == 1
    assert set(replicated["template"]) == {"spec"}  # no labels: the operator watches the JobSet
    job_spec = replicated["template"]["spec"]
    assert not {"suspend", "ttlSecondsAfterFinished"} & set(job_spec)
    assert job_spec["completionMode"] == "Indexed" and job_spec["completions"] == job_spec["parallelism"] == 3
    assert job_spec["backoffLimit"] == 0
    assert [r["action"] for r in job_spec["podFailurePolicy"]["rules"]] == ["FailJob", "FailJob"]
    # The Job template is a valid batch/v1 JobSpec.
    kubernetes_validate.validate({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": JOB},
                                  "spec": job_spec}, K8S_VERSION, strict=True)
    assert job_spec["template"]["metadata"]["labels"] == labels
    pod = job_spec["template"]["spec"]
    assert "subdomain" not in pod  # JobSet sets it
    subdomain = js["network"]["subdomain"]
    env = env_of(pod)
    assert env["MASTER_ADDR"]["value"] == env["PET_MASTER_ADDR"]["value"] == f"{JOB}-node-0-0.{subdomain}.ns.svc"
    assert env["NNODES"]["value"] == "3" and env["WORLD_SIZE"]["value"] == "24"


def test_a_jobset_fails_at_once_on_invalid_input_and_restarts_in_place_after_a_disruption():
    spec = gang_spec("jobset")
    (jobset,) = render(branch_request(spec, jobset=True), spec, RUN, CONFIG)
    policy = jobset["spec"]["failurePolicy"]
    assert policy["maxRestarts"] == 0 and policy["restartStrategy"] == "BlockingRecreate"
    invalid, disruption = policy["rules"]
    assert invalid["action"] == "FailJobSet" and invalid["onJobFailureReasons"] == ["PodFailurePolicy"]
    assert disruption["action"] == "RestartJobSetAndIgnoreMaxRestarts"
    assert disruption["onJobFailureReasons"] == ["PodFailurePolicy"]

    def matches(rule, message):  # JobSet matches with Go's regexp.MatchString: a search
        return any(re.search(p, message) for p in rule["onJobFailureMessagePatterns"])

    assert matches(invalid, INVALID_INPUT_MESSAGE) and not matches(invalid, DISRUPTION_MESSAGE)
    assert matches(disruption, DISRUPTION_MESSAGE) and not matches(disruption, INVALID_INPUT_MESSAGE)
    for code in (12, 20, 255):  # other exit codes are failures, not invalid input
        assert not matches(invalid, INVALID_INPUT_MESSAGE.replace("exit code 2 ", f"exit code {code} "))


def test_jobset_failure_rule_names_are_valid_for_jobsets_webhook():
    spec = gang_spec("jobset")
    (jobset,) = render(branch_request(spec, jobset=True), spec, RUN, CONFIG)
    names = [rule["name"] for rule in jobset["spec"]["failurePolicy"]["rules"]]
    assert len(set(names)) == len(names)
    assert all(JOBSET_RULE_NAME.match(name) for name in names), names


def test_a_jobset_queued_by_kueue_is_suspended_with_its_queue_label():
    spec = gang_spec("jobset", queueName="gpu-queue")
    (jobset,) = render(branch_request(spec, jobset=True), spec, RUN, CONFIG)
    assert jobset["metadata"]["labels"][naming.LABEL_QUEUE] == "gpu-queue"
    assert jobset["spec"]["suspend"] is True
    job_spec = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert "suspend" not in job_spec
    assert naming.LABEL_QUEUE not in job_spec["template"]["metadata"]["labels"]


# ---------------------------------------------------------------------------------------------
# Observing a gang's end


def labels_of(attempt=1):
    return naming.job_labels("demo", 1, "sft", attempt, "a")


def gang_job(status=None, parallelism=2, name=JOB):
    """A branch's Indexed Job as the Job index holds it."""
    return {"metadata": {"name": name, "labels": labels_of()},
            "spec": {"suspend": False, "parallelism": parallelism}, "status": status or {}}


def ended(reason, message, kind="Failed"):
    """A Job status with one True condition (Failed, FailureTarget, Complete)."""
    return {"startTime": NOW, "conditions": [{"type": kind, "status": "True", "reason": reason, "message": message,
                                              "lastTransitionTime": NOW}]}


def rank(index, exit_code=None, message="", *, finished=NOW, deleting=False, phase=None, jobset=None, restart=0,
         term_reason=None, started=None, conditions=()):
    """A Pod of branch a's gang (of its Job, or of its JobSet's Job at restart `restart`): running, or
    ended with `exit_code` and the trainer's termination `message`."""
    labels = {**labels_of(), naming.LABEL_JOB_NAME: JOB}
    name = f"{JOB}-{index}-p{index:04d}"
    if jobset:
        labels.update({naming.LABEL_JOBSET_NAME: jobset, naming.LABEL_JOB_NAME: f"{jobset}-node-0",
                       naming.LABEL_JOBSET_RESTART: str(restart)})
        name = f"{jobset}-node-0-{index}-r{restart}{index:03d}"
    meta = {"name": name, "labels": labels,
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}}
    if deleting:
        meta["deletionTimestamp"] = NOW
    if exit_code is None:
        phase = phase or "Running"
        state = {"running": {}} if phase == "Running" else {}
    else:
        phase = phase or ("Succeeded" if exit_code == 0 else "Failed")
        reason = term_reason or ("Completed" if exit_code == 0 else "Error")
        state = {"terminated": {"exitCode": exit_code, "reason": reason, "message": message, "finishedAt": finished}}
    status = {"phase": phase, "conditions": list(conditions),
              "containerStatuses": [{"name": "trainer", "state": state}] if state else []}
    if started:
        status["startTime"] = started
    return {"metadata": meta, "spec": {"containers": [{"name": "trainer"}]}, "status": status}


@pytest.mark.parametrize("condition", ["Failed", "FailureTarget"])
def test_a_gang_job_ended_by_a_disruption_is_disrupted_not_failed(condition):
    pods = [rank(0, 143, deleting=True), rank(1, deleting=True)]  # rank 1 still stopping
    obs = observe.observe_job(gang_job(ended("PodFailurePolicy", DISRUPTION_MESSAGE, condition)), pods)
    assert obs.state == "Failed" and obs.gang
    assert obs.disrupted and not obs.permanent and obs.reason == "Disrupted"
    assert obs.message == f"the whole attempt ended: {DISRUPTION_MESSAGE}"
    assert obs.pods_left == 1


def test_a_gang_job_ended_by_invalid_input_is_permanent_and_names_the_pod():
    pods = [rank(0, 2, "invalid input: data.jsonl line 3 is not JSON"), rank(1, 143, deleting=True)]
    obs = observe.observe_job(gang_job(ended("PodFailurePolicy", INVALID_INPUT_MESSAGE)), pods)
    assert obs.permanent and not obs.disrupted
    assert obs.message == f"Pod {JOB}-0-p0000 (exit code 2, Error): invalid input: data.jsonl line 3 is not JSON"
    assert obs.pods_left == 0


def test_a_failed_gang_names_the_rank_that_failed_first_not_those_stopped_after_it():
    pods = [
        # Stopped by the Job controller after rank 1 failed (deleted), though its clock says earlier.
        rank(0, 143, "", finished="2026-01-01T00:00:05Z", deleting=True),
        rank(1, 1, "Traceback ...\nRuntimeError: NCCL communicator was aborted", finished="2026-01-01T00:00:07Z"),
        rank(2, 1, "RuntimeError: peer closed", finished="2026-01-01T00:00:09Z"),
        rank(3, deleting=True),  # still stopping
    ]
    obs = observe.observe_job(gang_job(ended("BackoffLimitExceeded", "Job has reached the specified backoff limit"),
                                       parallelism=4), pods)
    assert obs.state == "Failed" and obs.gang and not obs.disrupted and not obs.permanent
    assert obs.message == f"Pod {JOB}-1-p0001 (exit code 1, Error): RuntimeError: NCCL communicator was aborted"
    assert obs.pods_left == 1


def test_a_gang_is_known_by_its_parallelism_and_a_lone_pod_is_not_named():
    failed = ended("BackoffLimitExceeded", "Job has reached the specified backoff limit")
    gang = observe.observe_job(gang_job(failed, parallelism=2), [rank(0, 1, "RuntimeError: boom")])
    assert gang.gang and gang.message == f"Pod {JOB}-0-p0000 (exit code 1, Error): RuntimeError: boom"
    lone = observe.observe_job(gang_job(failed, parallelism=1), [rank(0, 1, "RuntimeError: boom")])
    assert not lone.gang and lone.message == "RuntimeError: boom"


def jobset_body(conditions=(), restarts=0, suspend=False, name=JOB):
    """A branch's JobSet as the JobSet index holds it (controller.jobset_index)."""
    return {"metadata": {"name": name, "uid": "js-uid", "labels": labels_of()}, "spec": {"suspend": suspend},
            "status": {"conditions": [{"type": t, "status": "True", "reason": r, "message": m,
                                       "lastTransitionTime": NOW} for t, r, m in conditions], "restarts": restarts}}


def test_a_completed_jobset_succeeded_with_the_trainers_result():
    pods = [rank(0, 0, json.dumps({"final_loss": 0.5}), jobset=JOB), rank(1, 0, "", jobset=JOB)]
    obs = observe.observe_jobset(jobset_body([("Completed", "AllJobsCompleted", "jobset completed successfully")]),
                                 pods)
    assert obs.state == "Succeeded" and obs.metrics == {"final_loss": 0.5}
    assert (obs.kind, obs.gang, obs.restarts, obs.pods_left) == ("JobSet", True, 0, 0)
    assert (obs.stage, obs.round, obs.teacher, obs.attempt) == ("sft", 1, "a", 1)


def test_a_failed_jobset_is_read_from_the_pods_of_its_current_restart_only():
    pods = [
        rank(0, 1, "RuntimeError: CUDA error: an illegal memory access", jobset=JOB, restart=1),
        rank(1, 143, "", jobset=JOB, restart=1, deleting=True),
        # The attempt before the restart: an older failure, and a rank still going away.
        rank(1, 137, "RuntimeError: the old failure", finished="2026-01-01T00:00:01Z", jobset=JOB, restart=0),
        rank(0, jobset=JOB, restart=0, deleting=True),
    ]
    obs = observe.observe_jobset(jobset_body([("Failed", "FailedJobs", "jobset failed due to one or more job "
                                                                      "failures")], restarts=1), pods)
    assert obs.state == "Failed" and obs.kind == "JobSet" and obs.restarts == 1
    assert not obs.disrupted and not obs.permanent
    assert obs.message == (f"Pod {JOB}-node-0-0-r1000 (exit code 1, Error): "
                           "RuntimeError: CUDA error: an illegal memory access")
    assert obs.pods_left == 1  # every Pod still there counts, of any restart


def test_a_running_jobset_is_not_failed_by_the_pods_of_its_last_restart():
    pods = [rank(0, jobset=JOB, restart=1), rank(1, jobset=JOB, restart=1),
            rank(0, 143, "", jobset=JOB, restart=0), rank(1, 1, "RuntimeError: NCCL timeout", jobset=JOB, restart=0)]
    obs = observe.observe_jobset(jobset_body(restarts=1), pods)
    assert obs.state == "Running" and obs.restarts == 1 and obs.message == ""
    assert observe.observe_jobset(jobset_body(suspend=True), []).state == "Suspended"


# ---------------------------------------------------------------------------------------------
# The planner: a disrupted attempt is not counted; the next waits for every Pod to be gone


class Gang:
    """Plays the cluster around the pure planner with a fake clock: each requested Job or JobSet is
    an ObservedJob (running at once), deleted ones go; the plans' Events are kept."""

    def __init__(self, spec, jobset=False):
        self.spec, self.jobset = spec, jobset
        self.status: dict = {}
        self.jobs: dict[str, ObservedJob] = {}
        self.events = []
        self.now = T0

    def step(self, seconds=1.0):
        self.now += timedelta(seconds=seconds)
        result = plan(RUN, self.spec, self.status, list(self.jobs.values()), self.now, jobset=self.jobset)
        self.status = result.status
        self.events += result.events
        for req in result.create:
            gang = req.stage == "sft" and req.resources.nodes > 1
            self.jobs.setdefault(req.name, ObservedJob(req.name, req.stage, req.round, req.teacher, req.attempt,
                                                       "Running", started_at=self.now, kind=req.kind, gang=gang))
        for name in result.delete:
            self.jobs.pop(name, None)
        return result

    def branch(self):
        return self.status["rounds"][0]["branches"]["a"]

    def disrupt(self, name, pods_left):
        job = self.jobs[name]
        job.state, job.disrupted, job.reason, job.pods_left = "Failed", True, "Disrupted", pods_left
        job.message, job.finished_at = f"the whole attempt ended: {DISRUPTION_MESSAGE}", self.now

    def fail(self, name, message="RuntimeError: NCCL timeout"):
        job = self.jobs[name]
        job.state, job.message, job.finished_at = "Failed", message, self.now

    def told(self, reason):
        return [e for e in self.events if e.reason == reason]


def test_a_disrupted_attempt_starts_again_once_its_pods_are_gone_without_counting():
    gang = Gang(gang_spec("job"))  # maxRetries 0
    gang.step()
    gang.disrupt(JOB, pods_left=2)
    result = gang.step()
    assert result.create == [] and gang.status["phase"] == "Running"
    entry = gang.branch()
    assert entry["state"] == "Retrying" and entry["disruptedAttempts"] == 1
    assert entry["waiting"]["reason"] == "PodsStopping"
    assert entry["waiting"]["message"] == (f"2 Pod(s) of attempt 1 ({JOB}) still stopping; attempt 2 starts when "
                                           "all are gone")
    assert result.requeue_after == POD_GONE_POLL_SECONDS
    (disrupted,) = gang.told("BranchDisrupted")
    assert disrupted.type == "Warning" and f"attempt 1 ({JOB}) ended" in disrupted.message
    assert "not counted as a failed attempt" in disrupted.message
    assert gang.told("BranchFailed") == []

    gang.jobs[JOB].pods_left = 1
    assert gang.step().create == [] and gang.branch()["waiting"]["message"].startswith("1 Pod(s) of attempt 1")
    assert len(gang.told("BranchDisrupted")) == 1  # told once

    gang.jobs[JOB].pods_left = 0
    result = gang.step()
    assert [(r.name, r.kind, r.attempt) for r in result.create] == [("demo-r1-sft-a-a2", "Job", 2)]
    entry = gang.branch()
    assert entry["attempt"] == 2 and entry["disruptedAttempts"] == 1 and "waiting" not in entry
    (restarted,) = gang.told("BranchRestarted")  # a whole-group restart, not a retry
    assert "attempt 2 started (demo-r1-sft-a-a2) after a disruption ended attempt 1" in restarted.message
    assert gang.told("BranchRetried") == []

    gang.jobs["demo-r1-sft-a-a2"].state = "Succeeded"
    assert [r.stage for r in gang.step().create] == ["merge"]


def test_a_disrupted_attempt_whose_pods_are_gone_starts_the_next_in_the_same_pass():
    gang = Gang(gang_spec("job"))
    gang.step()
    gang.disrupt(JOB, pods_left=0)
    result = gang.step()
    assert [r.name for r in result.create] == ["demo-r1-sft-a-a2"]
    assert [e.reason for e in result.events] == ["BranchDisrupted", "BranchRestarted"]


def test_a_failure_after_a_disruption_is_counted():
    gang = Gang(gang_spec("job"))  # maxRetries 0: one counted failure fails the run
    gang.step()
    gang.disrupt(JOB, pods_left=0)
    gang.step()
    gang.fail("demo-r1-sft-a-a2", "RuntimeError: CUDA error: out of memory")
    result = gang.step()
    assert result.create == []
    s = gang.status
    assert s["phase"] == "Failed"
    assert s["failure"] == {"stage": "sft", "round": 1, "teacher": "a", "attempts": 2,
                            "reason": "RuntimeError: CUDA error: out of memory"}
    assert "failed after 2 attempts" in s["message"]


def test_back_off_counts_only_the_failures():
    gang = Gang(gang_spec("job", maxRetries=2, retryBackoffSeconds=10))
    gang.step()
    gang.disrupt(JOB, pods_left=0)
    assert [r.name for r in gang.step().create] == ["demo-r1-sft-a-a2"]  # at once, no back-off
    gang.fail("demo-r1-sft-a-a2")
    result = gang.step()
    assert result.create == [] and result.requeue_after == pytest.approx(10)  # the first failure's wait
    (failed,) = gang.told("BranchFailed")
    assert "attempt 2 of 4 failed: RuntimeError: NCCL timeout; retrying in 10s" in failed.message
    assert gang.step(seconds=5).create == []
    assert [r.name for r in gang.step(seconds=5).create] == ["demo-r1-sft-a-a3"]
    gang.fail("demo-r1-sft-a-a3")
    assert gang.step().requeue_after == pytest.approx(20)
    assert gang.status["phase"] == "Running"


def test_jobset_restarts_are_recorded_and_told_once_per_restart():
    gang = Gang(gang_spec("auto"), jobset=True)
    assert [r.kind for r in gang.step().create] == ["JobSet"]
    jobset = gang.jobs[JOB]
    jobset.restarts = 1
    jobset.disruptions = [{"pod": f"{JOB}-node-0-1-abcde", "reason": "Preempted",
                           "message": "PreemptionByScheduler: preempting to accommodate a higher priority pod"}]
    gang.step()
    assert gang.branch()["restarts"] == 1 and gang.branch()["state"] == "Running"
    (restarted,) = gang.told("BranchRestarted")
    assert restarted.type == "Normal"
    assert f"JobSet {JOB} restarted all its Pods after a disruption (restart 1" in restarted.message
    (disrupted,) = gang.told("BranchDisrupted")
    assert f"Pod {JOB}-node-0-1-abcde was preempted" in disrupted.message
    gang.step()
    assert len(gang.told("BranchRestarted")) == 1 and len(gang.told("BranchDisrupted")) == 1
    jobset.restarts = 2
    gang.step()
    assert gang.branch()["restarts"] == 2 and len(gang.told("BranchRestarted")) == 2
    assert gang.branch()["attempt"] == 1 and "disruptedAttempts" not in gang.branch()


@pytest.mark.parametrize(("kind", "is_gang", "then"), [
    ("Job", False, "its Job replaces it"),
    ("Job", True, "the whole attempt ends and starts again once all its Pods are gone"),
    ("JobSet", True, "JobSet restarts all of the attempt's Pods"),
])
def test_a_disruption_event_says_what_happens_next_for_each_kind(kind, is_gang, then):
    gang = Gang(gang_spec("job"))
    gang.step()
    job = gang.jobs[JOB]
    job.kind, job.gang = kind, is_gang
    job.disruptions = [{"pod": f"{JOB}-1-abcde", "reason": "Evicted", "message": "EvictionByEvictionAPI: drain"}]
    gang.step()
    (disrupted,) = gang.told("BranchDisrupted")
    assert disrupted.message.endswith(f"was evicted: EvictionByEvictionAPI: drain; {then} (not counted as a "
                                      "failed attempt)")


# ---------------------------------------------------------------------------------------------
# The executor: JobSets from their index, with their Pods; acting on them as JobSets


class RecordingApi:
    """The Kubernetes API calls one pass makes, recorded (creates succeed; the kind of what is
    suspended, resumed or deleted is kept)."""

    def __init__(self):
        self.calls = []
        self.created = []

    async def create(self, obj):
        self.created.append((obj["kind"], obj["metadata"]["name"]))
        return True

    async def set_suspend(self, namespace, job, suspend, kind="Job"):
        self.calls.append(("suspend" if suspend else "resume", job, kind))

    async def delete_job(self, namespace, job, kind="Job"):
        self.calls.append(("delete", job, kind))

    async def patch_status(self, namespace, name, patch):
        self.calls.append(("patch_status", name))

    async def progress(self, url):
        return None

    async def workloads(self, namespace, job_uid):
        return []

    def event(self, body, event):
        self.calls.append(("event", event.reason))


def new_state(api, jobset_available=True):
    state = ControllerState(config=OperatorConfig(default_storage_uri="s3://ckpt"), api=api)
    state.jobset_available = jobset_available
    return state


def motrun(status=None, **spec_extra):
    spec = {"student": "s3://m/s", "teachers": [{"name": "a", "dataset": "d"}, {"name": "b", "dataset": "d"}],
            "rounds": 1, "preflight": {"enabled": False}, "resources": {"branch": {"nodes": 2, "gpus": 1}}}
    spec.update(spec_extra)
    return {"apiVersion": "mot.dev/v1alpha1", "kind": "MoTRun",
            "metadata": {"name": "demo", "namespace": "ns", "uid": "u-1", "generation": 1},
            "spec": spec, "status": status or {}}


def index_of(handler, bodies):
    """A Kopf index ({key: [values]}) of `bodies` as the controller's index handler stores them."""
    index = {}
    for body in bodies:
        meta = body["metadata"]
        for key, value in asyncio.run(handler(namespace="ns", name=meta["name"], labels=meta["labels"],
                                              body=body)).items():
            index.setdefault(key, []).append(value)
    return index


def jobset_object(name, teacher, conditions=(), restarts=0, suspend=False):
    """A JobSet body as the API server serves it (labels, spec, status)."""
    labels = naming.job_labels("demo", 1, "sft", 1, teacher)
    return {"apiVersion": jobrender.JOBSET_API_VERSION, "kind": "JobSet",
            "metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}", "labels": labels,
                         "creationTimestamp": NOW},
            "spec": {"suspend": suspend, "replicatedJobs": []},
            "status": {"restarts": restarts, "conditions": [
                {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": NOW}
                for t, r, m in conditions]}}


def reconcile(body, api, state, jobsets=(), jobs=(), pods=()):
    return asyncio.run(kube_executor.reconcile(
        body, body["status"], index_of(controller.job_index, jobs), state,
        pod_index=index_of(controller.pod_index, pods),
        jobset_index=index_of(controller.jobset_index, jobsets)))


def test_observed_jobs_reads_jobsets_with_their_pods_beside_the_jobs():
    failed = [("Failed", "FailedJobs", "jobset failed due to one or more job failures")]
    jobsets = index_of(controller.jobset_index, [jobset_object(JOB, "a", failed)])
    b_job = {"metadata": {"name": "demo-r1-sft-b-a1", "labels": naming.job_labels("demo", 1, "sft", 1, "b")},
             "spec": {"parallelism": 2}, "status": {"active": 2, "ready": 2, "startTime": NOW}}
    jobs = index_of(controller.job_index, [b_job])
    pods = index_of(controller.pod_index, [rank(0, 1, "RuntimeError: boom", jobset=JOB), rank(1, jobset=JOB)])
    state = new_state(RecordingApi())
    observed, _ = asyncio.run(kube_executor.observed_jobs("ns", "demo", jobs, pods, state, gang_spec(), jobsets))
    by_name = {o.name: o for o in observed}
    a, b = by_name[JOB], by_name["demo-r1-sft-b-a1"]
    assert (a.kind, a.state, a.gang, a.pods_left) == ("JobSet", "Failed", True, 1)
    assert a.message == f"Pod {JOB}-node-0-0-r0000 (exit code 1, Error): RuntimeError: boom"
    assert (b.kind, b.state, b.gang) == ("Job", "Running", True)


def test_the_executor_creates_jobsets_and_suspends_resumes_and_deletes_them_as_jobsets():
    api = RecordingApi()
    status, _ = reconcile(motrun(), api, new_state(api))
    assert api.created == [("JobSet", JOB), ("JobSet", "demo-r1-sft-b-a1")]  # no Service beside them
    running = [jobset_object(JOB, "a"), jobset_object("demo-r1-sft-b-a1", "b")]
    pods = [rank(i, jobset=name) for name in (JOB, "demo-r1-sft-b-a1") for i in (0, 1)]

    api = RecordingApi()
    suspended, _ = reconcile(motrun(status, suspend=True), api, new_state(api), jobsets=running, pods=pods)
    assert [c for c in api.calls if c[0] == "suspend"] == [
        ("suspend", JOB, "JobSet"), ("suspend", "demo-r1-sft-b-a1", "JobSet")]

    api = RecordingApi()
    held = [jobset_object(JOB, "a", suspend=True), jobset_object("demo-r1-sft-b-a1", "b", suspend=True)]
    reconcile(motrun(suspended), api, new_state(api), jobsets=held)
    assert [c for c in api.calls if c[0] == "resume"] == [
        ("resume", JOB, "JobSet"), ("resume", "demo-r1-sft-b-a1", "JobSet")]

    # Branch a's input is invalid: the run fails and branch b's JobSet is deleted as a JobSet.
    api = RecordingApi()
    invalid = [jobset_object(JOB, "a", [("Failed", "FailedJobs", "jobset failed due to one or more job failures")]),
               jobset_object("demo-r1-sft-b-a1", "b")]
    pods = [rank(0, 2, "invalid input: data.jsonl line 1 is not JSON", jobset=JOB),
            rank(1, 143, "", jobset=JOB), rank(0, jobset="demo-r1-sft-b-a1")]
    failed, _ = reconcile(motrun(status), api, new_state(api), jobsets=invalid, pods=pods)
    assert failed["phase"] == "Failed" and "line 1 is not JSON" in failed["message"]
    assert [c for c in api.calls if c[0] == "delete"] == [("delete", "demo-r1-sft-b-a1", "JobSet")]


def test_the_executor_starts_a_disrupted_gangs_next_attempt_once_its_pods_are_gone():
    plain = {"resources": {"branch": {"nodes": 2, "gpus": 1, "backend": "job"}}, "maxRetries": 0}
    api = RecordingApi()
    status, _ = reconcile(motrun(**plain), api, new_state(api))
    assert [kind for kind, _ in api.created] == ["Service", "Job", "Service", "Job"]

    def job(name, teacher, status_):
        return {"metadata": {"name": name, "labels": naming.job_labels("demo", 1, "sft", 1, teacher)},
                "spec": {"parallelism": 2}, "status": status_}

    jobs = [job(JOB, "a", ended("PodFailurePolicy", DISRUPTION_MESSAGE)),
            job("demo-r1-sft-b-a1", "b", {"active": 2, "ready": 2, "startTime": NOW})]
    stopping = [rank(0, 143, "", deleting=True), rank(1, deleting=True)]  # the Job controller stops the gang
    api = RecordingApi()
    status, result = reconcile(motrun(status, **plain), api, new_state(api), jobs=jobs, pods=stopping)
    entry = status["rounds"][0]["branches"]["a"]
    assert status["phase"] == "Running" and api.created == []
    assert entry["state"] == "Retrying" and entry["waiting"]["reason"] == "PodsStopping"
    assert ("event", "BranchDisrupted") in api.calls and result.requeue_after == POD_GONE_POLL_SECONDS

    api = RecordingApi()
    status, _ = reconcile(motrun(status, **plain), api, new_state(api), jobs=jobs)  # every Pod gone
    assert api.created == [("Service", "demo-r1-sft-a-a2"), ("Job", "demo-r1-sft-a-a2")]
    assert status["rounds"][0]["branches"]["a"]["attempt"] == 2 and status["phase"] == "Running"


def test_a_started_jobset_whose_pods_cannot_be_scheduled_says_why():
    unschedulable = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}
    # Unscheduled Pods have no startTime: the JobSet started when it was created unsuspended.
    pods = [rank(i, phase="Pending", jobset=JOB, conditions=[unschedulable]) for i in (0, 1)]
    body = jobset_body()
    body["metadata"]["creationTimestamp"] = NOW
    direct = observe.observe_jobset(body, pods)
    assert direct.waiting["reason"] == "Unschedulable"
    # As the operator reads it: the JobSet and its Pods from the indexes.
    state = new_state(RecordingApi())
    (obs,) = asyncio.run(kube_executor.observed_jobs(
        "ns", "demo", {}, index_of(controller.pod_index, pods), state, gang_spec(),
        index_of(controller.jobset_index, [jobset_object(JOB, "a")])))[0]
    assert obs.state == "Pending" and obs.started_at is not None
    assert obs.waiting["reason"] == "Unschedulable"

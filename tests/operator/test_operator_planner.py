"""The pure planner as a table of transitions: happy path, retries, permanent failures, merge/eval
failures, suspend/resume, rounds edited, terminal states, restart with Jobs half created."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta

import pytest

from mot_operator.planner import ObservedJob, RunRef, plan, plan_invalid
from mot_operator.spec import SpecError, parse_spec

T0 = datetime(2026, 1, 1, tzinfo=UTC)
RUN = RunRef(namespace="ns", name="demo", uid="uid-1", generation=1)


def make_spec(**overrides):
    spec = {
        "student": "s3://models/student",
        "teachers": [{"name": "a", "dataset": "s3://d/a"}, {"name": "b", "dataset": "s3://d/b"}],
        "rounds": 2,
        "storage": {"uri": "s3://ckpt"},
        "maxRetries": 1,
        "retryBackoffSeconds": 10,
    }
    spec.update(overrides)
    return parse_spec(spec)


class Cluster:
    """Plays the executor: keeps observed Jobs, applies plans, advances a fake clock."""

    def __init__(self, spec, status=None):
        self.spec = spec
        self.status = status or {}
        self.jobs: dict[str, ObservedJob] = {}
        self.now = T0
        self.events: list[tuple[str, str]] = []
        self.created: list[str] = []
        self.last = None

    def step(self, seconds: float = 1.0):
        self.now += timedelta(seconds=seconds)
        before = copy.deepcopy(self.status)
        result = plan(RUN, self.spec, self.status, list(self.jobs.values()), self.now)
        assert self.status == before, "plan must not mutate its input"
        self.status = result.status
        self.events += [(e.reason, e.message) for e in result.events]
        for req in result.create:
            self.created.append(req.name)
            self.jobs.setdefault(req.name, ObservedJob(req.name, req.stage, req.round, req.teacher, req.attempt,
                                                       "Pending", started_at=self.now))
        for name in result.suspend:
            self.jobs[name].state = "Suspended"
        for name in result.resume:
            self.jobs[name].state = "Running"
        for name in result.delete:
            del self.jobs[name]
        self.last = result
        return result

    def finish(self, name, ok=True, permanent=False, message="", metrics=None):
        job = self.jobs[name]
        job.state = "Succeeded" if ok else "Failed"
        job.permanent = permanent
        job.message = message
        job.metrics = metrics
        job.finished_at = self.now

    def finish_active(self, metrics=None, stage=None):
        for job in list(self.jobs.values()):
            if job.state in ("Pending", "Running") and (stage is None or job.stage == stage):
                self.finish(job.name, metrics=metrics)

    def reasons(self):
        return [r for r, _ in self.events]


def run_to_end(cluster, limit=50):
    for _ in range(limit):
        cluster.step()
        if cluster.status["phase"] in ("Succeeded", "Failed"):
            return
        cluster.finish_active(metrics={"final_loss": 1.25, "accuracy": 0.5})
    raise AssertionError("run did not finish")


def test_happy_path_rounds_branches_merge_eval():
    cluster = Cluster(make_spec(evaluation={"dataset": "s3://d/eval"}))
    run_to_end(cluster)
    assert cluster.created == [
        "demo-r1-sft-a-a1", "demo-r1-sft-b-a1", "demo-r1-merge-a1", "demo-r1-eval-a1",
        "demo-r2-sft-a-a1", "demo-r2-sft-b-a1", "demo-r2-merge-a1", "demo-r2-eval-a1",
    ]
    s = cluster.status
    assert s["phase"] == "Succeeded"
    assert s["finalModel"] == "s3://ckpt/ns/demo/round-2/merged"
    assert s["roundDisplay"] == "2/2" and s["teacherCount"] == 2 and s["observedGeneration"] == 1
    r1, r2 = s["rounds"]
    assert r1["init"] == "s3://models/student"
    assert r2["init"] == "s3://ckpt/ns/demo/round-1/merged"
    assert r1["branches"]["a"] == {
        "job": "demo-r1-sft-a-a1", "attempt": 1, "state": "Succeeded",
        "checkpoint": "s3://ckpt/ns/demo/round-1/branch-a", "loss": 1.25,
        "startTime": r1["branches"]["a"]["startTime"], "completionTime": r1["branches"]["a"]["completionTime"],
    }
    assert r1["mergedCheckpoint"] == "s3://ckpt/ns/demo/round-1/merged" and r1["evalScore"] == 0.5
    conditions = {c["type"]: c for c in s["conditions"]}
    assert conditions["Succeeded"]["status"] == "True" and conditions["Ready"]["status"] == "True"
    assert conditions["Progressing"]["status"] == "False" and conditions["Failed"]["status"] == "False"
    assert cluster.reasons() == [
        "BranchStarted", "BranchStarted", "MergeStarted", "EvalStarted", "RoundCompleted",
        "BranchStarted", "BranchStarted", "MergeStarted", "EvalStarted", "RoundCompleted", "Succeeded",
    ]


def test_job_arguments_follow_the_trainer_contract():
    spec = make_spec(training={"steps": 7, "threads": 1, "packing": True}, merge={"method": "ties"},
                     teachers=[{"name": "a", "dataset": "s3://d/a", "weight": 1},
                               {"name": "b", "dataset": "s3://d/b", "weight": 3}],
                     evaluation={"dataset": "s3://d/eval", "samples": 2, "threads": 1})
    cluster = Cluster(spec)
    sft = cluster.step().create[0]
    assert sft.args[:7] == ["sft", "--init", "s3://models/student", "--data", "s3://d/a", "--out",
                            "s3://ckpt/ns/demo/round-1/branch-a"]
    assert sft.args[sft.args.index("--steps") + 1] == "7"
    assert "--packing" in sft.args and sft.args[-2:] == ["--threads", "1"]
    assert sft.output_uri == "s3://ckpt/ns/demo/round-1/branch-a"
    cluster.finish_active()
    merge = cluster.step().create[0]
    assert merge.args[:5] == ["merge", "--inputs", "s3://ckpt/ns/demo/round-1/branch-a",
                              "s3://ckpt/ns/demo/round-1/branch-b", "--out"]
    assert merge.args[merge.args.index("--weights") + 1: merge.args.index("--weights") + 3] == ["1.0", "3.0"]
    assert merge.args[merge.args.index("--method") + 1] == "ties"
    assert merge.args[merge.args.index("--base") + 1] == "s3://models/student"
    assert "--density" in merge.args
    cluster.finish_active()
    evaluation = cluster.step().create[0]
    assert evaluation.args[:7] == ["eval", "--model", "s3://ckpt/ns/demo/round-1/merged", "--data", "s3://d/eval",
                                   "--out", "s3://ckpt/ns/demo/round-1/eval.json"]
    assert evaluation.args[evaluation.args.index("--samples") + 1] == "2"


def test_failed_branch_is_retried_as_a_new_attempt_after_backoff():
    cluster = Cluster(make_spec())
    cluster.step()
    cluster.finish("demo-r1-sft-a-a1")
    cluster.finish("demo-r1-sft-b-a1", ok=False, message="CUDA error: out of memory")
    result = cluster.step()
    assert result.create == [] and result.requeue_after == pytest.approx(10)
    branch = cluster.status["rounds"][0]["branches"]["b"]
    assert branch["state"] == "Retrying" and branch["message"] == "CUDA error: out of memory"
    assert "BranchFailed" in cluster.reasons()
    assert cluster.step(seconds=5).create == []  # still backing off
    result = cluster.step(seconds=5)
    assert [r.name for r in result.create] == ["demo-r1-sft-b-a2"]
    assert cluster.reasons()[-1] == "BranchRetried"
    assert cluster.status["rounds"][0]["branches"]["b"]["attempt"] == 2
    cluster.finish("demo-r1-sft-b-a2")
    assert [r.stage for r in cluster.step().create] == ["merge"]


def test_backoff_doubles_per_attempt():
    cluster = Cluster(make_spec(maxRetries=3, retryBackoffSeconds=4))
    cluster.step()
    waits = []
    for attempt in (1, 2, 3):
        cluster.finish(f"demo-r1-sft-a-a{attempt}", ok=False, message="flaky")
        waits.append(cluster.step().requeue_after)
        cluster.step(seconds=waits[-1])
    assert waits == [4, 8, 16]


def test_retries_exhausted_fail_the_run_naming_branch_attempts_and_reason():
    cluster = Cluster(make_spec(retryBackoffSeconds=0))
    cluster.step()
    cluster.finish("demo-r1-sft-b-a1", ok=False, message="disk full")
    cluster.step()  # attempt 2 (backoff 0: at once)
    assert "demo-r1-sft-b-a2" in cluster.jobs
    cluster.finish("demo-r1-sft-b-a2", ok=False, message="disk full again")
    result = cluster.step()
    s = cluster.status
    assert s["phase"] == "Failed"
    assert "branch 'b' of round 1" in s["message"] and "2 attempts" in s["message"]
    assert "disk full again" in s["message"]
    assert s["failure"] == {"stage": "sft", "round": 1, "teacher": "b", "attempts": 2, "reason": "disk full again"}
    assert result.delete == ["demo-r1-sft-a-a1"]  # still running: stopped
    conditions = {c["type"]: c for c in s["conditions"]}
    assert conditions["Failed"]["status"] == "True" and conditions["Failed"]["reason"] == "BranchFailed"
    assert conditions["Ready"]["status"] == "False"
    assert cluster.reasons()[-2:] == ["BranchFailed", "Failed"]


def test_invalid_input_exit_code_2_is_never_retried():
    cluster = Cluster(make_spec(maxRetries=5))
    cluster.step()
    cluster.finish("demo-r1-sft-a-a1", ok=False, permanent=True, message="data: line 3 is not JSON")
    result = cluster.step()
    assert result.create == []
    assert cluster.status["phase"] == "Failed"
    assert "1 attempt" in cluster.status["message"] and "invalid input" in cluster.status["message"]
    assert "line 3 is not JSON" in cluster.status["message"]


@pytest.mark.parametrize("stage", ["merge", "eval"])
def test_merge_and_eval_failures_are_retried_then_fail_the_run(stage):
    cluster = Cluster(make_spec(retryBackoffSeconds=0, evaluation={"dataset": "s3://d/eval"}))
    cluster.step()
    cluster.finish_active(metrics={"final_loss": 1.0})
    cluster.step()
    if stage == "eval":
        cluster.finish_active()
        cluster.step()
    cluster.finish(f"demo-r1-{stage}-a1", ok=False, message=f"{stage} crashed")
    assert [r.name for r in cluster.step().create] == [f"demo-r1-{stage}-a2"]
    assert cluster.reasons()[-2:] == [f"{stage.capitalize()}Failed", f"{stage.capitalize()}Retried"]
    cluster.finish(f"demo-r1-{stage}-a2", ok=False, message=f"{stage} crashed again")
    cluster.step()
    s = cluster.status
    assert s["phase"] == "Failed" and s["failure"]["stage"] == stage and s["failure"]["attempts"] == 2
    assert f"{stage} crashed again" in s["message"]


def test_suspend_creates_nothing_and_suspends_running_jobs_then_resume_continues():
    cluster = Cluster(make_spec())
    cluster.step()
    cluster.jobs["demo-r1-sft-a-a1"].state = "Running"
    cluster.spec = make_spec(suspend=True)
    result = cluster.step()
    assert sorted(result.suspend) == ["demo-r1-sft-a-a1", "demo-r1-sft-b-a1"]
    assert cluster.status["phase"] == "Suspended" and cluster.reasons()[-1] == "Suspended"
    assert {c["type"]: c["status"] for c in cluster.status["conditions"]}["Suspended"] == "True"
    # A Job that finishes while suspended is recorded, but nothing new starts.
    cluster.finish("demo-r1-sft-a-a1")
    cluster.finish("demo-r1-sft-b-a1")
    result = cluster.step()
    assert result.create == [] and cluster.status["phase"] == "Suspended"
    assert cluster.reasons().count("Suspended") == 1
    cluster.spec = make_spec(suspend=False)
    result = cluster.step()
    assert cluster.reasons()[-2:] == ["Resumed", "MergeStarted"]
    assert [r.stage for r in result.create] == ["merge"] and cluster.status["phase"] == "Merging"


def test_suspended_from_the_start_creates_nothing():
    cluster = Cluster(make_spec(suspend=True))
    result = cluster.step()
    assert result.create == [] and cluster.status["phase"] == "Suspended"
    cluster.spec = make_spec()
    assert len(cluster.step().create) == 2


def test_resume_unsuspends_jobs_unless_kueue_manages_them():
    cluster = Cluster(make_spec(suspend=True))
    cluster.spec = make_spec()
    cluster.step()
    for job in cluster.jobs.values():
        job.state = "Suspended"
    assert sorted(cluster.step().resume) == ["demo-r1-sft-a-a1", "demo-r1-sft-b-a1"]
    queued = Cluster(make_spec(queueName="gpu"))
    queued.step()
    for job in queued.jobs.values():
        job.state = "Suspended"  # waiting for Kueue admission
    assert queued.step().resume == []
    assert queued.status["phase"] == "Pending"  # queued is not running yet


def test_rounds_extended_before_the_end_runs_more_rounds():
    cluster = Cluster(make_spec(rounds=1))
    cluster.step()
    cluster.finish_active()
    cluster.spec = make_spec(rounds=2)  # raised while round 1 merges
    cluster.step()
    cluster.finish_active()
    result = cluster.step()
    assert [r.name for r in result.create] == ["demo-r2-sft-a-a1", "demo-r2-sft-b-a1"]
    assert cluster.status["roundDisplay"] == "2/2"


def test_rounds_shortened_below_the_current_round_finishes_with_the_last_kept_merge():
    cluster = Cluster(make_spec(rounds=3))
    cluster.step()
    cluster.finish_active()
    cluster.step()
    cluster.finish_active()
    cluster.step()  # round 1 done, round 2 branches created
    assert cluster.status["round"] == 2
    cluster.spec = make_spec(rounds=1)
    result = cluster.step()
    assert sorted(result.delete) == ["demo-r2-sft-a-a1", "demo-r2-sft-b-a1"]
    s = cluster.status
    assert s["phase"] == "Succeeded" and s["finalModel"] == "s3://ckpt/ns/demo/round-1/merged"
    assert [r["round"] for r in s["rounds"]] == [1] and s["roundDisplay"] == "1/1"


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_terminal_runs_are_final(phase):
    cluster = Cluster(make_spec(retryBackoffSeconds=0))
    if phase == "Succeeded":
        run_to_end(cluster)
    else:
        cluster.step()
        cluster.finish("demo-r1-sft-a-a1", ok=False, permanent=True, message="bad data")
        cluster.step()
    assert cluster.status["phase"] == phase
    frozen = copy.deepcopy(cluster.status)
    cluster.spec = make_spec(rounds=5, suspend=True)  # edits after the end change nothing
    cluster.jobs["stray"] = ObservedJob("stray", "sft", 1, "b", 1, "Running")
    result = cluster.step(seconds=3600)
    assert cluster.status == frozen and result.create == [] and result.events == []
    assert result.delete == ["stray"]


def test_restart_with_jobs_half_created_creates_only_the_missing_ones_under_the_same_names():
    cluster = Cluster(make_spec(teachers=[{"name": n, "dataset": f"s3://d/{n}"} for n in "abc"]))
    first = plan(RUN, cluster.spec, {}, [], T0)
    assert len(first.create) == 3
    # The executor wrote the status, created one Job, then died.
    req = first.create[0]
    observed = [ObservedJob(req.name, "sft", 1, req.teacher, 1, "Running")]
    again = plan(RUN, cluster.spec, first.status, observed, T0 + timedelta(seconds=30))
    assert [r.name for r in again.create] == [r.name for r in first.create[1:]]
    assert again.events == []  # nothing new happened: no duplicate BranchStarted
    assert again.status["rounds"] == [{**first.status["rounds"][0], "branches": {
        **first.status["rounds"][0]["branches"],
        "a": {**first.status["rounds"][0]["branches"]["a"], "state": "Running"}}}]


def test_planning_twice_on_the_same_observation_is_a_no_op():
    cluster = Cluster(make_spec())
    cluster.step()
    status = copy.deepcopy(cluster.status)
    result = plan(RUN, cluster.spec, status, list(cluster.jobs.values()), cluster.now + timedelta(seconds=5))
    assert result.create == [] and result.events == []
    assert result.status["conditions"] == status["conditions"]  # lastTransitionTime kept


def test_phase_pending_until_a_job_runs():
    cluster = Cluster(make_spec())
    cluster.step()
    assert cluster.status["phase"] == "Pending"
    cluster.jobs["demo-r1-sft-a-a1"].state = "Running"
    cluster.step()
    assert cluster.status["phase"] == "Running"
    assert cluster.status["rounds"][0]["branches"]["a"]["state"] == "Running"


def test_missing_storage_uri_fails_with_a_clear_reason():
    spec = parse_spec({"student": "s", "teachers": [{"name": "a", "dataset": "d"}]})
    result = plan(RUN, spec, {}, [], T0)
    assert result.create == [] and result.status["phase"] == "Failed"
    assert "spec.storage.uri" in result.status["message"]
    assert {c["type"]: c["reason"] for c in result.status["conditions"]}["Failed"] == "StorageNotSet"


def test_invalid_spec_fails_the_run_naming_the_field():
    result = plan_invalid(RUN, {}, SpecError("spec.teachers[1]", 'Duplicate value: {"name":"a"}'), T0)
    assert result.status["phase"] == "Failed"
    assert 'spec.teachers[1]: Duplicate value: {"name":"a"}' in result.status["message"]
    assert {c["type"]: c["reason"] for c in result.status["conditions"]}["Failed"] == "InvalidSpec"
    # terminal: a second call changes nothing
    assert plan_invalid(RUN, result.status, SpecError("x", "y"), T0).status == result.status


def test_multinode_branch_names_leave_room_for_the_pod_index():
    long_run = RunRef(namespace="ns", name="a-rather-long-motrun-name-for-a-big-model", uid="u")
    spec = make_spec(resources={"branch": {"nodes": 2, "gpus": 8}},
                     teachers=[{"name": "deepseek-r1-distill", "dataset": "d"}])
    result = plan(long_run, spec, {}, [], T0)
    assert all(len(r.name) <= 56 for r in result.create)


def test_results_read_a_pass_later_are_filled_in():
    cluster = Cluster(make_spec())
    cluster.step()
    cluster.finish_active(metrics=None)  # succeeded, termination messages not read yet
    cluster.step()
    assert "loss" not in cluster.status["rounds"][0]["branches"]["a"]
    cluster.jobs["demo-r1-sft-a-a1"].metrics = {"final_loss": 0.125}
    result = cluster.step()
    assert cluster.status["rounds"][0]["branches"]["a"]["loss"] == 0.125 and result.create == []

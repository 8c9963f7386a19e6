"""The pure planner as a table of transitions: the preflight, happy path, retries, permanent failures,
merge/eval failures, suspend/resume, rounds edited, terminal states, restart with Jobs half created."""

from __future__ import annotations

import asyncio
import copy
from datetime import UTC, datetime, timedelta

import pytest

from mot_operator import executor
from mot_operator.planner import ObservedJob, Plan, RunRef, plan, plan_invalid
from mot_operator.spec import SpecError, parse_spec

T0 = datetime(2026, 1, 1, tzinfo=UTC)
RUN = RunRef(namespace="ns", name="demo", uid="uid-1", generation=1)
PREFLIGHT = "demo-preflight-a1"
# What `mot-train preflight` writes to its termination log when every check passed (Report.summary()).
PREFLIGHT_REPORT = {
    "teachers": {"a": {"records": 1200, "p50": 1830, "p95": 3900, "max": 6120, "truncated": 0.015},
                 "b": {"records": 800, "p50": 950, "p95": 2100, "max": 3980, "truncated": 0.0}},
    "max_seq_length": 4096, "storage": "writable", "seconds": 41.27, "eval": {"records": 100},
}


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
    """Plays the executor under the real `executor.step`: observes its Jobs, stores the status,
    applies a plan's creates/suspends/resumes/deletes and records its Events; a fake clock."""

    def __init__(self, spec, status=None):
        self.spec = spec
        self.status = status or {}
        self.jobs: dict[str, ObservedJob] = {}
        self.now = T0
        self.events: list[tuple[str, str]] = []
        self.created: list[str] = []
        self.last = None

    async def observe(self) -> list[ObservedJob]:
        return list(self.jobs.values())

    async def persist(self, old: dict, new: dict) -> None:
        self.status = new

    async def act(self, result: Plan) -> None:
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

    def step(self, seconds: float = 1.0):
        self.now += timedelta(seconds=seconds)
        status, before = self.status, copy.deepcopy(self.status)
        result = asyncio.run(executor.step(status, self, executor.planner_for(RUN, self.spec), self.now))
        assert status == before, "plan must not mutate its input"
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
        """Every Pending/Running Job succeeds; a preflight always with its report, others with `metrics`."""
        for job in list(self.jobs.values()):
            if job.state in ("Pending", "Running") and (stage is None or job.stage == stage):
                self.finish(job.name, metrics=PREFLIGHT_REPORT if job.stage == "preflight" else metrics)

    def start(self):
        """Plan until round 1's branches are requested: the preflight Job, when the spec has one,
        is created and passes with a real report first. Returns the plan that starts the branches."""
        result = self.step()
        if [r.stage for r in result.create] == ["preflight"]:
            self.finish(result.create[0].name, metrics=PREFLIGHT_REPORT)
            result = self.step()
        # (with spec.evaluation, round 0's eval of the student starts beside them)
        assert {r.stage for r in result.create if r.round} == {"sft"}, [r.name for r in result.create]
        assert {(r.stage, r.round) for r in result.create if not r.round} <= {("eval", 0)}
        return result

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
        "demo-preflight-a1",
        "demo-r0-eval-a1",  # the student's own score, beside round 1
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
    assert s["preflight"]["state"] == "Succeeded" and s["preflight"]["teachers"] == PREFLIGHT_REPORT["teachers"]
    conditions = {c["type"]: c for c in s["conditions"]}
    assert conditions["Succeeded"]["status"] == "True" and conditions["Ready"]["status"] == "True"
    assert conditions["Progressing"]["status"] == "False" and conditions["Failed"]["status"] == "False"
    assert s["student"]["evalScore"] == 0.5 and s["student"]["eval"]["checkpoint"] == "s3://ckpt/ns/demo/round-0/eval.json"
    assert cluster.reasons() == [
        "PreflightStarted", "PreflightPassed", "EvalStarted",
        "BranchStarted", "BranchStarted", "MergeStarted", "EvalStarted", "RoundCompleted",
        "BranchStarted", "BranchStarted", "MergeStarted", "EvalStarted", "RoundCompleted", "Succeeded",
    ]


def test_job_arguments_follow_the_trainer_contract():
    spec = make_spec(training={"steps": 7, "threads": 1, "packing": True}, merge={"method": "ties"},
                     teachers=[{"name": "a", "dataset": "s3://d/a", "weight": 1},
                               {"name": "b", "dataset": "s3://d/b", "weight": 3}],
                     evaluation={"dataset": "s3://d/eval", "samples": 2, "threads": 1})
    cluster = Cluster(spec)
    sft = next(r for r in cluster.start().create if r.stage == "sft")
    assert sft.args[:7] == ["sft", "--init", "s3://models/student", "--data", "s3://d/a", "--out",
                            "s3://ckpt/ns/demo/round-1/branch-a"]
    assert sft.args[sft.args.index("--steps") + 1] == "7"
    # The branch serves its metrics (contract.sft_args, no longer appended by jobs.py): last, as before.
    assert "--packing" in sft.args and sft.args[-4:] == ["--threads", "1", "--metrics-port", "9090"]
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


@pytest.mark.parametrize("engine", [None, "vllm", "transformers"])
def test_eval_job_args_carry_the_engine(engine):
    """spec.evaluation.engine (default auto) reaches `mot-train eval --engine`, which takes it."""
    import argparse

    from mot_trainer.eval import add_arguments

    evaluation = {"dataset": "s3://d/eval"} | ({"engine": engine} if engine else {})
    spec = make_spec(evaluation=evaluation, preflight={"enabled": False})
    assert spec.evaluation.engine == (engine or "auto")
    job = next(r for r in Cluster(spec).start().create if r.stage == "eval")  # round 0: the student
    assert job.args[job.args.index("--engine") + 1] == (engine or "auto")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(job.args[1:]).engine == (engine or "auto")
    with pytest.raises(SpecError, match="engine"):
        make_spec(evaluation={"dataset": "s3://d/eval", "engine": "tensorrt"})


def test_failed_branch_is_retried_as_a_new_attempt_after_backoff():
    cluster = Cluster(make_spec())
    cluster.start()
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
    cluster.start()
    waits = []
    for attempt in (1, 2, 3):
        cluster.finish(f"demo-r1-sft-a-a{attempt}", ok=False, message="flaky")
        waits.append(cluster.step().requeue_after)
        cluster.step(seconds=waits[-1])
    assert waits == [4, 8, 16]


def test_retries_exhausted_fail_the_run_naming_branch_attempts_and_reason():
    cluster = Cluster(make_spec(retryBackoffSeconds=0))
    cluster.start()
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
    cluster.start()
    cluster.finish("demo-r1-sft-a-a1", ok=False, permanent=True, message="data: line 3 is not JSON")
    result = cluster.step()
    assert result.create == []
    assert cluster.status["phase"] == "Failed"
    assert "1 attempt" in cluster.status["message"] and "invalid input" in cluster.status["message"]
    assert "line 3 is not JSON" in cluster.status["message"]


@pytest.mark.parametrize("stage", ["merge", "eval"])
def test_merge_and_eval_failures_are_retried_then_fail_the_run(stage):
    cluster = Cluster(make_spec(retryBackoffSeconds=0, evaluation={"dataset": "s3://d/eval"}))
    cluster.start()
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
    cluster.start()
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
    assert "preflight" not in cluster.status  # not even its first attempt is recorded
    assert cluster.status["message"] == (
        "suspended at preflight: checking the student, 2 teachers' data and storage")
    cluster.spec = make_spec()
    result = cluster.step()  # resumed: the preflight comes first
    assert [r.name for r in result.create] == [PREFLIGHT]
    assert cluster.reasons()[-2:] == ["Resumed", "PreflightStarted"]
    assert {c["type"]: c["reason"] for c in cluster.status["conditions"]}["Progressing"] == "PreflightRunning"
    cluster.finish(PREFLIGHT, metrics=PREFLIGHT_REPORT)
    assert [r.name for r in cluster.step().create] == ["demo-r1-sft-a-a1", "demo-r1-sft-b-a1"]


def test_resume_unsuspends_jobs_unless_kueue_manages_them():
    cluster = Cluster(make_spec(suspend=True))
    cluster.spec = make_spec()
    cluster.start()
    for job in cluster.jobs.values():
        if job.stage == "sft":
            job.state = "Suspended"
    assert sorted(cluster.step().resume) == ["demo-r1-sft-a-a1", "demo-r1-sft-b-a1"]
    queued = Cluster(make_spec(queueName="gpu"))
    queued.start()
    for job in queued.jobs.values():
        if job.stage == "sft":
            job.state = "Suspended"  # waiting for Kueue admission
    assert queued.step().resume == []
    assert queued.status["phase"] == "Pending"  # queued is not running yet


def test_rounds_extended_before_the_end_runs_more_rounds():
    cluster = Cluster(make_spec(rounds=1))
    cluster.start()
    cluster.finish_active()
    cluster.spec = make_spec(rounds=2)  # raised while round 1 merges
    cluster.step()
    cluster.finish_active()
    result = cluster.step()
    assert [r.name for r in result.create] == ["demo-r2-sft-a-a1", "demo-r2-sft-b-a1"]
    assert cluster.status["roundDisplay"] == "2/2"


def test_rounds_shortened_below_the_current_round_finishes_with_the_last_kept_merge():
    cluster = Cluster(make_spec(rounds=3))
    cluster.start()
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
        cluster.start()
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
    cluster.step()
    cluster.finish(PREFLIGHT, metrics=PREFLIGHT_REPORT)
    preflight = cluster.jobs[PREFLIGHT]
    first = plan(RUN, cluster.spec, cluster.status, [preflight], cluster.now)
    assert len(first.create) == 3
    # The executor wrote the status, created one Job, then died.
    req = first.create[0]
    observed = [preflight, ObservedJob(req.name, "sft", 1, req.teacher, 1, "Running")]
    again = plan(RUN, cluster.spec, first.status, observed, cluster.now + timedelta(seconds=30))
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
    cluster.start()
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
    first = plan(long_run, spec, {}, [], T0)
    (preflight,) = first.create  # a single-Pod Job: the plain 63-character limit
    assert len(preflight.name) <= 63 and preflight.name.startswith("a-rather-long-motrun")
    passed = ObservedJob(preflight.name, "preflight", 0, None, 1, "Succeeded", metrics=PREFLIGHT_REPORT)
    result = plan(long_run, spec, first.status, [passed], T0)
    assert [r.stage for r in result.create] == ["sft"]
    assert all(len(r.name) <= 56 for r in result.create)


def test_results_read_a_pass_later_are_filled_in():
    cluster = Cluster(make_spec())
    cluster.start()
    cluster.finish_active(metrics=None)  # succeeded, termination messages not read yet
    cluster.step()
    assert "loss" not in cluster.status["rounds"][0]["branches"]["a"]
    cluster.jobs["demo-r1-sft-a-a1"].metrics = {"final_loss": 0.125}
    result = cluster.step()
    assert cluster.status["rounds"][0]["branches"]["a"]["loss"] == 0.125 and result.create == []


# ---------------------------------------------------------------------------------------------
# The preflight: one Job before round 1 checking the student, the teachers' data, the eval set and
# the storage; its findings in status.preflight; a failure fails the run before any branch Job.


def conditions_of(status):
    return {c["type"]: c for c in status["conditions"]}


def test_preflight_runs_first_and_its_findings_are_recorded_before_branches_start():
    cluster = Cluster(make_spec(evaluation={"dataset": "s3://d/eval"}, training={"maxSeqLength": 2048},
                                preflight={"maxTruncatedFraction": 0.1}))
    result = cluster.step()
    (req,) = result.create
    assert (req.name, req.stage, req.round, req.teacher, req.attempt) == (PREFLIGHT, "preflight", 0, None, 1)
    assert req.args == ["preflight", "--student", "s3://models/student", "--teachers", "a=s3://d/a", "b=s3://d/b",
                        "--max-seq-length", "2048", "--max-truncated-fraction", "0.1",
                        "--storage", "s3://ckpt/ns/demo", "--out", "s3://ckpt/ns/demo/preflight.json",
                        "--eval", "s3://d/eval"]
    assert req.output_uri == "s3://ckpt/ns/demo/preflight.json"
    assert (req.resources.cpu, req.resources.memory, req.resources.gpus) == ("1", "4Gi", 0)
    s = cluster.status
    assert s["preflight"] == {"job": PREFLIGHT, "attempt": 1, "state": "Pending",
                              "checkpoint": "s3://ckpt/ns/demo/preflight.json"}
    assert s["rounds"] == [] and s["phase"] == "Pending"
    assert s["message"] == "preflight: checking the student, 2 teachers' data, the eval set and storage"
    assert conditions_of(s)["Progressing"]["reason"] == "PreflightRunning"
    assert cluster.events == [("PreflightStarted", "preflight started (demo-preflight-a1)")]

    cluster.jobs[PREFLIGHT].state = "Running"
    assert cluster.step().create == []
    assert cluster.status["preflight"]["state"] == "Running" and cluster.status["phase"] == "Pending"
    assert conditions_of(cluster.status)["Progressing"]["reason"] == "PreflightRunning"

    cluster.finish(PREFLIGHT, metrics=PREFLIGHT_REPORT)
    result = cluster.step()
    pf = cluster.status["preflight"]
    assert pf == {"job": PREFLIGHT, "attempt": 1, "state": "Succeeded",
                  "checkpoint": "s3://ckpt/ns/demo/preflight.json",
                  "startTime": "2026-01-01T00:00:01Z", "completionTime": "2026-01-01T00:00:02Z",
                  "teachers": PREFLIGHT_REPORT["teachers"], "evalRecords": 100, "storage": "writable",
                  "seconds": 41.27}
    assert cluster.events[1] == ("PreflightPassed",
                                 "preflight passed: a 1200 records, p95 3900 tokens, 1.5% truncated; "
                                 "b 800 records, p95 2100 tokens, 0.0% truncated; eval set 100 problems")
    # The branches start in the same pass, from the student (and the student's own eval, round 0).
    assert [r.name for r in result.create] == ["demo-r0-eval-a1", "demo-r1-sft-a-a1", "demo-r1-sft-b-a1"]
    assert cluster.status["rounds"][0]["init"] == "s3://models/student"
    assert conditions_of(cluster.status)["Progressing"]["reason"] == "Pending"
    cluster.step()
    assert cluster.reasons().count("PreflightPassed") == 1  # announced once


def test_preflight_invalid_input_fails_the_run_before_any_branch_job():
    reason = ("teacher a: 12% of 1200 examples are longer than maxSeqLength 4096 (p95 5200 tokens, max 9100; "
              "at most 5% allowed); raise spec.training.maxSeqLength or spec.preflight.maxTruncatedFraction")
    cluster = Cluster(make_spec(maxRetries=5))
    cluster.step()
    cluster.finish(PREFLIGHT, ok=False, permanent=True, message=reason)
    result = cluster.step()
    s = cluster.status
    assert s["phase"] == "Failed" and result.create == []
    assert s["message"] == f"preflight failed after 1 attempt, invalid input: not retried: {reason}"
    assert s["failure"] == {"stage": "preflight", "attempts": 1, "reason": reason}  # no round: before any
    assert s["preflight"]["state"] == "Failed" and s["preflight"]["message"] == reason
    assert s["rounds"] == []
    conditions = conditions_of(s)
    assert conditions["Failed"]["status"] == "True" and conditions["Failed"]["reason"] == "PreflightFailed"
    assert conditions["Ready"]["reason"] == "PreflightFailed"
    assert cluster.reasons() == ["PreflightStarted", "PreflightFailed", "Failed"]
    assert dict(cluster.events)["PreflightFailed"] == (
        f"preflight: attempt 1 failed (invalid input (exit code 2), not retried): {reason}")
    for _ in range(3):  # terminal: nothing is ever started
        cluster.step(seconds=600)
    assert cluster.created == [PREFLIGHT]


def test_a_transient_preflight_failure_is_retried_as_a_new_attempt():
    cluster = Cluster(make_spec())  # maxRetries 1, backoff 10s
    cluster.step()
    cluster.finish(PREFLIGHT, ok=False, message="RetryableError: S3 timed out")
    result = cluster.step()
    assert result.create == [] and result.requeue_after == pytest.approx(10)
    pf = cluster.status["preflight"]
    assert pf["state"] == "Retrying" and pf["message"] == "RetryableError: S3 timed out"
    assert pf["retryAt"] == "2026-01-01T00:00:12Z"
    assert cluster.status["phase"] == "Pending"
    assert conditions_of(cluster.status)["Progressing"]["reason"] == "Retrying"
    assert cluster.events[-1] == ("PreflightFailed", "preflight: attempt 1 of 2 failed: RetryableError: S3 timed "
                                                     "out; retrying in 10s")
    assert cluster.step(seconds=5).create == []  # still backing off
    result = cluster.step(seconds=5)
    assert [r.name for r in result.create] == ["demo-preflight-a2"]
    assert result.create[0].output_uri == "s3://ckpt/ns/demo/preflight.json"
    assert cluster.events[-1] == ("PreflightRetried", "preflight: attempt 2 of 2 started (demo-preflight-a2)")
    assert {k: cluster.status["preflight"][k] for k in ("job", "attempt", "state")} == {
        "job": "demo-preflight-a2", "attempt": 2, "state": "Pending"}
    cluster.finish("demo-preflight-a2", metrics=PREFLIGHT_REPORT)
    result = cluster.step()
    assert [r.stage for r in result.create] == ["sft", "sft"]
    assert cluster.status["preflight"]["state"] == "Succeeded" and "message" not in cluster.status["preflight"]
    assert cluster.created == [PREFLIGHT, "demo-preflight-a2", "demo-r1-sft-a-a1", "demo-r1-sft-b-a1"]


def test_preflight_retries_exhausted_fail_the_run_with_the_last_reason():
    cluster = Cluster(make_spec(retryBackoffSeconds=0))
    cluster.step()
    cluster.finish(PREFLIGHT, ok=False, message="RetryableError: S3 timed out")
    cluster.step()  # attempt 2 at once
    cluster.finish("demo-preflight-a2", ok=False, message="RetryableError: S3 timed out again")
    cluster.step()
    s = cluster.status
    assert s["phase"] == "Failed"
    assert s["message"] == "preflight failed after 2 attempts: RetryableError: S3 timed out again"
    assert s["failure"] == {"stage": "preflight", "attempts": 2, "reason": "RetryableError: S3 timed out again"}
    assert cluster.created == [PREFLIGHT, "demo-preflight-a2"]
    assert conditions_of(s)["Failed"]["reason"] == "PreflightFailed"


GIB = 1024 ** 3


@pytest.mark.parametrize(("branch", "training", "gpu_memory", "extra"), [
    ({"gpus": 2, "nodes": 3}, {"microBatchSize": 2, "precision": "bf16", "gradientCheckpointing": True}, 80 * GIB,
     ["--gpu-memory", str(80 * GIB), "--gpus", "2", "--nodes", "3", "--micro-batch-size", "2",
      "--precision", "bf16", "--gradient-checkpointing"]),
    ({"gpus": 8}, {"packing": True}, 80 * GIB,
     ["--gpu-memory", str(80 * GIB), "--gpus", "8", "--nodes", "1", "--micro-batch-size", "1",
      "--precision", "auto", "--packing"]),
    ({"gpus": 1}, {}, 24 * GIB, ["--gpu-memory", str(24 * GIB), "--gpus", "1", "--nodes", "1",
                                 "--micro-batch-size", "1", "--precision", "auto"]),
    ({"gpus": 1}, {}, None, []),  # the GPU memory unknown: nothing to check
    ({"gpus": 0}, {}, 80 * GIB, []),  # a branch on CPUs: no GPU to fit
])
def test_the_preflight_checks_the_gpu_memory_only_when_the_executor_knows_it(branch, training, gpu_memory, extra):
    spec = make_spec(resources={"branch": branch}, training={"maxSeqLength": 1024, **training})
    result = plan(RUN, spec, {}, [], T0, gpu_memory=gpu_memory)
    (req,) = result.create
    assert req.args == ["preflight", "--student", "s3://models/student", "--teachers", "a=s3://d/a", "b=s3://d/b",
                        "--max-seq-length", "1024", "--max-truncated-fraction", "0.05",
                        "--storage", "s3://ckpt/ns/demo", "--out", "s3://ckpt/ns/demo/preflight.json", *extra]
    # The fact reaches only the preflight: a disabled one checks nothing, and the branches' args are alike.
    off = plan(RUN, make_spec(resources={"branch": branch}, preflight={"enabled": False}), {}, [], T0,
               gpu_memory=gpu_memory)
    assert [r.args for r in off.create] == [r.args for r in plan(RUN, make_spec(resources={"branch": branch},
                                                                                 preflight={"enabled": False}),
                                                                   {}, [], T0).create]


def test_a_disabled_preflight_starts_round_1_at_once():
    cluster = Cluster(make_spec(preflight={"enabled": False}))
    result = cluster.step()
    assert [r.name for r in result.create] == ["demo-r1-sft-a-a1", "demo-r1-sft-b-a1"]
    assert "preflight" not in cluster.status
    run_to_end(cluster)
    assert cluster.status["phase"] == "Succeeded" and "preflight" not in cluster.status
    assert not any(r.startswith("Preflight") for r in cluster.reasons())
    assert not any("preflight" in name for name in cluster.created)


def test_suspend_during_the_preflight_suspends_its_job_and_resume_continues_it():
    cluster = Cluster(make_spec())
    cluster.step()
    cluster.jobs[PREFLIGHT].state = "Running"
    cluster.spec = make_spec(suspend=True)
    result = cluster.step()
    assert result.suspend == [PREFLIGHT] and result.create == []
    assert cluster.status["phase"] == "Suspended"
    assert cluster.status["message"].startswith("suspended at preflight: ")
    cluster.step()
    assert cluster.status["preflight"]["state"] == "Suspended"
    cluster.spec = make_spec()
    result = cluster.step()
    assert result.resume == [PREFLIGHT] and result.create == []
    assert cluster.reasons()[-1] == "Resumed"
    cluster.finish(PREFLIGHT, metrics=PREFLIGHT_REPORT)
    assert [r.stage for r in cluster.step().create] == ["sft", "sft"]


def test_with_a_queue_the_preflight_job_is_resumed_on_unsuspend_and_the_branches_left_to_kueue():
    """The preflight Job is never queued (jobs.py): nobody but the planner unsuspends it."""
    cluster = Cluster(make_spec(queueName="gpu"))
    cluster.step()
    cluster.jobs[PREFLIGHT].state = "Running"
    cluster.spec = make_spec(queueName="gpu", suspend=True)
    assert cluster.step().suspend == [PREFLIGHT]
    cluster.spec = make_spec(queueName="gpu")
    result = cluster.step()
    assert result.resume == [PREFLIGHT]
    assert cluster.jobs[PREFLIGHT].state == "Running"
    cluster.finish(PREFLIGHT, metrics=PREFLIGHT_REPORT)
    cluster.step()
    for job in cluster.jobs.values():
        if job.stage == "sft":
            job.state = "Suspended"  # created suspended, waiting for Kueue admission
    cluster.spec = make_spec(queueName="gpu", suspend=True)
    cluster.step()
    cluster.spec = make_spec(queueName="gpu")
    assert cluster.step().resume == []  # Kueue admits them, not the planner


def test_a_run_that_has_rounds_but_no_preflight_record_is_not_sent_back_to_one():
    """A run started before the preflight existed (its status already has rounds) keeps going."""
    old = Cluster(make_spec(preflight={"enabled": False}))
    old.step()
    assert "preflight" not in old.status and old.status["rounds"][0]["branches"]
    cluster = Cluster(make_spec(), status=copy.deepcopy(old.status))  # upgraded: preflight on by default
    cluster.jobs = old.jobs
    result = cluster.step()
    assert result.create == [] and "preflight" not in cluster.status
    cluster.finish_active(metrics={"final_loss": 1.0})
    result = cluster.step()
    assert [r.name for r in result.create] == ["demo-r1-merge-a1"]
    assert not any(r.startswith("Preflight") for r in cluster.reasons())


def test_a_preflight_created_before_a_restart_is_created_again_under_its_name():
    first = plan(RUN, make_spec(), {}, [], T0)
    # The executor wrote the status, then died before creating the Job.
    again = plan(RUN, make_spec(), first.status, [], T0 + timedelta(seconds=30))
    assert [r.name for r in again.create] == [PREFLIGHT] and again.events == []
    assert again.create[0].args == first.create[0].args


# -- progress, stuck stages, disruptions, pending timeout --------------------------------------


def _record(step, total=10, eta=30.0, loss=0.5, time="2026-01-01T00:00:30Z"):
    """A trainer progress record (mot_trainer.progress), as the executors pass it on."""
    return {"step": step, "totalSteps": total, "loss": loss, "learningRate": 1e-3, "tokens": 100 * step,
            "tokensPerSecond": 250.0, "etaSeconds": eta, "elapsedSeconds": 3.0, "time": time}


def test_branch_progress_and_the_runs_fraction_and_eta_come_from_the_trainers_records():
    cluster = Cluster(make_spec(training={"steps": 10}))
    cluster.start()
    a, b = "demo-r1-sft-a-a1", "demo-r1-sft-b-a1"
    for name, step, eta in ((a, 4, 30.0), (b, 2, 60.0)):
        cluster.jobs[name].state = "Running"
        cluster.jobs[name].progress = _record(step, eta=eta)
    cluster.step()
    s = cluster.status
    assert s["rounds"][0]["branches"]["a"]["progress"] == {
        "step": 4, "totalSteps": 10, "loss": 0.5, "learningRate": 1e-3, "tokensPerSecond": 250.0,
        "etaSeconds": 30.0, "updateTime": "2026-01-01T00:00:30Z"}
    # 6 of 2 rounds x 2 teachers x 10 steps; round 2's length is unknown before round 1 ends.
    assert s["progress"] == {"fraction": 0.15, "updateTime": "2026-01-01T00:00:30Z"}
    assert s["progressDisplay"] == "15%" and s["reason"] == "BranchesRunning"
    cluster.step()
    assert cluster.last.status == s, "the same records write nothing new"
    # Round 1 ends after 100 s; round 2's branches are half way with 20 s left: 20 s + 0 later rounds.
    cluster.now = T0 + timedelta(seconds=99)
    cluster.finish_active(metrics={"final_loss": 1.0})
    cluster.step()
    cluster.finish_active()
    cluster.step()
    r2a, r2b = "demo-r2-sft-a-a1", "demo-r2-sft-b-a1"
    for name in (r2a, r2b):
        cluster.jobs[name].state = "Running"
        cluster.jobs[name].progress = _record(5, eta=20.0)
    cluster.step()
    assert cluster.status["rounds"][0]["branches"]["a"]["progress"]["step"] == 10  # done: all steps
    assert cluster.status["progress"]["fraction"] == 0.75 and cluster.status["progress"]["etaSeconds"] == 20.0
    assert cluster.status["progressDisplay"] == "75% ETA 20s"


def test_eta_of_later_rounds_is_the_last_rounds_duration():
    cluster = Cluster(make_spec(rounds=3, training={"steps": 10}, preflight={"enabled": False}))
    cluster.start()
    cluster.now = T0 + timedelta(seconds=119)
    cluster.finish_active(metrics={"final_loss": 1.0})
    cluster.step()
    cluster.finish_active()
    cluster.step()
    for name in ("demo-r2-sft-a-a1", "demo-r2-sft-b-a1"):
        cluster.jobs[name].state = "Running"
        cluster.jobs[name].progress = _record(5, eta=40.0)
    cluster.step()
    rec = cluster.status["rounds"][0]
    length = (datetime.fromisoformat(rec["completionTime"].replace("Z", "+00:00"))
              - datetime.fromisoformat(rec["startTime"].replace("Z", "+00:00"))).total_seconds()
    assert cluster.status["progress"]["etaSeconds"] == 40.0 + length


def test_an_unschedulable_branch_says_so_in_reason_message_and_one_event():
    cluster = Cluster(make_spec())
    cluster.start()
    job = cluster.jobs["demo-r1-sft-a-a1"]
    job.waiting = {"reason": "Unschedulable", "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}
    cluster.step()
    s = cluster.status
    waiting = s["rounds"][0]["branches"]["a"]["waiting"]
    assert waiting["reason"] == "Unschedulable" and waiting["since"] == "2026-01-01T00:00:03Z"
    assert s["reason"] == "Unschedulable"
    assert s["message"].endswith("; branch 'a' of round 1: Unschedulable: 0/1 nodes are available: "
                                 "1 Insufficient nvidia.com/gpu.")
    progressing = next(c for c in s["conditions"] if c["type"] == "Progressing")
    assert progressing["reason"] == "Unschedulable" and "Insufficient nvidia.com/gpu" in progressing["message"]
    assert cluster.reasons().count("Unschedulable") == 1
    cluster.step()
    assert cluster.reasons().count("Unschedulable") == 1, "told once, not on every pass"
    # Scheduled, then the image cannot be pulled: a new reason, a new Event, the same `since`.
    job.waiting = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x.invalid/t:1"'}
    cluster.step()
    assert cluster.status["rounds"][0]["branches"]["a"]["waiting"]["since"] == waiting["since"]
    assert cluster.status["reason"] == "ImagePullBackOff" and cluster.reasons()[-1] == "ImagePullBackOff"
    job.waiting, job.state = None, "Running"
    cluster.step()
    assert "waiting" not in cluster.status["rounds"][0]["branches"]["a"]
    assert cluster.status["reason"] == "BranchesRunning" and "Back-off" not in cluster.status["message"]


def test_normal_start_is_not_stuck():
    cluster = Cluster(make_spec())
    cluster.start()
    cluster.jobs["demo-r1-sft-a-a1"].waiting = {"reason": "ContainerCreating", "message": ""}
    cluster.step()
    assert cluster.status["rounds"][0]["branches"]["a"]["waiting"]["reason"] == "ContainerCreating"
    assert cluster.status["reason"] == "Pending" and "ContainerCreating" not in cluster.reasons()


def test_pending_timeout_fails_the_run_with_the_stuck_reason():
    cluster = Cluster(make_spec(pendingTimeoutSeconds=60))
    cluster.start()
    job = cluster.jobs["demo-r1-sft-b-a1"]
    job.waiting = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x.invalid/t:1"'}
    result = cluster.step()
    assert result.requeue_after == 60.0, "planned again when the timeout is due"
    cluster.step(30)
    assert cluster.status["phase"] == "Pending"
    cluster.step(30)
    s = cluster.status
    assert s["phase"] == "Failed" and s["reason"] == "ImagePullBackOff"
    assert s["message"] == ("branch 'b' of round 1 failed after 1 attempt: none of its Pods has run for 60s "
                            "(spec.pendingTimeoutSeconds): ImagePullBackOff: Back-off pulling image \"x.invalid/t:1\"")
    failed = next(c for c in s["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "ImagePullBackOff"
    assert cluster.last.delete == ["demo-r1-sft-a-a1", "demo-r1-sft-b-a1"]


def test_pending_timeout_does_not_count_kueue_queueing_and_is_off_by_default():
    cluster = Cluster(make_spec(pendingTimeoutSeconds=60, queueName="q"))
    cluster.start()
    for job in cluster.jobs.values():
        job.state = "Suspended"
        job.waiting = {"reason": "WaitingForAdmission", "message": "insufficient quota for nvidia.com/gpu"}
    cluster.step(600)
    assert cluster.status["phase"] == "Pending" and cluster.status["reason"] == "WaitingForAdmission"
    assert ("WaitingForAdmission", "branch 'a' of round 1: insufficient quota for nvidia.com/gpu") in cluster.events
    off = Cluster(make_spec())
    off.start()
    off.jobs["demo-r1-sft-a-a1"].waiting = {"reason": "Unschedulable", "message": "no nodes"}
    off.step(86400)
    assert off.status["phase"] == "Pending"


def test_a_disruption_is_recorded_and_told_once_and_not_counted_as_an_attempt():
    cluster = Cluster(make_spec())
    cluster.start()
    job = cluster.jobs["demo-r1-sft-a-a1"]
    job.disruptions = [{"pod": "demo-r1-sft-a-a1-x1", "reason": "Preempted",
                        "message": "PreemptionByScheduler: Kubernetes Scheduler"}]
    job.waiting = {"reason": "Preempted", "message": "the replacement of Pod demo-r1-sft-a-a1-x1 is not running yet"}
    cluster.step()
    cluster.step()
    entry = cluster.status["rounds"][0]["branches"]["a"]
    assert [d["pod"] for d in entry["disruptions"]] == ["demo-r1-sft-a-a1-x1"] and entry["attempt"] == 1
    assert cluster.reasons().count("BranchDisrupted") == 1
    message = dict(cluster.events)["BranchDisrupted"]
    assert message.startswith("branch 'a' of round 1: Pod demo-r1-sft-a-a1-x1 was preempted: ") and \
        "not counted as a failed attempt" in message
    assert cluster.status["reason"] == "Preempted"


def test_an_oom_killed_attempt_names_the_cause_while_retrying_and_when_failed():
    cluster = Cluster(make_spec(maxRetries=1, retryBackoffSeconds=100))
    cluster.start()
    job = cluster.jobs["demo-r1-sft-a-a1"]
    job.state, job.reason = "Failed", "OOMKilled"
    job.message, job.finished_at = "OOMKilled: the container used more than its memory limit (8Gi)", cluster.now
    cluster.step()
    assert cluster.status["reason"] == "OOMKilled" and cluster.status["rounds"][0]["branches"]["a"]["state"] == "Retrying"
    cluster.step(100)
    retry = cluster.jobs["demo-r1-sft-a-a2"]
    retry.state, retry.reason, retry.message, retry.finished_at = "Failed", "OOMKilled", job.message, cluster.now
    cluster.step()
    assert cluster.status["phase"] == "Failed" and cluster.status["reason"] == "OOMKilled"
    assert "memory limit (8Gi)" in cluster.status["message"]


def test_round_0_evaluates_the_student_beside_round_1_and_the_run_waits_for_it():
    cluster = Cluster(make_spec(rounds=1, evaluation={"dataset": "s3://d/eval"}))
    result = cluster.start()
    assert [r.name for r in result.create] == ["demo-r0-eval-a1", "demo-r1-sft-a-a1", "demo-r1-sft-b-a1"]
    student = next(r for r in result.create if r.round == 0)
    assert student.args[student.args.index("--model") + 1] == "s3://models/student"
    assert dict(cluster.events)["EvalStarted"] == "evaluation of the student (round 0) started (demo-r0-eval-a1)"
    # Round 1 finishes first: the run waits for the student's score before it succeeds.
    cluster.jobs["demo-r0-eval-a1"].state = "Running"
    for _ in range(4):
        for job in list(cluster.jobs.values()):
            if job.round == 1 and job.state in ("Pending", "Running"):
                cluster.finish(job.name, metrics={"final_loss": 1.0, "accuracy": 0.25})
        cluster.step()
    assert cluster.status["phase"] == "Evaluating"
    assert cluster.status["message"] == "evaluating the student (round 0) to compare the rounds with"
    cluster.finish("demo-r0-eval-a1", metrics={"accuracy": 0.75})
    cluster.step()
    s = cluster.status
    assert s["phase"] == "Succeeded" and s["student"] == {
        "model": "s3://models/student", "evalScore": 0.75, "eval": s["student"]["eval"]}
    assert s["student"]["eval"]["score"] == 0.75 and s["rounds"][0]["evalScore"] == 0.25


def test_a_run_without_evaluation_or_started_before_round_0_existed_has_none():
    plain = Cluster(make_spec(rounds=1))
    plain.start()
    assert "student" not in plain.status and not [n for n in plain.created if "-r0-" in n]
    spec = make_spec(rounds=2, evaluation={"dataset": "s3://d/eval"}, preflight={"enabled": False})
    old = Cluster(spec, status={"phase": "Running", "round": 2, "startTime": "2026-01-01T00:00:00Z",
                                "rounds": [{"round": 1, "init": "s3://models/student", "branches": {},
                                            "mergedCheckpoint": "s3://ckpt/ns/demo/round-1/merged",
                                            "completionTime": "2026-01-01T00:00:00Z"}]})
    old.step()
    assert "student" not in old.status and not [n for n in old.created if "-r0-" in n]


def _run_with_scores(spec, student: float, rounds: list[float]):
    """Run to the end with the student's eval scoring `student` and round r's merged eval rounds[r-1]."""
    cluster = Cluster(spec)
    for _ in range(60):
        cluster.step()
        if cluster.status["phase"] in ("Succeeded", "Failed"):
            return cluster
        for job in list(cluster.jobs.values()):
            if job.state in ("Pending", "Running"):
                score = student if job.round == 0 else rounds[job.round - 1]
                metrics = PREFLIGHT_REPORT if job.stage == "preflight" else {"final_loss": 1.0, "accuracy": score}
                cluster.finish(job.name, metrics=metrics)
    raise AssertionError("run did not finish")


def test_select_best_makes_the_best_scoring_round_final_and_says_why():
    spec = make_spec(rounds=3, evaluation={"dataset": "s3://d/eval", "selectBest": True})
    cluster = _run_with_scores(spec, student=0.5, rounds=[0.4, 0.75, 0.6])
    s = cluster.status
    assert s["phase"] == "Succeeded" and s["finalModel"] == "s3://ckpt/ns/demo/round-2/merged"
    assert s["selected"] == {"round": 2, "checkpoint": "s3://ckpt/ns/demo/round-2/merged", "evalScore": 0.75,
                             "reason": "best eval score 0.75 of rounds 0-3 (spec.evaluation.selectBest); "
                                       "the last round scored 0.6"}
    assert "final model s3://ckpt/ns/demo/round-2/merged (round 2: best eval score 0.75" in s["message"]
    assert dict(cluster.events)["ModelSelected"].startswith("final model: round 2, s3://ckpt/ns/demo/round-2/merged")


def test_select_best_keeps_the_student_when_no_round_beats_it_and_ties_go_to_the_later_round():
    spec = make_spec(rounds=2, evaluation={"dataset": "s3://d/eval", "selectBest": True})
    kept = _run_with_scores(spec, student=0.9, rounds=[0.5, 0.8]).status
    assert kept["finalModel"] == "s3://models/student" and kept["selected"]["round"] == 0
    assert "the student (round 0)" in kept["message"]
    tied = _run_with_scores(spec, student=0.5, rounds=[0.5, 0.5]).status
    assert tied["selected"]["round"] == 2 and tied["finalModel"] == "s3://ckpt/ns/demo/round-2/merged"
    assert "the last round" not in tied["selected"]["reason"]


def test_without_select_best_the_last_round_is_final_whatever_the_scores():
    spec = make_spec(rounds=2, evaluation={"dataset": "s3://d/eval"})
    s = _run_with_scores(spec, student=0.9, rounds=[0.7, 0.1]).status
    assert s["finalModel"] == "s3://ckpt/ns/demo/round-2/merged" and "selected" not in s


def _merge_args(spec, round_):
    cluster = Cluster(spec)
    for _ in range(40):
        result = cluster.step()
        merge = [r for r in result.create if r.stage == "merge" and r.round == round_]
        if merge:
            return merge[0].args
        cluster.finish_active(metrics={"final_loss": 1.0, "accuracy": 0.5})
    raise AssertionError("no merge requested")


def test_outer_optimizer_passes_the_round_start_and_the_velocity_of_the_round_before():
    outer = {"method": "average", "outer": {"learningRate": 0.7, "momentum": 0.9, "nesterov": True}}
    first, second = _merge_args(make_spec(merge=outer), 1), _merge_args(make_spec(merge=outer), 2)

    def value(args, flag):
        return args[args.index(flag) + 1] if flag in args else None

    assert value(first, "--base") == "s3://models/student"
    assert value(first, "--outer-learning-rate") == "0.7" and value(first, "--outer-momentum") == "0.9"
    assert "--outer-nesterov" in first and value(first, "--outer-state-in") is None
    assert value(first, "--outer-state-out") == "s3://ckpt/ns/demo/round-1/outer-state"
    assert value(second, "--base") == "s3://ckpt/ns/demo/round-1/merged"
    assert value(second, "--outer-state-in") == "s3://ckpt/ns/demo/round-1/outer-state"
    assert value(second, "--outer-state-out") == "s3://ckpt/ns/demo/round-2/outer-state"
    # Without momentum there is no state; the identity (the default) adds nothing at all.
    no_state = _merge_args(make_spec(merge={"outer": {"learningRate": 0.5}}), 2)
    assert value(no_state, "--outer-learning-rate") == "0.5" and "--outer-state-out" not in no_state
    plain = _merge_args(make_spec(), 2)
    assert not [a for a in plain if a.startswith("--outer") or a == "--base"]


def test_nesterov_without_momentum_is_refused_naming_the_field():
    with pytest.raises(SpecError) as err:
        make_spec(merge={"outer": {"nesterov": True}})
    assert str(err.value) == "spec.merge.outer.nesterov: Invalid value: nesterov needs momentum > 0"

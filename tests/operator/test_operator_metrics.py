"""Operator metrics: the contract's names, values derived from status transitions, per-run series
removed on delete, and the HTTP port serving /metrics, /healthz and /readyz."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mot_operator import metrics
from mot_operator.operator_cmd import Health, make_server
from mot_operator.planner import Event, Plan

CONTRACT = {
    "mot_runs": "gauge", "mot_run_round": "gauge", "mot_run_last_progress_timestamp_seconds": "gauge",
    "mot_jobs_created": "counter", "mot_jobs_finished": "counter", "mot_job_retries": "counter",
    "mot_stage_duration_seconds": "histogram", "mot_branch_loss": "gauge", "mot_eval_score": "gauge",
    "mot_reconcile_errors": "counter", "mot_branch_progress_ratio": "gauge", "mot_branch_tokens_per_second": "gauge",
    "mot_run_progress_ratio": "gauge", "mot_run_eta_seconds": "gauge",
    "mot_stage_pending_since_timestamp_seconds": "gauge", "mot_stage_disruptions": "counter",
    "mot_stage_restarts": "counter",
}


def value(name, **labels):
    return metrics.REGISTRY.get_sample_value(name, labels)


def status_with(branch_state, attempt=1, merge=None, eval_score=None, phase="Running"):
    rec = {"round": 1, "branches": {"a": {"attempt": attempt, "state": branch_state,
                                          "startTime": "2026-01-01T00:00:00Z",
                                          "completionTime": "2026-01-01T00:01:40Z", "loss": 0.5}}}
    if merge:
        rec["merge"] = {"attempt": 1, "state": merge}
    if eval_score is not None:
        rec["evalScore"] = eval_score
    return {"phase": phase, "round": 1, "rounds": [rec]}


def test_names_and_types_match_the_contract():
    families = {f.name: f.type for f in metrics.REGISTRY.collect()}
    assert families == CONTRACT


def test_transitions_count_finished_jobs_once_with_durations():
    before = value("mot_jobs_finished_total", stage="sft", result="succeeded") or 0
    hist_before = value("mot_stage_duration_seconds_count", stage="sft") or 0
    running = status_with("Running")
    done = status_with("Succeeded")
    metrics.record_transitions(running, done)
    metrics.record_transitions(done, done)  # re-observing (e.g. after a restart) counts nothing
    assert value("mot_jobs_finished_total", stage="sft", result="succeeded") == before + 1
    assert value("mot_stage_duration_seconds_count", stage="sft") == hist_before + 1
    assert value("mot_stage_duration_seconds_bucket", stage="sft", le="120.0") >= 1
    retried = status_with("Succeeded", attempt=2)
    metrics.record_transitions(done, retried)  # a later attempt succeeding counts again
    assert value("mot_jobs_finished_total", stage="sft", result="succeeded") == before + 2


def test_failures_retries_and_created_jobs_are_counted_from_plans():
    before = value("mot_job_retries_total", stage="merge") or 0
    failed = value("mot_jobs_finished_total", stage="merge", result="failed") or 0
    metrics.record_plan(Plan(status={}, events=[
        Event("Warning", "MergeFailed", "x"), Event("Normal", "MergeRetried", "x"), Event("Warning", "Failed", "y")]))
    assert value("mot_job_retries_total", stage="merge") == before + 1
    assert value("mot_jobs_finished_total", stage="merge", result="failed") == failed + 1
    created = value("mot_jobs_created_total", stage="eval") or 0
    metrics.job_created("eval")
    assert value("mot_jobs_created_total", stage="eval") == created + 1


def test_run_gauges_and_removal_on_delete():
    metrics.observe_run("ns1", "run-x", status_with("Succeeded", eval_score=0.4, phase="Evaluating"),
                        progressed=True)
    metrics.observe_run("ns1", "run-y", status_with("Running"), progressed=False)
    assert value("mot_runs", phase="Evaluating") >= 1 and value("mot_runs", phase="Running") >= 1
    assert value("mot_run_round", namespace="ns1", motrun="run-x") == 1
    assert value("mot_branch_loss", namespace="ns1", motrun="run-x", teacher="a") == 0.5
    assert value("mot_eval_score", namespace="ns1", motrun="run-x") == pytest.approx(0.4)
    assert value("mot_run_last_progress_timestamp_seconds", namespace="ns1", motrun="run-x") > 0
    # Without a change in this process (e.g. after a restart) the time comes from the status.
    assert value("mot_run_last_progress_timestamp_seconds", namespace="ns1", motrun="run-y") == (
        metrics.last_progress(status_with("Running")))
    evaluating = value("mot_runs", phase="Evaluating")
    metrics.forget_run("ns1", "run-x")
    assert value("mot_runs", phase="Evaluating") == evaluating - 1
    for name in ("mot_run_round", "mot_eval_score", "mot_run_last_progress_timestamp_seconds"):
        assert value(name, namespace="ns1", motrun="run-x") is None
    assert value("mot_branch_loss", namespace="ns1", motrun="run-x", teacher="a") is None
    assert value("mot_run_round", namespace="ns1", motrun="run-y") == 1  # others untouched
    metrics.forget_run("ns1", "run-y")


@pytest.mark.parametrize("phase", ["Succeeded", "Failed", "Suspended"])
def test_idle_runs_have_no_last_progress_series(phase):
    """The no-progress alert must never fire for a run that is not supposed to move."""
    metrics.observe_run("ns2", "run-idle", status_with("Running"), progressed=True)
    assert value("mot_run_last_progress_timestamp_seconds", namespace="ns2", motrun="run-idle") > 0
    metrics.observe_run("ns2", "run-idle", status_with("Succeeded", phase=phase), progressed=True)
    assert value("mot_run_last_progress_timestamp_seconds", namespace="ns2", motrun="run-idle") is None
    assert value("mot_run_round", namespace="ns2", motrun="run-idle") == 1  # the other gauges stay
    metrics.forget_run("ns2", "run-idle")


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_http_port_serves_metrics_health_and_readiness():
    health = Health()
    server = make_server("127.0.0.1", 0, health, metrics.REGISTRY)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        code, text = get(f"{base}/metrics")
        assert code == 200
        names = {f.name for f in text_string_to_metric_families(text)}
        assert set(CONTRACT) <= names
        assert get(f"{base}/healthz")[0] == 200
        assert get(f"{base}/readyz")[0] == 503  # Kopf not started yet
        health.ready.set()
        assert get(f"{base}/readyz")[0] == 200
        health.heartbeat -= 3600  # the operator loop stopped beating
        assert get(f"{base}/healthz")[0] == 503
        assert get(f"{base}/nope")[0] == 404
    finally:
        server.shutdown()


def test_the_preflight_is_counted_as_a_stage_of_its_own():
    def preflight(state, attempt=1):
        return {"job": f"demo-preflight-a{attempt}", "attempt": attempt, "state": state,
                "startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T00:00:45Z"}

    succeeded = value("mot_jobs_finished_total", stage="preflight", result="succeeded") or 0
    durations = value("mot_stage_duration_seconds_count", stage="preflight") or 0
    sft = value("mot_jobs_finished_total", stage="sft", result="succeeded") or 0
    running = {"phase": "Pending", "round": 1, "rounds": [], "preflight": preflight("Running")}
    passed = {**running, "preflight": preflight("Succeeded")}
    metrics.record_transitions(running, passed)
    metrics.record_transitions(passed, passed)  # re-observed: counted once
    assert value("mot_jobs_finished_total", stage="preflight", result="succeeded") == succeeded + 1
    assert value("mot_stage_duration_seconds_count", stage="preflight") == durations + 1
    assert value("mot_stage_duration_seconds_bucket", stage="preflight", le="60.0") >= 1
    # Round 1's branch a succeeding later counts as sft only: the preflight is not counted again.
    metrics.record_transitions(passed, {**passed, **status_with("Succeeded")})
    assert value("mot_jobs_finished_total", stage="sft", result="succeeded") == sft + 1
    assert value("mot_jobs_finished_total", stage="preflight", result="succeeded") == succeeded + 1

    failed = value("mot_jobs_finished_total", stage="preflight", result="failed") or 0
    retries = value("mot_job_retries_total", stage="preflight") or 0
    metrics.record_plan(Plan(status={}, events=[Event("Warning", "PreflightFailed", "attempt 1 of 3 failed"),
                                                Event("Normal", "PreflightRetried", "attempt 2 of 3 started")]))
    assert value("mot_jobs_finished_total", stage="preflight", result="failed") == failed + 1
    assert value("mot_job_retries_total", stage="preflight") == retries + 1
    metrics.record_plan(Plan(status={}, events=[Event("Normal", "PreflightPassed", "preflight passed")]))
    assert value("mot_jobs_finished_total", stage="preflight", result="failed") == failed + 1  # not a failure
    created = value("mot_jobs_created_total", stage="preflight") or 0
    metrics.job_created("preflight")
    assert value("mot_jobs_created_total", stage="preflight") == created + 1


def branch(state, step=None, total=None, tokens_per_second=None, **extra):
    entry = {"attempt": 1, "state": state, **extra}
    if step is not None:
        entry["progress"] = {"step": step, "totalSteps": total, "tokensPerSecond": tokens_per_second,
                             "updateTime": "2026-01-01T00:05:00Z"}
    return entry


def test_branch_and_run_progress_follow_the_current_round():
    round1 = {"round": 1, "branches": {"a": branch("Running", 10, 40, 512.5), "b": branch("Succeeded", 40, 40, 400.0),
                                       "c": branch("Pending")}}
    status = {"phase": "Running", "round": 1, "rounds": [round1],
              "progress": {"fraction": 0.3, "etaSeconds": 1200, "updateTime": "2026-01-01T00:05:00Z"}}
    metrics.observe_run("ns3", "run-p", status, progressed=True)
    labels = {"namespace": "ns3", "motrun": "run-p"}
    assert value("mot_branch_progress_ratio", **labels, teacher="a") == 0.25
    assert value("mot_branch_progress_ratio", **labels, teacher="b") == 1
    assert value("mot_branch_progress_ratio", **labels, teacher="c") == 0  # shown before its first record
    assert value("mot_branch_tokens_per_second", **labels, teacher="a") == 512.5
    # A finished or not-yet-running branch has no current throughput.
    assert value("mot_branch_tokens_per_second", **labels, teacher="b") is None
    assert value("mot_branch_tokens_per_second", **labels, teacher="c") is None
    assert value("mot_run_progress_ratio", **labels) == pytest.approx(0.3)
    assert value("mot_run_eta_seconds", **labels) == 1200

    # Round 2 trains teachers a and b only: c's series goes, a's throughput goes until it runs again.
    round2 = {"round": 2, "branches": {"a": branch("Pending"), "b": branch("Running", 5, 50, 300.0)}}
    status = {**status, "round": 2, "rounds": [round1, round2], "progress": {"fraction": 0.6, "etaSeconds": 600}}
    metrics.observe_run("ns3", "run-p", status, progressed=True)
    assert value("mot_branch_progress_ratio", **labels, teacher="a") == 0
    assert value("mot_branch_progress_ratio", **labels, teacher="b") == pytest.approx(0.1)
    assert value("mot_branch_progress_ratio", **labels, teacher="c") is None
    assert value("mot_branch_tokens_per_second", **labels, teacher="a") is None
    assert value("mot_branch_tokens_per_second", **labels, teacher="b") == 300
    assert value("mot_run_eta_seconds", **labels) == 600

    # A stopped run keeps its progress but has no ETA and no throughput (even if a branch still says Running).
    done = {**status, "phase": "Failed", "progress": {"fraction": 0.6, "etaSeconds": 600}}
    metrics.observe_run("ns3", "run-p", done, progressed=True)
    assert value("mot_run_progress_ratio", **labels) == pytest.approx(0.6)
    assert value("mot_run_eta_seconds", **labels) is None
    assert value("mot_branch_tokens_per_second", **labels, teacher="b") is None
    assert value("mot_branch_progress_ratio", **labels, teacher="b") == pytest.approx(0.1)
    metrics.observe_run("ns3", "run-p", status, progressed=True)
    metrics.forget_run("ns3", "run-p")
    for name in ("mot_run_progress_ratio", "mot_run_eta_seconds"):
        assert value(name, **labels) is None
    for name in ("mot_branch_progress_ratio", "mot_branch_tokens_per_second"):
        for teacher in "abc":
            assert value(name, **labels, teacher=teacher) is None


def waiting(reason, since="2026-01-01T00:00:00Z"):
    return {"reason": reason, "message": f"{reason}: details", "since": since}


def test_waiting_stages_have_a_pending_since_series_only_while_they_wait():
    since = 1767225600.0  # 2026-01-01T00:00:00Z
    pending = "mot_stage_pending_since_timestamp_seconds"
    labels = {"namespace": "ns4", "motrun": "run-w"}
    status = {"phase": "Running", "round": 1,
              "preflight": {"attempt": 1, "state": "Succeeded"},
              "rounds": [{"round": 1, "branches": {"a": branch("Pending", waiting=waiting("Unschedulable")),
                                                   "b": branch("Running", 1, 10, 100.0)}}]}
    metrics.observe_run("ns4", "run-w", status, progressed=True)
    assert value(pending, **labels, stage="sft", teacher="a", reason="Unschedulable") == since
    assert value(pending, **labels, stage="sft", teacher="b", reason="Unschedulable") is None

    # The reason changes, `since` does not: the old reason's series goes, the new one keeps the time.
    status["rounds"][0]["branches"]["a"] = branch("Pending", waiting=waiting("ImagePullBackOff"))
    status["rounds"][0]["merge"] = {"attempt": 1, "state": "Suspended",
                                    "waiting": waiting("WaitingForAdmission", "2026-01-01T00:10:00Z")}
    metrics.observe_run("ns4", "run-w", status, progressed=True)
    assert value(pending, **labels, stage="sft", teacher="a", reason="Unschedulable") is None
    assert value(pending, **labels, stage="sft", teacher="a", reason="ImagePullBackOff") == since
    # Stages without a teacher have an empty teacher label.
    assert value(pending, **labels, stage="merge", teacher="", reason="WaitingForAdmission") == since + 600

    # Running again: gone. A failed stage (e.g. pendingTimeoutSeconds) waits for nothing either.
    status["rounds"][0]["branches"]["a"] = branch("Running", 1, 10, 90.0)
    status["rounds"][0]["merge"] = {"attempt": 1, "state": "Failed", "waiting": waiting("Unschedulable")}
    metrics.observe_run("ns4", "run-w", status, progressed=True)
    assert value(pending, **labels, stage="sft", teacher="a", reason="ImagePullBackOff") is None
    assert value(pending, **labels, stage="merge", teacher="", reason="WaitingForAdmission") is None
    assert value(pending, **labels, stage="merge", teacher="", reason="Unschedulable") is None

    # A preflight waiting on a run that then stops (failed, succeeded, suspended): no series.
    status = {"phase": "Pending", "round": 1, "rounds": [],
              "preflight": {"attempt": 1, "state": "Pending", "waiting": waiting("ErrImagePull")}}
    metrics.observe_run("ns4", "run-w", status, progressed=True)
    assert value(pending, **labels, stage="preflight", teacher="", reason="ErrImagePull") == since
    metrics.observe_run("ns4", "run-w", {**status, "phase": "Failed"}, progressed=True)
    assert value(pending, **labels, stage="preflight", teacher="", reason="ErrImagePull") is None

    metrics.observe_run("ns4", "run-w", status, progressed=True)
    metrics.forget_run("ns4", "run-w")
    assert value(pending, **labels, stage="preflight", teacher="", reason="ErrImagePull") is None


def disruption(pod, reason="Preempted"):
    return {"pod": pod, "reason": reason, "message": "x", "time": "2026-01-01T00:00:00Z"}


def test_disruptions_are_counted_once_per_pod_from_status_transitions():
    def counts():
        return (value("mot_stage_disruptions_total", stage="sft", reason="Preempted"),
                value("mot_stage_disruptions_total", stage="sft", reason="Evicted"),
                value("mot_stage_disruptions_total", stage="eval", reason="Preempted"))

    def status(branch_pods, eval_pods=()):
        rec = {"round": 1, "branches": {"a": branch("Pending", disruptions=list(branch_pods))}}
        if eval_pods:
            rec["eval"] = {"attempt": 1, "state": "Pending", "disruptions": list(eval_pods)}
        return {"phase": "Running", "round": 1, "rounds": [rec]}

    preempted, evicted, eval_preempted = counts()
    assert preempted is not None and evicted is not None  # every stage and reason starts at 0
    none = status([])
    two = status([disruption("a-0"), disruption("a-1", "Evicted")])
    metrics.record_transitions(none, two)
    metrics.record_transitions(two, two)  # re-observed, e.g. after an operator restart
    assert counts() == (preempted + 1, evicted + 1, eval_preempted)
    # The list keeps the last 10: the oldest dropping out while a new one arrives counts the new one only.
    full = status([disruption(f"a-{i}") for i in range(10)])
    metrics.record_transitions(two, full)
    assert counts() == (preempted + 9, evicted + 1, eval_preempted)
    shifted = status([disruption(f"a-{i}") for i in range(1, 11)], eval_pods=[disruption("e-0")])
    metrics.record_transitions(full, shifted)
    assert counts() == (preempted + 10, evicted + 1, eval_preempted + 1)


def test_whole_group_restarts_are_counted_apart_from_retries():
    """A gang's restart after a disruption (BranchRestarted) is not a retry of a failed Job."""
    restarts, retries = value("mot_stage_restarts_total", stage="sft"), value("mot_job_retries_total", stage="sft")
    assert restarts is not None  # every stage starts at 0
    metrics.record_plan(Plan(status={}, events=[Event("Normal", "BranchRestarted", "attempt 2 started")]))
    assert value("mot_stage_restarts_total", stage="sft") == restarts + 1
    assert value("mot_job_retries_total", stage="sft") == retries

"""Prometheus metrics of the operator (names fixed by docs/architecture.md).

Successes and their durations are derived from status transitions (old status -> new status);
failures and retries from the planner's events, which it emits once per failed attempt. Both come
from status, so an operator restart, which re-reads status, counts nothing twice.
"""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .planner import PHASES, Plan, parse_timestamp

REGISTRY = CollectorRegistry(auto_describe=True)

RUNS = Gauge("mot_runs", "MoTRuns known to the operator, by phase.", ["phase"], registry=REGISTRY)
RUN_ROUND = Gauge("mot_run_round", "Current round of a MoTRun.", ["namespace", "motrun"], registry=REGISTRY)
RUN_LAST_PROGRESS = Gauge("mot_run_last_progress_timestamp_seconds",
                          "Unix time of the MoTRun's last status change.", ["namespace", "motrun"],
                          registry=REGISTRY)
JOBS_CREATED = Counter("mot_jobs_created_total", "Jobs created, by stage (preflight, sft, merge, eval).", ["stage"],
                       registry=REGISTRY)
JOBS_FINISHED = Counter("mot_jobs_finished_total", "Jobs finished, by stage and result (succeeded, failed).",
                        ["stage", "result"], registry=REGISTRY)
JOB_RETRIES = Counter("mot_job_retries_total", "Failed Jobs retried as a new attempt, by stage.", ["stage"],
                      registry=REGISTRY)
STAGE_DURATION = Histogram("mot_stage_duration_seconds", "Wall time of succeeded Jobs, by stage.", ["stage"],
                           buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200,
                                    86400),
                           registry=REGISTRY)
BRANCH_LOSS = Gauge("mot_branch_loss", "Final training loss of the latest finished branch per teacher.",
                    ["namespace", "motrun", "teacher"], registry=REGISTRY)
EVAL_SCORE = Gauge("mot_eval_score", "Evaluation accuracy of the latest merged model.", ["namespace", "motrun"],
                   registry=REGISTRY)
RECONCILE_ERRORS = Counter("mot_reconcile_errors_total", "Reconciliations that raised an error.",
                           registry=REGISTRY)

_STAGE_OF_RETRY = {"PreflightRetried": "preflight", "BranchRetried": "sft", "MergeRetried": "merge",
                   "EvalRetried": "eval"}
_STAGE_OF_FAILURE = {"PreflightFailed": "preflight", "BranchFailed": "sft", "MergeFailed": "merge",
                     "EvalFailed": "eval"}
_lock = threading.Lock()
_phases: dict[tuple[str, str], str] = {}
_teachers: dict[tuple[str, str], set[str]] = {}

for _phase in PHASES:  # every phase is present, at 0, from the start
    RUNS.labels(phase=_phase).set(0)


def _entries(status: dict):
    """(round, stage, teacher, entry) of every stage record in a status (the preflight's round is 0)."""
    if status.get("preflight"):
        yield 0, "preflight", None, status["preflight"]
    for rec in status.get("rounds") or []:
        for teacher, entry in (rec.get("branches") or {}).items():
            yield rec.get("round"), "sft", teacher, entry
        for stage in ("merge", "eval"):
            if rec.get(stage):
                yield rec.get("round"), stage, None, rec[stage]


def record_transitions(old: dict, new: dict) -> None:
    """Count Jobs that succeeded between two statuses, with their durations."""
    before = {(r, s, t): (e.get("attempt"), e.get("state")) for r, s, t, e in _entries(old or {})}
    for round_, stage, teacher, entry in _entries(new):
        if entry.get("state") != "Succeeded" or before.get((round_, stage, teacher)) == (
                entry.get("attempt"), "Succeeded"):
            continue
        JOBS_FINISHED.labels(stage=stage, result="succeeded").inc()
        if entry.get("startTime") and entry.get("completionTime"):
            seconds = (parse_timestamp(entry["completionTime"]) - parse_timestamp(entry["startTime"])).total_seconds()
            STAGE_DURATION.labels(stage=stage).observe(max(seconds, 0.0))


def record_plan(plan: Plan) -> None:
    for event in plan.events:
        if event.reason in _STAGE_OF_FAILURE:
            JOBS_FINISHED.labels(stage=_STAGE_OF_FAILURE[event.reason], result="failed").inc()
        if event.reason in _STAGE_OF_RETRY:
            JOB_RETRIES.labels(stage=_STAGE_OF_RETRY[event.reason]).inc()


IDLE_PHASES = frozenset({"Succeeded", "Failed", "Suspended"})


def job_created(stage: str) -> None:
    JOBS_CREATED.labels(stage=stage).inc()


def observe_run(namespace: str, name: str, status: dict, progressed: bool) -> None:
    """Refresh a run's gauges from its status; `progressed` stamps the last-progress time."""
    key = (namespace, name)
    with _lock:
        if status.get("phase"):
            _phases[key] = status["phase"]
        _refresh_phase_counts()
    if status.get("round"):
        RUN_ROUND.labels(namespace=namespace, motrun=name).set(status["round"])
    last = last_progress(status)
    if status.get("phase") in IDLE_PHASES:
        # A finished or suspended run is not expected to progress: drop the series so the
        # "no progress" alert only ever looks at runs that should be moving.
        _remove(RUN_LAST_PROGRESS, namespace, name)
    elif progressed or last is not None:
        RUN_LAST_PROGRESS.labels(namespace=namespace, motrun=name).set(time.time() if progressed else last)
    losses: dict[str, float] = {}
    score = None
    for rec in status.get("rounds") or []:
        for teacher, entry in (rec.get("branches") or {}).items():
            if entry.get("loss") is not None:
                losses[teacher] = entry["loss"]
        if rec.get("evalScore") is not None:
            score = rec["evalScore"]
    for teacher, loss in losses.items():
        BRANCH_LOSS.labels(namespace=namespace, motrun=name, teacher=teacher).set(loss)
    with _lock:
        _teachers.setdefault(key, set()).update(losses)
    if score is not None:
        EVAL_SCORE.labels(namespace=namespace, motrun=name).set(score)


def last_progress(status: dict) -> float | None:
    """Unix time of the newest transition recorded in a status (survives operator restarts)."""
    stamps = [status.get("startTime"), status.get("completionTime")]
    stamps += [c.get("lastTransitionTime") for c in status.get("conditions") or []]
    for rec in status.get("rounds") or []:
        stamps += [rec.get("startTime"), rec.get("completionTime")]
    for _round, _stage, _teacher, entry in _entries(status):
        stamps += [entry.get("startTime"), entry.get("completionTime")]
    times = [parse_timestamp(s).timestamp() for s in stamps if s]
    return max(times) if times else None


def forget_run(namespace: str, name: str) -> None:
    """The run was deleted: drop its series and stop counting it."""
    key = (namespace, name)
    with _lock:
        _phases.pop(key, None)
        teachers = _teachers.pop(key, set())
        _refresh_phase_counts()
    for gauge in (RUN_ROUND, RUN_LAST_PROGRESS, EVAL_SCORE):
        _remove(gauge, namespace, name)
    for teacher in teachers:
        _remove(BRANCH_LOSS, namespace, name, teacher)


def _remove(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass


def _refresh_phase_counts() -> None:
    counts = dict.fromkeys(PHASES, 0)
    for phase in _phases.values():
        counts[phase] = counts.get(phase, 0) + 1
    for phase, count in counts.items():
        RUNS.labels(phase=phase).set(count)

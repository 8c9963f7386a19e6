"""Prometheus metrics of the operator (names fixed by docs/architecture.md).

Successes, their durations and disrupted Pods are derived from status transitions (old status ->
new status); failures and retries from the planner's events, which it emits once per failed attempt.
Both come from status, so an operator restart, which re-reads status, counts nothing twice. Gauges
(progress, ETA, waiting stages) are read from the latest status.
"""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import contract
from .contract import parse_timestamp
from .planner import PHASES, Plan, stage_entries

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
BRANCH_PROGRESS = Gauge("mot_branch_progress_ratio",
                        "Steps done out of planned (0..1) of each branch of the current round.",
                        ["namespace", "motrun", "teacher"], registry=REGISTRY)
BRANCH_TOKENS = Gauge("mot_branch_tokens_per_second", "Training throughput of each running branch.",
                      ["namespace", "motrun", "teacher"], registry=REGISTRY)
RUN_PROGRESS = Gauge("mot_run_progress_ratio", "Estimated fraction (0..1) of the MoTRun done.",
                     ["namespace", "motrun"], registry=REGISTRY)
RUN_ETA = Gauge("mot_run_eta_seconds", "Estimated seconds until the MoTRun finishes.", ["namespace", "motrun"],
                registry=REGISTRY)
STAGE_PENDING_SINCE = Gauge("mot_stage_pending_since_timestamp_seconds",
                            "Unix time since which a started stage has had no running Pod, by reason; "
                            "present only while it waits (teacher empty for preflight, merge, eval).",
                            ["namespace", "motrun", "stage", "teacher", "reason"], registry=REGISTRY)
STAGE_DISRUPTIONS = Counter("mot_stage_disruptions_total",
                            "Pods ended by a disruption (preemption, eviction), by stage and reason; "
                            "not failed attempts.", ["stage", "reason"], registry=REGISTRY)
STAGE_RESTARTS = Counter("mot_stage_restarts_total",
                         "Whole-group restarts of multi-node stages after a disruption (a JobSet's restart, "
                         "or a new attempt of a plain Job); not failed attempts.", ["stage"], registry=REGISTRY)
RECONCILE_ERRORS = Counter("mot_reconcile_errors_total", "Reconciliations that raised an error.",
                           registry=REGISTRY)

_lock = threading.Lock()
_phases: dict[tuple[str, str], str] = {}
_teachers: dict[tuple[str, str], set[str]] = {}
# Label values of the per-run series that come and go with the status, to remove the stale ones.
_branch_series: dict[tuple[str, str], dict[object, set[str]]] = {}
_pending_series: dict[tuple[str, str], set[tuple[str, str, str]]] = {}
DISRUPTION_REASONS = ("Preempted", "Evicted", "Disrupted")
ACTIVE_STATES = frozenset({"Pending", "Running", "Suspended", "Retrying"})

for _phase in PHASES:  # every phase is present, at 0, from the start
    RUNS.labels(phase=_phase).set(0)
for _stage in contract.STAGES:  # from 0, so increase() sees a stage's first disruption too
    STAGE_RESTARTS.labels(stage=_stage)
    for _reason in DISRUPTION_REASONS:
        STAGE_DISRUPTIONS.labels(stage=_stage, reason=_reason)


def record_transitions(old: dict, new: dict) -> None:
    """Count Jobs that succeeded and Pods disrupted between two statuses, with Job durations."""
    before = {(r, s, t): (e.get("attempt"), e.get("state")) for r, s, t, e in stage_entries(old or {})}
    disrupted_before = {(r, s, t): {d.get("pod") for d in e.get("disruptions") or []}
                        for r, s, t, e in stage_entries(old or {})}
    for round_, stage, teacher, entry in stage_entries(new):
        # A Pod is named once in a stage's list (the planner dedupes by name), so a name the old
        # status lacks is a new disruption.
        known = disrupted_before.get((round_, stage, teacher), set())
        for disruption in entry.get("disruptions") or []:
            if disruption.get("pod") not in known:
                STAGE_DISRUPTIONS.labels(stage=stage, reason=disruption.get("reason") or "Disrupted").inc()
        if entry.get("state") != "Succeeded" or before.get((round_, stage, teacher)) == (
                entry.get("attempt"), "Succeeded"):
            continue
        JOBS_FINISHED.labels(stage=stage, result="succeeded").inc()
        if entry.get("startTime") and entry.get("completionTime"):
            seconds = (parse_timestamp(entry["completionTime"]) - parse_timestamp(entry["startTime"])).total_seconds()
            STAGE_DURATION.labels(stage=stage).observe(max(seconds, 0.0))


def record_plan(plan: Plan) -> None:
    for event in plan.events:
        failed = contract.stage_of_reason(event.reason, "Failed")
        if failed:
            JOBS_FINISHED.labels(stage=failed, result="failed").inc()
        retried = contract.stage_of_reason(event.reason, "Retried")
        if retried:
            JOB_RETRIES.labels(stage=retried).inc()
        restarted = contract.stage_of_reason(event.reason, "Restarted")
        if restarted:
            STAGE_RESTARTS.labels(stage=restarted).inc()


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
    _observe_progress(namespace, name, status)
    _observe_waiting(namespace, name, status)


def _current_round(status: dict) -> dict:
    rounds = status.get("rounds") or []
    return next((r for r in rounds if r.get("round") == status.get("round")), rounds[-1] if rounds else {})


def _observe_progress(namespace: str, name: str, status: dict) -> None:
    """Branch and run progress gauges; a branch's series follow the current round's teachers."""
    key = (namespace, name)
    fractions: dict[str, float] = {}
    rates: dict[str, float] = {}
    active = status.get("phase") not in IDLE_PHASES
    for teacher, entry in (_current_round(status).get("branches") or {}).items():
        progress = entry.get("progress") or {}
        if entry.get("state") == "Succeeded":
            fractions[teacher] = 1.0
        elif progress.get("step") is not None and progress.get("totalSteps"):
            fractions[teacher] = min(progress["step"] / progress["totalSteps"], 1.0)
        else:
            fractions[teacher] = 0.0  # not started (or no record yet): shown at 0, not missing
        # Throughput only while the trainer runs: the last record of a finished, pending or stopped
        # branch is stale.
        if active and entry.get("state") == "Running" and progress.get("tokensPerSecond") is not None:
            rates[teacher] = progress["tokensPerSecond"]
    _set_series(key, BRANCH_PROGRESS, fractions)
    _set_series(key, BRANCH_TOKENS, rates)
    run = status.get("progress") or {}
    if run.get("fraction") is not None:
        RUN_PROGRESS.labels(namespace=namespace, motrun=name).set(run["fraction"])
    else:
        _remove(RUN_PROGRESS, namespace, name)
    if run.get("etaSeconds") is not None and active:
        RUN_ETA.labels(namespace=namespace, motrun=name).set(run["etaSeconds"])
    else:
        _remove(RUN_ETA, namespace, name)


def _set_series(key: tuple[str, str], gauge: Gauge, values: dict[str, float]) -> None:
    """Set per-teacher series of a run and remove those of teachers no longer in `values`."""
    with _lock:
        known = _branch_series.setdefault(key, {})
        stale = known.get(gauge, set()) - values.keys()
        known[gauge] = set(values)
    for teacher, number in values.items():
        gauge.labels(namespace=key[0], motrun=key[1], teacher=teacher).set(number)
    for teacher in stale:
        _remove(gauge, *key, teacher)


def _observe_waiting(namespace: str, name: str, status: dict) -> None:
    """One series per waiting stage, valued at its `since`; gone once it runs, ends or the run stops."""
    waiting: dict[tuple[str, str, str], float] = {}
    if status.get("phase") not in IDLE_PHASES:  # a stopped run's stages wait for nothing
        for _round, stage, teacher, entry in stage_entries(status):
            info = entry.get("waiting") or {}
            if entry.get("state") in ACTIVE_STATES and info.get("since"):
                labels = (stage, teacher or "", info.get("reason") or "PodPending")
                waiting[labels] = parse_timestamp(info["since"]).timestamp()
    with _lock:
        stale = _pending_series.get((namespace, name), set()) - waiting.keys()
        _pending_series[(namespace, name)] = set(waiting)
    for labels, since in waiting.items():
        STAGE_PENDING_SINCE.labels(namespace, name, *labels).set(since)
    for labels in stale:
        _remove(STAGE_PENDING_SINCE, namespace, name, *labels)


def last_progress(status: dict) -> float | None:
    """Unix time of the newest transition recorded in a status (survives operator restarts)."""
    stamps = [status.get("startTime"), status.get("completionTime")]
    stamps += [c.get("lastTransitionTime") for c in status.get("conditions") or []]
    for rec in status.get("rounds") or []:
        stamps += [rec.get("startTime"), rec.get("completionTime")]
    for _round, _stage, _teacher, entry in stage_entries(status):
        stamps += [entry.get("startTime"), entry.get("completionTime")]
    times = [parse_timestamp(s).timestamp() for s in stamps if s]
    return max(times) if times else None


def forget_run(namespace: str, name: str) -> None:
    """The run was deleted: drop its series and stop counting it."""
    key = (namespace, name)
    with _lock:
        _phases.pop(key, None)
        teachers = _teachers.pop(key, set())
        branch_series = _branch_series.pop(key, {})
        pending = _pending_series.pop(key, set())
        _refresh_phase_counts()
    for gauge in (RUN_ROUND, RUN_LAST_PROGRESS, EVAL_SCORE, RUN_PROGRESS, RUN_ETA):
        _remove(gauge, namespace, name)
    for teacher in teachers:
        _remove(BRANCH_LOSS, namespace, name, teacher)
    for gauge, series in branch_series.items():
        for teacher in series:
            _remove(gauge, namespace, name, teacher)
    for labels in pending:
        _remove(STAGE_PENDING_SINCE, namespace, name, *labels)


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

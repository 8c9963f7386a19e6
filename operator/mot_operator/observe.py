"""What a run's Jobs say, read from their bodies and their Pods' (pure functions): an ObservedJob per
Job for the planner, whether a Job has ended, and the merge patch that writes a new status."""

from __future__ import annotations

from . import jobs as jobrender
from . import naming, podstate
from .contract import EXIT_INVALID_INPUT, EXIT_OK, parse_timestamp, read_result
from .planner import MESSAGE_LIMIT, ObservedJob


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:MESSAGE_LIMIT]


def observe_job(job: dict, pods: list[dict] = (), *, gang: bool | None = None) -> ObservedJob | None:
    """An ObservedJob from a Job body (labels, spec.suspend/parallelism, status) and its Pods (podstate
    snapshots or bodies): the trainer's termination message, what Kubernetes says ended them, why none
    runs yet. A gang (several Pods) names the Pod that failed first."""
    meta = job.get("metadata") or {}
    labels = meta.get("labels") or {}
    try:
        stage = labels[naming.LABEL_STAGE]
        round_ = int(labels[naming.LABEL_ROUND])
        attempt = int(labels[naming.LABEL_ATTEMPT])
    except (KeyError, ValueError):
        return None  # not one of ours, or labels edited by hand
    status = job.get("status") or {}
    true = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    if gang is None:
        gang = len(pods) > 1 or int((job.get("spec") or {}).get("parallelism") or 1) > 1
    terms = [t for t in (podstate.termination(p) for p in pods) if t]
    # The rank that failed first, before those its Job stopped after it (deleted, ended later).
    deleted = {p["metadata"]["name"] for p in pods if p["metadata"].get("deletionTimestamp")}
    failed_terms = sorted((t for t in terms if t["exit_code"] not in (EXIT_OK, None)),
                          key=lambda t: (t["pod"] in deleted, t["finished_at"]))
    disrupted = False
    started = status.get("startTime")
    finished = None
    permanent = False
    metrics_ = None
    message = ""
    cause = None
    waiting = None
    if "Complete" in true or "SuccessCriteriaMet" in true:
        state = "Succeeded"
        finished = status.get("completionTime") or true.get("Complete", true.get("SuccessCriteriaMet")).get(
            "lastTransitionTime")
        for term in terms:
            # Whole: a summary (the preflight's grows with the teachers) may pass MESSAGE_LIMIT.
            metrics_ = read_result(term["message"])
            if metrics_ is not None:
                break
    elif "Failed" in true or "FailureTarget" in true:
        state = "Failed"
        cond = true.get("Failed") or true.get("FailureTarget")
        finished = cond.get("lastTransitionTime")
        # A gang's Job ends on a DisruptionTarget (jobs.py): not the trainer's fault, not counted.
        disrupted = jobrender.DISRUPTION_FAILURE in (cond.get("message") or "")
        permanent = (cond.get("reason") == "PodFailurePolicy" and not disrupted) or any(
            t["exit_code"] == EXIT_INVALID_INPUT for t in failed_terms)
        found = podstate.failure_cause(pods)
        source = failed_terms or terms
        message = _last_line(source[0]["message"]) if source else ""
        if gang and failed_terms and not disrupted:  # say which rank: the others were stopped after it
            first = failed_terms[0]
            message = f"Pod {first['pod']} (exit code {first['exit_code']}{', ' + first['reason'] if first['reason'] else ''})" + (
                f": {message}" if message else "")
        if found:
            cause = found[0]
            message = message or found[1][:MESSAGE_LIMIT]
        elif cond.get("reason") == "DeadlineExceeded":  # spec.activeDeadlineSeconds
            cause = "DeadlineExceeded"
        elif disrupted:
            cause = "Disrupted"
            message = f"the whole attempt ended: {cond.get('message')}"[:MESSAGE_LIMIT]
        if not message:
            message = f"{cond.get('reason') or 'Failed'}: {cond.get('message') or 'the Job failed'}"[:MESSAGE_LIMIT]
    elif (job.get("spec") or {}).get("suspend"):
        state = "Suspended"
    elif status.get("ready") or any(podstate.running(p) for p in pods):
        state = "Running"
    else:
        # Started (or not yet) but no Pod runs: say why when the Pods do.
        state = "Pending"
        if started:
            waiting = podstate.waiting([p for p in pods if podstate.job_of(p) in (None, meta.get("name"))])
    return ObservedJob(
        name=meta.get("name", ""), stage=stage, round=round_, teacher=labels.get(naming.LABEL_TEACHER),
        attempt=attempt, state=state, permanent=permanent, message=message, metrics=metrics_,
        started_at=parse_timestamp(started) if started else None,
        finished_at=parse_timestamp(finished) if finished else None,
        waiting=waiting, reason=cause, gang=gang, disrupted=disrupted,
        pods_left=sum(1 for p in pods if not podstate.terminal(p)),
    )


def observe_jobset(jobset: dict, pods: list[dict] = ()) -> ObservedJob | None:
    """An ObservedJob from a JobSet running a multi-node branch (jobs.render_jobset) and its Pods, read
    as its Job would be: Completed is Complete, Failed is Failed; its restarts (whole-group restarts
    after a disruption) are counted. Only the Pods of its current restart are read for the outcome."""
    status = jobset.get("status") or {}
    restarts = int(status.get("restarts") or 0)
    current = [p for p in pods if str(((p.get("metadata") or {}).get("labels") or {}).get(
        naming.LABEL_JOBSET_RESTART, restarts)) == str(restarts)]
    renamed = {"Completed": "Complete", "Failed": "Failed"}
    conditions = [{**c, "type": renamed[c["type"]]} for c in status.get("conditions") or []
                  if c.get("type") in renamed]
    suspended = bool((jobset.get("spec") or {}).get("suspend"))
    # Started (as a Job's status.startTime) when created unsuspended, or when resumed (Kueue admitted it).
    resumed = [c.get("lastTransitionTime") for c in status.get("conditions") or []
               if c.get("type") == "Suspended" and c.get("status") == "False"]
    start = None if suspended else (resumed[-1] if resumed else (jobset.get("metadata") or {}).get("creationTimestamp"))
    as_job = {"metadata": jobset.get("metadata") or {}, "spec": {"suspend": suspended},
              "status": {"conditions": conditions, **({"startTime": start} if start else {})}}
    found = observe_job(as_job, current, gang=True)
    if found is not None:
        found.kind, found.restarts = "JobSet", restarts
        found.pods_left = sum(1 for p in pods if not podstate.terminal(p))
    return found


def merge_patch(old, new):
    """RFC 7386 merge patch turning `old` into `new` (None deletes a key; lists are replaced)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            patch[key] = merge_patch(old[key], value)
    return patch


def job_finished(job: dict) -> bool:
    """The Job has a condition that ends it (Complete/SuccessCriteriaMet, Failed/FailureTarget)."""
    conditions = (job.get("status") or {}).get("conditions") or []
    return any(c.get("status") == "True" and c.get("type") in ("Complete", "SuccessCriteriaMet", "Failed",
                                                                "FailureTarget") for c in conditions)

"""The MoT state machine, pure: (spec, status, observed Jobs, now) -> new status and actions.

Both executors (the Kopf controller and the local runner) observe their Jobs, call `plan`, write
the returned status, then create/suspend/resume/delete what it says. Status is written first, so
an executor restarted at any moment finds every Job it may have created named in status (names are
deterministic): a Job named there but not observed is simply created again (AlreadyExists = adopt).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from . import contract, naming
from .contract import TRAINER_METRICS_PORT, parse_timestamp, timestamp
from .spec import MoTRunSpec, RoleResources, SpecError

PHASES = ("Pending", "Running", "Merging", "Evaluating", "Succeeded", "Failed", "Suspended")
TERMINAL = ("Succeeded", "Failed")
ACTIVE_JOB_STATES = ("Pending", "Running", "Suspended")
CONDITION_TYPES = ("Ready", "Progressing", "Succeeded", "Failed", "Suspended")
MAX_BACKOFF_SECONDS = 600.0
# Waiting reasons that mean a stage is stuck (told in an Event, the run's reason and message);
# ContainerCreating and PodPending are the normal way to start.
STUCK_REASONS = ("Unschedulable", "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                 "CrashLoopBackOff", "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
                 "WaitingForAdmission", "Preempted", "Evicted")
DISRUPTION_VERB = {"Preempted": "was preempted", "Evicted": "was evicted"}
MAX_DISRUPTIONS = 10
# How often a gang's next attempt looks again whether its last attempt's Pods are gone (the Pods'
# events wake the operator sooner).
POD_GONE_POLL_SECONDS = 2.0
MESSAGE_LIMIT = 1024
PROGRESS_KEYS = ("step", "totalSteps", "loss", "learningRate", "tokensPerSecond", "etaSeconds")


@dataclass(frozen=True)
class RunRef:
    namespace: str
    name: str
    uid: str = ""
    generation: int = 1


@dataclass
class ObservedJob:
    name: str
    stage: str
    round: int
    teacher: str | None
    attempt: int
    state: str
    permanent: bool = False
    message: str = ""
    metrics: dict | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: dict | None = None  # the trainer's latest progress record (rank 0)
    waiting: dict | None = None  # {"reason", "message"}: why none of its Pods runs yet
    disruptions: list[dict] = field(default_factory=list)  # [{"pod", "reason", "message"}], not failures
    reason: str | None = None  # a failed Job's cause when known (OOMKilled, Evicted, DeadlineExceeded ...)
    kind: str = "Job"  # or "JobSet" (what to suspend, resume and delete by this name)
    gang: bool = False  # several Pods per attempt (a multi-node branch): any failing ends all of them
    disrupted: bool = False  # failed because a Pod of the gang was disrupted: not counted as a failure
    pods_left: int = 0  # its Pods not yet ended: the next attempt of a gang waits until none is left
    restarts: int = 0  # whole-group restarts a JobSet made after disruptions (not failures)


@dataclass
class JobRequest:
    name: str
    stage: str
    round: int
    teacher: str | None
    attempt: int
    args: list[str]
    output_uri: str
    resources: RoleResources
    kind: str = "Job"  # or "JobSet": a multi-node branch run by JobSet (spec.resources.branch.backend)


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Plan:
    status: dict
    create: list[JobRequest] = field(default_factory=list)
    suspend: list[str] = field(default_factory=list)
    resume: list[str] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None


def backoff_seconds(spec: MoTRunSpec, failed_attempt: int) -> float:
    """Wait before attempt n+1 after attempt n failed: base, doubling, capped."""
    return min(spec.retry_backoff_seconds * 2.0 ** (failed_attempt - 1), MAX_BACKOFF_SECONDS)


def plan(run: RunRef, spec: MoTRunSpec, status: dict, jobs: list[ObservedJob], now: datetime, *,
         metrics_port: int | None = TRAINER_METRICS_PORT, threads: int | None = None,
         gpu_memory: int | None = None, jobset: bool | None = None) -> Plan:
    """Decide the run's next status and actions. Pure: no I/O, no clock.

    `metrics_port`, `threads` and `gpu_memory` are the executor's part of the trainer's command lines
    (JobRequest.args): the port branch Jobs serve metrics on (None: none), --threads for sft and eval
    over the spec's, and the memory of one GPU a branch can run on, in bytes (None: unknown), which the
    preflight checks one branch against (contract.preflight_args). `jobset`: whether the cluster runs
    JobSets for the operator (None where no cluster runs the Jobs: `mot run`), which decides what runs
    a multi-node branch (spec.resources.branch.backend)."""
    return _Planner(run, spec, status, jobs, now, metrics_port=metrics_port, threads=threads,
                    gpu_memory=gpu_memory, jobset=jobset).run()


def plan_invalid(run: RunRef, status: dict, error: SpecError, now: datetime) -> Plan:
    """A spec that cannot be parsed fails the run, naming the field (the spec is immutable)."""
    status = copy.deepcopy(status or {})
    if status.get("phase") in TERMINAL:
        return Plan(status=status)
    status.setdefault("startTime", timestamp(now))
    status.update(phase="Failed", completionTime=timestamp(now), message=f"invalid spec: {error}",
                  failure={"stage": "spec", "reason": str(error)})
    status["observedGeneration"] = run.generation
    _set_conditions(status, "Failed", "InvalidSpec", status["message"], now, run.generation)
    return Plan(status=status, events=[Event("Warning", "Failed", status["message"])])


def preflight_resources(spec: MoTRunSpec) -> RoleResources:
    """The preflight Pod's own small request: no GPU and no node selector or priority class (those
    pin the roles to GPU nodes); the merge role's tolerations, which only widen where it may run."""
    return RoleResources(cpu=spec.preflight.cpu, memory=spec.preflight.memory,
                         tolerations=spec.resources.merge.tolerations)


# ---------------------------------------------------------------------------------------------


class _Planner:
    def __init__(self, run: RunRef, spec: MoTRunSpec, status: dict, jobs: list[ObservedJob], now: datetime, *,
                 metrics_port: int | None = TRAINER_METRICS_PORT, threads: int | None = None,
                 gpu_memory: int | None = None, jobset: bool | None = None):
        self.run_ref = run
        self.jobset = jobset
        self.metrics_port = metrics_port
        self.threads = threads
        self.gpu_memory = gpu_memory
        self.spec = spec
        self.status = copy.deepcopy(status or {})
        self.jobs = {j.name: j for j in jobs}
        self.now = now
        self.out = Plan(status=self.status)
        self.may_start = not spec.suspend
        self.failure_reason: str | None = None
        self.stuck: list[tuple[str, str, str]] = []  # (stage described, reason, message), in plan order

    # -- helpers ------------------------------------------------------------------------------

    def event(self, reason: str, message: str, warning: bool = False) -> None:
        self.out.events.append(Event("Warning" if warning else "Normal", reason, message))

    def requeue(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        current = self.out.requeue_after
        self.out.requeue_after = seconds if current is None else min(current, seconds)

    def uri(self, kind: str, round_: int, teacher: str | None = None) -> str:
        base, ns, name = self.spec.storage.uri, self.run_ref.namespace, self.run_ref.name
        if kind == "preflight":
            return naming.preflight_uri(base, ns, name)
        if kind == "sft":
            return naming.branch_uri(base, ns, name, round_, teacher)
        if kind == "merge":
            return naming.merged_uri(base, ns, name, round_)
        return naming.eval_uri(base, ns, name, round_)

    def record(self, round_: int) -> dict:
        rounds = self.status.setdefault("rounds", [])
        for rec in rounds:
            if rec.get("round") == round_:
                return rec
        init = self.spec.student if round_ == 1 else self.record(round_ - 1).get("mergedCheckpoint")
        rec = {"round": round_, "init": init, "startTime": timestamp(self.now), "branches": {}}
        rounds.append(rec)
        rounds.sort(key=lambda r: r["round"])
        return rec

    def active_jobs(self, min_round: int = 0) -> list[str]:
        return sorted(j.name for j in self.jobs.values()
                      if j.state in ACTIVE_JOB_STATES and j.round >= min_round)

    # -- main ---------------------------------------------------------------------------------

    def run(self) -> Plan:
        s = self.status
        if s.get("phase") in TERMINAL:
            # Final: never restarted. Only stop anything a crash left running.
            self.out.delete = self.active_jobs()
            return self.out
        if not s.get("phase"):
            s.update(phase="Pending", startTime=timestamp(self.now), round=1, rounds=[])
        if not self.spec.storage.uri:
            self.fail("spec", None, 0, "spec.storage.uri is not set and the operator has no default storage URI",
                      code="StorageNotSet", round_=s["round"])
            return self.finish()
        if self.gang_kind() == "JobSet" and self.jobset is False:
            self.fail("spec", None, 0, "spec.resources.branch.backend is jobset, but the operator runs no JobSets: "
                      "install JobSet (sigs.k8s.io/jobset) and turn on the chart's jobset.enabled, or use "
                      "backend auto or job", code="JobSetUnavailable", round_=s["round"])
            return self.finish()
        self.handle_suspension()
        if s["round"] > self.spec.rounds:
            self.shorten()
            return self.finish()
        if self.needs_preflight():
            outcome = self.advance_stage(s, "preflight")
            if outcome != "done":
                if outcome == "waiting":
                    count = len(self.spec.teachers)
                    self.set_phase("Pending", f"preflight: checking the student, {count} teacher"
                                   f"{'s' if count != 1 else ''}' data{', the eval set' if self.spec.evaluation else ''}"
                                   " and storage")
                return self.finish()
        student = self.advance_student_eval()
        if student == "failed":
            return self.finish()
        while True:
            outcome = self.advance_round(s["round"])
            if outcome != "done":
                break
            if s["round"] >= self.spec.rounds:
                if student == "done":
                    self.succeed()
                else:  # every round is done; the student's own score is still to come
                    self.set_phase("Evaluating", "evaluating the student (round 0) to compare the rounds with")
                break
            s["round"] += 1
        return self.finish()

    def advance_student_eval(self) -> str:
        """Round 0: the student's own eval, beside round 1, so every run shows where it started (SFT
        can lower a strong student). Only with spec.evaluation, and not for a run that had rounds
        before this stage existed."""
        s = self.status
        if self.spec.evaluation is None or ("student" not in s and s.get("rounds")):
            return "done"
        rec = s.setdefault("student", {"model": self.spec.student})
        outcome = self.advance_stage(rec, "eval")
        if outcome == "done" and rec["eval"].get("score") is not None:
            rec["evalScore"] = rec["eval"]["score"]
        return outcome

    def handle_suspension(self) -> None:
        s = self.status
        if self.spec.suspend:
            self.out.suspend = sorted(j.name for j in self.jobs.values() if j.state in ("Pending", "Running"))
            if s.get("phase") != "Suspended":
                self.event("Suspended", "spec.suspend is true: no new Jobs; running Jobs suspended")
            return
        if s.get("phase") == "Suspended":
            self.event("Resumed", "spec.suspend is false: resuming where the run stopped")
        # With Kueue, admission (un)suspends Jobs; the preflight is never queued (jobs.py).
        self.out.resume = sorted(j.name for j in self.jobs.values() if j.state == "Suspended"
                                 and (not self.spec.queue_name or j.stage == "preflight"))

    def needs_preflight(self) -> bool:
        return preflight_applies(self.spec, self.status)

    def shorten(self) -> None:
        """`rounds` was lowered below the round in progress: the last kept round's merge is final."""
        s = self.status
        self.out.delete = self.active_jobs(min_round=self.spec.rounds + 1)
        s["rounds"] = [r for r in s.get("rounds", []) if r["round"] <= self.spec.rounds]
        s["round"] = self.spec.rounds
        self.event("RoundsChanged", f"spec.rounds lowered to {self.spec.rounds}: stopping after round "
                   f"{self.spec.rounds}")
        self.succeed()

    def advance_round(self, round_: int) -> str:
        rec = self.record(round_)
        if not rec.get("init"):
            self.fail("spec", None, 0, f"round {round_} has no starting checkpoint", round_=round_,
                      code="MissingCheckpoint")
            return "failed"
        branch_states = [self.advance_stage(rec, "sft", t.name) for t in self.spec.teachers]
        if "failed" in branch_states:
            return "failed"
        if "waiting" in branch_states:
            self.set_phase("Running", self.branch_message(rec))
            return "waiting"
        outcome = self.advance_stage(rec, "merge")
        if outcome != "done":
            if outcome == "waiting":
                self.set_phase("Merging", f"round {self.display()}: merging {len(self.spec.teachers)} branches")
            return outcome
        rec["mergedCheckpoint"] = rec["merge"]["checkpoint"]
        if self.spec.evaluation is not None:
            outcome = self.advance_stage(rec, "eval")
            if outcome != "done":
                if outcome == "waiting":
                    self.set_phase("Evaluating", f"round {self.display()}: evaluating the merged model")
                return outcome
            if rec["eval"].get("score") is not None:
                rec["evalScore"] = rec["eval"]["score"]
        if not rec.get("completionTime"):
            rec["completionTime"] = timestamp(self.now)
            score = f", eval score {rec['evalScore']:.4g}" if rec.get("evalScore") is not None else ""
            self.event("RoundCompleted", f"round {round_}/{self.spec.rounds} completed: merged model "
                       f"{rec['mergedCheckpoint']}{score}")
        return "done"

    def branch_message(self, rec: dict) -> str:
        done = sum(1 for b in rec["branches"].values() if b.get("state") == "Succeeded")
        retrying = [t for t, b in rec["branches"].items() if b.get("state") == "Retrying"]
        text = f"round {self.display()}: {done}/{len(self.spec.teachers)} branches succeeded"
        if retrying:
            text += f"; retrying {', '.join(sorted(retrying))}"
        return text

    # -- one stage (a branch, the merge or the eval of a round) -------------------------------

    def advance_stage(self, rec: dict, stage: str, teacher: str | None = None) -> str:
        """Move one stage on; returns "done", "waiting" or "failed". `rec` is the round's record
        (the status itself for the preflight, which belongs to no round)."""
        round_ = _round_of(rec, stage)
        container = rec["branches"] if stage == "sft" else rec
        key = teacher if stage == "sft" else stage
        entry = container.get(key)
        if entry is None:
            if self.may_start:
                container[key] = self.start(rec, stage, teacher, attempt=1)
            return "waiting"
        state = entry.get("state")
        if state == "Succeeded":
            late = self.jobs.get(entry["job"])
            if late is not None and late.state == "Succeeded":
                self.record_metrics(stage, entry, late)  # the executor may read results a pass later
            return "done"
        if state == "Failed":
            self.fail(stage, teacher, entry.get("attempt", 0), entry.get("message", ""), round_=round_)
            return "failed"
        if state == "Retrying":
            retry_at = parse_timestamp(entry["retryAt"])
            if self.now < retry_at:
                self.requeue((retry_at - self.now).total_seconds())
                return "waiting"
            previous = entry["attempt"]
            old = self.jobs.get(entry["job"])
            if old is not None and old.pods_left:
                # A gang starts again only once every Pod of its last attempt is gone (as JobSet's
                # BlockingRecreate): a rank still stopping would hold its GPUs and its port.
                entry["waiting"] = {"reason": "PodsStopping", "since": entry.get("waiting", {}).get(
                    "since", timestamp(self.now)), "message": f"{old.pods_left} Pod(s) of attempt {previous} "
                    f"({old.name}) still stopping; attempt {previous + 1} starts when all are gone"}
                self.requeue(POD_GONE_POLL_SECONDS)
                return "waiting"
            if self.may_start:
                disrupted = entry.get("disruptedAttempts", 0)
                container[key] = self.start(rec, stage, teacher, attempt=previous + 1)
                if disrupted:  # the gang's history goes on: what ended its earlier attempts
                    container[key].update(disruptedAttempts=disrupted, disruptions=entry.get("disruptions", []))
                what = self.describe(stage, teacher, round_)
                if entry.get("failureReason") == "Disrupted":  # a whole-group restart, not a retry
                    self.event(contract.event_reason(stage, "Restarted"),
                               f"{what}: attempt {previous + 1} started ({container[key]['job']}) after a "
                               f"disruption ended attempt {previous} (not counted as a failed attempt)")
                else:
                    self.event(contract.event_reason(stage, "Retried"),
                               f"{what}: attempt {previous + 1} of {self.spec.max_retries + 1 + disrupted} "
                               f"started ({container[key]['job']})")
            return "waiting"
        job = self.jobs.get(entry["job"])
        if job is None:
            # Named in status but not observed: created before a restart, or not yet. Create it
            # again under the same name; the executor treats AlreadyExists as adopt.
            if self.may_start:
                self.out.create.append(self.request(rec, stage, teacher, entry["attempt"]))
            return "waiting"
        if job.started_at and not entry.get("startTime"):
            entry["startTime"] = timestamp(job.started_at)
        self.record_disruptions(entry, job, stage, teacher, round_)
        self.record_progress(entry, job)
        if job.state == "Succeeded":
            entry["state"] = "Succeeded"
            entry["completionTime"] = timestamp(job.finished_at or self.now)
            entry.pop("message", None)
            entry.pop("waiting", None)
            if entry.get("progress"):  # the last record may predate the last step
                entry["progress"].update(step=entry["progress"].get("totalSteps"), etaSeconds=0)
            self.record_metrics(stage, entry, job)
            if stage == "preflight":
                self.event("PreflightPassed", preflight_summary(entry))
            return "done"
        if job.state == "Failed":
            entry.pop("waiting", None)
            return self.job_failed(rec, container, key, entry, job, stage, teacher)
        entry["state"] = job.state
        if self.record_waiting(entry, job, stage, teacher, round_) == "timed out":
            return "failed"
        return "waiting"

    @staticmethod
    def record_progress(entry: dict, job: ObservedJob) -> None:
        """The trainer's latest record, as the stage's progress (only what status declares)."""
        record = job.progress or {}
        if not record:
            return
        found = {key: record[key] for key in PROGRESS_KEYS if record.get(key) is not None}
        if record.get("time"):
            found["updateTime"] = record["time"]
        entry["progress"] = found

    def record_disruptions(self, entry: dict, job: ObservedJob, stage: str, teacher: str | None, round_: int) -> None:
        """Pods the Job lost to a preemption or eviction: kept (the last few) and told once each; and
        the whole-group restarts a JobSet made after them."""
        if job.restarts > entry.get("restarts", 0):
            entry["restarts"] = job.restarts
            self.event(contract.event_reason(stage, "Restarted"),
                       f"{self.describe(stage, teacher, round_)}: JobSet {job.name} restarted all its Pods after a "
                       f"disruption (restart {job.restarts}; not counted as a failed attempt)")
        if job.kind == "JobSet":
            then = "JobSet restarts all of the attempt's Pods"
        elif job.gang:
            then = "the whole attempt ends and starts again once all its Pods are gone"
        else:
            then = "its Job replaces it"
        known = {d.get("pod") for d in entry.get("disruptions", [])}
        for found in job.disruptions:
            if found.get("pod") in known:
                continue
            known.add(found.get("pod"))
            entry.setdefault("disruptions", []).append(
                {"pod": found.get("pod", ""), "reason": found.get("reason", "Disrupted"),
                 "message": found.get("message", ""), "time": timestamp(self.now)})
            entry["disruptions"] = entry["disruptions"][-MAX_DISRUPTIONS:]
            self.event(contract.event_reason(stage, "Disrupted"),
                       f"{self.describe(stage, teacher, round_)}: Pod {found.get('pod')} "
                       f"{DISRUPTION_VERB.get(found.get('reason'), 'was disrupted')}: {found.get('message', '')}; "
                       f"{then} (not counted as a failed attempt)", warning=True)

    def record_waiting(self, entry: dict, job: ObservedJob, stage: str, teacher: str | None, round_: int) -> str:
        """Why the stage's Pods are not running, when the executor knows; fails the run once
        spec.pendingTimeoutSeconds have passed without a running Pod. Returns "timed out" then."""
        waiting = job.waiting if job.state in ("Pending", "Suspended") and not self.spec.suspend else None
        if not waiting:
            entry.pop("waiting", None)
            return ""
        what = self.describe(stage, teacher, round_)
        previous = entry.get("waiting") or {}
        reason, message = waiting.get("reason") or "PodPending", (waiting.get("message") or "")[:MESSAGE_LIMIT]
        # `since` is when the stage started waiting, whatever the reasons on the way.
        since = previous.get("since") or timestamp(self.now)
        entry["waiting"] = {"reason": reason, "message": message, "since": since}
        if reason != previous.get("reason") and reason in STUCK_REASONS:
            self.event(reason, f"{what}: {message}" if message else what, warning=reason != "WaitingForAdmission")
        if reason in STUCK_REASONS:
            self.stuck.append((what, reason, message))
        timeout = self.spec.pending_timeout_seconds
        # Time queued by Kueue is not a Pod that cannot start: Kueue has its own timeouts.
        if not timeout or job.state != "Pending" or reason == "WaitingForAdmission":
            return ""
        left = timeout - (self.now - parse_timestamp(since)).total_seconds()
        if left > 0:
            self.requeue(left)
            return ""
        entry["state"] = "Failed"
        entry["message"] = (f"none of its Pods has run for {timeout}s (spec.pendingTimeoutSeconds): {reason}"
                            + (f": {message}" if message else ""))
        entry["completionTime"] = timestamp(self.now)
        self.fail(stage, teacher, entry.get("attempt", 0), entry["message"], round_=round_,
                  code=reason if reason in STUCK_REASONS else "PendingTimeout")
        return "timed out"

    @staticmethod
    def record_metrics(stage: str, entry: dict, job: ObservedJob) -> None:
        metrics = job.metrics or {}
        if stage == "sft" and metrics.get("final_loss") is not None:
            entry["loss"] = float(metrics["final_loss"])
        if stage == "eval" and metrics.get("accuracy") is not None:
            entry["score"] = float(metrics["accuracy"])
        if stage == "preflight" and isinstance(metrics.get("teachers"), dict):
            entry["teachers"] = {name: {key: found[key] for key in ("records", "p50", "p95", "max", "truncated")
                                        if key in found}
                                 for name, found in metrics["teachers"].items() if isinstance(found, dict)}
            if isinstance(metrics.get("eval"), dict) and "records" in metrics["eval"]:
                entry["evalRecords"] = metrics["eval"]["records"]
            for key in ("storage", "seconds"):
                if key in metrics:
                    entry[key] = metrics[key]

    def job_failed(self, rec, container, key, entry, job, stage, teacher) -> str:
        round_ = _round_of(rec, stage)
        attempt = entry["attempt"]
        entry["completionTime"] = timestamp(job.finished_at or self.now)
        entry["message"] = job.message or "the Job failed without a message"
        if job.reason:
            entry["failureReason"] = job.reason
        what = self.describe(stage, teacher, round_)
        if job.disrupted:
            # A gang lost a Pod to a preemption or eviction: a new attempt at once, not counted.
            entry["state"] = "Retrying"
            entry["retryAt"] = timestamp(self.now)
            entry["disruptedAttempts"] = entry.get("disruptedAttempts", 0) + 1
            self.event(contract.event_reason(stage, "Disrupted"),
                       f"{what}: attempt {attempt} ({job.name}) ended: {entry['message']}; attempt {attempt + 1} "
                       "starts once all its Pods are gone (not counted as a failed attempt)", warning=True)
            return self.advance_stage(rec, stage, teacher)
        failed = contract.event_reason(stage, "Failed")
        counted = attempt - entry.get("disruptedAttempts", 0)
        if job.permanent or counted > self.spec.max_retries:
            entry["state"] = "Failed"
            why = (f"invalid input (exit code {contract.EXIT_INVALID_INPUT}), not retried" if job.permanent
                   else "no retries left")
            self.event(failed, f"{what}: attempt {attempt} failed ({why}): {entry['message']}",
                       warning=True)
            self.fail(stage, teacher, attempt, entry["message"], round_=round_, permanent=job.permanent,
                      code=job.reason)
            return "failed"
        wait = backoff_seconds(self.spec, counted)
        entry["state"] = "Retrying"
        entry["retryAt"] = timestamp(self.now + timedelta(seconds=wait))
        self.event(failed, f"{what}: attempt {attempt} of {self.spec.max_retries + 1 + entry.get('disruptedAttempts', 0)} "
                   f"failed: {entry['message']}; retrying in {wait:g}s", warning=True)
        if wait <= 0:
            return self.advance_stage(rec, stage, teacher)
        self.requeue(wait)
        return "waiting"

    def start(self, rec: dict, stage: str, teacher: str | None, attempt: int) -> dict:
        """Record a new attempt (status first) and ask for its Job."""
        request = self.request(rec, stage, teacher, attempt)
        self.out.create.append(request)
        if attempt == 1:
            what = self.describe(stage, teacher, _round_of(rec, stage))
            started = contract.event_reason(stage, "Started")
            if stage == "sft":
                self.event(started, f"{what} started from {rec['init']} ({request.name})")
            else:
                self.event(started, f"{what} started ({request.name})")
        return {"job": request.name, "attempt": attempt, "state": "Pending", "checkpoint": request.output_uri}

    def request(self, rec: dict, stage: str, teacher: str | None, attempt: int) -> JobRequest:
        round_ = _round_of(rec, stage)
        kind = (self.gang_kind() or "Job") if stage == "sft" else "Job"
        limit = naming.MAX_NAME
        if kind == "JobSet":
            limit = naming.MAX_JOBSET_NAME
        elif stage == "sft" and self.spec.resources.branch.nodes > 1:
            limit = naming.MAX_INDEXED_JOB_NAME
        name = naming.job_name(self.run_ref.name, round_, stage, attempt, teacher, limit=limit)
        if kind == "JobSet" and not name[0].isalpha():  # JobSet's Job and Pod names must start with a letter
            name = naming.shorten(f"j{name}", limit)
        out = self.uri(stage, round_, teacher)
        if stage == "preflight":
            root = naming.run_uri(self.spec.storage.uri, self.run_ref.namespace, self.run_ref.name)
            args = contract.preflight_args(self.spec, root, out, gpu_memory=self.gpu_memory)
            resources = preflight_resources(self.spec)
        elif stage == "sft":
            args = contract.sft_args(self.spec, round_, self.spec.teacher(teacher).dataset, rec["init"], out,
                                     metrics_port=self.metrics_port, threads=self.threads)
            resources = self.spec.resources.branch
        elif stage == "merge":
            teachers = self.spec.teachers
            inputs = [rec["branches"][t.name]["checkpoint"] for t in teachers]
            base, ns, run = self.spec.storage.uri, self.run_ref.namespace, self.run_ref.name
            args = contract.merge_args(
                self.spec, inputs, [t.weight for t in teachers], rec["init"], out,
                outer_state_in=naming.outer_state_uri(base, ns, run, round_ - 1) if round_ > 1 else None,
                outer_state_out=naming.outer_state_uri(base, ns, run, round_))
            resources = self.spec.resources.merge
        else:  # a round's merged model, or in round 0 the student
            model = rec["merge"]["checkpoint"] if round_ else rec["model"]
            args = contract.eval_args(self.spec, model, out, threads=self.threads)
            resources = self.spec.resources.eval
        return JobRequest(name=name, stage=stage, round=round_, teacher=teacher, attempt=attempt,
                          args=args, output_uri=out, resources=resources, kind=kind)

    def gang_kind(self) -> str | None:
        """What runs a multi-node branch: "JobSet" or "Job" (None: branches run on one node)."""
        branch = self.spec.resources.branch
        if branch.nodes <= 1:
            return None
        if branch.backend == "jobset" or (branch.backend == "auto" and self.jobset):
            return "JobSet"
        return "Job"

    @staticmethod
    def describe(stage: str, teacher: str | None, round_: int) -> str:
        return describe_stage(stage, round_, teacher)

    # -- terminal transitions -----------------------------------------------------------------

    def fail(self, stage: str, teacher: str | None, attempts: int, reason: str, *, round_: int,
             permanent: bool = False, code: str | None = None) -> None:
        """The run is Failed: say which stage, after how many attempts, and the trainer's reason."""
        s = self.status
        if stage in contract.STAGES:
            tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
            extra = ", invalid input: not retried" if permanent else ""
            # The trainer's own message starts with "invalid input: " too: say it once.
            said = reason.removeprefix("invalid input: ") if permanent else reason
            message = f"{self.describe(stage, teacher, round_)} failed after {tries}{extra}: {said}"
        else:
            message = reason
        s.update(phase="Failed", completionTime=timestamp(self.now), message=message)
        s["failure"] = {"stage": stage, "attempts": attempts, "reason": reason}
        if round_:  # the preflight belongs to no round
            s["failure"]["round"] = round_
        if teacher:
            s["failure"]["teacher"] = teacher
        self.failure_reason = code or (contract.event_reason(stage, "Failed") if stage in contract.STAGES
                                       else "RunFailed")
        self.out.create = []
        self.out.suspend = []
        self.out.resume = []
        self.out.delete = self.active_jobs()
        self.event("Failed", message, warning=True)

    def succeed(self) -> None:
        s = self.status
        last = self.record(s["round"])
        final, why = last["mergedCheckpoint"], ""
        selected = self.select_best()
        if selected is not None:
            s["selected"] = selected
            final = selected["checkpoint"]
            which = "the student (round 0)" if selected["round"] == 0 else f"round {selected['round']}"
            why = f" ({which}: {selected['reason']})"
            self.event("ModelSelected", f"final model: {which}, {final}: {selected['reason']}")
        s.update(phase="Succeeded", completionTime=timestamp(self.now), finalModel=final,
                 message=f"succeeded after {s['round']} rounds: final model {final}{why}")
        s.pop("failure", None)
        self.out.create = []
        self.event("Succeeded", s["message"])

    def select_best(self) -> dict | None:
        """With spec.evaluation.selectBest: the best-scoring model of round 0 (the student) and every
        merged round; ties go to the later round. None without selectBest or without any score."""
        if self.spec.evaluation is None or not self.spec.evaluation.select_best:
            return None
        s = self.status
        candidates = []
        if (s.get("student") or {}).get("evalScore") is not None:
            candidates.append((0, s["student"]["model"], s["student"]["evalScore"]))
        for rec in sorted(s.get("rounds", []), key=lambda r: r["round"]):
            if rec.get("evalScore") is not None and rec.get("mergedCheckpoint"):
                candidates.append((rec["round"], rec["mergedCheckpoint"], rec["evalScore"]))
        if not candidates:
            return None
        round_, checkpoint, score = max(candidates, key=lambda c: (c[2], c[0]))
        last_round, _, last_score = candidates[-1]
        rounds = f"rounds {candidates[0][0]}-{last_round}" if len(candidates) > 1 else f"round {round_}"
        reason = f"best eval score {score:.4g} of {rounds} (spec.evaluation.selectBest)"
        if round_ != last_round:
            reason += f"; the last round scored {last_score:.4g}"
        return {"round": round_, "checkpoint": checkpoint, "evalScore": score, "reason": reason}

    def set_phase(self, phase: str, message: str) -> None:
        if self.spec.suspend:
            phase, message = "Suspended", f"suspended at {message}"
        elif phase == "Running" and not self.started_any():
            phase = "Pending"
        self.status["phase"] = phase
        self.status["message"] = message

    def started_any(self) -> bool:
        for rec in [self.status.get("student") or {}, *self.status.get("rounds", [])]:
            entries = list((rec.get("branches") or {}).values()) + [rec.get("merge"), rec.get("eval")]
            # Suspended (e.g. queued by Kueue) has not started either.
            if any(e and e.get("state") not in ("Pending", "Suspended") for e in entries):
                return True
        return False

    def display(self) -> str:
        return f"{self.status['round']}/{self.spec.rounds}"

    def finish(self) -> Plan:
        s = self.status
        s["roundDisplay"] = self.display()
        s["teacherCount"] = len(self.spec.teachers)
        s["observedGeneration"] = self.run_ref.generation
        phase = s["phase"]
        retrying = [e for _r, _s, _t, e in stage_entries(s) if e.get("state") == "Retrying"]
        if phase == "Failed":
            reason = self.failure_reason or "Failed"
        elif phase == "Succeeded":
            reason = "Succeeded"
        elif phase == "Suspended":
            reason = "Suspended"
        elif self.stuck:
            what, reason, message = self.stuck[0]
            s["message"] = f"{s.get('message', '')}; {what}: {reason}" + (f": {message}" if message else "")
        elif retrying:
            reason = retrying[0].get("failureReason") or "Retrying"
        elif phase == "Pending" and (s.get("preflight") or {}).get("state") in ACTIVE_JOB_STATES:
            reason = "PreflightRunning"
        else:
            reason = {"Pending": "Pending", "Running": "BranchesRunning"}.get(phase, phase)
        s["reason"] = reason
        self.run_progress()
        _set_conditions(s, phase, reason, s.get("message", ""), self.now, self.run_ref.generation)
        return self.out

    def run_progress(self) -> None:
        """The run's share of training steps done and the time left, from the branches' progress
        and the rounds' durations; only from recorded times (never `now`), so it changes, and status
        is written, only when a record or a stage does."""
        s = self.status
        if not s.get("rounds"):
            return
        steps, teachers, rounds = self.spec.training.steps, len(self.spec.teachers), self.spec.rounds
        done, round_eta, updated = 0, 0.0, None
        current = s["round"]
        for rec in s["rounds"]:
            for teacher in self.spec.teachers:
                entry = rec["branches"].get(teacher.name) or {}
                progress = entry.get("progress") or {}
                if entry.get("state") == "Succeeded":
                    done += steps
                    continue
                done += min(int(progress.get("step") or 0), steps)
                if rec["round"] == current and round_eta is not None:
                    # Branches run side by side: the round waits for the slowest; unknown if one has no estimate.
                    eta = progress.get("etaSeconds")
                    round_eta = None if eta is None else max(round_eta, float(eta))
                if progress.get("updateTime"):
                    updated = max(updated or progress["updateTime"], progress["updateTime"])
        progress = {"fraction": round(done / (steps * teachers * rounds), 4) if steps * teachers else 0.0}
        if s.get("phase") == "Succeeded":
            progress["fraction"], round_eta = 1.0, 0.0
        finished = [r for r in s["rounds"] if r.get("completionTime") and r.get("startTime")]
        if round_eta is not None and s.get("phase") != "Succeeded":
            # Rounds still to come take as long as the last finished one did (none yet: unknown).
            later = rounds - current
            if later and finished:
                last = finished[-1]
                round_eta += later * (parse_timestamp(last["completionTime"]) -
                                      parse_timestamp(last["startTime"])).total_seconds()
            elif later:
                round_eta = None
        if round_eta is not None:
            progress["etaSeconds"] = round(round_eta, 1)
        if updated:
            progress["updateTime"] = updated
        s["progress"] = progress
        display = f"{int(progress['fraction'] * 100)}%"
        if progress.get("etaSeconds") is not None and s.get("phase") not in TERMINAL:
            display += f" ETA {duration(progress['etaSeconds'])}"
        s["progressDisplay"] = display


def describe_stage(stage: str, round_: int | None = None, teacher: str | None = None) -> str:
    """How messages name a stage: "preflight", "branch 'a' of round 2", "merge of round 2",
    "evaluation of round 2", "evaluation of the student (round 0)"."""
    if stage == "preflight":
        return "preflight"
    if stage == "sft":
        return f"branch {teacher!r} of round {round_}"
    if not round_:
        return "evaluation of the student (round 0)"
    return f"{'merge' if stage == 'merge' else 'evaluation'} of round {round_}"


def duration(seconds: float) -> str:
    """1h05m, 4m10s, 12s: a time left, as people read it."""
    seconds = int(round(max(seconds, 0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def stage_entries(status: dict | None):
    """(round, stage, teacher, entry) of every stage entry of a status: the preflight's and the
    student's eval (round 0), then each round's branches, merge and eval."""
    status = status or {}
    if status.get("preflight"):
        yield 0, "preflight", None, status["preflight"]
    if (status.get("student") or {}).get("eval"):
        yield 0, "eval", None, status["student"]["eval"]
    for rec in status.get("rounds") or []:
        for teacher, entry in (rec.get("branches") or {}).items():
            yield rec.get("round"), "sft", teacher, entry or {}
        for stage in ("merge", "eval"):
            if rec.get(stage):
                yield rec.get("round"), stage, None, rec[stage]


def preflight_applies(spec: MoTRunSpec, status: dict) -> bool:
    """The run has a preflight stage: enabled, and before round 1 (a run started before preflights
    existed, with rounds but no preflight record, is not sent back to one)."""
    if not spec.preflight.enabled:
        return False
    return "preflight" in status or not status.get("rounds")


def preflight_pending(spec: MoTRunSpec, status: dict) -> bool:
    """The run's preflight applies and has not passed (yet): nothing else may start."""
    return preflight_applies(spec, status) and (status.get("preflight") or {}).get("state") != "Succeeded"


def _round_of(rec: dict, stage: str) -> int:
    """The preflight and the student's eval (`status.student`, no round number) are round 0."""
    return 0 if stage == "preflight" else rec.get("round", 0)


def preflight_summary(entry: dict) -> str:
    """One line for the PreflightPassed Event: per teacher records, p95 tokens and truncated share."""
    teachers = entry.get("teachers") or {}
    parts = [f"{name} {found.get('records')} records, p95 {found.get('p95')} tokens, "
             f"{100 * float(found.get('truncated') or 0):.1f}% truncated"
             for name, found in teachers.items()]
    text = "preflight passed" + (": " + "; ".join(parts) if parts else "")
    if entry.get("evalRecords") is not None:
        text += f"; eval set {entry['evalRecords']} problems"
    return text


def _set_conditions(status: dict, phase: str, reason: str, message: str, now: datetime, generation: int) -> None:
    progressing = phase in ("Pending", "Running", "Merging", "Evaluating")
    wanted = {
        "Ready": (phase != "Failed", "Succeeded" if phase == "Succeeded" else
                  (reason if phase == "Failed" else "Accepted")),
        "Progressing": (progressing, reason),
        "Succeeded": (phase == "Succeeded", reason if phase == "Succeeded" else "NotSucceeded"),
        "Failed": (phase == "Failed", reason if phase == "Failed" else "NotFailed"),
        "Suspended": (phase == "Suspended", "Suspended" if phase == "Suspended" else "NotSuspended"),
    }
    old = {c.get("type"): c for c in status.get("conditions", [])}
    conditions = []
    for kind in CONDITION_TYPES:
        flag, why = wanted[kind]
        value = "True" if flag else "False"
        previous = old.get(kind, {})
        changed = previous.get("status") != value
        conditions.append({
            "type": kind,
            "status": value,
            "reason": why,
            "message": message if flag or kind == "Ready" else "",
            "lastTransitionTime": timestamp(now) if changed or "lastTransitionTime" not in previous
            else previous["lastTransitionTime"],
            "observedGeneration": generation,
        })
    status["conditions"] = conditions

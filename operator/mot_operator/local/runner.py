"""Run a MoTRun on this machine: the cluster's planner drives local `mot-train` processes.

The runner is an executor as the Kopf controller is (`executor.step`), with processes for Jobs:
observe the processes, `plan`, persist the status, start what the plan asks for. Everything the
runner knows lives in `<workdir>/status.json`, so a second `mot run` continues where the first
stopped: a job whose output has a valid manifest (or eval JSON) is done, whatever the previous
process was doing; a job that was running is started again, and may overwrite its incomplete output.

Besides the planner's jobs, the runner schedules report-only work into free slots: an eval of the
starting student and of every branch checkpoint (the report's per-branch scores) and, with
`--compare`, the STD and MTD baselines at equal steps, equal compute or both (baselines.py).

Beside it: processes.py (the trainer processes and their files), state.py (status.json and the
jobs in it), results.py (what finished jobs produced, and the report's input), progress.py (the
live view).
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from mot_operator import executor, naming
from mot_operator.contract import EXIT_INVALID_INPUT, EXIT_OK, eval_args, timestamp
from mot_operator.local import processes, state
from mot_operator.local.baselines import schedule_baselines
from mot_operator.local.processes import TrainerProcess
from mot_operator.local.progress import LiveView
from mot_operator.local.results import job_result, output_complete
from mot_operator.local.state import LocalJob
from mot_operator.planner import ObservedJob, Plan, plan, preflight_pending
from mot_trainer import storage
from mot_trainer.preflight import table as preflight_table


@dataclass
class Options:
    parallel: int = 1
    threads: int = 1
    compare: str | None = None  # --compare: "steps" | "compute" | "both" (baselines.py; True reads as "steps")
    eval_branches: bool = True  # evaluate every branch checkpoint too (the report's per-branch scores)
    gpus: int = 0
    gpu_memory: int | None = None  # bytes of one GPU (the smallest, nvidia-smi): the preflight's memory check
    poll_interval: float = 0.5
    progress: LiveView | None = None
    trainer_cmd: list[str] = field(default_factory=lambda: [sys.executable, "-m", "mot_trainer.cli"])


def now_utc() -> datetime:
    return datetime.now(UTC)


class LocalRunner:
    def __init__(self, run_ref, spec, spec_dict: dict, workdir: Path, options: Options):
        """`spec` parsed from `spec_dict`; a run resumed from `workdir` must not break the CRD's
        update rules against the spec it started with (SpecError, before anything is touched)."""
        self.run_ref = run_ref
        self.spec = spec
        self.spec_dict = spec_dict
        self.workdir = workdir
        self.opt = options
        self.view = options.progress or LiveView()
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.state_path = workdir / state.STATE_FILE
        self.status: dict = {}
        self.jobs: dict[str, LocalJob] = {}
        self.procs: dict[str, TrainerProcess] = {}
        self._order = 0
        self._load()

    # ---------------------------------------------------------------- persistence
    def _load(self) -> None:
        if not self.state_path.exists():
            return
        self.status, self.jobs = state.load(self.state_path, self.spec_dict)
        self._order = max((job.order + 1 for job in self.jobs.values()), default=0)
        # What a previous `mot run` left running: its output decides. Complete -> done;
        # otherwise start it again (an incomplete output may be overwritten).
        for job in self.jobs.values():
            if job.state in ("Running", "Pending"):
                processes.kill_stale(job.pid, job.output_uri, job.name)
                if output_complete(job):
                    self._mark_succeeded(job, "completed before the previous `mot run` stopped")
                else:
                    job.state, job.pid = "Pending", None
        self.save()

    def save(self) -> None:
        state.save(self.state_path, self.run_ref, self.spec_dict, self.status, self.jobs)

    # ---------------------------------------------------------------- observation
    def _mark_succeeded(self, job: LocalJob, message: str = "") -> None:
        job.state, job.permanent, job.pid = "Succeeded", False, None
        job.metrics = job_result(job, self.logs)
        job.message = message or job.message
        job.finished_at = job.finished_at or timestamp(now_utc())

    def _reap(self) -> None:
        for name, proc in list(self.procs.items()):
            rc = proc.exit_code()
            self._tail(name, proc)  # after the poll: an ended process's last record is read too
            if rc is None:
                continue
            del self.procs[name]
            job = self.jobs[name]
            job.finished_at = timestamp(now_utc())
            message = proc.message()
            if rc == EXIT_OK and output_complete(job):
                self._mark_succeeded(job, message)
                self.view.finish(name, "done")
                if job.stage == "preflight" and job.metrics:
                    self.view.message(preflight_table(job.metrics))
            else:
                job.state, job.pid = "Failed", None
                job.permanent = rc == EXIT_INVALID_INPUT
                job.message = message or f"exit code {rc} without a complete output: {proc.last_log_line()}"
                self.view.finish(name, f"FAILED (exit {rc}): {job.message[:160]}")

    def _tail(self, name: str, proc: TrainerProcess) -> None:
        """New progress records of the process (its MOT_PROGRESS_FILE, read on from the last offset)."""
        records = proc.new_records()
        if records:
            self.jobs[name].progress = records[-1]
            self.view.feed(name, records[-1])

    def observed(self) -> list[ObservedJob]:
        return [j.observed() for j in self.jobs.values() if j.role == "mot"]

    # ---------------------------------------------------------------- the executor (executor.step)
    async def observe(self) -> list[ObservedJob]:
        self._reap()
        return self.observed()

    async def persist(self, old: dict, new: dict) -> None:
        self.status = new
        self.save()  # status first, then children: as the controller does

    async def act(self, result: Plan) -> None:
        for event in result.events:
            self.view.message(f"{event.type:7s} {event.reason}: {event.message}")
        for req in result.create:
            label = "preflight" if req.stage == "preflight" else f"r{req.round} {req.stage} {req.teacher or ''}".strip()
            self._add(LocalJob(name=req.name, stage=req.stage, round=req.round, teacher=req.teacher,
                               attempt=req.attempt, args=list(req.args), output_uri=req.output_uri,
                               label=label))
        for name in result.suspend:
            self._stop(name, "Suspended")
        for name in result.resume:
            if name in self.jobs and self.jobs[name].state == "Suspended":
                self.jobs[name].state = "Pending"
        for name in result.delete:
            self._stop(name, None)
            self.jobs.pop(name, None)

    # ---------------------------------------------------------------- actions
    def _add(self, job: LocalJob) -> None:
        if job.name in self.jobs:  # deterministic names: a second create adopts
            return
        job.order = self._order
        self._order += 1
        self.jobs[job.name] = job

    def _stop(self, name: str, new_state: str | None) -> None:
        proc = self.procs.pop(name, None)
        if proc:
            processes.terminate([proc])
            self.view.finish(name, "stopped")
        job = self.jobs.get(name)
        if job and new_state and job.state in ("Pending", "Running"):
            job.state, job.pid = new_state, None

    def _start_pending(self) -> None:
        if self.status.get("phase") == "Failed":  # run() stops what runs; start nothing more
            return
        free = [s for s in range(self.opt.parallel) if s not in {p.slot for p in self.procs.values()}]
        # The planner's jobs first (they gate the next round), report and baseline work fills gaps.
        pending = sorted((j for j in self.jobs.values() if j.state == "Pending"),
                         key=lambda j: (j.role != "mot", j.order))
        for job, slot in zip(pending, free, strict=False):
            self._launch(job, slot)

    def _launch(self, job: LocalJob, slot: int) -> None:
        proc = processes.launch(self.opt.trainer_cmd, job.args, self.logs, job.name, slot,
                                threads=self.opt.threads, gpus=self.opt.gpus)
        self.procs[job.name] = proc
        job.state, job.pid, job.started_at, job.finished_at = "Running", proc.popen.pid, timestamp(now_utc()), None
        job.progress = None  # a new process starts over at step 0: an earlier one's record is stale
        self.view.start(job.name, job.label or job.name)

    # ---------------------------------------------------------------- the loop
    def step(self) -> Plan:
        """One executor step (observe, plan, persist, act), then the report-only work and the view."""
        # No metrics port (parallel trainers would share it); --threads is this runner's (the split of
        # the machine's cores), over the spec's; the GPU memory nvidia-smi gave, for the preflight to
        # check a branch against. The time is read after observing, as the controller's.
        decide = partial(plan, self.run_ref, self.spec, metrics_port=None, threads=self.opt.threads,
                         gpu_memory=self.opt.gpu_memory)
        result = asyncio.run(executor.step(self.status, self, decide))
        self.schedule_extras()
        self._start_pending()
        self.save()
        self.view.set_header(self.header())
        self.view.redraw()
        return result

    def header(self) -> str:
        phase = self.status.get("phase", "Pending")
        rounds = getattr(self.spec, "rounds", "?")
        return f"MoTRun {self.run_ref.namespace}/{self.run_ref.name}: {phase}, round {self.status.get('round', 0)}/{rounds}"

    def extras_pending(self) -> bool:
        return any(j.state in ("Pending", "Running") for j in self.jobs.values() if j.role != "mot")

    def run(self) -> str:
        """Until the MoT run is terminal and the report/baseline work is done. Returns the phase."""
        try:
            while True:
                result = self.step()
                phase = self.status.get("phase")
                if phase == "Failed":
                    self.stop_children()  # report work for a failed run is not worth waiting for
                    return phase
                if phase == "Succeeded" and not self.procs and not self.extras_pending():
                    return phase
                self._wait(result.requeue_after)
        finally:
            self.view.close()

    def _wait(self, requeue_after: float | None) -> None:
        deadline = time.monotonic() + min(requeue_after or 5.0, 5.0)
        while time.monotonic() < deadline:
            if any(p.exit_code() is not None for p in self.procs.values()):
                return
            for name, proc in self.procs.items():
                self._tail(name, proc)
            self.view.redraw()
            time.sleep(self.opt.poll_interval)

    def stop_children(self) -> None:
        """Ctrl-C: stop the trainers, and remember them as to-be-restarted."""
        processes.terminate(self.procs.values())
        for name in list(self.procs):
            job = self.jobs[name]
            if output_complete(job):
                self._mark_succeeded(job)
            else:
                job.state, job.pid = "Pending", None
            self.view.finish(name, "interrupted")
        self.procs.clear()
        self.save()

    # ---------------------------------------------------------------- report-only work
    def mot_jobs(self, stage: str, job_state: str = "Succeeded") -> list[LocalJob]:
        return [j for j in self.jobs.values() if j.role == "mot" and j.stage == stage and j.state == job_state]

    def run_uri(self) -> str:
        return naming.run_uri(self.spec.storage.uri, self.run_ref.namespace, self.run_ref.name)

    def schedule_extras(self) -> None:
        """Report-only evals (every finished branch) and, with --compare, baselines.
        Without `spec.evaluation` there is nothing to score: the report shows losses only. None of it
        before the preflight passed: a run with bad inputs starts no trainer besides the preflight."""
        if self.status.get("phase") == "Failed" or preflight_pending(self.spec, self.status):
            return
        if self.opt.compare:
            schedule_baselines(self)
        if self.spec.evaluation is None:
            return
        base = self.run_uri()
        # (The student's own eval is the planner's round 0, as in a cluster.)
        for job in self.mot_jobs("sft") if self.opt.eval_branches else []:
            out = storage.join(base, "report", f"eval-round-{job.round}-branch-{job.teacher}.json")
            self.add_eval(f"eval-r{job.round}-{job.teacher}", job.output_uri, out, job.round, job.teacher,
                          f"r{job.round} eval branch {job.teacher}")

    def add_eval(self, name, model: str, out: str, rnd: int, teacher, label, role: str = "report") -> None:
        if name in self.jobs:
            return
        job = LocalJob(name=name, stage="eval", round=rnd, teacher=teacher, attempt=1,
                       args=eval_args(self.spec, model, out, threads=self.opt.threads), output_uri=out, role=role,
                       label=label)
        self.add_job(job)

    def add_job(self, job: LocalJob) -> None:
        """Adds an extra job, already done when its output is complete (a resumed run)."""
        self._add(job)
        if output_complete(job):
            self._mark_succeeded(job, "found complete")

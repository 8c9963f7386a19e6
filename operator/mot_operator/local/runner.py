"""Run a MoTRun on this machine: the cluster's planner drives local `mot-train` processes.

The loop is the controller's, with processes for Jobs: observe the processes, `plan`, persist the
status, start what the plan asks for. Everything the runner knows lives in `<workdir>/status.json`
(written atomically), so a second `mot run` continues where the first stopped: a job whose output
has a valid manifest (or eval JSON) is done, whatever the previous process was doing; a job that was
running is started again, and may overwrite its incomplete output.

Besides the planner's jobs, the runner schedules report-only work into free slots: an eval of the
starting student and of every branch checkpoint (the report's per-branch scores) and, with
`--compare`, the STD and MTD baselines.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from mot_operator.contract import EXIT_INVALID_INPUT, EXIT_OK, parse_timestamp, read_result, timestamp
from mot_operator.local.progress import Progress
from mot_operator.spec import check_update
from mot_trainer import storage
from mot_trainer.progress import PROGRESS_FILE_ENV, read_records

log = logging.getLogger("mot_operator.local")

TERMINAL_PHASES = ("Succeeded", "Failed")
STATE_FILE = "status.json"
_KILL_GRACE_S = 10.0


@dataclass
class LocalJob:
    """A process standing in for a Kubernetes Job; persisted in status.json."""

    name: str
    stage: str  # preflight | sft | merge | eval
    round: int
    teacher: str | None
    attempt: int
    args: list[str]
    output_uri: str
    role: str = "mot"  # mot (the planner's) | report (branch/start evals) | baseline
    label: str = ""
    state: str = "Pending"  # Pending | Running | Suspended | Succeeded | Failed
    permanent: bool = False
    message: str = ""
    metrics: dict | None = None
    pid: int | None = None
    started_at: str | None = None
    finished_at: str | None = None
    order: int = 0
    progress: dict | None = None  # the trainer's latest progress record: kept, so a resumed runner has it


@dataclass
class _Proc:
    popen: subprocess.Popen
    log_path: Path
    term_path: Path
    progress_path: Path
    slot: int
    progress_offset: int = 0


@dataclass
class Options:
    parallel: int = 1
    threads: int = 1
    compare: bool = False
    eval_branches: bool = True  # evaluate every branch checkpoint too (the report's per-branch scores)
    gpus: int = 0
    poll_interval: float = 0.5
    progress: Progress | None = None
    trainer_cmd: list[str] = field(default_factory=lambda: [sys.executable, "-m", "mot_trainer.cli"])


def now_utc() -> datetime:
    return datetime.now(UTC)


def _parse_time(value: str | None) -> datetime | None:
    """A time of status.json (contract.timestamp; older files have microseconds, read the same)."""
    return parse_timestamp(value) if value else None


def atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def detect_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def split_threads(parallel: int | None, threads: int | None, gpus: int, cores: int) -> tuple[int, int]:
    """parallel × threads ≤ cores: two torch processes with default threads on 2 cores run ~10x slower."""
    parallel = parallel or (gpus or 1)
    threads = threads or max(1, cores // parallel)
    return parallel, threads


def get_flag(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def _die_with_parent() -> None:  # runs in the child: SIGKILL of `mot run` must not orphan trainers
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class LocalRunner:
    def __init__(self, run_ref, spec, spec_dict: dict, workdir: Path, options: Options):
        """`spec` parsed from `spec_dict`; a run resumed from `workdir` must not break the CRD's
        update rules against the spec it started with (SpecError, before anything is touched)."""
        from mot_operator import planner  # noqa: F401 - fail early if the planner is missing

        self.run_ref = run_ref
        self.spec = spec
        self.spec_dict = spec_dict
        self.workdir = workdir
        self.opt = options
        self.progress = options.progress or Progress()
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.state_path = workdir / STATE_FILE
        self.status: dict = {}
        self.jobs: dict[str, LocalJob] = {}
        self.procs: dict[str, _Proc] = {}
        self._order = 0
        self._load()

    # ---------------------------------------------------------------- persistence
    def _load(self) -> None:
        if not self.state_path.exists():
            return
        saved = json.loads(self.state_path.read_text())
        if saved.get("spec") is not None:  # (status.json from before specs were recorded: none)
            check_update(saved["spec"], self.spec_dict)
        self.status = saved.get("status") or {}
        for raw in saved.get("jobs", []):
            job = LocalJob(**raw)
            self.jobs[job.name] = job
            self._order = max(self._order, job.order + 1)
        # What a previous `mot run` left running: its output decides. Complete -> done;
        # otherwise start it again (an incomplete output may be overwritten).
        for job in self.jobs.values():
            if job.state in ("Running", "Pending"):
                self._kill_stale(job)
                if self._output_complete(job):
                    self._mark_succeeded(job, "completed before the previous `mot run` stopped")
                else:
                    job.state, job.pid = "Pending", None
        self.save()

    def save(self) -> None:
        atomic_write_json(self.state_path, {
            "run": {"namespace": self.run_ref.namespace, "name": self.run_ref.name},
            "updated": timestamp(now_utc()),
            "spec": self.spec_dict,
            "status": self.status,
            "jobs": [asdict(j) for j in sorted(self.jobs.values(), key=lambda j: j.order)],
        })

    def _kill_stale(self, job: LocalJob) -> None:
        """A trainer from a `mot run` that was SIGKILLed may still be writing: stop it first."""
        if not job.pid:
            return
        try:
            cmdline = Path(f"/proc/{job.pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return
        if job.output_uri in cmdline.split("\0"):
            log.info("stopping stale process %s of %s", job.pid, job.name)
            try:
                os.kill(job.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # ---------------------------------------------------------------- observation
    def _output_complete(self, job: LocalJob) -> bool:
        try:
            if job.stage in ("eval", "preflight"):  # a JSON written whole at the end
                return storage.exists(job.output_uri)
            return storage.read_checkpoint_manifest(job.output_uri) is not None
        except Exception:  # noqa: BLE001 - unreadable output is incomplete output
            return False

    def _read_result(self, job: LocalJob) -> dict | None:
        """A finished job's result: the trainer's JSON summary from its termination message (as the
        controller reads it, contract.read_result), except an eval's, read whole from its JSON in
        storage (the report and results.json use what the summary lacks: problems, samples, each
        problem's answers). Storage too when the message has none: a job found complete after a
        restart (its process stopped before writing it) or a summary cut at the message's size limit."""
        if job.stage != "eval":
            found = read_result(self._termination_message(job))
            if found is not None:
                return found
        if job.stage in ("eval", "preflight"):
            return storage.read_json(job.output_uri)
        found = storage.read_checkpoint_manifest(job.output_uri)
        return (found or {}).get("metrics")

    def _termination_message(self, job: LocalJob) -> str:
        """What the job's last process left in its termination file (MOT_TERMINATION_LOG), if any."""
        path = self.logs / f"{job.name}.termination"
        try:
            return path.read_text().strip()
        except OSError:
            return ""

    def _mark_succeeded(self, job: LocalJob, message: str = "") -> None:
        job.state, job.permanent, job.pid = "Succeeded", False, None
        job.metrics = self._read_result(job)
        job.message = message or job.message
        job.finished_at = job.finished_at or timestamp(now_utc())

    def _reap(self) -> None:
        for name, proc in list(self.procs.items()):
            rc = proc.popen.poll()
            self._tail(name, proc)  # after the poll: an ended process's last record is read too
            if rc is None:
                continue
            del self.procs[name]
            job = self.jobs[name]
            job.finished_at = timestamp(now_utc())
            message = proc.term_path.read_text().strip() if proc.term_path.exists() else ""
            if rc == EXIT_OK and self._output_complete(job):
                self._mark_succeeded(job, message)
                self.progress.finish(name, "done")
                if job.stage == "preflight" and job.metrics:
                    from mot_trainer.preflight import table

                    self.progress.message(table(job.metrics))
            else:
                job.state, job.pid = "Failed", None
                job.permanent = rc == EXIT_INVALID_INPUT
                job.message = message or f"exit code {rc} without a complete output: {_last_line(proc.log_path)}"
                self.progress.finish(name, f"FAILED (exit {rc}): {job.message[:160]}")

    def _tail(self, name: str, proc: _Proc) -> None:
        """New progress records of the process (its MOT_PROGRESS_FILE, read on from the last offset)."""
        records, proc.progress_offset = read_records(proc.progress_path, proc.progress_offset)
        if records:
            self.jobs[name].progress = records[-1]
            self.progress.feed(name, records[-1])

    def observed(self):
        from mot_operator.planner import ObservedJob

        return [
            ObservedJob(
                name=j.name, stage=j.stage, round=j.round, teacher=j.teacher, attempt=j.attempt,
                state=j.state, permanent=j.permanent, message=j.message, metrics=j.metrics,
                started_at=_parse_time(j.started_at), finished_at=_parse_time(j.finished_at),
                progress=j.progress,
            )
            for j in self.jobs.values() if j.role == "mot"
        ]

    # ---------------------------------------------------------------- actions
    def _add(self, job: LocalJob) -> None:
        if job.name in self.jobs:  # deterministic names: a second create adopts
            return
        job.order = self._order
        self._order += 1
        self.jobs[job.name] = job

    def apply(self, plan) -> None:
        for event in plan.events:
            self.progress.message(f"{event.type:7s} {event.reason}: {event.message}")
        for req in plan.create:
            label = "preflight" if req.stage == "preflight" else f"r{req.round} {req.stage} {req.teacher or ''}".strip()
            self._add(LocalJob(name=req.name, stage=req.stage, round=req.round, teacher=req.teacher,
                               attempt=req.attempt, args=list(req.args), output_uri=req.output_uri,
                               label=label))
        for name in plan.suspend:
            self._stop(name, "Suspended")
        for name in plan.resume:
            if name in self.jobs and self.jobs[name].state == "Suspended":
                self.jobs[name].state = "Pending"
        for name in plan.delete:
            self._stop(name, None)
            self.jobs.pop(name, None)

    def _stop(self, name: str, new_state: str | None) -> None:
        proc = self.procs.pop(name, None)
        if proc:
            _terminate([proc.popen])
            self.progress.finish(name, "stopped")
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
        log_path = self.logs / f"{job.name}.log"
        term_path = self.logs / f"{job.name}.termination"
        term_path.unlink(missing_ok=True)
        progress_path = self.logs / f"{job.name}.progress.jsonl"
        progress_path.unlink(missing_ok=True)  # a previous process's records are not this one's
        env = dict(os.environ, MOT_TERMINATION_LOG=str(term_path), OMP_NUM_THREADS=str(self.opt.threads),
                   MKL_NUM_THREADS=str(self.opt.threads), OMP_WAIT_POLICY="PASSIVE",
                   TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        env[PROGRESS_FILE_ENV] = str(progress_path)
        if self.opt.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % self.opt.gpus)
        with open(log_path, "ab") as log_file:
            log_file.write(f"=== {timestamp(now_utc())} mot-train {' '.join(job.args)}\n".encode())
            log_file.flush()
            popen = subprocess.Popen([*self.opt.trainer_cmd, *job.args], stdout=log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        self.procs[job.name] = _Proc(popen, log_path, term_path, progress_path, slot)
        job.state, job.pid, job.started_at, job.finished_at = "Running", popen.pid, timestamp(now_utc()), None
        job.progress = None  # a new process starts over at step 0: an earlier one's record is stale
        self.progress.start(job.name, job.label or job.name)

    # ---------------------------------------------------------------- the loop
    def step(self) -> object:
        from mot_operator.planner import plan as make_plan

        self._reap()
        # No metrics port (parallel trainers would share it); --threads is this runner's (the split of
        # the machine's cores), over the spec's.
        plan = make_plan(self.run_ref, self.spec, self.status, self.observed(), now_utc(),
                         metrics_port=None, threads=self.opt.threads)
        self.status = plan.status
        self.save()  # status first, then children: as the controller does
        self.apply(plan)
        self.schedule_extras()
        self._start_pending()
        self.save()
        self.progress.set_header(self.header())
        self.progress.redraw()
        return plan

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
                plan = self.step()
                phase = self.status.get("phase")
                if phase == "Failed":
                    self.stop_children()  # report work for a failed run is not worth waiting for
                    return phase
                if phase == "Succeeded" and not self.procs and not self.extras_pending():
                    return phase
                self._wait(getattr(plan, "requeue_after", None))
        finally:
            self.progress.close()

    def _wait(self, requeue_after: float | None) -> None:
        deadline = time.monotonic() + min(requeue_after or 5.0, 5.0)
        while time.monotonic() < deadline:
            if any(p.popen.poll() is not None for p in self.procs.values()):
                return
            for name, proc in self.procs.items():
                self._tail(name, proc)
            self.progress.redraw()
            time.sleep(self.opt.poll_interval)

    def stop_children(self) -> None:
        """Ctrl-C: stop the trainers, and remember them as to-be-restarted."""
        _terminate([p.popen for p in self.procs.values()])
        for name in list(self.procs):
            job = self.jobs[name]
            if self._output_complete(job):
                self._mark_succeeded(job)
            else:
                job.state, job.pid = "Pending", None
            self.progress.finish(name, "interrupted")
        self.procs.clear()
        self.save()

    # ---------------------------------------------------------------- report-only work
    def mot_jobs(self, stage: str, state: str = "Succeeded") -> list[LocalJob]:
        return [j for j in self.jobs.values() if j.role == "mot" and j.stage == stage and j.state == state]

    def run_uri(self) -> str:
        from mot_operator import naming

        return naming.run_uri(self.spec.storage.uri, self.run_ref.namespace, self.run_ref.name)

    def schedule_extras(self) -> None:
        """Report-only evals (the student, then every finished branch) and, with --compare, baselines.
        Without `spec.evaluation` there is nothing to score: the report shows losses only. None of it
        before the preflight passed: a run with bad inputs starts no trainer besides the preflight."""
        from mot_operator.planner import preflight_pending

        if self.status.get("phase") == "Failed" or preflight_pending(self.spec, self.status):
            return
        if self.opt.compare:
            from mot_operator.local.baselines import schedule_baselines

            schedule_baselines(self)
        if self.spec.evaluation is None:
            return
        base = self.run_uri()
        self.add_eval("eval-start", self.spec.student, storage.join(base, "report", "eval-start.json"), 0, None,
                      "eval start (student)")
        for job in self.mot_jobs("sft") if self.opt.eval_branches else []:
            out = storage.join(base, "report", f"eval-round-{job.round}-branch-{job.teacher}.json")
            self.add_eval(f"eval-r{job.round}-{job.teacher}", job.output_uri, out, job.round, job.teacher,
                          f"r{job.round} eval branch {job.teacher}")

    def add_eval(self, name, model: str, out: str, rnd: int, teacher, label, role: str = "report") -> None:
        from mot_operator.contract import eval_args

        if name in self.jobs:
            return
        job = LocalJob(name=name, stage="eval", round=rnd, teacher=teacher, attempt=1,
                       args=eval_args(self.spec, model, out, threads=self.opt.threads), output_uri=out, role=role,
                       label=label)
        self.add_job(job)

    def add_job(self, job: LocalJob) -> None:
        """Adds an extra job, already done when its output is complete (a resumed run)."""
        self._add(job)
        if self._output_complete(job):
            self._mark_succeeded(job, "found complete")


def _last_line(path: Path) -> str:
    """The last non-empty log line (a traceback's error) when a process left no termination message."""
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return f"see {path}"
    return f"{lines[-1].strip()[:300]} (log: {path})" if lines else f"see {path}"


def _terminate(popens: list[subprocess.Popen]) -> None:
    for p in popens:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + _KILL_GRACE_S
    for p in popens:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def collect_results(runner: LocalRunner) -> dict:
    """The report's input (see report.py) from the finished jobs."""
    from mot_operator.local.baselines import baseline_results, total_steps

    def done(name: str) -> dict | None:
        job = runner.jobs.get(name)
        return job.metrics if job and job.state == "Succeeded" else None

    rounds: dict[int, dict] = {}
    for job in sorted(runner.jobs.values(), key=lambda j: j.order):
        if job.role != "mot" or job.state != "Succeeded" or job.stage == "preflight":
            continue
        entry = rounds.setdefault(job.round, {"round": job.round, "branches": {}, "merged": {}})
        if job.stage == "sft":
            entry["branches"][job.teacher] = {
                "loss": (job.metrics or {}).get("final_loss"),
                "eval": done(f"eval-r{job.round}-{job.teacher}"),
                "checkpoint": job.output_uri,
            }
        elif job.stage == "merge":
            entry["merged"]["checkpoint"] = job.output_uri
        elif job.stage == "eval":
            entry["merged"]["eval"] = job.metrics
    total = total_steps(runner.spec)
    start = done("eval-start")
    return {
        "run": f"{runner.run_ref.namespace}/{runner.run_ref.name}",
        "phase": runner.status.get("phase"),
        "total_steps": total,
        "start": {"eval": start} if start else None,
        "preflight": next((j.metrics for j in runner.jobs.values()
                           if j.stage == "preflight" and j.role == "mot" and j.state == "Succeeded"), None),
        "rounds": [rounds[r] for r in sorted(rounds)],
        "baselines": baseline_results(runner),
    }

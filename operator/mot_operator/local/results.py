"""What finished jobs produced: whether a job's output is complete in storage, its result, and the
report's input (`collect_results`, see report.py) from all of them.
"""

from __future__ import annotations

from pathlib import Path

from mot_operator.contract import read_result
from mot_operator.local.baselines import baseline_jobs, budget_steps, total_steps
from mot_operator.local.processes import termination_message
from mot_operator.local.state import LocalJob
from mot_trainer import storage


def output_complete(job: LocalJob) -> bool:
    """The job's output is whole in storage: a valid checkpoint manifest, or a preflight's or eval's JSON."""
    try:
        if job.stage in ("eval", "preflight"):  # a JSON written whole at the end
            return storage.exists(job.output_uri)
        return storage.read_checkpoint_manifest(job.output_uri) is not None
    except Exception:  # unreadable output is incomplete output
        return False


def job_result(job: LocalJob, logs: Path) -> dict | None:
    """A finished job's result: the trainer's JSON summary from its termination message (as the
    controller reads it, contract.read_result), except an eval's, read whole from its JSON in
    storage (the report and results.json use what the summary lacks: problems, samples, each
    problem's answers). Storage too when the message has none: a job found complete after a
    restart (its process stopped before writing it) or a summary cut at the message's size limit."""
    if job.stage != "eval":
        found = read_result(termination_message(logs, job.name))
        if found is not None:
            return found
    if job.stage in ("eval", "preflight"):
        return storage.read_json(job.output_uri)
    found = storage.read_checkpoint_manifest(job.output_uri)
    return (found or {}).get("metrics")


def collect_results(runner) -> dict:
    """The report's input (see report.py) from the runner's finished jobs."""

    def done(name: str) -> dict | None:
        job = runner.jobs.get(name)
        return job.metrics if job and job.state == "Succeeded" else None

    rounds: dict[int, dict] = {}
    start = None
    for job in sorted(runner.jobs.values(), key=lambda j: j.order):
        if job.role != "mot" or job.state != "Succeeded" or job.stage == "preflight":
            continue
        if job.round == 0:  # the planner's round 0: the student's own eval
            start = job.metrics
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
    return {
        "run": f"{runner.run_ref.namespace}/{runner.run_ref.name}",
        "phase": runner.status.get("phase"),
        "total_steps": total,
        "teachers": [t.name for t in runner.spec.teachers],
        "selected": runner.status.get("selected"),  # spec.evaluation.selectBest's pick, else None
        "start": {"eval": start} if start else None,
        "preflight": next((j.metrics for j in runner.jobs.values()
                           if j.stage == "preflight" and j.role == "mot" and j.state == "Succeeded"), None),
        "rounds": [rounds[r] for r in sorted(rounds)],
        "baselines": baseline_results(runner),
    }


def baseline_key(label: str, budget: str) -> str:
    """results["baselines"]'s key: "std-<teacher>" / "MTD" at equal steps, "std-<teacher> (compute)" /
    "MTD (compute)" at equal compute (report.py's docstring)."""
    key = "MTD" if label == "mtd" else label
    return key if budget == "steps" else f"{key} (compute)"


def baseline_results(runner) -> dict:
    """{key: {kind, budget, steps, loss, eval}} from the finished baseline jobs (see baseline_key)."""
    out = {}
    names = baseline_jobs(runner.spec)
    for job in sorted(runner.jobs.values(), key=lambda j: j.order):
        if job.role != "baseline" or job.stage != "sft" or job.name not in names:
            continue
        label, budget = names[job.name]
        ev = runner.jobs.get(job.name.replace("baseline-", "baseline-eval-", 1))
        out[baseline_key(label, budget)] = {
            "kind": "MTD" if label == "mtd" else "STD",
            "budget": budget,
            "steps": _steps_arg(job.args) or budget_steps(runner.spec, budget),
            "loss": (job.metrics or {}).get("final_loss") if job.state == "Succeeded" else None,
            "eval": ev.metrics if ev and ev.state == "Succeeded" else None,
        }
    return out


def _steps_arg(args: list[str]) -> int | None:
    """The `--steps` the job was started with (what it trained), if readable."""
    try:
        return int(args[args.index("--steps") + 1])
    except (ValueError, IndexError):
        return None

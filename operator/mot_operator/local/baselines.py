"""`mot run --compare`: the paper's baselines at the same number of SFT steps as the MoT run.

- STD: the student fine-tuned on one teacher's data alone, once per teacher.
- MTD: the student fine-tuned on the union of all teachers' data.
Each trains rounds × steps-per-branch steps (the paper: MoT 5 × 50, baselines 250), with the MoT
branches' own hyperparameters (the planner's round-1 arguments are the template), then is evaluated
with the run's own eval arguments. Outputs go under `<run>/baselines/`.
"""

from __future__ import annotations

import io
import json
import random

from mot_trainer import storage
from mot_trainer.errors import InvalidInput


def total_steps_args(sft_args: list[str], rounds: int) -> tuple[list[str], int | None]:
    """The branch args with the step budget multiplied by the number of rounds."""
    from mot_operator.local.runner import get_flag, set_flag

    if (steps := get_flag(sft_args, "--steps")) is not None:
        total = int(steps) * rounds
        return set_flag(sft_args, "--steps", total), total
    if (epochs := get_flag(sft_args, "--epochs")) is not None:
        return set_flag(sft_args, "--epochs", float(epochs) * rounds), None
    raise InvalidInput("cannot size the baselines: the branch arguments carry neither --steps nor --epochs")


def read_records(uri: str) -> list[dict]:
    data = storage.read_bytes(uri)
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def union_dataset(data_uris: list[str], out_uri: str, seed: int = 0) -> str:
    """All teachers' records, shuffled with a fixed seed, as one JSONL object (idempotent)."""
    if storage.exists(out_uri):
        return out_uri
    rows = [row for uri in data_uris for row in read_records(uri)]
    random.Random(seed).shuffle(rows)
    storage.write_bytes(out_uri, "".join(json.dumps(r, default=str) + "\n" for r in rows).encode())
    return out_uri


def schedule_baselines(runner, sft_template, eval_template, base: str) -> None:
    """Adds the baseline SFT jobs once round 1's branches are known, and their evals once trained."""
    from mot_operator.local.runner import LocalJob, get_flag, set_flag

    rounds = int(runner.spec.rounds)
    first = sorted((j for j in runner.jobs.values() if j.role == "mot" and j.stage == "sft" and j.round == 1),
                   key=lambda j: j.teacher)
    if not first:
        return
    data = {j.teacher: get_flag(j.args, "--data") for j in first}
    targets = {f"std-{t}": uri for t, uri in data.items()}
    mtd_data = storage.join(base, "baselines", "mtd-data.jsonl")
    targets["mtd"] = mtd_data
    for label, data_uri in targets.items():
        name = f"baseline-{label}"
        if name not in runner.jobs:
            if label == "mtd":
                union_dataset(list(data.values()), mtd_data)
            args, total = total_steps_args(sft_template.args, rounds)
            out = storage.join(base, "baselines", label)
            args = set_flag(set_flag(args, "--data", data_uri), "--out", out)
            job = LocalJob(name=name, stage="sft", round=0, teacher=None, attempt=1, args=args, output_uri=out,
                           role="baseline", label=f"baseline {label.upper() if label == 'mtd' else label}"
                           + (f" ({total} steps)" if total else ""))
            runner._add(job)
            if runner._output_complete(job):
                runner._mark_succeeded(job, "found complete")
        trained = runner.jobs[name]
        if trained.state == "Succeeded":
            runner._add_eval(f"baseline-eval-{label}", eval_template, trained.output_uri,
                             storage.join(base, "baselines", f"eval-{label}.json"), 0, None,
                             f"eval baseline {label}", role="baseline")


def baseline_results(runner) -> dict:
    """{label: {kind, steps, loss, eval}} from the finished baseline jobs."""
    from mot_operator.local.runner import get_flag

    out = {}
    for job in runner.jobs.values():
        if job.role != "baseline" or job.stage != "sft":
            continue
        label = job.name.removeprefix("baseline-")
        ev = runner.jobs.get(f"baseline-eval-{label}")
        steps = get_flag(job.args, "--steps")
        out[label.upper() if label == "mtd" else label] = {
            "kind": "MTD" if label == "mtd" else "STD",
            "steps": int(steps) if steps else None,
            "loss": (job.metrics or {}).get("final_loss"),
            "eval": ev.metrics if ev and ev.state == "Succeeded" else None,
        }
    return out

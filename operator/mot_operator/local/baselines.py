"""`mot run --compare`: the paper's baselines, at one or both of two SFT-step budgets.

- STD: the student fine-tuned on one teacher's data alone, once per teacher.
- MTD: the student fine-tuned on the union of all teachers' data.

Budgets (`--compare [steps|compute|both]`; a bare `--compare` is `steps`):
- steps (equal steps, the paper's accounting): rounds × steps-per-branch SFT steps, as many as one
  MoT branch over all rounds (the paper: MoT 5 × 50 per branch, baselines 250). MoT itself spends
  K times that, one branch per teacher (K teachers).
- compute (equal compute): K × rounds × steps-per-branch, as many as all of MoT's branches together.

Each baseline trains with the branches' own hyperparameters (the planner's round-1 arguments, so
nothing is restated here), then is evaluated with the run's eval arguments. Outputs go under
`<run>/baselines/`: `<label>` and `eval-<label>.json` for equal steps (job `baseline-<label>`),
`<label>-compute` and `eval-<label>-compute.json` for equal compute (job `baseline-<label>-compute`),
where label is `std-<teacher>` or `mtd`; both budgets' MTD share one union file, `mtd-data.jsonl`.
"""

from __future__ import annotations

import io
import json
import random

from mot_operator.contract import sft_args
from mot_operator.local.state import LocalJob
from mot_trainer import storage

BUDGETS = ("steps", "compute")
COMPARE_CHOICES = ("steps", "compute", "both")
SUFFIX = {"steps": "", "compute": "-compute"}  # of the job names and the storage folders


def compare_budgets(compare) -> tuple[str, ...]:
    """The budgets a `--compare` value runs: None/False none, True (older callers) as "steps"."""
    if compare is True:
        compare = "steps"
    if not compare:
        return ()
    if compare == "both":
        return BUDGETS
    if compare not in BUDGETS:
        raise ValueError(f"compare: expected one of {', '.join(COMPARE_CHOICES)}, got {compare!r}")
    return (compare,)


def total_steps(spec) -> int:
    """One MoT branch's SFT steps over all rounds (the equal-steps budget)."""
    return spec.training.steps * spec.rounds


def budget_steps(spec, budget: str) -> int:
    """A baseline's SFT steps under `budget`: rounds × steps, times the number of teachers for compute."""
    return total_steps(spec) * (len(spec.teachers) if budget == "compute" else 1)


def baseline_labels(spec) -> list[str]:
    return [f"std-{t.name}" for t in spec.teachers] + ["mtd"]


def baseline_jobs(spec) -> dict[str, tuple[str, str]]:
    """{SFT job name: (label, budget)} for every baseline the spec can have (equal steps first: were a
    teacher named `<t>-compute` beside `<t>`, the names would clash, and equal steps keeps them)."""
    out: dict[str, tuple[str, str]] = {}
    for budget in BUDGETS:
        for label in baseline_labels(spec):
            out.setdefault(f"baseline-{label}{SUFFIX[budget]}", (label, budget))
    return out


def read_dataset_records(uri: str) -> list[dict]:
    """A teacher's dataset (JSONL, or Parquet) as dicts, as stored: no checks, no tokenizing."""
    data = storage.read_bytes(uri)
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq  # here: pyarrow (large) only for Parquet data

        return pq.read_table(io.BytesIO(data)).to_pylist()
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def union_dataset(data_uris: list[str], out_uri: str, seed: int = 0) -> str:
    """All teachers' records, shuffled with a fixed seed, as one JSONL object (written once)."""
    if storage.exists(out_uri):
        return out_uri
    rows = [row for uri in data_uris for row in read_dataset_records(uri)]
    random.Random(seed).shuffle(rows)
    storage.write_bytes(out_uri, "".join(json.dumps(r, default=str) + "\n" for r in rows).encode())
    return out_uri


def baseline_sft_args(spec, data_uri: str, out: str, threads: int | None = None, steps: int | None = None) -> list[str]:
    """A branch's round-1 arguments from the student, on `data_uri`, for `steps` (default: the MoT
    run's total steps per branch, the equal-steps budget)."""
    return sft_args(spec, 1, data_uri, spec.student, out, steps=total_steps(spec) if steps is None else steps,
                    threads=threads)


def schedule_baselines(runner) -> None:
    """Adds the baseline SFT jobs of each budget `runner.opt.compare` asks for to `runner` (a
    LocalRunner), and each one's eval once it is trained."""
    spec = runner.spec
    base = storage.join(runner.run_uri(), "baselines")
    targets = {f"std-{t.name}": t.dataset for t in spec.teachers}
    targets["mtd"] = storage.join(base, "mtd-data.jsonl")  # one union file for both budgets
    for budget in compare_budgets(runner.opt.compare):
        steps, suffix = budget_steps(spec, budget), SUFFIX[budget]
        for label, data_uri in targets.items():
            key = f"{label}{suffix}"
            name = f"baseline-{key}"
            if name not in runner.jobs:
                if label == "mtd":
                    union_dataset([t.dataset for t in spec.teachers], data_uri)
                out = storage.join(base, key)
                shown = label.upper() if label == "mtd" else label
                runner.add_job(LocalJob(name=name, stage="sft", round=0, teacher=None, attempt=1,
                                        args=baseline_sft_args(spec, data_uri, out, runner.opt.threads, steps),
                                        output_uri=out, role="baseline",
                                        label=f"baseline {shown} ({steps} steps"
                                              + (", equal compute)" if budget == "compute" else ")")))
            trained = runner.jobs[name]
            if trained.state == "Succeeded" and spec.evaluation is not None:
                runner.add_eval(f"baseline-eval-{key}", trained.output_uri, storage.join(base, f"eval-{key}.json"),
                                0, None, f"eval baseline {key}", role="baseline")

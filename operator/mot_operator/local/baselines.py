"""`mot run --compare`: the paper's baselines at the same number of SFT steps as the MoT run.

- STD: the student fine-tuned on one teacher's data alone, once per teacher.
- MTD: the student fine-tuned on the union of all teachers' data.
Each trains rounds × steps-per-branch steps (the paper: MoT 5 × 50 per branch, baselines 250) with
the branches' own hyperparameters (the planner's round-1 arguments, so nothing is restated here),
then is evaluated with the run's eval arguments. Outputs go under `<run>/baselines/`.
"""

from __future__ import annotations

import io
import json
import random

from mot_operator.contract import sft_args
from mot_operator.local.state import LocalJob
from mot_trainer import storage


def total_steps(spec) -> int:
    return spec.training.steps * spec.rounds


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


def baseline_sft_args(spec, data_uri: str, out: str, threads: int | None = None) -> list[str]:
    """A branch's round-1 arguments from the student, on `data_uri`, for the MoT run's total steps."""
    return sft_args(spec, 1, data_uri, spec.student, out, steps=total_steps(spec), threads=threads)


def schedule_baselines(runner) -> None:
    """Adds the baseline SFT jobs to `runner` (a LocalRunner), and each one's eval once it is trained."""
    spec = runner.spec
    base = storage.join(runner.run_uri(), "baselines")
    targets = {f"std-{t.name}": t.dataset for t in spec.teachers}
    targets["mtd"] = storage.join(base, "mtd-data.jsonl")
    for label, data_uri in targets.items():
        name = f"baseline-{label}"
        if name not in runner.jobs:
            if label == "mtd":
                union_dataset([t.dataset for t in spec.teachers], data_uri)
            out = storage.join(base, label)
            runner.add_job(LocalJob(name=name, stage="sft", round=0, teacher=None, attempt=1,
                                    args=baseline_sft_args(spec, data_uri, out, runner.opt.threads), output_uri=out, role="baseline",
                                    label=f"baseline {label.upper() if label == 'mtd' else label} "
                                          f"({total_steps(spec)} steps)"))
        trained = runner.jobs[name]
        if trained.state == "Succeeded" and spec.evaluation is not None:
            runner.add_eval(f"baseline-eval-{label}", trained.output_uri, storage.join(base, f"eval-{label}.json"),
                            0, None, f"eval baseline {label}", role="baseline")

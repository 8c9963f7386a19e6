"""The demo's configuration (full and --quick) and the MoTRun manifest it writes per seed; shared by
`mot demo` (demo/cli.py) and the study (demo/study.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mot_operator.demo import tasks


@dataclass(frozen=True)
class DemoConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    teachers: tuple[tasks.Teacher, ...] = tasks.TEACHERS
    per_teacher: int = 200
    eval_size: int = 100
    rounds: int = 3
    steps: int = 30
    learning_rate: float = 1e-3
    batch_size: int = 16  # one micro-batch per step: the same update as accumulating 16, 1.6x faster on CPU
    max_new_tokens: int = 128
    digits: int = 3  # the teachers' (and the eval set's) problem size
    branch_evals_for_first_seed_only: bool = True
    student: str = "partial"  # a shipped student (demo/student.py STUDENTS)


FULL = DemoConfig()
QUICK = DemoConfig(seeds=(0,), teachers=tasks.TEACHERS[:2], per_teacher=60, eval_size=24, rounds=2, steps=4,
                   max_new_tokens=96, student="quick")


def motrun_manifest(name: str, student: Path, files: dict[str, Path], cfg: DemoConfig, seed: int) -> dict:
    return {
        "apiVersion": "mot.dev/v1alpha1",
        "kind": "MoTRun",
        "metadata": {"name": name},
        "spec": {
            "student": str(student),
            "teachers": [{"name": t.name, "dataset": str(files[t.name])} for t in cfg.teachers],
            "rounds": cfg.rounds,
            "training": {"steps": cfg.steps, "learningRate": cfg.learning_rate, "lrSchedule": "constant",
                         "warmupRatio": 0.0, "gradAccum": 1, "microBatchSize": cfg.batch_size,
                         "maxSeqLength": 256, "precision": "fp32", "seed": seed * 100},
            "merge": {"method": "average"},
            "evaluation": {"dataset": str(files["eval"]), "samples": 1, "maxNewTokens": cfg.max_new_tokens,
                           "temperature": 0.0},
        },
    }

"""Fixtures for `mot run` tests: a 2-teacher × 2-round MoTRun on the tiny model, and one finished
`mot run --compare` of it shared by the report and baseline tests (training is the slow part)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

FIXTURES = ("local_manifest", "compare_run")


def write_manifest(folder: Path, tiny_model: Path, *, name: str = "tiny", evaluation: bool = True,
                   steps: int = 3, extra_spec: dict | None = None) -> Path:
    """A MoTRun manifest with relative dataset paths (they resolve against the manifest's folder)."""
    from mot_trainer.tiny import arithmetic_records

    folder.mkdir(parents=True, exist_ok=True)
    data = {"alpha": arithmetic_records(32, seed=11, style="steps"),
            "beta": arithmetic_records(32, seed=12, style="steps"),
            "eval": arithmetic_records(6, seed=13, style="steps")}
    for key, rows in data.items():
        (folder / f"{key}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "student": str(tiny_model),
        "teachers": [{"name": "alpha", "dataset": "alpha.jsonl"}, {"name": "beta", "dataset": "beta.jsonl"}],
        "rounds": 2,
        "training": {"steps": steps, "learningRate": 1e-3, "gradAccum": 2, "maxSeqLength": 128,
                     "precision": "fp32", "warmupRatio": 0.0},
        "retryBackoffSeconds": 0,
    }
    if evaluation:
        spec["evaluation"] = {"dataset": "eval.jsonl", "samples": 1, "maxNewTokens": 48}
    spec.update(extra_spec or {})
    path = folder / "motrun.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "mot.dev/v1alpha1", "kind": "MoTRun",
                                    "metadata": {"name": name}, "spec": spec}, sort_keys=False))
    return path


def mot_command(*args) -> list[str]:
    return [sys.executable, "-m", "mot_operator.cli", *map(str, args)]


def mot_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")


@pytest.fixture
def local_manifest(tmp_path, tiny_model):
    """Path of a tiny 2-teacher × 2-round MoTRun manifest (with evaluation)."""
    return write_manifest(tmp_path / "manifest", tiny_model)


@pytest.fixture(scope="session")
def compare_run(tmp_path_factory, tiny_model):
    """One finished `mot run --compare --parallel 2 --threads 1`: (completed process, workdir)."""
    folder = tmp_path_factory.mktemp("compare-run")
    manifest = write_manifest(folder / "manifest", tiny_model, name="cmp")
    workdir = folder / "work"
    proc = subprocess.run(mot_command("run", manifest, "--workdir", workdir, "--parallel", 2, "--threads", 1,
                                      "--compare"),
                          capture_output=True, text=True, env=mot_env(), timeout=600)
    return proc, workdir

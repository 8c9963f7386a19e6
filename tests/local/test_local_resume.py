"""`mot run` stopped mid-run (Ctrl-C, then SIGKILL) and started again finishes without redoing
finished branches: their manifests are untouched and their trainers ran once. A resume with an
edited manifest is held to the cluster's update rules against the spec the run started with."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from support.local_run import mot_command, mot_env, write_manifest

from mot_trainer.storage import read_checkpoint_manifest


def _start(manifest: Path, workdir: Path) -> subprocess.Popen:
    return subprocess.Popen(mot_command("run", manifest, "--workdir", workdir, "--parallel", 1, "--threads", 1),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=mot_env())


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"mot run ended before {path} appeared:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def _launches(workdir: Path, job_prefix: str) -> int:
    """How many times a trainer was started for a job (the runner logs one line per start)."""
    return sum(p.read_text().count("=== ") for p in (workdir / "logs").glob(f"{job_prefix}*.log"))


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_interrupted_run_resumes_without_redoing_branches(tmp_path, tiny_model):
    manifest = write_manifest(tmp_path / "m", tiny_model, name="resume", evaluation=False, steps=12)
    workdir = tmp_path / "work"
    run_dir = workdir / "storage" / "local" / "resume"
    first_branch = run_dir / "round-1" / "branch-alpha" / "mot-manifest.json"

    # 1. Ctrl-C once round 1's first branch is complete: exit 130, the trainer stopped, status kept.
    proc = _start(manifest, workdir)
    _wait_for(first_branch, proc)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out[-3000:]
    assert "run the same command again to resume" in out
    created = read_checkpoint_manifest(str(first_branch.parent))["created"]
    saved = json.loads((workdir / "status.json").read_text())
    assert {j["state"] for j in saved["jobs"] if j["teacher"] == "alpha"} == {"Succeeded"}

    # 1b. Resuming with an edited manifest is refused where the cluster refuses the same edit, and
    # leaves the run as it was.
    before = (workdir / "status.json").read_bytes()
    edited = manifest.with_name("edited.yaml")  # beside it: the same data, one more step per branch
    spec = yaml.safe_load(manifest.read_text())
    spec["spec"]["training"]["steps"] += 1
    edited.write_text(yaml.safe_dump(spec))
    refused = subprocess.run(mot_command("run", edited, "--workdir", workdir), capture_output=True, text=True,
                             env=mot_env(), timeout=120)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert 'spec.training: Invalid value: training is immutable' in refused.stderr, refused.stderr
    assert (workdir / "status.json").read_bytes() == before

    # 2. Resume, then SIGKILL `mot run` during round 2: its trainer must not outlive it.
    proc = _start(manifest, workdir)
    _wait_for(run_dir / "round-2" / "branch-alpha" / "mot-manifest.json", proc)
    proc.kill()
    proc.communicate(timeout=60)
    running = [j["pid"] for j in json.loads((workdir / "status.json").read_text())["jobs"] if j["pid"]]
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in running) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in running), "a trainer outlived the killed `mot run`"

    # 3. Resume again: finishes; finished branches were neither retrained nor rewritten.
    proc = _start(manifest, workdir)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    status = json.loads((workdir / "status.json").read_text())["status"]
    assert status["phase"] == "Succeeded" and status["round"] == 2
    assert read_checkpoint_manifest(str(first_branch.parent))["created"] == created
    assert _launches(workdir, "resume-r1-sft-alpha-") == 1
    assert _launches(workdir, "resume-r2-sft-alpha-") == 1
    for rnd in (1, 2):
        for teacher in ("alpha", "beta"):
            assert read_checkpoint_manifest(str(run_dir / f"round-{rnd}" / f"branch-{teacher}")) is not None
    assert os.path.exists(workdir / "report.md")


def test_resume_checks_the_recorded_spec_as_the_cluster_checks_an_update(tmp_path, tiny_model):
    """status.json records the spec; `rounds` may change on resume (and is recorded), training may not."""
    from mot_operator.local.runner import LocalRunner, Options
    from mot_operator.planner import RunRef
    from mot_operator.spec import SpecError, parse_spec

    spec = {"student": str(tiny_model), "teachers": [{"name": "a", "dataset": "a.jsonl"}], "rounds": 2}
    ref, workdir = RunRef("local", "edits"), tmp_path / "work"
    LocalRunner(ref, parse_spec(spec), spec, workdir, Options()).save()
    more_rounds = {**spec, "rounds": 4}
    LocalRunner(ref, parse_spec(more_rounds), more_rounds, workdir, Options()).save()
    assert json.loads((workdir / "status.json").read_text())["spec"]["rounds"] == 4
    other_teacher = {**more_rounds, "teachers": [{"name": "b", "dataset": "a.jsonl"}]}
    with pytest.raises(SpecError) as info:
        LocalRunner(ref, parse_spec(other_teacher), other_teacher, workdir, Options())
    assert info.value.field == "spec.teachers" and "teachers are immutable" in str(info.value)

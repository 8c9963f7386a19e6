"""`mot demo`: the README's first command in the shortened mode CI runs (the whole pipeline on the
shipped quick student: teachers' data, MoT, baselines, report), the shipped students themselves,
and `--build-students`, which rebuilds them."""

import json
import subprocess

from support.local_run import mot_command, mot_env

from mot_operator.demo.student import STUDENTS, STUDENTS_DIR
from mot_trainer import storage


def test_demo_quick_runs_end_to_end_on_the_shipped_student(tmp_path):
    workdir = tmp_path / "demo"
    proc = subprocess.run(mot_command("demo", "--quick", "--workdir", workdir),
                          capture_output=True, text=True, env=mot_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"student: quick ({STUDENTS_DIR / 'quick'})" in proc.stdout and "pre-training" not in proc.stdout
    summary = (workdir / "demo-report.md").read_text()
    for method in ("MoT (final merged)", "best STD", "MTD (union)", "start (pre-trained student)"):
        assert method in summary
    assert "the shipped `quick` student" in summary
    results = json.loads((workdir / "demo-seed-0" / "results.json").read_text())
    assert len(results["rounds"]) == 2 and set(results["baselines"]) == {"std-careful", "std-hasty", "MTD"}
    assert (workdir / "demo-seed-0" / "report.png").exists()
    # The held-out eval set never overlaps the teachers' problems.
    data = workdir / "demo-seed-0" / "data"
    prompts = lambda name: {json.loads(line)["prompt"] for line in (data / name).read_text().splitlines()}  # noqa: E731
    assert not prompts("eval.jsonl") & (prompts("teacher-careful.jsonl") | prompts("teacher-hasty.jsonl"))
    # Second run: the finished run is not redone.
    again = subprocess.run(mot_command("demo", "--quick", "--workdir", workdir),
                           capture_output=True, text=True, env=mot_env(), timeout=600)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "started" not in again.stdout


def test_every_student_is_shipped_complete_with_its_probe_score():
    """The demo and the study never pre-train: each student is in the repository, its files match
    its manifest, and students.json says how it was built and how it scored."""
    record = json.loads((STUDENTS_DIR / "students.json").read_text())
    for name, config in STUDENTS.items():
        assert storage.read_checkpoint_manifest(str(STUDENTS_DIR / name)) is not None, name
        assert record[name]["config"]["steps"] == config.steps and record[name]["config"]["seed"] == config.seed
        assert 0.0 <= record[name]["probe"]["accuracy"] <= 1.0 and record[name]["built_with"]["torch"]
    probe = {name: record[name]["probe"]["accuracy"] for name in ("weak", "partial", "strong")}
    assert probe["weak"] < probe["partial"] < probe["strong"], probe


def test_build_students_pretrains_publishes_and_measures(tmp_path):
    out, cache = tmp_path / "students", tmp_path / "cache"
    proc = subprocess.run(mot_command("demo", "--build-students", "quick", "--students-dir", out, "--cache-dir", cache),
                          capture_output=True, text=True, env=mot_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "student quick: " in proc.stdout and "on the probe set (200 3-digit additions)" in proc.stdout
    manifest = storage.read_checkpoint_manifest(str(out / "quick"))
    assert manifest is not None and manifest["kind"] == "sft" and manifest["params"]["steps"] == STUDENTS["quick"].steps
    record = json.loads((out / "students.json").read_text())
    assert set(record) == {"quick"} and record["quick"]["probe"]["problems"] == 200
    assert record["quick"]["built_with"]["cpu_capability"]
    assert not list(out.glob(".*tmp"))  # published by a rename, nothing half-written left

"""`mot demo --quick`, the README's first command in the shortened mode CI runs: the whole pipeline
(student pre-training, teachers' data, MoT, baselines, report) and the cached student on a rerun."""

import json
import subprocess

from support.local_run import mot_command, mot_env


def test_demo_quick_runs_end_to_end_and_caches_the_student(tmp_path):
    cache, workdir = tmp_path / "cache", tmp_path / "demo"
    proc = subprocess.run(mot_command("demo", "--quick", "--workdir", workdir, "--cache-dir", cache),
                          capture_output=True, text=True, env=mot_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "student: pre-training" in proc.stdout
    summary = (workdir / "demo-report.md").read_text()
    for method in ("MoT (final merged)", "best STD", "MTD (union)", "start (pre-trained student)"):
        assert method in summary
    results = json.loads((workdir / "demo-seed-0" / "results.json").read_text())
    assert len(results["rounds"]) == 2 and set(results["baselines"]) == {"std-careful", "std-hasty", "MTD"}
    assert (workdir / "demo-seed-0" / "report.png").exists()
    # The held-out eval set never overlaps the teachers' problems.
    data = workdir / "demo-seed-0" / "data"
    prompts = lambda name: {json.loads(line)["prompt"] for line in (data / name).read_text().splitlines()}  # noqa: E731
    assert not prompts("eval.jsonl") & (prompts("teacher-careful.jsonl") | prompts("teacher-hasty.jsonl"))

    student = [p for p in cache.iterdir() if p.name.startswith("student-")]
    assert len(student) == 1 and (student[0] / "mot-manifest.json").exists()
    before = (student[0] / "mot-manifest.json").stat().st_mtime_ns
    # Second run: the student comes from the cache and the finished run is not redone.
    again = subprocess.run(mot_command("demo", "--quick", "--workdir", workdir, "--cache-dir", cache),
                           capture_output=True, text=True, env=mot_env(), timeout=600)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "student: cached" in again.stdout and "started" not in again.stdout
    assert (student[0] / "mot-manifest.json").stat().st_mtime_ns == before

"""`mot run --compare`: STD per teacher and MTD on the union, at MoT's total SFT steps, in one table."""

import json

from mot_trainer.storage import read_checkpoint_manifest


def test_compare_reports_mot_best_std_and_mtd(compare_run):
    proc, workdir = compare_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    baselines = results["baselines"]
    assert set(baselines) == {"std-alpha", "std-beta", "MTD"}
    for label, b in baselines.items():
        # rounds (2) × steps per branch (3): the paper's equal-steps comparison
        assert b["steps"] == 6 == results["total_steps"], label
        assert b["loss"] is not None and 0.0 <= b["eval"]["accuracy"] <= 1.0
    saved = {j["name"]: j for j in json.loads((workdir / "status.json").read_text())["jobs"]}
    mtd = saved["baseline-mtd"]
    manifest = read_checkpoint_manifest(mtd["output_uri"])
    assert manifest["metrics"]["loss_history"][-1][0] == 6
    union = mtd["args"][mtd["args"].index("--data") + 1]
    assert sum(1 for _ in open(union)) == 64  # both teachers' 32 records
    report = (workdir / "report.md").read_text()
    section = report.split("## MoT vs baselines", 1)[1]
    for row in ("MoT (final merged)", "best STD (std-", "MTD"):
        assert row in section
    assert "MoT vs baselines" in proc.stdout


def test_compare_option_takes_a_budget():
    import argparse

    from mot_operator.local.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parse = lambda *argv: parser.parse_args(["m.yaml", *argv]).compare  # noqa: E731
    assert parse() is None
    assert parse("--compare") == "steps"  # bare: the paper's equal steps, as before
    assert parse("--compare", "compute") == "compute" and parse("--compare=both") == "both"
    assert parser.parse_args(["--compare", "steps", "m.yaml"]).manifest == "m.yaml"


def test_budgets_schedule_their_own_jobs_and_share_the_union(tmp_path):
    """Without training: --compare both adds the equal-steps jobs under today's names and the
    equal-compute ones beside them at K × rounds × steps; results name them by budget."""
    from support.local_run import write_manifest

    from mot_operator.local.cli import read_run
    from mot_operator.local.results import baseline_results
    from mot_operator.local.runner import LocalRunner, Options
    from mot_operator.planner import RunRef

    manifest = write_manifest(tmp_path / "m", tmp_path / "student", extra_spec={"preflight": {"enabled": False}})
    _, workdir, spec_dict, spec = read_run(manifest, tmp_path / "work")
    runner = LocalRunner(RunRef("local", "tiny"), spec, spec_dict, workdir, Options(compare="both"))
    runner.schedule_extras()
    labels = ["std-alpha", "std-beta", "mtd"]
    assert set(runner.jobs) == {f"baseline-{label}{suffix}" for label in labels for suffix in ("", "-compute")}
    base = runner.run_uri() + "/baselines"
    for label in labels:
        for suffix, steps in (("", 6), ("-compute", 12)):  # 2 rounds × 3 steps; × 2 teachers
            job = runner.jobs[f"baseline-{label}{suffix}"]
            assert job.args[job.args.index("--steps") + 1] == str(steps)
            assert job.output_uri == f"{base}/{label}{suffix}"
    data = {runner.jobs[n].args[runner.jobs[n].args.index("--data") + 1] for n in ("baseline-mtd", "baseline-mtd-compute")}
    assert data == {f"{base}/mtd-data.jsonl"}
    for job in runner.jobs.values():
        job.state, job.metrics = "Succeeded", {"final_loss": 0.5}
    runner.schedule_extras()  # trained: each one's eval, by budget
    assert {"baseline-eval-mtd", "baseline-eval-mtd-compute"} <= set(runner.jobs)
    assert runner.jobs["baseline-eval-std-alpha-compute"].output_uri == f"{base}/eval-std-alpha-compute.json"
    found = {k: (v["kind"], v["budget"], v["steps"]) for k, v in baseline_results(runner).items()}
    assert found == {"std-alpha": ("STD", "steps", 6), "std-beta": ("STD", "steps", 6), "MTD": ("MTD", "steps", 6),
                     "std-alpha (compute)": ("STD", "compute", 12), "std-beta (compute)": ("STD", "compute", 12),
                     "MTD (compute)": ("MTD", "compute", 12)}


def test_compare_compute_trains_baselines_at_k_times_the_steps(compare_run, tmp_path):
    """The finished --compare run, continued with --compare compute (in a copy of its workdir: same
    spec and storage, so only the equal-compute baselines train): K × rounds × steps = 12 each."""
    import shutil
    import subprocess

    import yaml
    from support.local_run import mot_command, mot_env

    proc, workdir = compare_run
    assert proc.returncode == 0
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(workdir / "status.json", work / "status.json")
    saved = json.loads((work / "status.json").read_text())
    manifest = tmp_path / "motrun.yaml"
    manifest.write_text(yaml.safe_dump({"apiVersion": "mot.dev/v1alpha1", "kind": "MoTRun",
                                        "metadata": {"name": saved["run"]["name"]}, "spec": saved["spec"]}))
    proc = subprocess.run(mot_command("run", manifest, "--workdir", work, "--parallel", 2, "--threads", 1,
                                      "--compare", "compute", "--quiet"),
                          capture_output=True, text=True, env=mot_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((work / "results.json").read_text())
    compute = {k: v for k, v in results["baselines"].items() if v["budget"] == "compute"}
    assert set(compute) == {"std-alpha (compute)", "std-beta (compute)", "MTD (compute)"}
    for b in compute.values():
        assert b["steps"] == 12 and b["loss"] is not None and 0.0 <= b["eval"]["accuracy"] <= 1.0
    jobs = {j["name"]: j for j in json.loads((work / "status.json").read_text())["jobs"]}
    mtd = jobs["baseline-mtd-compute"]
    assert read_checkpoint_manifest(mtd["output_uri"])["metrics"]["loss_history"][-1][0] == 12
    assert mtd["args"][mtd["args"].index("--data") + 1] == jobs["baseline-mtd"]["args"][
        jobs["baseline-mtd"]["args"].index("--data") + 1]  # one union file
    section = (work / "report.md").read_text().split("## MoT vs baselines", 1)[1]
    for row in ("best STD (std-", "), equal steps", "), equal compute", "MTD, equal compute", "equal compute: 12 SFT"):
        assert row in section, row

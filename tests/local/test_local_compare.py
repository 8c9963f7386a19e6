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

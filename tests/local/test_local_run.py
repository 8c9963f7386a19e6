"""`mot run` end to end on the tiny model: real planner, real `mot-train` processes, local storage."""

import json
import subprocess

import yaml
from support.local_run import mot_command, mot_env, write_manifest

from mot_trainer.storage import read_checkpoint_manifest


def test_run_finishes_with_report_plot_and_checkpoints(compare_run):
    proc, workdir = compare_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = json.loads((workdir / "status.json").read_text())
    status = saved["status"]
    assert status["phase"] == "Succeeded"
    assert [r["round"] for r in status["rounds"]] == [1, 2]
    for rnd in status["rounds"]:
        for teacher in ("alpha", "beta"):
            branch = rnd["branches"][teacher]
            assert read_checkpoint_manifest(branch["checkpoint"])["kind"] == "sft"
            assert branch["loss"] > 0
        assert read_checkpoint_manifest(rnd["mergedCheckpoint"])["kind"] == "merge"
        assert 0.0 <= rnd["evalScore"] <= 1.0
    # Round 2 starts from round 1's merge (the MoT loop), and storage is the workdir's by default.
    round2_alpha = next(j for j in saved["jobs"] if j["stage"] == "sft" and j["round"] == 2 and j["role"] == "mot")
    assert round2_alpha["args"][round2_alpha["args"].index("--init") + 1] == status["rounds"][0]["mergedCheckpoint"]
    assert status["rounds"][0]["mergedCheckpoint"].startswith(str(workdir / "storage" / "local" / "cmp"))

    report = (workdir / "report.md").read_text()
    results = json.loads((workdir / "results.json").read_text())
    for rnd in results["rounds"]:
        assert set(rnd["branches"]) == {"alpha", "beta"}
        for branch in rnd["branches"].values():  # every branch is scored too, not only the merge
            assert branch["loss"] is not None and 0.0 <= branch["eval"]["accuracy"] <= 1.0
        assert rnd["merged"]["eval"]["heldout_loss"] > 0
    assert results["start"]["eval"]["problems"] == 6
    assert "| 2     | branch beta" in report and "| 2     | **merged**" in report
    assert (workdir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "MoT run local/cmp: per round" in proc.stdout
    # The trainers' progress records reached status.json (no log parsing), and the run ends with the
    # per-round table `kubectl mot status` prints from a MoTRun's status: the same function, the same text.
    for rnd in status["rounds"]:
        for branch in rnd["branches"].values():
            assert branch["progress"]["step"] == branch["progress"]["totalSteps"] > 0
    assert status["progress"]["fraction"] == 1.0 and status["reason"] == "Succeeded"
    from mot_operator import status_table

    table = status_table.format_table(status_table.HEADER, status_table.rows(status, saved.get("spec")))
    assert table in proc.stdout and "alpha" in table and "merged" in table


def test_invalid_manifest_names_the_field(local_manifest, tmp_path):
    doc = yaml.safe_load(local_manifest.read_text())
    doc["spec"]["teachers"][1]["name"] = "Beta_Teacher"
    bad = local_manifest.with_name("bad.yaml")
    bad.write_text(yaml.safe_dump(doc))
    proc = subprocess.run(mot_command("run", bad, "--workdir", tmp_path / "w"), capture_output=True, text=True,
                          env=mot_env(), timeout=120)
    assert proc.returncode == 2
    assert "spec.teachers[1].name" in proc.stderr
    assert not (tmp_path / "w" / "logs").exists() or not any((tmp_path / "w" / "logs").iterdir())


def test_manifest_without_a_motrun_is_refused(tmp_path):
    path = tmp_path / "cm.yaml"
    path.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    proc = subprocess.run(mot_command("run", path), capture_output=True, text=True, env=mot_env(), timeout=120)
    assert proc.returncode == 2 and "kind" in proc.stderr and str(path) in proc.stderr


def test_run_with_s3_storage_from_the_manifest(tmp_path, tiny_model, s3_server, monkeypatch):
    """storage.uri s3://... and storage.endpoint in the manifest: checkpoints go to a real S3 server."""
    bucket = s3_server.make_bucket("mot-local-run")
    env = {k: v for k, v in s3_server.env.items() if k != "AWS_ENDPOINT_URL"}  # the manifest names it
    manifest = write_manifest(tmp_path / "m", tiny_model, name="s3run", evaluation=False, steps=2, extra_spec={
        "rounds": 1, "storage": {"uri": f"{bucket}/runs", "endpoint": s3_server.endpoint, "pathStyle": True}})
    proc = subprocess.run(mot_command("run", manifest, "--workdir", tmp_path / "w", "--threads", 1),
                          capture_output=True, text=True, env={**mot_env(), **env}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    merged = f"{bucket}/runs/local/s3run/round-1/merged"
    assert read_checkpoint_manifest(merged)["kind"] == "merge"
    assert read_checkpoint_manifest(f"{bucket}/runs/local/s3run/round-1/branch-beta")["kind"] == "sft"
    status = json.loads((tmp_path / "w" / "status.json").read_text())["status"]
    assert status["phase"] == "Succeeded" and status["finalModel"] == merged
    assert not (tmp_path / "w" / "storage").exists()

"""`mot validate FILE.yaml`: the manifest read as `mot run` reads it, then the trainer's preflight in
process: a per-teacher table and exit 0, or exit 2 naming the field, file or teacher."""

import json
import subprocess

import yaml
from support.local_run import mot_command, mot_env, write_manifest


def validate(manifest, cwd=None):
    return subprocess.run(mot_command("validate", manifest), capture_output=True, text=True, env=mot_env(),
                          timeout=300, cwd=cwd)


def test_validate_prints_the_per_teacher_table(tmp_path, tiny_model):
    manifest = write_manifest(tmp_path / "m", tiny_model)
    proc = validate(manifest, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("teacher"))
    assert lines[header].split() == ["teacher", "records", "p50", "p95", "max", "truncated"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[header + 2: header + 4]}
    assert set(rows) == {"alpha", "beta"}
    for cells in rows.values():
        records, p50, p95, longest, truncated = cells
        assert records == "32" and 0 < int(p50) <= int(p95) <= int(longest) <= 128 and truncated == "0.0%"
    assert "eval set: 6 problems with answers" in proc.stdout
    # The estimator's figure for this spec (one process: nothing sharded), as `mot estimate` gives it.
    from mot_operator import estimate
    from mot_operator.local.cli import read_run
    from mot_operator.local.estimate_cmd import gib

    _, _, _, spec = read_run(manifest)
    found = estimate.estimate_spec(json.loads((tiny_model / "config.json").read_text()), spec)
    assert (f"memory: a branch needs about {gib(found.total + found.margin)} GiB per GPU (none over 1 process"
            in proc.stdout), proc.stdout
    assert f"ok: {manifest} passes the preflight" in proc.stdout
    assert not (tmp_path / "mot-runs").exists()  # no workdir, no default storage folder created


def test_validate_names_a_bad_teacher_dataset(tmp_path, tiny_model):
    manifest = write_manifest(tmp_path / "m", tiny_model)
    doc = yaml.safe_load(manifest.read_text())
    doc["spec"]["teachers"][1]["dataset"] = "./betta.jsonl"
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = validate(manifest)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error: {manifest}: teacher beta: {tmp_path / 'm' / 'betta.jsonl'}: no such file" in proc.stderr


def test_validate_names_the_field_of_an_invalid_spec(tmp_path, tiny_model):
    manifest = write_manifest(tmp_path / "m", tiny_model, extra_spec={"rounds": 0})
    proc = validate(manifest)
    assert proc.returncode == 2
    assert f"error: invalid MoTRun manifest {manifest}: spec.rounds" in proc.stderr


def test_validate_refuses_truncation_with_the_numbers(tmp_path, tiny_model):
    manifest = write_manifest(tmp_path / "m", tiny_model)
    doc = yaml.safe_load(manifest.read_text())
    doc["spec"]["training"]["maxSeqLength"] = 20
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = validate(manifest)
    assert proc.returncode == 2
    assert "teacher alpha: 100% of 32 examples are longer than maxSeqLength 20" in proc.stderr
    assert "100.0%" in proc.stdout  # the table still shows every teacher's numbers


def test_validate_takes_the_manifests_max_truncated_fraction(tmp_path, tiny_model):
    """`mot validate` refuses what `mot run` refuses: spec.preflight.maxTruncatedFraction, not 5%."""
    manifest = write_manifest(tmp_path / "m", tiny_model)
    doc = yaml.safe_load(manifest.read_text())
    doc["spec"]["training"]["maxSeqLength"] = 20
    doc["spec"]["preflight"] = {"maxTruncatedFraction": 1.0}
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = validate(manifest)
    assert proc.returncode == 0, proc.stderr
    assert "100.0%" in proc.stdout
    refused = subprocess.run(mot_command("validate", manifest, "--max-truncated-fraction", "0.5"),
                             capture_output=True, text=True, env=mot_env(), timeout=300)
    assert refused.returncode == 2 and "at most 50% allowed" in refused.stderr, refused.stderr


def test_validate_on_the_demos_data_prints_the_per_teacher_table(tmp_path):
    """The manifest and data `mot demo` writes (its full configuration: 3 teachers x 200 problems, 100
    held-out), with the demo's shipped student."""
    from mot_operator.demo import tasks
    from mot_operator.demo.config import FULL, motrun_manifest
    from mot_operator.demo.student import shipped_student

    student = shipped_student(FULL.student)
    files = tasks.build_task(tmp_path / "demo-seed-0" / "data", seed=0, teachers=FULL.teachers,
                             per_teacher=FULL.per_teacher, eval_size=FULL.eval_size, digits=FULL.digits)
    manifest = tmp_path / "demo-seed-0" / "motrun.yaml"
    manifest.write_text(yaml.safe_dump(motrun_manifest("demo-seed-0", student, files, FULL, 0), sort_keys=False))
    proc = validate(manifest, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("teacher"))
    assert lines[header].split() == ["teacher", "records", "p50", "p95", "max", "truncated"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[header + 2: header + 5]}
    assert set(rows) == {"careful", "hasty", "sloppy"}
    for records, p50, p95, longest, truncated in rows.values():
        assert records == "200" and 0 < int(p50) <= int(p95) <= int(longest) <= 256 and truncated == "0.0%"
    assert "truncated = longer than maxSeqLength 256" in proc.stdout
    assert "eval set: 100 problems with answers" in proc.stdout
    assert f"ok: {manifest} passes the preflight" in proc.stdout

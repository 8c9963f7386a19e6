"""`mot run` runs the preflight first: a bad input fails the run (PreflightFailed, exit 1) with a
message naming the file, line or field, before any branch, merge, eval or baseline process starts,
and leaves no report or plot; a good one prints the per-teacher table before the first branch."""

import json
import re
import shutil
import subprocess

import pytest
import yaml
from support.local_run import mot_command, mot_env, write_manifest

from mot_trainer.tiny import arithmetic_records

FAILED = "run Failed: PreflightFailed: preflight failed after 1 attempt, invalid input: not retried: "
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
               "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
               "AWS_WEB_IDENTITY_TOKEN_FILE")


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def library_warnings(text: str) -> list[str]:
    """Lines that look like a library's warning (Python warnings, WARNING log records, deprecation
    notices); the runner's own `Warning <Reason>: ...` Event lines are the run's messages."""
    return [line for line in text.splitlines()
            if re.search(r"warn|deprecat", line, re.I) and not re.match(r"Warning +[A-Z]\w*: ", line)]


# Each case breaks one input of the tiny 2-teacher manifest (its folder `m`, its spec `spec`) and
# returns what the message must name. `env` is the environment `mot run` gets.


def student_missing(m, spec, env, tmp_path, s3):
    spec["student"] = str(tmp_path / "no-such-student")
    return [f"--student {tmp_path / 'no-such-student'}: no such model folder"]


def no_chat_template(m, spec, env, tmp_path, s3):
    student = shutil.copytree(spec["student"], tmp_path / "base-student")
    (student / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((student / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (student / "tokenizer_config.json").write_text(json.dumps(config))
    spec["student"] = str(student)
    return [f"--student {student}: the tokenizer has no chat template (chat_template in tokenizer_config.json"]


def dataset_missing(m, spec, env, tmp_path, s3):
    spec["teachers"][1]["dataset"] = "./betta.jsonl"  # a typo: relative to the manifest's folder
    return [f"teacher beta: {m / 'betta.jsonl'}: no such file"]


def malformed_line(m, spec, env, tmp_path, s3):
    rows = [json.loads(line) for line in (m / "beta.jsonl").read_text().splitlines()]
    write_jsonl(m / "beta.jsonl", [*rows[:6], '{"prompt": "What is 1 + 1?", "respo', *rows[6:]])
    return [f"teacher beta: {m / 'beta.jsonl'} line 7: not valid JSON"]


def empty_response(m, spec, env, tmp_path, s3):
    rows = [json.loads(line) for line in (m / "alpha.jsonl").read_text().splitlines()]
    rows[3]["response"] = "   "
    write_jsonl(m / "alpha.jsonl", rows)
    return [f"teacher alpha: {m / 'alpha.jsonl'} line 4: empty response"]


def every_example_truncated(m, spec, env, tmp_path, s3):
    spec["training"]["maxSeqLength"] = 16
    return ["teacher alpha: 100% of 32 examples are longer than maxSeqLength 16 (p95 ",
            "raise spec.training.maxSeqLength or spec.preflight.maxTruncatedFraction"]


def eval_without_answers(m, spec, env, tmp_path, s3):
    rows = arithmetic_records(6, seed=13, style="steps")
    del rows[1]["answer"]
    write_jsonl(m / "eval.jsonl", rows)
    return [f"eval set: {m / 'eval.jsonl'} line 2: missing field 'answer'"]


def no_credentials(m, spec, env, tmp_path, s3):
    """alpha's data and the checkpoints on S3, and no credentials anywhere boto3 looks."""
    bucket = s3.make_bucket("mot-local-preflight")
    s3.client().put_object(Bucket="mot-local-preflight", Key="data/alpha.jsonl", Body=(m / "alpha.jsonl").read_bytes())
    spec["teachers"][0]["dataset"] = f"{bucket}/data/alpha.jsonl"
    spec["storage"] = {"uri": f"{bucket}/runs", "endpoint": s3.endpoint, "pathStyle": True}
    for name in CREDENTIALS:
        env.pop(name, None)
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-credentials"), AWS_CONFIG_FILE=str(tmp_path / "no-config"),
               AWS_EC2_METADATA_DISABLED="true", AWS_REGION="us-east-1")
    return [f"teacher alpha: {bucket}/data/alpha.jsonl: no S3 credentials",
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (in a cluster: spec.storage.credentialsSecret)"]


def missing_bucket(m, spec, env, tmp_path, s3):
    """beta's data in a bucket that does not exist. (Not the storage bucket: SeaweedFS, unlike AWS S3
    and MinIO, creates a missing bucket on the first put, so there the storage probe succeeds.)"""
    bucket = s3.make_bucket("mot-local-preflight")
    spec["teachers"][1]["dataset"] = "s3://mot-no-such-bucket/data/beta.jsonl"
    spec["storage"] = {"uri": f"{bucket}/runs", "endpoint": s3.endpoint, "pathStyle": True}
    env.update({k: v for k, v in s3.env.items() if k != "AWS_ENDPOINT_URL"})  # the manifest names it
    return ["teacher beta: s3://mot-no-such-bucket/data/beta.jsonl: bucket mot-no-such-bucket does not exist "
            f"at {s3.endpoint} (check the bucket in this URI, and the endpoint: AWS_ENDPOINT_URL, in a cluster spec.storage.endpoint)"]


CASES = [student_missing, no_chat_template, dataset_missing, malformed_line, empty_response,
         every_example_truncated, eval_without_answers, no_credentials, missing_bucket]
S3_CASES = (no_credentials, missing_bucket)


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_fails_the_run_before_any_branch(case, tmp_path, tiny_model, request):
    s3 = request.getfixturevalue("s3_server") if case in S3_CASES else None
    manifest = write_manifest(tmp_path / "m", tiny_model, name="bad")
    doc = yaml.safe_load(manifest.read_text())
    env = {k: v for k, v in mot_env().items() if not k.startswith("AWS_")}
    expected = case(manifest.parent, doc["spec"], env, tmp_path, s3)
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    workdir = tmp_path / "work"
    # --compare and 2 at a time: baselines and report evals could start beside the preflight.
    proc = subprocess.run(mot_command("run", manifest, "--workdir", workdir, "--compare", "--parallel", 2,
                                      "--threads", 1), capture_output=True, text=True, env=env, timeout=300)

    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(FAILED), proc.stderr
    for text in expected:
        assert text in last, last
    saved = json.loads((workdir / "status.json").read_text())
    assert [(j["stage"], j["role"], j["state"]) for j in saved["jobs"]] == [("preflight", "mot", "Failed")]
    status = saved["status"]
    assert status["phase"] == "Failed" and status["failure"]["stage"] == "preflight" and status["rounds"] == []
    assert {c["reason"] for c in status["conditions"] if c["type"] == "Failed"} == {"PreflightFailed"}
    assert {p.name for p in (workdir / "logs").iterdir()} == {"bad-preflight-a1.log", "bad-preflight-a1.termination"}
    assert "started  preflight" in proc.stdout and proc.stdout.count("  started  ") == 1
    assert not (workdir / "report.md").exists() and not (workdir / "report.png").exists()
    assert json.loads((workdir / "results.json").read_text())["rounds"] == []
    assert library_warnings(proc.stdout + proc.stderr) == [], proc.stdout + proc.stderr
    assert library_warnings((workdir / "logs" / "bad-preflight-a1.log").read_text()) == []


def test_passing_preflight_prints_its_table_before_any_branch_starts(compare_run):
    proc, workdir = compare_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    started = [i for i, line in enumerate(lines) if line.startswith("  started  ")]
    assert lines[started[0]] == "  started  preflight"
    header = lines.index(next(line for line in lines if line.startswith("teacher  records")))
    assert lines[header].split() == ["teacher", "records", "p50", "p95", "max", "truncated"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[header + 2: header + 4]}
    assert set(rows) == {"alpha", "beta"} and all(r[0] == "32" and r[-1] == "0.0%" for r in rows.values())
    # Nothing else (branches, report evals, baselines) started before the table was printed.
    assert started[0] < header < started[1]

    saved = json.loads((workdir / "status.json").read_text())
    jobs = saved["jobs"]
    assert jobs[0]["stage"] == "preflight" and jobs[0]["state"] == "Succeeded"
    assert all(j["started_at"] >= jobs[0]["finished_at"] for j in jobs[1:])
    assert saved["status"]["preflight"]["teachers"]["alpha"]["records"] == 32
    assert library_warnings(proc.stdout + proc.stderr) == [], proc.stdout + proc.stderr

    report = (workdir / "report.md").read_text()
    section = report.split("## Preflight", 1)[1]
    assert section.split("```")[1].strip().splitlines()[0].split() == lines[header].split()
    assert "alpha" in section and "eval set: 6 problems with answers" in section
    assert json.loads((workdir / "results.json").read_text())["preflight"]["teachers"].keys() == {"alpha", "beta"}


@pytest.mark.parametrize(("preflight", "status", "scheduled"), [
    ({}, {}, False),  # not started yet
    ({}, {"preflight": {"state": "Running"}, "rounds": []}, False),
    ({}, {"preflight": {"state": "Retrying"}, "rounds": []}, False),
    ({}, {"preflight": {"state": "Succeeded"}, "rounds": []}, True),
    ({}, {"rounds": [{"round": 1}]}, True),  # a run started before preflights existed
    ({"enabled": False}, {}, True),
    ({}, {"preflight": {"state": "Succeeded"}, "phase": "Failed"}, False),
])
def test_report_and_baseline_work_waits_for_the_preflight(tmp_path, preflight, status, scheduled):
    """The --compare baselines (sft processes) are scheduled only once the preflight passed (or is
    off), never beside it or after a failure. (The student's eval is the planner's round 0.)"""
    from mot_operator.local.runner import LocalRunner, Options
    from mot_operator.planner import RunRef
    from mot_operator.spec import parse_spec

    data = write_jsonl(tmp_path / "a.jsonl", arithmetic_records(4))
    spec = {"student": str(tmp_path / "student"), "teachers": [{"name": "a", "dataset": str(data)}], "rounds": 1,
            "evaluation": {"dataset": str(data)}, "preflight": preflight, "storage": {"uri": str(tmp_path / "s")}}
    runner = LocalRunner(RunRef("local", "x"), parse_spec(spec), spec, tmp_path / "work", Options(compare=True))
    runner.status = status
    runner.schedule_extras()
    expected = {"baseline-std-a", "baseline-mtd"} if scheduled else set()
    assert set(runner.jobs) == expected

"""The preflight on the real control plane (support/mot_e2e.py), with the real `mot-train preflight`
in its Pod: one MoTRun per bad input, all applied at once, each ends Failed with reason
PreflightFailed after one attempt (exit code 2 is not retried), its message naming the file, line or
field, and no branch, merge or eval Job is ever created (a watch on the namespace's Jobs sees every
Job created, even one deleted again). A good run passes it, with each teacher's records and token
lengths in status.preflight and a PreflightPassed Event, and goes on to its branches."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from support.mot_e2e import BUCKET
from support.processes import wait_until

from mot_operator.planner import preflight_summary
from mot_trainer.preflight import TRUNCATION_HINT, PreflightFailed, preflight
from mot_trainer.storage import CREDENTIALS_HINT
from mot_trainer.tiny import arithmetic_records

pytestmark = pytest.mark.e2e

PREFIX = "preflight failed after 1 attempt, invalid input: not retried: "
MISSING_BUCKET = "mot-e2e-no-such-bucket"
LATER_STAGES = ("sft", "merge", "eval")


@dataclass
class Case:
    manifest: dict
    expected: list[str]  # each in the run's message


def jsonl(rows: list) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def upload_student_without_chat_template(mot_e2e, tiny_model, key: str, tmp_path) -> str:
    """The tiny student with its chat template removed (tokenizer_config.json and any .jinja)."""
    student = shutil.copytree(tiny_model, tmp_path / "no-template")
    (student / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((student / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (student / "tokenizer_config.json").write_text(json.dumps(config))
    client = mot_e2e.s3.client()
    for path in sorted(student.iterdir()):
        client.upload_file(str(path), BUCKET, f"{key}/{path.name}")
    return f"s3://{BUCKET}/{key}"


def failure_cases(mot_e2e, ns: str, tiny_model, tmp_path) -> dict[str, Case]:
    """name -> the MoTRun and what its message must say. Its data under preflight/<ns>/ in the bucket."""
    key = f"preflight/{ns}"
    records = arithmetic_records(12, seed=41, style="steps")
    good = mot_e2e.upload_text(f"{key}/good.jsonl", jsonl(records))

    def run(name: str, teachers: dict[str, str], **spec) -> dict:
        return mot_e2e.motrun(name, teachers, max_retries=2, **spec)  # retries allowed, none used

    cases = {}
    student = f"s3://{BUCKET}/{key}/no-such-student"
    cases["student-missing"] = Case(run("student-missing", {"a": good}, student=student),
                                    [f"--student {student}: no objects under this prefix (no model folder)"])

    student = upload_student_without_chat_template(mot_e2e, tiny_model, f"{key}/base-student", tmp_path)
    cases["no-chat-template"] = Case(run("no-chat-template", {"a": good}, student=student),
                                     [f"--student {student}: the tokenizer has no chat template"])

    typo = f"s3://{BUCKET}/{key}/typo.jsonl"
    cases["teacher-missing"] = Case(run("teacher-missing", {"a": good, "b": typo}),
                                    [f"teacher b: {typo}: no such object"])

    bad = mot_e2e.upload_text(f"{key}/bad.jsonl", jsonl([records[0], records[1], '{"prompt": "1+1", "respo']))
    cases["malformed-line"] = Case(run("malformed-line", {"a": good, "qwq": bad}),
                                   [f"teacher qwq: {bad} line 3: not valid JSON"])

    empty = mot_e2e.upload_text(f"{key}/empty.jsonl", jsonl(
        [records[0], records[1], records[2], {"prompt": "What is 1 + 1?", "response": "  "}]))
    cases["empty-response"] = Case(run("empty-response", {"r1": empty}),
                                   [f"teacher r1: {empty} line 4: empty response"])

    # Every example longer than the smallest maxSeqLength the CRD allows: the message has the numbers,
    # the same as the preflight run here on the same data and tokenizer says.
    local = tmp_path / "good.jsonl"
    local.write_text(jsonl(records))
    with pytest.raises(PreflightFailed) as refused:
        preflight(str(tiny_model), [("a", str(local))], max_seq_length=16)
    assert f"teacher a: 100% of {len(records)} examples are longer than maxSeqLength 16 (p95 " in str(refused.value)
    truncated = run("all-truncated", {"a": good})
    truncated["spec"]["training"]["maxSeqLength"] = 16
    cases["all-truncated"] = Case(truncated, [str(refused.value), "at most 5% allowed", TRUNCATION_HINT])

    problems = mot_e2e.upload_text(f"{key}/eval.jsonl", jsonl([{"prompt": "What is 2 + 2?", "answer": "4"},
                                                              {"prompt": "What is 3 + 3?"}]))
    cases["eval-no-answers"] = Case(run("eval-no-answers", {"a": good}, evaluation={"dataset": problems}),
                                    [f"eval set: {problems} line 2: missing field 'answer'"])

    # No spec.storage.credentialsSecret, and the operator has no --default-credentials-secret: the
    # Pod has no S3 keys; the first S3 read (the student) is refused, saying what to set.
    bare = run("no-credentials", {"a": good})
    del bare["spec"]["storage"]["credentialsSecret"]
    cases["no-credentials"] = Case(bare, [f"{mot_e2e.student_uri}: no S3 credentials", CREDENTIALS_HINT])

    # A dataset in a bucket that does not exist: refused naming the bucket, the endpoint and the
    # setting. (Checkpoints to a missing bucket cannot be tried here: SeaweedFS creates a bucket on
    # its first PutObject, so the storage probe there succeeds; AWS S3 answers NoSuchBucket.)
    nowhere = f"s3://{MISSING_BUCKET}/data/steps.jsonl"
    cases["missing-bucket"] = Case(run("missing-bucket", {"a": good, "far": nowhere}), [
        f"teacher far: {nowhere}: bucket {MISSING_BUCKET} does not exist at {mot_e2e.s3.endpoint} "
        "(check the bucket in this URI, and the endpoint: AWS_ENDPOINT_URL, in a cluster spec.storage.endpoint)"])
    return cases


@dataclass
class Preflights:
    ns: str
    cases: dict[str, Case]
    created: list[dict]  # metadata of every Job created in `ns` while the runs ran
    good_ns: str
    good_data: dict[str, Path]  # the good run's teacher -> local copy of its dataset


@pytest.fixture(scope="module")
def preflights(mot_e2e, tiny_model, tmp_path_factory):
    """Every failure case applied at once in one namespace, and the good run in another (its branch
    Pods held, so it stays Running); returns once every failure case has ended."""
    tmp_path = tmp_path_factory.mktemp("preflight-e2e")
    ns, good_ns = mot_e2e.namespace(), mot_e2e.namespace()
    cases = failure_cases(mot_e2e, ns, tiny_model, tmp_path)

    good_data, datasets = {}, {}
    for teacher, seed, style in (("alpha", 42, "steps"), ("beta", 43, "short")):
        text = jsonl(arithmetic_records(12 if style == "steps" else 10, seed=seed, style=style))
        datasets[teacher] = mot_e2e.upload_text(f"preflight/{good_ns}/{teacher}.jsonl", text)
        good_data[teacher] = tmp_path / f"{teacher}.jsonl"
        good_data[teacher].write_text(text)
    good = mot_e2e.motrun("fine", datasets, evaluation={"dataset": datasets["alpha"]})
    release = mot_e2e.kubelet.hold(lambda pod: pod["metadata"]["namespace"] == good_ns
                                   and (pod["metadata"].get("labels") or {}).get("mot.dev/stage") == "sft")
    try:
        with mot_e2e.watch_jobs(ns) as created:
            mot_e2e.kubectl("-n", ns, "apply", "-f", "-", stdin=yaml.safe_dump_all([c.manifest for c in cases.values()]))
            mot_e2e.apply(good_ns, good)
            for name in cases:
                mot_e2e.wait_phase(ns, name, ("Succeeded", "Failed"), timeout=150)
            # The Events are posted after the status is written: wait for the last one of each run.
            wait_until(lambda: all("Failed" in [e["reason"] for e in mot_e2e.events(ns, name)] for name in cases),
                       30, "each run's Failed Event", on_timeout=lambda: "\n".join(
                           f"{name}: {mot_e2e.get(ns, name)['status'].get('message')!r}; Events "
                           f"{[e['reason'] for e in mot_e2e.events(ns, name)]}" for name in cases))
        yield Preflights(ns=ns, cases=cases, created=list(created), good_ns=good_ns, good_data=good_data)
    finally:
        release.set()


@pytest.mark.parametrize("name", ["student-missing", "no-chat-template", "teacher-missing", "malformed-line",
                                  "empty-response", "all-truncated", "eval-no-answers", "no-credentials",
                                  "missing-bucket"])
def test_a_bad_input_fails_the_run_in_its_preflight_before_any_branch_job(mot_e2e, preflights, name):
    ns, case = preflights.ns, preflights.cases[name]
    status = mot_e2e.get(ns, name)["status"]
    message = status["message"]
    print(f"\n{name}: {message}")
    assert status["phase"] == "Failed", message
    assert message.startswith(PREFIX), message
    for text in case.expected:
        assert text in message, (text, message)
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Failed"]["status"] == "True" and conditions["Failed"]["reason"] == "PreflightFailed"
    assert conditions["Failed"]["message"] == message
    # The trainer's own words, from its termination message ("invalid input: " said once in the message).
    reason = "invalid input: " + message[len(PREFIX):]
    assert status["failure"] == {"stage": "preflight", "attempts": 1, "reason": reason}, status["failure"]
    job = f"{name}-preflight-a1"
    entry = status["preflight"]
    assert (entry["job"], entry["attempt"], entry["state"], entry["message"]) == (job, 1, "Failed", reason), entry
    assert not status.get("rounds"), status["rounds"]  # no round was started

    # One preflight Job, its Pod run once (the real trainer, exit code 2), failed by the Job
    # controller's podFailurePolicy; no Job of a later stage, now or ever.
    assert mot_e2e.jobs(ns, f"mot.dev/run={name},mot.dev/stage in ({','.join(LATER_STAGES)})") == []
    [preflight_job] = mot_e2e.jobs(ns, f"mot.dev/run={name}")
    assert preflight_job["metadata"]["name"] == job
    assert preflight_job["metadata"]["labels"]["mot.dev/stage"] == "preflight"
    assert [meta["name"] for meta in preflights.created if meta["labels"].get("mot.dev/run") == name] == [job]
    [run] = mot_e2e.kubelet.runs_of(job, ns)
    assert run.exit_code == 2 and not run.injected, run
    assert any(c.get("reason") == "PodFailurePolicy" for c in preflight_job["status"].get("conditions") or [])

    events = mot_e2e.events(ns, name)
    reasons = [e["reason"] for e in events]
    assert {"PreflightStarted", "PreflightFailed", "Failed"} <= set(reasons), reasons
    assert not {"BranchStarted", "MergeStarted", "EvalStarted", "PreflightRetried"} & set(reasons), reasons
    [refused] = [e for e in events if e["reason"] == "PreflightFailed"]
    assert refused["type"] == "Warning" and "invalid input (exit code 2), not retried" in refused["message"]
    assert reason in refused["message"], refused

    if name == "no-credentials":  # the operator added no S3 keys of its own
        env = {e["name"] for e in preflight_job["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert "AWS_ENDPOINT_URL" in env and not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & env, env


def test_no_later_stage_job_was_created_in_the_namespace_of_the_failed_runs(mot_e2e, preflights):
    """All the failure cases together: the watch saw only their preflight Jobs, each once."""
    created = sorted(meta["name"] for meta in preflights.created)
    assert created == sorted(f"{name}-preflight-a1" for name in preflights.cases), created
    assert {meta["labels"]["mot.dev/stage"] for meta in preflights.created} == {"preflight"}
    assert mot_e2e.jobs(preflights.ns, f"mot.dev/stage in ({','.join(LATER_STAGES)})") == []


def test_a_good_run_passes_its_preflight_with_token_statistics_and_goes_on(mot_e2e, tiny_model, preflights):
    ns = preflights.good_ns

    def passed():
        status = mot_e2e.get(ns, "fine").get("status") or {}
        branches = mot_e2e.jobs(ns, "mot.dev/stage=sft")
        return status if (status.get("preflight") or {}).get("state") == "Succeeded" and len(branches) == 2 else None

    try:
        status = wait_until(passed, 150, "the preflight to pass and the branches to start",
                            on_timeout=lambda: json.dumps(mot_e2e.get(ns, "fine").get("status"), indent=1)[:3000])
        # The figures a local preflight gives on the same data and tokenizer, per teacher.
        local = preflight(str(tiny_model), [(t, str(path)) for t, path in preflights.good_data.items()],
                          max_seq_length=128, eval_data=str(preflights.good_data["alpha"])).summary()
        entry = status["preflight"]
        print(f"\nstatus.preflight: {json.dumps(entry)}")
        assert (entry["job"], entry["attempt"]) == ("fine-preflight-a1", 1)
        assert sorted(entry["teachers"]) == ["alpha", "beta"]
        for teacher, found in entry["teachers"].items():
            assert set(found) == {"records", "p50", "p95", "max", "truncated"}, found
            assert found == local["teachers"][teacher], (teacher, found, local["teachers"][teacher])
        assert (entry["teachers"]["alpha"]["records"], entry["teachers"]["beta"]["records"]) == (12, 10)
        assert entry["evalRecords"] == 12 and entry["storage"] == "writable" and entry["seconds"] >= 0
        assert entry["checkpoint"] == f"{mot_e2e.storage_uri}/{ns}/fine/preflight.json"
        report = json.loads(mot_e2e.s3.client().get_object(
            Bucket=BUCKET, Key=f"runs/{ns}/fine/preflight.json")["Body"].read())
        assert report["teachers"] == entry["teachers"] and report["eval"] == {"records": 12}

        passed_events = wait_until(lambda: [e for e in mot_e2e.events(ns, "fine") if e["reason"] == "PreflightPassed"],
                                   30, "the PreflightPassed Event")
        assert len(passed_events) == 1 and passed_events[0]["type"] == "Normal", passed_events
        assert passed_events[0]["message"] == preflight_summary(entry), passed_events
        assert "alpha 12 records, p95 " in passed_events[0]["message"]
        assert passed_events[0]["message"].endswith("; eval set 12 problems")

        # Then round 1 started from the student: a branch Job per teacher (held Running here).
        branches = mot_e2e.jobs(ns, "mot.dev/stage=sft")
        assert sorted(j["metadata"]["labels"]["mot.dev/teacher"] for j in branches) == ["alpha", "beta"]
        assert status["phase"] in ("Pending", "Running") and status["rounds"][0]["init"] == mot_e2e.student_uri
    finally:
        mot_e2e.kubectl("-n", ns, "delete", "motrun", "fine", "--wait=false")

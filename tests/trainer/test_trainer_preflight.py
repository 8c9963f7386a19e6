"""`mot-train preflight`: every input of a run checked before training, each problem an exit 2 whose
message names the file, line, field or teacher; token statistics that match a recount."""

import json
import math
import shutil

import pytest
from support.s3 import remove_credentials

from mot_trainer import cli, storage
from mot_trainer.preflight import preflight
from mot_trainer.tiny import arithmetic_records


@pytest.fixture
def termination_log(tmp_path, monkeypatch):
    path = tmp_path / "termination-log"
    monkeypatch.setenv("MOT_TERMINATION_LOG", str(path))
    return path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run_preflight(student, teachers: dict, *extra) -> int:
    argv = ["preflight", "--student", str(student), "--teachers", *(f"{k}={v}" for k, v in teachers.items()),
            *map(str, extra)]
    if "--max-seq-length" not in argv:
        argv += ["--max-seq-length", "128"]
    return cli.main(argv)


def failure(termination_log) -> str:
    message = termination_log.read_text()
    assert message.startswith("invalid input: "), message
    return message


def recount(tokenizer, rows) -> list[int]:
    """Token lengths straight from the chat template and the tokenizer, not through data.py."""
    lengths = []
    for r in rows:
        messages = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return sorted(lengths)


def nearest_rank(values, q):
    return values[max(1, math.ceil(q * len(values) / 100)) - 1]


def test_happy_path_reports_records_and_token_stats(tiny_model, tiny_data, tiny_records, tmp_path,
                                                    termination_log, capsys):
    from transformers import AutoTokenizer

    long_rows = arithmetic_records(30, seed=5, style="steps")
    for i, row in enumerate(long_rows[:6]):  # 6 of 30 (20%) longer than 128 tokens
        row["response"] = "Let me check. " * (20 + i) + row["response"]
    other = write_jsonl(tmp_path / "long.jsonl", long_rows)
    store = tmp_path / "store"
    code = run_preflight(tiny_model, {"steps": tiny_data, "long": other}, "--eval", tiny_data,
                         "--storage", store, "--max-truncated-fraction", "0.25")
    assert code == 0, termination_log.read_text()
    summary = json.loads(termination_log.read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for name, rows in (("steps", tiny_records), ("long", long_rows)):
        lengths = recount(tokenizer, rows)
        expected = {"records": len(rows), "p50": nearest_rank(lengths, 50), "p95": nearest_rank(lengths, 95),
                    "max": lengths[-1], "truncated": round(sum(n > 128 for n in lengths) / len(rows), 4)}
        assert summary["teachers"][name] == expected
    assert summary["teachers"]["long"]["truncated"] == 0.2 and summary["teachers"]["steps"]["truncated"] == 0
    assert summary["eval"] == {"records": len(tiny_records)}
    assert summary["storage"] == "writable" and summary["max_seq_length"] == 128
    assert store.is_dir() and not list(store.iterdir())  # the probe file was removed
    out = capsys.readouterr().out
    steps = summary["teachers"]["steps"]
    assert f"steps         48  {steps['p50']:>3}  {steps['p95']:>3}  {steps['max']:>3}       0.0%" in out
    assert "20.0%" in out and "eval set: 48 problems with answers" in out


def test_summary_stays_short_for_32_teachers(tiny_model, tiny_data, termination_log):
    teachers = {f"teacher-{i:02d}": tiny_data for i in range(32)}
    assert run_preflight(tiny_model, teachers, "--threads", "2") == 0
    message = termination_log.read_text()
    assert len(message.encode()) < 4000 and len(json.loads(message)["teachers"]) == 32


def test_student_folder_missing(tmp_path, tiny_data, termination_log):
    missing = tmp_path / "no-such-student"
    assert run_preflight(missing, {"a": tiny_data}) == 2
    assert f"--student {missing}: no such model folder" in failure(termination_log)


def test_tokenizer_without_chat_template(tiny_model, tiny_data, tmp_path, termination_log):
    student = shutil.copytree(tiny_model, tmp_path / "base-student")
    (student / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((student / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (student / "tokenizer_config.json").write_text(json.dumps(config))
    assert run_preflight(student, {"a": tiny_data}) == 2
    assert f"--student {student}: the tokenizer has no chat template" in failure(termination_log)


def test_safetensors_index_naming_a_missing_shard(tiny_model, tiny_data, tmp_path, termination_log):
    student = shutil.copytree(tiny_model, tmp_path / "sharded")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors",
                                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    (student / "model.safetensors").rename(student / "model-00001-of-00002.safetensors")
    (student / "model.safetensors.index.json").write_text(json.dumps(index))
    assert run_preflight(student, {"a": tiny_data}) == 2
    assert (f"{student}/model.safetensors.index.json: names model-00002-of-00002.safetensors, which is missing"
            in failure(termination_log))


def test_teacher_dataset_missing(tiny_model, tiny_data, tmp_path, termination_log):
    missing = tmp_path / "typo.jsonl"
    assert run_preflight(tiny_model, {"a": tiny_data, "b": missing}) == 2
    assert f"teacher b: {missing}: no such file" in failure(termination_log)


def test_malformed_line_is_named(tiny_model, tiny_records, tmp_path, termination_log):
    bad = write_jsonl(tmp_path / "bad.jsonl", [tiny_records[0], tiny_records[1], '{"prompt": "1+1", "respo'])
    assert run_preflight(tiny_model, {"qwq": bad}) == 2
    assert f"teacher qwq: {bad} line 3: not valid JSON" in failure(termination_log)


def test_missing_field_is_named(tiny_model, tiny_records, tmp_path, termination_log):
    bad = write_jsonl(tmp_path / "fields.jsonl", [tiny_records[0], {"prompt": "1+1?", "answer": "2"}])
    assert run_preflight(tiny_model, {"qwq": bad}) == 2
    assert f"teacher qwq: {bad} line 2: missing field 'response'" in failure(termination_log)


def test_empty_response_is_named(tiny_model, tiny_records, tmp_path, termination_log):
    rows = [tiny_records[0], tiny_records[1], tiny_records[2], {"prompt": "What is 1 + 1?", "response": "  "}]
    bad = write_jsonl(tmp_path / "empty.jsonl", rows)
    assert run_preflight(tiny_model, {"r1": bad}) == 2
    assert f"teacher r1: {bad} line 4: empty response" in failure(termination_log)


def test_every_example_truncated(tiny_model, tiny_data, termination_log, capsys):
    assert run_preflight(tiny_model, {"qwq": tiny_data}, "--max-seq-length", "16") == 2
    message = failure(termination_log)
    assert "teacher qwq: 100% of 48 examples are longer than maxSeqLength 16 (p95 " in message
    assert "raise spec.training.maxSeqLength or spec.preflight.maxTruncatedFraction" in message
    assert "100.0%" in capsys.readouterr().out  # the table is printed before the refusal


def test_eval_set_without_answers(tiny_model, tiny_data, tmp_path, termination_log):
    problems = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "What is 2 + 2?", "answer": "4"},
                                                     {"prompt": "What is 3 + 3?"}])
    assert run_preflight(tiny_model, {"a": tiny_data}, "--eval", problems) == 2
    assert f"eval set: {problems} line 2: missing field 'answer'" in failure(termination_log)


def test_unwritable_local_storage(tiny_model, tiny_data, tmp_path, termination_log):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert run_preflight(tiny_model, {"a": tiny_data}, "--storage", blocker / "ckpts") == 2
    assert f"storage {blocker}/ckpts: not writable" in failure(termination_log)


def test_bad_teacher_argument(tiny_model, tiny_data, termination_log):
    assert cli.main(["preflight", "--student", str(tiny_model), "--teachers", str(tiny_data),
                     "--max-seq-length", "64"]) == 2
    assert f"--teachers '{tiny_data}': expected NAME=URI" in failure(termination_log)


# --- GPU memory (--gpu-memory: what the executor knows of a branch's GPUs) -------------------------

BRANCH = ("--gpus", "1", "--nodes", "1", "--micro-batch-size", "4", "--precision", "bf16")


def test_a_branch_that_cannot_fit_the_gpu_memory_is_refused_naming_the_fields(tiny_model, tiny_data,
                                                                               termination_log, capsys):
    from mot_operator.estimate import DOES_NOT_FIT, FIELDS_TO_CHANGE

    assert run_preflight(tiny_model, {"a": tiny_data}, "--gpu-memory", 1024 ** 2, *BRANCH) == 2
    message = failure(termination_log)
    assert message.startswith("invalid input: spec.resources.branch: one SFT branch needs "), message
    assert f"{DOES_NOT_FIT} of 1 MiB per GPU where it can run; change " + ", ".join(FIELDS_TO_CHANGE) in message
    assert "1 GPU(s) x 1 node(s), strategy none, precision bf16, 512 tokens per forward" in message
    assert "`mot estimate FILE.yaml` shows the terms" in message
    assert "teacher" not in capsys.readouterr().out  # refused before any data was read


def test_a_branch_that_fits_passes_and_the_summary_says_so(tiny_model, tiny_data, tmp_path, termination_log,
                                                           capsys):
    out = tmp_path / "summary.json"
    assert run_preflight(tiny_model, {"a": tiny_data}, "--gpu-memory", 80 * 1024 ** 3, *BRANCH,
                         "--gradient-checkpointing", "--out", out) == 0
    memory = json.loads(out.read_text())["memory"]
    assert memory["gpu_memory"] == 80 * 1024 ** 3 and 2 * 1024 ** 3 < memory["needed"] < 3 * 1024 ** 3
    assert "GPU memory: 2.01 GiB needed per GPU (`mot estimate`) <= 80.00 GiB" in capsys.readouterr().out


def test_without_gpu_memory_nothing_is_estimated(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "summary.json"
    assert run_preflight(tiny_model, {"a": tiny_data}, *BRANCH, "--out", out) == 0
    assert "memory" not in json.loads(out.read_text())


def test_packing_is_estimated_as_sft_will_run_it(tiny_model, tiny_data, tmp_path):
    """--packing (the operator passes spec.training.packing) adds the packed rows' S x S masks."""
    from mot_operator.estimate import estimate

    config = json.loads((tiny_model / "config.json").read_text())
    needed = {}
    for packing in (False, True):
        out = tmp_path / f"summary-{packing}.json"
        assert run_preflight(tiny_model, {"a": tiny_data}, "--gpu-memory", 80 * 1024 ** 3, *BRANCH,
                             *(["--packing"] if packing else []), "--out", out) == 0
        needed[packing] = json.loads(out.read_text())["memory"]["needed"]
    est = estimate(config, gpus=1, micro_batch_size=4, max_seq_length=128, precision="bf16", packing=True)
    assert needed[True] == est.total + est.margin > needed[False]


def test_a_config_the_estimate_cannot_read_is_not_refused(tiny_model, tiny_data, tmp_path, caplog):
    from mot_trainer.preflight import MemoryCheck, check_memory

    config = json.loads((tiny_model / "config.json").read_text())
    del config["vocab_size"]
    assert check_memory(config, MemoryCheck(gpu_memory=1), 128) is None
    assert "GPU memory not checked: no estimate for this student (config.json: vocab_size" in caplog.text


# --- s3 -------------------------------------------------------------------------------------------


@pytest.fixture
def s3_run(s3_server, monkeypatch, tiny_model, tiny_data):
    """The tiny student and one teacher's data on S3: (bucket URI, student URI, data URI)."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.make_bucket("preflight")
    student = storage.join(bucket, "models/tiny")
    for path in sorted(tiny_model.iterdir()):
        storage.write_bytes(storage.join(student, path.name), path.read_bytes())
    data = storage.join(bucket, "data/steps.jsonl")
    storage.write_bytes(data, tiny_data.read_bytes())
    return bucket, student, data


def test_s3_inputs_pass_without_downloading_weights(s3_run, tiny_model, tiny_data, termination_log, monkeypatch):
    bucket, student, data = s3_run
    fetched = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri, _real=real: fetched.append(str(uri)) or _real(uri))
    assert run_preflight(student, {"steps": data}, "--eval", data, "--storage", storage.join(bucket, "ckpts")) == 0
    summary = json.loads(termination_log.read_text())
    local = preflight(str(tiny_model), [("steps", str(tiny_data))], max_seq_length=128)
    assert summary["teachers"] == local.summary()["teachers"] and summary["storage"] == "writable"
    assert not any(uri.endswith(".safetensors") for uri in fetched) and f"{student}/config.json" in fetched
    assert storage.list_keys(storage.join(bucket, "ckpts")) == []  # probe deleted


def test_s3_without_credentials(s3_run, tmp_path, monkeypatch, termination_log):
    _, student, data = s3_run
    remove_credentials(monkeypatch, tmp_path)
    assert run_preflight(student, {"steps": data}) == 2
    message = failure(termination_log)
    assert f"{student}: no S3 credentials" in message
    assert "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (in a cluster: spec.storage.credentialsSecret)" in message


def test_s3_missing_bucket(s3_run, tiny_model, termination_log):
    data = "s3://preflight-no-such-bucket/data/steps.jsonl"
    assert run_preflight(tiny_model, {"steps": data}) == 2
    message = failure(termination_log)
    assert (f"teacher steps: {data}: bucket preflight-no-such-bucket does not exist at http://" in message
            and "(check the bucket in this URI, and the endpoint: AWS_ENDPOINT_URL, in a cluster spec.storage.endpoint)" in message)


def test_s3_missing_object(s3_run, tiny_model, termination_log):
    bucket, _, _ = s3_run
    data = storage.join(bucket, "data/typo.jsonl")
    assert run_preflight(tiny_model, {"steps": data}) == 2
    assert f"teacher steps: {data}: no such object" in failure(termination_log)


# --- --out, table(), hub ids -----------------------------------------------------------------------


def test_out_writes_the_summary_only_when_every_check_passed(tiny_model, tiny_data, tmp_path, termination_log,
                                                               capsys):
    from mot_trainer.preflight import table

    out = tmp_path / "run" / "preflight.json"
    assert run_preflight(tiny_model, {"steps": tiny_data}, "--eval", tiny_data, "--out", out) == 0
    summary = json.loads(out.read_text())
    assert summary == json.loads(termination_log.read_text())
    assert set(summary) == {"teachers", "max_seq_length", "storage", "seconds", "eval"}
    assert summary["teachers"]["steps"]["records"] == 48 and summary["eval"] == {"records": 48}
    # table() of the written summary is what the command printed (what `mot run` shows from the file).
    assert capsys.readouterr().out.rstrip("\n") == table(summary)

    refused = tmp_path / "refused" / "preflight.json"
    assert run_preflight(tiny_model, {"steps": tiny_data}, "--max-seq-length", "16", "--out", refused) == 2
    assert not refused.exists() and not refused.parent.exists()


def test_table_from_a_summary():
    from mot_trainer.preflight import table

    summary = {"teachers": {"qwq": {"records": 1200, "p50": 812, "p95": 3900, "max": 16384, "truncated": 0.0125},
                            "r1": {"records": 7, "p50": 5, "p95": 9, "max": 9, "truncated": 0.0}},
               "max_seq_length": 4096, "storage": "writable", "seconds": 3.2, "eval": {"records": 50}}
    assert table(summary).splitlines() == [
        "teacher  records  p50   p95    max  truncated",
        "-------  -------  ---  ----  -----  ---------",
        "qwq         1200  812  3900  16384       1.2%",
        "r1             7    5     9      9       0.0%",
        "token lengths with the student's chat template; truncated = longer than maxSeqLength 4096",
        "eval set: 50 problems with answers",
        "storage: writable",
    ]
    del summary["eval"], summary["storage"]  # an older summary: no eval set, storage not recorded
    assert table(summary).splitlines()[-1] == "storage: unchecked" and "eval set" not in table(summary)


def test_hub_student_unreachable_is_retryable(tiny_data, tmp_path):
    """A hub id while the hub cannot be reached (HF_HUB_OFFLINE=1, empty cache): transformers raises
    OSError("We couldn't connect to 'https://huggingface.co' ...") from a LocalEntryNotFoundError, not
    a RepositoryNotFoundError: exit 1 (retryable), not 2, since the id may well exist."""
    import os
    import subprocess
    import sys

    termination = tmp_path / "termination-log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), MOT_TERMINATION_LOG=str(termination))
    env.pop("TRANSFORMERS_OFFLINE", None)  # the hub's own switch alone
    proc = subprocess.run([sys.executable, "-m", "mot_trainer.cli", "preflight", "--student", "mot-tests/no-such-student",
                           "--teachers", f"a={tiny_data}", "--max-seq-length", "128"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    message = termination.read_text()
    assert message.startswith("OSError: We couldn't connect to 'https://huggingface.co'"), message
    assert "invalid input" not in message


def test_hub_student_that_does_not_exist_is_invalid_input(tiny_data, termination_log, monkeypatch):
    """What transformers raises for an unknown repository (an OSError from RepositoryNotFoundError),
    replayed without a network: exit 2, naming the id."""
    import httpx2
    from huggingface_hub.errors import RepositoryNotFoundError
    from transformers import AutoConfig

    def not_found(uri, *args, **kwargs):
        response = httpx2.Response(404, request=httpx2.Request("GET", f"https://huggingface.co/{uri}/config.json"))
        try:
            raise RepositoryNotFoundError("404 Client Error: Repository Not Found", response=response)
        except RepositoryNotFoundError as exc:
            raise OSError(f"{uri} is not a local folder and is not a valid model identifier listed on "
                          "'https://huggingface.co/models'") from exc

    monkeypatch.setattr(AutoConfig, "from_pretrained", not_found)
    assert run_preflight("mot-tests/no-such-student", {"a": tiny_data}) == 2
    assert ("--student mot-tests/no-such-student: no such model folder, and no such model on the hub"
            in failure(termination_log))


def test_out_to_s3(s3_run, tiny_model, termination_log):
    from mot_trainer.preflight import table

    bucket, student, data = s3_run
    out = storage.join(bucket, "runs/local/x/preflight.json")
    assert run_preflight(student, {"steps": data}, "--storage", storage.join(bucket, "runs/local/x"), "--out", out) == 0
    summary = storage.read_json(out)
    assert summary == json.loads(termination_log.read_text()) and summary["storage"] == "writable"
    assert storage.list_keys(storage.join(bucket, "runs/local/x")) == ["preflight.json"]  # the probe is gone
    assert "steps" in table(summary)

"""mot_trainer.storage against a real SeaweedFS server: round trips, manifest last, incomplete
folders refused, transient errors retried; missing or wrong credentials, a missing bucket and a missing
input object are invalid input (exit 2) that says what to set."""

import json
import re

import pytest
from support.s3 import FlakyProxy, remove_credentials

from mot_trainer import cli, storage
from mot_trainer.errors import InvalidInput
from mot_trainer.manifest import MANIFEST_NAME, write_manifest
from mot_trainer.storage import read_checkpoint_manifest


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def bucket(s3_env, request):
    return s3_env.make_bucket("storage-" + request.node.name.replace("_", "-").lower()[:40])


def make_checkpoint(folder, big=3 << 20):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "test"}')
    (folder / "model.safetensors").write_bytes(bytes(range(251)) * (big // 251))
    (folder / "tokenizer").mkdir(exist_ok=True)
    (folder / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    return write_manifest(folder, kind="sft", inputs={}, params={}, metrics={"final_loss": 1.0})


def test_uri_helpers():
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/x")
    assert storage.join("s3://b/run/", "round-1", "/merged/") == "s3://b/run/round-1/merged"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"
    assert storage.split_s3("s3://b/a/c") == ("b", "a/c")


def test_checkpoint_round_trip(tmp_path, bucket):
    manifest = make_checkpoint(tmp_path / "src")
    uri = storage.join(bucket, "ns/run/round-1/branch-a")
    assert not storage.exists(uri)
    assert read_checkpoint_manifest(uri) is None
    storage.upload_checkpoint(tmp_path / "src", uri)
    assert storage.exists(uri) and storage.exists(storage.join(uri, "config.json"))
    assert read_checkpoint_manifest(uri) == manifest
    local = storage.download_dir(uri, tmp_path / "dst")
    for rel in ("config.json", "model.safetensors", "tokenizer/vocab.txt", MANIFEST_NAME):
        assert (local / rel).read_bytes() == (tmp_path / "src" / rel).read_bytes(), rel
    assert not list(local.rglob("*.partial"))


def test_single_objects(bucket, tmp_path):
    uri = storage.join(bucket, "x/eval.json")
    storage.write_json(uri, {"accuracy": 0.5})
    assert storage.read_json(uri) == {"accuracy": 0.5}
    assert storage.read_bytes(uri).endswith(b"\n")
    with pytest.raises(FileNotFoundError, match="no such object"):
        storage.read_bytes(storage.join(bucket, "x/missing.json"))
    local = tmp_path / "deep" / "eval.json"
    storage.write_json(str(local), {"a": 1})
    assert storage.read_json(str(local)) == {"a": 1} and storage.exists(str(local))


def test_folder_without_manifest_is_refused(tmp_path, bucket):
    make_checkpoint(tmp_path / "src")
    uri = storage.join(bucket, "half-written")
    # What a crashed writer leaves behind: files, no manifest.
    storage.write_bytes(storage.join(uri, "config.json"), b"{}")
    with pytest.raises(InvalidInput, match="incomplete"):
        storage.download_dir(uri, tmp_path / "dst")
    # The same without verification (a user's base model): everything is fetched.
    assert (storage.download_dir(uri, tmp_path / "raw", verify=False) / "config.json").read_bytes() == b"{}"


def test_tampered_object_is_refused(tmp_path, bucket):
    make_checkpoint(tmp_path / "src")
    uri = storage.join(bucket, "tampered")
    storage.upload_checkpoint(tmp_path / "src", uri)
    storage.write_bytes(storage.join(uri, "tokenizer/vocab.txt"), b"a\nc\n")
    with pytest.raises(InvalidInput, match=r"vocab.txt: sha256 .* does not match"):
        storage.download_dir(uri, tmp_path / "dst")


def test_local_checkpoint_copy_and_verify(tmp_path):
    make_checkpoint(tmp_path / "src")
    storage.upload_checkpoint(tmp_path / "src", str(tmp_path / "copy"))
    assert storage.download_dir(str(tmp_path / "copy"), tmp_path / "unused") == tmp_path / "copy"
    (tmp_path / "copy" / "config.json").write_text('{"model_type": "tesT"}')
    with pytest.raises(InvalidInput, match="config.json: sha256"):
        storage.download_dir(str(tmp_path / "copy"), tmp_path / "unused")
    with pytest.raises(InvalidInput, match="incomplete"):
        storage.upload_checkpoint(tmp_path / "unused-empty", str(tmp_path / "x"))


@pytest.fixture
def flaky(s3_env, monkeypatch):
    proxy = FlakyProxy(s3_env.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    yield proxy
    proxy.close()


def test_transient_errors_are_retried(tmp_path, bucket, flaky, monkeypatch):
    manifest = make_checkpoint(tmp_path / "src", big=1 << 20)
    uri = storage.join(bucket, "flaky")
    flaky.failures = ["503", "drop"]
    storage.upload_checkpoint(tmp_path / "src", uri)
    assert flaky.failures == []  # all injected failures were hit, and retried past
    flaky.failures = ["drop"]
    local = storage.download_dir(uri, tmp_path / "dst")
    assert json.loads((local / MANIFEST_NAME).read_text()) == manifest
    # Without retries the same failure surfaces: the proxy really injects it.
    monkeypatch.setenv("MOT_S3_MAX_ATTEMPTS", "1")
    flaky.failures = ["503"]
    with pytest.raises(Exception, match="SlowDown") as caught:
        storage.read_bytes(storage.join(uri, "config.json"))
    assert not isinstance(caught.value, InvalidInput)  # transient: stays retryable (exit 1)


def test_manifest_is_removed_first_and_uploaded_last(tmp_path, bucket, flaky):
    make_checkpoint(tmp_path / "src")
    uri = storage.join(bucket, "ordered")
    storage.upload_checkpoint(tmp_path / "src", uri)
    storage.upload_checkpoint(tmp_path / "src", uri)  # a retry overwrites the same folder
    writes = [(m, p.split("?")[0]) for m, p in flaky.forwarded if m in ("PUT", "POST", "DELETE")]
    manifest_path = f"/{storage.split_s3(uri)[0]}/ordered/{MANIFEST_NAME}"
    for attempt in (writes[: len(writes) // 2], writes[len(writes) // 2 :]):
        assert attempt[0] == ("DELETE", manifest_path)
        assert attempt[-1] == ("PUT", manifest_path)
        assert {p for _, p in attempt[1:-1]} >= {manifest_path.replace(MANIFEST_NAME, "config.json")}
        assert manifest_path not in {p for _, p in attempt[1:-1]}


def test_credentials_come_from_the_environment(bucket, monkeypatch, tmp_path):
    uri = storage.join(bucket, "secret.json")
    storage.write_json(uri, {"a": 1})
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    hint = r"set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \(in a cluster: spec.storage.credentialsSecret\)"
    refused = rf"{uri}: the S3 credentials were refused \((SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId|403)"
    with pytest.raises(storage.StorageAccessError, match=refused + ".*" + hint):
        storage.read_json(uri)
    with pytest.raises(storage.StorageAccessError, match=hint):
        storage.write_json(storage.join(bucket, "other.json"), {})
    with pytest.raises(storage.StorageAccessError, match=hint):
        storage.exists(uri)  # a HEAD: the refusal has no body, only the status 403
    make_checkpoint(tmp_path / "src", big=1000)
    with pytest.raises(storage.StorageAccessError, match=hint):
        storage.upload_checkpoint(tmp_path / "src", storage.join(bucket, "ckpt"))


def test_no_credentials_is_invalid_input_saying_what_to_set(bucket, monkeypatch, tmp_path):
    uri = storage.join(bucket, "data.jsonl")
    storage.write_bytes(uri, b"{}\n")
    remove_credentials(monkeypatch, tmp_path)
    with pytest.raises(storage.StorageAccessError, match=rf"{uri}: no S3 credentials .*set AWS_ACCESS_KEY_ID and "
                       r"AWS_SECRET_ACCESS_KEY \(in a cluster: spec.storage.credentialsSecret\)"):
        storage.read_bytes(uri)
    with pytest.raises(storage.StorageAccessError, match="no S3 credentials"):
        storage.list_keys(bucket)


def test_missing_bucket_is_invalid_input_naming_it(s3_env, tmp_path):
    uri = "s3://no-such-bucket-mot/run/data.jsonl"
    message = (r"s3://no-such-bucket-mot/run/data.jsonl: bucket no-such-bucket-mot does not exist at http://\S+ "
               + re.escape("(check the bucket in this URI, and the endpoint: AWS_ENDPOINT_URL, in a cluster "
                           "spec.storage.endpoint)"))
    with pytest.raises(storage.StorageAccessError, match=message):
        storage.read_bytes(uri)
    with pytest.raises(storage.StorageAccessError, match="bucket no-such-bucket-mot does not exist"):
        storage.list_keys("s3://no-such-bucket-mot/model")
    with pytest.raises(storage.StorageAccessError, match="bucket no-such-bucket-mot does not exist"):
        storage.download_dir("s3://no-such-bucket-mot/model", tmp_path / "dst", verify=False)
    assert not storage.exists(uri)  # a question, not a read: nothing exists in a missing bucket
    # (SeaweedFS creates a bucket on the first PUT into it, so writes are covered by the next test.)


def test_wrapped_write_errors_are_classified():
    """What AWS answers a PUT into a missing bucket, wrapped as boto3's transfer manager wraps it."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError

    def wrapped(code):
        try:
            try:
                raise ClientError({"Error": {"Code": code, "Message": "m"}}, "PutObject")
            except ClientError as exc:
                raise S3UploadFailedError(f"Failed to upload: {exc}") from exc
        except S3UploadFailedError as exc:
            return exc

    missing = storage.access_error(wrapped("NoSuchBucket"), "s3://gone/ckpt/config.json")
    assert isinstance(missing, InvalidInput) and "bucket gone does not exist" in str(missing)
    assert "credentialsSecret" in str(storage.access_error(wrapped("InvalidAccessKeyId"), "s3://b/k"))
    for transient in ("SlowDown", "InternalError", "503", "RequestTimeout"):
        assert storage.access_error(wrapped(transient), "s3://b/k") is None, transient


@pytest.fixture
def termination_log(tmp_path, monkeypatch):
    path = tmp_path / "termination-log"
    monkeypatch.setenv("MOT_TERMINATION_LOG", str(path))
    return path


@pytest.mark.parametrize("problem", ["no-credentials", "wrong-secret", "missing-bucket", "missing-object"])
def test_sft_exits_2_on_storage_problems_of_its_input(problem, s3_env, tiny_model, tmp_path, monkeypatch,
                                                      termination_log):
    bucket = s3_env.make_bucket("storage-sft-input")
    data = storage.join(bucket, "train.jsonl")
    storage.write_bytes(data, b'{"prompt": "1+1?", "response": "2"}\n')
    expected = {
        "no-credentials": rf"{data}: no S3 credentials .*set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                          r"\(in a cluster: spec.storage.credentialsSecret\)",
        "wrong-secret": rf"{data}: the S3 credentials were refused .*set AWS_ACCESS_KEY_ID",
        "missing-bucket": r"s3://no-such-bucket-mot/train.jsonl: bucket no-such-bucket-mot does not exist",
        "missing-object": rf"{bucket}/missing.jsonl: no such object",
    }[problem]
    if problem == "no-credentials":
        remove_credentials(monkeypatch, tmp_path)
    elif problem == "wrong-secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    elif problem == "missing-bucket":
        data = "s3://no-such-bucket-mot/train.jsonl"
    else:
        data = storage.join(bucket, "missing.jsonl")
    code = cli.main(["sft", "--init", str(tiny_model), "--data", data, "--out", str(tmp_path / "out"),
                     "--steps", "1", "--threads", "1"])
    assert code == cli.EXIT_INVALID
    message = termination_log.read_text()
    assert message.startswith("invalid input: ")
    assert __import__("re").search(expected, message), message


def test_list_and_delete_under_a_prefix(tmp_path, bucket):
    make_checkpoint(tmp_path / "src", big=1000)
    uri = storage.join(bucket, "run/round-1/merged")
    storage.upload_checkpoint(tmp_path / "src", uri)
    keys = storage.list_keys(storage.join(bucket, "run"))
    assert keys == sorted(f"round-1/merged/{k}" for k in
                          ("config.json", "model.safetensors", "tokenizer/vocab.txt", MANIFEST_NAME))
    assert storage.exists(storage.join(bucket, "run/round-1"))  # a prefix counts as existing
    for key in keys:
        storage.delete(storage.join(bucket, "run", key))
    assert storage.list_keys(storage.join(bucket, "run")) == [] and not storage.exists(uri)
    storage.delete(storage.join(bucket, "run/never-there"))  # deleting a missing object is fine

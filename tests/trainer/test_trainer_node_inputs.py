"""The processes of one node share one download of their inputs: a two-process SFT (torchrun, DDP
over gloo on CPU) from an S3 student fetches each model file and the data once, counted at a proxy
in front of the real SeaweedFS server; a complete download in a folder is reused, a damaged one is
fetched again."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from support.s3 import FlakyProxy

from mot_trainer import storage
from mot_trainer.manifest import MANIFEST_NAME, write_manifest
from mot_trainer.storage import read_checkpoint_manifest


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server


def object_gets(proxy: FlakyProxy, prefix: str) -> Counter:
    """GETs of whole objects under `prefix` (path-style: /bucket/key), by key."""
    counts = Counter()
    for method, path in proxy.forwarded:
        key = path.split("?", 1)[0]
        if method == "GET" and key.startswith(prefix) and "list-type" not in path:
            counts[key[len(prefix):]] += 1
    return counts


def test_two_processes_of_a_node_download_the_student_and_data_once(s3_env, tiny_model, tiny_data, tmp_path):
    bucket = s3_env.make_bucket("node-inputs")
    student = f"{bucket}/models/student"
    for f in tiny_model.iterdir():
        storage.write_bytes(f"{student}/{f.name}", f.read_bytes())
    data_uri = f"{bucket}/data/a.jsonl"
    storage.write_bytes(data_uri, tiny_data.read_bytes())
    proxy = FlakyProxy(s3_env.endpoint)
    try:
        torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2",
                    "--module", "mot_trainer.cli"]
        out = f"{bucket}/run/branch-a"
        proc = subprocess.run(
            [*torchrun, "sft", "--init", student, "--data", data_uri, "--out", out, "--steps", "2",
             "--micro-batch-size", "2", "--grad-accum", "1", "--threads", "1"],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, **s3_env.env, "AWS_ENDPOINT_URL": proxy.endpoint, "OMP_NUM_THREADS": "1",
                 "TMPDIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""})
    finally:
        proxy.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_checkpoint_manifest(out)["params"]["processes"] == 2

    gets = object_gets(proxy, "/node-inputs/")
    weights = [k for k in gets if k.startswith("models/student/") and k.endswith(".safetensors")]
    assert weights and all(gets[k] == 1 for k in weights), gets
    assert gets["data/a.jsonl"] == 1, gets
    assert gets["models/student/tokenizer.json"] == 1, gets
    # The shared folder is gone once the job is done (only the processes' own temp folders were there).
    assert not list(tmp_path.glob("mot-sft-inputs-*")), list(tmp_path.iterdir())


def test_a_complete_download_is_reused_and_a_damaged_one_fetched_again(s3_env, tmp_path, monkeypatch):
    bucket = s3_env.make_bucket("reuse")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"w" * 4096)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    write_manifest(folder, kind="sft", inputs={}, params={}, metrics={})
    storage.upload_checkpoint(folder, f"{bucket}/ckpt")

    proxy = FlakyProxy(s3_env.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    try:
        local = tmp_path / "node"
        storage.download_dir(f"{bucket}/ckpt", local)
        assert object_gets(proxy, "/reuse/")["ckpt/model.safetensors"] == 1
        storage.download_dir(f"{bucket}/ckpt", local)  # complete: only the manifest is read again
        assert object_gets(proxy, "/reuse/")["ckpt/model.safetensors"] == 1
        assert object_gets(proxy, "/reuse/")[f"ckpt/{MANIFEST_NAME}"] == 2
        (local / "model.safetensors").write_bytes(b"x" * 4096)  # same size, other content
        storage.download_dir(f"{bucket}/ckpt", local)
        assert object_gets(proxy, "/reuse/")["ckpt/model.safetensors"] == 2
        assert (local / "model.safetensors").read_bytes() == b"w" * 4096
    finally:
        proxy.close()

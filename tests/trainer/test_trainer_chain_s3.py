"""One MoT round as the Jobs run it, against a real SeaweedFS S3 server: two SFT branches from a user's
student folder (no manifest) → merge → eval → a round-2 branch from the merged checkpoint. Every
command is the real `mot-train` entry point in its own process, configured only by environment."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mot_trainer import storage
from mot_trainer.storage import read_checkpoint_manifest
from mot_trainer.tiny import arithmetic_records

# Numerically sensitive: `make test` runs these again under the other CPU kernel families.
pytestmark = pytest.mark.numerics

torch.set_num_threads(1)

SFT_FAST = ["--steps", "8", "--learning-rate", "3e-3", "--micro-batch-size", "4", "--grad-accum", "1",
            "--threads", "1"]


def mot_train(args, env, log):
    return subprocess.Popen([sys.executable, "-m", "mot_trainer.cli", *map(str, args)],
                            env={**env, "MOT_TERMINATION_LOG": str(log)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc):
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]


def jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def test_sft_merge_eval_chain_on_s3(s3_server, tiny_model, tmp_path, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    env = {**os.environ, **s3_server.env}
    bucket = s3_server.make_bucket("chain")
    base = f"{bucket}/models/student"
    for f in tiny_model.iterdir():  # a user's model folder: no manifest
        storage.write_bytes(f"{base}/{f.name}", f.read_bytes())
    teachers = {"a": arithmetic_records(24, seed=1, style="steps"), "b": arithmetic_records(24, seed=2, style="short")}
    for name, records in teachers.items():
        storage.write_bytes(f"{bucket}/data/{name}.jsonl", jsonl(records))
    storage.write_bytes(f"{bucket}/data/heldout.jsonl", jsonl(arithmetic_records(6, seed=3, style="short")))
    run = f"{bucket}/ns/run/round-1"

    # Round 1: both branches at once, as two Jobs would run (one torch thread each).
    branches = {
        name: mot_train(["sft", "--init", base, "--data", f"{bucket}/data/{name}.jsonl",
                         "--out", f"{run}/branch-{name}", *SFT_FAST], env, tmp_path / f"sft-{name}.log")
        for name in teachers
    }
    for proc in branches.values():
        finish(proc)
    for name in teachers:
        manifest = read_checkpoint_manifest(f"{run}/branch-{name}")
        assert manifest["kind"] == "sft" and manifest["inputs"]["init"] == base
        assert "init_created" not in manifest["inputs"]  # the student folder had no manifest
        summary = json.loads((tmp_path / f"sft-{name}.log").read_text())
        assert summary["final_loss"] == manifest["metrics"]["final_loss"]

    finish(mot_train(["merge", "--inputs", f"{run}/branch-a", f"{run}/branch-b", "--out", f"{run}/merged"],
                     env, tmp_path / "merge.log"))
    assert read_checkpoint_manifest(f"{run}/merged")["kind"] == "merge"

    # The merged weights are the average of the two branches (read back from S3, verified).
    local = {n: storage.download_dir(f"{run}/{n}", tmp_path / n) for n in ("branch-a", "branch-b", "merged")}
    a, b, merged = (load_file(local[n] / "model.safetensors") for n in ("branch-a", "branch-b", "merged"))
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, (a[key] + b[key]) / 2, atol=1e-6, rtol=0)

    finish(mot_train(["eval", "--model", f"{run}/merged", "--data", f"{bucket}/data/heldout.jsonl",
                      "--out", f"{run}/eval.json", "--max-new-tokens", "24", "--threads", "1"],
                     env, tmp_path / "eval.log"))
    result = storage.read_json(f"{run}/eval.json")
    assert result["problems"] == 6 and 0.0 <= result["accuracy"] <= 1.0 and result["heldout_loss"] > 0
    summary = json.loads((tmp_path / "eval.log").read_text())
    assert summary == {"accuracy": result["accuracy"], "heldout_loss": result["heldout_loss"],
                       "truncated": result["truncated"], "engine": "transformers"} and result["engine"] == "transformers"

    # Round 2 starts from the merged checkpoint: its manifest is verified and recorded.
    finish(mot_train(["sft", "--init", f"{run}/merged", "--data", f"{bucket}/data/a.jsonl",
                      "--out", f"{bucket}/ns/run/round-2/branch-a", *SFT_FAST[:1], "2", *SFT_FAST[2:]],
                     env, tmp_path / "sft-r2.log"))
    round2 = read_checkpoint_manifest(f"{bucket}/ns/run/round-2/branch-a")
    assert round2["inputs"]["init_created"] == read_checkpoint_manifest(f"{run}/merged")["created"]

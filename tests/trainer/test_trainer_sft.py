"""`mot-train sft` on the tiny model: loss falls, checkpoint + manifest written last, a second SFT
starts from the first one's output, reruns are no-ops, bad input exits 2 naming the problem, and the
metrics port serves the mot_trainer_* series while training runs."""

import json
import os
import subprocess
import sys

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mot_trainer import cli, progress
from mot_trainer.manifest import MANIFEST_NAME, verify_folder

# Numerically sensitive: `make test` runs these again under the other CPU kernel families.
pytestmark = pytest.mark.numerics

torch.set_num_threads(1)

FAST = ["--threads", "1", "--learning-rate", "3e-3", "--micro-batch-size", "4", "--grad-accum", "2",
        "--warmup-ratio", "0.1"]


@pytest.fixture
def termination_log(tmp_path, monkeypatch):
    path = tmp_path / "termination-log"
    monkeypatch.setenv("MOT_TERMINATION_LOG", str(path))
    return path


def sft(*args):
    """The real CLI, in-process; returns its exit code."""
    return cli.main(["sft", *map(str, args)])


@pytest.fixture(scope="session")
def first_sft(tiny_model, tiny_data, tmp_path_factory):
    """One 30-step SFT of the tiny model, shared by the tests that inspect its output."""
    out = tmp_path_factory.mktemp("sft") / "branch-a"
    code = sft("--init", tiny_model, "--data", tiny_data, "--out", out, "--steps", 30, *FAST)
    assert code == 0
    return out


def test_loss_falls_and_checkpoint_is_complete(first_sft, tiny_model, tiny_data):
    manifest = verify_folder(first_sft)  # every file listed, sizes and hashes right
    listed = {f["path"] for f in manifest["files"]}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= listed
    assert manifest["kind"] == "sft"
    assert manifest["inputs"]["init"] == str(tiny_model) and manifest["inputs"]["data"] == str(tiny_data)
    assert manifest["params"]["steps"] == 30 and manifest["params"]["learning_rate"] == 3e-3

    metrics = manifest["metrics"]
    losses = [loss for _, loss in metrics["loss_history"]]
    assert [s for s, _ in metrics["loss_history"]] == list(range(1, 31))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    assert metrics["final_loss"] == pytest.approx(losses[-1], abs=1e-5)
    assert metrics["tokens_seen"] > 0 and metrics["tokens_per_second"] > 0 and metrics["wall_seconds"] > 0
    assert metrics["examples_truncated"] == 0 and metrics["examples_dropped"] == 0
    assert "peak_gpu_memory_bytes" not in metrics and "peak_gpu_reserved_bytes" not in metrics  # CPU

    # A Hugging Face folder: transformers loads it and it generates.
    tokenizer = AutoTokenizer.from_pretrained(first_sft)
    model = AutoModelForCausalLM.from_pretrained(first_sft)
    ids = tokenizer("What is 12 + 34?", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], model.state_dict()["model.layers.0.mlp.up_proj.weight"])


def test_gpu_peak_is_counted_only_on_cuda_and_reported_per_rank(monkeypatch):
    """The seam of metrics.peak_gpu_memory_bytes (torch.cuda's counters faked: no GPU here)."""
    from mot_trainer import sft as sft_module

    cpu = torch.device("cpu")
    sft_module.reset_gpu_peak(cpu)  # a no-op without CUDA
    assert sft_module.gpu_peak(cpu) is None
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5 * 2 ** 30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 6 * 2 ** 30)
    assert sft_module.gpu_peak(torch.device("cuda", 0)) == [5 * 2 ** 30, 6 * 2 ** 30]
    assert sft_module.gpu_peak_metrics([[5, 6], [7, 8]]) == {"peak_gpu_memory_bytes": [5, 7],
                                                             "peak_gpu_reserved_bytes": [6, 8]}


def test_second_sft_starts_from_first_output(first_sft, tiny_data, tmp_path, termination_log):
    out = tmp_path / "round-2"
    assert sft("--init", first_sft, "--data", tiny_data, "--out", out, "--steps", 5, *FAST) == 0
    manifest = verify_folder(out)
    assert manifest["inputs"]["init"] == str(first_sft)
    assert manifest["inputs"]["init_created"] == verify_folder(first_sft)["created"]
    # It continued from round 1: its first loss is near round 1's last, far below the random start.
    first_losses = verify_folder(first_sft)["metrics"]["loss_history"]
    assert manifest["metrics"]["loss_history"][0][1] < first_losses[0][1] * 0.8

    summary = json.loads(termination_log.read_text())
    assert summary["final_loss"] == pytest.approx(manifest["metrics"]["final_loss"])
    assert summary["examples_truncated"] == 0 and summary["tokens_per_second"] > 0

    # The same command again finds its finished output and does not train or rewrite it.
    written = (out / MANIFEST_NAME).stat().st_mtime_ns
    assert sft("--init", first_sft, "--data", tiny_data, "--out", out, "--steps", 5, *FAST) == 0
    assert (out / MANIFEST_NAME).stat().st_mtime_ns == written


def test_init_checkpoint_with_tampered_weights_is_refused(first_sft, tiny_data, tmp_path, termination_log):
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for f in first_sft.iterdir():
        (tampered / f.name).write_bytes(f.read_bytes())
    weights = bytearray((tampered / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (tampered / "model.safetensors").write_bytes(bytes(weights))
    assert sft("--init", tampered, "--data", tiny_data, "--out", tmp_path / "out", "--steps", 1, *FAST) == 2
    assert "model.safetensors" in termination_log.read_text() and "sha256" in termination_log.read_text()
    assert not (tmp_path / "out").exists()


def test_bad_record_exits_2_naming_file_line_and_field(tiny_model, tiny_records, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in tiny_records[:3]]
    lines.insert(2, json.dumps({"question": "What is 1 + 1?", "answer": "2"}))  # no response
    bad.write_text("\n".join(lines) + "\n")
    log = tmp_path / "termination-log"
    # The real entry point in a subprocess: the exit code is what a Job reports.
    proc = subprocess.run(
        [sys.executable, "-m", "mot_trainer.cli", "sft", "--init", str(tiny_model), "--data", str(bad),
         "--out", str(tmp_path / "out"), "--steps", "1", "--threads", "1"],
        env={**os.environ, "MOT_TERMINATION_LOG": str(log)}, capture_output=True, text=True,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = log.read_text()
    assert f"{bad} line 3" in message and "'response'" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "option, value",
    [("--steps", "0"), ("--learning-rate", "-1"), ("--warmup-ratio", "1.5"), ("--grad-accum", "0")],
)
def test_bad_options_exit_2_naming_the_option(tiny_model, tiny_data, tmp_path, termination_log, option, value):
    assert sft("--init", tiny_model, "--data", tiny_data, "--out", tmp_path / "out", option, value) == 2
    assert option in termination_log.read_text()


def test_missing_init_and_data_exit_2(tiny_model, tiny_data, tmp_path, termination_log):
    assert sft("--init", tmp_path / "nope", "--data", tiny_data, "--out", tmp_path / "o", "--steps", 1) == 2
    assert "nope" in termination_log.read_text()
    assert sft("--init", tiny_model, "--data", tmp_path / "none.jsonl", "--out", tmp_path / "o", "--steps", 1) == 2
    assert "none.jsonl" in termination_log.read_text()


def test_epochs_truncation_and_packing_are_counted(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    # 48 examples, 4 x 2 per step: 1 epoch is 6 steps. At 40 tokens every example is cut.
    assert sft("--init", tiny_model, "--data", tiny_data, "--out", out, "--epochs", 1,
               "--max-seq-length", 40, *FAST) == 0
    metrics = verify_folder(out)["metrics"]
    assert metrics["steps"] == 6 and metrics["examples_truncated"] == 48 and metrics["examples_dropped"] == 0
    # At 18 tokens the prompt fills the window: nothing left to learn, so every example is dropped.
    assert sft("--init", tiny_model, "--data", tiny_data, "--out", tmp_path / "o2", "--steps", 1,
               "--max-seq-length", 18, *FAST) == 2

    packed = tmp_path / "packed"
    assert sft("--init", tiny_model, "--data", tiny_data, "--out", packed, "--epochs", 1, "--packing",
               "--max-seq-length", 256, "--gradient-checkpointing", *FAST) == 0
    metrics = verify_folder(packed)["metrics"]
    assert metrics["steps"] < 6 and metrics["examples"] == 48  # fewer, fuller rows


def test_metrics_port_serves_progress_while_training(tiny_model, tiny_data, tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scraped = {}
    real_update = progress.Progress.update

    def update_then_scrape(self, step, loss, learning_rate, tokens):
        real_update(self, step, loss, learning_rate, tokens)
        if step == 2:  # mid-run: scrape the live endpoint over HTTP
            scraped["text"] = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            scraped["loss"] = loss

    monkeypatch.setattr(progress.Progress, "update", update_then_scrape)
    assert sft("--init", tiny_model, "--data", tiny_data, "--out", tmp_path / "out", "--steps", 4,
               "--metrics-port", port, *FAST) == 0
    samples = {}
    for line in scraped["text"].splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples["mot_trainer_step"] == 2
    assert samples["mot_trainer_steps_total_planned"] == 4
    assert samples["mot_trainer_loss"] == pytest.approx(scraped["loss"])
    assert samples["mot_trainer_learning_rate"] > 0
    assert samples["mot_trainer_tokens_total"] > 0 and samples["mot_trainer_tokens_per_second"] > 0
    assert samples["mot_trainer_eta_seconds"] >= 0
    with pytest.raises(requests.ConnectionError):  # the server stops with the command
        requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_two_processes_match_one_process_with_double_accumulation(tiny_model, tiny_data, tmp_path):
    """The same command under torchrun (gloo on CPU; FSDP2, the default with two processes): each
    process takes its share of every step, and the loss is normalised over the whole step, so the run
    equals one process. (tests/trainer/test_trainer_fsdp.py covers --sharding ddp and the weights.)"""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = ["--init", tiny_model, "--data", tiny_data, "--steps", 4, "--micro-batch-size", 2,
              "--learning-rate", 3e-3, "--threads", 1]
    assert sft(*common, "--out", single, "--grad-accum", 4) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "mot_trainer.cli", "sft"]
    proc = subprocess.run([*torchrun, *map(str, common), "--out", str(ddp), "--grad-accum", "2"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = verify_folder(single), verify_folder(ddp)
    assert two["params"]["processes"] == 2 and one["params"]["processes"] == 1
    assert two["metrics"]["tokens_seen"] == one["metrics"]["tokens_seen"]
    for (s1, l1), (s2, l2) in zip(one["metrics"]["loss_history"], two["metrics"]["loss_history"], strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-4)


def test_output_keeps_the_init_dtype_and_tied_embeddings(tiny_model, tiny_data, tmp_path):
    """Training runs on fp32 master weights; the checkpoint is written in the init's dtype (bf16 for
    real Qwen models) with the tied embedding stored once, as the merge expects."""
    from safetensors import safe_open

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(bf16)
    out = tmp_path / "out"
    assert sft("--init", bf16, "--data", tiny_data, "--out", out, "--steps", 2, *FAST) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}
    with safe_open(str(bf16 / "model.safetensors"), "pt") as f:
        assert names == set(f.keys())  # lm_head not written separately

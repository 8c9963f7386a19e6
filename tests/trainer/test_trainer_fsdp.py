"""`mot-train sft` with several processes shards the model (FSDP2) instead of replicating it: on CPU
with gloo under torchrun, two FSDP processes train exactly like one process with twice the gradient
accumulation, each holds about half the parameter + optimizer-state bytes, the checkpoint is an
ordinary HF folder in the init's dtype with the tied embedding stored once, and `--sharding ddp`
keeps the replicated DDP run."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mot_trainer import cli, sharding
from mot_trainer.manifest import verify_folder

# Numerically sensitive: `make test` runs these again under the other CPU kernel families.
pytestmark = pytest.mark.numerics

torch.set_num_threads(1)

STEPS, LR = 4, 3e-3
COMMON = ["--steps", STEPS, "--micro-batch-size", 2, "--learning-rate", LR, "--threads", 1]


def sft(*args):
    return cli.main(["sft", *map(str, args)])


def torchrun_sft(*args):
    """The real CLI in two processes (torchrun --standalone, gloo on CPU); asserts it succeeded."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mot_trainer.cli", "sft", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def single(tiny_model, tiny_data, tmp_path_factory):
    """One process, 4 micro-batches per step: the reference for the two-process runs (2 x 2)."""
    out = tmp_path_factory.mktemp("fsdp") / "single"
    assert sft("--init", tiny_model, "--data", tiny_data, "--out", out, *COMMON, "--grad-accum", 4) == 0
    return out


@pytest.fixture(scope="module")
def fsdp(tiny_model, tiny_data, tmp_path_factory):
    """Two processes, no --sharding: auto picks FSDP."""
    out = tmp_path_factory.mktemp("fsdp") / "fsdp"
    torchrun_sft("--init", tiny_model, "--data", tiny_data, "--out", out, *COMMON, "--grad-accum", 2)
    return out


def assert_same_losses(one: dict, two: dict):
    # As the DDP test: the manifest keeps 6 decimals, and the step's loss is summed over its
    # micro-batches and processes in another order.
    assert two["metrics"]["tokens_seen"] == one["metrics"]["tokens_seen"]
    for (s1, l1), (s2, l2) in zip(one["metrics"]["loss_history"], two["metrics"]["loss_history"], strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-4)


def test_resolve_sharding():
    assert [sharding.resolve(r, 1) for r in ("auto", "ddp", "fsdp")] == ["none", "none", "fsdp"]
    assert [sharding.resolve(r, 2) for r in ("auto", "ddp", "fsdp")] == ["fsdp", "ddp", "fsdp"]


def test_two_fsdp_processes_match_one_process_with_double_accumulation(single, fsdp):
    one, two = verify_folder(single), verify_folder(fsdp)
    assert one["params"]["sharding"] == "none" and one["params"]["processes"] == 1
    assert two["params"]["sharding"] == "fsdp" and two["params"]["processes"] == 2
    assert len(two["metrics"]["loss_history"]) == STEPS
    assert_same_losses(one, two)

    # Tolerance on the saved (fp32) weights. Both runs compute the same micro-batch gradients with
    # the same kernels; what differs is the order in which the K = 4 micro-batch gradients of a step
    # are summed (locally vs. reduce-scattered after each micro-batch and averaged over 2 ranks),
    # a relative error of at most ~K * eps in each gradient element (eps: fp32 machine epsilon).
    # AdamW's update m_hat / (sqrt(v_hat) + 1e-8) is bounded by 1 in magnitude when
    # 1 - beta1 <= sqrt(1 - beta2) (0.1 <= 0.22 here) and scale-invariant, so a relative error r in
    # the gradients moves it by at most ~2r: lr * 2K * eps per step. On top, each step rounds the
    # weight itself (w - lr * update, decay), up to one ulp on either side: 2 * eps * |w|. Over
    # STEPS steps (lr small enough that earlier differences are not amplified by later steps):
    #   tol = STEPS * (2 * eps * max|w| + LR * 2K * eps)
    # With max|w| ~ 1 (the norm weights) this is ~1e-6; a wrong reduction (a missed rank, a gradient
    # not averaged, an untrained lm_head) moves weights by ~LR = 3e-3.
    a, b = load_file(single / "model.safetensors"), load_file(fsdp / "model.safetensors")
    assert a.keys() == b.keys()
    eps, k = torch.finfo(torch.float32).eps, 4
    w_max = max(t.abs().max().item() for t in a.values())
    tol = STEPS * (2 * eps * w_max + LR * 2 * k * eps)
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    assert worst <= tol, (worst, tol)


def test_fsdp_weights_moved_from_init(tiny_model, fsdp):
    init, trained = load_file(tiny_model / "model.safetensors"), load_file(fsdp / "model.safetensors")
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight"):
        assert (init[name] - trained[name]).abs().max().item() > 1e-4, name


def test_fsdp_holds_half_the_state_per_process(single, fsdp):
    """Parameters + AdamW states held per process (the largest rank's), measured in the trainer:
    1/2 of the single process's with 2 ranks (dim-0 shards of uneven rows differ by one row)."""
    one = verify_folder(single)["metrics"]["sharded_state_bytes"]
    two = verify_folder(fsdp)["metrics"]["sharded_state_bytes"]
    assert one > 0
    assert 0.45 <= two / one <= 0.6, (two, one, two / one)


def test_fsdp_checkpoint_keeps_init_dtype_and_tied_embedding(tiny_model, tiny_data, tmp_path):
    """From a bf16 init (as real Qwen checkpoints), with gradient checkpointing: the streamed
    checkpoint is bf16, loads in transformers, and lm_head is the embedding, stored once."""
    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(bf16)
    out = tmp_path / "out"
    torchrun_sft("--init", bf16, "--data", tiny_data, "--out", out, "--steps", 2, "--micro-batch-size", 2,
                 "--grad-accum", 2, "--learning-rate", LR, "--threads", 1, "--gradient-checkpointing")
    manifest = verify_folder(out)
    assert manifest["params"]["sharding"] == "fsdp" and manifest["params"]["gradient_checkpointing"]
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["architectures"] == ["Qwen2ForCausalLM"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}
    with safe_open(str(bf16 / "model.safetensors"), "pt") as f:
        assert names == set(f.keys()) and "lm_head.weight" not in names

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("What is 12 + 34?", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]


def test_ddp_sharding_keeps_replicated_training(single, tiny_model, tiny_data, tmp_path):
    """--sharding ddp: today's DDP run, same losses, and every process holds the whole state."""
    out = tmp_path / "ddp"
    torchrun_sft("--init", tiny_model, "--data", tiny_data, "--out", out, *COMMON, "--grad-accum", 2,
                 "--sharding", "ddp")
    one, two = verify_folder(single), verify_folder(out)
    assert two["params"]["sharding"] == "ddp" and two["params"]["processes"] == 2
    assert_same_losses(one, two)
    assert two["metrics"]["sharded_state_bytes"] == one["metrics"]["sharded_state_bytes"]

"""`mot estimate FILE.yaml`: the per-GPU memory of one SFT branch, from the student's config.json.

The parameter count is exact against transformers' own models (built on the meta device), the
weights + optimizer terms are exactly what the trainer measures (metrics.sharded_state_bytes) with
one process and with two FSDP processes, and the examples' verdicts on an 80 GiB GPU are pinned."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mot_operator import cli
from mot_operator.estimate import ModelShape, estimate, parse_bytes
from mot_trainer import cli as trainer_cli
from mot_trainer.manifest import verify_folder

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# config.json fields of Qwen/Qwen3-8B and Qwen/Qwen3-30B-A3B (the Hugging Face hub's config.json).
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 12288, "max_position_embeddings": 40960,
    "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000, "tie_word_embeddings": False, "vocab_size": 151936,
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
    "decoder_sparse_step": 1, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 6144, "max_position_embeddings": 40960, "mlp_only_layers": [],
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "tie_word_embeddings": False, "vocab_size": 151936,
}
# A Qwen2 shape with what the tiny model lacks: GQA, untied lm_head, default head_dim.
QWEN2_SMALL = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_attention_heads": 14, "num_hidden_layers": 2, "num_key_value_heads": 2, "tie_word_embeddings": False,
    "vocab_size": 1000,
}


def meta_parameters(config: dict) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    conf = AutoConfig.for_model(config["model_type"], **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config", [QWEN2_SMALL, QWEN3_8B, QWEN3_30B_A3B], ids=["qwen2", "qwen3-8b", "qwen3-30b-a3b"])
def test_parameter_count_equals_transformers(config):
    assert ModelShape.from_config(config).parameters() == meta_parameters(config)


def test_parameter_counts_of_the_students():
    assert ModelShape.from_config(QWEN3_8B).parameters() == 8_190_735_360
    moe = ModelShape.from_config(QWEN3_30B_A3B)
    assert moe.parameters() == 30_532_122_624
    assert moe.active_parameters() == 3_353_032_704  # "A3B": 8 of 128 experts per token


def test_tiny_parameter_count_equals_the_model(tiny_model):
    from transformers import AutoModelForCausalLM

    config = json.loads((tiny_model / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert ModelShape.from_config(config).parameters() == sum(p.numel() for p in model.parameters())


def test_strategy_follows_the_processes():
    one = estimate(QWEN3_8B, gpus=1)
    assert one.strategy == "none" and one.processes == 1 and one.precision == "bf16"
    assert one.term("weights") + one.term("gradients") + one.term("optimizer") == 16 * 8_190_735_360 + 4 * 399
    many = estimate(QWEN3_8B, gpus=8, nodes=2)
    assert many.strategy == "fsdp" and many.processes == 16
    assert many.term("weights") == pytest.approx(one.term("weights") / 16, rel=1e-3)
    cpu = estimate(QWEN3_8B, gpus=0)
    assert cpu.precision == "fp32" and cpu.strategy == "none"
    with_ckpt = estimate(QWEN3_8B, gpus=8, max_seq_length=16384, gradient_checkpointing=True)
    without = estimate(QWEN3_8B, gpus=8, max_seq_length=16384)
    assert with_ckpt.term("activations") * 5 < without.term("activations")


def test_parse_bytes():
    assert parse_bytes("80GiB") == parse_bytes("80Gi") == 80 * 1024 ** 3
    assert parse_bytes("141GB") == 141 * 10 ** 9 and parse_bytes("1024") == 1024
    with pytest.raises(ValueError):
        parse_bytes("lots")


SMALL_QWEN3 = {"model_type": "qwen3", "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
               "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512,
               "tie_word_embeddings": False}
SMALL_MOE = {**SMALL_QWEN3, "model_type": "qwen3_moe", "moe_intermediate_size": 64, "num_experts": 16,
             "num_experts_per_tok": 4}


def saved_activation_bytes(config: dict, tokens: int, dtype, packed: bool = False) -> int:
    """Bytes of the tensors autograd saves for the backward in a forward of the decoder (parameters
    excluded), each storage once: what the activation term estimates without checkpointing. `packed`:
    two documents in the row, told apart by position ids as the trainer's packed rows are."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    conf = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
    conf._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(conf).to(dtype).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    extra = {}
    if packed:
        half = tokens // 2
        extra["position_ids"] = torch.cat([torch.arange(half), torch.arange(tokens - half)]).unsqueeze(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=torch.randint(0, config["vocab_size"], (1, tokens)), use_cache=False, **extra)
    return sum(saved.values())


@pytest.mark.parametrize("config", [SMALL_QWEN3, SMALL_MOE], ids=["qwen3", "qwen3-moe"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_activation_term_matches_what_autograd_saves(config, dtype):
    """Without checkpointing, the activation term is within 10 % of the tensors transformers' layers
    really save (bf16: FSDP's bf16 parameters, two processes; fp32: one CPU process)."""
    gpus, seq = (2 if dtype == torch.bfloat16 else 0), 512
    predicted = estimate(config, gpus=gpus, max_seq_length=seq).term("activations")
    measured = saved_activation_bytes(config, seq, dtype)
    assert 0.95 <= measured / predicted <= 1.10, (measured, predicted)


@pytest.mark.parametrize("config", [SMALL_QWEN3, SMALL_MOE], ids=["qwen3", "qwen3-moe"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_packed_rows_mask_term_matches_what_autograd_saves(config, dtype):
    """Packed rows (position ids restarting per document) make every layer save an S x S float mask
    and repeated k, v: the packed-rows term is what they add to the unpacked row's saved tensors,
    within 10 % (the boolean mask is built once, held by the forward, not saved by autograd)."""
    gpus, seq = (2 if dtype == torch.bfloat16 else 0), 512
    est = estimate(config, gpus=gpus, max_seq_length=seq, packing=True)
    added = saved_activation_bytes(config, seq, dtype, packed=True) - saved_activation_bytes(config, seq, dtype)
    predicted = est.term("packed-rows mask") - seq * seq  # the boolean mask: alive, not saved
    assert 0.90 <= added / predicted <= 1.10, (added, predicted)
    assert estimate(config, gpus=gpus, max_seq_length=seq).total == est.total - est.term("packed-rows mask")
    checkpointed = estimate(config, gpus=gpus, max_seq_length=seq, packing=True, gradient_checkpointing=True)
    assert checkpointed.term("packed-rows mask") == predicted // config["num_hidden_layers"] + seq * seq


# --- against the trainer's measurement ---------------------------------------------------------

TRAIN = ["--steps", 1, "--micro-batch-size", 1, "--grad-accum", 1, "--max-seq-length", 64, "--threads", 1]


def test_state_bytes_equal_the_trainers_one_process(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "one"
    assert trainer_cli.main(["sft", "--init", str(tiny_model), "--data", str(tiny_data), "--out", str(out),
                             *map(str, TRAIN)]) == 0
    measured = verify_folder(out)["metrics"]["sharded_state_bytes"]
    est = estimate(json.loads((tiny_model / "config.json").read_text()), gpus=1)
    assert est.state_bytes == measured


def test_state_bytes_equal_the_trainers_two_fsdp_processes(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mot_trainer.cli", "sft", "--init", str(tiny_model), "--data", str(tiny_data),
           "--out", str(out), *map(str, TRAIN)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = verify_folder(out)
    assert manifest["params"]["sharding"] == "fsdp" and manifest["params"]["processes"] == 2
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["vocab_size"] % 2 == 1  # the embedding's rows do not split evenly: rank 0 holds one more
    est = estimate(config, gpus=2)
    assert est.strategy == "fsdp"
    assert est.state_bytes == manifest["metrics"]["sharded_state_bytes"]


# --- the command -----------------------------------------------------------------------------


@pytest.fixture
def configs(tmp_path):
    paths = {}
    for name, config in (("qwen3-8b", QWEN3_8B), ("qwen3-30b-a3b", QWEN3_30B_A3B)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(config))
    return paths


def test_paper_example_fits_80gib_with_fsdp(configs, capsys):
    code = cli.main(["estimate", str(EXAMPLES / "paper.yaml"), "--config", str(configs["qwen3-8b"]),
                     "--gpu-memory", "80GiB", "--tokens-per-second", "20000"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "8.19B parameters" in out and "8 GPU(s) x 1 node(s) = 8; strategy fsdp; precision bf16" in out
    assert "fits: " in out and "<= 80.00 GiB" in out
    # 50 steps x 1 x 16 x 8 processes x 16384 tokens at 20k tokens/s
    assert "104857600 tokens per branch per round" in out and "1.46 h per branch per round" in out


def test_multinode_example_fits_80gib_with_fsdp_over_16_processes(configs, capsys):
    code = cli.main(["estimate", str(EXAMPLES / "multinode.yaml"), "--config", str(configs["qwen3-30b-a3b"]),
                     "--gpu-memory", "80GiB"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "30.53B parameters (3.35B active per token)" in out
    assert "8 GPU(s) x 2 node(s) = 16; strategy fsdp" in out and "fits: " in out


def test_impossible_spec_exits_2_naming_the_fields(configs, tmp_path, capsys):
    doc = yaml.safe_load((EXAMPLES / "paper.yaml").read_text())
    doc["spec"]["resources"]["branch"]["gpus"] = 1
    doc["spec"]["training"].update(maxSeqLength=32768, gradientCheckpointing=False)
    manifest = tmp_path / "one-gpu.yaml"
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    code = cli.main(["estimate", str(manifest), "--config", str(configs["qwen3-8b"]), "--gpu-memory", "80GiB"])
    captured = capsys.readouterr()
    assert code == 2
    assert "strategy none" in captured.out and "does not fit" in captured.err
    for field in ("spec.resources.branch.gpus", "spec.resources.branch.nodes", "spec.training.maxSeqLength",
                  "spec.training.gradientCheckpointing", "spec.training.microBatchSize"):
        assert field in captured.err


def test_student_folder_config_and_hub_id(tiny_model, tmp_path, capsys):
    doc = yaml.safe_load((EXAMPLES / "minimal.yaml").read_text())
    doc["spec"]["student"] = str(tiny_model)
    manifest = tmp_path / "local.yaml"
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert cli.main(["estimate", str(manifest)]) == 0
    assert "strategy none; precision fp32" in capsys.readouterr().out  # no GPUs: one CPU process

    doc["spec"]["student"] = "Qwen/Qwen3-8B"
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert cli.main(["estimate", str(manifest)]) == 2
    assert "pass --config FILE" in capsys.readouterr().err

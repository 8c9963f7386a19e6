"""FSDP saves stream the sharded model into safetensors shards in the checkpoint's dtype, one gathered
tensor at a time (sharding.save_streaming), instead of gathering the whole fp32 model on the main
process first. Checked on CPU with gloo under torchrun: the streamed folder holds bit for bit what the
former gathered save (full_state_dict, cast, save_pretrained) writes for the same sharded weights, with
the same shard files, index, config and tokenizer; it loads in transformers and merges; the main
process's peak host memory during the save is measured against the gathered save's."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from mot_trainer import cli
from mot_trainer.manifest import MANIFEST_NAME, checkpoint_files, verify_folder
from mot_trainer.merge.reader import INDEX_NAME
from mot_trainer.tiny import arithmetic_records, build_tiny_model, corpus_texts

# Not under the numerics reruns: both saves write the same trained weights, and a cast or a copy is the
# same on every CPU kernel family (training itself is checked there by test_trainer_fsdp.py).
torch.set_num_threads(1)

# Larger than any one tensor of the wide model in fp32 (768 x 2304 x 4 bytes = 7 MB), so the shard
# plan is the same as save_pretrained's (its only difference: where a tensor larger than a shard goes).
SHARD_BYTES = 16 * 10**6

# Run by torchrun in two processes: load and shard as `mot-train sft` does under FSDP, move every
# shard off the init's values (as training would: the bf16 cast then has something to round), then
# save twice from the same sharded weights, streamed and gathered, measuring rank 0's peak RSS growth
# during each (clear_refs resets the high-water mark VmHWM to the current RSS).
SAVE_SCRIPT = """
import gc
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from mot_trainer import sft, sharding

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
source, out, max_shard = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
model, tokenizer, saved_dtype = sft.load_model_and_tokenizer(source, source, True, on_meta=rank != 0)
full = model.state_dict() if rank == 0 else None
model = sharding.shard(model, torch.device("cpu"), "no")
sharding.load_from_rank0(model, full, torch.device("cpu"))
del full
generator = torch.Generator().manual_seed(rank)
with torch.no_grad():
    for param in model.parameters():
        local = param.to_local()
        local.add_(torch.randn(local.shape, generator=generator) * 1e-3)
accelerator = SimpleNamespace(is_main_process=rank == 0)  # all save_model asks of it under FSDP


def status_kib(field):
    return int(re.search(field + r":\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))


def peak_growth(save):
    gc.collect()
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")
    before = status_kib("VmRSS")
    save()
    dist.barrier()
    return (status_kib("VmHWM") - before) * 1024


streamed = peak_growth(lambda: sft.save_model(accelerator, model, tokenizer, saved_dtype, out / "streamed",
                                              "fsdp", max_shard_bytes=max_shard))
gathered = peak_growth(lambda: sft.save_gathered(accelerator, model, tokenizer, saved_dtype, out / "gathered",
                                                 "fsdp", max_shard))
if rank == 0:
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    (out / "memory.json").write_text(json.dumps({"streamed": streamed, "gathered": gathered,
                                                 "fp32_bytes": fp32_bytes}))
from mot_trainer.cli import leave_distributed

leave_distributed(0)
"""

# `mot-train` with a small shard limit: the module constant save_model falls back to.
CLI_WITH_SHARD_LIMIT = """
import sys

from mot_trainer import cli, sharding

sharding.SAVE_MAX_SHARD_BYTES = int(sys.argv[1])
sys.exit(cli.main(sys.argv[2:]))
"""


def torchrun(*args, timeout=600, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """The tiny architecture made wider (hidden 768, 4 layers: ~125 MB of fp32 weights), so a whole
    copy of the weights stands out of the save's other memory use."""
    corpus = arithmetic_records(200, seed=100, style="steps")
    return build_tiny_model(tmp_path_factory.mktemp("wide-model"), corpus_texts(corpus), hidden_size=768,
                            layers=4, heads=8, seed=0, max_position_embeddings=512)


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def saved(request, wide_model, tmp_path_factory):
    """The streamed and the gathered save of the same sharded weights, from an fp32 or a bf16 init."""
    work = tmp_path_factory.mktemp(f"save-{request.param}")
    source = wide_model
    if request.param == "bf16":
        source = work / "init"
        AutoModelForCausalLM.from_pretrained(wide_model, dtype=torch.bfloat16).save_pretrained(source)
        AutoTokenizer.from_pretrained(wide_model).save_pretrained(source)
    script = work / "save_script.py"
    script.write_text(SAVE_SCRIPT)
    # A fixed mmap threshold: glibc's default one rises to the size of the last block freed (up to
    # 32 MB), keeping later freed blocks in the heap; the RSS growth then measures the memory in use.
    torchrun(script, source, work, SHARD_BYTES, env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[request.param]
    return work, dtype


def weight_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files; a name in two files fails."""
    out = {}
    for name in weight_files(folder):
        with safe_open(str(folder / name), "pt") as f:
            for key in f.keys():
                assert key not in out, key
                out[key] = f.get_tensor(key)
    return out


def test_streamed_save_equals_the_gathered_save(saved):
    """Same files (shards, index, config, generation config, tokenizer), the same tensors bit for bit
    in the checkpoint's dtype; the side files byte for byte."""
    work, dtype = saved
    streamed, gathered = work / "streamed", work / "gathered"
    assert checkpoint_files(streamed) == checkpoint_files(gathered)
    assert len(weight_files(streamed)) >= 3, weight_files(streamed)
    a, b = tensors(streamed), tensors(gathered)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype == dtype, name
        assert torch.equal(a[name], b[name]), name
    for rel in checkpoint_files(streamed):
        if not rel.endswith(".safetensors"):
            assert (streamed / rel).read_bytes() == (gathered / rel).read_bytes(), rel


def test_streamed_index_maps_every_tensor_once(saved):
    """The index's weight_map names each tensor's file, total_size is the sum of the tensors' bytes,
    total_parameters the model's (the tied embedding once); lm_head is not stored apart."""
    work, dtype = saved
    folder = work / "streamed"
    index = json.loads((folder / INDEX_NAME).read_text())
    found = {}
    for name in weight_files(folder):
        with safe_open(str(folder / name), "pt") as f:
            found.update(dict.fromkeys(f.keys(), name))
    assert index["weight_map"] == found
    assert "lm_head.weight" not in found and "model.embed_tokens.weight" in found
    data = tensors(folder)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in data.values())
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in data.values())
    assert {t.dtype for t in data.values()} == {dtype}
    assert not [p for p in folder.iterdir() if p.name.endswith((".partial", ".tmp"))]


def test_streamed_folder_loads_in_transformers(saved):
    work, dtype = saved
    folder = work / "streamed"
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == dtype
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for name, tensor in tensors(folder).items():
        assert torch.equal(model.get_parameter(name).data, tensor), name


def test_streamed_save_peak_host_memory(saved):
    """Rank 0's peak RSS growth during each save. Gathered: the whole fp32 model, plus its bf16 cast
    for a bf16 checkpoint; streamed: one gathered fp32 tensor (7 MB here, and its all-gather buffer)
    and the writer's buffers (three of one tensor's size in the checkpoint dtype at most). Measured on
    the 2-core EPYC (fp32 weights 124 MB): fp32 checkpoint, streamed 36 MB vs gathered 131 MB; bf16,
    25 MB vs 186 MB. Only a wide gap is asserted: half the model's fp32 bytes."""
    work, dtype = saved
    memory = json.loads((work / "memory.json").read_text())
    print(f"\n{dtype}: fp32 weights {memory['fp32_bytes'] / 1e6:.1f} MB; peak RSS growth during the save: "
          f"streamed {memory['streamed'] / 1e6:.1f} MB, gathered {memory['gathered'] / 1e6:.1f} MB")
    assert memory["fp32_bytes"] > 100e6
    assert memory["streamed"] + memory["fp32_bytes"] / 2 < memory["gathered"], memory


def test_cli_streams_a_sharded_checkpoint_that_merges(tiny_model, tiny_data, tmp_path):
    """`mot-train sft` under FSDP with a small shard limit: the manifest (written last) lists the
    shards and the index, the folder loads in transformers, and `mot-train merge` of two such
    folders reads every shard (the average of two copies is the checkpoint itself)."""
    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(bf16)
    script = tmp_path / "sft_with_shard_limit.py"
    script.write_text(CLI_WITH_SHARD_LIMIT)
    out = tmp_path / "out"
    torchrun(script, 100_000, "sft", "--init", bf16, "--data", tiny_data, "--out", out, "--steps", 1,
             "--micro-batch-size", 2, "--grad-accum", 1, "--learning-rate", 1e-3, "--threads", 1)
    manifest = verify_folder(out)
    assert manifest["params"]["sharding"] == "fsdp"
    listed = sorted(entry["path"] for entry in manifest["files"])
    assert listed == checkpoint_files(out) and MANIFEST_NAME not in listed
    shards = weight_files(out)
    assert len(shards) >= 3 and INDEX_NAME in listed and set(shards) <= set(listed)
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    written = tensors(out)
    assert {t.dtype for t in written.values()} == {torch.bfloat16} and "lm_head.weight" not in written

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    copy, merged = tmp_path / "copy", tmp_path / "merged"
    shutil.copytree(out, copy)
    assert cli.main(["merge", "--inputs", str(out), str(copy), "--out", str(merged)]) == 0
    verify_folder(merged)
    result = tensors(merged)
    assert result.keys() == written.keys()
    for name, tensor in written.items():
        assert torch.equal(result[name], tensor), name


def test_streamed_entries_are_what_save_pretrained_keeps():
    """One process, models on the meta device: the tied lm_head is left out (kept when untied); a
    model whose weights transformers converts on save (Mixtral's experts, fused when loaded) is not
    streamed (None: save_model gathers it whole instead)."""
    from transformers import MixtralConfig, Qwen2Config

    from mot_trainer import sharding

    shape = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 2}
    with torch.device("meta"):
        tied = AutoModelForCausalLM.from_config(Qwen2Config(**shape, tie_word_embeddings=True))
        untied = AutoModelForCausalLM.from_config(Qwen2Config(**shape, tie_word_embeddings=False))
        moe = AutoModelForCausalLM.from_config(MixtralConfig(**shape, num_local_experts=2))
    names = list(sharding.streamed_entries(tied))
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert sorted(names) == sorted(set(tied.state_dict()) - {"lm_head.weight"})
    assert sorted(sharding.streamed_entries(untied)) == sorted(untied.state_dict())
    assert sharding.streamed_entries(moe) is None

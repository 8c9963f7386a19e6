"""`mot-train merge`: every method against a reference formula written here independently (numpy,
float64), refusals with exit code 2, sharded output that transformers loads, inputs and output on S3."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mot_trainer import cli, storage
from mot_trainer.manifest import MANIFEST_NAME, verify_folder, write_manifest

# Numerically sensitive: `make test` runs these again under the other CPU kernel families.
pytestmark = pytest.mark.numerics

torch.set_num_threads(1)

SHAPES = {"a.weight": (7, 5), "a.bias": (11,), "b.weight": (3, 4, 2)}


def write_checkpoint(folder, tensors, *, config=None, manifest=True):
    """A model folder: safetensors weights, side files, and (normally) the manifest, last."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "test"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "from": folder.name}))
    if manifest:
        write_manifest(folder, kind="sft", inputs={}, params={}, metrics={})
    return str(folder)


def random_tensors(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g).to(dtype) for name, shape in SHAPES.items()}


def merge(*args):
    """Run the real CLI in-process; returns its exit code."""
    return cli.main(["merge", *map(str, args)])


@pytest.fixture
def termination_log(tmp_path, monkeypatch):
    path = tmp_path / "termination-log"
    monkeypatch.setenv("MOT_TERMINATION_LOG", str(path))
    return path


def np64(t):
    return t.to(torch.float64).numpy()


def test_weighted_average_matches_independent_computation(tmp_path, termination_log):
    tensors = [random_tensors(seed) for seed in range(3)]
    inputs = [write_checkpoint(tmp_path / f"in{i}", t) for i, t in enumerate(tensors)]
    weights = [1.0, 2.0, 0.5]
    assert merge("--inputs", *inputs, "--weights", *weights, "--out", tmp_path / "out") == 0
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert set(out) == set(SHAPES)
    for name in SHAPES:
        expected = sum(w * np64(t[name]) for w, t in zip(weights, tensors, strict=True)) / sum(weights)
        assert out[name].dtype == torch.float32 and out[name].shape == SHAPES[name]
        np.testing.assert_allclose(np64(out[name]), expected, rtol=0, atol=1e-6)
    manifest = verify_folder(tmp_path / "out")
    assert manifest["kind"] == "merge" and manifest["inputs"]["models"] == inputs
    assert manifest["params"]["method"] == "average" and manifest["params"]["weights"] == weights
    assert manifest["metrics"]["tensors"] == len(SHAPES)
    assert json.loads(termination_log.read_text()) == {
        "inputs": 3, "tensors": 3, "method": "average", "wall_seconds": pytest.approx(0, abs=60)}
    # Side files come from the first input.
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["from"] == "in0"


def test_uniform_bf16_average_is_fp32_sum_rounded_once(tmp_path):
    tensors = [random_tensors(seed, torch.bfloat16) for seed in range(4)]
    inputs = [write_checkpoint(tmp_path / f"in{i}", t) for i, t in enumerate(tensors)]
    assert merge("--inputs", *inputs, "--out", tmp_path / "out") == 0
    out = load_file(tmp_path / "out" / "model.safetensors")
    for name in SHAPES:
        exact = sum(np64(t[name]) for t in tensors) / 4  # bf16 values: exact in float64
        assert out[name].dtype == torch.bfloat16
        assert torch.equal(out[name], torch.from_numpy(exact).to(torch.float32).to(torch.bfloat16))


def with_base(tmp_path, k=3):
    base = random_tensors(100)
    inputs = []
    for i in range(k):
        delta = random_tensors(i)
        inputs.append({n: base[n] + 0.1 * delta[n] for n in SHAPES})
    paths = [write_checkpoint(tmp_path / f"in{i}", t) for i, t in enumerate(inputs)]
    return base, inputs, paths, write_checkpoint(tmp_path / "base", base, manifest=False)


def test_task_arithmetic_matches_reference(tmp_path):
    base, inputs, paths, base_path = with_base(tmp_path)
    weights, scale = [1.0, 1.0, 2.0], 1.7
    assert merge("--method", "task-arithmetic", "--base", base_path, "--inputs", *paths,
                 "--weights", *weights, "--scale", scale, "--out", tmp_path / "out") == 0
    out = load_file(tmp_path / "out" / "model.safetensors")
    for name in SHAPES:
        b = np64(base[name])
        expected = b + scale * sum(w * (np64(x[name]) - b) for w, x in zip(weights, inputs, strict=True)) / 4.0
        np.testing.assert_allclose(np64(out[name]), expected, rtol=0, atol=1e-5)


def ties_reference(base, inputs, weights, density, scale):
    deltas = []
    for x in inputs:
        d = (x - base).ravel()
        k = int(density * d.size)
        keep = np.argsort(-np.abs(d))[:k]
        trimmed = np.zeros_like(d)
        trimmed[keep] = d[keep]
        deltas.append(trimmed)
    elected = np.sign(sum(w * d for w, d in zip(weights, deltas, strict=True)))
    num = np.zeros_like(deltas[0])
    den = np.zeros_like(deltas[0])
    for w, d in zip(weights, deltas, strict=True):
        agree = np.sign(d) == elected
        num += np.where(agree, w * d, 0.0)
        den += np.where(agree, w, 0.0)
    merged = np.divide(num, den, out=np.zeros_like(num), where=den != 0)
    return base + scale * merged.reshape(base.shape)


def test_ties_matches_reference(tmp_path):
    base, inputs, paths, base_path = with_base(tmp_path)
    weights, density, scale = [1.0, 2.0, 1.0], 0.4, 1.3
    assert merge("--method", "ties", "--base", base_path, "--inputs", *paths, "--weights", *weights,
                 "--density", density, "--scale", scale, "--out", tmp_path / "out") == 0
    out = load_file(tmp_path / "out" / "model.safetensors")
    for name in SHAPES:
        expected = ties_reference(np64(base[name]), [np64(x[name]) for x in inputs], weights, density, scale)
        np.testing.assert_allclose(np64(out[name]), expected, rtol=0, atol=1e-5)


def test_dare_drops_and_rescales(tmp_path):
    """With constant differences 1 and 10 from the base, each output element reveals which of the two
    differences DARE kept: check the formula element by element and the kept fraction."""
    shapes = {"w": (400, 50)}
    base = {"w": torch.randn(shapes["w"], generator=torch.Generator().manual_seed(5))}
    paths = [write_checkpoint(tmp_path / f"in{i}", {"w": base["w"] + d}) for i, d in enumerate((1.0, 10.0))]
    base_path = write_checkpoint(tmp_path / "base", base)
    density, scale, weights = 0.3, 0.5, [1.0, 3.0]
    for out, seed in (("out1", 7), ("out2", 7), ("out3", 8)):
        assert merge("--method", "dare", "--base", base_path, "--inputs", *paths, "--weights", *weights,
                     "--density", density, "--scale", scale, "--seed", seed, "--out", tmp_path / out) == 0
    got = {o: load_file(tmp_path / o / "model.safetensors")["w"] for o in ("out1", "out2", "out3")}
    assert torch.equal(got["out1"], got["out2"]) and not torch.equal(got["out1"], got["out3"])
    # Undo base and scaling: the remainder is (w1*m1*1 + w2*m2*10) / (density * (w1 + w2)).
    combo = (np64(got["out1"]) - np64(base["w"])) / scale * density * sum(weights)
    kept = {(m1, m2): m1 * weights[0] * 1.0 + m2 * weights[1] * 10.0 for m1 in (0, 1) for m2 in (0, 1)}
    nearest = np.stack([np.abs(combo - v) for v in kept.values()]).argmin(axis=0)
    masks = np.array(list(kept))[nearest]  # (..., 2) inferred kept flags per input
    np.testing.assert_allclose(combo, np.array(list(kept.values()))[nearest], rtol=0, atol=2e-4)
    n = masks[..., 0].size
    for i in range(2):
        fraction = masks[..., i].mean()
        assert abs(fraction - density) < 4 * (density * (1 - density) / n) ** 0.5, (i, fraction)
    assert abs((masks[..., 0] * masks[..., 1]).mean() - density**2) < 0.02  # independent masks


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.update({"b.weight": torch.zeros(3, 4, 3)}), r"in1.*'b.weight' has shape \[3, 4, 3\]"),
        (lambda t: t.update({"a.bias": t["a.bias"].half()}), r"in1.*'a.bias' has dtype F16"),
        (lambda t: t.pop("a.bias"), r"in1.*lacks tensor 'a.bias'"),
        (lambda t: t.update({"extra": torch.zeros(2)}), r"in1.*has tensor 'extra'"),
    ],
)
def test_mismatched_inputs_are_refused(tmp_path, termination_log, change, message):
    first, second = random_tensors(0), random_tensors(1)
    change(second)
    inputs = [write_checkpoint(tmp_path / "in0", first), write_checkpoint(tmp_path / "in1", second)]
    assert merge("--inputs", *inputs, "--out", tmp_path / "out") == 2
    assert termination_log.read_text().startswith("invalid input:")
    assert __import__("re").search(message, termination_log.read_text())
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_tampered_or_incomplete_input_is_refused(tmp_path, termination_log):
    inputs = [write_checkpoint(tmp_path / f"in{i}", random_tensors(i)) for i in range(2)]
    weights = tmp_path / "in1" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # same size, different bytes: only the sha256 can tell
    weights.write_bytes(bytes(data))
    assert merge("--inputs", *inputs, "--out", tmp_path / "out") == 2
    assert "in1/model.safetensors: sha256" in termination_log.read_text()
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()  # nothing published

    (tmp_path / "in1" / MANIFEST_NAME).unlink()
    assert merge("--inputs", *inputs, "--out", tmp_path / "out") == 2
    assert "incomplete" in termination_log.read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "ties"], "--base"),
        (["--weights", "1"], "--weights: 1 weights for 2 inputs"),
        (["--weights", "1", "-1"], "non-negative"),
        (["--shard-size", "lots"], "--shard-size"),
        (["--method", "dare", "--base", "BASE", "--density", "0"], "--density"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_bad_options_are_invalid_input(tmp_path, termination_log, args, message):
    inputs = [write_checkpoint(tmp_path / f"in{i}", random_tensors(i)) for i in range(2)]
    args = [str(tmp_path / "in0") if a == "BASE" else a for a in args]
    assert merge("--inputs", *inputs, "--out", tmp_path / "out", *args) == 2
    assert message in termination_log.read_text()


def save_perturbed(model, folders):
    """Nudge the model's weights a little before saving it to each folder (one random walk)."""
    for folder in folders:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(folder)
        yield folder


def tiny_llm_variants(tmp_path, count, *, tied):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "base")
    paths = []
    for i, folder in enumerate(save_perturbed(model, [tmp_path / f"variant{i}" for i in range(count)])):
        if tied and i == 0:  # some writers keep the shared head: it must not break the merge
            state = load_file(folder / "model.safetensors")
            state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
            save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        write_manifest(folder, kind="sft", inputs={}, params={}, metrics={})
        paths.append(str(folder))
    return paths


@pytest.mark.parametrize("tied", [True, False])
def test_sharded_output_loads_with_transformers_and_generates(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    paths = tiny_llm_variants(tmp_path, 3, tied=tied)
    out = tmp_path / "merged"
    assert merge("--inputs", *paths, "--out", out, "--shard-size", "20KB") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).stat().st_size < 20_000 + 12_000 for s in shards)
    assert ("lm_head.weight" in index["weight_map"]) == (not tied)
    assert (out / "generation_config.json").exists() and (out / "config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    variants = [AutoModelForCausalLM.from_pretrained(p) for p in paths]
    expected = {n: sum(v.state_dict()[n] for v in variants) / 3 for n in model.state_dict()}
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)
    generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)

    # A rerun into the same folder with one shard replaces the old shards and index.
    assert merge("--inputs", *paths, "--out", out) == 0
    assert sorted(p.name for p in out.glob("*.safetensors*")) == ["model.safetensors"]
    verify_folder(out)
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_merge_over_s3(tmp_path, s3_server, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MOT_TERMINATION_LOG", str(tmp_path / "term"))
    bucket = s3_server.make_bucket("merge-test")
    tensors = [random_tensors(seed) for seed in range(2)]
    uris = [f"{bucket}/ns/run/round-1/branch-t{i}" for i in range(2)]
    for i, t in enumerate(tensors):
        storage.upload_checkpoint(write_checkpoint(tmp_path / f"in{i}", t), uris[i])
    out = f"{bucket}/ns/run/round-1/merged"
    mot_train = os.path.join(os.path.dirname(sys.executable), "mot-train")  # the installed entry point
    result = subprocess.run([mot_train, "merge", "--inputs", *uris, "--out", out],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "term").read_text())["inputs"] == 2
    merged = load_file(storage.download_dir(out, tmp_path / "dl") / "model.safetensors")
    for name in SHAPES:
        np.testing.assert_allclose(np64(merged[name]), (np64(tensors[0][name]) + np64(tensors[1][name])) / 2,
                                   rtol=0, atol=1e-6)
    # An input prefix without a manifest is refused with exit code 2.
    result = subprocess.run([mot_train, "merge", "--inputs", uris[0], f"{bucket}/nothing-here",
                             "--out", f"{bucket}/out2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "nothing-here" in (tmp_path / "term").read_text()
    assert not storage.exists(f"{bucket}/out2/{MANIFEST_NAME}")


def test_reads_by_offset_and_buffer_growth_keeps_earlier_views(tmp_path):
    from mot_trainer.merge.reader import Checkpoint, ReadBuffer

    tensors = {"small": torch.arange(3, dtype=torch.float32), "big": torch.arange(1000, dtype=torch.bfloat16)}
    ckpt = Checkpoint(write_checkpoint(tmp_path / "c", tensors))
    buf = ReadBuffer()
    small = ckpt.read_into(ckpt.tensors["small"], buf)
    big = ckpt.read_into(ckpt.tensors["big"], buf, start=10, count=900)  # grows the buffer
    assert torch.equal(small, tensors["small"]) and torch.equal(big, tensors["big"][10:910])
    ckpt.close()


def test_ties_on_tied_model_whose_base_has_no_head(tmp_path):
    from transformers import AutoModelForCausalLM

    paths = tiny_llm_variants(tmp_path, 2, tied=True)  # variant0 keeps lm_head, the base does not
    out = tmp_path / "merged"
    assert merge("--method", "ties", "--base", tmp_path / "base", "--inputs", *paths, "--out", out) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generate(torch.tensor([[4, 5]]), max_new_tokens=3, do_sample=False).shape == (1, 5)


@pytest.mark.parametrize("threads", ["1", "3"])
def test_a_failed_write_leaves_no_manifest(tmp_path, termination_log, monkeypatch, threads):
    """The background writer's error reaches the CLI (retryable exit, not 2) and nothing is published."""
    from mot_trainer.merge import merger, writer

    monkeypatch.setattr(merger, "SLICE_ELEMENTS", 4)  # many slices in flight on the merging threads
    monkeypatch.setattr(merger, "PARALLEL_SLICE_ELEMENTS", 4)
    inputs = [write_checkpoint(tmp_path / f"in{i}", random_tensors(i)) for i in range(2)]

    def disk_full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "_write_all", disk_full)
    code = merge("--inputs", *inputs, "--out", tmp_path / "out", "--threads", threads)
    assert code not in (0, 2)
    assert "No space left on device" in termination_log.read_text()
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()  # only the .partial, never renamed


def test_output_hashes_computed_while_writing_match_the_files(tmp_path):
    inputs = [write_checkpoint(tmp_path / f"in{i}", random_tensors(i, torch.bfloat16)) for i in range(3)]
    assert merge("--inputs", *inputs, "--out", tmp_path / "out", "--shard-size", "100B") == 0
    import hashlib

    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    for entry in manifest["files"]:
        assert entry["sha256"] == hashlib.sha256((tmp_path / "out" / entry["path"]).read_bytes()).hexdigest()
    paths = {e["path"] for e in manifest["files"]}
    assert "model.safetensors.index.json" in paths and sum(p.endswith(".safetensors") for p in paths) == 2


@pytest.mark.parametrize("method", ["average", "task-arithmetic", "ties"])
def test_merging_on_several_threads_gives_the_same_bytes(tmp_path, monkeypatch, method):
    """Slices merged concurrently are written in order and computed exactly as on one thread."""
    from mot_trainer.merge import merger

    monkeypatch.setattr(merger, "SLICE_ELEMENTS", 3)  # every tensor spans several slices
    monkeypatch.setattr(merger, "PARALLEL_SLICE_ELEMENTS", 5)
    base, _, paths, base_path = with_base(tmp_path, k=4)
    options = ["--method", method, "--weights", "1", "0.5", "2", "1"]
    if method != "average":
        options += ["--base", base_path]
    outputs = []
    for threads in ("1", "4"):
        out = tmp_path / f"out-{threads}"
        assert merge("--inputs", *paths, "--out", out, "--threads", threads, *options) == 0
        outputs.append((out / "model.safetensors").read_bytes())
    assert outputs[0] == outputs[1]


def test_default_threads_follow_the_cpu_quota(tmp_path, monkeypatch):
    from mot_trainer.merge import cpus

    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(16)))
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(cpus, "CGROUP_CPU_MAX", quota)
    assert cpus.default_threads() == cpus.MAX_THREADS  # no cgroup file: the affinity mask
    quota.write_text("max 100000\n")
    assert cpus.default_threads() == cpus.MAX_THREADS
    quota.write_text("250000 100000\n")  # a pod limited to 2.5 CPUs: 2, one of them for the writer
    assert cpus.default_threads() == 1
    quota.write_text("50000 100000\n")
    assert cpus.default_threads() == 1


@pytest.mark.parametrize("size", ["5i", "lots", "0", "2XB", "1.5.0MB"])
def test_bad_shard_size_is_an_argparse_error(tmp_path, termination_log, size):
    inputs = [write_checkpoint(tmp_path / f"in{i}", random_tensors(i)) for i in range(2)]
    assert merge("--inputs", *inputs, "--out", tmp_path / "out", "--shard-size", size) == 2
    message = termination_log.read_text()
    assert message.startswith("mot-train merge: error: argument --shard-size:") and repr(size) in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, size", [("1000", 1000), ("5KB", 5000), ("5kib", 5120), ("1.5MB", 1_500_000),
                                        ("2GB", 2_000_000_000), ("1GiB", 1 << 30), ("3 T", 3 * 10**12),
                                        ("7B", 7)])
def test_shard_sizes_parse(text, size):
    from mot_trainer.merge.cli import shard_size

    assert shard_size(text) == size


def head_checkpoint(folder, seed, *, tie, model_type="test"):
    """A checkpoint with an embedding; an untied one (tie False) also has its own lm_head."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": torch.randn(9, 4, generator=g), "a.weight": torch.randn(4, 4, generator=g)}
    if tie is not True:
        tensors["lm_head.weight"] = torch.randn(9, 4, generator=g)
    config = {"model_type": model_type}
    if tie is not None:
        config["tie_word_embeddings"] = tie
    return write_checkpoint(folder, tensors, config=config)


@pytest.mark.parametrize("tied_at", [0, 2])
def test_inputs_disagreeing_on_tied_embeddings_are_refused_in_any_order(tmp_path, termination_log, tied_at):
    """Tied first used to exit 0 and drop the untied inputs' heads; tied last exited 2."""
    inputs = [head_checkpoint(tmp_path / f"in{i}", i, tie=i == tied_at) for i in range(3)]
    assert merge("--inputs", *inputs, "--out", tmp_path / "out") == 2
    message = termination_log.read_text()
    assert message.startswith("invalid input: tie_word_embeddings differs")
    untied = inputs[1] if tied_at == 0 else inputs[0]  # compared with input 0: the first that disagrees
    assert f"{inputs[tied_at]} has true" in message and f"{untied} has false" in message
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_base_disagreeing_on_tied_embeddings_is_refused(tmp_path, termination_log):
    inputs = [head_checkpoint(tmp_path / f"in{i}", i, tie=False) for i in range(2)]
    base = head_checkpoint(tmp_path / "base", 9, tie=True)
    assert merge("--method", "task-arithmetic", "--base", base, "--inputs", *inputs, "--out", tmp_path / "out") == 2
    message = termination_log.read_text()
    assert f"--base {base} has true" in message and f"{inputs[0]} has false" in message


@pytest.mark.parametrize(
    "model_type, omitted_means",
    [("gpt2", True), ("qwen2", False), ("not-a-transformers-model", False)],
)
def test_omitted_tie_setting_means_the_config_class_default(tmp_path, termination_log, model_type, omitted_means):
    """A config without tie_word_embeddings gets its model type's default, as transformers loads it."""
    explicit = head_checkpoint(tmp_path / "explicit", 0, tie=omitted_means, model_type=model_type)
    omitted = head_checkpoint(tmp_path / "omitted", 1, tie=None, model_type=model_type)
    if omitted_means:  # tie=None writes a head: drop it, so the checkpoint looks tied as its default says
        state = load_file(tmp_path / "omitted" / "model.safetensors")
        del state["lm_head.weight"]
        write_checkpoint(tmp_path / "omitted", state, config={"model_type": model_type})
    assert merge("--inputs", explicit, omitted, "--out", tmp_path / "same") == 0
    contrary = head_checkpoint(tmp_path / "contrary", 2, tie=not omitted_means, model_type=model_type)
    assert merge("--inputs", omitted, contrary, "--out", tmp_path / "differs") == 2
    assert f"{omitted} has {str(omitted_means).lower()}" in termination_log.read_text()


def plain_hf_folders(tmp_path, tiny_model, count):
    """User's own model folders: save_pretrained (safetensors) plus tokenizer files, no manifest."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    paths = []
    for folder in save_perturbed(model, [tmp_path / f"user-model-{i}" for i in range(count)]):
        for name in os.listdir(tiny_model):
            if name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copyfile(tiny_model / name, folder / name)
        assert (folder / "model.safetensors").exists() and not (folder / MANIFEST_NAME).exists()
        paths.append(folder)
    return paths


def sha256_of(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_plain_model_folders_merge_with_the_flag_and_are_recorded(tmp_path, termination_log, tiny_model):
    from transformers import AutoModelForCausalLM

    plain = plain_hf_folders(tmp_path, tiny_model, 2)
    (plain[1] / "runs").mkdir()
    (plain[1] / "runs" / "events.log").write_text("not part of the model")  # not used: not hashed
    shutil.copytree(plain[0], tmp_path / "ours")  # one of our checkpoints among them
    write_manifest(tmp_path / "ours", kind="sft", inputs={}, params={}, metrics={})
    inputs = [str(p) for p in plain] + [str(tmp_path / "ours")]
    out = tmp_path / "merged"

    assert merge("--inputs", *inputs, "--out", out) == 2
    message = termination_log.read_text()
    assert message.startswith(f"invalid input: --inputs {plain[0]}: no {MANIFEST_NAME}")
    assert "--allow-unmanifested-inputs" in message and not out.joinpath(MANIFEST_NAME).exists()

    assert merge("--inputs", *inputs, "--out", out, "--allow-unmanifested-inputs") == 0
    manifest = verify_folder(out)
    assert manifest["inputs"]["models"] == inputs
    recorded = manifest["inputs"]["unmanifested"]
    assert sorted(recorded) == sorted(map(str, plain))  # the input with a manifest is not listed
    for folder in plain:
        entries = {e["path"]: e for e in recorded[str(folder)]}
        expected = sorted(p.name for p in folder.iterdir() if p.is_file())
        assert sorted(entries) == expected and "model.safetensors" in entries and "config.json" in entries
        for path, entry in entries.items():
            assert entry["sha256"] == sha256_of(folder / path) and entry["size"] == (folder / path).stat().st_size
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    sources = [AutoModelForCausalLM.from_pretrained(p).state_dict() for p in inputs]
    for name, value in merged.items():
        torch.testing.assert_close(value, sum(s[name] for s in sources) / 3, rtol=0, atol=1e-6)


def test_plain_model_folder_on_s3_merges_with_the_flag(tmp_path, s3_server, monkeypatch, termination_log, tiny_model):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    bucket = s3_server.make_bucket("merge-plain")
    plain = plain_hf_folders(tmp_path, tiny_model, 2)
    uris = [f"{bucket}/users/model-{i}" for i in range(2)]
    for folder, uri in zip(plain, uris, strict=True):
        for path in folder.iterdir():
            storage.write_bytes(storage.join(uri, path.name), path.read_bytes())
    out = f"{bucket}/merged"
    assert merge("--inputs", *uris, "--out", out) == 2
    assert "--allow-unmanifested-inputs" in termination_log.read_text()
    assert merge("--inputs", *uris, "--out", out, "--allow-unmanifested-inputs") == 0
    manifest = verify_folder(storage.download_dir(out, tmp_path / "dl"))
    for folder, uri in zip(plain, uris, strict=True):
        entries = {e["path"]: e["sha256"] for e in manifest["inputs"]["unmanifested"][uri]}
        assert entries == {p.name: sha256_of(p) for p in folder.iterdir()}

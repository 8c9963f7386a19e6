"""`mot-train merge --outer-*`: the DiLoCo-style outer step against float64 references of its
recurrences, the identity step bit-identical to a plain merge, the velocity state across rounds
(restart-safe, verified), and the option refusals (exit code 2, naming the flag)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mot_trainer import cli, storage
from mot_trainer.manifest import MANIFEST_NAME, verify_folder, write_manifest

pytestmark = pytest.mark.numerics

torch.set_num_threads(1)

SHAPES = {"a.weight": (7, 5), "a.bias": (11,), "b.weight": (3, 4, 2)}
FLOATS = list(SHAPES)
IDS = "pos.ids"  # a non-float tensor: copied from the first input, never stepped


def write_checkpoint(folder, tensors, *, manifest=True):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "test"}))
    if manifest:
        write_manifest(folder, kind="sft", inputs={}, params={}, metrics={})
    return str(folder)


def random_tensors(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(shape, generator=g).to(dtype) for name, shape in SHAPES.items()}
    tensors[IDS] = torch.arange(6, dtype=torch.int64) + seed
    return tensors


def branches(tmp_path, base, dtype, round_=1, k=3):
    """K branch checkpoints near `base` (a dict of tensors), as a round's SFT would leave them."""
    paths = []
    for i in range(k):
        delta = random_tensors(1000 * round_ + i, torch.float32)
        tensors = {n: (base[n].float() + 0.1 * delta[n]).to(dtype) for n in FLOATS}
        tensors[IDS] = base[IDS] + i
        paths.append(write_checkpoint(tmp_path / f"r{round_}-in{i}", tensors))
    return paths


def merge(*args):
    return cli.main(["merge", *map(str, args)])


def np64(t):
    return t.to(torch.float64).numpy()


def load(folder):
    return load_file(f"{folder}/model.safetensors")


def avg64(paths):
    tensors = [load(p) for p in paths]
    return {n: sum(np64(t[n]) for t in tensors) / len(tensors) for n in FLOATS}


def assert_close_to(out, expected, dtype, values):
    """Within the fp32 arithmetic's error (a few ulps of the largest value involved) plus, for a
    narrower dtype, the rounding of the output (one ulp of that dtype)."""
    atol = 8 * np.finfo(np.float32).eps * max(np.abs(v).max() for v in values)
    if dtype == torch.bfloat16:
        atol = atol + 2.0 ** (np.floor(np.log2(np.abs(expected) + 1e-30)) - 7)
    assert out.dtype == dtype
    np.testing.assert_array_less(np.abs(np64(out) - expected), atol + 1e-30)


@pytest.fixture
def termination_log(tmp_path, monkeypatch):
    path = tmp_path / "termination-log"
    monkeypatch.setenv("MOT_TERMINATION_LOG", str(path))
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_step_is_the_plain_merge_bit_for_bit(tmp_path, dtype):
    base = random_tensors(7, dtype)
    base_path = write_checkpoint(tmp_path / "base", base)
    paths = branches(tmp_path, base, dtype)
    assert merge("--inputs", *paths, "--out", tmp_path / "plain") == 0
    assert merge("--inputs", *paths, "--out", tmp_path / "outer", "--base", base_path,
                 "--outer-learning-rate", 1, "--outer-momentum", 0) == 0
    plain = (tmp_path / "plain" / "model.safetensors").read_bytes()
    assert (tmp_path / "outer" / "model.safetensors").read_bytes() == plain
    manifest = verify_folder(tmp_path / "outer")
    assert manifest["params"]["outer"] == {"learningRate": 1.0, "momentum": 0.0, "nesterov": False}
    assert "outer_state_out" not in manifest["inputs"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_without_momentum_moves_part_way_to_the_merge(tmp_path, dtype):
    base = random_tensors(7, dtype)
    base_path = write_checkpoint(tmp_path / "base", base, manifest=False)
    paths = branches(tmp_path, base, dtype)
    assert merge("--inputs", *paths, "--out", tmp_path / "out", "--base", base_path,
                 "--outer-learning-rate", 0.5) == 0
    out, avg = load(tmp_path / "out"), avg64(paths)
    for name in FLOATS:
        b = np64(base[name])
        expected = b + 0.5 * (avg[name] - b)
        assert_close_to(out[name], expected, dtype, [b, avg[name]])
    assert torch.equal(out[IDS], load(paths[0])[IDS])
    manifest = verify_folder(tmp_path / "out")
    assert manifest["params"]["outer"] == {"learningRate": 0.5, "momentum": 0.0, "nesterov": False}
    assert sorted(p.name for p in tmp_path.iterdir() if "state" in p.name) == []  # no state without momentum


def two_rounds(tmp_path, dtype, nesterov, eta=0.7, mu=0.9, extra=()):
    """Round 1 from a fresh base (no state in), round 2 from round 1's model and velocity."""
    flags = ["--outer-learning-rate", eta, "--outer-momentum", mu, *(["--outer-nesterov"] if nesterov else [])]
    theta0 = random_tensors(7, dtype)
    base_path = write_checkpoint(tmp_path / "theta0", theta0)
    r1 = branches(tmp_path, theta0, dtype, round_=1)
    assert merge("--inputs", *r1, "--base", base_path, "--out", tmp_path / "theta1", *flags,
                 "--outer-state-out", tmp_path / "state1", *extra) == 0
    theta1 = load(tmp_path / "theta1")
    r2 = branches(tmp_path, theta1, dtype, round_=2)
    args = ["--inputs", *r2, "--base", tmp_path / "theta1", "--out", tmp_path / "theta2", *flags,
            "--outer-state-in", tmp_path / "state1", "--outer-state-out", tmp_path / "state2", *extra]
    assert merge(*args) == 0
    return theta0, r1, r2, args


def load_state(folder):
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_rounds_with_momentum_follow_the_recurrences(tmp_path, termination_log, dtype, nesterov):
    eta, mu = 0.7, 0.9
    theta0, r1, r2, args = two_rounds(tmp_path, dtype, nesterov, eta, mu)

    # Round 1: v(1) = Δ(1); its state is a complete, verified folder of fp32 velocities.
    state1 = verify_folder(tmp_path / "state1")
    assert state1["kind"] == "outer-state"
    assert state1["params"] == {"learningRate": eta, "momentum": mu, "nesterov": nesterov}
    assert state1["inputs"] == {"models": r1, "base": str(tmp_path / "theta0"), "state_in": None}
    v1, theta1, avg1 = load_state(tmp_path / "state1"), load(tmp_path / "theta1"), avg64(r1)
    assert set(v1) == set(FLOATS)  # float tensors only
    for name in FLOATS:
        b = np64(theta0[name])
        delta = avg1[name] - b
        assert v1[name].dtype == torch.float32 and v1[name].shape == SHAPES[name]
        assert_close_to(v1[name], delta, torch.float32, [b, avg1[name]])
        step = delta + mu * delta if nesterov else delta
        assert_close_to(theta1[name], b + eta * step, dtype, [b, avg1[name], step])

    # Round 2 reads v(1): v(2) = μ·v(1) + Δ(2).
    v2, theta2, avg2 = load_state(tmp_path / "state2"), load(tmp_path / "theta2"), avg64(r2)
    for name in FLOATS:
        b, prev = np64(theta1[name]), np64(v1[name])
        delta = avg2[name] - b
        v = mu * prev + delta
        assert v2[name].dtype == torch.float32
        assert_close_to(v2[name], v, torch.float32, [b, avg2[name], prev])
        step = delta + mu * v if nesterov else v
        assert_close_to(theta2[name], b + eta * step, dtype, [b, avg2[name], prev, step])
    assert torch.equal(theta2[IDS], load(r2[0])[IDS])
    manifest = verify_folder(tmp_path / "theta2")
    assert manifest["params"]["outer"] == {"learningRate": eta, "momentum": mu, "nesterov": nesterov}
    assert manifest["inputs"]["outer_state_in"] == str(tmp_path / "state1")
    assert manifest["inputs"]["outer_state_out"] == str(tmp_path / "state2")
    assert verify_folder(tmp_path / "state2")["inputs"]["state_in"] == str(tmp_path / "state1")
    assert json.loads(termination_log.read_text())["inputs"] == 3


def test_rerun_gives_the_same_bytes_and_a_half_written_state_is_refused(tmp_path, termination_log):
    *_, args = two_rounds(tmp_path, torch.bfloat16, nesterov=True, extra=["--shard-size", "200B"])
    shards = sorted(p.name for p in (tmp_path / "state2").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "state2" / "model.safetensors.index.json").exists()

    def weights(folder):
        return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors*"))}

    before = weights(tmp_path / "theta2"), weights(tmp_path / "state2")
    (tmp_path / "theta2" / MANIFEST_NAME).unlink()  # as if the first attempt died before publishing
    assert merge(*args) == 0
    assert (weights(tmp_path / "theta2"), weights(tmp_path / "state2")) == before
    verify_folder(tmp_path / "theta2")
    verify_folder(tmp_path / "state2")

    (tmp_path / "state1" / MANIFEST_NAME).unlink()  # a state whose round never finished
    assert merge(*args) == 2
    message = termination_log.read_text()
    assert "--outer-state-in" in message and "incomplete" in message


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("a.bias"), "lacks tensor 'a.bias'"),
    (lambda t: t.update({"b.weight": torch.zeros(3, 4, 3)}), "tensor 'b.weight' is F32 [3, 4, 3]"),
    (lambda t: t.update({"a.weight": t["a.weight"].bfloat16()}), "tensor 'a.weight' is BF16"),
])
def test_a_state_that_does_not_match_the_model_is_refused(tmp_path, termination_log, change, message):
    base = random_tensors(7, torch.float32)
    base_path = write_checkpoint(tmp_path / "base", base)
    paths = branches(tmp_path, base, torch.float32)
    state = {n: torch.zeros(SHAPES[n]) for n in FLOATS}
    change(state)
    (tmp_path / "state").mkdir()
    save_file(state, str(tmp_path / "state" / "model.safetensors"))
    write_manifest(tmp_path / "state", kind="outer-state", inputs={}, params={}, metrics={})
    assert merge("--inputs", *paths, "--base", base_path, "--out", tmp_path / "out", "--outer-momentum", 0.5,
                 "--outer-state-in", tmp_path / "state", "--outer-state-out", tmp_path / "state2") == 2
    text = termination_log.read_text()
    assert "--outer-state-in" in text and message in text, text
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()

    # A complete folder that is not a velocity state (e.g. a model) is refused too.
    assert merge("--inputs", *paths, "--base", base_path, "--out", tmp_path / "out", "--outer-momentum", 0.5,
                 "--outer-state-in", base_path, "--outer-state-out", tmp_path / "state2") == 2
    assert "--outer-state-in" in termination_log.read_text()


@pytest.mark.parametrize("args, message", [
    (["--base", "BASE", "--outer-nesterov"], "--outer-nesterov"),
    (["--base", "BASE", "--outer-momentum", "1", "--outer-state-out", "STATE"], "--outer-momentum"),
    (["--base", "BASE", "--outer-momentum", "-0.1", "--outer-state-out", "STATE"], "--outer-momentum"),
    (["--base", "BASE", "--outer-momentum", "nan", "--outer-state-out", "STATE"], "--outer-momentum"),
    (["--base", "BASE", "--outer-learning-rate", "0"], "--outer-learning-rate"),
    (["--base", "BASE", "--outer-learning-rate", "-1"], "--outer-learning-rate"),
    (["--base", "BASE", "--outer-learning-rate", "inf"], "--outer-learning-rate"),
    (["--base", "BASE", "--outer-momentum", "0.9"], "--outer-state-out"),
    (["--base", "BASE", "--outer-learning-rate", "0.5", "--outer-state-out", "STATE"], "--outer-state-out"),
    (["--base", "BASE", "--outer-learning-rate", "0.5", "--outer-state-in", "STATE"], "--outer-state-in"),
    (["--outer-learning-rate", "0.5"], "--base"),
    (["--outer-momentum", "0.5", "--outer-state-out", "STATE"], "--base"),
    (["--base", "BASE", "--outer-momentum", "0.5", "--outer-state-out", "OUT"], "--outer-state-out"),
    (["--base", "BASE", "--outer-momentum", "0.5", "--outer-state-out", "BASE"], "--outer-state-out"),
    (["--base", "BASE", "--outer-momentum", "0.5", "--outer-state-in", "IN0", "--outer-state-out", "STATE"],
     "--outer-state-in"),
    (["--base", "BASE", "--outer-momentum", "0.5", "--outer-state-in", "STATE", "--outer-state-out", "STATE"],
     "--outer-state-out"),
])
def test_bad_outer_options_are_invalid_input(tmp_path, termination_log, args, message):
    base = random_tensors(7, torch.float32)
    names = {"BASE": write_checkpoint(tmp_path / "base", base), "STATE": str(tmp_path / "state"),
             "OUT": str(tmp_path / "out")}
    paths = branches(tmp_path, base, torch.float32, k=2)
    names["IN0"] = paths[0]
    args = [names.get(a, a) for a in args]
    assert merge("--inputs", *paths, "--out", tmp_path / "out", *args) == 2
    text = termination_log.read_text()
    assert text.startswith(f"invalid input: {message}"), text
    assert not (tmp_path / "state").exists() and not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_state_on_s3_is_staged_and_uploaded_before_the_model(tmp_path, s3_server, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MOT_TERMINATION_LOG", str(tmp_path / "term"))
    bucket = s3_server.make_bucket("outer-test")
    theta0 = random_tensors(7, torch.float32)
    base_path = write_checkpoint(tmp_path / "theta0", theta0)
    paths = branches(tmp_path, theta0, torch.float32)
    flags = ["--outer-learning-rate", 0.7, "--outer-momentum", 0.9, "--base", base_path, "--inputs", *paths]
    assert merge(*flags, "--out", f"{bucket}/r1/merged", "--outer-state-out", f"{bucket}/r1/state") == 0
    state = storage.download_dir(f"{bucket}/r1/state", tmp_path / "dl-state")
    assert load_state(state).keys() == set(FLOATS)
    # Round "2" from the same inputs with the state read back from s3, written locally: v = 1.9·Δ.
    assert merge(*flags, "--out", tmp_path / "out2", "--outer-state-in", f"{bucket}/r1/state",
                 "--outer-state-out", tmp_path / "state2") == 0, (tmp_path / "term").read_text()
    v1, v2, avg = load_state(state), load_state(tmp_path / "state2"), avg64(paths)
    for name in FLOATS:
        b = np64(theta0[name])
        assert_close_to(v2[name], 0.9 * np64(v1[name]) + avg[name] - b, torch.float32, [b, avg[name]])


@pytest.mark.parametrize("method", ["ties", "dare", "task-arithmetic"])
def test_outer_step_applies_to_any_method(tmp_path, method):
    """merged(t) is the method's result, whole-tensor methods included, whatever --threads."""
    base = random_tensors(7, torch.float32)
    base_path = write_checkpoint(tmp_path / "base", base)
    paths = branches(tmp_path, base, torch.float32)
    common = ["--method", method, "--base", base_path, "--inputs", *paths, "--threads", 3]
    assert merge(*common, "--out", tmp_path / "plain") == 0
    assert merge(*common, "--out", tmp_path / "outer", "--outer-learning-rate", 0.5) == 0
    plain, out = load(tmp_path / "plain"), load(tmp_path / "outer")
    for name in FLOATS:
        b, merged = np64(base[name]), np64(plain[name])
        assert_close_to(out[name], b + 0.5 * (merged - b), torch.float32, [b, merged])

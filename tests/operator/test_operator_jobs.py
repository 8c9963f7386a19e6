"""Job rendering: names, labels, env, failure policy, multi-node, Kueue, the preflight; every Job
validated offline against the Kubernetes API schema with kubernetes-validate."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import kubernetes_validate
import pytest

from mot_operator import naming
from mot_operator.jobs import OperatorConfig, render, render_cleanup_job, render_job, with_defaults
from mot_operator.planner import ObservedJob, RunRef, plan
from mot_operator.spec import parse_spec
from mot_trainer.storage import read_checkpoint_manifest

K8S_VERSION = "1.30.0"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
RUN = RunRef(namespace="team-a", name="demo", uid="1f0e-uid", generation=3)
CONFIG = OperatorConfig(default_image="registry.local/mot-trainer:test", default_storage_uri="s3://default",
                        default_storage_endpoint="http://s3.local:8333", default_credentials_secret="default-s3")


def spec_of(**overrides):
    spec = {"student": "s3://m/student", "teachers": [{"name": "a", "dataset": "s3://d/a"}],
            "storage": {"uri": "s3://ckpt", "credentialsSecret": "s3-keys", "endpoint": "http://minio:9000"}}
    spec.update(overrides)
    return parse_spec(spec)


def first_request(spec, run=RUN, stage="sft"):
    """The first request of `stage` the planner makes: the preflight's, or (once it passed) the first
    branch's."""
    status, jobs = {}, []
    for _ in range(2):
        result = plan(run, spec, status, jobs, T0)
        for req in result.create:
            if req.stage == stage:
                return req
        status = result.status
        jobs += [ObservedJob(r.name, r.stage, r.round, r.teacher, r.attempt, "Succeeded") for r in result.create]
    raise AssertionError(f"no {stage} request")


def validate(obj):
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def env_of(job):
    return {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_names_are_deterministic_dns_labels_hashed_when_long():
    assert naming.job_name("demo", 2, "sft", 1, "qwq") == "demo-r2-sft-qwq-a1"
    assert naming.job_name("demo", 2, "merge", 3) == "demo-r2-merge-a3"
    long_a = naming.job_name("x" * 60, 1, "sft", 1, "teacher-one")
    long_b = naming.job_name("x" * 60, 1, "sft", 1, "teacher-two")
    assert len(long_a) <= 63 and len(long_b) <= 63 and long_a != long_b
    assert DNS_LABEL.match(long_a) and long_a == naming.job_name("x" * 60, 1, "sft", 1, "teacher-one")
    with pytest.raises(ValueError):
        naming.job_name("demo", 1, "sft", 1)  # sft needs a teacher
    assert naming.service_name("1abc").startswith("j")
    assert len(naming.label_value("r" * 200)) <= 63


def test_job_metadata_labels_owner_and_output():
    job = render_job(first_request(spec_of()), spec_of(), RUN, CONFIG)
    validate(job)
    meta = job["metadata"]
    assert meta["name"] == "demo-r1-sft-a-a1" and meta["namespace"] == "team-a"
    assert meta["labels"] == {
        "mot.dev/run": "demo", "mot.dev/round": "1", "mot.dev/teacher": "a", "mot.dev/stage": "sft",
        "mot.dev/attempt": "1", "app.kubernetes.io/name": "mot-trainer", "app.kubernetes.io/instance": "demo",
        "app.kubernetes.io/component": "branch", "app.kubernetes.io/managed-by": "mot-operator",
        "app.kubernetes.io/part-of": "mot-operator",
    }
    assert job["spec"]["template"]["metadata"]["labels"] == meta["labels"]
    assert meta["ownerReferences"] == [{"apiVersion": "mot.dev/v1alpha1", "kind": "MoTRun", "name": "demo",
                                        "uid": "1f0e-uid", "controller": True, "blockOwnerDeletion": True}]
    assert meta["annotations"]["mot.dev/output"] == "s3://ckpt/team-a/demo/round-1/branch-a"


def test_container_command_env_and_security():
    spec = spec_of(image="my/trainer:1", serviceAccountName="trainer-sa")
    job = render_job(first_request(spec), spec, RUN, CONFIG)
    validate(job)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "my/trainer:1"
    assert container["command"] == ["mot-train"] and container["args"][0] == "sft"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    env = env_of(job)
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "s3-keys", "key": "AWS_ACCESS_KEY_ID"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-keys"
    assert env["AWS_REGION"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000"
    assert env["MOT_S3_PATH_STYLE"]["value"] == "true"
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "trainer-sa"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert "nvidia.com/gpu" not in str(container["resources"])


def test_branch_jobs_expose_trainer_metrics_for_the_pod_monitor():
    spec = spec_of()
    job = render_job(first_request(spec), spec, RUN, CONFIG)
    container = job["spec"]["template"]["spec"]["containers"][0]
    port = container["args"][container["args"].index("--metrics-port") + 1]
    assert container["ports"] == [{"name": "metrics", "containerPort": int(port)}]
    from mot_trainer.sft import add_arguments  # the trainer really takes the flag

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(container["args"][1:]).metrics_port == int(port)


def test_operator_defaults_fill_what_the_spec_leaves_unset():
    raw = {"student": "s", "teachers": [{"name": "a", "dataset": "d"}]}
    spec = parse_spec(with_defaults(raw, CONFIG))
    assert spec.storage.uri == "s3://default"
    job = render_job(first_request(spec), spec, RUN, CONFIG)
    env = env_of(job)
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/mot-trainer:test"
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://s3.local:8333"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "default-s3"
    assert raw == {"student": "s", "teachers": [{"name": "a", "dataset": "d"}]}  # not mutated


def test_failure_policy_backoff_deadline_ttl():
    spec = spec_of(activeDeadlineSeconds=3600, ttlSecondsAfterFinished=600)
    job = render_job(first_request(spec), spec, RUN, CONFIG)
    validate(job)
    js = job["spec"]
    assert js["backoffLimit"] == 0
    ignore, fail = js["podFailurePolicy"]["rules"]
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert fail == {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]}}
    assert js["activeDeadlineSeconds"] == 3600 and js["ttlSecondsAfterFinished"] == 600
    assert "suspend" not in js


def test_gpu_resources_scheduling_and_shared_memory():
    spec = spec_of(resources={"branch": {
        "gpus": 4, "cpu": "16", "memory": "128Gi", "priorityClassName": "high",
        "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}})
    job = render_job(first_request(spec), spec, RUN, CONFIG)
    validate(job)
    pod = job["spec"]["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "4" and res["requests"]["cpu"] == "16"
    assert res["limits"]["memory"] == "128Gi"
    assert pod["priorityClassName"] == "high" and pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])


def test_multinode_branch_is_an_indexed_job_with_headless_service_and_torchrun_env():
    spec = spec_of(resources={"branch": {"nodes": 3, "gpus": 8}})
    req = first_request(spec)
    service, job = render(req, spec, RUN, CONFIG)
    validate(service)
    validate(job)
    js = job["spec"]
    assert js["completionMode"] == "Indexed" and js["completions"] == 3 and js["parallelism"] == 3
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": req.name}
    assert js["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    env = env_of(job)
    assert env["MASTER_ADDR"]["value"] == f"{req.name}-0.{service['metadata']['name']}.team-a.svc"
    assert env["NNODES"]["value"] == "3" and env["PET_NNODES"]["value"] == "3"
    assert env["NPROC_PER_NODE"]["value"] == "8" and env["WORLD_SIZE"]["value"] == "24"
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][0] == "torchrun"


@pytest.mark.parametrize(("role", "gpus", "nodes", "command"), [
    ("branch", 0, 1, ["mot-train"]),
    ("branch", 1, 1, ["mot-train"]),
    ("branch", 8, 1, ["torchrun", "--standalone", "--nproc-per-node", "8", "--module", "mot_trainer.cli"]),
    ("branch", 8, 2, ["torchrun", "--module", "mot_trainer.cli"]),
    ("merge", 2, 1, ["mot-train"]),  # merge and eval are one process whatever they are given
    ("eval", 2, 1, ["mot-train"]),
])
def test_a_branch_starts_one_process_per_gpu(role, gpus, nodes, command):
    spec = spec_of(resources={role: {"gpus": gpus, "nodes": nodes}}, evaluation={"dataset": "s3://d/eval"})
    stage = {"branch": "sft", "merge": "merge", "eval": "eval"}[role]
    requests, status, jobs = {}, {}, []
    for _ in range(4):  # preflight, branch, merge, eval
        result = plan(RUN, spec, status, jobs, T0)
        requests.update({r.stage: r for r in result.create})
        status = result.status
        jobs += [ObservedJob(r.name, r.stage, r.round, r.teacher, r.attempt, "Succeeded") for r in result.create]
    job = render(requests[stage], spec, RUN, CONFIG)[-1]
    validate(job)
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == command
    assert render(requests["preflight"], spec, RUN, CONFIG)[-1]["spec"]["template"]["spec"]["containers"][0][
        "command"] == ["mot-train"]


def test_the_rendered_two_gpu_branch_command_trains_with_two_processes(tiny_model, tiny_data, tmp_path):
    """The container command and args of a `gpus: 2` branch, run as written (torchrun from this venv,
    on CPU: DDP over gloo): both processes train, the checkpoint says 2 processes."""
    spec = spec_of(student=str(tiny_model), teachers=[{"name": "a", "dataset": str(tiny_data)}],
                   storage={"uri": str(tmp_path / "ckpt")}, resources={"branch": {"gpus": 2}},
                   training={"steps": 2, "microBatchSize": 2, "gradAccum": 1, "maxSeqLength": 128, "threads": 1})
    job = render_job(first_request(spec), spec, RUN, CONFIG)
    container = job["spec"]["template"]["spec"]["containers"][0]
    argv = list(container["command"]) + list(container["args"])
    argv[0] = str(Path(sys.executable).with_name("torchrun"))
    argv[argv.index("--metrics-port") + 1] = "0"  # 0: no metrics server (tests may run side by side)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = argv[argv.index("--out") + 1]
    manifest = read_checkpoint_manifest(out)
    assert manifest["params"]["processes"] == 2 and manifest["metrics"]["steps"] == 2


def test_kueue_queue_label_and_created_suspended():
    spec = spec_of(queueName="gpu-queue")
    job = render_job(first_request(spec), spec, RUN, CONFIG)
    validate(job)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["suspend"] is True


def test_every_job_of_a_full_run_validates():
    spec = spec_of(evaluation={"dataset": "s3://d/e"}, merge={"method": "dare"}, rounds=1,
                   teachers=[{"name": n, "dataset": f"s3://d/{n}"} for n in ("qwq", "deepseek-r1")])
    status, jobs = {}, []

    rendered = []
    for _ in range(7):
        result = plan(RUN, spec, status, jobs, T0)
        status = result.status
        for req in result.create:
            rendered += render(req, spec, RUN, CONFIG)
            jobs.append(ObservedJob(req.name, req.stage, req.round, req.teacher, req.attempt, "Succeeded"))
    assert [o["metadata"]["labels"]["mot.dev/stage"] for o in rendered] == [
        "preflight", "eval", "sft", "sft", "merge", "eval"]  # the first eval: round 0, the student
    for obj in rendered:
        validate(obj)
        assert len(obj["metadata"]["name"]) <= 63 and DNS_LABEL.match(obj["metadata"]["name"])


def test_cleanup_job_deletes_the_runs_checkpoints(tmp_path):
    root = tmp_path / "ckpt"
    spec = spec_of(storage={"uri": str(root), "cleanup": True}, queueName="q")
    job = render_cleanup_job(spec, RUN, CONFIG)
    validate(job)
    assert "ownerReferences" not in job["metadata"]  # it outlives the deleted MoTRun
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "cleanup"
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"] and "suspend" not in job["spec"]
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python"] and container["args"][-1] == str(root / "team-a" / "demo")
    # Run the container's program for real on a local checkpoint tree.
    mine = root / "team-a" / "demo" / "round-1" / "merged"
    other = root / "team-a" / "demo-2" / "round-1" / "merged"
    for folder in (mine, other):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"x" * 10)
    subprocess.run([sys.executable, *container["args"]], check=True, capture_output=True)
    assert not (mine / "model.safetensors").exists()
    assert (other / "model.safetensors").exists()  # another run's checkpoints are untouched


def test_cleanup_job_is_a_small_pod_whatever_the_roles_ask():
    """Deleting objects in S3 needs no GPU: not the merge role's GPUs, node selector or priority."""
    spec = spec_of(storage={"uri": "s3://ckpt", "cleanup": True}, resources={"merge": {
        "gpus": 8, "cpu": "32", "memory": "512Gi", "priorityClassName": "gpu-high",
        "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}})
    job = render_cleanup_job(spec, RUN, CONFIG)
    validate(job)
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"},
                                                 "limits": {"memory": "256Mi"}}
    assert "nodeSelector" not in pod and "priorityClassName" not in pod
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert [v["name"] for v in pod["volumes"]] == ["scratch"]  # no GPU shared-memory volume


def test_a_run_created_again_under_its_name_gets_its_own_cleanup_job():
    spec = spec_of(storage={"uri": "s3://ckpt", "cleanup": True})
    names = {render_cleanup_job(spec, RunRef(RUN.namespace, RUN.name, uid, 1), CONFIG)["metadata"]["name"]
             for uid in ("0f9e8d7c-aaaa", "1a2b3c4d-bbbb")}
    assert len(names) == 2 and all(n.startswith(f"{RUN.name}-cleanup-") for n in names), names


def test_preflight_job_name_and_report_location():
    assert naming.job_name("demo", 0, "preflight", 2) == "demo-preflight-a2"
    long_name = naming.job_name("x" * 60, 0, "preflight", 1)
    assert len(long_name) <= 63 and DNS_LABEL.match(long_name)
    with pytest.raises(ValueError):
        naming.job_name("demo", 0, "preflight", 1, "a")  # a teacher only for sft
    assert naming.preflight_uri("s3://ckpt", "team-a", "demo") == "s3://ckpt/team-a/demo/preflight.json"


def test_preflight_job_is_a_small_cpu_pod_running_mot_train_preflight():
    spec = spec_of(preflight={"cpu": "2", "memory": "8Gi", "maxTruncatedFraction": 0.2},
                   evaluation={"dataset": "s3://d/e"}, serviceAccountName="trainer-sa",
                   resources={"branch": {"gpus": 8, "cpu": "64", "memory": "512Gi"},
                              "merge": {"gpus": 1, "priorityClassName": "gpu-high", "nodeSelector": {"gpu": "h100"},
                                        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                         "effect": "NoSchedule"}]}})
    req = first_request(spec, stage="preflight")
    job = render_job(req, spec, RUN, CONFIG)
    validate(job)
    meta = job["metadata"]
    assert meta["name"] == "demo-preflight-a1"
    assert meta["labels"] == {
        "mot.dev/run": "demo", "mot.dev/round": "0", "mot.dev/stage": "preflight", "mot.dev/attempt": "1",
        "app.kubernetes.io/name": "mot-trainer", "app.kubernetes.io/instance": "demo",
        "app.kubernetes.io/component": "preflight", "app.kubernetes.io/managed-by": "mot-operator",
        "app.kubernetes.io/part-of": "mot-operator",
    }
    assert meta["annotations"]["mot.dev/output"] == "s3://ckpt/team-a/demo/preflight.json"
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["mot-train"]
    assert container["args"] == req.args and "--metrics-port" not in container["args"]
    assert "ports" not in container  # nothing for the PodMonitor to scrape
    assert container["resources"] == {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "8Gi"}}
    assert "nvidia.com/gpu" not in str(container["resources"])
    assert "nodeSelector" not in pod and "priorityClassName" not in pod
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert [v["name"] for v in pod["volumes"]] == ["scratch"]  # no GPU shared-memory volume
    assert pod["serviceAccountName"] == "trainer-sa"
    env = env_of(job)  # the storage probe writes with the run's credentials
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "s3-keys", "key": "AWS_ACCESS_KEY_ID"}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000"
    # Exit code 2 (invalid input) fails the Job at once, as for every stage.
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["podFailurePolicy"]["rules"][1]["onExitCodes"]["values"] == [2]
    from mot_trainer.preflight import add_arguments  # the trainer really takes these arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(container["args"][1:])
    assert args.student == "s3://m/student" and args.teachers == ["a=s3://d/a"]
    assert args.max_seq_length == 4096 and args.max_truncated_fraction == pytest.approx(0.2)
    assert args.storage == "s3://ckpt/team-a/demo" and args.out == "s3://ckpt/team-a/demo/preflight.json"
    assert args.eval_data == "s3://d/e"


def test_preflight_resources_default_to_one_cpu_and_4gi():
    spec = spec_of()
    job = render_job(first_request(spec, stage="preflight"), spec, RUN, CONFIG)
    validate(job)
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}


def test_preflight_job_is_never_queued_through_kueue():
    """A bad run should fail at once, not wait for GPU quota: no queue label, not created suspended."""
    spec = spec_of(queueName="gpu-queue")
    preflight = render_job(first_request(spec, stage="preflight"), spec, RUN, CONFIG)
    validate(preflight)
    assert "kueue.x-k8s.io/queue-name" not in preflight["metadata"]["labels"]
    assert "kueue.x-k8s.io/queue-name" not in preflight["spec"]["template"]["metadata"]["labels"]
    assert "suspend" not in preflight["spec"]
    branch = render_job(first_request(spec), spec, RUN, CONFIG)  # the branches of the same run are
    assert branch["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert branch["spec"]["suspend"] is True

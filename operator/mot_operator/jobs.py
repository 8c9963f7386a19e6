"""Render the batch/v1 Job (and, for multi-node branches, the headless Service) of a JobRequest."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from . import naming
from .contract import EXIT_INVALID_INPUT, TRAINER_METRICS_PORT
from .planner import JobRequest, RunRef
from .spec import API_VERSION, KIND, MoTRunSpec, RoleResources

CONTAINER = "trainer"
RENDEZVOUS_PORT = 29500
UID = 65532  # the trainer image's user (Dockerfile)
ANNOTATION_OUTPUT = "mot.dev/output"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


@dataclass(frozen=True)
class OperatorConfig:
    """Operator-wide settings and defaults for what a MoTRun leaves unset (flags/env of `mot operator`)."""

    default_image: str = "ghcr.io/mot-operator/mot-trainer:0.1.0"
    default_storage_uri: str | None = None
    default_storage_endpoint: str | None = None
    default_credentials_secret: str | None = None
    # How often a training branch's progress is read from its Pod (so, at most, how often progress
    # changes a MoTRun's status): `mot operator --progress-interval`.
    progress_interval_seconds: float = 15.0
    # Read the GPUs' memory from the nodes' nvidia.com/gpu.memory labels (NVIDIA GPU Feature Discovery),
    # listed at most once per gpu_memory_refresh_seconds, for the preflight's memory check.
    gpu_memory_from_node_labels: bool = True
    gpu_memory_refresh_seconds: float = 60.0


def with_defaults(spec_dict: dict, config: OperatorConfig) -> dict:
    """The spec with the operator's storage defaults filled in where the MoTRun has none."""
    spec_dict = copy.deepcopy(spec_dict)
    storage = spec_dict.setdefault("storage", {})
    for key, value in (("uri", config.default_storage_uri), ("endpoint", config.default_storage_endpoint),
                       ("credentialsSecret", config.default_credentials_secret)):
        if value and not storage.get(key):
            storage[key] = value
    if not storage:
        del spec_dict["storage"]
    return spec_dict


def owner_reference(run: RunRef) -> dict:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": run.name, "uid": run.uid,
            "controller": True, "blockOwnerDeletion": True}


def _env(spec: MoTRunSpec, config: OperatorConfig) -> list[dict]:
    env = [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HOME", "value": "/tmp/hf"},
           {"name": "TMPDIR", "value": "/tmp"},
           {"name": "MOT_S3_PATH_STYLE", "value": "true" if spec.storage.path_style else "false"}]
    endpoint = spec.storage.endpoint or config.default_storage_endpoint
    if endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": endpoint})
    secret = spec.storage.credentials_secret or config.default_credentials_secret
    if secret:
        for key, optional in (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False), ("AWS_REGION", True)):
            ref = {"name": secret, "key": key}
            if optional:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env


def _multinode_env(job: str, namespace: str, resources: RoleResources) -> list[dict]:
    """torchrun reads PET_*; accelerate and hand-written launchers read the plain names."""
    master = f"{job}-0.{naming.service_name(job)}.{namespace}.svc"
    nproc = str(max(resources.gpus, 1))
    env = []
    for prefix in ("", "PET_"):
        env += [
            {"name": f"{prefix}MASTER_ADDR", "value": master},
            {"name": f"{prefix}MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
            {"name": f"{prefix}NNODES", "value": str(resources.nodes)},
            {"name": f"{prefix}NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
            {"name": f"{prefix}NPROC_PER_NODE", "value": nproc},
        ]
    env.append({"name": "WORLD_SIZE", "value": str(resources.nodes * int(nproc))})
    return env


def _resources(resources: RoleResources) -> dict:
    requests, limits = {}, {}
    if resources.cpu:
        requests["cpu"] = resources.cpu
    if resources.memory:
        requests["memory"] = limits["memory"] = resources.memory
    if resources.gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(resources.gpus)
    out = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def launcher(request: JobRequest) -> list[str]:
    """The container command: one trainer process per GPU for a branch with more than one GPU
    (torchrun; accelerate then runs DDP, and sees every rank), else plain `mot-train`.

    Multi-node branches take their rendezvous from the PET_* environment (_multinode_env); a single
    node needs none (--standalone)."""
    res = request.resources
    if request.stage != "sft" or (res.nodes <= 1 and res.gpus <= 1):
        return ["mot-train"]
    if res.nodes > 1:
        return ["torchrun", "--module", "mot_trainer.cli"]
    return ["torchrun", "--standalone", "--nproc-per-node", str(res.gpus), "--module", "mot_trainer.cli"]


def render_job(request: JobRequest, spec: MoTRunSpec, run: RunRef, config: OperatorConfig) -> dict:
    res = request.resources
    multinode = request.stage == "sft" and res.nodes > 1
    labels = naming.job_labels(run.name, request.round, request.stage, request.attempt, request.teacher)
    job_meta_labels = dict(labels)
    # The preflight is one small CPU Pod that should fail a bad run at once, not wait in the GPU
    # queue: Kueue leaves a Job without its queue label alone.
    queued = bool(spec.queue_name) and request.stage != "preflight"
    if queued:
        job_meta_labels[naming.LABEL_QUEUE] = spec.queue_name

    env = _env(spec, config)
    if multinode:
        env += _multinode_env(request.name, run.namespace, res)
    command = launcher(request)
    volumes = [{"name": "scratch", "emptyDir": {}}]
    mounts = [{"name": "scratch", "mountPath": "/tmp"}]
    if res.gpus:
        # NCCL and data loaders need more shared memory than the container default.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})

    container = {
        "name": CONTAINER,
        "image": spec.image or config.default_image,
        "command": command,
        "args": list(request.args),
        "env": env,
        "resources": _resources(res),
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    ports = []
    if request.stage == "sft":
        # Live mot_trainer_* metrics for the chart's PodMonitor (port name "metrics"); the planner put
        # `--metrics-port` in the branch's arguments (contract.sft_args).
        ports.append({"name": "metrics", "containerPort": TRAINER_METRICS_PORT})
    if multinode:
        ports.append({"name": "rendezvous", "containerPort": RENDEZVOUS_PORT})
    if ports:
        container["ports"] = ports
    pod_spec = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": volumes,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
    }
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in res.tolerations]
    if multinode:
        pod_spec["subdomain"] = naming.service_name(request.name)

    job_spec = {
        "backoffLimit": 0,  # retries are new attempts (new Jobs) decided by the planner
        "podFailurePolicy": {"rules": [
            # Preemption/eviction/node drain is not the trainer's fault: do not count it.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            # Invalid input: fail at once, the planner never retries it.
            {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                  "values": [EXIT_INVALID_INPUT]}},
        ]},
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    if multinode:
        job_spec.update(completionMode="Indexed", completions=res.nodes, parallelism=res.nodes)
    if queued:
        job_spec["suspend"] = True  # Kueue admits the Job by unsuspending it
    if spec.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished

    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": request.name,
            "namespace": run.namespace,
            "labels": job_meta_labels,
            "annotations": {ANNOTATION_OUTPUT: request.output_uri},
            "ownerReferences": [owner_reference(run)],
        },
        "spec": job_spec,
    }


def render_service(request: JobRequest, run: RunRef) -> dict | None:
    """Headless Service giving a multi-node Job's Pods stable DNS names (rank 0 is the master)."""
    if request.stage != "sft" or request.resources.nodes <= 1:
        return None
    labels = naming.job_labels(run.name, request.round, request.stage, request.attempt, request.teacher)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": naming.service_name(request.name), "namespace": run.namespace,
                     "labels": labels, "ownerReferences": [owner_reference(run)]},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": {naming.LABEL_JOB_NAME: request.name},
                 "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}]},
    }


# Runs in the trainer image (which holds mot_trainer.storage); argv[1] is the run's checkpoint root.
CLEANUP_CODE = (
    "import sys\n"
    "from mot_trainer import storage\n"
    "root = sys.argv[1]\n"
    "keys = storage.list_keys(root)\n"
    "for key in keys:\n"
    "    storage.delete(storage.join(root, key))\n"
    "print(f'deleted {len(keys)} objects under {root}')\n"
)
CLEANUP_TTL_SECONDS = 3600
# Listing and deleting objects with boto3 peaks around 50 MB; no GPU.
CLEANUP_CPU = "100m"
CLEANUP_MEMORY = "256Mi"


def cleanup_resources(spec: MoTRunSpec) -> RoleResources:
    """A small fixed request for the cleanup Pod, whatever the run's roles ask: it only talks to S3.

    No GPUs, no node selector and no priority class (those pin the roles to GPU nodes and their
    budget); the merge role's tolerations are kept, as they only widen where the Pod may run (a
    cluster whose nodes all carry a GPU taint still fits it)."""
    return RoleResources(cpu=CLEANUP_CPU, memory=CLEANUP_MEMORY, tolerations=spec.resources.merge.tolerations)


def render_cleanup_job(spec: MoTRunSpec, run: RunRef, config: OperatorConfig) -> dict:
    """A Job deleting the run's checkpoints (spec.storage.cleanup), created when the MoTRun is deleted.

    It has no owner reference (its owner is going away) and no Kueue label (it is tiny); the TTL
    controller removes it after it finishes."""
    root = naming.run_uri(spec.storage.uri, run.namespace, run.name)
    # The MoTRun's uid in the name: a run deleted, created again under its name and deleted again
    # within the old Job's TTL gets its own cleanup (an old Job of that name would count as done).
    name = naming.shorten(f"{run.name}-cleanup-{run.uid[:8]}".rstrip("-"))
    request = JobRequest(name=name, stage="cleanup", round=0, teacher=None,
                         attempt=1, args=["-c", CLEANUP_CODE, root], output_uri=root,
                         resources=cleanup_resources(spec))
    job = render_job(request, spec, run, config)
    meta = job["metadata"]
    del meta["ownerReferences"]
    labels = naming.run_labels(run.name)
    labels["app.kubernetes.io/component"] = "cleanup"
    meta["labels"] = labels
    job["spec"]["template"]["metadata"]["labels"] = dict(labels)
    job["spec"].pop("suspend", None)
    job["spec"]["backoffLimit"] = 2
    job["spec"]["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished or CLEANUP_TTL_SECONDS
    job["spec"]["template"]["spec"]["containers"][0]["command"] = ["python"]
    return job


def render(request: JobRequest, spec: MoTRunSpec, run: RunRef, config: OperatorConfig) -> list[dict]:
    """Everything to create for a request, Service first."""
    service = render_service(request, run)
    return ([service] if service else []) + [render_job(request, spec, run, config)]

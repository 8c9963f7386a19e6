"""Render what runs a JobRequest: a batch/v1 Job; for a multi-node branch either an Indexed Job and
its headless Service, or a JobSet (sigs.k8s.io/jobset) holding that Indexed Job.

A multi-node branch is one gang, whatever runs it: any Pod failing or disrupted ends the whole
attempt (backoffLimit 0; a DisruptionTarget fails the Job instead of replacing the Pod). A JobSet then
recreates every Pod itself after a disruption (BlockingRecreate: all old Pods gone first); for a plain
Job the planner starts the next attempt once every Pod of the last one is gone."""

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
JOBSET_API_VERSION = "jobset.x-k8s.io/v1alpha2"
JOBSET_REPLICATED_JOB = "node"  # the JobSet's one replicated Job: its Indexed Job's Pods are the nodes
# The Job controller's words when a podFailurePolicy rule ends a Job (pkg/controller/job): what tells a
# disruption from invalid input in the Job's Failed condition, and what the JobSet's rules match.
DISRUPTION_FAILURE = "condition DisruptionTarget matching FailJob rule"
INVALID_INPUT_FAILURE = f"exit code {EXIT_INVALID_INPUT} matching FailJob rule"


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
    # Run multi-node branches as JobSets where the cluster serves them (`mot operator --jobset`; the
    # chart's jobset.enabled, which also grants the RBAC): spec.resources.branch.backend auto/jobset.
    jobset: bool = False


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


def leader_address(request: JobRequest, namespace: str) -> str:
    """DNS name of rank 0's Pod: `<hostname>.<subdomain>.<namespace>.svc`, the hostname an Indexed
    Job gives its Pod 0 (`<job>-0`), or a JobSet its first Pod (`<jobset>-<replicated job>-0-0`)."""
    subdomain = naming.service_name(request.name)
    if request.kind == "JobSet":
        return f"{request.name}-{JOBSET_REPLICATED_JOB}-0-0.{subdomain}.{namespace}.svc"
    return f"{request.name}-0.{subdomain}.{namespace}.svc"


def _multinode_env(master: str, resources: RoleResources) -> list[dict]:
    """torchrun reads PET_*; accelerate and hand-written launchers read the plain names."""
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
        env += _multinode_env(leader_address(request, run.namespace), res)
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
    if multinode and request.kind != "JobSet":  # a JobSet sets its Pods' hostname and subdomain itself
        pod_spec["subdomain"] = naming.service_name(request.name)

    job_spec = {
        "backoffLimit": 0,  # retries are new attempts (new Jobs) decided by the planner
        "podFailurePolicy": {"rules": [
            # Preemption/eviction/node drain is not the trainer's fault: not counted. A lone Pod is
            # replaced; a gang's other ranks would wait in a collective for the replacement until they
            # time out, so the whole attempt ends (observe.py tells it from a failure by these words).
            {"action": "FailJob" if multinode else "Ignore",
             "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
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


def render_jobset(request: JobRequest, spec: MoTRunSpec, run: RunRef, config: OperatorConfig) -> dict:
    """A JobSet running a multi-node branch's Indexed Job as its one replicated Job.

    The JobSet carries what the Job would (labels, Kueue's queue label and suspension, output
    annotation, owner, TTL); its Job only the gang's spec, unlabelled, so the operator watches the
    JobSet, not its Job. The JobSet gives the Pods their DNS names (its own headless Service), and its
    failure policy: invalid input fails it at once; a disruption restarts the whole group in place,
    every old Pod gone before the new ones start, not counted; any other failure fails it too (no
    restarts of its own), and the planner retries it as a new attempt counted against maxRetries."""
    job = render_job(request, spec, run, config)
    job_spec = job["spec"]
    suspend = job_spec.pop("suspend", False)
    ttl = job_spec.pop("ttlSecondsAfterFinished", None)
    body = {
        "apiVersion": JOBSET_API_VERSION,
        "kind": "JobSet",
        "metadata": job["metadata"],
        "spec": {
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True,
                        "subdomain": naming.service_name(request.name)},
            "failurePolicy": {"maxRestarts": 0, "restartStrategy": "BlockingRecreate", "rules": [
                {"name": "invalid_input", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"],
                 "onJobFailureMessagePatterns": [INVALID_INPUT_FAILURE]},
                {"name": "disruption", "action": "RestartJobSetAndIgnoreMaxRestarts",
                 "onJobFailureReasons": ["PodFailurePolicy"], "onJobFailureMessagePatterns": [DISRUPTION_FAILURE]},
            ]},
            "replicatedJobs": [{"name": JOBSET_REPLICATED_JOB, "replicas": 1, "template": {"spec": job_spec}}],
        },
    }
    if suspend:
        body["spec"]["suspend"] = True
    if ttl is not None:
        body["spec"]["ttlSecondsAfterFinished"] = ttl
    return body


def render(request: JobRequest, spec: MoTRunSpec, run: RunRef, config: OperatorConfig) -> list[dict]:
    """Everything to create for a request, Service first."""
    if request.kind == "JobSet":
        return [render_jobset(request, spec, run, config)]
    service = render_service(request, run)
    return ([service] if service else []) + [render_job(request, spec, run, config)]

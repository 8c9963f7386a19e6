"""What a run's Pods say, read from their bodies (pure functions): why a Job's Pods are not running,
what ended them (termination message, OOM kill, eviction), which were disrupted, and where the
trainer's progress is served. The controller keeps a small snapshot of each Pod (`snapshot`) in a
watch-fed index; these functions read snapshots and full bodies alike."""

from __future__ import annotations

from . import jobs as jobrender
from . import naming
from .planner import MESSAGE_LIMIT

COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
# A container waiting for one of these will not start by itself (as the kubelet names them).
STUCK_CONTAINER_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                           "CrashLoopBackOff", "CreateContainerConfigError", "CreateContainerError",
                           "RunContainerError")
# DisruptionTarget reasons (k8s.io/api/core/v1) -> the word a user knows.
DISRUPTION_REASONS = {"PreemptionByScheduler": "Preempted", "EvictionByEvictionAPI": "Evicted",
                      "TerminationByKubelet": "Evicted", "DeletionByTaintManager": "Evicted",
                      "DeletionByPodGC": "Evicted"}


def snapshot(body: dict) -> dict:
    """The part of a Pod body the controller reads (kept per Pod in memory, so small)."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    container = _trainer_container(spec.get("containers") or [])
    return {
        "metadata": {"name": meta.get("name", ""), "labels": dict(meta.get("labels") or {}),
                     "annotations": {k: v for k, v in (meta.get("annotations") or {}).items() if k == COMPLETION_INDEX},
                     **({"deletionTimestamp": meta["deletionTimestamp"]} if meta.get("deletionTimestamp") else {})},
        "spec": {"containers": [{"name": container.get("name"),
                                 "ports": [dict(p) for p in container.get("ports") or []],
                                 "resources": {"limits": dict((container.get("resources") or {}).get("limits") or {})}}]
                 if container else []},
        "status": {key: plain(status[key]) for key in ("phase", "reason", "message", "podIP", "startTime",
                                                        "conditions", "containerStatuses") if key in status},
    }


def plain(value):
    """A plain copy of a Kopf body or index value (those are read-only mappings)."""
    if hasattr(value, "items"):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def _trainer_container(containers: list) -> dict:
    for container in containers:
        if container.get("name") == jobrender.CONTAINER:
            return container
    return containers[0] if containers else {}


def job_of(pod: dict) -> str | None:
    """The name of what runs the Pod for the operator: its JobSet (a multi-node branch run by JobSet),
    else its Job."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return labels.get(naming.LABEL_JOBSET_NAME) or labels.get(naming.LABEL_JOB_NAME)


def _container_status(pod: dict) -> dict:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for cs in statuses:
        if cs.get("name") == jobrender.CONTAINER or len(statuses) == 1:
            return cs
    return {}


def _condition(pod: dict, kind: str) -> dict | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return None


def terminal(pod: dict) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def running(pod: dict) -> bool:
    return (pod.get("status") or {}).get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp")


def termination(pod: dict) -> dict | None:
    """The trainer container's terminated state: exit code, kubelet reason and message."""
    cs = _container_status(pod)
    term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
    if not term:
        return None
    return {"exit_code": term.get("exitCode"), "reason": term.get("reason") or "",
            "message": (term.get("message") or "").strip(), "finished_at": term.get("finishedAt") or "",
            "pod": (pod.get("metadata") or {}).get("name", "")}


def failure_cause(pods: list[dict]) -> tuple[str, str] | None:
    """(reason, message) when Kubernetes names why a Pod failed: the kubelet's OOM kill or eviction."""
    for pod in pods:
        status = pod.get("status") or {}
        term = termination(pod)
        if term and term["reason"] == "OOMKilled":
            limit = _memory_limit(pod)
            within = f" ({limit})" if limit else ""
            return "OOMKilled", (f"OOMKilled: the trainer container of Pod {pod['metadata']['name']} used more "
                                 f"than its memory limit{within} and was killed (exit code {term['exit_code']})")
        if status.get("phase") == "Failed" and status.get("reason") == "Evicted":
            return "Evicted", f"Evicted: Pod {pod['metadata']['name']}: {status.get('message') or 'evicted'}"
    return None


def _memory_limit(pod: dict) -> str | None:
    containers = (pod.get("spec") or {}).get("containers") or []
    container = _trainer_container(containers)
    return ((container.get("resources") or {}).get("limits") or {}).get("memory")


def disruption(pod: dict) -> dict | None:
    """{"pod", "reason", "message"} when Kubernetes marked the Pod for a disruption (preemption,
    eviction): the Job's podFailurePolicy ignores those, so it is replaced and not a failed attempt."""
    cond = _condition(pod, "DisruptionTarget")
    if not cond or cond.get("status") != "True":
        return None
    why = cond.get("reason") or ""
    return {"pod": pod["metadata"]["name"], "reason": DISRUPTION_REASONS.get(why, "Disrupted"),
            "message": f"{why}: {cond.get('message') or ''}".strip(": ")[:MESSAGE_LIMIT]}


def waiting(pods: list[dict]) -> dict | None:
    """Why none of a Job's Pods runs: {"reason", "message"} from the scheduler's or the kubelet's
    words; the most telling of its Pods (a stuck one over one that is starting)."""
    live = [p for p in pods if not terminal(p) and not p["metadata"].get("deletionTimestamp")]
    if any(running(p) for p in live):
        return None
    found = [_why_waiting(p) for p in live]
    for why in found:
        if why["reason"] in STUCK_CONTAINER_REASONS or why["reason"] == "Unschedulable":
            return why
    if found:
        return found[0]
    return {"reason": "PodPending", "message": "the Job has no running Pod yet"}


def _why_waiting(pod: dict) -> dict:
    scheduled = _condition(pod, "PodScheduled")
    if scheduled and scheduled.get("status") == "False":
        return {"reason": scheduled.get("reason") or "Unschedulable",
                "message": (scheduled.get("message") or "")[:MESSAGE_LIMIT]}
    state = (_container_status(pod).get("state") or {}).get("waiting")
    if state and state.get("reason"):
        return {"reason": state["reason"], "message": (state.get("message") or "")[:MESSAGE_LIMIT]}
    if not scheduled:
        return {"reason": "PodPending", "message": f"Pod {pod['metadata']['name']} is not scheduled yet"}
    return {"reason": "ContainerCreating", "message": ""}


def rank0(pods: list[dict]) -> dict | None:
    """The Pod of the Job's first rank (completion index 0; a one-Pod Job's only Pod) that runs."""
    live = [p for p in pods if running(p)]
    for pod in live:
        if pod["metadata"].get("annotations", {}).get(COMPLETION_INDEX, "0") == "0":
            return pod
    return None


def progress_url(pod: dict) -> str | None:
    """Where the trainer of this Pod serves its latest progress record (its metrics port)."""
    ip = (pod.get("status") or {}).get("podIP")
    containers = (pod.get("spec") or {}).get("containers") or []
    ports = (_trainer_container(containers).get("ports") or []) if containers else []
    port = next((p.get("containerPort") for p in ports if p.get("name") == "metrics"), None)
    if not ip or not port:
        return None
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}/progress"

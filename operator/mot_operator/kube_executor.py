"""The controller's executor: `reconcile` runs one `executor.step` of a MoTRun against Kubernetes.

observe: the run's Jobs from the watch-fed Job index, each with what its Pods (the Pod index) say,
the disruptions seen, a training branch's progress (read from its rank-0 Pod at most once per
progress interval) and, for a Job queued by Kueue, its Workload's reason; while the preflight is
to come, the memory of the largest GPU the branch's nodeSelector allows (the nodes' nvidia.com/gpu.memory
labels, listed at most once a minute), which the preflight checks a branch against. persist: a merge patch of
the status. act: the plan's Events, then Job creates (not again while the watch catches up with a
Job created moments ago), suspends, resumes and deletes, with the run's metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import datetime

from . import jobs as jobrender
from . import metrics, naming, podstate
from .controller_state import RECENT_CREATE_SECONDS, ControllerState
from .executor import planner_for, step
from .observe import job_finished, merge_patch, observe_job, observe_jobset
from .planner import MESSAGE_LIMIT, TERMINAL, ObservedJob, Plan, RunRef, preflight_pending
from .spec import MoTRunSpec, SpecError, parse_spec

log = logging.getLogger(__name__)

# Set by NVIDIA GPU Feature Discovery on GPU nodes: the memory of one GPU, in MiB (digits).
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
MIB = 1024 ** 2


async def reconcile(body: dict, status: dict, job_index, state: ControllerState, now: datetime | None = None,
                    pod_index=None, jobset_index=None) -> tuple[dict, Plan]:
    """One executor step of the run in `body` (identity and spec), from `status`; an invalid spec fails
    the run without looking at its Jobs. Returns the stored status and the plan."""
    meta = body["metadata"]
    run = RunRef(namespace=meta["namespace"], name=meta["name"], uid=meta.get("uid", ""),
                 generation=meta.get("generation") or 1)
    spec = _parse_cached(state, run.namespace, run.name, body.get("spec") or {})
    kube = KubeExecutor(state, body, run, spec, job_index, pod_index, jobset_index)
    facts = {"jobset": state.jobset_available}
    if isinstance(spec, MoTRunSpec) and spec.resources.branch.gpus > 0 and preflight_pending(spec, status or {}):
        facts["gpu_memory"] = await gpu_memory(state, spec.resources.branch.node_selector)
    result = await step(status, kube, planner_for(run, spec, **facts), now)
    if kube.training and result.status.get("phase") not in TERMINAL:
        # Read the branches' progress again in an interval, even when nothing else happens.
        interval = state.config.progress_interval_seconds
        result.requeue_after = interval if result.requeue_after is None else min(result.requeue_after, interval)
    return result.status, result


class KubeExecutor:
    """observe / persist / act (executor.Executor) for one pass over one run."""

    def __init__(self, state: ControllerState, body: dict, run: RunRef, spec: MoTRunSpec | SpecError,
                 job_index, pod_index, jobset_index=None):
        self.state, self.body, self.run, self.spec = state, body, run, spec
        self.job_index, self.pod_index, self.jobset_index = job_index, pod_index, jobset_index
        self.kinds: dict[str, str] = {}  # name -> "Job" | "JobSet", of what was observed
        self.training = False  # a branch is training: its progress is read again in an interval
        self.progressed = False  # the status changed

    async def observe(self) -> list[ObservedJob]:
        if isinstance(self.spec, SpecError):
            return []  # an invalid spec fails the run: its Jobs are not looked at
        namespace = self.run.namespace
        observed, self.training = await observed_jobs(namespace, self.run.name, self.job_index, self.pod_index,
                                                      self.state, self.spec, self.jobset_index)
        self.kinds = {job.name: job.kind for job in observed}
        for job in observed:
            self.state.created.pop((namespace, job.name), None)  # the watch shows it now
        return observed

    async def persist(self, old: dict, new: dict) -> None:
        await self.state.api.patch_status(self.run.namespace, self.run.name, merge_patch(old, new))
        metrics.record_transitions(old, new)
        self.progressed = True

    async def act(self, result: Plan) -> None:
        state, api, namespace = self.state, self.state.api, self.run.namespace
        metrics.record_plan(result)
        for event in result.events:
            api.event(self.body, event)
        clock = time.monotonic()
        for request in result.create:
            key = (namespace, request.name)
            if clock - state.created.get(key, -RECENT_CREATE_SECONDS) < RECENT_CREATE_SECONDS:
                continue  # created moments ago; the watch has not shown it yet
            for obj in jobrender.render(request, self.spec, self.run, state.config):
                if await api.create(obj) and obj["kind"] == "Job":
                    metrics.job_created(request.stage)
            state.created[key] = clock
        for job in result.suspend:
            await api.set_suspend(namespace, job, True, kind=self.kinds.get(job, "Job"))
        for job in result.resume:
            await api.set_suspend(namespace, job, False, kind=self.kinds.get(job, "Job"))
        for job in result.delete:
            await api.delete_job(namespace, job, kind=self.kinds.get(job, "Job"))
        metrics.observe_run(namespace, self.run.name, result.status, progressed=self.progressed)


async def observed_jobs(namespace: str, run_name: str, job_index, pod_index, state: ControllerState,
                        spec: MoTRunSpec, jobset_index=None) -> tuple[list[ObservedJob], bool]:
    """The run's Jobs (and JobSets) from the indexes, each with what its Pods (from the Pod index) say,
    the disruptions seen, the trainer's latest progress record and, for one queued by Kueue, its
    Workload's reason. Returns them and whether a branch is training (progress is then re-read)."""
    run_label = naming.label_value(run_name)
    jobs = list(job_index.get((namespace, run_label), []))
    jobsets = list(jobset_index.get((namespace, run_label), [])) if jobset_index is not None else []
    pods_by_job: dict[str, list[dict]] = {}
    for pod in pod_index.get((namespace, run_label), []) if pod_index is not None else []:
        pods_by_job.setdefault(podstate.job_of(pod), []).append(pod)
    disrupted = state.disrupted.get((namespace, run_label), {})
    progress = state.progress.setdefault((namespace, run_name), {})
    found = []
    for kind, job in [("JobSet", js) for js in jobsets] + [("Job", j) for j in jobs]:
        name = job["metadata"]["name"]
        pods = pods_by_job.get(name, [])
        if kind == "JobSet":
            obs = observe_jobset(job, pods)
        else:
            if job_finished(job) and not any(podstate.termination(p) for p in pods) and \
                    any(not podstate.terminal(p) for p in pods):
                # The Job's end reached us before its Pods' (two watches): look again on the Pod's
                # event, so its termination message (loss, reason) is read with the outcome.
                job = {**job, "status": {k: v for k, v in (job.get("status") or {}).items() if k != "conditions"}}
            obs = observe_job(job, pods)
        if obs is None:
            continue
        obs.disruptions = [d for d in disrupted.values() if d.get("job") == name]
        if obs.state == "Pending" and obs.disruptions and (obs.waiting or {}).get("reason") in (
                "ContainerCreating", "PodPending", None):
            last = obs.disruptions[-1]
            obs.waiting = {"reason": last["reason"], "message": f"Pod {last['pod']}: {last['message']}; "
                                                                 "its replacement has not started yet"}
        if obs.state == "Suspended" and spec.queue_name and not spec.suspend:
            obs.waiting = await _admission(state, namespace, job, spec.queue_name)
        obs.progress = progress.get(name)
        found.append(obs)
    training = [o for o in found if o.stage == "sft" and o.state == "Running"]
    await _read_progress(state, namespace, run_name, training, pods_by_job)
    for obs in training:
        obs.progress = progress.get(obs.name)
    return found, bool(training)


async def _read_progress(state: ControllerState, namespace: str, run_name: str, training: list[ObservedJob],
                         pods_by_job: dict[str, list[dict]]) -> None:
    """Ask each training branch's rank-0 Pod for its latest progress record, at most once per
    progress interval per run (the records change once per trainer log interval anyway)."""
    key = (namespace, run_name)
    clock = time.monotonic()
    if not training or clock - state.progress_read.get(key, -1e9) < state.config.progress_interval_seconds:
        return
    state.progress_read[key] = clock
    urls = {obs.name: podstate.progress_url(pod) for obs in training
            if (pod := podstate.rank0(pods_by_job.get(obs.name, [])))}
    urls = {name: url for name, url in urls.items() if url}
    records = await asyncio.gather(*(state.api.progress(url) for url in urls.values()))
    store = state.progress.setdefault(key, {})
    for name, record in zip(urls, records, strict=True):
        if record:
            store[name] = record


async def _admission(state: ControllerState, namespace: str, job: dict, queue: str) -> dict:
    """Why Kueue has not admitted a queued Job: its Workload's QuotaReserved message, read at most
    once per progress interval per Job."""
    name = job["metadata"]["name"]
    cached = state.admission.get((namespace, name))
    clock = time.monotonic()
    if cached and clock - cached[0] < state.config.progress_interval_seconds:
        return cached[1]
    message = f"queued in LocalQueue {queue!r}, waiting for Kueue to admit it"
    uid = job["metadata"].get("uid")
    try:
        for workload in await state.api.workloads(namespace, uid) if uid else []:
            for cond in (workload.get("status") or {}).get("conditions") or []:
                if cond.get("type") == "QuotaReserved" and cond.get("status") == "False" and cond.get("message"):
                    message = f"LocalQueue {queue!r}: {cond['message']}"[:MESSAGE_LIMIT]
    except Exception as error:  # no Kueue CRD or no RBAC: the generic message stays
        log.debug("reading the Workload of %s/%s failed: %s", namespace, name, error)
    found = {"reason": "WaitingForAdmission", "message": message}
    state.admission[(namespace, name)] = (clock, found)
    return found


def largest_gpu_memory(nodes: list[dict[str, str]], node_selector: dict[str, str]) -> int | None:
    """Bytes of the largest GPU among the nodes (their labels) that `node_selector` matches (every
    node when empty) and that carry GPU_MEMORY_LABEL (MiB, digits); None when none does: unknown."""
    found = [int(labels[GPU_MEMORY_LABEL]) * MIB for labels in nodes
             if str(labels.get(GPU_MEMORY_LABEL, "")).isdigit() and int(labels[GPU_MEMORY_LABEL]) > 0
             and all(labels.get(key) == value for key, value in node_selector.items())]
    return max(found, default=None)


async def gpu_memory(state: ControllerState, node_selector: dict[str, str]) -> int | None:
    """largest_gpu_memory of the cluster's nodes, listed at most once per refresh interval for all
    runs (None when turned off, or when the nodes cannot be listed: no RBAC, an API error)."""
    config = state.config
    if not config.gpu_memory_from_node_labels:
        return None
    clock = time.monotonic()
    if state.gpu_nodes_read is None or clock - state.gpu_nodes_read >= config.gpu_memory_refresh_seconds:
        state.gpu_nodes_read = clock
        try:
            nodes = await state.api.nodes(GPU_MEMORY_LABEL)
            state.gpu_nodes = [dict((node.get("metadata") or {}).get("labels") or {}) for node in nodes]
        except Exception as error:  # e.g. a namespaced install: no ClusterRole, so no nodes
            log.info("listing the nodes' %s labels failed (the preflight checks no GPU memory): %s",
                     GPU_MEMORY_LABEL, error)
            state.gpu_nodes = []
    return largest_gpu_memory(state.gpu_nodes, node_selector)


def _parse_cached(state: ControllerState, namespace: str, name: str, spec_dict: dict):
    """The parsed spec (or its SpecError); parsed again only when the spec changed."""
    spec_dict = jobrender.with_defaults(spec_dict, state.config)
    text = json.dumps(spec_dict, sort_keys=True)
    cached = state.specs.get((namespace, name))
    if cached is not None and cached[0] == text:
        return cached[1]
    try:
        parsed = parse_spec(spec_dict)
    except SpecError as error:
        parsed = error
    state.specs[(namespace, name)] = (text, parsed)
    return parsed

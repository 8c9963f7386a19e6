"""Kopf handlers: a level-based controller for MoTRuns.

One daemon per MoTRun loops: observe its Jobs (from an in-memory index fed by a watch), call the
pure planner, write the status, then create/suspend/resume/delete Jobs. Job and Pod events wake the
daemon at once, so reactions do not wait for a timer; a periodic resync covers anything missed. The
run's Pods (a second watch-fed index) give the trainers' termination messages, why a stage waits
(unschedulable, image pull errors, Kueue admission) and disruptions; a training branch's progress is
read from its rank-0 Pod's metrics port (GET /progress) every progress interval: the operator only
reads, and trainer Pods get no access to MoTRuns. Deleting a MoTRun stops its daemon; a deletion handler then starts
the checkpoint cleanup Job when the spec asks for one, once the run's Pods have stopped (it deletes
their Jobs first), retried until the Job exists.
Kopf keeps its own bookkeeping in annotations; our status holds only the run's state.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import kopf

from . import jobs as jobrender
from . import metrics, naming, podstate
from .contract import EXIT_INVALID_INPUT, EXIT_OK, parse_timestamp, read_result
from .planner import (
    TERMINAL,
    ObservedJob,
    Plan,
    RunRef,
    plan,
    plan_invalid,
)
from .spec import GROUP, PLURAL, VERSION, SpecError, parse_spec

RESYNC_SECONDS = 30.0
# The official client blocks: calls run in this many threads (over as many pooled connections), so
# a burst of finished Jobs across many runs is not queued behind a handful of slow requests. More is
# not better: with 100 runs finishing at once on 2 cores, 32 threads fighting over the GIL gave a
# merge-creation p99 of 1.2-1.35 s, 8 threads 0.81-0.93 s, 4 threads 1.3-2.0 s (bench/operator).
API_THREADS = 8
# A Job this process created recently is not created again while the watch catches up with it.
RECENT_CREATE_SECONDS = 30.0
ERROR_RETRY_SECONDS = 5.0
CLEANUP_RETRY_SECONDS = 5.0
# A daemon told to stop (its MoTRun is being deleted, or the operator exits) finishes the reconcile
# pass it is in (API calls in threads, which a cancellation would not stop anyway) and returns. Kopf
# waits this long for that before it counts the daemon as slow; after DAEMON_STOP_GRACE_SECONDS more
# it cancels the daemon, and DAEMON_CANCEL_SECONDS after that it leaves it orphaned.
DAEMON_EXIT_WAIT_SECONDS = 2.0
DAEMON_STOP_GRACE_SECONDS = 10.0
DAEMON_CANCEL_SECONDS = 10.0
MESSAGE_LIMIT = 1024
PROGRESS_TIMEOUT_SECONDS = 2.0
log = logging.getLogger("mot_operator.controller")


@dataclass
class ControllerState:
    """What the handlers share: operator config, the Kubernetes API, and per-run wake-ups."""

    config: jobrender.OperatorConfig = field(default_factory=jobrender.OperatorConfig)
    api: object = None  # a KubeApi; set by `mot operator` before Kopf starts
    wakers: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)
    by_label: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (namespace, run label) -> names
    # {(namespace, run): metadata.generation} last seen on a MoTRun event: only a new spec wakes a daemon
    generations: dict[tuple[str, str], int] = field(default_factory=dict)
    # Pods seen marked for a disruption, kept until their run goes (the Pod may be gone before the
    # daemon looks): {(namespace, run label): {pod: {"job", "pod", "reason", "message"}}}
    disrupted: dict[tuple[str, str], dict[str, dict]] = field(default_factory=dict)
    # The branches' latest progress records {(namespace, run): {job: record}} and when they were read
    progress: dict[tuple[str, str], dict[str, dict]] = field(default_factory=dict)
    progress_read: dict[tuple[str, str], float] = field(default_factory=dict)
    # Kueue's reason per queued Job: {(namespace, job): (monotonic time read, waiting)}
    admission: dict[tuple[str, str], tuple[float, dict]] = field(default_factory=dict)
    # {(namespace, run): (spec JSON, parsed spec or SpecError)}: parse each spec version once
    specs: dict[tuple[str, str], tuple[str, object]] = field(default_factory=dict)
    # {(namespace, job): monotonic time} of the Jobs this process created
    created: dict[tuple[str, str], float] = field(default_factory=dict)
    ready: bool = False

    def forget(self, namespace: str, name: str) -> None:
        """Drop what is kept about a deleted run."""
        self.disrupted.pop((namespace, naming.label_value(name)), None)
        self.progress.pop((namespace, name), None)
        self.progress_read.pop((namespace, name), None)
        self.admission = {key: found for key, found in self.admission.items()
                          if not (key[0] == namespace and key[1].startswith(f"{name}-"))}
        self.specs.pop((namespace, name), None)
        self.generations.pop((namespace, name), None)
        # Jobs created recently are forgotten once observed; those of a run deleted first, here.
        clock = time.monotonic()
        self.created = {key: at for key, at in self.created.items() if clock - at < RECENT_CREATE_SECONDS}

    def waker(self, namespace: str, name: str) -> asyncio.Event:
        key = (namespace, name)
        if key not in self.wakers:
            self.wakers[key] = asyncio.Event()
            self.by_label.setdefault((namespace, naming.label_value(name)), set()).add(name)
        return self.wakers[key]

    def drop_waker(self, namespace: str, name: str) -> None:
        self.wakers.pop((namespace, name), None)
        key = (namespace, naming.label_value(name))
        names = self.by_label.get(key)
        if names is not None:
            names.discard(name)
            if not names:
                del self.by_label[key]

    def wake(self, namespace: str, run_label: str) -> None:
        """Wake the daemons of the runs whose Jobs carry this run label (one, unless names collide)."""
        for name in self.by_label.get((namespace, run_label), ()):
            event = self.wakers.get((namespace, name))
            if event is not None:
                event.set()


STATE = ControllerState()


# ---------------------------------------------------------------------------------------------
# The Kubernetes API calls the controller makes (the official client, run in threads)

MERGE_PATCH = "application/merge-patch+json"
KUEUE_VERSIONS = ("v1beta2", "v1beta1")


class KubeApi:
    """Status patch, Job/Service create (AlreadyExists = adopt), Job suspend/resume/delete."""

    def __init__(self, api_client=None):
        from kubernetes import client

        if api_client is None:
            config = client.Configuration.get_default_copy()
            config.connection_pool_maxsize = API_THREADS
            api_client = client.ApiClient(config)
        self._client = api_client
        self._threads = ThreadPoolExecutor(API_THREADS, thread_name_prefix="kube-api")
        self.batch = client.BatchV1Api(self._client)
        self.core = client.CoreV1Api(self._client)
        self.custom = client.CustomObjectsApi(self._client)
        self._http = None  # an aiohttp session for the trainers' progress, made in the event loop

    @staticmethod
    def _status(error) -> int | None:
        return getattr(error, "status", None)

    async def _call(self, fn, *args, **kwargs) -> bytes:
        """Run a client call (with _preload_content=False: no model objects) in a thread; its body."""
        return await asyncio.get_running_loop().run_in_executor(
            self._threads, functools.partial(_body_of, fn, *args, _preload_content=False, **kwargs))

    async def run_pods(self, namespace: str, run_label: str) -> list[dict]:
        """The Pods of a run's Jobs (for termination messages): one list call however many finished."""
        data = await self._call(self.core.list_namespaced_pod, namespace,
                                label_selector=f"{naming.LABEL_RUN}={run_label}")
        items = json.loads(data).get("items") or []
        return [p for p in items if ((p.get("metadata") or {}).get("labels") or {}).get(naming.LABEL_RUN) == run_label]

    async def workloads(self, namespace: str, job_uid: str) -> list[dict]:
        """Kueue's Workloads of a Job (labelled with its uid by Kueue)."""
        from kubernetes.client.exceptions import ApiException

        for version in KUEUE_VERSIONS:
            try:
                data = await self._call(self.custom.list_namespaced_custom_object, "kueue.x-k8s.io", version,
                                        namespace, "workloads", label_selector=f"kueue.x-k8s.io/job-uid={job_uid}")
            except ApiException as error:
                if self._status(error) == 404 and version != KUEUE_VERSIONS[-1]:
                    continue  # an older Kueue serves only v1beta1
                raise
            return json.loads(data).get("items") or []
        return []

    async def progress(self, url: str) -> dict | None:
        """The trainer's latest progress record from its Pod (None when it cannot be read: a Pod
        just started or stopping, a NetworkPolicy in the way; the status keeps the last one)."""
        import aiohttp

        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROGRESS_TIMEOUT_SECONDS))
        try:
            async with self._http.get(url) as response:
                if response.status != 200:
                    return None
                record = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            log.debug("reading progress from %s failed: %s", url, error)
            return None
        return record if isinstance(record, dict) and "step" in record else None

    async def patch_status(self, namespace: str, name: str, patch: dict) -> None:
        await self._call(
            self.custom.patch_namespaced_custom_object_status, GROUP, VERSION, namespace, PLURAL, name,
            {"status": patch}, _content_type=MERGE_PATCH)

    async def create(self, obj: dict) -> bool:
        """True when created; False when it already exists (a deterministic name: adopt it)."""
        from kubernetes.client.exceptions import ApiException

        namespace = obj["metadata"]["namespace"]
        call = self.batch.create_namespaced_job if obj["kind"] == "Job" else self.core.create_namespaced_service
        try:
            await self._call(call, namespace, obj)
        except ApiException as error:
            if self._status(error) == 409:
                return False
            raise
        return True

    async def set_suspend(self, namespace: str, job: str, suspend: bool) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            await self._call(self.batch.patch_namespaced_job, job, namespace, {"spec": {"suspend": suspend}},
                                    _content_type=MERGE_PATCH)
        except ApiException as error:
            if self._status(error) != 404:
                raise

    def event(self, body: dict, event) -> None:
        """A Kubernetes Event on the MoTRun (Kopf posts it in the background)."""
        kopf.event(body, type=event.type, reason=event.reason, message=event.message[:MESSAGE_LIMIT])

    async def delete_job(self, namespace: str, job: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            await self._call(self.batch.delete_namespaced_job, job, namespace,
                                    propagation_policy="Background")
        except ApiException as error:
            if self._status(error) != 404:
                raise


def _body_of(fn, *args, **kwargs) -> bytes:
    """Call, read the whole response and give its connection back to the pool. (An unread raw
    response keeps its connection until garbage-collected, which then closes it: every request paid
    for a new TCP connection, and a burst of 100 runs for thousands of them.)"""
    response = fn(*args, **kwargs)
    try:
        return response.data
    finally:
        response.release_conn()


# ---------------------------------------------------------------------------------------------
# Observing Jobs and Pods (pure functions of their bodies)


def _last_line(text: str, limit: int | None = MESSAGE_LIMIT) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    return line if limit is None else line[:limit]


def observe_job(job: dict, pods: list[dict] = ()) -> ObservedJob | None:
    """An ObservedJob from a Job body (labels + status) and its Pods (podstate snapshots or bodies):
    the trainer's termination message, what Kubernetes says ended them, why none runs yet."""
    meta = job.get("metadata") or {}
    labels = meta.get("labels") or {}
    try:
        stage = labels[naming.LABEL_STAGE]
        round_ = int(labels[naming.LABEL_ROUND])
        attempt = int(labels[naming.LABEL_ATTEMPT])
    except (KeyError, ValueError):
        return None  # not one of ours, or labels edited by hand
    status = job.get("status") or {}
    true = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    terms = [t for t in (podstate.termination(p) for p in pods) if t]
    failed_terms = [t for t in terms if t["exit_code"] not in (EXIT_OK, None)]
    started = status.get("startTime")
    finished = None
    permanent = False
    metrics_ = None
    message = ""
    cause = None
    waiting = None
    if "Complete" in true or "SuccessCriteriaMet" in true:
        state = "Succeeded"
        finished = status.get("completionTime") or true.get("Complete", true.get("SuccessCriteriaMet")).get(
            "lastTransitionTime")
        for term in terms:
            # Whole: a summary (the preflight's grows with the teachers) may pass MESSAGE_LIMIT.
            metrics_ = read_result(term["message"])
            if metrics_ is not None:
                break
    elif "Failed" in true or "FailureTarget" in true:
        state = "Failed"
        cond = true.get("Failed") or true.get("FailureTarget")
        finished = cond.get("lastTransitionTime")
        permanent = cond.get("reason") == "PodFailurePolicy" or any(
            t["exit_code"] == EXIT_INVALID_INPUT for t in failed_terms)
        found = podstate.failure_cause(pods)
        source = failed_terms or terms
        message = _last_line(source[0]["message"]) if source else ""
        if found:
            cause = found[0]
            message = message or found[1][:MESSAGE_LIMIT]
        elif cond.get("reason") == "DeadlineExceeded":  # spec.activeDeadlineSeconds
            cause = "DeadlineExceeded"
        if not message:
            message = f"{cond.get('reason') or 'Failed'}: {cond.get('message') or 'the Job failed'}"[:MESSAGE_LIMIT]
    elif (job.get("spec") or {}).get("suspend"):
        state = "Suspended"
    elif status.get("ready") or any(podstate.running(p) for p in pods):
        state = "Running"
    else:
        # Started (or not yet) but no Pod runs: say why when the Pods do.
        state = "Pending"
        if started:
            waiting = podstate.waiting([p for p in pods if podstate.job_of(p) in (None, meta.get("name"))])
    return ObservedJob(
        name=meta.get("name", ""), stage=stage, round=round_, teacher=labels.get(naming.LABEL_TEACHER),
        attempt=attempt, state=state, permanent=permanent, message=message, metrics=metrics_,
        started_at=parse_timestamp(started) if started else None,
        finished_at=parse_timestamp(finished) if finished else None,
        waiting=waiting, reason=cause,
    )


def merge_patch(old, new):
    """RFC 7386 merge patch turning `old` into `new` (None deletes a key; lists are replaced)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            patch[key] = merge_patch(old[key], value)
    return patch


# ---------------------------------------------------------------------------------------------
# One reconciliation


def _finished(job: dict) -> bool:
    conditions = (job.get("status") or {}).get("conditions") or []
    return any(c.get("status") == "True" and c.get("type") in ("Complete", "SuccessCriteriaMet", "Failed",
                                                                "FailureTarget") for c in conditions)


async def observed_jobs(namespace: str, run_name: str, job_index, pod_index, state: ControllerState,
                        spec=None) -> tuple[list[ObservedJob], bool]:
    """The run's Jobs from the index, each with what its Pods (from the Pod index) say, the
    disruptions seen, the trainer's latest progress record and, for a Job queued by Kueue, its
    Workload's reason. Returns them and whether a branch is training (progress is then re-read)."""
    run_label = naming.label_value(run_name)
    jobs = list(job_index.get((namespace, run_label), []))
    pods_by_job: dict[str, list[dict]] = {}
    for pod in pod_index.get((namespace, run_label), []) if pod_index is not None else []:
        pods_by_job.setdefault(podstate.job_of(pod), []).append(pod)
    disrupted = state.disrupted.get((namespace, run_label), {})
    progress = state.progress.setdefault((namespace, run_name), {})
    found = []
    for job in jobs:
        name = job["metadata"]["name"]
        pods = pods_by_job.get(name, [])
        if _finished(job) and not any(podstate.termination(p) for p in pods) and \
                any(not podstate.terminal(p) for p in pods):
            # The Job's end reached us before its Pods' (two watches): look again on the Pod's event,
            # so its termination message (loss, reason) is read with the outcome.
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
        if obs.state == "Suspended" and spec is not None and spec.queue_name and not spec.suspend:
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
    except Exception as error:  # noqa: BLE001 - no Kueue CRD or no RBAC: the generic message stays
        log.debug("reading the Workload of %s/%s failed: %s", namespace, name, error)
    found = {"reason": "WaitingForAdmission", "message": message}
    state.admission[(namespace, name)] = (clock, found)
    return found


async def reconcile(body: dict, status: dict, job_index, state: ControllerState, now: datetime | None = None,
                    pod_index=None) -> tuple[dict, Plan]:
    """Observe, plan, write status, act. Returns the stored status and the plan."""
    return await _reconcile_once(body, status, job_index, pod_index, state, now)


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


async def _reconcile_once(body, status, job_index, pod_index, state: ControllerState, now):
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    run = RunRef(namespace=namespace, name=name, uid=meta.get("uid", ""), generation=meta.get("generation") or 1)
    now = now or datetime.now(UTC)
    parsed = _parse_cached(state, namespace, name, body.get("spec") or {})
    training = False
    if isinstance(parsed, SpecError):
        spec = None
        result = plan_invalid(run, status, parsed, now)
    else:
        spec = parsed
        observed, training = await observed_jobs(namespace, name, job_index, pod_index, state, spec)
        result = plan(run, spec, status, observed, now)
        for job in observed:
            state.created.pop((namespace, job.name), None)
    if training and result.status.get("phase") not in TERMINAL:
        # Read the branches' progress again in an interval, even when nothing else happens.
        interval = state.config.progress_interval_seconds
        result.requeue_after = interval if result.requeue_after is None else min(result.requeue_after, interval)

    api = state.api
    if result.status != status:
        await api.patch_status(namespace, name, merge_patch(status, result.status))
        metrics.record_transitions(status, result.status)
    metrics.record_plan(result)
    for event in result.events:
        api.event(body, event)
    clock = time.monotonic()
    for request in result.create:
        key = (namespace, request.name)
        if clock - state.created.get(key, -RECENT_CREATE_SECONDS) < RECENT_CREATE_SECONDS:
            continue  # created moments ago; the watch has not shown it yet
        for obj in jobrender.render(request, spec, run, state.config):
            if await api.create(obj) and obj["kind"] == "Job":
                metrics.job_created(request.stage)
        state.created[key] = clock
    for job in result.suspend:
        await api.set_suspend(namespace, job, True)
    for job in result.resume:
        await api.set_suspend(namespace, job, False)
    for job in result.delete:
        await api.delete_job(namespace, job)
    metrics.observe_run(namespace, name, result.status, progressed=result.status != status)
    return result.status, result


# ---------------------------------------------------------------------------------------------
# Kopf handlers


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_):
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    # Only our explicit kopf.event() calls become Kubernetes Events, not Kopf's log lines.
    settings.posting.level = logging.WARNING
    settings.batching.batch_window = 0.02  # react to a Job's change within tens of milliseconds
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # The CRD ships with the chart and namespaces come from flags: no need to list/watch
    # namespaces and CRDs cluster-wide (the chart's RBAC does not grant it).
    settings.scanning.disabled = True
    # How long Kopf waits for a stopped daemon before escalating (see run_daemon). Its default, ten
    # event-loop cycles, is shorter than any API call: a daemon stopped mid-pass was cancelled.
    settings.background.instant_exit_timeout = DAEMON_EXIT_WAIT_SECONDS


# Handlers are async: Kopf runs sync handlers in a thread pool, a hop per Job event.
@kopf.index("batch", "v1", "jobs", labels={naming.LABEL_RUN: kopf.PRESENT})
async def job_index(namespace, name, labels, body, **_):
    # Only what observe_job reads: a small copy per Job keeps memory and copying down.
    return {(namespace, labels[naming.LABEL_RUN]): {
        "metadata": {"name": name, "uid": body.get("metadata", {}).get("uid"), "labels": dict(labels)},
        "spec": {"suspend": bool((body.get("spec") or {}).get("suspend"))},
        "status": podstate.plain(body.get("status") or {}),
    }}


@kopf.on.event("batch", "v1", "jobs", labels={naming.LABEL_RUN: kopf.PRESENT})
async def job_changed(namespace, labels, **_):
    STATE.wake(namespace, labels[naming.LABEL_RUN])


@kopf.index("", "v1", "pods", labels={naming.LABEL_RUN: kopf.PRESENT})
async def pod_index(namespace, labels, body, **_):
    return {(namespace, labels[naming.LABEL_RUN]): podstate.snapshot(body)}


@kopf.on.event("", "v1", "pods", labels={naming.LABEL_RUN: kopf.PRESENT})
async def pod_changed(namespace, labels, body, **_):
    """A Pod of a run changed: its run's daemon looks (why it waits, how it ended). A disruption is
    remembered here: the Pod is deleted soon after, maybe before the daemon's next pass."""
    run_label = labels[naming.LABEL_RUN]
    found = podstate.disruption(body)
    if found and naming.LABEL_STAGE in labels:
        found["job"] = labels.get(naming.LABEL_JOB_NAME)
        STATE.disrupted.setdefault((namespace, run_label), {}).setdefault(found["pod"], found)
    STATE.wake(namespace, run_label)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def run_changed(type, namespace, name, meta, **_):
    if type == "DELETED":  # gone for good (its daemon has exited): nothing to wake, nothing to keep
        metrics.forget_run(namespace, name)
        STATE.forget(namespace, name)
        return
    # Most MoTRun events echo the daemon's own status writes: those need no reconcile (under a burst
    # of 100 runs they doubled the work). A new spec (generation) or a deletion does.
    generation = meta.get("generation")
    if STATE.generations.get((namespace, name)) == generation and not meta.get("deletionTimestamp"):
        return
    STATE.generations[(namespace, name)] = generation
    event = STATE.wakers.get((namespace, name))
    if event is not None:
        event.set()


async def cleanup_on_delete(namespace: str, name: str, body: dict) -> None:
    """Jobs go with the MoTRun (owner references); checkpoints only when spec.storage.cleanup asks,
    once no Pod of the run is running (PodsStillRunning until then). The cleanup Job has a
    deterministic name: AlreadyExists means an earlier try created it."""
    try:
        spec = parse_spec(jobrender.with_defaults(body.get("spec") or {}, STATE.config))
    except SpecError:
        return  # an invalid run never wrote checkpoints
    if not (spec.storage.cleanup and spec.storage.uri):
        return
    await _stop_running_pods(namespace, name)
    meta = body["metadata"]
    run = RunRef(namespace=namespace, name=name, uid=meta.get("uid", ""), generation=meta.get("generation") or 1)
    job = jobrender.render_cleanup_job(spec, run, STATE.config)
    created = await STATE.api.create(job)
    log.info("MoTRun %s/%s deleted: cleanup Job %s %s", namespace, name, job["metadata"]["name"],
             "created" if created else "already exists")


class PodsStillRunning(Exception):
    """The deleted run still has Pods that may write checkpoints: the cleanup waits for them."""


async def _stop_running_pods(namespace: str, name: str) -> None:
    """Delete the Jobs of the run's Pods that have not finished, and raise PodsStillRunning while any is left.

    The run's Jobs go with the MoTRun by owner reference, but the garbage collector deletes them only
    once the MoTRun is gone, and Kopf's finalizer keeps it until the cleanup Job exists: a branch
    still running then could upload a checkpoint after the cleanup Job has listed the run's objects,
    and it would stay in the bucket. So the cleanup Job is created only when no Pod of the run is
    running (or about to)."""
    pods = await STATE.api.run_pods(namespace, naming.label_value(name))
    running = [p for p in pods if naming.LABEL_STAGE in ((p.get("metadata") or {}).get("labels") or {})
               and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
    if not running:
        return
    jobs = sorted({p["metadata"]["labels"].get(naming.LABEL_JOB_NAME) for p in running} - {None})
    for job in jobs:
        await STATE.api.delete_job(namespace, job)
    raise PodsStillRunning(f"waiting for {len(running)} Pod(s) of {namespace}/{name} to stop before its "
                           f"checkpoints are deleted (Jobs {', '.join(jobs)} deleted)")


def _namespace_terminating(error: Exception) -> bool:
    """The API server refuses new objects in a namespace being deleted (403, cause
    NamespaceTerminating): retrying would only hold the namespace's deletion up forever."""
    return getattr(error, "status", None) == 403 and "NamespaceTerminating" in str(getattr(error, "body", ""))


def _error_text(error: Exception) -> str:
    status = getattr(error, "status", None)
    if status is None:
        return str(error) or repr(error)
    try:
        message = json.loads(getattr(error, "body", None) or "{}").get("message")
    except (TypeError, ValueError):
        message = None
    return f"HTTP {status} {getattr(error, 'reason', '') or ''}: {message or ''}".strip(" :")


def _deleted_with_cleanup(meta, spec, **_) -> bool:
    """The deletion handler's filter: a MoTRun being deleted whose spec asks for checkpoint cleanup.

    Matching only at deletion keeps Kopf's change tracking (a diff-base annotation written on every
    create and spec change) off the MoTRuns. The finalizer that holds a deleted MoTRun until this
    handler succeeds is there all along: Kopf adds it for run_daemon, which lives as long as the
    MoTRun (it never returns before its MoTRun is deleted)."""
    return bool(meta.get("deletionTimestamp")) and bool((spec.get("storage") or {}).get("cleanup"))


@kopf.on.delete(GROUP, VERSION, PLURAL, when=_deleted_with_cleanup)
async def cleanup_checkpoints(namespace, name, body, **_):
    """Start the checkpoint cleanup Job of a deleted MoTRun. Kopf keeps its finalizer, so the MoTRun,
    until this succeeds, and calls it again after a failure."""
    try:
        await cleanup_on_delete(namespace, name, _run_body(body))
    except PodsStillRunning as waiting:
        raise kopf.TemporaryError(str(waiting), delay=CLEANUP_RETRY_SECONDS) from None
    except Exception as error:  # noqa: BLE001 - any failure is retried, as long as it may succeed
        if _namespace_terminating(error):
            log.warning("MoTRun %s/%s deleted with its namespace: no cleanup Job can be created there, "
                        "its checkpoints are kept (%s)", namespace, name, _error_text(error))
            return
        raise kopf.TemporaryError(f"creating the cleanup Job of {namespace}/{name} failed: {_error_text(error)}",
                                  delay=CLEANUP_RETRY_SECONDS) from error


def _run_body(body) -> dict:
    """What reconciling needs from the live MoTRun body: identity and spec (status is ours)."""
    meta = body.get("metadata") or {}
    keep = ("name", "namespace", "uid", "generation", "deletionTimestamp")
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            "metadata": {k: meta[k] for k in keep if k in meta}, "spec": podstate.plain(body.get("spec") or {})}


async def _wait_stopped(stopped, seconds: float) -> None:
    await stopped.wait(seconds)


async def _sleep(wake: asyncio.Event, stopped, seconds: float) -> None:
    """Until woken (a Job or MoTRun event), stopped, or `seconds` have passed."""
    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(_wait_stopped(stopped, seconds))]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_backoff=DAEMON_STOP_GRACE_SECONDS,
             cancellation_timeout=DAEMON_CANCEL_SECONDS)
async def run_daemon(stopped, namespace, name, body, job_index, pod_index, logger, **_):
    """Reconcile one MoTRun until it is terminal (never restarted), then wait for its deletion.

    On deletion it returns at once (from its sleep, or after the pass it is in): Kopf's finalizer,
    which it holds for the MoTRun's whole life, then waits only for cleanup_checkpoints.

    Kopf adds that finalizer with a JSON patch guarded by the MoTRun's resourceVersion, while this
    daemon starts and writes the first status. When our status write lands first, the API server
    answers Kopf's patch with 422 and Kopf applies it again on the next event of the MoTRun (the
    one our write causes), milliseconds later. Harmless: nothing here needs the finalizer before
    the first pass, and a MoTRun deleted inside that gap has no checkpoints to clean up yet (its
    Jobs still go, by owner reference). Waiting for the finalizer would delay every run's start."""
    wake = STATE.waker(namespace, name)
    # This daemon is the only writer of the run's status: what it last wrote is newer than a body
    # the watch has not delivered yet.
    status = podstate.plain(body.get("status") or {})
    done = status.get("phase") in TERMINAL
    try:
        while not stopped and not body.get("metadata", {}).get("deletionTimestamp"):
            wake.clear()
            delay = RESYNC_SECONDS
            try:
                status, result = await reconcile(_run_body(body), status, job_index, STATE, pod_index=pod_index)
                if status.get("phase") in TERMINAL and not result.delete:
                    if not done:
                        log.info("MoTRun %s/%s is %s: %s", namespace, name, status["phase"],
                                 status.get("message", ""))
                    done = True
                    delay = 3600.0  # nothing left to do but wait for deletion
                elif result.requeue_after is not None:
                    delay = min(delay, max(result.requeue_after, 0.05))
            except Exception as error:  # noqa: BLE001 - keep the loop alive, count and retry
                metrics.RECONCILE_ERRORS.inc()
                logger.exception(f"reconcile of {namespace}/{name} failed: {error}")
                status = podstate.plain(body.get("status") or {})  # our view may be off: re-read
                delay = ERROR_RETRY_SECONDS
            await _sleep(wake, stopped, delay)
    finally:
        STATE.drop_waker(namespace, name)

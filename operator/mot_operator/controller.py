"""Kopf handlers: a level-based controller for MoTRuns, and what they share (ControllerState).

One daemon per MoTRun loops over one executor step (kube_executor.reconcile: observe its Jobs and
Pods from watch-fed indexes, plan, write the status, act). Job and Pod events wake the daemon at
once, so reactions do not wait for a timer; a periodic resync covers anything missed, and a training
branch's progress is re-read every progress interval. Deleting a MoTRun stops its daemon; a deletion
handler then starts the checkpoint cleanup Job when the spec asks for one, once the run's Pods have
stopped (it deletes their Jobs first), retried until the Job exists.
Kopf keeps its own bookkeeping in annotations; our status holds only the run's state.
"""

from __future__ import annotations

import asyncio
import json
import logging

import kopf

from . import jobs as jobrender
from . import metrics, naming, podstate
from .controller_state import ControllerState
from .kube_executor import reconcile
from .planner import TERMINAL, RunRef
from .spec import GROUP, PLURAL, VERSION, SpecError, parse_spec

RESYNC_SECONDS = 30.0
ERROR_RETRY_SECONDS = 5.0
CLEANUP_RETRY_SECONDS = 5.0
# A daemon told to stop (its MoTRun is being deleted, or the operator exits) finishes the reconcile
# pass it is in (API calls in threads, which a cancellation would not stop anyway) and returns. Kopf
# waits this long for that before it counts the daemon as slow; after DAEMON_STOP_GRACE_SECONDS more
# it cancels the daemon, and DAEMON_CANCEL_SECONDS after that it leaves it orphaned.
DAEMON_EXIT_WAIT_SECONDS = 2.0
DAEMON_STOP_GRACE_SECONDS = 10.0
DAEMON_CANCEL_SECONDS = 10.0
log = logging.getLogger("mot_operator.controller")


STATE = ControllerState()


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
        "spec": {"suspend": bool((body.get("spec") or {}).get("suspend")),
                 "parallelism": (body.get("spec") or {}).get("parallelism") or 1},
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
        found["job"] = podstate.job_of(body)
        STATE.disrupted.setdefault((namespace, run_label), {}).setdefault(found["pod"], found)
    STATE.wake(namespace, run_label)


async def jobset_index(namespace, name, labels, body, **_):
    """JobSets running multi-node branches (registered by watch_jobsets): what observe_jobset reads."""
    status = body.get("status") or {}
    meta = body.get("metadata") or {}
    return {(namespace, labels[naming.LABEL_RUN]): {
        "metadata": {"name": name, "uid": meta.get("uid"), "labels": dict(labels),
                     "creationTimestamp": meta.get("creationTimestamp")},
        "spec": {"suspend": bool((body.get("spec") or {}).get("suspend"))},
        "status": {"conditions": podstate.plain(status.get("conditions") or []), "restarts": status.get("restarts") or 0},
    }}


async def jobset_changed(namespace, labels, **_):
    STATE.wake(namespace, labels[naming.LABEL_RUN])


def watch_jobsets() -> None:
    """Watch the runs' JobSets (only where the cluster serves them: a watch of a missing resource fails)."""
    group, version = jobrender.JOBSET_API_VERSION.split("/")
    kopf.index(group, version, "jobsets", labels={naming.LABEL_RUN: kopf.PRESENT})(jobset_index)
    kopf.on.event(group, version, "jobsets", labels={naming.LABEL_RUN: kopf.PRESENT})(jobset_changed)


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
    except Exception as error:  # any failure is retried, as long as it may succeed
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
async def run_daemon(stopped, namespace, name, body, job_index, pod_index, logger, **kwargs):
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
                status, result = await reconcile(_run_body(body), status, job_index, STATE, pod_index=pod_index,
                                                 jobset_index=kwargs.get("jobset_index"))
                if status.get("phase") in TERMINAL and not result.delete:
                    if not done:
                        log.info("MoTRun %s/%s is %s: %s", namespace, name, status["phase"],
                                 status.get("message", ""))
                    done = True
                    delay = 3600.0  # nothing left to do but wait for deletion
                elif result.requeue_after is not None:
                    delay = min(delay, max(result.requeue_after, 0.05))
            except Exception as error:  # keep the loop alive, count and retry
                metrics.RECONCILE_ERRORS.inc()
                logger.exception(f"reconcile of {namespace}/{name} failed: {error}")
                status = podstate.plain(body.get("status") or {})  # our view may be off: re-read
                delay = ERROR_RETRY_SECONDS
            await _sleep(wake, stopped, delay)
    finally:
        STATE.drop_waker(namespace, name)

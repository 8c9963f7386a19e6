"""A test kubelet plus Job controller: runs each unsuspended batch/v1 Job's container as a local
process and writes the Pod and Job status the way Kubernetes 1.31+ does.

Nothing runs Pods against the test API server (tests/support/kube.py), so this plays both parts:
for a Job it creates a Pod (labels incl. `batch.kubernetes.io/job-name`, owned by the Job), runs the
container command with the Job's env (secretKeyRef resolved from Secrets, fieldRef from the Pod,
`MOT_TERMINATION_LOG` pointed at a file, emptyDir mounts mapped to a scratch folder), then writes
the Pod's `containerStatuses[].state.terminated {exitCode, message}` and the Job's status
(`SuccessCriteriaMet`+`Complete`, or `FailureTarget`+`Failed` with reason `PodFailurePolicy` when a
`FailJob` exit-code rule matches, else `BackoffLimitExceeded`). Suspended Jobs are not started;
a running Job that gets suspended has its process killed and its Pod deleted, as the Job
controller does. At most `max_parallel` processes run at once, each with OMP_NUM_THREADS=1.

`instant=True` finishes Jobs at once without running anything (benchmarks); `inject_failure()`
makes chosen Jobs exit with a chosen code instead of running.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
TERMINATION_MESSAGE_LIMIT = 4096  # bytes, as the kubelet truncates
FALLBACK_LOG_LINES = 80  # FallbackToLogsOnError takes the last 80 lines (or 2048 bytes)

BASE_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8"}


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Fault:
    """Make matching Jobs exit with `exit_code` (and `message`) instead of running, `times` times."""

    match: Callable[[dict], bool]
    exit_code: int
    message: str
    times: int | None = None  # None: every time
    used: int = 0


@dataclass
class PodRun:
    """What happened to one Pod: for assertions (e.g. no Job ran twice)."""

    namespace: str
    job: str
    pod: str
    labels: dict
    exit_code: int | None = None
    message: str = ""
    started: float = 0.0
    finished: float = 0.0
    injected: bool = False


@dataclass
class _Active:
    run: PodRun
    process: subprocess.Popen | None = None
    cancelled: bool = False


@dataclass
class LocalKubelet:
    api_url: str
    workdir: Path
    max_parallel: int = 2
    instant: bool = False
    instant_message: Callable[[dict], str] = lambda job: json.dumps({"final_loss": 1.0})
    bin_dirs: list[str] = field(default_factory=lambda: [str(Path(sys.executable).parent)])
    extra_env: dict = field(default_factory=dict)
    poll_seconds: float = 5.0

    runs: list[PodRun] = field(default_factory=list)
    seen_at: dict = field(default_factory=dict)  # (namespace, job) -> time first seen
    completed_at: dict = field(default_factory=dict)  # (namespace, job) -> time its status said done
    faults: list[Fault] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._session = requests.Session()
        self._lock = threading.Lock()
        self._active: dict[tuple[str, str], _Active] = {}  # (namespace, job) -> what runs it
        self._done: set[str] = set()  # Job uids already finished
        self._holds: list[tuple[Callable[[dict], bool], threading.Event]] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.max_parallel), thread_name_prefix="pod")
        self._thread: threading.Thread | None = None

    # -- public --------------------------------------------------------------------------------
    def start(self) -> LocalKubelet:
        self._thread = threading.Thread(target=self._loop, name="kubelet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for active in self._active.values():
                active.cancelled = True
                if active.process and active.process.poll() is None:
                    active.process.kill()
        self._pool.shutdown(wait=True, cancel_futures=True)
        # The watch thread ignores every event from now on and ends at its watch timeout; no need to wait.

    def inject_failure(self, match: Callable[[dict], bool], exit_code: int = 1, *, times: int | None = None,
                       message: str | None = None) -> Fault:
        fault = Fault(match, exit_code, message or f"injected failure: exit code {exit_code}", times)
        with self._lock:
            self.faults.append(fault)
        return fault

    def fail_teacher(self, teacher: str, exit_code: int = 1, *, times: int | None = None,
                     message: str | None = None) -> Fault:
        """Shortcut: fail the branch Jobs of `teacher` (the first `times` attempts, or always)."""
        return self.inject_failure(
            lambda job: (job["metadata"].get("labels") or {}).get("mot.dev/teacher") == teacher,
            exit_code, times=times, message=message)

    def hold(self, match: Callable[[dict], bool]) -> threading.Event:
        """Keep matching Jobs' Pods Running (process not started) until the returned event is set."""
        release = threading.Event()
        with self._lock:
            self._holds.append((match, release))
        return release

    def runs_of(self, job: str) -> list[PodRun]:
        with self._lock:
            return [run for run in self.runs if run.job == job]

    # -- API helpers ---------------------------------------------------------------------------
    def _url(self, path: str) -> str:
        return self.api_url + path

    def _get(self, path: str) -> dict | None:
        response = self._session.get(self._url(path), timeout=30)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()

    def _patch_status(self, namespace: str, job: str, status: dict) -> None:
        response = self._session.patch(
            self._url(f"/apis/batch/v1/namespaces/{namespace}/jobs/{job}/status"), json={"status": status},
            headers={"Content-Type": "application/merge-patch+json"}, timeout=30)
        if response.status_code != 404:  # a Job deleted meanwhile is fine
            response.raise_for_status()

    # -- the watch loop ------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                listing = self._get("/apis/batch/v1/jobs")
                for job in listing["items"]:
                    self._on_job("ADDED", job)
                self._watch(listing["metadata"]["resourceVersion"])
            except requests.RequestException:
                if self._stop.wait(0.5):
                    return

    def _watch(self, resource_version: str) -> None:
        url = self._url(f"/apis/batch/v1/jobs?watch=true&resourceVersion={resource_version}"
                        f"&timeoutSeconds={int(self.poll_seconds)}")
        with self._session.get(url, stream=True, timeout=(10, self.poll_seconds + 30)) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if self._stop.is_set():
                    return
                if not line:
                    continue
                event = json.loads(line)
                if event["type"] == "ERROR":
                    return  # relist
                self._on_job(event["type"], event["object"])

    def _on_job(self, kind: str, job: dict) -> None:
        meta = job["metadata"]
        key = (meta["namespace"], meta["name"])
        self.seen_at.setdefault(key, time.time())
        status = job.get("status") or {}
        suspended = bool(job["spec"].get("suspend"))
        finished = _has_condition(status, "Complete") or _has_condition(status, "Failed")
        with self._lock:
            active = self._active.get(key)
            if kind == "DELETED" or (active and suspended):
                if active:  # deleted or suspended while running: the Pod goes
                    self._cancel(active, delete_pod=kind != "DELETED")
                start = None
            elif finished or meta["uid"] in self._done or active or suspended:
                start = None
            else:
                run = PodRun(meta["namespace"], meta["name"], f"{meta['name']}-{os.urandom(3).hex()[:5]}",
                             dict(job["spec"]["template"].get("metadata", {}).get("labels") or {}))
                start = self._active[key] = _Active(run)
                self.runs.append(run)
        if start is not None:
            self._pool.submit(self._run_pod, job, start)
        elif suspended and kind != "DELETED" and not finished and not _has_condition(status, "Suspended"):
            self._mark_suspended(job)

    def _cancel(self, active: _Active, delete_pod: bool) -> None:
        active.cancelled = True
        if active.process and active.process.poll() is None:
            active.process.send_signal(signal.SIGTERM)
        if delete_pod:
            self._session.delete(self._url(f"/api/v1/namespaces/{active.run.namespace}/pods/{active.run.pod}"),
                                 timeout=30)

    def _mark_suspended(self, job: dict) -> None:
        meta = job["metadata"]
        conditions = [c for c in (job.get("status") or {}).get("conditions") or [] if c["type"] != "Suspended"]
        conditions.append(_condition("Suspended", "JobSuspended", "Job suspended"))
        self._patch_status(meta["namespace"], meta["name"], {"active": 0, "conditions": conditions})

    # -- running one Pod -----------------------------------------------------------------------
    def _run_pod(self, job: dict, active: _Active) -> None:
        run = active.run
        meta = job["metadata"]
        key = (meta["namespace"], meta["name"])
        try:
            if active.cancelled:
                return
            container = job["spec"]["template"]["spec"]["containers"][0]
            pod = self._create_pod(job, run)
            if self.instant and not self.faults and not self._holds:
                # Benchmarks: no Running phase, no process; straight to the terminated Pod and Job.
                run.started = run.finished = time.time()
                run.exit_code, run.message = 0, self.instant_message(job)
                self._finish(job, container, run, 0, run.message, current=job)
                return
            status = job.get("status") or {}
            conditions = [c for c in status.get("conditions") or [] if c["type"] != "Suspended"]
            if _has_condition(status, "Suspended"):
                conditions.append(_condition("Suspended", "JobResumed", "Job resumed", "False"))
            self._patch_status(run.namespace, run.job, {
                "startTime": status.get("startTime") or _now(), "active": 1, "ready": 0,
                "conditions": conditions or None})
            self._set_pod_phase(run, "Running", container, running=True)
            run.started = time.time()
            exit_code, message = self._execute(job, container, pod, active)
            run.finished = time.time()
            run.exit_code, run.message = exit_code, message
            if active.cancelled:
                return
            self._finish(job, container, run, exit_code, message)
        except Exception as error:  # noqa: BLE001 - a kubelet bug must be visible, not silent
            run.message = f"test kubelet error: {error!r}"
            print(f"test kubelet: {key}: {error!r}", file=sys.stderr)
        finally:
            with self._lock:
                if self._active.get(key) is active:
                    del self._active[key]

    def _create_pod(self, job: dict, run: PodRun) -> dict:
        meta = job["metadata"]
        template = job["spec"]["template"]
        labels = dict(run.labels, **{JOB_NAME_LABEL: meta["name"], "job-name": meta["name"],
                                     "batch.kubernetes.io/controller-uid": meta["uid"]})
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": run.pod, "namespace": meta["namespace"], "labels": labels,
                            "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
                            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                                                 "uid": meta["uid"], "controller": True,
                                                 "blockOwnerDeletion": True}]},
               "spec": template["spec"], "status": {"phase": "Pending"}}
        response = self._session.post(self._url(f"/api/v1/namespaces/{meta['namespace']}/pods"), json=pod,
                                      timeout=30)
        response.raise_for_status()
        return response.json()

    def _set_pod_phase(self, run: PodRun, phase: str, container: dict, *, running: bool = False,
                       exit_code: int | None = None, message: str = "") -> None:
        if running:
            state = {"running": {"startedAt": _now()}}
        else:
            state = {"terminated": {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                                    "message": message, "startedAt": _now(), "finishedAt": _now()}}
        self._session.patch(
            self._url(f"/api/v1/namespaces/{run.namespace}/pods/{run.pod}/status"),
            json={"status": {"phase": phase, "containerStatuses": [
                {"name": container["name"], "image": container.get("image", ""), "imageID": "",
                 "containerID": f"local://{run.pod}", "ready": running, "started": running,
                 "restartCount": 0, "state": state}]}},
            headers={"Content-Type": "application/merge-patch+json"}, timeout=30)

    def _fault_for(self, job: dict) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if (fault.times is None or fault.used < fault.times) and fault.match(job):
                    fault.used += 1
                    return fault
        return None

    def _execute(self, job: dict, container: dict, pod: dict, active: _Active) -> tuple[int, str]:
        with self._lock:
            holds = [release for match, release in self._holds if match(job)]
        for release in holds:
            while not release.wait(0.1) and not active.cancelled and not self._stop.is_set():
                pass
        if active.cancelled:
            return 137, "killed: the Job was suspended or deleted"
        fault = self._fault_for(job)
        if fault is not None:
            active.run.injected = True
            return fault.exit_code, fault.message
        if self.instant:
            return 0, self.instant_message(job)
        scratch = Path(tempfile.mkdtemp(prefix=f"{active.run.pod}-", dir=self.workdir))
        termination_log = scratch / "termination-log"
        env = self._environment(job, container, pod, scratch)
        env["MOT_TERMINATION_LOG"] = str(termination_log)
        log_path = scratch / "container.log"
        argv = list(container.get("command") or []) + list(container.get("args") or [])
        argv[0] = shutil.which(argv[0], path=env["PATH"]) or argv[0]
        # Each real Pod has its own network namespace; local processes share one, so a fixed
        # container port (the trainer's --metrics-port) becomes "any free port" here.
        argv = [_free_port_arg(argv, i) for i in range(len(argv))]
        with open(log_path, "wb") as log:
            try:
                process = subprocess.Popen(argv, env=env, cwd=scratch, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)
            except OSError as error:  # like a container that cannot start
                return 128, f"cannot start {argv[0]}: {error}"
            active.process = process
            exit_code = process.wait()
        message = termination_log.read_text(errors="replace") if termination_log.exists() else ""
        if not message.strip() and exit_code != 0 and container.get("terminationMessagePolicy") == \
                "FallbackToLogsOnError":
            message = "\n".join(log_path.read_text(errors="replace").splitlines()[-FALLBACK_LOG_LINES:])
        if exit_code != 0:
            print(f"test kubelet: {active.run.job} exited {exit_code}; log {log_path}", file=sys.stderr)
        return exit_code, message.encode()[-TERMINATION_MESSAGE_LIMIT:].decode(errors="replace")

    def _environment(self, job: dict, container: dict, pod: dict, scratch: Path) -> dict:
        namespace = job["metadata"]["namespace"]
        # emptyDir mounts become folders of the scratch dir; env values under a mount follow them.
        empty_dirs = {v["name"] for v in job["spec"]["template"]["spec"].get("volumes") or [] if "emptyDir" in v}
        mounts = {m["mountPath"]: scratch / m["name"] for m in container.get("volumeMounts") or []
                  if m["name"] in empty_dirs}
        for local in mounts.values():
            local.mkdir(parents=True, exist_ok=True)
        env = dict(BASE_ENV, PATH=os.pathsep.join(self.bin_dirs + [os.environ.get("PATH", "")]))
        env.update(self.extra_env)
        for item in container.get("env") or []:
            value = item.get("value")
            source = item.get("valueFrom")
            if source and "secretKeyRef" in source:
                value = self._secret_value(namespace, source["secretKeyRef"])
            elif source and "fieldRef" in source:
                value = _field_value(pod, source["fieldRef"]["fieldPath"])
            if value is None:
                continue
            for mount, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
                if value == mount or value.startswith(mount.rstrip("/") + "/"):
                    value = str(local) + value[len(mount.rstrip("/")):]
                    break
            env[item["name"]] = value
        return env

    def _secret_value(self, namespace: str, ref: dict) -> str | None:
        secret = self._get(f"/api/v1/namespaces/{namespace}/secrets/{ref['name']}")
        data = (secret or {}).get("data") or {}
        if ref["key"] in data:
            return base64.b64decode(data[ref["key"]]).decode()
        if ref["key"] in ((secret or {}).get("stringData") or {}):
            return secret["stringData"][ref["key"]]
        if ref.get("optional"):
            return None
        raise RuntimeError(f"secret {namespace}/{ref['name']} has no key {ref['key']!r}")

    def _finish(self, job: dict, container: dict, run: PodRun, exit_code: int, message: str,
                current: dict | None = None) -> None:
        self._set_pod_phase(run, "Succeeded" if exit_code == 0 else "Failed", container,
                            exit_code=exit_code, message=message)
        current = current or self._get(f"/apis/batch/v1/namespaces/{run.namespace}/jobs/{run.job}")
        if current is None:
            return
        status = current.get("status") or {}
        conditions = [c for c in status.get("conditions") or [] if c["type"] not in ("Suspended",)]
        if exit_code == 0:
            conditions += [_condition("SuccessCriteriaMet", "CompletionsReached", "Reached expected number of succeeded pods"),
                           _condition("Complete", "CompletionsReached", "Reached expected number of succeeded pods")]
            counts = {"succeeded": 1, "failed": 0}
        else:
            rule = _fail_job_rule(job, container["name"], exit_code)
            if rule is not None:
                reason = "PodFailurePolicy"
                text = (f"Container {container['name']} for pod {run.namespace}/{run.pod} failed with exit code "
                        f"{exit_code} matching FailJob rule at index {rule}")
            else:
                reason, text = "BackoffLimitExceeded", "Job has reached the specified backoff limit"
            conditions += [_condition("FailureTarget", reason, text), _condition("Failed", reason, text)]
            counts = {"succeeded": 0, "failed": 1}
        self.completed_at[(run.namespace, run.job)] = time.time()
        self._patch_status(run.namespace, run.job, {
            **counts, "active": 0, "ready": 0, "terminating": 0, "conditions": conditions,
            "startTime": status.get("startTime") or _now(),
            **({"completionTime": _now()} if exit_code == 0 else {})})
        with self._lock:
            self._done.add(job["metadata"]["uid"])


def _condition(kind: str, reason: str, message: str, status: str = "True") -> dict:
    now = _now()
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastProbeTime": now, "lastTransitionTime": now}


def _has_condition(status: dict, kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True" for c in status.get("conditions") or [])


def _fail_job_rule(job: dict, container: str, exit_code: int) -> int | None:
    """Index of the podFailurePolicy FailJob rule matching this exit code, as the Job controller finds it."""
    for index, rule in enumerate((job["spec"].get("podFailurePolicy") or {}).get("rules") or []):
        codes = rule.get("onExitCodes")
        if not codes or codes.get("containerName", container) != container:
            continue
        values = set(codes.get("values") or [])
        matched = exit_code in values if codes.get("operator") == "In" else exit_code not in values
        if matched:
            return index if rule.get("action") == "FailJob" else None
    return None


def _field_value(pod: dict, path: str) -> str | None:
    if path.startswith("metadata.annotations['"):
        return (pod["metadata"].get("annotations") or {}).get(path.split("'")[1])
    if path.startswith("metadata.labels['"):
        return (pod["metadata"].get("labels") or {}).get(path.split("'")[1])
    value = pod
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return None if value is None else str(value)


def _free_port_arg(argv: list[str], index: int) -> str:
    return "0" if index > 0 and argv[index - 1] == "--metrics-port" else argv[index]

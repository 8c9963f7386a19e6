"""A test kubelet for the real control plane (support/cluster.py): it registers a Node and runs the
Pods the scheduler binds to it as local processes. Everything else is Kubernetes' own: the Job
controller creates the Pods and decides the Jobs' status (backoff, podFailurePolicy, deadlines,
suspension), the scheduler binds them, the garbage collector deletes them.

What it does, as a kubelet does:
- registers Node `name` (capacity cpu, memory, pods, ephemeral-storage and `nvidia.com/gpu`;
  addresses InternalIP 127.0.0.1 and Hostname `name`; daemonEndpoints.kubeletEndpoint the port of
  its HTTPS endpoint), reports it Ready and renews its Lease in kube-node-lease, so the node
  lifecycle controller keeps it schedulable (`start()` returns once the node is Ready and untainted);
- gives every Pod its own IP, status.podIP / podIPs: a loopback address 127.1.x.y from a counter
  (Linux routes all of 127.0.0.0/8 to lo; never 127.0.0.1, the node's hostIP, never reused), so
  Pods bind the same port side by side as in their own network namespaces;
- watches the Pods bound to it (`spec.nodeName`) and runs each Pod's container (command + args)
  with the container's env: `value`, `valueFrom.secretKeyRef` / `configMapKeyRef` (read from the
  API), `fieldRef` (metadata.name/namespace/uid, metadata.labels['k'] / annotations['k'],
  spec.nodeName, spec.serviceAccountName, status.hostIP(s), status.podIP(s));
- pulls images, at once, except from a registry host under `.invalid` (RFC 2606: never resolves):
  that container stays waiting, ErrImagePull (containerd's "failed to pull and unpack image ...: no
  such host") alternating with ImagePullBackOff ("Back-off pulling image ...") under a doubling
  back-off (2 s up to 10 s here), the Pod Pending and not Ready, until it is deleted;
- enforces resources.limits.memory: every 0.2 s it sums VmRSS over the container's process group,
  and over the limit SIGKILLs the whole group and reports the container terminated with reason
  OOMKilled, exit code 137, as a kubelet reports a cgroup OOM kill;
- serves the kubelet API's GET /containerLogs/{namespace}/{pod}/{container} over HTTPS (a
  self-signed certificate made with openssl at start, on a free 127.0.0.1 port), so `kubectl logs`
  and pods/log work through the apiserver (support/cluster.py has it prefer InternalIP): the
  container's output, with tailLines and limitBytes; follow streams until the process ends;
  sinceSeconds / sinceTime / timestamps are ignored (the log has no time per line); a container
  not started yet answers as a kubelet ("is waiting to start: ...");
- reports the Pod's status through the pods/status subresource: Pending (container waiting,
  ContainerCreating) -> Running (Ready, container running) -> Succeeded or Failed with the container's
  `state.terminated` {exitCode, reason, message}; the message is the termination-message file, or
  the tail of the log under `FallbackToLogsOnError` when the file is empty and the exit code is not 0;
- honours deletion: a Pod given a deletionTimestamp has its process group sent SIGTERM, then SIGKILL
  after the Pod's grace period (at most `kill_grace` seconds here), is reported terminal, and is then
  deleted with grace period 0 (what a kubelet does last, so the Job controller sees it gone).

What differs because there is no container runtime here:
- no image is unpacked (only a `.invalid` registry fails its pull): the command runs from this venv (`bin_dirs` first on PATH: `mot-train`,
  `python`, `torchrun`, `mot` are this checkout's), with the node's runtime defaults BASE_ENV
  (one thread per process: the machine has 2 cores) under the container's env;
- emptyDir volumes are folders of the Pod's scratch folder; an env value (and workingDir) under a
  mount path is rewritten to the folder (HOME=/tmp -> <scratch>/scratch). Other volume kinds,
  envFrom and resourceFieldRef are not supported: the container stays waiting with reason
  CreateContainerConfigError, as a kubelet reports a container it cannot configure;
- the termination-message file is `<scratch>/termination-log`, passed in MOT_TERMINATION_LOG (what
  `mot-train` writes to when set): a container's terminationMessagePath cannot be bind-mounted;
- every Pod would have its own network namespace; these processes share one, so a server that
  binds all interfaces (0.0.0.0) would collide with the same port of another Pod: the Pod's IP is
  passed in MOT_METRICS_ADDRESS, which the trainer's metrics/progress server binds (ports are kept as
  given: `--metrics-port 9090` stays 9090);
- Pod DNS is a hosts file, not a DNS server: each process runs in its own mount and UTS namespaces
  (`unshare`), its hostname the Pod's (spec.hostname, else its name) and a hosts file of its scratch
  folder bound over /etc/hosts: the machine's entries, the Pod's own (`<ip> <hostname>.<subdomain>.<ns>
  .svc.cluster.local <hostname>`, as a kubelet writes it) and, as CoreDNS serves from a headless
  Service's EndpointSlices, `<hostname>.<subdomain>.<ns>.svc.cluster.local` (and `.svc`, `<ns>`, and
  `<hostname>.<subdomain>` within the namespace: what the search domains complete) of every Pod with
  spec.hostname (an Indexed Job's `<job>-<index>`) whose subdomain names a headless Service selecting it
  in its namespace, in any LocalNode of the process. A record is added when the Pod gets its IP (or when
  such a Service appears later) and removed when its run ends, and every live Pod's hosts file is
  rewritten in place (glibc reads it on each lookup), so `<job>-0.<service>.<ns>.svc` rendezvous work.
  Readiness is not considered (as publishNotReadyAddresses: true); nothing else resolves (no Service
  ClusterIP or SRV records, no `<ip-dashed>` names); a Service deleted later keeps its records. Where
  the bind mount is not allowed (not root, no CAP_SYS_ADMIN: `pod_dns_problem()` says why), Pods run
  without any of it;
- at most `max_parallel` processes run at once (2 cores); other Pods wait in ContainerCreating.
- Pods it cannot run (restartPolicy other than Never, several containers, init containers) are
  rejected: phase Failed with a reason and message, as a kubelet rejects a Pod at admission.

Test conveniences (each a way to make a container behave, never a change to Kubernetes' part):
`hold(match)` keeps matching Pods Running without starting their command until released (a
long-running container); `inject_failure(match, exit_code, message)` runs, instead of the matching
Pods' command, a process that writes `message` to its termination log and exits with `exit_code`;
`kill(match, sig=SIGKILL)` signals the process group of matching Pods' running container (reported as
any exit: by SIGKILL, exit code 137, reason Error);
`runs` / `runs_of(job)` record every Pod run. A `match` is called with the Pod. For benchmarks,
`instant=message(pod)` makes every Pod succeed at once with that termination message, no process.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import itertools
import json
import os
import platform
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import requests

from support.cluster import KubeCluster, _die_with_parent
from support.processes import wait_until

FIXTURES = ("kube_node",)

JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
TERMINATION_MESSAGE_LIMIT = 4096  # bytes, as the kubelet truncates
FALLBACK_LOG_LINES = 80           # FallbackToLogsOnError: the last 80 lines ...
FALLBACK_LOG_BYTES = 2048         # ... or 2048 bytes, whichever is less
LEASE_SECONDS = 40
NODE_IP = "127.0.0.1"
MEMORY_POLL_SECONDS = 0.2         # how often a memory-limited container's resident memory is read
LOG_POLL_SECONDS = 0.2            # how often a followed log is read for more

BASE_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8"}

# What an injected failure runs: a real process writing its termination message, then exiting.
_FAIL_CODE = ("import os, sys\n"
              "open(os.environ['MOT_TERMINATION_LOG'], 'w').write(sys.argv[1])\n"
              "sys.exit(int(sys.argv[2]))\n")


# Pod IPs: 127.1.x.y (Linux routes all of 127.0.0.0/8 to lo, so each is bindable without setup), one per
# Pod, never reused and never 127.0.0.1 (the node's own address, where the control plane listens).
# Module-wide so that several LocalNodes in one process never hand out the same address.
_pod_numbers = itertools.count()


def _next_pod_ip() -> str:
    high, low = divmod(next(_pod_numbers) % (256 * 254), 254)
    return f"127.1.{high}.{low + 1}"


# Pod DNS, as CoreDNS serves it from a headless Service's EndpointSlices: `<hostname>.<subdomain>` of a Pod
# with spec.hostname whose subdomain names a headless Service selecting it. Module-wide, as _pod_numbers:
# several LocalNodes in one process are one cluster. Every live Pod's hosts file is rewritten on a change.
CLUSTER_DOMAIN = "cluster.local"
_dns_lock = threading.Lock()
_dns_records: dict[str, tuple[str, str, str]] = {}   # Pod uid -> (namespace, "<hostname>.<subdomain>", IP)
_hosts_files: dict[str, tuple[str, str, Path]] = {}  # Pod uid -> (namespace, its own entry, its hosts file)
# In the Pod's own mount and UTS namespaces: its hosts file over /etc/hosts, its hostname, then its command.
_POD_SHELL = 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"'


def _in_pod_namespaces(hosts: Path, hostname: str, argv: list[str]) -> list[str]:
    """argv run with `hosts` as /etc/hosts and `hostname` as its hostname (unshare execs, and so does
    the shell: the process keeps its PID, still its group's leader)."""
    return ["unshare", "--mount", "--uts", "--propagation", "private", "--", "sh", "-c", _POD_SHELL,
            str(hosts), hostname, *argv]


@functools.cache
def pod_dns_problem() -> str | None:
    """None where Pods get DNS (a private mount namespace with a hosts file bound over /etc/hosts: root
    or CAP_SYS_ADMIN); else why not, checked once: Pods then run without it."""
    folder = Path(tempfile.mkdtemp(prefix="mot-dns-probe-"))
    probe = folder / "hosts"
    probe.write_text("127.1.255.254 mot-dns-probe\n")
    try:
        result = subprocess.run(_in_pod_namespaces(probe, "mot-dns-probe", ["grep", "-q", "mot-dns-probe",
                                                                            "/etc/hosts"]),
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"no Pod DNS in the test kubelet: {error}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if result.returncode != 0:
        return (f"no Pod DNS in the test kubelet: cannot bind a hosts file over /etc/hosts in a private "
                f"mount namespace (exit {result.returncode}: {result.stderr.strip()[:300]})")
    return None


@functools.cache
def _machine_hosts() -> str:
    return Path("/etc/hosts").read_text()


def _pod_hostname(pod: dict) -> str:
    """spec.hostname, else the Pod's name (at most 63 characters), as the kubelet names the Pod's host."""
    return pod["spec"].get("hostname") or pod["metadata"]["name"][:63].rstrip("-.")


def _hosts_text(namespace: str, own: str) -> str:
    """A Pod's /etc/hosts: the machine's, its own entry (as the kubelet writes), then the DNS records
    under the names its resolver would find them by (search <namespace>.svc.cluster.local, svc.cluster.local,
    cluster.local): `<hostname>.<subdomain>` only for a Pod of its own namespace."""
    lines = [_machine_hosts().rstrip("\n"), "# Kubernetes-managed hosts file (the test kubelet).", own,
             "# Cluster DNS: <hostname>.<subdomain> of the Pods under a headless Service."]
    for record_namespace, name, ip in _dns_records.values():
        names = [f"{name}.{record_namespace}.svc.{CLUSTER_DOMAIN}", f"{name}.{record_namespace}.svc",
                 f"{name}.{record_namespace}"] + ([name] if record_namespace == namespace else [])
        lines.append(f"{ip}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


def _rewrite_hosts_files() -> None:
    """Rewrite every live Pod's hosts file in place (its inode is what is bound over /etc/hosts in the
    Pod; glibc reads it again on each lookup; a rename would leave the Pod the old file): written over,
    then cut to length, so a lookup meanwhile never finds it empty. Called with _dns_lock held."""
    for namespace, own, path in _hosts_files.values():
        try:
            with open(path, "r+") as hosts:
                hosts.write(_hosts_text(namespace, own))
                hosts.truncate()
        except FileNotFoundError:
            pass  # its scratch folder is gone: the Pod is ending


def _dns_add_hosts_file(uid: str, namespace: str, own: str, path: Path) -> None:
    with _dns_lock:
        path.write_text(_hosts_text(namespace, own))
        _hosts_files[uid] = (namespace, own, path)


def _dns_add_record(uid: str, namespace: str, name: str, ip: str) -> None:
    with _dns_lock:
        if uid not in _hosts_files:
            return  # the Pod's run has ended meanwhile
        _dns_records[uid] = (namespace, name, ip)
        _rewrite_hosts_files()


def _dns_forget(uid: str) -> None:
    with _dns_lock:
        _hosts_files.pop(uid, None)
        if _dns_records.pop(uid, None) is not None:
            _rewrite_hosts_files()


def dns_records() -> dict[str, str]:
    """Every record served now: `<hostname>.<subdomain>.<namespace>.svc.cluster.local` -> IP."""
    with _dns_lock:
        return {f"{name}.{namespace}.svc.{CLUSTER_DOMAIN}": ip
                for namespace, name, ip in _dns_records.values()}


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _condition(kind: str, status: bool, reason: str | None = None, message: str | None = None) -> dict:
    condition = {"type": kind, "status": "True" if status else "False", "lastProbeTime": None,
                 "lastTransitionTime": _now()}
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    return condition


class ContainerConfigError(Exception):
    """The container cannot be configured (a missing Secret key, an unsupported volume...)."""


@dataclass
class Fault:
    """Run `exit_code` + `message` instead of the command of matching Pods (`times` times, or always)."""

    match: Callable[[dict], bool]
    exit_code: int
    message: str
    times: int | None = None
    used: int = 0


@dataclass
class PodRun:
    """One Pod this node ran (or was told to run): for assertions."""

    namespace: str
    pod: str
    uid: str
    job: str | None                 # the batch.kubernetes.io/job-name label
    labels: dict
    exit_code: int | None = None    # None while it runs
    reason: str = ""
    message: str = ""
    started: float = 0.0
    finished: float = 0.0
    injected: bool = False
    deleted: bool = False           # ended because the Pod was deleted
    log: Path | None = None
    ip: str = ""                    # status.podIP
    container: str = ""             # the container's name (GET /containerLogs)
    waiting: str = ""               # the container's last waiting reason (ContainerCreating, ErrImagePull...)


@dataclass
class _Pod:
    pod: dict
    run: PodRun
    deleting: threading.Event = field(default_factory=threading.Event)
    gone: threading.Event = field(default_factory=threading.Event)     # DELETED seen
    process: subprocess.Popen | None = None
    thread: threading.Thread | None = None
    hosts: Path | None = None       # its /etc/hosts (Pod DNS), when the machine allows it


@dataclass
class LocalNode:
    """See the module docstring. `start()` registers the node and starts watching; `stop()` kills
    every process it started and deletes the Node."""

    cluster: KubeCluster
    workdir: Path
    name: str = "mot-node-1"
    gpus: int = 8
    cpu: str = "16"
    memory: str = "64Gi"
    max_pods: int = 110
    max_parallel: int = 2
    kill_grace: float = 10.0
    heartbeat_seconds: float = 5.0
    # Image pull back-off: ErrImagePull shown this long, then ImagePullBackOff for 2 s, 4 s ... at most
    # image_pull_backoff_max (a kubelet: 10 s doubling to 300 s; short here so tests see it alternate).
    err_image_pull_seconds: float = 1.0
    image_pull_backoff: float = 2.0
    image_pull_backoff_max: float = 10.0
    bin_dirs: list[str] = field(default_factory=lambda: [str(Path(sys.executable).parent)])
    extra_env: dict = field(default_factory=dict)
    # Benchmarks: every Pod (not held, no fault) succeeds at once, no process, with this message.
    instant: Callable[[dict], str] | None = None

    runs: list[PodRun] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._pods: dict[str, _Pod] = {}        # uid -> what runs it
        self._done: set[str] = set()            # uids run to the end: later (stale) events ignored
        self._holds: list[tuple[Callable[[dict], bool], threading.Event]] = []
        self._dns_pending: dict[str, _Pod] = {}  # uid -> a Pod whose subdomain's Service is not there yet
        self._slots = threading.BoundedSemaphore(self.max_parallel)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._session = self._new_session()
        self.errors: list[str] = []             # the kubelet's own failures (a test bug, not a Pod's)
        self.startup_seconds = 0.0              # registration until Ready and untainted
        self._server: ThreadingHTTPServer | None = None
        self.kubelet_port = 0                   # the HTTPS endpoint (containerLogs), once started

    # -- public --------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> LocalNode:
        began = time.monotonic()
        self._serve_kubelet_api()
        self._register()
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._watch_loop, "pod-watch"),
                             (self._dns_loop, "dns")):
            thread = threading.Thread(target=target, name=f"{self.name}-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

        def schedulable():
            node = self._get(f"/api/v1/nodes/{self.name}")
            ready = any(c["type"] == "Ready" and c["status"] == "True"
                        for c in (node.get("status") or {}).get("conditions") or [])
            taints = [t for t in (node.get("spec") or {}).get("taints") or []
                      if t.get("effect") in ("NoSchedule", "NoExecute")]
            return ready and not taints
        wait_until(schedulable, timeout, f"node {self.name} Ready without taints", interval=0.5,
                   on_timeout=lambda: json.dumps(self._get(f"/api/v1/nodes/{self.name}"), indent=1)[:3000])
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self, timeout: float = 20) -> None:
        self._stop.set()
        with self._lock:
            entries = list(self._pods.values())
        for entry in entries:
            entry.deleting.set()
            self._signal(entry, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        for entry in entries:
            if entry.thread is not None:
                entry.thread.join(max(0.0, deadline - time.monotonic()))
        try:
            self._request("DELETE", f"/api/v1/nodes/{self.name}", ok=(404,))
        except requests.RequestException as error:
            print(f"test kubelet {self.name}: deleting the Node: {error!r}", file=sys.stderr)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        # The watch and heartbeat threads see _stop within their poll interval; they are daemons.

    def hold(self, match: Callable[[dict], bool]) -> threading.Event:
        """Keep matching Pods Running without starting their command until the returned event is set."""
        release = threading.Event()
        with self._lock:
            self._holds.append((match, release))
        return release

    def inject_failure(self, match: Callable[[dict], bool], exit_code: int = 1, *, times: int | None = None,
                       message: str | None = None) -> Fault:
        fault = Fault(match, exit_code, message or f"injected failure: exit code {exit_code}", times)
        with self._lock:
            self.faults.append(fault)
        return fault

    def kill(self, match: Callable[[dict], bool], sig: int = signal.SIGKILL) -> list[str]:
        """Send `sig` to the process group of the running container of every Pod `match` selects (as
        something outside the Pod would): its exit is reported as any other (SIGKILL: exit code 137,
        reason Error). The names of the Pods signalled."""
        with self._lock:
            entries = [entry for entry in self._pods.values() if match(entry.pod)]
        signalled = []
        for entry in entries:
            process = entry.process
            if process is None or process.poll() is not None:
                continue  # not started yet (held, waiting for a slot), or already ended
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                continue
            signalled.append(entry.run.pod)
        return signalled

    def runs_of(self, job: str, namespace: str | None = None) -> list[PodRun]:
        """The Pods run for Job `job` (its `batch.kubernetes.io/job-name` label), oldest first."""
        with self._lock:
            return [run for run in self.runs if run.job == job and namespace in (None, run.namespace)]

    # -- API -----------------------------------------------------------------------------------
    def _new_session(self) -> requests.Session:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.cluster.admin_token}"
        session.headers["User-Agent"] = f"mot-test-kubelet/{self.name}"
        session.verify = str(self.cluster.ca_file)
        session.trust_env = False  # REQUESTS_CA_BUNDLE would replace `verify`; no proxy for loopback
        session.mount("https://", requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=32))
        return session

    def _request(self, method: str, path: str, *, ok: tuple[int, ...] = (), json_body=None,
                 content_type: str | None = None, params: dict | None = None, timeout: float = 30):
        headers = {"Content-Type": content_type} if content_type else {}
        response = self._session.request(method, self.cluster.server + path, json=json_body, params=params,
                                         headers=headers, timeout=timeout)
        if response.status_code in ok:
            return None
        if response.status_code >= 400:
            raise requests.HTTPError(f"{method} {path}: {response.status_code} {response.text[:1000]}",
                                     response=response)
        return response.json()

    def _get(self, path: str, *, missing_ok: bool = False):
        return self._request("GET", path, ok=(404,) if missing_ok else ())

    def _patch_pod_status(self, pod: dict, status: dict) -> None:
        meta = pod["metadata"]
        self._request("PATCH", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
                      json_body={"metadata": {"uid": meta["uid"]}, "status": status}, ok=(404, 409),
                      content_type="application/strategic-merge-patch+json")

    # -- the Node ------------------------------------------------------------------------------
    def _register(self) -> None:
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.name, "labels": {
            "kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": arch,
            "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": arch}}, "spec": {}}
        created = self._request("POST", "/api/v1/nodes", json_body=node, ok=(409,))
        uid = (created or self._get(f"/api/v1/nodes/{self.name}"))["metadata"]["uid"]
        resources = {"cpu": self.cpu, "memory": self.memory, "pods": str(self.max_pods),
                     "ephemeral-storage": "100Gi", "nvidia.com/gpu": str(self.gpus)}
        boot = uuid.uuid4().hex
        self._node_status = {
            "capacity": resources, "allocatable": resources,
            "addresses": [{"type": "InternalIP", "address": NODE_IP}, {"type": "Hostname", "address": self.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
            "nodeInfo": {"machineID": boot, "systemUUID": boot, "bootID": boot,
                         "kernelVersion": platform.release(), "osImage": "mot test kubelet",
                         "containerRuntimeVersion": "local://0.1", "kubeletVersion": self.cluster.version,
                         "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": arch},
        }
        self._post_node_status()
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": self.name, "namespace": "kube-node-lease",
                              "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": self.name,
                                                   "uid": uid}]},
                 "spec": {"holderIdentity": self.name, "leaseDurationSeconds": LEASE_SECONDS,
                          "renewTime": _micro_now()}}
        self._request("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", json_body=lease,
                      ok=(409,))

    def _post_node_status(self) -> None:
        now = _now()
        conditions = [
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            ("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
        ]
        status = dict(self._node_status, conditions=[
            {"type": kind, "status": value, "reason": reason, "message": message,
             "lastHeartbeatTime": now, "lastTransitionTime": now} for kind, value, reason, message in conditions])
        self._request("PATCH", f"/api/v1/nodes/{self.name}/status", json_body={"status": status},
                      content_type="application/strategic-merge-patch+json")

    def _heartbeat_loop(self) -> None:
        beats = 0
        while not self._stop.wait(self.heartbeat_seconds):
            beats += 1
            try:
                self._request("PATCH", f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.name}",
                              json_body={"spec": {"renewTime": _micro_now(), "holderIdentity": self.name}},
                              content_type="application/merge-patch+json")
                if beats % 6 == 0:  # the Ready condition's heartbeat, less often (as a kubelet does)
                    self._post_node_status()
            except requests.RequestException as error:
                if not self._stop.is_set():
                    print(f"test kubelet {self.name}: heartbeat: {error!r}", file=sys.stderr)

    # -- the kubelet's HTTPS endpoint ----------------------------------------------------------
    def _serve_kubelet_api(self) -> None:
        """Serve GET /containerLogs (what `kubectl logs` reaches through the apiserver) and /healthz on
        a free 127.0.0.1 port with a self-signed certificate, as a kubelet's self-signed serving
        certificate (the apiserver verifies it only when given --kubelet-certificate-authority)."""
        pki = self.workdir / "pki"
        pki.mkdir(exist_ok=True)
        cert, key = pki / "kubelet.crt", pki / "kubelet.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "2", "-subj", f"/CN={self.name}", "-keyout", str(key), "-out", str(cert),
                        "-addext", f"subjectAltName=IP:{NODE_IP},DNS:{self.name}"], check=True, capture_output=True)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server = ThreadingHTTPServer((NODE_IP, 0), _KubeletHandler)
        server.daemon_threads = True
        # The handshake is done in each request's thread (_KubeletHandler.setup), not in the accept loop.
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        server.node = self
        self._server = server
        self.kubelet_port = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, daemon=True,
                                  name=f"{self.name}-kubelet-api")
        thread.start()
        self._threads.append(thread)

    def _log_run(self, namespace: str, pod: str) -> PodRun | None:
        with self._lock:
            return next((run for run in reversed(self.runs) if (run.namespace, run.pod) == (namespace, pod)), None)

    def container_logs(self, handler: BaseHTTPRequestHandler, namespace: str, pod: str, container: str,
                       query: dict[str, str]) -> None:
        """GET /containerLogs/{namespace}/{pod}/{container}: the container's output (stdout and stderr,
        as they were written) with tailLines and limitBytes; follow streams until the process ends.
        sinceSeconds, sinceTime and timestamps are ignored: the log keeps no time per line."""
        run = self._log_run(namespace, pod)
        if run is None:
            return handler.send_text(404, f'pod "{pod}" does not exist')
        if container != run.container:
            return handler.send_text(404, f'container "{container}" not found in pod "{pod}"')
        # The kubelet's own wording (validateContainerLogStatus), which `kubectl logs` prints.
        if query.get("previous") == "true":
            return handler.send_text(400, f'previous terminated container "{container}" in pod "{pod}" not found')
        if not run.started:
            if run.exit_code is not None:
                return handler.send_text(400, f'container "{container}" in pod "{pod}" is terminated')
            reason = run.waiting or "ContainerCreating"
            if reason in ("ErrImagePull", "ImagePullBackOff"):
                reason = "trying and failing to pull image"
            return handler.send_text(400, f'container "{container}" in pod "{pod}" is waiting to start: {reason}')
        try:
            tail = int(query["tailLines"]) if "tailLines" in query else None
            left = int(query["limitBytes"]) if "limitBytes" in query else None
        except ValueError as error:
            return handler.send_text(400, f"invalid query: {error}")
        follow = query.get("follow") == "true"
        handler.send_response(200)
        handler.send_header("Content-Type", "text/plain")
        handler.send_header("Connection", "close")  # no length: the body ends when the connection closes
        handler.end_headers()
        offset = _tail_offset(run.log, tail) if tail is not None else 0
        while left is None or left > 0:
            ended = run.exit_code is not None  # read before the file: what the process wrote last is read
            try:
                with open(run.log, "rb") as log:
                    log.seek(offset)
                    data = log.read(left if left is not None else -1)
            except FileNotFoundError:
                data = b""  # Running but its command not started yet (a held Pod): no output yet
            if data:
                handler.wfile.write(data)
                handler.wfile.flush()
                offset += len(data)
                left = None if left is None else left - len(data)
            elif not follow or ended or self._stop.is_set():
                break
            else:
                time.sleep(LOG_POLL_SECONDS)

    # -- watching Pods -------------------------------------------------------------------------
    def _watch_loop(self) -> None:
        session = self._new_session()
        selector = f"spec.nodeName={self.name}"
        while not self._stop.is_set():
            try:
                listing = session.get(self.cluster.server + "/api/v1/pods",
                                      params={"fieldSelector": selector}, timeout=30)
                listing.raise_for_status()
                listing = listing.json()
                for pod in listing["items"]:
                    self._on_pod("ADDED", pod)
                version = listing["metadata"]["resourceVersion"]
                while not self._stop.is_set():
                    version = self._watch(session, selector, version)
                    if version is None:
                        break  # expired: list again
            except (requests.RequestException, ValueError) as error:
                if self._stop.wait(0.5):
                    return
                print(f"test kubelet {self.name}: pod watch: {error!r}", file=sys.stderr)

    def _watch(self, session: requests.Session, selector: str, version: str) -> str | None:
        params = {"fieldSelector": selector, "watch": "true", "resourceVersion": version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": "15"}
        with session.get(self.cluster.server + "/api/v1/pods", params=params, stream=True,
                         timeout=(10, 45)) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if self._stop.is_set():
                    return version
                if not line:
                    continue
                event = json.loads(line)
                if event["type"] == "ERROR":
                    return None
                version = event["object"]["metadata"].get("resourceVersion") or version
                if event["type"] != "BOOKMARK":
                    self._on_pod(event["type"], event["object"])
        return version

    def _on_pod(self, kind: str, pod: dict) -> None:
        if self._stop.is_set():
            return
        meta = pod["metadata"]
        uid = meta["uid"]
        with self._lock:
            entry = self._pods.get(uid)
            if entry is None:
                finished = (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
                if uid in self._done or kind == "DELETED" or finished:
                    return  # nothing to run (done before this kubelet saw it, or already gone)
                labels = dict(meta.get("labels") or {})
                run = PodRun(meta["namespace"], meta["name"], uid, labels.get(JOB_NAME_LABEL), labels)
                entry = self._pods[uid] = _Pod(pod, run)
                self.runs.append(run)
                entry.thread = threading.Thread(target=self._run_pod, args=(entry,), daemon=True,
                                                name=f"pod-{meta['name']}")
                start = True
            else:
                entry.pod = pod
                start = False
        if kind == "DELETED":
            entry.gone.set()
        if meta.get("deletionTimestamp") or kind == "DELETED":
            if not entry.deleting.is_set():
                entry.deleting.set()
                self._signal(entry, signal.SIGTERM)
        if start:
            entry.thread.start()

    # -- running one Pod -----------------------------------------------------------------------
    def _run_pod(self, entry: _Pod) -> None:
        run = entry.run
        try:
            self._run_pod_inner(entry)
        except Exception as error:
            message = f"test kubelet {self.name}: pod {run.namespace}/{run.pod}: {error!r}"
            self.errors.append(message)
            print(message, file=sys.stderr)
        finally:
            with self._lock:
                self._pods.pop(run.uid, None)
                self._dns_pending.pop(run.uid, None)
                self._done.add(run.uid)
            _dns_forget(run.uid)

    def _run_pod_inner(self, entry: _Pod) -> None:
        pod, run = entry.pod, entry.run
        rejected = self._admit(pod["spec"])
        if rejected:
            run.exit_code, run.reason, run.message = -1, *rejected
            self._patch_pod_status(pod, {"phase": "Failed", "reason": rejected[0], "message": rejected[1],
                                         "conditions": [_condition("Ready", False, "PodFailed")]})
            return
        container = pod["spec"]["containers"][0]
        run.container = container["name"]
        run.ip = _next_pod_ip()
        base = {"hostIP": NODE_IP, "hostIPs": [{"ip": NODE_IP}], "podIP": run.ip, "podIPs": [{"ip": run.ip}],
                "startTime": _now()}
        if self.instant is not None and not self._faults_or_holds():
            # One status write: the container ran and exited 0 (the benchmark's trainer stand-in).
            run.started = run.finished = time.time()
            run.exit_code, run.reason, run.message = 0, "Completed", self.instant(pod)
            self._report(entry, base, "Succeeded", terminated={
                "exitCode": 0, "reason": "Completed", "message": run.message, "startedAt": base["startTime"],
                "finishedAt": _now(), "containerID": f"local://{run.uid}"})
            return
        self._report(entry, base, "Pending", waiting=("ContainerCreating", None))
        scratch = Path(tempfile.mkdtemp(prefix=f"{run.namespace}-{run.pod}-", dir=self.workdir))
        run.log = scratch / "container.log"
        if pod_dns_problem() is None:
            self._pod_dns(entry, scratch / "hosts")
        # As a kubelet: the image is pulled first, then the container configured (env, mounts).
        pulled = self._pull_image(entry, container.get("image", ""), base)
        config = self._configure(entry, container, scratch, base) if pulled else None
        if config is None or not self._run_container(entry, container, config, base):
            # Deleted before its container was created: it never ran.
            run.finished = time.time()
            run.exit_code, run.reason, run.deleted = 137, "ContainerStatusUnknown", True
            run.message = "The container could not be located when the pod was terminated"
            self._report(entry, base, "Failed", terminated={
                "exitCode": 137, "reason": run.reason, "message": run.message, "finishedAt": _now()})
        if entry.deleting.is_set() and not entry.gone.is_set() and not self._stop.is_set():
            meta = entry.pod["metadata"]
            # The final delete: grace period 0, only this Pod (not one re-created under its name).
            self._request("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                          json_body={"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                                     "preconditions": {"uid": meta["uid"]}}, ok=(404, 409))

    def _pod_dns(self, entry: _Pod, hosts: Path) -> None:
        """The Pod's hosts file (the machine's, its own entry, the cluster's records) and its own record,
        now if its subdomain's headless Service selects it, else once it does (_dns_loop)."""
        pod, run = entry.pod, entry.run
        hostname, subdomain = _pod_hostname(pod), pod["spec"].get("subdomain")
        fqdn = f"{hostname}.{subdomain}.{run.namespace}.svc.{CLUSTER_DOMAIN}"
        own = f"{run.ip}\t{fqdn}\t{hostname}" if subdomain else f"{run.ip}\t{hostname}"
        _dns_add_hosts_file(run.uid, run.namespace, own, hosts)
        entry.hosts = hosts
        # No record without spec.hostname: only then does the EndpointSlice controller give one.
        if subdomain and pod["spec"].get("hostname"):
            if self._selected_by_service(pod):
                _dns_add_record(run.uid, run.namespace, f"{hostname}.{subdomain}", run.ip)
            else:
                with self._lock:
                    self._dns_pending[run.uid] = entry

    def _selected_by_service(self, pod: dict) -> bool:
        """Whether the headless Service named like the Pod's subdomain, in its namespace, selects it."""
        meta = pod["metadata"]
        service = self._get(f"/api/v1/namespaces/{meta['namespace']}/services/{pod['spec']['subdomain']}",
                            missing_ok=True)
        spec = (service or {}).get("spec") or {}
        selector, labels = spec.get("selector") or {}, meta.get("labels") or {}
        return spec.get("clusterIP") == "None" and bool(selector) and \
            all(labels.get(key) == value for key, value in selector.items())

    def _dns_loop(self) -> None:
        """Pods whose Service came later get their record once it selects them (as CoreDNS would)."""
        while not self._stop.wait(1.0):
            with self._lock:
                pending = list(self._dns_pending.values())
            for entry in pending:
                try:
                    if not self._selected_by_service(entry.pod):
                        continue
                except requests.RequestException as error:
                    print(f"test kubelet {self.name}: dns: {error!r}", file=sys.stderr)
                    continue
                with self._lock:
                    self._dns_pending.pop(entry.run.uid, None)
                run, spec = entry.run, entry.pod["spec"]
                name = f"{_pod_hostname(entry.pod)}.{spec['subdomain']}"
                _dns_add_record(run.uid, run.namespace, name, run.ip)

    def _faults_or_holds(self) -> bool:
        with self._lock:
            return bool(self.faults or self._holds)

    def _stopping(self, entry: _Pod) -> bool:
        return entry.deleting.is_set() or self._stop.is_set()

    def _pull_image(self, entry: _Pod, image: str, base: dict) -> bool:
        """Images are "pulled" at once, except from a registry that cannot resolve (a host under
        `.invalid`, RFC 2606): then, as a kubelet, ErrImagePull and ImagePullBackOff alternate with a
        doubling back-off until the Pod is deleted (False)."""
        failure = _pull_failure(image)
        if failure is None:
            return True
        backoff = self.image_pull_backoff
        while not self._stopping(entry):
            self._report(entry, base, "Pending", waiting=("ErrImagePull", failure))
            if entry.deleting.wait(self.err_image_pull_seconds):
                break
            self._report(entry, base, "Pending", waiting=("ImagePullBackOff", f'Back-off pulling image "{image}"'))
            entry.deleting.wait(backoff)
            backoff = min(2 * backoff, self.image_pull_backoff_max)
        return False

    def _configure(self, entry: _Pod, container: dict, scratch: Path, base: dict):
        """(argv, env, cwd), retried while it cannot be configured (a Secret not there yet...); None
        when the Pod is deleted first. A Pod waiting here takes no process slot."""
        while not self._stopping(entry):
            try:
                return self._container_process(entry, container, scratch, scratch / "termination-log")
            except ContainerConfigError as error:
                self._report(entry, base, "Pending", waiting=("CreateContainerConfigError", str(error)))
                entry.deleting.wait(2.0)
        return None

    def _run_container(self, entry: _Pod, container: dict, config: tuple, base: dict) -> bool:
        """Run the container to its end and report it terminated; False when it was deleted before it
        started. Held Pods are Running (without a slot) until released; a process needs a slot."""
        argv, env, cwd = config
        run = entry.run
        started_at = None

        def running() -> str:
            run.started = time.time()
            self._report(entry, base, "Running", running=(now := _now()))
            return now

        with self._lock:
            holds = [release for match, release in self._holds if match(entry.pod)]
        if holds:
            started_at = running()
            for release in holds:
                while not release.wait(0.1) and not self._stopping(entry):
                    pass
        got_slot = False
        try:
            while not self._stopping(entry) and not (got_slot := self._slots.acquire(timeout=0.2)):
                pass
            if not got_slot:
                if started_at is None:
                    return False
                # Deleted while held: the container is stopped before its command ran (SIGTERM).
                exit_code, reason, message = 128 + signal.SIGTERM, "Error", ""
            else:
                started_at = started_at or running()
                fault = self._fault_for(entry.pod)
                if fault is not None:
                    run.injected = True
                    argv = [shutil.which("python", path=env["PATH"]) or sys.executable, "-c", _FAIL_CODE,
                            fault.message, str(fault.exit_code)]
                exit_code, reason, message = self._execute(entry, container, argv, env, cwd)
        finally:
            if got_slot:
                self._slots.release()
        run.finished = time.time()
        run.exit_code, run.reason, run.message = exit_code, reason, message
        run.deleted = entry.deleting.is_set()
        if exit_code != 0:
            print(f"test kubelet {self.name}: {run.namespace}/{run.pod} exited {exit_code}; log {run.log}",
                  file=sys.stderr)
        self._report(entry, base, "Succeeded" if exit_code == 0 else "Failed", terminated={
            "exitCode": exit_code, "reason": reason, "message": message or None,
            "startedAt": started_at, "finishedAt": _now(), "containerID": f"local://{run.uid}"})
        return True

    def _execute(self, entry: _Pod, container: dict, argv: list[str], env: dict, cwd: Path) -> tuple[int, str, str]:
        """Start the process and wait for it: (exit code, reason, termination message)."""
        termination_log = Path(env["MOT_TERMINATION_LOG"])
        if entry.hosts is not None:
            # The shell would exec a missing command with exit 127: the runtime's StartError instead.
            program = Path(cwd, argv[0])
            if "/" not in argv[0] or not program.is_file() or not os.access(program, os.X_OK):
                return 128, "StartError", f"cannot start {argv[0]}: no such executable file"
            argv = _in_pod_namespaces(entry.hosts, _pod_hostname(entry.pod), argv)
        with open(entry.run.log, "wb") as log:
            try:
                process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True,
                                           preexec_fn=_die_with_parent)
            except OSError as error:  # as a container whose command cannot start
                return 128, "StartError", f"cannot start {argv[0]}: {error}"
            entry.process = process
            if entry.deleting.is_set():  # deleted while starting
                self._signal(entry, signal.SIGTERM)
            exit_code, oom_killed = self._wait(entry, process, _memory_limit(container))
        message = self._termination_message(container, termination_log, entry.run.log, exit_code)
        if oom_killed:
            return 137, "OOMKilled", message  # as a kubelet reports a cgroup OOM kill (SIGKILL)
        return exit_code, "Completed" if exit_code == 0 else "Error", message

    @staticmethod
    def _admit(spec: dict) -> tuple[str, str] | None:
        if spec.get("restartPolicy", "Always") != "Never":
            return "UnsupportedPodSpec", (f"the test kubelet runs only restartPolicy Never Pods, "
                                          f"not {spec.get('restartPolicy', 'Always')}")
        if len(spec.get("containers") or []) != 1 or spec.get("initContainers"):
            return "UnsupportedPodSpec", "the test kubelet runs Pods of exactly one container, no init containers"
        return None

    def _report(self, entry: _Pod, base: dict, phase: str, *, waiting: tuple[str, str | None] | None = None,
                running: str | None = None, terminated: dict | None = None) -> None:
        container = entry.pod["spec"]["containers"][0]
        status = {"name": container["name"], "image": container.get("image", ""), "imageID": "",
                  "restartCount": 0, "ready": running is not None, "started": running is not None}
        if waiting:
            entry.run.waiting = waiting[0]
            status["state"] = {"waiting": {"reason": waiting[0], **({"message": waiting[1]} if waiting[1] else {})}}
        elif running:
            status["state"] = {"running": {"startedAt": running}}
            status["containerID"] = f"local://{entry.run.uid}"
        else:
            status["state"] = {"terminated": {k: v for k, v in terminated.items() if v is not None}}
            if terminated.get("containerID"):
                status["containerID"] = terminated["containerID"]
        if phase == "Pending":
            conditions = [_condition("PodReadyToStartContainers", False), _condition("Initialized", True),
                          _condition("ContainersReady", False, "ContainersNotReady",
                                     f"containers with unready status: [{container['name']}]"),
                          _condition("Ready", False, "ContainersNotReady",
                                     f"containers with unready status: [{container['name']}]")]
        elif phase == "Running":
            conditions = [_condition("PodReadyToStartContainers", True), _condition("Initialized", True),
                          _condition("ContainersReady", True), _condition("Ready", True)]
        else:
            reason = "PodCompleted" if phase == "Succeeded" else "PodFailed"
            conditions = [_condition("PodReadyToStartContainers", False), _condition("Initialized", True, reason),
                          _condition("ContainersReady", False, reason), _condition("Ready", False, reason)]
        self._patch_pod_status(entry.pod, dict(base, phase=phase, conditions=conditions, containerStatuses=[status]))

    def _fault_for(self, pod: dict) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if (fault.times is None or fault.used < fault.times) and fault.match(pod):
                    fault.used += 1
                    return fault
        return None

    def _signal(self, entry: _Pod, sig: int) -> None:
        process = entry.process
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                pass

    def _wait(self, entry: _Pod, process: subprocess.Popen, memory_limit: int | None = None) -> tuple[int, bool]:
        """Until the process exits: (exit code, OOM-killed). After a deletion, SIGKILL once the grace
        period is over; with a memory limit, SIGKILL to the whole group as soon as its resident memory
        exceeds it (what a cgroup v2 OOM kill with memory.oom.group does to a container)."""
        kill_at = None
        oom_killed = False
        while True:
            try:
                code = process.wait(timeout=MEMORY_POLL_SECONDS)
                break
            except subprocess.TimeoutExpired:
                pass
            if memory_limit is not None and not oom_killed and _group_rss(process.pid) > memory_limit:
                oom_killed = True
                self._signal(entry, signal.SIGKILL)
            if (entry.deleting.is_set() or self._stop.is_set()) and kill_at is None:
                grace = entry.pod["metadata"].get("deletionGracePeriodSeconds")
                grace = self.kill_grace if grace is None else min(float(grace), self.kill_grace)
                kill_at = time.monotonic() + (0 if self._stop.is_set() else grace)
                self._signal(entry, signal.SIGTERM)
            if kill_at is not None and time.monotonic() >= kill_at:
                self._signal(entry, signal.SIGKILL)
        return (128 - code if code < 0 else code), oom_killed  # by a signal: 128 + its number, as a runtime says

    @staticmethod
    def _termination_message(container: dict, path: Path, log: Path, exit_code: int) -> str:
        message = path.read_bytes()[:TERMINATION_MESSAGE_LIMIT].decode(errors="replace") if path.exists() else ""
        if not message.strip() and exit_code != 0 and container.get("terminationMessagePolicy") == \
                "FallbackToLogsOnError":
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-FALLBACK_LOG_LINES:])
            message = tail.encode()[-FALLBACK_LOG_BYTES:].decode(errors="replace")
        return message

    # -- the container's process ---------------------------------------------------------------
    def _container_process(self, entry: _Pod, container: dict, scratch: Path,
                           termination_log: Path) -> tuple[list[str], dict, Path]:
        """argv, env and working folder of the container (ContainerConfigError when it cannot be)."""
        pod = entry.pod
        namespace = pod["metadata"]["namespace"]
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        mounts = {}
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount["name"])
            if volume is None or "emptyDir" not in volume:
                raise ContainerConfigError(f"volume {mount['name']!r}: the test kubelet mounts emptyDir volumes only")
            local = scratch / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"].rstrip("/") or "/"] = local

        def local_path(value: str) -> str:
            for mount, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
                if value == mount or value.startswith(mount + "/"):
                    return str(local) + value[len(mount):]
            return value

        if container.get("envFrom"):
            raise ContainerConfigError("envFrom is not supported by the test kubelet")
        env = dict(BASE_ENV, PATH=os.pathsep.join(self.bin_dirs + ["/usr/local/bin:/usr/bin:/bin"]),
                   HOSTNAME=_pod_hostname(pod))
        env.update(self.extra_env)
        for item in container.get("env") or []:
            value = item.get("value", "")
            source = item.get("valueFrom")
            if source:
                value = self._env_source(namespace, pod, source, entry.run.ip)
                if value is None:
                    continue  # an optional key that is not there
            env[item["name"]] = local_path(value)
        env["MOT_TERMINATION_LOG"] = str(termination_log)
        # The Pod's own address: a real Pod's servers bind all interfaces of its network namespace; here
        # the namespace is shared, so the trainer binds its metrics/progress server to this address only.
        env["MOT_METRICS_ADDRESS"] = entry.run.ip

        argv = [_expand(word, env) for word in list(container.get("command") or []) + list(container.get("args") or [])]
        if not argv:
            raise ContainerConfigError("no command: the test kubelet has no image entrypoint to run")
        argv[0] = shutil.which(argv[0], path=env["PATH"]) or argv[0]
        cwd = Path(local_path(container["workingDir"])) if container.get("workingDir") else scratch
        if not cwd.is_dir():
            raise ContainerConfigError(f"workingDir {container.get('workingDir')!r} is not a mounted emptyDir")
        return argv, env, cwd

    def _env_source(self, namespace: str, pod: dict, source: dict, pod_ip: str) -> str | None:
        if "secretKeyRef" in source or "configMapKeyRef" in source:
            secret = "secretKeyRef" in source
            ref = source["secretKeyRef" if secret else "configMapKeyRef"]
            kind = "secrets" if secret else "configmaps"
            obj = self._get(f"/api/v1/namespaces/{namespace}/{kind}/{ref['name']}", missing_ok=True)
            data = (obj or {}).get("data") or {}
            if ref["key"] in data:
                return base64.b64decode(data[ref["key"]]).decode() if secret else data[ref["key"]]
            if ref.get("optional"):
                return None
            what = "secret" if secret else "configmap"
            if obj is None:
                raise ContainerConfigError(f'{what} "{ref["name"]}" not found')
            raise ContainerConfigError(f"couldn't find key {ref['key']} in {what.capitalize()} {namespace}/{ref['name']}")
        if "fieldRef" in source:
            return _field_value(pod, source["fieldRef"]["fieldPath"], pod_ip)
        raise ContainerConfigError(f"env source {sorted(source)} is not supported by the test kubelet")


class _KubeletHandler(BaseHTTPRequestHandler):
    """The kubelet API's part the apiserver uses here: /containerLogs (pods/log) and /healthz."""

    server_version = "mot-test-kubelet"

    def setup(self) -> None:
        self.request.settimeout(30)
        self.request.do_handshake()
        super().setup()

    def handle(self) -> None:
        try:
            super().handle()
        except (OSError, ssl.SSLError):
            pass  # the client went away (an interrupted `kubectl logs -f`) or never finished its handshake

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        parts = [unquote(part) for part in url.path.strip("/").split("/")]
        if parts == ["healthz"]:
            return self.send_text(200, "ok")
        if len(parts) == 4 and parts[0] == "containerLogs":
            self.request.settimeout(None)  # a followed log streams for as long as the container runs
            return self.server.node.container_logs(self, *parts[1:], query)
        return self.send_text(404, "404 page not found")

    def send_text(self, code: int, text: str) -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        pass  # the apiserver's requests are not the test's output


def _tail_offset(path: Path, lines: int) -> int:
    """Where the last `lines` lines of the file begin (a last line without newline counts as one)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    if lines <= 0:
        return len(data)
    end = len(data) - 1 if data.endswith(b"\n") else len(data)
    for _ in range(lines):
        end = data.rfind(b"\n", 0, end)
        if end < 0:
            return 0
    return end + 1


def _expand(word: str, env: dict) -> str:
    """$(VAR) references in command and args, as the kubelet expands them ($$ escapes)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), word)


def _field_value(pod: dict, path: str, pod_ip: str) -> str:
    meta = pod["metadata"]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    values = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": meta["uid"],
              "spec.nodeName": pod["spec"].get("nodeName", ""),
              "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
              "status.hostIP": NODE_IP, "status.hostIPs": NODE_IP, "status.podIP": pod_ip, "status.podIPs": pod_ip}
    if path not in values:
        raise ContainerConfigError(f"fieldRef {path!r} is not supported by the test kubelet")
    return values[path]


_QUANTITY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
                      "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "m": 10**-3, "": 1}


def _memory_limit(container: dict) -> int | None:
    """resources.limits.memory in bytes (a Kubernetes quantity: 64Mi, 1G, 128974848, 1e9), or None."""
    quantity = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    if quantity is None:
        return None
    match = re.fullmatch(r"([0-9.]+(?:[eE][-+]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m|)", str(quantity).strip())
    if not match:
        raise ContainerConfigError(f"resources.limits.memory {quantity!r} is not a quantity")
    return int(float(match.group(1)) * _QUANTITY_SUFFIXES[match.group(2)])


def _group_rss(pgid: int) -> int:
    """The resident memory (VmRSS) of every process in process group `pgid`, in bytes."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            # After "(comm)": state, ppid, pgrp, ... (comm may itself hold spaces and parentheses).
            if int(stat[stat.rindex(")") + 2:].split()[2]) != pgid:
                continue
            for line in Path(f"/proc/{entry.name}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024  # kB
                    break
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
    return total


def _pull_failure(image: str) -> str | None:
    """The pull error for an image whose registry cannot resolve (a host under `.invalid`), worded as
    containerd's through the CRI; None for any other image (pulled at once)."""
    first, _, rest = image.partition("/")
    if not rest or not ("." in first or ":" in first or first == "localhost"):
        return None  # a Docker Hub image (python:3.11, library/x)
    host = first.rsplit(":", 1)[0] if first.count(":") == 1 else first
    if not host.lower().rstrip(".").endswith(".invalid"):
        return None
    if "@" in rest:
        repository, reference = rest.split("@", 1)
    else:
        repository, _, reference = rest.rpartition(":") if ":" in rest.rsplit("/", 1)[-1] else (rest, "", "latest")
    ref = f"{first}/{repository}{'@' if '@' in rest else ':'}{reference}"
    return (f'rpc error: code = Unknown desc = failed to pull and unpack image "{ref}": failed to resolve reference '
            f'"{ref}": failed to do request: Head "https://{first}/v2/{repository}/manifests/{reference}": '
            f"dial tcp: lookup {host}: no such host")


@pytest.fixture(scope="session")
def kube_node(kube_cluster, tmp_path_factory):
    """The test kubelet on the session's control plane (node `mot-node-1`, 8 GPUs), shared by the
    session: match faults and holds by namespace."""
    node = LocalNode(kube_cluster, tmp_path_factory.mktemp("kube-node")).start()
    try:
        yield node
    finally:
        node.stop()

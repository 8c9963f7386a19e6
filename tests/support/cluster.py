"""A real Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager and
kube-scheduler, all on 127.0.0.1, no kubelet and no Nodes.

The binaries come from tests/cluster/build.sh (the Makefile's `cluster-bins` target, a
prerequisite of `make test`), built at the versions pinned in tests/cluster/go.mod into
`${MOT_CACHE:-~/.cache/mot-operator}/kube/v<version>/`; `MOT_KUBE_BIN_DIR` points elsewhere. A test
using the cluster fails with that instruction when they are missing.

The session fixture `kube_cluster` starts everything once (a few seconds), waits until each part
answers its health check, and yields a `KubeCluster`: the admin kubeconfig and token, the server URL
and CA, `kubectl(...)` and `service_account_token(...)`. Tests share it: create your own namespace,
and remember that CRDs and other cluster-scoped objects are seen by every test after yours. At the
end of the session every process gets SIGTERM, then SIGKILL; each is also started with a parent-death
signal, so a killed pytest leaves nothing behind.

Setup: RBAC authorization; a static token file (an admin in system:masters, the controller-manager
and scheduler as their bootstrap RBAC users); a ServiceAccount signing key and issuer, so
`kubectl create token` works; the ServiceAccount admission plugin off (Pods do not need a token
controller); the controller-manager with `--use-service-account-credentials`, all default
controllers (Job, garbage collector, ttl-after-finished, namespace, serviceaccount, ...) and no
leader election; the apiserver generates its own serving certificate in its --cert-dir, and reaches
kubelets (pods/log) at their InternalIP without verifying their certificate.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support.processes import stop_process

FIXTURES = ("kube_cluster",)

ROOT = Path(__file__).resolve().parents[2]
GO_MOD = ROOT / "tests" / "cluster" / "go.mod"
KUBECTL = Path(sys.executable).parent / "kubectl"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
START_TIMEOUT = 90.0


def pinned_version(go_mod: Path, module: str) -> str:
    """The version a go.mod requires of `module` (e.g. `v1.36.5`)."""
    match = re.search(rf"^\s*{re.escape(module)}\s+(v\S+)", go_mod.read_text(), re.MULTILINE)
    assert match, f"no {module} version in {go_mod}"
    return match.group(1)


def cache_dir(kind: str, version: str) -> Path:
    """Where the build scripts put what they build (keep in step with cache_dir in tests/cluster/lib.sh)."""
    cache = os.environ.get("MOT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mot-operator"
    return Path(cache) / kind / version


def kube_version() -> str:
    """The Kubernetes version tests/cluster/go.mod pins."""
    return pinned_version(GO_MOD, "k8s.io/kubernetes")


def built_dir(env_var: str, kind: str, version: str) -> Path:
    """Where a build script puts what it builds: $env_var when set, else the cache folder."""
    return Path(os.environ[env_var]) if os.environ.get(env_var) else cache_dir(kind, version)


def bin_dir() -> Path:
    """Where build.sh puts the binaries ($MOT_KUBE_BIN_DIR elsewhere)."""
    return built_dir("MOT_KUBE_BIN_DIR", "kube", kube_version())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when pytest dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def write_kubeconfig(path: Path, server: str, ca_file: Path, token: str, user: str = "user") -> Path:
    """A kubeconfig (JSON is valid YAML) that talks to `server` with a bearer `token`."""
    config = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "mot-test", "cluster": {"server": server, "certificate-authority": str(ca_file)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "mot-test", "context": {"cluster": "mot-test", "user": user}}],
        "current-context": "mot-test",
    }
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)
    return path


@dataclass
class Component:
    name: str
    process: subprocess.Popen
    log: Path

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            text = []
        return f"--- {self.name} (pid {self.process.pid}, exit {self.process.poll()}) {self.log}:\n" + "\n".join(text)


@dataclass
class KubeCluster:
    server: str                 # https://127.0.0.1:<port>
    kubeconfig: Path            # admin (system:masters)
    ca_file: Path               # verifies the apiserver's serving certificate
    admin_token: str
    workdir: Path
    version: str
    startup_seconds: float = 0.0
    components: list[Component] = field(default_factory=list, repr=False)

    def env(self, kubeconfig: Path | None = None) -> dict:
        """os.environ with KUBECONFIG set (to the admin one unless given)."""
        return {**os.environ, "KUBECONFIG": str(kubeconfig or self.kubeconfig)}

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60,
                kubeconfig: Path | None = None) -> subprocess.CompletedProcess:
        """Run the venv's kubectl against this cluster; text output. With check, a non-zero exit fails
        the test with kubectl's stderr."""
        result = subprocess.run([str(KUBECTL), *args], input=input, capture_output=True, text=True,
                                timeout=timeout, env=self.env(kubeconfig))
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {result.returncode}:\n{result.stderr}{result.stdout}")
        return result

    def get_json(self, *args: str, **kwargs) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json", **kwargs).stdout)

    def service_account_token(self, name: str, namespace: str = "default", *, create: bool = True,
                              duration: str = "1h") -> str:
        """A bound token for ServiceAccount `namespace/name` (TokenRequest, signed by the apiserver's
        key), creating the ServiceAccount (and namespace) first unless `create` is False."""
        if create:
            manifest = {"apiVersion": "v1", "kind": "List", "items": [
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
                {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}},
            ]}
            self.kubectl("apply", "-f", "-", input=json.dumps(manifest))
        return self.kubectl("create", "token", name, "-n", namespace, f"--duration={duration}").stdout.strip()

    def service_account_kubeconfig(self, name: str, namespace: str = "default", *, create: bool = True,
                                   duration: str = "1h", path: Path | None = None) -> Path:
        """A kubeconfig that authenticates as ServiceAccount `namespace/name` (so RBAC applies)."""
        token = self.service_account_token(name, namespace, create=create, duration=duration)
        path = path or self.workdir / f"kubeconfig-{namespace}-{name}"
        return write_kubeconfig(path, self.server, self.ca_file, token, user=f"{namespace}-{name}")

    def logs(self, lines: int = 40) -> str:
        return "\n".join(component.tail(lines) for component in self.components)

    def stop(self) -> None:
        for component in reversed(self.components):   # scheduler, controller-manager, apiserver, etcd
            stop_process(component.process, timeout=10)


def _get(url: str, context: ssl.SSLContext | None = None, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except (OSError, ssl.SSLError) as error:
        return 0, str(error)


def start_cluster(workdir: Path, binaries: Path | None = None, timeout: float = START_TIMEOUT,
                  apiserver_args: tuple[str, ...] = ()) -> KubeCluster:
    """Start etcd, kube-apiserver, kube-controller-manager and kube-scheduler under `workdir` and wait
    until all answer their health checks; on failure stop what started and raise with their logs.
    `apiserver_args` are added to the apiserver's (e.g. an audit log for the operator benchmark)."""
    binaries = binaries or bin_dir()
    missing = [name for name in BINARIES if not os.access(binaries / name, os.X_OK)]
    if missing:
        pytest.fail(f"control-plane binaries missing in {binaries}: {', '.join(missing)}; "
                    "build them with `make cluster-bins` (tests/cluster/build.sh, ~10 min cold)")
    if not KUBECTL.exists():
        pytest.fail(f"no kubectl at {KUBECTL}: install the test extra (`make test-deps`)")
    if not shutil.which("openssl"):
        pytest.fail("no openssl on PATH (the ServiceAccount signing key is made with it)")

    workdir.mkdir(parents=True, exist_ok=True)
    pki = workdir / "pki"
    pki.mkdir(exist_ok=True)
    sa_key = pki / "sa.key"
    subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True, capture_output=True)

    tokens = {user: secrets.token_hex(16) for user in ("admin", "controller-manager", "scheduler")}
    (pki / "tokens.csv").write_text(
        f'{tokens["admin"]},admin,admin,"system:masters"\n'
        f'{tokens["controller-manager"]},system:kube-controller-manager,system:kube-controller-manager\n'
        f'{tokens["scheduler"]},system:kube-scheduler,system:kube-scheduler\n')

    etcd_port, etcd_peer, api_port, cm_port, sched_port = (free_port() for _ in range(5))
    server = f"https://127.0.0.1:{api_port}"
    ca_file = pki / "apiserver.crt"      # the apiserver writes it (a self-signed CA + leaf) at start
    cluster = KubeCluster(server=server, kubeconfig=workdir / "admin.kubeconfig", ca_file=ca_file,
                          admin_token=tokens["admin"], workdir=workdir, version=kube_version())
    write_kubeconfig(cluster.kubeconfig, server, ca_file, tokens["admin"], user="admin")
    cm_kubeconfig = write_kubeconfig(workdir / "controller-manager.kubeconfig", server, ca_file,
                                     tokens["controller-manager"], user="system:kube-controller-manager")
    sched_kubeconfig = write_kubeconfig(workdir / "scheduler.kubeconfig", server, ca_file,
                                        tokens["scheduler"], user="system:kube-scheduler")

    def start(name: str, args: list[str]) -> Component:
        log = workdir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen([str(binaries / name), *args], stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, cwd=workdir, preexec_fn=_die_with_parent,
                                       env={**os.environ, "GOMAXPROCS": os.environ.get("MOT_KUBE_GOMAXPROCS", "2")})
        component = Component(name, process, log)
        cluster.components.append(component)
        return component

    deadline = time.monotonic() + timeout

    def wait(what: str, check, component: Component) -> None:
        last = None
        while time.monotonic() < deadline:
            if component.process.poll() is not None:
                raise RuntimeError(f"{component.name} exited with {component.process.returncode} "
                                   f"while waiting for {what}")
            ok, last = check()
            if ok:
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")

    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE

    try:
        etcd = start("etcd", [
            "--name=mot-test", f"--data-dir={workdir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-cluster=mot-test=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync", "--log-level=warn", "--quota-backend-bytes=2147483648",
        ])
        wait("etcd /health", lambda: (lambda r: (r[0] == 200 and '"true"' in r[1], r))(
            _get(f"http://127.0.0.1:{etcd_port}/health")), etcd)

        apiserver = start("kube-apiserver", [
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}",
            f"--cert-dir={pki}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            f"--service-account-key-file={sa_key}", f"--service-account-signing-key-file={sa_key}",
            f"--service-account-issuer={SA_ISSUER}",
            "--disable-admission-plugins=ServiceAccount",
            "--service-cluster-ip-range=10.96.0.0/16",
            # The test kubelet's Hostname address (its node name) resolves nowhere: reach it at its
            # InternalIP (the default order tries Hostname first and fails). Its self-signed serving
            # certificate is not verified: no --kubelet-certificate-authority.
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            "--profiling=false", "--v=1", *apiserver_args,
        ])
        # /readyz includes etcd, the RBAC bootstrap roles and the CRD informers; anonymous may read it.
        wait("kube-apiserver /readyz", lambda: (lambda r: (r[0] == 200, r))(
            _get(f"{server}/readyz", insecure)), apiserver)
        verify = ssl.create_default_context(cafile=str(ca_file))
        status, body = _get(f"{server}/version", verify, tokens["admin"])
        assert status == 200, f"apiserver /version with the admin token and its CA: {status} {body}"

        controller_manager = start("kube-controller-manager", [
            f"--kubeconfig={cm_kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={cm_port}", f"--cert-dir={workdir / 'controller-manager-pki'}",
            "--use-service-account-credentials", "--leader-elect=false", "--controllers=*",
            f"--service-account-private-key-file={sa_key}", f"--root-ca-file={ca_file}",
            "--kube-api-qps=100", "--kube-api-burst=200", "--profiling=false", "--v=1",
        ])
        scheduler = start("kube-scheduler", [
            f"--kubeconfig={sched_kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={sched_port}",
            "--leader-elect=false", "--kube-api-qps=100", "--kube-api-burst=200", "--profiling=false", "--v=1",
        ])
        wait("kube-controller-manager /healthz", lambda: (lambda r: (r[0] == 200, r))(
            _get(f"https://127.0.0.1:{cm_port}/healthz", insecure)), controller_manager)
        wait("kube-scheduler /readyz", lambda: (lambda r: (r[0] == 200, r))(
            _get(f"https://127.0.0.1:{sched_port}/readyz", insecure)), scheduler)
        # The serviceaccount controller runs: it makes `default` in every namespace.
        wait("ServiceAccount default/default", lambda: (lambda r: (r[0] == 200, r[0]))(
            _get(f"{server}/api/v1/namespaces/default/serviceaccounts/default", verify, tokens["admin"])),
            controller_manager)
    except BaseException as error:
        logs = cluster.logs()
        cluster.stop()
        if isinstance(error, (RuntimeError, TimeoutError, AssertionError)):
            raise RuntimeError(f"control plane did not start: {error}\n{logs}") from error
        raise
    return cluster


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory):
    """A real control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler), shared
    by the session; see the module docstring."""
    started = time.monotonic()
    cluster = start_cluster(tmp_path_factory.mktemp("kube-cluster"))
    cluster.startup_seconds = time.monotonic() - started
    try:
        yield cluster
    finally:
        cluster.stop()

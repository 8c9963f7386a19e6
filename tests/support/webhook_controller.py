"""Starting a controller-manager that serves admission (and conversion) webhooks as a local process
against the test control plane (tests/support/cluster.py), and stopping it: what Kueue
(support/kueue.py) and JobSet (support/jobset.py) share.

A start-up (`Launch`) makes certificates with openssl (a CA and a serving certificate for 127.0.0.1 /
localhost, in a folder that is the webhook server's certDir), picks free loopback ports for the
webhook, health and metrics servers, installs CRDs (their conversion-webhook patches pointed at
`https://127.0.0.1:<port><path>` with the CA bundle) by server-side apply and waits until they are
Established, starts the binary with the admin kubeconfig and a parent-death signal (a killed pytest
leaves nothing behind), installs the Mutating/ValidatingWebhookConfigurations with each webhook's
`clientConfig.service` rewritten to that URL, and waits for readiness (/readyz, the webhook server
answering with its certificate, then the controller's own probes, e.g. a server-side dry run),
timing each step. A start that fails stops the process and raises with its log.

`WebhookController.stop` deletes the webhook configurations first (their failurePolicy is Fail: the
objects they cover could not be created once the process is gone), then sends SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from support.cluster import Component, KubeCluster, _die_with_parent, _get, free_port
from support.processes import stop_process, wait_until

# A readiness check: (done, what was seen last, for the timeout's message).
Check = Callable[[], tuple[bool, object]]


@dataclass
class WebhookController:
    """A controller-manager started by `Launch`: its endpoints, process and start-up timings."""
    cluster: KubeCluster
    version: str
    webhook_url: str            # https://127.0.0.1:<port>
    health_url: str             # http://127.0.0.1:<port>
    metrics_url: str            # https://127.0.0.1:<port>/metrics (authenticated)
    ca_file: Path               # verifies the webhook and metrics servers
    workdir: Path
    component: Component
    webhook_configurations: dict[str, str] = field(default_factory=dict)   # kind -> name
    startup_seconds: float = 0.0
    timings: dict = field(default_factory=dict)   # seconds per start-up step

    def logs(self, lines: int = 60) -> str:
        return self.component.tail(lines)

    def stop(self) -> None:
        for kind, name in self.webhook_configurations.items():
            self.cluster.kubectl("delete", kind, name, "--ignore-not-found", "--wait=false", check=False)
        stop_process(self.component.process, timeout=10)


def make_certs(pki: Path, ca_name: str = "mot-test-webhook-ca") -> Path:
    """A CA (ca.crt) and a serving certificate signed by it for 127.0.0.1 and localhost (tls.crt,
    tls.key: the file names controller-runtime's webhook server reads from its certDir)."""
    pki.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=pki)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", f"/CN={ca_name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *ec, "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=127.0.0.1")
    (pki / "serving.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "tls.crt", "-days", "2", "-extfile", "serving.ext")
    return pki / "ca.crt"


def crd_manifests(source: Path, webhook_url: str, ca_bundle: str) -> list[dict]:
    """The CRDs as a config/components/crd/kustomization.yaml builds them: the resources it lists, with
    the conversion-webhook patches it enables pointed at `webhook_url` (other patches, such as
    cert-manager's CA-injection annotation, are left out: the caBundle is set here)."""
    kustomization = yaml.safe_load((source / "kustomization.yaml").read_text())
    crds = {}
    for resource in kustomization["resources"]:
        crd = yaml.safe_load((source / resource).read_text())
        crds[crd["metadata"]["name"]] = crd
    for patch in kustomization.get("patches", []):
        spec = yaml.safe_load((source / patch["path"]).read_text())
        if "conversion" not in (spec.get("spec") or {}):
            continue
        conversion = copy.deepcopy(spec["spec"]["conversion"])
        client = conversion["webhook"]["clientConfig"]
        client["url"] = webhook_url + client.pop("service")["path"]
        client["caBundle"] = ca_bundle
        crds[spec["metadata"]["name"]]["spec"]["conversion"] = conversion
    return list(crds.values())


def point_webhook(webhook: dict, webhook_url: str, ca_bundle: str) -> dict:
    """A webhook of a Mutating/ValidatingWebhookConfiguration called at `webhook_url` + its service path."""
    path = webhook["clientConfig"]["service"]["path"]
    webhook["clientConfig"] = {"url": webhook_url + path, "caBundle": ca_bundle}
    return webhook


def require_built(source: Path, names: tuple[str, ...], what: str, build_hint: str) -> None:
    """Fail the test, saying how to build them, when files of `source` or openssl are missing."""
    missing = [name for name in names if not (source / name).exists()]
    if missing:
        pytest.fail(f"{what} missing in {source}: {', '.join(missing)}; build it with `make cluster-bins` "
                    f"({build_hint})")
    if not shutil.which("openssl"):
        pytest.fail(f"no openssl on PATH ({what}'s webhook certificates are made with it)")


def dry_run_check(cluster: KubeCluster, manifest: dict, accept: Callable[[dict], tuple[bool, object]] | None = None
                  ) -> Check:
    """A check that a server-side dry-run create of `manifest` passes the webhooks (and, with `accept`,
    that the object as stored is what the mutating webhooks make of it)."""
    body = json.dumps(manifest)

    def check() -> tuple[bool, object]:
        result = cluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=body, check=False)
        if result.returncode != 0:
            return False, (result.stderr or result.stdout)[-500:]
        return accept(json.loads(result.stdout)) if accept else (True, None)
    return check


class Launch:
    """One start-up of a webhook-serving controller `name` under `workdir`: its certificates, ports,
    deadline and step timings. It fails the test first when `required` files of the build folder
    `source` are missing (see require_built)."""

    def __init__(self, name: str, cluster: KubeCluster, workdir: Path, timeout: float, *, source: Path,
                 required: tuple[str, ...], what: str, build_hint: str):
        require_built(source, required, what, build_hint)
        self.name, self.cluster, self.workdir, self.timeout = name, cluster, workdir, timeout
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.timings: dict[str, float] = {}
        workdir.mkdir(parents=True, exist_ok=True)
        self.certs = workdir / "certs"
        self.ca_file = make_certs(self.certs, f"mot-test-{name}-ca")
        self.ca_bundle = base64.b64encode(self.ca_file.read_bytes()).decode()
        self.webhook_port, self.health_port, self.metrics_port = (free_port() for _ in range(3))
        self.webhook_url = f"https://127.0.0.1:{self.webhook_port}"
        self.health_url = f"http://127.0.0.1:{self.health_port}"
        self.metrics_url = f"https://127.0.0.1:{self.metrics_port}/metrics"
        self.process: subprocess.Popen | None = None

    def endpoints(self) -> dict:
        """The WebhookController fields this start-up fixes."""
        return {"cluster": self.cluster, "webhook_url": self.webhook_url, "health_url": self.health_url,
                "metrics_url": self.metrics_url, "ca_file": self.ca_file, "workdir": self.workdir,
                "timings": self.timings}

    def step(self, name: str) -> None:
        """Record the seconds since the previous step as `name`'s."""
        self.timings[name] = round(time.monotonic() - self.started - sum(self.timings.values()), 2)

    def install_crds(self, source: Path) -> None:
        """Install the CRDs of the config/components/crd folder `source` (see crd_manifests)."""
        crds = crd_manifests(source, self.webhook_url, self.ca_bundle)
        # Server-side apply: CRDs such as Kueue's Workload or JobSet's (~800 kB) are too large for
        # client-side apply's last-applied annotation.
        self.cluster.kubectl("apply", "--server-side", "--force-conflicts", f"--field-manager=mot-test-{self.name}",
                             "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": crds}),
                             timeout=120)
        for crd in crds:
            # Polled: `kubectl wait --for=condition=Established` fails at once ("<nil> is of the type
            # <nil>") when it reads the CRD before the apiserver has written any condition.
            wait_until(lambda name=crd["metadata"]["name"]: any(
                c["type"] == "Established" and c["status"] == "True"
                for c in (self.cluster.get_json("crd", name).get("status") or {}).get("conditions") or []),
                timeout=60, what=f"CRD {crd['metadata']['name']} Established")

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> Component:
        """Start `argv` with the admin kubeconfig, its output in <workdir>/<name>.log."""
        log = self.workdir / f"{self.name}.log"
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir,
                preexec_fn=_die_with_parent,
                env={**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig),
                     "GOMAXPROCS": os.environ.get("MOT_KUBE_GOMAXPROCS", "2"), **(env or {})})
        return Component(self.name, self.process, log)

    def wait(self, what: str, check: Check) -> None:
        """Poll `check` until it passes, failing when the process exits or the start-up's deadline passes."""
        last = None
        while time.monotonic() < self.deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} while waiting for {what}")
            ok, last = check()
            if ok:
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {self.timeout:.0f}s waiting for {what}; last: {last!r}")

    def wait_serving(self) -> None:
        """/readyz answers 200 and the webhook server answers TLS with the certificate made here."""
        self.wait(f"{self.name} /readyz", lambda: (lambda r: (r[0] == 200, r))(_get(f"{self.health_url}/readyz")))
        self.step(f"{self.name} ready")
        verify = ssl.create_default_context(cafile=str(self.ca_file))
        self.wait(f"{self.name}'s webhook server with its certificate", lambda: (lambda r: (r[0] != 0, r))(
            _get(f"{self.webhook_url}/healthz", verify)))

    def install_webhooks(self, configurations: list[dict]) -> None:
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": configurations}))

    @contextlib.contextmanager
    def stopping_on_failure(self, controller: WebhookController) -> Iterator[None]:
        """Stop `controller` when its start-up fails, and raise with its log; when it succeeds, record
        the start-up's seconds on it."""
        try:
            yield
        except BaseException as error:
            logs = controller.logs()
            controller.stop()
            if isinstance(error, (RuntimeError, TimeoutError, AssertionError)):
                raise RuntimeError(f"{self.name} did not start: {error}\n{logs}") from error
            raise
        controller.startup_seconds = round(time.monotonic() - self.started, 2)

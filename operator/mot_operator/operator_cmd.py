"""`mot operator`: run the MoTRun controller (Kopf, in-process) with /metrics, /healthz and /readyz."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics, generate_latest

from .jobs import OperatorConfig

HEARTBEAT_STALE_SECONDS = 60.0
log = logging.getLogger("mot_operator")


def _env(name: str, default=None):
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    namespaces = [n.strip() for n in (_env("MOT_WATCH_NAMESPACES", "")).split(",") if n.strip()]
    parser.add_argument("--namespace", dest="namespaces", action="append", default=None, metavar="NS",
                        help="namespace to watch (repeatable; env MOT_WATCH_NAMESPACES, comma-separated; "
                             "none = all namespaces)")
    parser.set_defaults(env_namespaces=namespaces)
    parser.add_argument("--default-image", default=_env("MOT_DEFAULT_IMAGE", OperatorConfig.default_image),
                        help="trainer image for MoTRuns that set no spec.image (env MOT_DEFAULT_IMAGE)")
    parser.add_argument("--default-storage-uri", default=_env("MOT_DEFAULT_STORAGE_URI"),
                        help="checkpoint base URI for MoTRuns without spec.storage.uri (env MOT_DEFAULT_STORAGE_URI)")
    parser.add_argument("--default-storage-endpoint", default=_env("MOT_DEFAULT_STORAGE_ENDPOINT"),
                        help="S3 endpoint URL when spec.storage.endpoint is unset (env MOT_DEFAULT_STORAGE_ENDPOINT)")
    parser.add_argument("--default-credentials-secret", default=_env("MOT_DEFAULT_CREDENTIALS_SECRET"),
                        help="Secret with S3 keys when spec.storage.credentialsSecret is unset "
                             "(env MOT_DEFAULT_CREDENTIALS_SECRET)")
    parser.add_argument("--metrics-port", type=int, default=int(_env("MOT_METRICS_PORT", 8080)),
                        help="port for /metrics, /healthz and /readyz (env MOT_METRICS_PORT; 0 = any free port)")
    parser.add_argument("--metrics-host", default=_env("MOT_METRICS_HOST", "0.0.0.0"),
                        help="address the HTTP port binds (env MOT_METRICS_HOST)")
    parser.add_argument("--progress-interval", type=float,
                        default=float(_env("MOT_PROGRESS_INTERVAL", OperatorConfig.progress_interval_seconds)),
                        help="seconds between reads of a training branch's progress from its Pod, so at most "
                             "one status write per run per interval for progress (env MOT_PROGRESS_INTERVAL)")
    parser.add_argument("--gpu-memory-from-node-labels", action=argparse.BooleanOptionalAction,
                        default=_env("MOT_GPU_MEMORY_FROM_NODE_LABELS", "true").lower() not in ("false", "0", "no"),
                        help="read the GPUs' memory from the nodes' nvidia.com/gpu.memory labels (NVIDIA GPU "
                             "Feature Discovery; needs nodes get/list) and have the preflight refuse a branch "
                             "that fits none of them (env MOT_GPU_MEMORY_FROM_NODE_LABELS; default true)")
    parser.add_argument("--gpu-memory-refresh", type=float,
                        default=float(_env("MOT_GPU_MEMORY_REFRESH", OperatorConfig.gpu_memory_refresh_seconds)),
                        help="seconds between listings of the nodes' GPU memory labels (env MOT_GPU_MEMORY_REFRESH)")
    parser.add_argument("--jobset", action=argparse.BooleanOptionalAction,
                        default=_env("MOT_JOBSET", "false").lower() in ("1", "true", "yes"),
                        help="run multi-node branches as JobSets where the cluster serves them (needs RBAC for "
                             "jobsets.jobset.x-k8s.io: the chart's jobset.enabled); "
                             "spec.resources.branch.backend auto/jobset then use them")
    parser.add_argument("--log-level", default=_env("MOT_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"], help="env MOT_LOG_LEVEL")
    parser.add_argument("--log-format", default=_env("MOT_LOG_FORMAT", "text"), choices=["text", "json"],
                        help="env MOT_LOG_FORMAT")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname.lower(),
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Kopf logs every handler success at INFO; keep that for --log-level debug.
    for noisy in ("urllib3", "kubernetes", "aiohttp.access", "kopf.objects"):
        logging.getLogger(noisy).setLevel(root.level if root.level <= logging.DEBUG else logging.WARNING)


class Health:
    """Liveness (the operator loop beats) and readiness (Kopf started and watching)."""

    def __init__(self):
        self.ready = threading.Event()
        self.heartbeat = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.heartbeat < HEARTBEAT_STALE_SECONDS


def make_server(host: str, port: int, health: Health, registry) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = health.alive()
                self._send(200 if ok else 503, b"ok\n" if ok else b"operator loop stalled\n")
            elif path == "/readyz":
                ok = health.ready.is_set()
                self._send(200 if ok else 503, b"ok\n" if ok else b"not watching yet\n")
            else:
                self._send(404, b"not found\n")

        def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8"):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes are not worth a log line
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def load_kube_client_config() -> None:
    """In-cluster service account when running in a Pod, else $KUBECONFIG / ~/.kube/config."""
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def run(args: argparse.Namespace) -> int:
    import kopf

    from . import controller
    from .kube_api import KubeApi
    from .metrics import REGISTRY

    configure_logging(args.log_level, args.log_format)
    disable_created_metrics()  # no *_created series next to our counters
    namespaces = args.namespaces or args.env_namespaces
    controller.STATE.config = OperatorConfig(
        default_image=args.default_image,
        default_storage_uri=args.default_storage_uri,
        default_storage_endpoint=args.default_storage_endpoint,
        default_credentials_secret=args.default_credentials_secret,
        progress_interval_seconds=max(args.progress_interval, 1.0),
        gpu_memory_from_node_labels=args.gpu_memory_from_node_labels,
        gpu_memory_refresh_seconds=max(args.gpu_memory_refresh, 0.0),
        jobset=args.jobset,
    )
    load_kube_client_config()
    controller.STATE.api = KubeApi()
    if args.jobset:
        controller.STATE.jobset_available = asyncio.run(controller.STATE.api.jobsets_served())
        if controller.STATE.jobset_available:
            controller.watch_jobsets()
        else:
            log.warning("--jobset: the cluster serves no jobsets.jobset.x-k8s.io (JobSet not installed): "
                        "multi-node branches run as Indexed Jobs")

    health = Health()
    server = make_server(args.metrics_host, args.metrics_port, health, REGISTRY)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log.info("serving /metrics /healthz /readyz on %s:%d; watching %s", args.metrics_host,
             server.server_address[1], ", ".join(namespaces) if namespaces else "all namespaces")

    tasks: list[asyncio.Task] = []  # keep a reference: the loop holds tasks weakly

    async def beat():
        while True:
            health.heartbeat = time.monotonic()
            await asyncio.sleep(5)

    @kopf.on.startup()
    async def start_heartbeat(**_):
        tasks.append(asyncio.get_running_loop().create_task(beat()))

    try:
        kopf.run(standalone=True, clusterwide=not namespaces, namespaces=namespaces or (),
                 ready_flag=health.ready)
    finally:
        server.shutdown()
    return 0

"""Training progress: a log line, Prometheus metrics (`mot_trainer_*`, so a PodMonitor can scrape a
running branch) and a structured progress record (`/progress` and the JSONL file in env
MOT_PROGRESS_FILE, read by the operator and by `mot run`). The registry is this module's own:
nothing else ends up on the port.

No torch here: the operator's local runner imports `read_records`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app

log = logging.getLogger(__name__)

PROGRESS_FILE_ENV = "MOT_PROGRESS_FILE"
METRICS_ADDRESS_ENV = "MOT_METRICS_ADDRESS"

REGISTRY = CollectorRegistry(auto_describe=True)
STEP = Gauge("mot_trainer_step", "Optimizer steps completed.", registry=REGISTRY)
STEPS_PLANNED = Gauge("mot_trainer_steps_total_planned", "Optimizer steps this run will take.", registry=REGISTRY)
LOSS = Gauge("mot_trainer_loss", "Mean per-token training loss of the last step.", registry=REGISTRY)
LEARNING_RATE = Gauge("mot_trainer_learning_rate", "Learning rate of the last step.", registry=REGISTRY)
TOKENS = Counter("mot_trainer_tokens", "Tokens processed (padding excluded), all processes.", registry=REGISTRY)
TOKENS_PER_SECOND = Gauge(
    "mot_trainer_tokens_per_second", "Tokens per second since training started, all processes.", registry=REGISTRY
)
ETA = Gauge("mot_trainer_eta_seconds", "Estimated seconds until the last step.", registry=REGISTRY)

# The latest progress record of this process, served at /progress. Replaced whole, never mutated,
# so the server thread reads it without a lock.
_latest: dict = {}


def latest() -> dict:
    return _latest


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a hung scrape must not keep the trainer alive

    def shutdown(self) -> None:
        super().shutdown()
        self.server_close()  # the port is free (and refuses connections) once training is over


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass


def _app(metrics_app: Callable) -> Callable:
    def app(environ, start_response):
        if environ.get("PATH_INFO", "").rstrip("/") == "/progress":
            body = json.dumps(_latest).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        return metrics_app(environ, start_response)  # /metrics (and, as prometheus_client does, /)

    return app


def serve(port: int, address: str | None = None) -> _Server:
    """Serve REGISTRY at /metrics and the latest progress record at /progress on `port`, bound to
    `address` (default env MOT_METRICS_ADDRESS, else all interfaces, as a Pod must), from a daemon
    thread; returns the server: shutdown() stops it and frees the port."""
    global _latest
    _latest = {}
    address = address or os.environ.get(METRICS_ADDRESS_ENV) or "0.0.0.0"
    family, _, _, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]
    server_class = type("Server", (_Server,), {"address_family": family})  # an IPv6 address needs AF_INET6
    server = make_server(sockaddr[0], port, _app(make_wsgi_app(REGISTRY)), server_class, _QuietHandler)
    threading.Thread(target=server.serve_forever, name="mot-metrics", daemon=True).start()
    log.info("serving /metrics and /progress on %s:%d", sockaddr[0], server.server_port)
    return server


class Progress:
    """Tracks steps, tokens and time; every `log_every` steps (and at the last) updates the metrics,
    logs a line and emits a progress record. Constructing it emits the step-0 record, so the total
    is known before the first step ends."""

    def __init__(self, total_steps: int, log_every: int = 1, clock=time.monotonic,
                 wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC), path: str | None = None):
        self.total_steps = total_steps
        self.log_every = max(1, log_every)
        self.clock = clock
        self.wall_clock = wall_clock
        self.path = path if path is not None else os.environ.get(PROGRESS_FILE_ENV)
        self.start = clock()
        self.tokens = 0
        self.step = 0
        STEPS_PLANNED.set(total_steps)
        STEP.set(0)
        self.emit(self.record(0))

    @property
    def elapsed(self) -> float:
        return max(self.clock() - self.start, 1e-9)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.elapsed

    def eta(self, step: int) -> float:
        return self.elapsed / step * (self.total_steps - step) if step else 0.0

    def update(self, step: int, loss: float, learning_rate: float, tokens: int) -> None:
        self.step = step
        self.tokens += tokens
        eta = self.eta(step)
        STEP.set(step)
        LOSS.set(loss)
        LEARNING_RATE.set(learning_rate)
        TOKENS.inc(tokens)
        TOKENS_PER_SECOND.set(self.tokens_per_second)
        ETA.set(eta)
        if step % self.log_every == 0 or step == self.total_steps:
            log.info(
                "step %d/%d loss %.4f lr %.3g tokens/s %.0f eta %s",
                step, self.total_steps, loss, learning_rate, self.tokens_per_second, duration(eta),
            )
            self.emit(self.record(step, loss, learning_rate))

    def record(self, step: int, loss: float | None = None, learning_rate: float | None = None) -> dict:
        """The contract's record (camelCase, as in MoTRun status). Before the first step there is no
        loss, learning rate or ETA yet: those keys are absent rather than a misleading 0."""
        elapsed = self.elapsed if step else 0.0
        rec = {"step": step, "totalSteps": self.total_steps}
        if loss is not None:
            rec["loss"] = round(loss, 6)
        if learning_rate is not None:
            rec["learningRate"] = learning_rate
        rec["tokens"] = self.tokens
        rec["tokensPerSecond"] = round(self.tokens_per_second, 1) if step else 0.0
        if step:
            rec["etaSeconds"] = round(self.eta(step), 1)
        rec["elapsedSeconds"] = round(elapsed, 1)
        rec["time"] = self.wall_clock().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return rec

    def emit(self, rec: dict) -> None:
        global _latest
        _latest = rec
        if self.path:
            # One write per line, appended: a reader sees whole lines, at worst a partial last one.
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()


def read_records(path, offset: int = 0) -> tuple[list[dict], int]:
    """Progress records in the JSONL file at `path` from byte `offset` on, and the offset after the
    last complete line (pass it back to read only new records). A partial last line (the trainer is
    writing it) is left for the next call; a missing file reads as no records."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except OSError:
        return [], offset
    end = chunk.rfind(b"\n") + 1
    records = []
    for line in chunk[:end].splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line torn by a crash mid-write: skip it, not the file
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records, offset + end


def duration(seconds: float) -> str:
    """4m10s, 1h05m02s: the trainer's log line and `mot run`'s live view."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"

"""Training progress as log lines and as Prometheus metrics (`mot_trainer_*`), so a PodMonitor can
scrape a running branch. The registry is this module's own: nothing else ends up on the port."""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

log = logging.getLogger(__name__)

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


def serve(port: int):
    """Serve REGISTRY on `port` (all interfaces, as a Pod must); returns the server for shutdown()."""
    server, _thread = start_http_server(port, registry=REGISTRY)
    log.info("serving mot_trainer_* metrics on port %d", port)
    return server


class Progress:
    """Tracks steps, tokens and time; updates the metrics and logs a line every `log_every` steps."""

    def __init__(self, total_steps: int, log_every: int = 1, clock=time.monotonic):
        self.total_steps = total_steps
        self.log_every = max(1, log_every)
        self.clock = clock
        self.start = clock()
        self.tokens = 0
        self.step = 0
        STEPS_PLANNED.set(total_steps)
        STEP.set(0)

    @property
    def elapsed(self) -> float:
        return max(self.clock() - self.start, 1e-9)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.elapsed

    def update(self, step: int, loss: float, learning_rate: float, tokens: int) -> None:
        self.step = step
        self.tokens += tokens
        eta = self.elapsed / step * (self.total_steps - step) if step else 0.0
        STEP.set(step)
        LOSS.set(loss)
        LEARNING_RATE.set(learning_rate)
        TOKENS.inc(tokens)
        TOKENS_PER_SECOND.set(self.tokens_per_second)
        ETA.set(eta)
        if step % self.log_every == 0 or step == self.total_steps:
            log.info(
                "step %d/%d loss %.4f lr %.3g tokens/s %.0f eta %s",
                step, self.total_steps, loss, learning_rate, self.tokens_per_second, _duration(eta),
            )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"

"""Waiting on and stopping the processes and servers tests start (no fixtures here)."""

from __future__ import annotations

import subprocess
import time


def stop_process(process: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, wait up to `timeout`, then SIGKILL: every server and operator the tests start."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_until(predicate, timeout: float = 30.0, what: str = "condition", interval: float = 0.2,
               on_timeout=lambda: ""):
    """Poll until `predicate()` is truthy and return it; fail naming `what`, the last value and
    whatever `on_timeout()` adds (logs, state)."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last value: {value!r}\n{on_timeout()}")

"""How many threads a merge uses: the CPUs this process may use (affinity mask, cgroup v2 quota)."""

from __future__ import annotations

import os
from pathlib import Path

MAX_THREADS = 4
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # "QUOTA PERIOD" or "max PERIOD" (cgroup v2)


def default_threads() -> int:
    """One merging thread per CPU this process may use beyond the first (that one writes and hashes
    the output), at most MAX_THREADS. On 2 CPUs: 1, the main thread alone (measured fastest there)."""
    return max(1, min(MAX_THREADS, available_cpus() - 1))


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a pod's limit)."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux only
    cpus = len(affinity(0)) if affinity else os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cpus

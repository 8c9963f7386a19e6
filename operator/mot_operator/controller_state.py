"""What the controller's handlers and its executor share: operator config, the Kubernetes API, per-run
wake-ups and the small per-run memory (progress, disruptions, Kueue reasons, recently created Jobs)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from . import jobs as jobrender
from . import naming

# A Job this process created recently is not created again while the watch catches up with it.
RECENT_CREATE_SECONDS = 30.0


@dataclass
class ControllerState:
    """What the handlers share: operator config, the Kubernetes API, and per-run wake-ups."""

    config: jobrender.OperatorConfig = field(default_factory=jobrender.OperatorConfig)
    api: object = None  # a KubeApi; set by `mot operator` before Kopf starts
    wakers: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)
    by_label: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (namespace, run label) -> names
    # {(namespace, run): metadata.generation} last seen on a MoTRun event: only a new spec wakes a daemon
    generations: dict[tuple[str, str], int] = field(default_factory=dict)
    # Pods seen marked for a disruption, kept until their run goes (the Pod may be gone before the
    # daemon looks): {(namespace, run label): {pod: {"job", "pod", "reason", "message"}}}
    disrupted: dict[tuple[str, str], dict[str, dict]] = field(default_factory=dict)
    # The branches' latest progress records {(namespace, run): {job: record}} and when they were read
    progress: dict[tuple[str, str], dict[str, dict]] = field(default_factory=dict)
    progress_read: dict[tuple[str, str], float] = field(default_factory=dict)
    # Kueue's reason per queued Job: {(namespace, job): (monotonic time read, waiting)}
    admission: dict[tuple[str, str], tuple[float, dict]] = field(default_factory=dict)
    # {(namespace, run): (spec JSON, parsed spec or SpecError)}: parse each spec version once
    specs: dict[tuple[str, str], tuple[str, object]] = field(default_factory=dict)
    # {(namespace, job): monotonic time} of the Jobs this process created
    created: dict[tuple[str, str], float] = field(default_factory=dict)
    # The labels of the Nodes with a GPU-memory label, and when they were listed (kube_executor.gpu_memory)
    gpu_nodes: list[dict[str, str]] = field(default_factory=list)
    gpu_nodes_read: float | None = None
    # Whether JobSets run multi-node branches: config.jobset and the cluster serves jobset.x-k8s.io
    # (checked once at start, operator_cmd); the JobSets are then watched into an index.
    jobset_available: bool = False

    def forget(self, namespace: str, name: str) -> None:
        """Drop what is kept about a deleted run."""
        self.disrupted.pop((namespace, naming.label_value(name)), None)
        self.progress.pop((namespace, name), None)
        self.progress_read.pop((namespace, name), None)
        self.admission = {key: found for key, found in self.admission.items()
                          if not (key[0] == namespace and key[1].startswith(f"{name}-"))}
        self.specs.pop((namespace, name), None)
        self.generations.pop((namespace, name), None)
        # Jobs created recently are forgotten once observed; those of a run deleted first, here.
        clock = time.monotonic()
        self.created = {key: at for key, at in self.created.items() if clock - at < RECENT_CREATE_SECONDS}

    def waker(self, namespace: str, name: str) -> asyncio.Event:
        key = (namespace, name)
        if key not in self.wakers:
            self.wakers[key] = asyncio.Event()
            self.by_label.setdefault((namespace, naming.label_value(name)), set()).add(name)
        return self.wakers[key]

    def drop_waker(self, namespace: str, name: str) -> None:
        self.wakers.pop((namespace, name), None)
        key = (namespace, naming.label_value(name))
        names = self.by_label.get(key)
        if names is not None:
            names.discard(name)
            if not names:
                del self.by_label[key]

    def wake(self, namespace: str, run_label: str) -> None:
        """Wake the daemons of the runs whose Jobs carry this run label (one, unless names collide)."""
        for name in self.by_label.get((namespace, run_label), ()):
            event = self.wakers.get((namespace, name))
            if event is not None:
                event.set()

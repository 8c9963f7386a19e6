"""What a local run knows, in `<workdir>/status.json`: the run, the spec it started with, its status
(the planner's, as a MoTRun's) and its jobs (the processes standing in for Kubernetes Jobs). Written
atomically, so a `mot run` stopped at any moment leaves a whole file for the next one to continue
from; a resumed run is held to the CRD's update rules against the recorded spec.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from mot_operator.contract import parse_timestamp, timestamp
from mot_operator.planner import ObservedJob, RunRef
from mot_operator.spec import check_update

STATE_FILE = "status.json"


@dataclass
class LocalJob:
    """A process standing in for a Kubernetes Job; persisted in status.json."""

    name: str
    stage: str  # preflight | sft | merge | eval
    round: int
    teacher: str | None
    attempt: int
    args: list[str]
    output_uri: str
    role: str = "mot"  # mot (the planner's) | report (branch/start evals) | baseline
    label: str = ""
    state: str = "Pending"  # Pending | Running | Suspended | Succeeded | Failed
    permanent: bool = False
    message: str = ""
    metrics: dict | None = None
    pid: int | None = None
    started_at: str | None = None
    finished_at: str | None = None
    order: int = 0
    progress: dict | None = None  # the trainer's latest progress record: kept, so a resumed runner has it

    def observed(self) -> ObservedJob:
        """The job as the planner sees a Job."""
        return ObservedJob(
            name=self.name, stage=self.stage, round=self.round, teacher=self.teacher, attempt=self.attempt,
            state=self.state, permanent=self.permanent, message=self.message, metrics=self.metrics,
            started_at=_parse_time(self.started_at), finished_at=_parse_time(self.finished_at),
            progress=self.progress,
        )


def _parse_time(value: str | None) -> datetime | None:
    """A time of status.json (contract.timestamp; older files have microseconds, read the same)."""
    return parse_timestamp(value) if value else None


def atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path, spec_dict: dict) -> tuple[dict, dict[str, LocalJob]]:
    """(status, jobs by name) saved at `path`, empty when there is none. SpecError when `spec_dict`
    breaks the CRD's update rules against the spec the run started with."""
    if not path.exists():
        return {}, {}
    saved = json.loads(path.read_text())
    if saved.get("spec") is not None:  # (status.json from before specs were recorded: none)
        check_update(saved["spec"], spec_dict)
    jobs = [LocalJob(**raw) for raw in saved.get("jobs", [])]
    return saved.get("status") or {}, {job.name: job for job in jobs}


def save(path: Path, run: RunRef, spec_dict: dict, status: dict, jobs: dict[str, LocalJob]) -> None:
    atomic_write_json(path, {
        "run": {"namespace": run.namespace, "name": run.name},
        "updated": timestamp(datetime.now(UTC)),
        "spec": spec_dict,
        "status": status,
        "jobs": [asdict(j) for j in sorted(jobs.values(), key=lambda j: j.order)],
    })

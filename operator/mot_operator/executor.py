"""One executor step, shared by both executors (the Kopf controller and the local runner) and the
tests' fake cluster: observe the run's Jobs, plan, persist the new status, then act.

The order is the restart-safety contract (planner.py): status is written before any Job is
created, so an executor killed at any moment finds every Job it may have created named in status.
Each executor supplies only its own observe / persist / act; what happens between them is here.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Protocol

from .planner import ObservedJob, Plan, RunRef, plan, plan_invalid
from .spec import MoTRunSpec, SpecError

# (status, observed Jobs, now) -> Plan: the pure planner with the run and spec bound (`planner_for`).
Decide = Callable[[dict, list[ObservedJob], datetime], Plan]


class Executor(Protocol):
    async def observe(self) -> list[ObservedJob]:
        """The run's Jobs as they are now."""

    async def persist(self, old: dict, new: dict) -> None:
        """Store the new status (called only when it differs from the old one)."""

    async def act(self, result: Plan) -> None:
        """Post the plan's Events, then create, suspend, resume and delete its Jobs."""


def planner_for(run: RunRef, spec: MoTRunSpec | SpecError, **facts) -> Decide:
    """The planner of a run: `plan` (with the executor's `facts`: plan's keyword arguments), or
    `plan_invalid` when its spec could not be parsed."""
    if isinstance(spec, SpecError):
        return lambda status, _jobs, now: plan_invalid(run, status, spec, now)
    return partial(plan, run, spec, **facts)


async def step(status: dict, executor: Executor, decide: Decide, now: datetime | None = None) -> Plan:
    """Observe -> plan -> persist -> act, once. Returns the plan (its status is the one stored)."""
    observed = await executor.observe()
    result = decide(status, observed, now or datetime.now(UTC))
    if result.status != status:
        await executor.persist(status, result.status)
    await executor.act(result)
    return result

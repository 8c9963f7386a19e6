"""The contract between the operator (and the local runner) and the trainer, in one place.

- the stages: their names, the nouns of their Event reasons, their Jobs' component label, and the
  part of the trainer's result the operator keeps;
- the trainer's command lines (`mot-train <stage> ...`), built only here;
- the trainer's exit codes;
- where a result comes back from: a successful `mot-train` writes its JSON summary as the last line
  of its termination message (`/dev/termination-log`, or the file named by MOT_TERMINATION_LOG);
  `read_result` reads it, for the controller (from the Pod's status) and the local runner (from the
  file it gives each process);
- the one timestamp format of status (RFC 3339, seconds, Z).

Imported by both images (the operator's has no torch, the trainer's no kopf): the standard library only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the trainer image imports this module; the spec needs jsonschema
    from .spec import MoTRunSpec

# ---------------------------------------------------------------------------------------------
# Exit codes of `mot-train`

EXIT_OK = 0  # the output is complete in storage (and the summary written)
EXIT_FAILED = 1  # failed, may succeed on a retry: the operator starts a new attempt (any code but 0 and 2)
EXIT_INVALID_INPUT = 2  # invalid input (data, model, options): never retried (the Jobs' podFailurePolicy)

# ---------------------------------------------------------------------------------------------
# Stages

EVENT_VERBS = ("Started", "Failed", "Retried", "Disrupted")  # Event reasons: <noun><verb>


@dataclass(frozen=True)
class Stage:
    name: str  # status keys, the mot.dev/stage label, Job names, metrics' `stage` label
    noun: str  # Event reasons `<noun>Started/Failed/Retried/Disrupted`; condition reason `<noun>Failed`
    component: str  # the app.kubernetes.io/component label of its Jobs
    result: tuple[str, ...]  # keys of the trainer's JSON summary (read_result) the operator keeps


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("preflight", "Preflight", "preflight", ("teachers", "eval", "storage", "seconds")),
    Stage("sft", "Branch", "branch", ("final_loss",)),
    Stage("merge", "Merge", "merge", ()),
    Stage("eval", "Eval", "eval", ("accuracy",)),
)}


def noun(stage: str) -> str:
    return STAGES[stage].noun


def component(stage: str) -> str:
    """The component label of a stage's Jobs; other Jobs (the cleanup) are named by their kind."""
    return STAGES[stage].component if stage in STAGES else stage


def event_reason(stage: str, verb: str) -> str:
    """`BranchStarted`, `MergeFailed`, ...: the reason of a stage's Event."""
    return STAGES[stage].noun + verb


def stage_of_reason(reason: str, verb: str) -> str | None:
    """The stage an Event reason `<noun><verb>` is about, or None when it is not one."""
    for stage in STAGES.values():
        if reason == stage.noun + verb:
            return stage.name
    return None


# ---------------------------------------------------------------------------------------------
# Results


def read_result(message: str | None) -> dict | None:
    """The trainer's JSON summary: the last non-empty line of a termination message, when it is a JSON
    object (None otherwise: a failure's message, logs, or a summary cut at the message's size limit)."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    if not lines:
        return None
    try:
        parsed = json.loads(lines[-1])
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


# ---------------------------------------------------------------------------------------------
# Timestamps


def timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with a Z, to the second, as Kubernetes writes times."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str) -> datetime:
    """A `timestamp`, or any ISO 8601 time with an offset or a Z (microseconds too: older status.json)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# ---------------------------------------------------------------------------------------------
# Command lines: the argv after `mot-train`

TRAINER_METRICS_PORT = 9090  # a branch Job's mot_trainer_* metrics: the chart's PodMonitor scrapes "metrics"


def _num(value: float) -> str:
    return repr(float(value))


def sft_args(spec: MoTRunSpec, round_: int, data: str, init: str, out: str, *, steps: int | None = None,
             metrics_port: int | None = None, threads: int | None = None) -> list[str]:
    """Train `init` on `data` (a teacher's dataset) into `out`. `steps` (default spec.training.steps),
    `threads` (default spec.training.threads) and `metrics_port` (none by default) are the caller's."""
    t = spec.training
    threads = t.threads if threads is None else threads
    args = ["sft", "--init", init, "--data", data, "--out", out,
            "--steps", str(t.steps if steps is None else steps), "--learning-rate", _num(t.learning_rate),
            "--lr-schedule", t.lr_schedule, "--warmup-ratio", _num(t.warmup_ratio),
            "--adam-beta1", _num(t.adam_beta1), "--adam-beta2", _num(t.adam_beta2),
            "--weight-decay", _num(t.weight_decay), "--micro-batch-size", str(t.micro_batch_size),
            "--grad-accum", str(t.grad_accum), "--max-seq-length", str(t.max_seq_length),
            "--seed", str(t.seed + round_ - 1), "--precision", t.precision]
    if t.gradient_checkpointing:
        args.append("--gradient-checkpointing")
    if t.packing:
        args.append("--packing")
    if threads:
        args += ["--threads", str(threads)]
    if metrics_port is not None:
        args += ["--metrics-port", str(metrics_port)]
    return args


def merge_args(spec: MoTRunSpec, inputs: list[str], weights: list[float], base: str, out: str, *,
               outer_state_in: str | None = None, outer_state_out: str | None = None) -> list[str]:
    """A round's merge of `inputs` from `base` (the round's starting model). With an outer step
    (spec.merge.outer other than the identity), `outer_state_out` is this round's velocity and
    `outer_state_in` the previous round's (None in round 1); used only with momentum > 0."""
    m = spec.merge
    args = ["merge", "--inputs", *inputs, "--out", out, "--weights", *map(_num, weights),
            "--method", m.method, "--shard-size", m.parameters.shard_size]
    if m.method != "average" or not m.outer.identity:
        args += ["--base", base]
    if m.method != "average":
        args += ["--scale", _num(m.parameters.scale)]
    if m.method in ("ties", "dare"):
        args += ["--density", _num(m.parameters.density)]
    if m.method == "dare":
        args += ["--seed", str(m.parameters.seed)]
    if not m.outer.identity:
        args += ["--outer-learning-rate", _num(m.outer.learning_rate), "--outer-momentum", _num(m.outer.momentum)]
        if m.outer.nesterov:
            args.append("--outer-nesterov")
        if m.outer.momentum > 0:
            args += ["--outer-state-out", outer_state_out]
            if outer_state_in:
                args += ["--outer-state-in", outer_state_in]
    return args


def preflight_args(spec: MoTRunSpec, run_root: str, out: str, *, gpu_memory: int | None = None) -> list[str]:
    """Check every input of the run; the storage probe goes under the run's own folder. With
    `gpu_memory` (bytes per GPU where a branch can run: the executor's fact) and a branch on GPUs,
    also whether one branch fits it (mot_operator.estimate), from what the estimate reads of the spec."""
    training, branch = spec.training, spec.resources.branch
    args = ["preflight", "--student", spec.student,
            "--teachers", *(f"{t.name}={t.dataset}" for t in spec.teachers),
            "--max-seq-length", str(training.max_seq_length),
            "--max-truncated-fraction", _num(spec.preflight.max_truncated_fraction),
            "--storage", run_root, "--out", out]
    if spec.evaluation is not None:
        args += ["--eval", spec.evaluation.dataset]
    if gpu_memory and branch.gpus > 0:
        args += ["--gpu-memory", str(gpu_memory), "--gpus", str(branch.gpus), "--nodes", str(branch.nodes),
                 "--micro-batch-size", str(training.micro_batch_size),
                 "--precision", training.precision]
        if training.gradient_checkpointing:
            args.append("--gradient-checkpointing")
        if training.packing:
            args.append("--packing")
    return args


def eval_args(spec: MoTRunSpec, model: str, out: str, *, threads: int | None = None) -> list[str]:
    """Evaluate `model` on spec.evaluation; `threads` defaults to spec.evaluation.threads."""
    e = spec.evaluation
    threads = e.threads if threads is None else threads
    args = ["eval", "--model", model, "--data", e.dataset, "--out", out,
            "--samples", str(e.samples), "--max-new-tokens", str(e.max_new_tokens),
            "--temperature", _num(e.temperature), "--seed", str(spec.training.seed), "--engine", e.engine]
    if threads:
        args += ["--threads", str(threads)]
    return args

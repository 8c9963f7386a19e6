"""Deterministic names, labels and checkpoint URIs for a run's Jobs.

Names are a pure function of (run, round, teacher or stage, attempt), so an executor that restarts
recomputes the same name and a create answering AlreadyExists means the Job is already there.
"""

from __future__ import annotations

import hashlib

from . import contract

MAX_NAME = 63
# Indexed Job Pods get the hostname "<job>-<index>", which must also fit in 63 characters.
MAX_INDEXED_JOB_NAME = 56
# JobSet's webhook wants its Pods' names, "<jobset>-node-0-<index>-<5 random>" (replicated Job "node",
# jobs.py), within 63 characters: with up to 256 nodes (a 3-digit index), 46 for the JobSet.
MAX_JOBSET_NAME = 46
HASH_LEN = 8
STAGES = tuple(contract.STAGES)

LABEL_RUN = "mot.dev/run"
LABEL_ROUND = "mot.dev/round"
LABEL_TEACHER = "mot.dev/teacher"
LABEL_STAGE = "mot.dev/stage"
LABEL_ATTEMPT = "mot.dev/attempt"
LABEL_JOB_NAME = "batch.kubernetes.io/job-name"
LABEL_JOBSET_NAME = "jobset.sigs.k8s.io/jobset-name"
LABEL_JOBSET_RESTART = "jobset.sigs.k8s.io/restart-attempt"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
APP_NAME = "mot-operator"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_LEN]


def shorten(name: str, limit: int = MAX_NAME) -> str:
    """`name` if it fits, else a prefix plus a hash of the whole name (still unique, still DNS-1123)."""
    if len(name) <= limit:
        return name
    head = name[: limit - HASH_LEN - 1].rstrip("-.")
    return f"{head}-{_digest(name)}"


def job_name(run: str, round_: int, stage: str, attempt: int, teacher: str | None = None,
             limit: int = MAX_NAME) -> str:
    """`<run>-r<round>-sft-<teacher>-a<attempt>`, `<run>-r<round>-merge-a<attempt>`, `...-eval-a<n>`;
    the preflight, before any round: `<run>-preflight-a<attempt>`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    if (stage == "sft") != (teacher is not None):
        raise ValueError("a teacher is given for sft Jobs and only for them")
    if stage == "preflight":
        return shorten(f"{run}-preflight-a{attempt}", limit)
    parts = [run, f"r{round_}", stage] + ([teacher] if teacher else []) + [f"a{attempt}"]
    return shorten("-".join(parts), limit)


def service_name(job: str) -> str:
    """Headless Service of a multi-node Job: a DNS-1035 label (must start with a letter)."""
    return job if job[0].isalpha() else shorten(f"j{job}")


def label_value(text: str) -> str:
    """A valid label value (<= 63 characters, alphanumeric at both ends)."""
    value = shorten(text)
    return value.strip("-_.")


def run_labels(run: str) -> dict[str, str]:
    return {
        LABEL_RUN: label_value(run),
        "app.kubernetes.io/name": "mot-trainer",
        "app.kubernetes.io/instance": label_value(run),
        "app.kubernetes.io/managed-by": APP_NAME,
        "app.kubernetes.io/part-of": APP_NAME,
    }


def job_labels(run: str, round_: int, stage: str, attempt: int, teacher: str | None = None) -> dict[str, str]:
    labels = run_labels(run)
    labels.update({
        LABEL_ROUND: str(round_),
        LABEL_STAGE: stage,
        LABEL_ATTEMPT: str(attempt),
        "app.kubernetes.io/component": contract.component(stage),
    })
    if teacher:
        labels[LABEL_TEACHER] = teacher
    return labels


# ---------------------------------------------------------------------------------------------
# Checkpoint layout: <uri>/<namespace>/<run>/preflight.json (the preflight's report), then
# <uri>/<namespace>/<run>/round-<r>/{branch-<teacher>/, merged/, outer-state/, eval.json}
# (outer-state/: the merge's outer-optimizer velocity, only with spec.merge.outer.momentum > 0)


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def run_uri(storage_uri: str, namespace: str, run: str) -> str:
    return _join(storage_uri, namespace, run)


def round_uri(storage_uri: str, namespace: str, run: str, round_: int) -> str:
    return _join(run_uri(storage_uri, namespace, run), f"round-{round_}")


def branch_uri(storage_uri: str, namespace: str, run: str, round_: int, teacher: str) -> str:
    return _join(round_uri(storage_uri, namespace, run, round_), f"branch-{teacher}")


def merged_uri(storage_uri: str, namespace: str, run: str, round_: int) -> str:
    return _join(round_uri(storage_uri, namespace, run, round_), "merged")


def outer_state_uri(storage_uri: str, namespace: str, run: str, round_: int) -> str:
    return _join(round_uri(storage_uri, namespace, run, round_), "outer-state")


def eval_uri(storage_uri: str, namespace: str, run: str, round_: int) -> str:
    return _join(round_uri(storage_uri, namespace, run, round_), "eval.json")


def preflight_uri(storage_uri: str, namespace: str, run: str) -> str:
    return _join(run_uri(storage_uri, namespace, run), "preflight.json")

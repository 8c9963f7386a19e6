"""A MoTRun's status as the plain-text table `kubectl mot status` prints.

`render(status, spec, ...)` takes the MoTRun's `status` and `spec` dicts as the API server returns
them (either may be empty or missing fields: a run the operator has not seen yet, a run still in its
preflight, a failed run) and returns fixed-width text without colour codes:

    MoTRun demo/paper
    phase:     Running (BranchesRunning)
    round:     2/5
    message:   round 2/5: 1/2 branches succeeded
    progress:  43% (ETA 12m 5s)
    waiting:   branch 'b' of round 2 Unschedulable: 0/3 nodes are available ... (for 4m 10s)

    ROUND  MODEL     STATE      ATTEMPT  STEP   LOSS    EVAL    CHECKPOINT
    1      branch a  Succeeded  1        50/50  0.4321  -       round-1/branch-a
    1      merged    Succeeded  1        -      -       0.6100  round-1/merged

One row per branch, then one per round for its merge (and the merged checkpoint's eval score).
"""

from __future__ import annotations

import datetime as dt

from .planner import describe_stage as describe
from .planner import stage_entries

HEADER = ["ROUND", "MODEL", "STATE", "ATTEMPT", "STEP", "LOSS", "EVAL", "CHECKPOINT"]
DISRUPTIONS_SHOWN = 3  # per stage; the status keeps the last 10


def human_duration(seconds: float | None) -> str:
    """12 -> "12s", 125 -> "2m 5s", 3725 -> "1h 2m", 190000 -> "2d 4h"; None or negative -> "-"."""
    if seconds is None or seconds < 0:
        return "-"
    total = int(round(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def short_checkpoint(uri: str | None) -> str:
    """The last two path parts of a checkpoint URI (`round-2/merged`): the run's prefix is the same
    for every row."""
    if not uri:
        return "-"
    parts = [p for p in uri.rstrip("/").split("/") if p]
    return "/".join(parts[-2:]) if len(parts) >= 2 else uri


def _num(value, pattern: str = "{:.4f}") -> str:
    return "-" if not isinstance(value, (int, float)) or isinstance(value, bool) else pattern.format(value)


def _state(entry: dict | None) -> str:
    if not entry:
        return "-"
    state = entry.get("state") or "-"
    if entry.get("failureReason"):
        state += f" ({entry['failureReason']})"
    elif entry.get("waiting") and entry["waiting"].get("reason"):
        state += f" ({entry['waiting']['reason']})"
    return state


def _step(entry: dict | None, total_steps: int | None) -> str:
    progress = (entry or {}).get("progress") or {}
    total = progress.get("totalSteps") or total_steps
    if progress.get("step") is not None:
        return f"{progress['step']}/{total or '?'}"
    if (entry or {}).get("state") == "Succeeded" and total:
        return f"{total}/{total}"
    return "-"


def _loss(entry: dict | None) -> str:
    entry = entry or {}
    loss = entry.get("loss")
    if loss is None:
        loss = (entry.get("progress") or {}).get("loss")
    return _num(loss)


def _attempt(entry: dict | None) -> str:
    """The attempt, and what a multi-node branch went through without it counting: attempts ended by
    a disruption (plain Jobs), whole-group restarts of its JobSet."""
    if not entry or entry.get("attempt") is None:
        return "-"
    notes = [f"{n} {word}" for n, word in ((entry.get("disruptedAttempts"), "disrupted"),
                                           (entry.get("restarts"), "restarted")) if n]
    return f"{entry['attempt']} ({', '.join(notes)})" if notes else str(entry["attempt"])


def teacher_names(spec: dict | None) -> list[str]:
    return [t["name"] for t in (spec or {}).get("teachers") or [] if isinstance(t, dict) and t.get("name")]


def rows(status: dict | None, spec: dict | None = None) -> list[list[str]]:
    """The table's rows: the preflight (when it ran), the student's eval (round 0), then per round its
    branches and its merge."""
    status, spec = status or {}, spec or {}
    total_steps = ((spec.get("training") or {}).get("steps"))
    out = []
    preflight = status.get("preflight")
    if preflight:
        out.append(["-", "preflight", _state(preflight), _attempt(preflight), "-", "-", "-",
                    short_checkpoint(preflight.get("checkpoint"))])
    # With spec.evaluation.selectBest, the final model's row says so.
    selected = (status.get("selected") or {}).get("round")
    final = lambda name, round_: f"{name} (final)" if selected == round_ else name  # noqa: E731
    student = status.get("student")
    if student:  # round 0: where the run started
        evaluation = student.get("eval")
        score = student.get("evalScore", (evaluation or {}).get("score"))
        out.append(["0", final("student", 0), _state(evaluation), _attempt(evaluation), "-", "-", _num(score),
                    short_checkpoint(student.get("model"))])
    teachers = teacher_names(spec)
    for rec in status.get("rounds") or []:
        round_ = str(rec.get("round", "?"))
        branches = rec.get("branches") or {}
        # Teachers of the spec not yet in the status still get a row: the round has them all.
        for teacher in list(dict.fromkeys([*teachers, *sorted(branches)])):
            entry = branches.get(teacher)
            out.append([round_, f"branch {teacher}", _state(entry), _attempt(entry), _step(entry, total_steps),
                        _loss(entry), _num((entry or {}).get("score")),
                        short_checkpoint((entry or {}).get("checkpoint")) if entry else "-"])
        merge, evaluation = rec.get("merge"), rec.get("eval")
        state = _state(merge)
        attempt = _attempt(merge)
        # Once the merge is done the round waits on its eval: show where that is.
        if merge and merge.get("state") == "Succeeded" and evaluation and evaluation.get("state") != "Succeeded":
            state, attempt = f"eval {_state(evaluation)}", _attempt(evaluation)
        score = rec.get("evalScore")
        if score is None:
            score = (evaluation or {}).get("score")
        checkpoint = rec.get("mergedCheckpoint") or ((merge or {}).get("checkpoint") if merge else None)
        out.append([round_, final("merged", rec.get("round")), state, attempt, "-", "-", _num(score),
                    short_checkpoint(checkpoint)])
    return out


def format_table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=False)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=False)).rstrip()
                     for line in [header, *body])


def header_lines(status: dict | None, spec: dict | None = None, *, now: dt.datetime | None = None) -> list[str]:
    status, spec = status or {}, spec or {}
    now = now or dt.datetime.now(dt.UTC)
    lines = []
    phase = status.get("phase") or "Pending (not yet seen by the operator)"
    if status.get("reason"):
        phase += f" ({status['reason']})"
    lines.append(f"phase:     {phase}")
    total = spec.get("rounds")
    current = status.get("round")
    if current or total:
        lines.append(f"round:     {current or '-'}/{total or '?'}")
    if status.get("message"):
        lines.append(f"message:   {status['message']}")
    if status.get("finalModel"):
        lines.append(f"final:     {status['finalModel']}")
    progress = status.get("progress") or {}
    if isinstance(progress.get("fraction"), (int, float)):
        text = f"{progress['fraction']:.0%}"
        if progress.get("etaSeconds") is not None and status.get("phase") not in ("Succeeded", "Failed"):
            text += f" (ETA {human_duration(progress['etaSeconds'])})"
        lines.append(f"progress:  {text}")
    failure = status.get("failure") or {}
    if failure:
        where = describe(failure.get("stage") or "?", failure.get("round"), failure.get("teacher"))
        attempts = failure.get("attempts")
        after = f" after {attempts} attempt{'s' if attempts != 1 else ''}" if attempts else ""
        lines.append(f"failed:    {where}{after}: {failure.get('reason') or 'no reason given'}")
    for round_, stage, teacher, entry in stage_entries(status):
        waiting = entry.get("waiting")
        if waiting:
            since = parse_time(waiting.get("since"))
            seconds = (now - since).total_seconds() if since else -1
            age = f" (for {human_duration(seconds)})" if seconds >= 0 else ""  # none under clock skew
            lines.append(f"waiting:   {describe(stage, round_, teacher)} {waiting.get('reason') or '?'}: "
                         f"{waiting.get('message') or '-'}{age}")
    for round_, stage, teacher, entry in stage_entries(status):
        disruptions = entry.get("disruptions") or []
        if not disruptions:
            continue
        shown = disruptions[-DISRUPTIONS_SHOWN:]
        earlier = len(disruptions) - len(shown)
        more = f" ({earlier} earlier)" if earlier else ""
        lines.append(f"disrupted: {describe(stage, round_, teacher)}: {len(disruptions)} Pod"
                     f"{'s' if len(disruptions) != 1 else ''}{more}")
        for d in shown:
            lines.append(f"           {d.get('time') or '-'} {d.get('pod') or '?'} {d.get('reason') or '?'}: "
                         f"{d.get('message') or '-'}")
    return lines


def render(status: dict | None, spec: dict | None = None, *, name: str | None = None, namespace: str | None = None,
           now: dt.datetime | None = None) -> str:
    """The whole text: a title line (when named), the header block, a blank line and the table."""
    lines = []
    if name:
        lines.append(f"MoTRun {namespace}/{name}" if namespace else f"MoTRun {name}")
    lines += header_lines(status, spec, now=now)
    body = rows(status, spec)
    lines.append("")
    if body:
        lines.append(format_table(HEADER, body))
    else:
        lines.append("no stage started yet")
    return "\n".join(lines) + "\n"

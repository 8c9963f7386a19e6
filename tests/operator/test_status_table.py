"""The text `kubectl mot status` prints (mot_operator.status_table), from hand-written MoTRun statuses:
a run training with progress, one waiting on an Unschedulable branch, a failed one, a succeeded one
with evals, and statuses missing most fields."""

from __future__ import annotations

import datetime as dt

import pytest

from mot_operator.status_table import HEADER, header_lines, human_duration, render, rows, short_checkpoint

NOW = dt.datetime(2026, 11, 29, 18, 0, 0, tzinfo=dt.UTC)
SPEC = {"rounds": 3, "teachers": [{"name": "a", "dataset": "s3://d/a"}, {"name": "qwq", "dataset": "s3://d/q"}],
        "training": {"steps": 50}}
ROOT = "s3://ckpt/team/paper"


def done_round(round_: int, score: float | None = 0.61) -> dict:
    rec = {"round": round_,
           "branches": {"a": {"job": f"paper-r{round_}-sft-a-a1", "attempt": 1, "state": "Succeeded", "loss": 0.4321,
                              "checkpoint": f"{ROOT}/round-{round_}/branch-a",
                              "progress": {"step": 50, "totalSteps": 50, "loss": 0.9}},
                        "qwq": {"job": f"paper-r{round_}-sft-qwq-a2", "attempt": 2, "state": "Succeeded",
                                "loss": 0.5, "checkpoint": f"{ROOT}/round-{round_}/branch-qwq"}},
           "merge": {"job": f"paper-r{round_}-merge-a1", "attempt": 1, "state": "Succeeded",
                     "checkpoint": f"{ROOT}/round-{round_}/merged"},
           "mergedCheckpoint": f"{ROOT}/round-{round_}/merged"}
    if score is not None:
        rec["eval"] = {"job": f"paper-r{round_}-eval-a1", "attempt": 1, "state": "Succeeded", "score": score}
        rec["evalScore"] = score
    return rec


def table_rows(text: str) -> dict[tuple[str, str], list[str]]:
    """(round, model) -> the row's cells, read back by the header's column positions."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ROUND"))
    header = lines[start]
    cols = [header.index(h) for h in HEADER] + [None]
    out = {}
    for line in lines[start + 1:]:
        cells = [line[cols[i]:cols[i + 1]].strip() for i in range(len(HEADER))]
        out[(cells[0], cells[1])] = cells
    return out


def test_a_running_round_shows_step_loss_and_overall_progress():
    status = {"phase": "Running", "reason": "BranchesRunning", "round": 2, "message": "round 2/3: 0/2 branches succeeded",
              "progress": {"fraction": 0.4321, "etaSeconds": 725, "updateTime": "2026-11-29T17:59:50Z"},
              "rounds": [done_round(1),
                         {"round": 2, "branches": {
                             "a": {"job": "paper-r2-sft-a-a1", "attempt": 1, "state": "Running",
                                   "progress": {"step": 12, "totalSteps": 50, "loss": 0.8765, "etaSeconds": 40}},
                             "qwq": {"job": "paper-r2-sft-qwq-a1", "attempt": 1, "state": "Running",
                                     "progress": {"step": 0, "totalSteps": 50}}}}]}
    text = render(status, SPEC, name="paper", namespace="team", now=NOW)
    print("\n" + text)
    lines = text.splitlines()
    assert lines[:5] == ["MoTRun team/paper", "phase:     Running (BranchesRunning)", "round:     2/3",
                         "message:   round 2/3: 0/2 branches succeeded", "progress:  43% (ETA 12m 5s)"]
    got = table_rows(text)
    assert got[("2", "branch a")] == ["2", "branch a", "Running", "1", "12/50", "0.8765", "-", "-"]
    assert got[("2", "branch qwq")][4:6] == ["0/50", "-"]     # step 0: no loss yet
    # A finished branch shows its final loss, not the last progress record's.
    assert got[("1", "branch a")] == ["1", "branch a", "Succeeded", "1", "50/50", "0.4321", "-", "round-1/branch-a"]
    assert got[("1", "merged")] == ["1", "merged", "Succeeded", "1", "-", "-", "0.6100", "round-1/merged"]
    assert got[("2", "merged")] == ["2", "merged", "-", "-", "-", "-", "-", "-"]
    assert list(got) == [("1", "branch a"), ("1", "branch qwq"), ("1", "merged"),
                         ("2", "branch a"), ("2", "branch qwq"), ("2", "merged")]
    assert "\x1b" not in text and "waiting:" not in text and "failed:" not in text


def test_a_branch_waiting_unschedulable_and_a_disrupted_one():
    message = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu. preemption: 0/1 nodes are available"
    status = {"phase": "Running", "reason": "Unschedulable", "round": 1,
              "message": f"round 1/3: 0/2 branches succeeded; branch 'qwq' of round 1: Unschedulable: {message}",
              "rounds": [{"round": 1, "branches": {
                  "a": {"job": "paper-r1-sft-a-a1", "attempt": 1, "state": "Running",
                        "disruptions": [{"pod": f"paper-r1-sft-a-a1-{i}", "reason": "Preempted", "message": "by prio",
                                         "time": f"2026-11-29T17:5{i}:00Z"} for i in range(5)]},
                  "qwq": {"job": "paper-r1-sft-qwq-a1", "attempt": 1, "state": "Pending",
                          "waiting": {"reason": "Unschedulable", "message": message,
                                      "since": "2026-11-29T17:55:50Z"}}}}]}
    text = render(status, SPEC, now=NOW)
    print("\n" + text)
    lines = text.splitlines()
    assert lines[0] == "phase:     Running (Unschedulable)"
    assert f"waiting:   branch 'qwq' of round 1 Unschedulable: {message} (for 4m 10s)" in lines
    at = lines.index("disrupted: branch 'a' of round 1: 5 Pods (2 earlier)")
    assert lines[at + 1:at + 4] == [f"           2026-11-29T17:5{i}:00Z paper-r1-sft-a-a1-{i} Preempted: by prio"
                                    for i in (2, 3, 4)]
    got = table_rows(text)
    assert got[("1", "branch qwq")][2:5] == ["Pending (Unschedulable)", "1", "-"]
    # The preflight and the merge wait too: each gets its own line.
    status["preflight"] = {"state": "Succeeded", "attempt": 1}
    status["rounds"][0]["merge"] = {"state": "Pending", "attempt": 1,
                                    "waiting": {"reason": "WaitingForAdmission", "message": "queue full"}}
    assert "waiting:   merge of round 1 WaitingForAdmission: queue full" in header_lines(status, SPEC, now=NOW)
    # A `since` ahead of this machine's clock: no age rather than a negative one.
    assert f"waiting:   branch 'qwq' of round 1 Unschedulable: {message}" in header_lines(
        status, SPEC, now=NOW - dt.timedelta(hours=1))


def test_a_failed_run_names_the_stage_and_cause_without_an_eta():
    status = {"phase": "Failed", "reason": "OOMKilled", "round": 2,
              "message": "branch 'qwq' of round 2 failed after 2 attempts: OOMKilled",
              "progress": {"fraction": 0.5, "etaSeconds": 300},
              "failure": {"stage": "sft", "round": 2, "teacher": "qwq", "attempts": 2, "reason": "OOMKilled"},
              "rounds": [done_round(1, score=None),
                         {"round": 2, "branches": {
                             "a": {"state": "Succeeded", "attempt": 1, "loss": 0.3},
                             "qwq": {"state": "Failed", "attempt": 2, "failureReason": "OOMKilled",
                                     "message": "killed", "progress": {"step": 7, "totalSteps": 50, "loss": 1.25}}}}]}
    text = render(status, SPEC, name="paper", now=NOW)
    print("\n" + text)
    lines = text.splitlines()
    assert "progress:  50%" in lines                               # no ETA for a finished run
    assert "failed:    branch 'qwq' of round 2 after 2 attempts: OOMKilled" in lines
    got = table_rows(text)
    assert got[("2", "branch qwq")] == ["2", "branch qwq", "Failed (OOMKilled)", "2", "7/50", "1.2500", "-", "-"]
    assert got[("1", "merged")][6] == "-"                          # no evaluation configured
    failure = dict(status["failure"], stage="merge", teacher=None, attempts=1)
    assert "failed:    merge of round 2 after 1 attempt: OOMKilled" in header_lines({**status, "failure": failure})


def test_a_succeeded_run_with_evals_and_an_eval_in_progress():
    status = {"phase": "Succeeded", "reason": "Succeeded", "round": 3, "progress": {"fraction": 1.0, "etaSeconds": 0},
              "finalModel": f"{ROOT}/round-3/merged",
              "rounds": [done_round(1, 0.5), done_round(2, 0.625), done_round(3, 0.75)]}
    text = render(status, SPEC, now=NOW)
    print("\n" + text)
    got = table_rows(text)
    assert [got[(r, "merged")][6:] for r in "123"] == [["0.5000", "round-1/merged"], ["0.6250", "round-2/merged"],
                                                       ["0.7500", "round-3/merged"]]
    assert "progress:  100%" in text.splitlines()
    # While the merged model is evaluated the merge row says so.
    evaluating = done_round(1, None)
    evaluating["eval"] = {"state": "Running", "attempt": 1}
    [*_, merged] = rows({"rounds": [evaluating]}, SPEC)
    assert merged == ["1", "merged", "eval Running", "1", "-", "-", "-", "round-1/merged"]


@pytest.mark.parametrize("status", [None, {}, {"phase": "Pending"}, {"rounds": []}, {"rounds": [{}]},
                                    {"rounds": [{"round": 1, "branches": {"a": None}}]},
                                    {"rounds": [{"round": 1, "branches": {"a": {"progress": None, "waiting": None}}}]},
                                    {"progress": {}, "failure": {}, "preflight": {}},
                                    {"progress": {"fraction": 0.1, "etaSeconds": None}}])
@pytest.mark.parametrize("spec", [None, {}, SPEC])
def test_missing_fields_render_without_crashing(status, spec):
    text = render(status, spec, name="x", namespace="ns", now=NOW)
    assert text.startswith("MoTRun ns/x\nphase:     ")


def test_a_fresh_run_and_a_preflight_only_run():
    fresh = render(None, SPEC, name="paper", namespace="team", now=NOW)
    assert fresh == ("MoTRun team/paper\nphase:     Pending (not yet seen by the operator)\nround:     -/3\n\n"
                     "no stage started yet\n")
    status = {"phase": "Pending", "reason": "PreflightRunning", "message": "preflight running",
              "preflight": {"job": "paper-preflight-a1", "attempt": 1, "state": "Running",
                            "checkpoint": f"{ROOT}/preflight.json"}}
    text = render(status, SPEC, now=NOW)
    print("\n" + text)
    assert table_rows(text) == {("-", "preflight"): ["-", "preflight", "Running", "1", "-", "-", "-",
                                                     "paper/preflight.json"]}


@pytest.mark.parametrize("seconds,text", [(None, "-"), (-1, "-"), (0, "0s"), (12.4, "12s"), (60, "1m 0s"),
                                          (125, "2m 5s"), (3725, "1h 2m"), (190000, "2d 4h")])
def test_human_duration(seconds, text):
    assert human_duration(seconds) == text


def test_short_checkpoint():
    assert short_checkpoint(f"{ROOT}/round-2/merged/") == "round-2/merged"
    assert short_checkpoint(None) == "-"
    assert short_checkpoint("local") == "local"


def test_round_0_shows_the_students_own_score():
    from mot_operator import status_table

    status = {"phase": "Running", "round": 1, "student": {
        "model": "s3://b/models/qwen3-8b", "evalScore": 0.715,
        "eval": {"job": "r-r0-eval-a1", "attempt": 1, "state": "Succeeded", "score": 0.715}},
        "rounds": [{"round": 1, "branches": {}}]}
    [row] = [r for r in status_table.rows(status, {"teachers": []}) if r[0] == "0"]
    assert row[:3] == ["0", "student", "Succeeded"] and row[6] == status_table._num(0.715)


def test_the_model_select_best_chose_is_marked_final():
    status = {"phase": "Succeeded", "round": 2, "finalModel": f"{ROOT}/round-1/merged",
              "selected": {"round": 1, "checkpoint": f"{ROOT}/round-1/merged", "evalScore": 0.7,
                           "reason": "best eval score 0.7 of rounds 0-2 (spec.evaluation.selectBest)"},
              "student": {"model": "s3://b/student", "evalScore": 0.5},
              "rounds": [done_round(1, 0.7), done_round(2, 0.6)]}
    text = render(status, SPEC, now=NOW)
    got = table_rows(text)
    assert ("1", "merged (final)") in got and ("2", "merged") in got and ("0", "student") in got
    assert f"final:     {ROOT}/round-1/merged" in text.splitlines()
    status["selected"]["round"] = 0
    assert ("0", "student (final)") in table_rows(render(status, SPEC, now=NOW))


def test_a_gangs_uncounted_attempts_and_restarts_show_beside_its_attempt():
    """A multi-node branch's attempts ended by a disruption (plain Jobs) and its JobSet's whole-group
    restarts count against nothing; the ATTEMPT column says they happened."""
    rec = done_round(1)
    rec["branches"]["a"].update(attempt=3, disruptedAttempts=2)
    rec["branches"]["qwq"].update(attempt=1, restarts=1)
    got = table_rows(render({"phase": "Running", "round": 1, "rounds": [rec]}, SPEC, now=NOW))
    assert got[("1", "branch a")][3] == "3 (2 disrupted)"
    assert got[("1", "branch qwq")][3] == "1 (1 restarted)"

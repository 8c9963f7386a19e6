"""`mot run`'s live view, fed by the trainer's progress records: plain throttled lines without escape
codes off a terminal, a rich live block on one; and the runner reading each process's
MOT_PROGRESS_FILE into its job (kept in status.json) and into the planner's ObservedJob."""

import io
import json
import os
import sys

from rich.console import Console

from mot_operator.local.progress import LiveView

RECORD = {"step": 12, "totalSteps": 50, "loss": 0.5321, "learningRate": 0.001, "tokens": 12345,
          "tokensPerSecond": 987.1, "etaSeconds": 40.2, "elapsedSeconds": 10.3, "time": "2026-11-29T18:00:00Z"}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def record(step: int, **extra) -> dict:
    return {**RECORD, "step": step, **extra}


def test_plain_lines_without_escape_codes_throttled_per_process():
    out, clock = io.StringIO(), Clock()
    view = LiveView(stream=out, tty=False, plain_interval=10, clock=clock)
    view.set_header("MoTRun local/x: Running, round 1/2")
    view.set_header("MoTRun local/x: Running, round 1/2")  # unchanged: not printed again
    view.start("a", "r1 sft alpha")
    view.start("b", "r1 sft beta")
    view.feed("a", {"step": 0, "totalSteps": 50, "tokens": 0})  # no loss or ETA before the first step
    view.feed("a", record(12))  # 0 s after the last line of "a": held back
    view.feed("b", record(3))  # another process: its own interval
    clock.now += 9.9
    view.feed("a", record(20))
    clock.now += 0.1
    view.feed("a", record(21))
    view.feed("a", record(21))  # the same record again: nothing new to show
    view.redraw()  # a terminal's redraw: nothing here
    view.finish("a", "done")
    view.message("Normal  RoundStarted: round 2")
    view.close()
    assert "\x1b" not in out.getvalue()
    assert out.getvalue().splitlines() == [
        "MoTRun local/x: Running, round 1/2",
        "  started  r1 sft alpha",
        "  started  r1 sft beta",
        "  r1 sft alpha  step 0/50",
        "  r1 sft beta  step 3/50  loss 0.5321  987 tok/s  ETA 0m40s",
        "  r1 sft alpha  step 21/50  loss 0.5321  987 tok/s  ETA 0m40s",
        "r1 sft alpha  step 21/50  loss 0.5321  987 tok/s  done",
        "Normal  RoundStarted: round 2",
    ]


def test_terminal_block_shows_step_loss_speed_and_eta():
    out, clock = io.StringIO(), Clock()
    view = LiveView(console=Console(file=out, force_terminal=True, width=140), clock=clock)
    assert view.tty
    view.set_header("MoTRun local/x: Running, round 1/2")
    view.start("a", "r1 sft alpha")
    view.start("m", "r1 merge")
    clock.now += 75
    view.redraw()
    first = out.getvalue()
    assert "MoTRun local/x: Running, round 1/2" in first and "1m15s" in first  # no record: time running
    view.feed("a", RECORD)
    assert out.getvalue() == first  # shown at the next redraw, not on every record
    view.redraw()
    drawn = out.getvalue()[len(first):]
    assert "step 12/50" in drawn and "loss 0.5321" in drawn and "987 tok/s" in drawn and "ETA 0m40s" in drawn
    assert "\x1b[" in drawn  # redrawn in place: cursor movement and colours
    view.message("Warning BranchFailed: [alpha] exit 1")  # printed as is: brackets are not markup
    view.finish("a", "done")
    view.close()
    text = out.getvalue()
    assert "Warning BranchFailed: [alpha] exit 1" in text
    assert "r1 sft alpha  step 12/50  loss 0.5321  987 tok/s  done" in text
    assert "\x1b[?25h" in text  # the cursor is shown again
    after = len(text)
    view.message("interrupted")  # after close: a plain print, no block drawn again
    view.redraw()
    assert out.getvalue()[after:].strip().endswith("interrupted") and "step" not in out.getvalue()[after:]


def test_quiet_prints_nothing(capsys):
    with open(os.devnull, "w") as devnull:  # what `mot run --quiet` passes
        view = LiveView(stream=devnull)
        view.set_header("h")
        view.start("a", "r1 sft alpha")
        view.feed("a", RECORD)
        view.redraw()
        view.finish("a", "done")
        view.close()
    assert capsys.readouterr() == ("", "")


FAKE_TRAINER = """
import json, os
path = os.environ["MOT_PROGRESS_FILE"]
with open(path, "a") as f:
    f.write(json.dumps({"step": 0, "totalSteps": 2, "tokens": 0}) + "\\n")
    f.write(json.dumps({"step": 2, "totalSteps": 2, "loss": 0.25, "tokens": 64, "etaSeconds": 0.0}) + "\\n")
    f.write('{"step": 3, "tot')  # a line cut short: not a record
"""


def test_runner_reads_progress_records_into_the_job_and_observed_job(tmp_path):
    from mot_operator.local.runner import LocalJob, LocalRunner, Options
    from mot_operator.planner import RunRef
    from mot_operator.spec import parse_spec

    data = tmp_path / "a.jsonl"
    data.write_text(json.dumps({"prompt": "1+1", "response": "2", "answer": "2"}) + "\n")
    spec = {"student": str(tmp_path / "student"), "teachers": [{"name": "a", "dataset": str(data)}], "rounds": 1,
            "storage": {"uri": str(tmp_path / "s")}}
    workdir, out = tmp_path / "work", io.StringIO()

    def runner():
        return LocalRunner(RunRef("local", "x"), parse_spec(spec), spec, workdir, Options(
            trainer_cmd=[sys.executable, "-c", FAKE_TRAINER],
            progress=LiveView(stream=out, tty=False, plain_interval=0)))

    first = runner()
    (first.logs / "x-r1-a.progress.jsonl").write_text(json.dumps({"step": 99, "totalSteps": 99}) + "\n")
    first._add(LocalJob(name="x-r1-a", stage="sft", round=1, teacher="a", attempt=1, args=[],
                        output_uri=str(tmp_path / "s" / "never-written"), label="r1 sft a"))
    first._launch(first.jobs["x-r1-a"], 0)
    first.procs["x-r1-a"].popen.wait(timeout=60)
    first._reap()
    first.save()
    last = {"step": 2, "totalSteps": 2, "loss": 0.25, "tokens": 64, "etaSeconds": 0.0}
    job = first.jobs["x-r1-a"]
    assert job.state == "Failed" and job.progress == last  # the stale step 99 was removed before launch
    assert [o.progress for o in first.observed()] == [last]
    assert "  r1 sft a  step 2/2  loss 0.2500  ETA 0m00s" in out.getvalue().splitlines()
    assert "step 99" not in out.getvalue()

    again = runner()  # a resumed `mot run`: the record comes back from status.json
    assert [o.progress for o in again.observed()] == [last]

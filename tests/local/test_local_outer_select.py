"""`mot run` with spec.merge.outer (momentum + Nesterov) and spec.evaluation.selectBest on the tiny
model: each round's merge gets the outer step's flags and keeps its velocity beside the merged model
(round-N/outer-state, a manifest of kind "outer-state"), round 2 reads round 1's, and at the end the
best-scoring of the student and the merged rounds is the final model, in status.json, results.json
and report.md."""

import json
import subprocess

from support.local_run import mot_command, mot_env, write_manifest

from mot_trainer.storage import read_checkpoint_manifest

OUTER = {"learningRate": 0.8, "momentum": 0.5, "nesterov": True}


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_outer_momentum_keeps_velocity_per_round_and_select_best_picks_the_final_model(tmp_path, tiny_model):
    manifest = write_manifest(tmp_path / "m", tiny_model, name="outer", steps=2, extra_spec={
        "preflight": {"enabled": False},
        "merge": {"outer": OUTER},
        "evaluation": {"dataset": "eval.jsonl", "samples": 1, "maxNewTokens": 16, "selectBest": True}})
    workdir = tmp_path / "w"
    proc = subprocess.run(mot_command("run", manifest, "--workdir", workdir, "--parallel", 2, "--threads", 1),
                          capture_output=True, text=True, env=mot_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = json.loads((workdir / "status.json").read_text())
    status = saved["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    assert [r["round"] for r in status["rounds"]] == [1, 2]
    run_root = workdir / "storage" / "local" / "outer"
    states = {r: str(run_root / f"round-{r}" / "outer-state") for r in (1, 2)}

    # Each round's merge: the outer flags, its start as --base, its own velocity out, round 2 reads round 1's.
    merges = {j["round"]: j["args"] for j in saved["jobs"] if j["stage"] == "merge" and j["role"] == "mot"}
    assert sorted(merges) == [1, 2], saved["jobs"]
    for round_, args in merges.items():
        assert flag(args, "--outer-learning-rate") == "0.8" and flag(args, "--outer-momentum") == "0.5", args
        assert "--outer-nesterov" in args and flag(args, "--outer-state-out") == states[round_], args
    assert "--outer-state-in" not in merges[1], merges[1]
    assert flag(merges[2], "--outer-state-in") == states[1], merges[2]
    assert flag(merges[1], "--base") == str(tiny_model)
    assert flag(merges[2], "--base") == status["rounds"][0]["mergedCheckpoint"]

    # The velocities are verified folders of their own; the merged model records the outer step.
    for round_, state in states.items():
        velocity = read_checkpoint_manifest(state)
        assert velocity["kind"] == "outer-state", velocity
        assert velocity["params"] == OUTER, velocity["params"]
        assert velocity["inputs"]["state_in"] == (states[round_ - 1] if round_ > 1 else None), velocity["inputs"]
        assert any(f["path"].endswith(".safetensors") for f in velocity["files"]), velocity["files"]
    merged = read_checkpoint_manifest(status["rounds"][1]["mergedCheckpoint"])
    assert merged["kind"] == "merge" and merged["params"]["outer"] == OUTER, merged["params"]
    assert merged["inputs"]["outer_state_in"] == states[1] and merged["inputs"]["outer_state_out"] == states[2]

    # selectBest: the best of round 0 (the student) and both merged rounds, ties to the later round.
    scores = [(0, status["student"]["model"], status["student"]["evalScore"])] + [
        (r["round"], r["mergedCheckpoint"], r["evalScore"]) for r in status["rounds"]]
    best = max(scores, key=lambda c: (c[2], c[0]))
    selected = status["selected"]
    print(f"\nscores {[(r, s) for r, _, s in scores]}; selected {json.dumps(selected)}")
    assert (selected["round"], selected["checkpoint"], selected["evalScore"]) == best
    assert status["finalModel"] == selected["checkpoint"] and "selectBest" in selected["reason"]
    assert str(selected["checkpoint"]) in status["message"]

    results = json.loads((workdir / "results.json").read_text())
    assert results["selected"] == selected
    report = (workdir / "report.md").read_text()
    what = "the student (round 0)" if best[0] == 0 else f"round {best[0]}'s merged model"
    final_lines = [line for line in report.splitlines() if line.startswith("Final model:")]
    assert final_lines == [f"Final model: {what} ({selected['reason']})"], final_lines
    marked = [line for line in report.splitlines() if "✓ selected" in line]
    assert len(marked) == 1, marked
    cells = [c.strip() for c in marked[0].strip("|").split("|")]
    assert cells[0] == str(best[0]) and cells[1] == ("start (student) ✓ selected" if best[0] == 0
                                                     else "**merged** ✓ selected"), marked

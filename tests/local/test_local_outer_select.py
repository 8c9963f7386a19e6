"""`mot run` with spec.merge.outer (momentum + Nesterov) and spec.evaluation.selectBest on the tiny
model: each round's merge gets the outer step's flags and keeps its velocity beside the merged model
(round-N/outer-state, a manifest of kind "outer-state"), round 2 reads round 1's, and at the end the
best-scoring of the student and the merged rounds is the final model, in status.json, results.json
and report.md."""

import json
import subprocess

from support.local_run import mot_command, mot_env, write_manifest
from support.outer_select import OUTER, check_merge_args, check_selection, check_velocities

from mot_trainer.storage import read_checkpoint_manifest


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

    merges = {j["round"]: j["args"] for j in saved["jobs"] if j["stage"] == "merge" and j["role"] == "mot"}
    check_merge_args(merges, states, str(tiny_model), status)
    check_velocities(read_checkpoint_manifest, states, status)
    best = check_selection(status)
    selected = status["selected"]

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

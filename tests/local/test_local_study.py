"""`mot demo --study`: the regime map's statistics on hand-made results, and one real (cell, seed)
of the quick configuration through `mot run`, resumed from its results file."""

import json
import math
import subprocess

import pytest
import yaml
from support.local_run import mot_command, mot_env

from mot_operator.demo import study


def test_interval_is_the_t_interval_of_the_mean():
    mean, half = study.interval([0.1, 0.2, 0.3, 0.4, 0.5])
    assert mean == pytest.approx(0.3) and half == pytest.approx(2.776 * 0.158113883 / math.sqrt(5), rel=1e-6)
    assert math.isnan(study.interval([0.4])[1])
    # Between the table's rows the smaller degrees of freedom (a wider interval) is used.
    assert study.interval([0.0, 1.0] * 11 + [0.5])[1] == pytest.approx(2.086 * 0.5 / math.sqrt(23), rel=0.05)


@pytest.mark.parametrize("diffs,word", [([0.05, 0.06, 0.04, 0.05, 0.07], "wins"),
                                        ([-0.05, -0.06, -0.04, -0.05, -0.07], "loses"),
                                        ([0.05, -0.06, 0.04, -0.05, 0.01], "ties")])
def test_verdict_needs_the_interval_to_exclude_zero(diffs, word):
    assert study.verdict(diffs).startswith(word)


def _unit(mot: float, best_std: float) -> dict:
    score = lambda a: {"accuracy": a, "heldout_loss": 0.1}  # noqa: E731
    methods = {m: score(0.5) for m in study.METHODS}
    methods.update({"MoT": score(mot), "best STD, equal steps": score(best_std), "start": score(0.2)})
    return {"methods": methods, "rounds": {}, "selected_round": 3, "seconds": 60.0}


def test_render_gives_each_cell_its_means_and_paired_verdicts():
    found = {"config": {"eval_size": 100, "digits": 3, "rounds": 3, "steps": 30, "learning_rate": 0.001,
                        "batch_size": 16, "per_teacher": 200, "outer": study.OUTER},
             "units": {study.unit_key("partial", "noisy", s): _unit(0.6 + s / 100, 0.4) for s in range(5)}
             | {study.unit_key("strong", "clean", s): _unit(0.5, 0.5 + (-1) ** s / 10) for s in range(5)}}
    text = study.render(found, study.StudyConfig())
    print(text)
    partial = next(line for line in text.splitlines() if line.startswith("| partial / noisy") and "wins" in line)
    assert "wins +22.0 ± 2.0" in partial and "wins +42.0 ± 2.0" in partial  # vs best STD, vs start
    strong = next(line for line in text.splitlines() if line.startswith("| strong / clean") and "ties" in line)
    assert "ties" in strong
    assert "10 (cell, seed) units, 10 min in all (1.0 min each)" in text


def test_one_cell_and_seed_through_mot_run_then_resumed(tmp_path):
    workdir, results = tmp_path / "study", tmp_path / "study-results.json"
    args = ("demo", "--study", "--quick", "--seeds", 1, "--study-cells", "quick:styles", "--workdir", workdir,
            "--study-results", results)
    proc = subprocess.run(mot_command(*args), capture_output=True, text=True, env=mot_env(), timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    found = json.loads(results.read_text())
    [(key, unit)] = found["units"].items()
    assert key == "quick/styles/seed-0" and set(unit["methods"]) == set(study.METHODS)
    assert all(0.0 <= s["accuracy"] <= 1.0 for s in unit["methods"].values()), unit
    assert len(unit["rounds"]["average"]) == 2 and len(unit["rounds"]["outer"]) == 2
    unit_dir = workdir / "quick-styles-seed-0"
    plain = yaml.safe_load((unit_dir / "average" / "motrun.yaml").read_text())["spec"]
    outer = yaml.safe_load((unit_dir / "outer" / "motrun.yaml").read_text())["spec"]
    assert plain["evaluation"]["selectBest"] and "outer" not in plain["merge"]
    assert outer["merge"]["outer"] == study.OUTER
    styles = {t["name"]: (unit_dir / "data" / f"teacher-{t['name']}.jsonl").read_text() for t in plain["teachers"]}
    assert "Left are" in styles["hasty"] and "] " in styles["sloppy"] and "result" in styles["careful"]
    # Equal compute: each baseline trained K x rounds x steps (3 x 2 x 4).
    baselines = json.loads((unit_dir / "average" / "results.json").read_text())["baselines"]
    assert {b["steps"] for b in baselines.values() if b["budget"] == "compute"} == {24}
    assert "# MoT regime map" in (workdir / "study-report.md").read_text()
    again = subprocess.run(mot_command(*args), capture_output=True, text=True, env=mot_env(), timeout=300)
    assert again.returncode == 0 and "study: 0 (cell, seed) units to run, 1 already in" in again.stdout


def test_results_of_another_configuration_are_not_mixed_in(tmp_path):
    results = tmp_path / "study-results.json"
    results.write_text(json.dumps({"config": {"rounds": 5}, "units": {"quick/noisy/seed-0": _unit(0.5, 0.5)}}))
    proc = subprocess.run(mot_command("demo", "--study", "--quick", "--seeds", 1, "--study-cells", "quick:noisy",
                                      "--workdir", tmp_path / "w", "--study-results", results),
                          capture_output=True, text=True, env=mot_env(), timeout=120)
    assert proc.returncode == 2 and "holds results of another configuration" in proc.stderr, proc.stderr
    assert json.loads(results.read_text())["config"] == {"rounds": 5}

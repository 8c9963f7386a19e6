"""report.py on hand-made results dicts (no training): the baselines' budgets (equal steps, equal
compute) and the model spec.evaluation.selectBest chose."""

from mot_operator.demo.cli import summary_table
from mot_operator.local import report


def ev(accuracy: float, loss: float = 1.0) -> dict:
    return {"accuracy": accuracy, "heldout_loss": loss}


def results(*, budgets=("steps",), selected=None) -> dict:
    """2 teachers × 2 rounds × 3 steps: equal steps 6 SFT steps, equal compute 12."""
    baselines = {}
    accuracy = {"steps": {"careful": 0.4, "hasty": 0.5, "MTD": 0.45},
                "compute": {"careful": 0.7, "hasty": 0.6, "MTD": 0.65}}
    for budget in budgets:
        suffix, steps = ("", 6) if budget == "steps" else (" (compute)", 12)
        for teacher in ("careful", "hasty"):
            baselines[f"std-{teacher}{suffix}"] = {"kind": "STD", "budget": budget, "steps": steps, "loss": 0.5,
                                                   "eval": ev(accuracy[budget][teacher])}
        baselines[f"MTD{suffix}"] = {"kind": "MTD", "budget": budget, "steps": steps, "loss": 0.5,
                                     "eval": ev(accuracy[budget]["MTD"])}
    branch = {"loss": 0.9, "eval": ev(0.3), "checkpoint": "c"}
    return {
        "run": "local/t", "total_steps": 6, "teachers": ["careful", "hasty"], "start": {"eval": ev(0.1, 3.0)},
        "rounds": [{"round": r, "branches": {"careful": branch, "hasty": branch},
                    "merged": {"eval": ev(acc, 2.0 - r / 2), "checkpoint": f"m{r}"}}
                   for r, acc in ((1, 0.55), (2, 0.35))],
        "selected": selected,
        "baselines": baselines,
    }


ROUND1 = {"round": 1, "checkpoint": "m1", "evalScore": 0.55, "reason": "the best eval score (55.0%)"}


def test_equal_steps_alone_keeps_the_papers_rows():
    rows = report.comparison_rows(results())
    assert [(m, s) for m, s, _ in rows] == [("MoT (final merged)", 6), ("best STD (std-hasty), equal steps", 6),
                                            ("MTD, equal steps", 6)]
    assert rows[0][2]["accuracy"] == 0.35  # the last round's merged model
    assert report.best_std(results(), "compute") is None


def test_each_budget_has_its_best_std_and_mtd_rows():
    res = results(budgets=("steps", "compute"))
    assert report.best_std(res)[0] == "std-hasty"  # default: equal steps
    assert report.best_std(res, "steps")[0] == "std-hasty"
    key, best = report.best_std(res, "compute")
    assert key == "std-careful (compute)" and best["steps"] == 12 and best["budget"] == "compute"
    rows = {m: (s, e["accuracy"]) for m, s, e in report.comparison_rows(res)}
    assert rows == {"MoT (final merged)": (6, 0.35),
                    "best STD (std-hasty), equal steps": (6, 0.5), "MTD, equal steps": (6, 0.45),
                    "best STD (std-careful), equal compute": (12, 0.7), "MTD, equal compute": (12, 0.65)}
    table = report.comparison_table(res)
    assert "6 per branch (12 in all)" in table and "| best STD (std-careful), equal compute | 12 " in table


def test_compute_alone():
    res = results(budgets=("compute",))
    assert report.budgets(res) == ["compute"]
    assert [m for m, _, _ in report.comparison_rows(res)] == [
        "MoT (final merged)", "best STD (std-careful), equal compute", "MTD, equal compute"]
    notes = report.budget_notes(res)
    assert len(notes) == 1 and notes[0].startswith("equal compute: 12 SFT steps per baseline (2 teachers")


def test_baselines_table_lists_every_baseline_with_its_budget():
    table = report.baselines_table(results(budgets=("steps", "compute")))
    lines = table.splitlines()[2:]
    assert [line.split("|")[1].strip() for line in lines] == [
        "MTD", "std-careful", "std-hasty", "MTD (compute)", "std-careful (compute)", "std-hasty (compute)"]
    assert all("equal steps" in line and "| 6 " in line for line in lines[:3])
    assert all("equal compute" in line and "| 12 " in line for line in lines[3:])


def test_results_without_budget_read_as_equal_steps():
    """A results.json from before budgets: no "budget" key, no "teachers"."""
    res = results()
    del res["teachers"]
    for v in res["baselines"].values():
        del v["budget"]
    assert report.budgets(res) == ["steps"]
    assert report.best_std(res)[0] == "std-hasty"
    assert report.teacher_count(res) == 2  # from the rounds' branches
    assert "MoT spends 2× that (12 steps over its 2 branches)" in report.budget_notes(res)[0]


def test_report_text_says_what_each_budget_means(tmp_path):
    res = results(budgets=("steps", "compute"))
    text = report.render_text(res)
    assert "equal steps: 6 SFT steps per baseline" in text and "the paper's accounting" in text
    assert "equal compute: 12 SFT steps per baseline" in text
    md, _ = report.write_report(res, tmp_path)
    section = md.read_text().split("## MoT vs baselines", 1)[1]
    assert "the paper's accounting. MoT spends 2× that" in section
    assert "as many as all of MoT's branches together" in section
    assert "Final model" not in md.read_text()  # no selection: nothing new


def test_selected_round_is_marked_and_named():
    res = results(selected=ROUND1)
    table = report.rounds_table(res)
    assert "| 1     | **merged** ✓ selected" in table and table.count("✓ selected") == 1
    assert report.selected_line(res) == "Final model: round 1's merged model (the best eval score (55.0%))"
    assert report.selected_eval(res)["accuracy"] == 0.55
    assert report.final_merged_eval(res)["accuracy"] == 0.35  # still the last round's
    rows = [(m, e["accuracy"]) for m, _, e in report.comparison_rows(res)][:2]
    assert rows == [("MoT (final merged)", 0.35), ("MoT (selectBest: round 1)", 0.55)]
    text = report.render_text(res).splitlines()
    assert text[text.index(table.splitlines()[-1]) + 1].startswith("Final model: round 1's merged model")


def test_selected_student():
    res = results(selected={"round": 0, "checkpoint": "student", "evalScore": 0.1, "reason": "no round beat it"})
    assert "| 0     | start (student) ✓ selected" in report.rounds_table(res)
    assert report.selected_line(res) == "Final model: the student (round 0) (no round beat it)"
    assert report.selected_eval(res)["accuracy"] == 0.1
    assert ("MoT (selectBest: round 0)", 6) in [(m, s) for m, s, _ in report.comparison_rows(res)]


def test_no_selection():
    res = results()
    assert report.selected_eval(res) is None and report.selected_line(res) is None
    assert "✓" not in report.rounds_table(res)
    assert "Final model" not in report.render_text(res)
    del res["selected"]  # results.json from before selectBest
    assert report.selected_eval(res) is None


def test_report_md_and_plot_with_selection_and_both_budgets(tmp_path):
    res = results(budgets=("steps", "compute"), selected=ROUND1)
    md, png = report.write_report(res, tmp_path)
    text = md.read_text()
    per_round = text.split("## Per round", 1)[1].split("## MoT vs baselines", 1)[0]
    assert "Final model: round 1's merged model (the best eval score (55.0%))" in per_round
    assert "| MoT (selectBest: round 1)" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_summary_has_rows_per_budget():
    steps_only = summary_table([results()])
    assert "| best STD (per seed) " in steps_only and "| MTD (union) " in steps_only
    assert "equal" not in steps_only  # equal steps alone: the labels as before
    both = summary_table([results(budgets=("steps", "compute"), selected=ROUND1)])
    for row in ("best STD (per seed), equal steps", "best STD (per seed), equal compute", "MTD (union), equal steps",
                "MTD (union), equal compute", "STD std-careful, equal compute", "STD std-hasty, equal steps",
                "MoT (selectBest)"):
        assert f"| {row} " in both, row


def test_demo_summary_ends_with_paired_verdicts_over_seeds():
    one = summary_table([results()])
    assert "paired by seed" not in one  # one seed: no interval
    text = summary_table([results(), results(), results()])
    # MoT 35 % every seed; start 10 %: +25 points with no spread is a win; MTD 45 % a loss.
    assert "- MoT vs start (pre-trained student): wins +25.0 ± 0.0 points" in text
    assert "- MoT vs MTD (union): loses -10.0 ± 0.0 points" in text
    assert "- MoT vs best STD (per seed): loses -15.0 ± 0.0 points" in text
    assert "MoT vs STD std-" not in text  # single teachers are in the table, not compared one by one

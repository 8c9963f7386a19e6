"""`mot demo --study`: the regime map. When does merging pay?

Cells: student strength on the target (the shipped weak / partial / strong students) × teachers
(tasks.TEACHER_SETS: clean, noisy, noisy in three CoT styles). Per cell and seed, two MoT runs of
the demo's size (one plain average with selectBest, one with the outer optimizer) and the baselines
at equal steps (rounds × steps, the paper's accounting) and at equal compute (K × rounds × steps),
all through `mot run` as a user runs them. Every method is scored on the same held-out problems.

Each finished (cell, seed) is added to the results file at once (written whole, atomically), and a
rerun skips what the file already has: the study can be stopped and resumed, and grown by seeds.
The summary gives, per cell and method, the mean exact match with its 95 % interval over seeds, and
the paired difference of MoT from each baseline with its interval: "wins" and "loses" only where
the interval excludes 0.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from mot_operator.demo import tasks
from mot_operator.demo.config import motrun_manifest
from mot_operator.demo.student import STUDENTS, shipped_student

OUTER = {"learningRate": 0.7, "momentum": 0.9, "nesterov": True}  # DiLoCo's published setting, not tuned here
METHODS = ("start", "MoT", "MoT + selectBest", "MoT + outer", "best STD, equal steps", "MTD, equal steps",
           "best STD, equal compute", "MTD, equal compute")
# MoT's paired comparisons: against where it started and each baseline.
VERSUS = ("start", "best STD, equal steps", "MTD, equal steps", "best STD, equal compute", "MTD, equal compute")
# Two-sided 95 % Student t quantiles by degrees of freedom (beyond 30: the normal's 1.96).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
       20: 2.086, 25: 2.060, 30: 2.042}


@dataclass(frozen=True)
class StudyConfig:
    students: tuple[str, ...] = ("weak", "partial", "strong")
    teacher_sets: tuple[str, ...] = ("clean", "noisy", "styles")
    seeds: int = 5


def unit_key(student: str, teachers: str, seed: int) -> str:
    return f"{student}/{teachers}/seed-{seed}"


def run(args, demo_cfg) -> int:
    """The study's command: every missing (cell, seed), then the summary."""
    from mot_operator.local.cli import run_spec
    from mot_operator.spec import parse_spec

    cfg = StudyConfig(seeds=args.seeds or StudyConfig.seeds)
    if args.study_cells:
        pairs = [c.split(":") for c in args.study_cells.split(",")]
        cfg = replace(cfg, students=tuple(dict.fromkeys(p[0] for p in pairs)),
                      teacher_sets=tuple(dict.fromkeys(p[1] for p in pairs)))
    results_path = (args.study_results or args.workdir / "study-results.json").resolve()
    found = load(results_path)
    config = study_config(demo_cfg)
    if found["units"] and found.get("config") != config:
        print(f"study: {results_path} holds results of another configuration ({found.get('config')}); "
              f"this one is {config}: use another --study-results", file=sys.stderr)
        return 2
    found["config"] = config
    workdir = args.workdir.resolve()
    cores = os.cpu_count() or 1
    parallel = args.parallel or cores
    todo = [(seed, student, teachers) for seed in range(cfg.seeds) for student in cfg.students
            for teachers in cfg.teacher_sets if unit_key(student, teachers, seed) not in found["units"]]
    print(f"study: {len(todo)} (cell, seed) units to run, {len(found['units'])} already in {results_path}", flush=True)
    for i, (seed, student, teachers) in enumerate(todo, 1):
        started = time.monotonic()
        unit_dir = workdir / f"{student}-{teachers}-seed-{seed}"
        files = tasks.build_task(unit_dir / "data", seed=seed, teachers=tasks.TEACHER_SETS[teachers],
                                 per_teacher=demo_cfg.per_teacher, eval_size=demo_cfg.eval_size, digits=demo_cfg.digits)
        outcome = {}
        for variant, outer, compare in (("average", None, "both"), ("outer", OUTER, None)):
            manifest = study_manifest(f"{variant}-seed-{seed}", shipped_student(student), files,
                                      replace(demo_cfg, teachers=tasks.TEACHER_SETS[teachers]), seed, outer)
            run_dir = unit_dir / variant
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "motrun.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
            spec = manifest["spec"]
            spec["storage"] = {"uri": str(run_dir / "storage")}
            with open(run_dir / "mot-run.log", "a") as log, contextlib.redirect_stdout(log):
                rc = run_spec(manifest["metadata"], parse_spec(spec), spec, run_dir, parallel=parallel,
                              threads=max(1, cores // parallel), compare=compare, quiet=True, eval_branches=False)
            if rc != 0:
                print(f"study: {run_dir} ended with exit code {rc}; see {run_dir / 'mot-run.log'}")
                return rc
            outcome[variant] = json.loads((run_dir / "results.json").read_text())
        unit = unit_scores(outcome["average"], outcome["outer"])
        unit["seconds"] = round(time.monotonic() - started, 1)
        found["units"][unit_key(student, teachers, seed)] = unit
        save(results_path, found)
        scores = ", ".join(f"{m} {s['accuracy']:.0%}" for m, s in unit["methods"].items() if s)
        print(f"study [{i}/{len(todo)}] {unit_key(student, teachers, seed)} in {unit['seconds']:.0f}s: {scores}",
              flush=True)
    text = render(found, cfg)
    (workdir / "study-report.md").parent.mkdir(parents=True, exist_ok=True)
    (workdir / "study-report.md").write_text(text)
    print("\n" + text)
    return 0


def study_config(demo_cfg) -> dict:
    return {"rounds": demo_cfg.rounds, "steps": demo_cfg.steps, "learning_rate": demo_cfg.learning_rate,
            "batch_size": demo_cfg.batch_size, "per_teacher": demo_cfg.per_teacher, "eval_size": demo_cfg.eval_size,
            "digits": demo_cfg.digits, "outer": OUTER, "students": {n: STUDENTS[n].key() for n in STUDENTS}}


def study_manifest(name: str, student: Path, files: dict, cfg, seed: int, outer: dict | None) -> dict:
    manifest = motrun_manifest(name, student, files, cfg, seed)
    spec = manifest["spec"]
    spec["preflight"] = {"enabled": False}  # the demo's data is generated; the demo itself runs the preflight
    spec["evaluation"]["selectBest"] = True
    if outer:
        spec["merge"]["outer"] = dict(outer)
    return manifest


def unit_scores(average: dict, outer: dict) -> dict:
    """{method: {accuracy, heldout_loss}} of one (cell, seed), and the MoT runs' rounds."""
    from mot_operator.local.report import best_std, final_merged_eval, selected_eval

    def score(ev):
        return {"accuracy": ev["accuracy"], "heldout_loss": ev.get("heldout_loss")} if ev else None

    def mtd(budget):
        return next((b["eval"] for b in average.get("baselines", {}).values()
                     if b["kind"] == "MTD" and b.get("budget", "steps") == budget), None)

    methods = {
        "start": score((average.get("start") or {}).get("eval")),
        "MoT": score(final_merged_eval(average)),
        "MoT + selectBest": score(selected_eval(average)),
        "MoT + outer": score(final_merged_eval(outer)),
        "MTD, equal steps": score(mtd("steps")),
        "MTD, equal compute": score(mtd("compute")),
    }
    for budget in ("steps", "compute"):
        best = best_std(average, budget)
        methods[f"best STD, equal {budget}"] = score(best[1]["eval"]) if best else None
    rounds = {variant: [(r.get("merged") or {}).get("eval", {}).get("accuracy") for r in res["rounds"]]
              for variant, res in (("average", average), ("outer", outer))}
    return {"methods": {m: methods[m] for m in METHODS}, "rounds": rounds,
            "selected_round": (average.get("selected") or {}).get("round")}


# ------------------------------------------------------------------------------------- files
def load(path: Path) -> dict:
    if path.exists():
        found = json.loads(path.read_text())
        found.setdefault("units", {})
        return found
    return {"units": {}}


def save(path: Path, found: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------- summary
def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t interval (0 for one value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, math.nan
    df = len(values) - 1
    t = T95[max(k for k in T95 if k <= df)] if df <= 30 else 1.96  # between table rows: the smaller df's
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def _pct(mean: float, half: float) -> str:
    return f"{mean * 100:.1f}" + ("" if math.isnan(half) else f" ± {half * 100:.1f}")


def cells(found: dict, cfg: StudyConfig) -> list[tuple[str, str, list[dict]]]:
    out = []
    for student in cfg.students:
        for teachers in cfg.teacher_sets:
            units = [u for k, u in sorted(found["units"].items()) if k.startswith(f"{student}/{teachers}/")]
            if units:
                out.append((student, teachers, units))
    return out


def verdict(diffs: list[float]) -> str:
    mean, half = interval(diffs)
    if math.isnan(half):
        return f"{mean * 100:+.1f} (1 seed)"
    word = "wins" if mean - half > 0 else "loses" if mean + half < 0 else "ties"
    return f"{word} {mean * 100:+.1f} ± {half * 100:.1f}"


def render(found: dict, cfg: StudyConfig) -> str:
    from mot_operator.local.report import markdown_table

    rows, versus = [], []
    for student, teachers, units in cells(found, cfg):
        cell = f"{student} / {teachers}"
        accs = {m: [u["methods"][m]["accuracy"] for u in units if u["methods"].get(m)] for m in METHODS}
        rows.append([cell, str(len(units))] + [_pct(*interval(v)) if v else "-" for v in accs.values()])
        line = [cell, str(len(units))]
        for mot in ("MoT", "MoT + selectBest", "MoT + outer"):
            for other in VERSUS if mot == "MoT" else ("MoT",) if mot == "MoT + outer" else ("start",):
                diffs = [u["methods"][mot]["accuracy"] - u["methods"][other]["accuracy"] for u in units
                         if u["methods"].get(mot) and u["methods"].get(other)]
                line.append(verdict(diffs) if diffs else "-")
        versus.append(line)
    seconds = [u.get("seconds", 0) for u in found["units"].values()]
    c = found.get("config", {})
    head = (f"Exact match (%) on {c.get('eval_size')} held-out {c.get('digits')}-digit problems, mean ± 95 % interval "
            f"over seeds; {c.get('rounds')} rounds × {c.get('steps')} steps per branch (lr {c.get('learning_rate')}, "
            f"batch {c.get('batch_size')}), {c.get('per_teacher')} problems per teacher; outer optimizer "
            f"{json.dumps(c.get('outer'))}. {len(seconds)} (cell, seed) units, {sum(seconds) / 60:.0f} min in all "
            f"({statistics.mean(seconds) / 60 if seconds else 0:.1f} min each).")
    comparisons = ["MoT vs " + v for v in VERSUS] + ["selectBest vs start", "outer vs MoT"]
    return "\n\n".join([
        "# MoT regime map", head,
        markdown_table(["student / teachers", "seeds", *METHODS], rows),
        "Paired differences over seeds (percentage points, 95 % interval): wins / loses only where the interval "
        "excludes 0.",
        markdown_table(["student / teachers", "seeds", *comparisons], versus),
    ]) + "\n"

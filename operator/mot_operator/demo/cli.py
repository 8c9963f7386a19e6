"""`mot demo`: a complete MoT run on CPU with nothing to download, and the baselines beside it.

It takes a shipped student (demo/student.py: pre-trained once, the same on every machine),
generates three teachers' chain-of-thought data for 3-digit additions (same format, different noise)
and a held-out eval set, writes a MoTRun manifest per seed and runs each with `mot run --compare`.
The summary gives MoT, the best single teacher (STD) and the union of all teachers (MTD) at equal
SFT steps, as the mean and spread over seeds, with held-out loss beside exact match. `--study` runs
the regime map (demo/study.py). docs/demo.md says what was tried and what was found.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import yaml

from mot_operator.demo import tasks
from mot_operator.demo.config import FULL, QUICK, motrun_manifest
from mot_operator.demo.student import STUDENTS, STUDENTS_DIR, build_students, shipped_student

DEFAULT_WORKDIR = Path("mot-runs/demo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="the shortened mode CI uses: a smaller student, 2 teachers, 2 short rounds, 1 seed")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, 1 with --quick)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="manifests, data, checkpoints and reports (default ./mot-runs/demo)")
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("MOT_DEMO_CACHE", ".mot/demo-cache")),
                        help="--build-students' pre-training cache (default .mot/demo-cache, env MOT_DEMO_CACHE)")
    parser.add_argument("--parallel", type=int, default=None, help="processes at once (default: CPU cores)")
    parser.add_argument("--student", default=None,
                        help=f"a shipped student ({', '.join(STUDENTS)}; default partial, quick with --quick) "
                             "or a Hugging Face model folder")
    parser.add_argument("--build-students", nargs="*", metavar="NAME", choices=list(STUDENTS), default=None,
                        help="rebuild the shipped students (all, or those named) by pre-training them, measure "
                             "each on the probe set, and stop; writes --students-dir")
    parser.add_argument("--students-dir", type=Path, default=STUDENTS_DIR,
                        help="where --build-students writes (default: the shipped students' folder)")
    parser.add_argument("--study", action="store_true",
                        help="run the regime map (student strength x teachers x method, --seeds seeds, default 5; "
                             "hours on 2 cores; resumable) instead of the demo; see docs/demo.md")
    parser.add_argument("--study-cells", metavar="STUDENT:TEACHERS,...",
                        help="--study: only these cells, e.g. partial:noisy,strong:clean (students: "
                             f"{', '.join(n for n in STUDENTS if n != 'quick')}; teachers: "
                             f"{', '.join(tasks.TEACHER_SETS)})")
    parser.add_argument("--study-results", type=Path, default=None,
                        help="--study: the results file to grow (default <workdir>/study-results.json)")
    parser.add_argument("--rounds", type=int, default=None, help="override the rounds (experiments)")
    parser.add_argument("--steps", type=int, default=None, help="override the SFT steps per branch per round")
    parser.add_argument("--learning-rate", type=float, default=None, help="override the branches' learning rate")


def run(args: argparse.Namespace) -> int:
    from mot_operator.local.cli import run_spec
    from mot_operator.spec import parse_spec

    cfg = QUICK if args.quick else FULL
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    overrides = {"rounds": args.rounds, "steps": args.steps, "learning_rate": args.learning_rate}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    cores = os.cpu_count() or 1
    if args.build_students is not None:
        build_students(args.build_students or list(STUDENTS), args.students_dir.resolve(), args.cache_dir.resolve(),
                       threads=cores)
        return 0
    if args.study:
        from mot_operator.demo import study

        if args.workdir == DEFAULT_WORKDIR:
            args.workdir = Path("mot-runs/study")
        return study.run(args, cfg)
    parallel = args.parallel or cores
    threads = max(1, cores // parallel)
    started = time.monotonic()
    workdir = args.workdir.resolve()
    student_name = args.student or cfg.student
    try:
        student = shipped_student(student_name) if student_name in STUDENTS else Path(student_name).resolve()
    except FileNotFoundError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    print(f"student: {student_name if student_name in STUDENTS else 'given'} ({student})")
    summaries = []
    for i, seed in enumerate(cfg.seeds):
        name = f"demo-seed-{seed}"
        run_dir = workdir / name
        files = tasks.build_task(run_dir / "data", seed=seed, teachers=cfg.teachers, per_teacher=cfg.per_teacher,
                                 eval_size=cfg.eval_size, digits=cfg.digits)
        manifest = motrun_manifest(name, student, files, cfg, seed)
        (run_dir / "motrun.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
        print(f"\n=== seed {seed}: {run_dir / 'motrun.yaml'} (teacher noise on the data: "
              + ", ".join(f"{t.name} {tasks.noise_rate(_rows(files[t.name])):.0%}" for t in cfg.teachers) + ")",
              flush=True)
        spec = manifest["spec"]
        spec["storage"] = {"uri": str(run_dir / "storage")}
        rc = run_spec(manifest["metadata"], parse_spec(spec), spec, run_dir, parallel=parallel, threads=threads,
                      compare="steps", eval_branches=(i == 0 or not cfg.branch_evals_for_first_seed_only))
        if rc != 0:
            print(f"demo: the run for seed {seed} ended with exit code {rc}; see {run_dir}", file=sys.stderr)
            return rc
        summaries.append(json.loads((run_dir / "results.json").read_text()))
    table = summary_table(summaries)
    shipped = STUDENTS.get(student_name)
    about = (f"the shipped `{student_name}` student ({shipped.layers} layers × {shipped.hidden_size} wide, pre-trained "
             f"on {'/'.join(map(str, shipped.pretrain_digits))}-digit additions)" if shipped else f"`{student}`")
    text = (f"# mot demo: MoT vs baselines over {len(summaries)} seed(s)\n\n"
            + ("**--quick**: a pipeline check with a barely trained student; its scores mean nothing.\n\n"
               if args.quick else "")
            + f"Student: {about}; teachers: {', '.join(f'{t.name} ({t.description})' for t in cfg.teachers)}; "
            f"{cfg.per_teacher} problems each; {cfg.rounds} rounds × {cfg.steps} steps per branch; "
            f"eval on {cfg.eval_size} held-out {cfg.digits}-digit problems (greedy, exact match of the final answer).\n\n"
            + table + "\n\nPer seed: " + ", ".join(f"[{s['run']}]({s['run'].split('/')[1]}/report.md)"
                                                   for s in summaries) + "\n")
    (workdir / "demo-report.md").write_text(text)
    print("\n" + table)
    print(f"\ndemo finished in {time.monotonic() - started:.0f}s; summary: {workdir / 'demo-report.md'}")
    return 0


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mean_sd(values: list[float], pattern: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return pattern.format(values[0])
    return f"{pattern.format(statistics.mean(values))} ± {pattern.format(statistics.stdev(values))}"


def summary_table(results: list[dict]) -> str:
    """Mean ± standard deviation over seeds for MoT, the start, best STD and MTD (each baseline
    budget that ran: ", equal compute" rows for `--compare compute`, and ", equal steps" beside them
    when both ran; equal steps alone keeps its plain labels)."""
    from mot_operator.local.report import (
        BUDGET_NAMES,
        best_std,
        budgets,
        final_merged_eval,
        markdown_table,
        selected_eval,
    )

    ran = {b for r in results for b in budgets(r)}
    suffix = {b: f", {BUDGET_NAMES[b]}" if ran - {"steps"} else "" for b in BUDGET_NAMES}
    methods: dict[str, list[dict]] = {}
    for r in results:
        if r.get("start"):
            methods.setdefault("start (pre-trained student)", []).append(r["start"]["eval"])
        if ev := final_merged_eval(r):
            methods.setdefault("MoT (final merged)", []).append(ev)
        if ev := selected_eval(r):
            methods.setdefault("MoT (selectBest)", []).append(ev)
        for budget in budgets(r):
            if best := best_std(r, budget):
                methods.setdefault(f"best STD (per seed){suffix[budget]}", []).append(best[1]["eval"])
        for label, b in r.get("baselines", {}).items():
            if b.get("eval"):
                budget = b.get("budget") or "steps"
                name = f"STD {label.removesuffix(' (compute)')}" if b["kind"] == "STD" else "MTD (union)"
                methods.setdefault(name + suffix[budget], []).append(b["eval"])
    rows = []
    for method, evals in methods.items():
        rows.append([method, str(len(evals)), _mean_sd([e["accuracy"] * 100 for e in evals], "{:.1f}") + " %",
                     _mean_sd([e["heldout_loss"] for e in evals], "{:.3f}"),
                     " ".join(f"{e['accuracy']:.0%}" for e in evals)])
    table = markdown_table(["method", "seeds", "exact match (mean ± sd)", "held-out loss", "per seed"], rows)
    return table + paired_verdicts(methods)


def paired_verdicts(methods: dict[str, list[dict]]) -> str:
    """MoT minus each other method, seed by seed, with its 95 % interval: the demo's conclusion, which
    (unlike the order of close means) does not change with the CPU's kernels."""
    from mot_operator.demo.study import verdict

    mot = methods.get("MoT (final merged)") or []
    lines = []
    for other, evals in methods.items():
        if other.startswith("MoT") or other.startswith("STD ") or len(evals) != len(mot) or len(mot) < 2:
            continue
        diffs = [m["accuracy"] - e["accuracy"] for m, e in zip(mot, evals, strict=True)]
        lines.append(f"- MoT vs {other}: {verdict(diffs)} points")
    if not lines:
        return ""
    return ("\n\nMoT's exact match minus each, paired by seed (mean ± 95 % interval; wins / loses only where the "
            "interval excludes 0):\n" + "\n".join(lines))

"""The end-of-run report: per round, each branch's loss and eval score and the merged model's, plus
the baselines when `--compare` ran. A terminal table, `report.md` and a PNG plot.

Input is the results dict the runner collects (`results.collect_results`):
    {"run": str, "total_steps": int, "teachers": [str], "start": {"eval": E} | None,
     "rounds": [{"round": r, "branches": {teacher: {"loss": float, "eval": E}}, "merged": {"eval": E}}],
     "selected": {"round": int, "checkpoint": str, "evalScore": float, "reason": str} | None,
     "baselines": {key: {"kind": "STD"|"MTD", "budget": "steps"|"compute", "steps": int, "loss": float,
                         "eval": E}}}
where E is the trainer's eval JSON (accuracy, heldout_loss, ...) or None, total_steps is one MoT
branch's SFT steps over all rounds (rounds × steps), and "selected" is the run status's pick of
`spec.evaluation.selectBest` (round 0 is the student), absent or None without it.

Baselines (`mot run --compare [steps|compute|both]`, baselines.py), by budget:
- equal steps, "budget": "steps", keys "std-<teacher>" and "MTD": rounds × steps SFT steps, as many
  as one MoT branch over all rounds: the paper's accounting (MoT itself spends K times that, K
  teachers). Entries without "budget" (results.json from before budgets) are equal steps.
- equal compute, "budget": "compute", keys "std-<teacher> (compute)" and "MTD (compute)":
  K × rounds × steps, as many as all of MoT's branches together.

The "MoT vs baselines" table (comparison_rows): "MoT (final merged)" (the last round's merged model),
"MoT (selectBest: round N)" when selectBest chose the final model, then per budget that ran
"best STD (std-<teacher>), equal steps|equal compute" (best_std: the best within that budget) and
"MTD, equal steps|equal compute".
"""

from __future__ import annotations

import os
from pathlib import Path


def _fmt(value, pattern: str = "{:.3f}") -> str:
    return "-" if value is None else pattern.format(value)


def _pct(ev: dict | None) -> str:
    return _fmt(ev.get("accuracy") if ev else None, "{:.1%}")


def _hl(ev: dict | None) -> str:
    return _fmt(ev.get("heldout_loss") if ev else None)


BUDGETS = ("steps", "compute")
BUDGET_NAMES = {"steps": "equal steps", "compute": "equal compute"}
COMPUTE_SUFFIX = " (compute)"  # of an equal-compute baseline's key


def budget_of(baseline: dict) -> str:
    return baseline.get("budget") or "steps"


def budgets(results: dict) -> list[str]:
    """The budgets whose baselines ran, equal steps first."""
    found = {budget_of(v) for v in (results.get("baselines") or {}).values()}
    return [b for b in BUDGETS if b in found]


def teacher_count(results: dict) -> int | None:
    names = results.get("teachers") or {t for r in results.get("rounds") or [] for t in r.get("branches") or {}}
    return len(names) or None


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def rounds_table(results: dict) -> str:
    header = ["round", "model", "train loss", "eval exact match", "held-out loss"]
    picked = (results.get("selected") or {}).get("round")
    mark = lambda rnd, text: f"{text} ✓ selected" if rnd == picked else text  # noqa: E731
    rows = []
    if results.get("start"):
        rows.append(["0", mark(0, "start (student)"), "-", _pct(results["start"]["eval"]),
                     _hl(results["start"]["eval"])])
    for rnd in results["rounds"]:
        for teacher, b in sorted(rnd["branches"].items()):
            rows.append([str(rnd["round"]), f"branch {teacher}", _fmt(b.get("loss")), _pct(b.get("eval")),
                         _hl(b.get("eval"))])
        merged = rnd.get("merged") or {}
        rows.append([str(rnd["round"]), mark(rnd["round"], "**merged**"), "-", _pct(merged.get("eval")),
                     _hl(merged.get("eval"))])
    return markdown_table(header, rows)


def selected_line(results: dict) -> str | None:
    """"Final model: ..." when spec.evaluation.selectBest chose the final model, else None."""
    sel = results.get("selected")
    if not sel:
        return None
    rnd = sel.get("round")
    what = "the student (round 0)" if rnd == 0 else f"round {rnd}'s merged model"
    return f"Final model: {what}" + (f" ({sel['reason']})" if sel.get("reason") else "")


def final_merged_eval(results: dict) -> dict | None:
    done = [r for r in results["rounds"] if (r.get("merged") or {}).get("eval")]
    return done[-1]["merged"]["eval"] if done else None


def selected_eval(results: dict) -> dict | None:
    """The eval of the model selectBest chose (the student's for round 0, else that round's merged
    model's); None without a selection or without that eval."""
    sel = results.get("selected")
    if not sel:
        return None
    if sel.get("round") == 0:
        return (results.get("start") or {}).get("eval")
    rnd = next((r for r in results["rounds"] if r["round"] == sel.get("round")), None)
    return ((rnd or {}).get("merged") or {}).get("eval")


def best_std(results: dict, budget: str = "steps") -> tuple[str, dict] | None:
    """The best single-teacher baseline of `budget`, chosen by exact match on the eval set (then
    held-out loss): (its key, its entry)."""
    stds = [(k, v) for k, v in results.get("baselines", {}).items()
            if v["kind"] == "STD" and v.get("eval") and budget_of(v) == budget]
    if not stds:
        return None
    return max(stds, key=lambda kv: (kv[1]["eval"]["accuracy"], -kv[1]["eval"].get("heldout_loss", 0.0)))


def baseline_rows(results: dict) -> list[tuple[str, int | None, dict | None, str]]:
    """(method, SFT steps, eval, budget) for the best STD and the MTD of each budget that ran."""
    rows = []
    for budget in budgets(results):
        name = BUDGET_NAMES[budget]
        best = best_std(results, budget)
        if best:
            rows.append((f"best STD ({best[0].removesuffix(COMPUTE_SUFFIX)}), {name}", best[1]["steps"],
                         best[1]["eval"], budget))
        for v in results.get("baselines", {}).values():
            if v["kind"] == "MTD" and budget_of(v) == budget:
                rows.append((f"MTD, {name}", v["steps"], v.get("eval"), budget))
    return rows


def comparison_rows(results: dict) -> list[tuple[str, int | None, dict | None]]:
    """(method, SFT steps, eval) for MoT (its steps: per branch), the model selectBest chose when it
    did, and the best STD and MTD of each budget that ran."""
    total = results.get("total_steps")
    rows: list[tuple[str, int | None, dict | None]] = [("MoT (final merged)", total, final_merged_eval(results))]
    if sel := results.get("selected"):
        rows.append((f"MoT (selectBest: round {sel.get('round')})", total, selected_eval(results)))
    return rows + [(m, s, e) for m, s, e, _ in baseline_rows(results)]


def comparison_table(results: dict) -> str:
    k = teacher_count(results)

    def steps(method: str, n: int | None) -> str:
        if method.startswith("MoT") and n is not None and k:
            return f"{n} per branch ({n * k} in all)"
        return _fmt(n, "{}")

    rows = [[m, steps(m, s), _pct(e), _hl(e)] for m, s, e in comparison_rows(results)]
    return markdown_table(["method", "SFT steps", "eval exact match", "held-out loss"], rows)


def baselines_table(results: dict) -> str:
    items = sorted(results.get("baselines", {}).items(), key=lambda kv: (BUDGETS.index(budget_of(kv[1])), kv[0]))
    rows = [[label, v["kind"], BUDGET_NAMES[budget_of(v)], str(v["steps"]), _fmt(v.get("loss")), _pct(v.get("eval")),
             _hl(v.get("eval"))] for label, v in items]
    return markdown_table(["baseline", "kind", "budget", "SFT steps", "train loss", "eval exact match",
                           "held-out loss"], rows)


def budget_notes(results: dict) -> list[str]:
    """What each budget that ran means, with this run's numbers."""
    n, k = results.get("total_steps"), teacher_count(results)
    k_text = str(k) if k else "K"
    all_steps = (_fmt(n * k, "{}") if k else f"K × {n}") if n is not None else "-"
    notes = {
        "steps": f"equal steps: {_fmt(n, '{}')} SFT steps per baseline (rounds × steps per branch), as many as "
                 f"one MoT branch over all rounds: the paper's accounting. MoT spends {k_text}× that "
                 f"({all_steps} steps over its {k_text} branches).",
        "compute": f"equal compute: {all_steps} SFT steps per baseline ({k_text} teachers × rounds × steps per "
                   "branch), as many as all of MoT's branches together.",
    }
    return [notes[b] for b in budgets(results)]


def render_text(results: dict) -> str:
    parts = [f"MoT run {results['run']}: per round", rounds_table(results)]
    if line := selected_line(results):
        parts.append(line)
    if results.get("baselines"):
        parts += ["", "Baselines", *(f"- {note}" for note in budget_notes(results)), baselines_table(results),
                  "", "MoT vs baselines", comparison_table(results)]
    return "\n".join(parts)


def write_report(results: dict, out_dir: Path) -> tuple[Path, Path]:
    """Writes report.md and report.png (atomically: a reader never sees half a file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = [f"# MoT run `{results['run']}`", "",
          "Train loss: the branch's last logged SFT loss. Eval: exact match of the final answer on the "
          "held-out problems, and the loss on their reference responses.", "",
          "## Per round", "", rounds_table(results), ""]
    if line := selected_line(results):
        md += [line, ""]
    if results.get("preflight"):
        from mot_trainer.preflight import table

        md += ["## Preflight", "", "```", table(results["preflight"]), "```", ""]
    if results.get("baselines"):
        md += ["## MoT vs baselines", "", "Baselines by SFT-step budget:", "",
               *(f"- {note}" for note in budget_notes(results)), "",
               comparison_table(results), "", "### All baselines", "", baselines_table(results), ""]
    md += ["![eval score and loss by round](report.png)", ""]
    report_md = out_dir / "report.md"
    _atomic_write_text(report_md, "\n".join(md))
    plot = out_dir / "report.png"
    plot_results(results, plot)
    return report_md, plot


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot_results(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    teachers = sorted({t for r in results["rounds"] for t in r["branches"]})
    start = results.get("start") or {}
    for teacher in teachers:
        pts = [(r["round"], r["branches"][teacher]) for r in results["rounds"] if teacher in r["branches"]]
        _line(ax_acc, [(x, (b.get("eval") or {}).get("accuracy")) for x, b in pts], f"branch {teacher}", "o", "-")
        (color,) = _line(ax_loss, [(x, (b.get("eval") or {}).get("heldout_loss")) for x, b in pts],
                         f"branch {teacher} (held-out)", "o", "-") or (None,)
        _line(ax_loss, [(x, b.get("loss")) for x, b in pts], f"branch {teacher} (train)", ".", ":",
              **({"color": color.get_color()} if color else {}))
    merged = [(r["round"], (r.get("merged") or {}).get("eval") or {}) for r in results["rounds"]]
    first = [(0, start["eval"])] if start.get("eval") else []
    _line(ax_acc, [(x, e.get("accuracy")) for x, e in first + merged], "merged (MoT)", "s", "-", lw=2.5, color="k")
    _line(ax_loss, [(x, e.get("heldout_loss")) for x, e in first + merged], "merged (held-out)", "s", "-",
          lw=2.5, color="k")
    last = max((r["round"] for r in results["rounds"]), default=1)
    for label, _steps, ev, budget in baseline_rows(results):
        if ev:
            style = {"ls": "--" if budget == "steps" else ":",
                     "color": "tab:purple" if label.startswith("MTD") else "tab:red"}
            ax_acc.axhline(ev["accuracy"], label=f"{label}", **style)
            ax_loss.axhline(ev["heldout_loss"], label=f"{label} (held-out)", **style)
    sel, picked = results.get("selected"), selected_eval(results)
    if sel and picked and picked.get("accuracy") is not None:
        ax_acc.plot([sel.get("round")], [picked["accuracy"]], marker="*", ms=16, ls="", color="gold",
                    markeredgecolor="k", label=f"selected (round {sel.get('round')})")
    ax_acc.set(title="eval exact match by round", xlabel="round", ylabel="exact match", ylim=(-0.02, 1.02))
    ax_loss.set(title="loss by round", xlabel="round", ylabel="loss")
    for ax in (ax_acc, ax_loss):
        ax.set_xticks(range(0 if first else 1, last + 1))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # (an empty legend is a matplotlib warning)
            ax.legend(fontsize=7)
    fig.suptitle(f"MoT run {results['run']}")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _line(ax, points, label, marker, ls, **kw):
    pts = [(x, y) for x, y in points if y is not None]
    if pts:
        return ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ls=ls, label=label, **kw)

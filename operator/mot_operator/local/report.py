"""The end-of-run report: per round, each branch's loss and eval score and the merged model's, plus
the baselines when `--compare` ran. A terminal table, `report.md` and a PNG plot.

Input is the results dict the runner collects (`results.collect_results`):
    {"run": str, "total_steps": int, "start": {"eval": E} | None,
     "rounds": [{"round": r, "branches": {teacher: {"loss": float, "eval": E}}, "merged": {"eval": E}}],
     "baselines": {label: {"kind": "STD"|"MTD", "steps": int, "loss": float, "eval": E}}}
where E is the trainer's eval JSON (accuracy, heldout_loss, ...) or None.
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


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def rounds_table(results: dict) -> str:
    header = ["round", "model", "train loss", "eval exact match", "held-out loss"]
    rows = []
    if results.get("start"):
        rows.append(["0", "start (student)", "-", _pct(results["start"]["eval"]), _hl(results["start"]["eval"])])
    for rnd in results["rounds"]:
        for teacher, b in sorted(rnd["branches"].items()):
            rows.append([str(rnd["round"]), f"branch {teacher}", _fmt(b.get("loss")), _pct(b.get("eval")),
                         _hl(b.get("eval"))])
        merged = rnd.get("merged") or {}
        rows.append([str(rnd["round"]), "**merged**", "-", _pct(merged.get("eval")), _hl(merged.get("eval"))])
    return markdown_table(header, rows)


def final_merged_eval(results: dict) -> dict | None:
    done = [r for r in results["rounds"] if (r.get("merged") or {}).get("eval")]
    return done[-1]["merged"]["eval"] if done else None


def best_std(results: dict) -> tuple[str, dict] | None:
    """The best single-teacher baseline, chosen by exact match on the eval set (then held-out loss)."""
    stds = [(k, v) for k, v in results.get("baselines", {}).items() if v["kind"] == "STD" and v.get("eval")]
    if not stds:
        return None
    return max(stds, key=lambda kv: (kv[1]["eval"]["accuracy"], -kv[1]["eval"].get("heldout_loss", 0.0)))


def comparison_rows(results: dict) -> list[tuple[str, int | None, dict | None]]:
    """(method, total SFT steps, eval) for MoT, best STD and MTD."""
    rows: list[tuple[str, int | None, dict | None]] = [("MoT (final merged)", results.get("total_steps"),
                                                        final_merged_eval(results))]
    best = best_std(results)
    if best:
        rows.append((f"best STD ({best[0]})", best[1]["steps"], best[1]["eval"]))
    for label, v in results.get("baselines", {}).items():
        if v["kind"] == "MTD":
            rows.append((label, v["steps"], v.get("eval")))
    return rows


def comparison_table(results: dict) -> str:
    rows = [[m, _fmt(s, "{}"), _pct(e), _hl(e)] for m, s, e in comparison_rows(results)]
    return markdown_table(["method", "SFT steps", "eval exact match", "held-out loss"], rows)


def baselines_table(results: dict) -> str:
    rows = [[label, v["kind"], str(v["steps"]), _fmt(v.get("loss")), _pct(v.get("eval")), _hl(v.get("eval"))]
            for label, v in sorted(results.get("baselines", {}).items())]
    return markdown_table(["baseline", "kind", "SFT steps", "train loss", "eval exact match", "held-out loss"], rows)


def render_text(results: dict) -> str:
    parts = [f"MoT run {results['run']}: per round", rounds_table(results)]
    if results.get("baselines"):
        parts += ["", "Baselines (same SFT steps as one MoT branch over all rounds)", baselines_table(results),
                  "", "MoT vs baselines", comparison_table(results)]
    return "\n".join(parts)


def write_report(results: dict, out_dir: Path) -> tuple[Path, Path]:
    """Writes report.md and report.png (atomically: a reader never sees half a file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = [f"# MoT run `{results['run']}`", "",
          "Train loss: the branch's last logged SFT loss. Eval: exact match of the final answer on the "
          "held-out problems, and the loss on their reference responses.", "",
          "## Per round", "", rounds_table(results), ""]
    if results.get("preflight"):
        from mot_trainer.preflight import table

        md += ["## Preflight", "", "```", table(results["preflight"]), "```", ""]
    if results.get("baselines"):
        md += ["## MoT vs baselines", "",
               f"Each baseline trains {results.get('total_steps')} SFT steps, as many as one MoT branch over "
               "all rounds (the paper's comparison; MoT spends that many steps per teacher).", "",
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
    for (label, _steps, ev), color in zip(comparison_rows(results)[1:], ("tab:red", "tab:purple"), strict=False):
        if ev:
            ax_acc.axhline(ev["accuracy"], ls="--", color=color, label=f"{label}")
            ax_loss.axhline(ev["heldout_loss"], ls="--", color=color, label=f"{label} (held-out)")
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

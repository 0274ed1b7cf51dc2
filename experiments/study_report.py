"""The tolerance study's outputs: the CSV, the Markdown tables and ``tolerance_study.png``."""

from __future__ import annotations

import csv
import io
from pathlib import Path

COLUMNS = (
    "strategy", "budget", "rule", "family", "seeds", "rounds_mean", "rounds_sd", "saved",
    "val_mean", "test_mean", "regret", "regret_lo", "regret_hi", "early_rate",
    "vs_patience", "vs_patience_lo", "vs_patience_hi", "vs_budget", "vs_budget_lo",
    "vs_budget_hi", "rounds_vs_patent", "vs_patent", "vs_patent_lo", "vs_patent_hi",
)  # fmt: skip


def write_csv(rows: list[dict], path: Path) -> None:
    """One row per (strategy, budget, rule); floats with 6 significant digits."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    path.write_text(out.getvalue())


def _pct(x: float) -> str:
    return f"{100 * x:+.2f}"


def _interval(row: dict, key: str) -> str:
    return f"{_pct(row[key])} [{_pct(row[key + '_lo'])}, {_pct(row[key + '_hi'])}]"


def markdown(rows: list[dict], names=None) -> str:
    """Tables per strategy and budget; regrets and differences in accuracy points (x 100).

    Args:
      rows: the study rows.
      names: only these rules, in this order (default: all).
    """
    lines = []
    cells = dict.fromkeys((r["strategy"], r["budget"]) for r in rows)
    for strategy, budget in cells:
        these = [r for r in rows if (r["strategy"], r["budget"]) == (strategy, budget)]
        if names is not None:
            these = [r for n in names for r in these if r["rule"] == n]
        lines += [
            f"**{strategy}, R = {budget}** ({these[0]['seeds']} seeds)",
            "",
            "| rule | rounds (sd) | saved | val acc | test acc | test regret [95%] | early "
            "| vs patience at same rounds [95%] | vs fixed budgets [95%] |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in these:
            lines.append(
                f"| {r['rule']} | {r['rounds_mean']:.1f} ({r['rounds_sd']:.1f}) "
                f"| {100 * r['saved']:.0f}% | {r['val_mean']:.4f} | {r['test_mean']:.4f} "
                f"| {_interval(r, 'regret')} | {100 * r['early_rate']:.0f}% "
                f"| {_interval(r, 'vs_patience')} | {_interval(r, 'vs_budget')} |"
            )
        lines.append("")
    return "\n".join(lines)


def compact(rows: list[dict], names) -> str:
    """One table for all cells: ``rounds / test regret`` (accuracy points) per rule and cell."""
    cells = list(dict.fromkeys((r["strategy"], r["budget"]) for r in rows))
    lines = ["| rule | " + " | ".join(f"{s}, R = {b}" for s, b in cells) + " |",
             "|---|" + "---|" * len(cells)]  # fmt: skip
    for name in names:
        found = {(r["strategy"], r["budget"]): r for r in rows if r["rule"] == name}
        if not found:
            continue
        entries = [f"{found[c]['rounds_mean']:.1f} / {_pct(found[c]['regret'])}" for c in cells]
        lines.append(f"| {name} | " + " | ".join(entries) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Rounds used against test regret, one panel per strategy and budget."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = list(dict.fromkeys((r["strategy"], r["budget"]) for r in rows))
    fig = Figure(figsize=(5.2 * len(cells) / 2, 8.4), layout="constrained")
    axes = fig.subplots(2, max(1, len(cells) // 2), squeeze=False).T.ravel()
    styles = {"patent": ("o", "tab:red"), "optuna": ("s", "tab:purple"),
              "ax": ("D", "tab:brown"), "gain": ("*", "tab:green"), "oracle": ("x", "black"),
              "full": ("P", "gray"), "gain, earlier default": ("*", "yellowgreen")}  # fmt: skip
    for ax, (strategy, budget) in zip(axes, cells, strict=False):
        these = [r for r in rows if (r["strategy"], r["budget"]) == (strategy, budget)]
        full = next(r for r in these if r["family"] == "full")
        for family, color, label in (("patience", "tab:blue", "fixed patience"),
                                     ("budget", "tab:orange", "fixed budget N")):  # fmt: skip
            pts = sorted([r for r in these if r["family"] == family] + [full],
                         key=lambda r: r["rounds_mean"])  # fmt: skip
            ax.plot([r["rounds_mean"] for r in pts], [100 * r["regret"] for r in pts],
                    "-", marker=".", color=color, label=label)  # fmt: skip
        for r in these:
            if r["family"] not in styles:
                continue
            marker, color = styles[r["family"]]
            err = [[100 * (r["regret"] - r["regret_lo"])],
                   [100 * (r["regret_hi"] - r["regret"])]]  # fmt: skip
            ax.errorbar(r["rounds_mean"], 100 * r["regret"], yerr=err, fmt=marker,
                        color=color, ms=11 if marker == "*" else 6, capsize=3,
                        label=r["family"])  # fmt: skip
        ax.axhline(0, color="gray", lw=0.6)
        ax.set_title(f"{strategy}, R = {budget}")
        ax.set_xlabel("rounds used (mean over seeds)")
        ax.set_ylabel("test regret vs full budget (accuracy points)")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
    FigureCanvasAgg(fig).print_png(str(path))


def verdict(rows: list[dict], rule: str = "gain", against: str = "patent 0.8 ext") -> str:
    """One line per cell: ``rule`` against the patent's defaults and the two frontiers."""
    lines = [
        f"| cell | {rule} rounds | {against} rounds | regret {rule} - patent [95%] "
        "| vs patience frontier [95%] | vs fixed budgets [95%] |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["rule"] != rule:
            continue
        patent = next(p for p in rows if p["rule"] == against and
                      (p["strategy"], p["budget"]) == (r["strategy"], r["budget"]))  # fmt: skip
        lines.append(
            f"| {r['strategy']}, R = {r['budget']} | {r['rounds_mean']:.1f} "
            f"| {patent['rounds_mean']:.1f} | {_interval(r, 'vs_patent')} "
            f"| {_interval(r, 'vs_patience')} | {_interval(r, 'vs_budget')} |"
        )
    return "\n".join(lines) + "\n"

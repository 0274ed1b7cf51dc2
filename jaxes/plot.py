"""The rounds plot, ``rounds.png``: the metric per round, the running best, the streak and the stop.

No JAX here and no TensorFlow. matplotlib draws through the Agg canvas directly (no pyplot, so no
global backend or figure registry is touched) and is imported inside ``plot_rounds``, so code that
never plots never pays for it. Round indices are 0-based, as in ``rounds.jsonl``.
"""

from __future__ import annotations

import io
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

from jaxes.files import atomic_write_bytes

# _finite and _fmt also live in jaxes.progress: the two modules sit side by side and neither
# imports the other, so a few lines are repeated rather than a helper module made for them.


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any, spec: str = ".4f") -> str:
    return format(value, spec) if _finite(value) else "-"


def plot_rounds(
    records: Sequence[dict],
    path: str | os.PathLike,
    *,
    metric_name: str,
    mode: str,
    stop_reason: str | None = None,
    figsize: tuple[float, float] = (9.0, 6.0),
    dpi: int = 100,
) -> None:
    """Draws ``rounds.png``: the metric per round, the running best, the streak and the stop.

    Top panel: each round's metric, failed rounds as red crosses on the worse edge of the axis, the
    running best as a step line, the best round starred. Bottom panel: the streak against the
    tolerance (patience). Both panels: the budget (dotted, with every extension) and the stop
    (red line, its reason in the legend). The file is replaced atomically.

    Args:
      records: the round records, in round order (the lines of ``rounds.jsonl``).
      path: the PNG file to write.
      metric_name: the monitored metric's name, for the axis label and title.
      mode: ``"max"`` or ``"min"``, the direction in which the metric improves.
      stop_reason: why the run ended, when it did; needed for the reasons no round record
        carries (``search_exhausted``: the search ran out before a round could start).
      figsize: the figure size in inches.
      dpi: dots per inch; the image is ``figsize * dpi`` pixels.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}; pass the run's mode.")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax_metric, ax_streak = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    axes = (ax_metric, ax_streak)
    indices = [r.get("round_index", i) for i, r in enumerate(records)]
    rows = list(zip(indices, records, strict=True))
    ok = [(i, r["metric"]) for i, r in rows if _is_ok(r)]
    failed = [i for i, r in rows if not _is_ok(r)]
    if ok:
        ax_metric.plot(*zip(*ok, strict=True), "o", color="tab:blue", label=metric_name)
    if failed:
        # x in data units, y in axes units: the marks sit on the worse edge whatever the limits.
        edge = 0.03 if mode == "max" else 0.97
        transform = ax_metric.get_xaxis_transform()
        ax_metric.plot(failed, [edge] * len(failed), "x", color="red", ms=9, mew=2,
                       transform=transform, clip_on=False, label="failed")  # fmt: skip
    best = [r.get("best") if _finite(r.get("best")) else math.nan for r in records]
    if any(_finite(b) for b in best):
        ax_metric.plot(
            indices, best, drawstyle="steps-post", color="tab:green", label="best so far"
        )
    final = records[-1] if records else {}
    if _finite(final.get("best")) and final.get("best_round") is not None:
        ax_metric.plot([final["best_round"]], [final["best"]], "*", color="tab:green", ms=16,
                       label=f"best: round {final['best_round']}")  # fmt: skip
    ax_streak.bar(indices, [r.get("streak") or 0 for r in records], color="tab:orange",
                  label="streak")  # fmt: skip
    ax_streak.plot(indices, [r.get("patience", math.nan) for r in records], "--", color="black",
                   drawstyle="steps-mid", label="tolerance (patience)")  # fmt: skip
    budgets = [(i, r["rounds_budget"]) for i, r in rows if isinstance(r.get("rounds_budget"), int)]
    grown = [
        (i, b) for (i, b), (_, before) in zip(budgets[1:], budgets, strict=False) if b > before
    ]
    if budgets:
        _vlines(axes, budgets[0][1] - 0.5, f"budget {budgets[0][1]}", color="gray", ls=":")
    if grown:
        _vlines(axes, grown[-1][1] - 0.5, f"budget extended to {grown[-1][1]}", color="gray",
                ls="-.")  # fmt: skip
        ax_streak.plot([i for i, _ in grown], [0] * len(grown), "^", color="gray", ms=7,
                       clip_on=False, label="budget extended")  # fmt: skip
    stop = stop_marker(records, stop_reason)
    reason = stop[1] if stop else None
    if stop:
        _vlines(axes, stop[0], f"stop: {reason}", color="red", alpha=0.6)
    ax_metric.set_xlim(-0.6, max([*indices, *(b for _, b in budgets)], default=1) - 0.4)
    ax_metric.set_ylabel(f"{metric_name} ({'higher' if mode == 'max' else 'lower'} is better)")
    ax_streak.set_ylabel("rounds")
    ax_streak.set_xlabel("round index")
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.yaxis.get_major_locator().set_params(integer=ax is ax_streak)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    if not records:
        ax_metric.text(0.5, 0.5, "no rounds yet", transform=ax_metric.transAxes, ha="center")
    fig.suptitle(
        f"{len(records)} round{'' if len(records) == 1 else 's'}, best {metric_name} "
        f"{_fmt(final.get('best'))} at round {final.get('best_round', '-')}, "
        f"patience {final.get('patience', '-')}, "
        f"budget {final.get('rounds_budget', '-')}, stop: {reason or '-'}"
    )
    _save_atomically(fig, os.fspath(path))


def stop_marker(records: Sequence[dict], stop_reason: str | None = None):
    """Where the plot draws the stop and its reason: ``(x, reason)``, or None while running.

    A round that stopped the run carries its reason; a run that stopped between rounds
    (``search_exhausted``: no architecture was left to propose) is marked just after its last
    round, with ``stop_reason``.
    """
    for index, record in reversed(list(enumerate(records))):
        if record.get("stopped"):
            return record.get("round_index", index), record.get("reason")
    if stop_reason is None:
        return None
    last = records[-1].get("round_index", len(records) - 1) if records else -1
    return last + 0.5, stop_reason


def _is_ok(record: Mapping) -> bool:
    return record.get("status", "ok") == "ok" and _finite(record.get("metric"))


def _vlines(axes: Sequence[Any], x: float, label: str, **style: Any) -> None:
    """A vertical line through every panel, in the legend of the first only."""
    for number, ax in enumerate(axes):
        ax.axvline(x, label=label if number == 0 else None, **style)


def _save_atomically(fig: Any, path: str) -> None:
    # A reader (or a killed run) must never see half a PNG: the one atomic writer of jaxes.
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())

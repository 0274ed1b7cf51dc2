"""Reporting for a rounds run: the rounds plot, TensorBoard scalars, live progress, a summary table.

No JAX here and no TensorFlow: matplotlib draws through the Agg canvas directly (no pyplot, so no
global backend or figure registry is touched) and tensorboardX writes the event files. Both are
imported where they are used, so a non-primary process or the progress line never pays for them.

Round indices are shown 0-based everywhere, exactly as in ``rounds.jsonl`` and ``summary.json``;
where a count helps, it is shown as ``[k/budget]``.
"""

from __future__ import annotations

import math
import numbers
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

_ROUND_TAGS = {  # record key -> TensorBoard tag
    "metric": "round/metric",
    "best": "round/best",
    "streak": "round/streak",
    "patience": "round/patience",
    "rounds_budget": "round/rounds_budget",
    "val_loss": "round/val_loss",
    "val_accuracy": "round/val_accuracy",
    "train_loss": "round/train_loss",
    "dropout_rate": "round/dropout_rate",
    "epochs": "round/epochs",
    "wall_seconds": "round/wall_seconds",
}
_ARCH_ABBREVIATIONS = {"depth": "d", "width": "w", "embed_dim": "e"}


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any, spec: str = ".4f") -> str:
    return format(value, spec) if _finite(value) else "-"


def _duration(seconds: float) -> str:
    """Formats seconds as m:ss, or h:mm:ss from an hour on."""
    minutes, secs = divmod(max(0, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def plot_rounds(
    records: Sequence[dict],
    path: str | os.PathLike,
    *,
    metric_name: str,
    mode: str,
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
    stops = [(i, r.get("reason")) for i, r in rows if r.get("stopped")]
    if stops:
        _vlines(axes, stops[-1][0], f"stop: {stops[-1][1]}", color="red", alpha=0.6)
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
        f"{len(records)} rounds, best {metric_name} {_fmt(final.get('best'))} at round "
        f"{final.get('best_round', '-')}, patience {final.get('patience', '-')}, "
        f"budget {final.get('rounds_budget', '-')}, stop: {final.get('reason') or '-'}"
    )
    _save_atomically(fig, os.fspath(path))


def _is_ok(record: Mapping) -> bool:
    return record.get("status", "ok") == "ok" and _finite(record.get("metric"))


def _vlines(axes: Sequence[Any], x: float, label: str, **style: Any) -> None:
    """A vertical line through every panel, in the legend of the first only."""
    for number, ax in enumerate(axes):
        ax.axvline(x, label=label if number == 0 else None, **style)


def _save_atomically(fig: Any, path: str) -> None:
    # A reader (or a killed run) must never see half a PNG: write beside it, then rename.
    handle, tmp_path = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".png.tmp")
    try:
        with os.fdopen(handle, "wb") as tmp_file:
            fig.savefig(tmp_file, format="png")
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise


class ScalarWriter:
    """TensorBoard scalars through tensorboardX (no TensorFlow); a no-op when disabled.

    Use it as a context manager. Only the primary process should pass ``enabled=True``.
    """

    def __init__(
        self, logdir: str | os.PathLike, *, enabled: bool = True, purge_step: int | None = None
    ):
        """Opens the writer.

        Args:
          logdir: the directory for the event files.
          enabled: False makes every method a no-op and creates no file (non-primary processes).
          purge_step: on resume, the first step to be written again; TensorBoard hides events of
            earlier runs at or after it.
        """
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(os.fspath(logdir), purge_step=purge_step)

    def write_round(self, record: Mapping[str, Any]) -> None:
        """Writes one round record's scalars at ``step = record["round_index"]``, skipping None.

        Args:
          record: a round record, as appended to ``rounds.jsonl``.
        """
        scalars = {tag: record.get(key) for key, tag in _ROUND_TAGS.items()}
        self.write_scalars(record["round_index"], scalars)
        if self._writer is not None:
            self._writer.flush()  # rounds are rare and runs get killed: keep each on disk.

    def write_scalars(self, step: int, scalars: Mapping[str, float | None]) -> None:
        """Writes scalars at one step; None values are skipped.

        Args:
          step: the global step (for rounds, the round index).
          scalars: tag -> real number or None.
        """
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"step must be an int, got {step!r}; pass the round or epoch index.")
        for tag, value in scalars.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"scalar {tag!r} must be a real number or None, got {value!r}.")
            if self._writer is not None:
                self._writer.add_scalar(tag, float(value), int(step))

    def flush(self) -> None:
        """Flushes pending events to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the event file; safe to call twice."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> ScalarWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Progress:
    """Progress of a rounds run: a live status line on a terminal, plain log lines otherwise.

    Live: one line redrawn in place, ``round 3 [4/10] · best 0.9712 (r1) · streak 1/5 · epoch 23 ·
    ETA 0:41``, plus a log line per finished round. Plain: only the log line per finished round,
    ``round 3 [4/10]: metric 0.9650 (best 0.9712 at round 1), streak 1/5, 37 epochs, 2.3s``.
    """

    def __init__(
        self,
        *,
        stream: TextIO | None = None,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        enabled: bool = True,
        min_interval: float = 0.1,
        width: int | None = None,
    ):
        """Creates the reporter.

        Args:
          stream: where to write; default ``sys.stderr``.
          live: redraw one status line; default: whether ``stream`` is a terminal.
          clock: seconds, monotonic; injected so tests never sleep.
          enabled: False makes every method a no-op (non-primary processes).
          min_interval: the least time between two per-epoch redraws, in clock seconds.
          width: the live line's maximum width; default: the terminal's width at each redraw.
        """
        self._stream = sys.stderr if stream is None else stream
        isatty = getattr(self._stream, "isatty", None)
        self._live = bool(isatty and isatty()) if live is None else live
        self._clock, self._enabled, self._min_interval = clock, enabled, min_interval
        self._width = width
        self._round_seconds: list[float] = []
        self._round_index, self._budget, self._round_start = 0, 0, 0.0
        self._epoch: int | None = None
        self._val_loss: float | None = None
        self._best = self._best_round = self._patience = None
        self._streak = 0
        self._last_draw: float | None = None
        self._line_open = False

    def resume(self, records: Sequence[dict]) -> None:
        """Takes in the records of rounds finished before a resume, printing nothing."""
        for record in records:
            self._absorb(record, record.get("wall_seconds"))

    def start_round(self, round_index: int, budget: int) -> None:
        """Marks the start of a round; ``budget`` is the current round budget."""
        self._round_index, self._budget = round_index, budget
        self._epoch = self._val_loss = None
        self._round_start = self._clock()
        self._draw()

    def epoch(self, epoch: int, val_loss: float | None = None) -> None:
        """Notes a finished epoch; cheap, and redraws at most once per ``min_interval``."""
        self._epoch, self._val_loss = epoch, val_loss
        if self._live and self._enabled:
            now = self._clock()
            if self._last_draw is None or now - self._last_draw >= self._min_interval:
                self._draw(now)

    def end_round(self, record: Mapping[str, Any]) -> None:
        """Reports a finished round from its record (one log line)."""
        self._absorb(record, self._clock() - self._round_start)
        if not self._enabled:
            return
        # Live: the log line replaces the status line; the next start_round draws a new one.
        self._write(("\r\x1b[K" if self._live else "") + self._round_line(record) + "\n")
        self._line_open = False

    def close(self) -> None:
        """Ends the live line so that what follows starts on a fresh line."""
        if self._enabled and self._line_open:
            self._write("\n")
        self._line_open = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _absorb(self, record: Mapping[str, Any], seconds: float | None) -> None:
        self._round_index = record.get("round_index", self._round_index)
        self._budget = record.get("rounds_budget", self._budget)
        self._best, self._best_round = record.get("best"), record.get("best_round")
        self._streak, self._patience = record.get("streak", 0), record.get("patience")
        if _finite(seconds):
            self._round_seconds.append(float(seconds))

    def _eta(self, now: float) -> str:
        if not self._round_seconds:
            return "?"
        mean = sum(self._round_seconds) / len(self._round_seconds)
        # The current round's remaining share, then every round after it up to the budget.
        current = max(0.0, mean - (now - self._round_start))
        return _duration(current + mean * max(0, self._budget - self._round_index - 1))

    def _status_line(self, now: float) -> str:
        best = f"{_fmt(self._best)} (r{self._best_round})" if _finite(self._best) else "-"
        parts = [
            f"round {self._round_index} [{self._round_index + 1}/{self._budget}]",
            f"best {best}",
            f"streak {self._streak}/{self._patience if self._patience is not None else '?'}",
        ]
        if self._epoch is not None:
            loss = f" (val_loss {self._val_loss:.4f})" if _finite(self._val_loss) else ""
            parts.append(f"epoch {self._epoch}{loss}")
        parts.append(f"ETA {self._eta(now)}")
        return " · ".join(parts)

    def _round_line(self, record: Mapping[str, Any]) -> str:
        index = record.get("round_index")
        if record.get("status", "ok") == "ok":
            outcome = f"metric {_fmt(record.get('metric'))}"
        else:
            outcome = f"FAILED ({record.get('message') or 'no message'})"
        best_at = f" at round {self._best_round}" if _finite(self._best) else ""
        line = (
            f"round {index} [{index + 1}/{self._budget}]: {outcome} "
            f"(best {_fmt(self._best)}{best_at}), "
            f"streak {self._streak}/{self._patience}, {record.get('epochs', '-')} epochs, "
            f"{_fmt(record.get('wall_seconds'), '.1f')}s"
        )
        if record.get("stopped"):
            line += f"; stopped: {record.get('reason')}"
        return line

    def _draw(self, now: float | None = None) -> None:
        if not (self._live and self._enabled):
            return
        now = self._clock() if now is None else now
        width = self._width or shutil.get_terminal_size(fallback=(100, 24)).columns
        # Never wider than the terminal, or '\r' would return to a wrapped line's second row.
        self._write("\r" + self._status_line(now)[: max(1, width - 1)] + "\x1b[K")
        self._last_draw, self._line_open = now, True

    def _write(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()


def summary_table(summary: Mapping[str, Any], records: Sequence[dict]) -> str:
    """Formats the end-of-run table: one row per round, then the run's key numbers.

    Args:
      summary: the contents of ``summary.json``.
      records: the round records.

    Returns:
      Plain text, at most 100 columns wide, ending without a newline.
    """
    best_round = summary.get("best_round")
    header = (
        f"{'round':>5}  {'arch':<28}  {'dropout':>7}  {'epochs':>6}  {'metric':>8}  best  status"
    )
    lines = [header, "-" * len(header)]
    for record in records:
        index = record.get("round_index")
        marker = "*" if index == best_round else ("+" if record.get("improved") else "")
        status = record.get("status", "ok")
        if status != "ok" and record.get("message"):
            status = f"{status}: {record['message']}"
        row = (
            f"{index!s:>5}  {_arch_short(record.get('arch')):<28.28}  "
            f"{_fmt(record.get('dropout_rate'), '.3f'):>7}  {record.get('epochs', '-')!s:>6}  "
            f"{_fmt(record.get('metric')):>8}  {marker:^4}  {status}"
        )
        lines.append(row if len(row) <= 100 else row[:97] + "...")
    lines.append("(* best instance, + new best when run)")
    budget = f"{summary.get('rounds_run', '-')} run, budget {summary.get('rounds_budget', '-')}"
    wall = summary.get("wall_seconds")
    items = [
        (
            "best round",
            f"{best_round} ({summary.get('metric', 'metric')} "
            f"{_fmt(summary.get('best_metric'))}, mode {summary.get('mode', '-')})",
        ),
        ("test metric", _fmt(summary.get("test_metric"))),
    ]
    if "knn_top1" in summary:
        items.append(("knn top-1", _fmt(summary["knn_top1"])))
    items += [
        ("rounds", budget),
        ("patience", f"{summary.get('patience', '-')} (r = {_fmt(summary.get('r'))})"),
        ("stop reason", str(summary.get("stop_reason") or "-")),
        ("best arch", _arch_short(summary.get("best_arch"))),
        ("wall time", f"{wall:.1f} s ({_duration(wall)})" if _finite(wall) else "-"),
    ]
    lines.append("")
    lines += [f"{name:<12} {value}"[:100] for name, value in items]
    return "\n".join(lines)


def _arch_short(arch: Any) -> str:
    """``{"backbone": "mlp", "depth": 2, "width": 128}`` -> ``mlp d2 w128``."""
    if not isinstance(arch, Mapping):
        return "-" if arch is None else str(arch)
    parts = [str(arch.get("backbone", "?"))]
    for key, value in arch.items():
        if key != "backbone":
            short = _ARCH_ABBREVIATIONS.get(key)
            parts.append(f"{short}{value}" if short else f"{key}={value}")
    return " ".join(parts)

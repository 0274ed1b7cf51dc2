"""Progress of a rounds run, as it goes and at its end: a live status line and a summary table.

No JAX here and no plotting: the progress line is cheap enough to redraw every epoch. Round
indices are shown 0-based everywhere, exactly as in ``rounds.jsonl`` and ``summary.json``; where
a count helps, it is shown as ``[k/budget]``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

_ARCH_ABBREVIATIONS = {
    "depth": "d", "width": "w", "embed_dim": "e", "learning_rate": "lr", "weight_decay": "wd",
}  # fmt: skip
# models.Arch's block fields at their defaults are left out of labels (this module stays stdlib
# only, so the values are repeated here; tests/test_blocks.py checks they match models.Arch).
ARCH_LABEL_DEFAULTS = {
    "kernel_size": 3, "downsample": "every", "norm": "none", "residual": False, "width_growth": 1.0,
}  # fmt: skip


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value: Any, spec: str = ".4f") -> str:
    return format(value, spec) if _finite(value) else "-"


def plural(count: int, word: str) -> str:
    """``1 round``, ``2 rounds``, ``0 epochs``."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _patience_text(patience: Any, r: Any) -> str:
    """``7 (r = -0.3260)`` for a drawn patience, ``5 (fixed patience)`` for a fixed one, and
    ``none (the gain rule)`` when a value-aware rule ends the rounds."""
    if patience is None:
        return "none (the gain rule decides from the metric values)"
    return f"{patience} ({'fixed patience' if r is None else f'r = {fmt(r)}'})"


def start_message(tol: Any, *, resumed: bool) -> str:
    """What a run does as it starts, from its tolerance state (a ``stopping.State``)."""
    patience = _patience_text(tol.patience, tol.r)
    if resumed and tol.stopped:
        return f"all rounds done (stop: {tol.reason}); finishing the run"
    if resumed:
        return f"resuming at round {tol.round} of {tol.rounds}, patience {patience}"
    return f"starting round 0 of {tol.rounds}, patience {patience}"


def finished_message(summary: Mapping[str, Any]) -> str:
    return f"run already finished (stop: {summary.get('stop_reason')}); nothing to do"


def space_warning(config: Any, strategy: Any) -> str | None:
    """A warning when ``config.rounds`` asks for more rounds than the search space holds."""
    if strategy.name == "fixed" or config.rounds <= strategy.size:
        return None
    space = plural(strategy.size, "architecture")
    if strategy.name in ("random", "tpe"):  # both never repeat a choice
        then = f"the run stops (search_exhausted) after at most {plural(strategy.size, 'round')}"
    else:
        then = "later rounds train architectures already tried, with new initializations"
    return f"warning: config.rounds={config.rounds} exceeds the {space} of the search space; {then}"


def _duration(seconds: float) -> str:
    """Formats seconds as m:ss, or h:mm:ss from an hour on."""
    minutes, secs = divmod(max(0, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


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

    def start_round(self, round_index: int, budget: int, patience: int | None = None) -> None:
        """Marks the start of a round; ``budget`` is the current round budget."""
        self._round_index, self._budget = round_index, budget
        if patience is not None:
            self._patience = patience
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

    @contextlib.contextmanager
    def ticking(self, interval: float = 1.0):
        """While the block runs (a device program, silent until it ends), redraw the live line
        every ``interval`` seconds so its elapsed time and ETA keep moving."""
        if not (self._live and self._enabled):
            yield
            return
        stop = threading.Event()

        def tick():
            while not stop.wait(interval):
                self._draw()

        thread = threading.Thread(target=tick, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

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
        best = f"{fmt(self._best)} (r{self._best_round})" if _finite(self._best) else "-"
        parts = [
            f"round {self._round_index} [{self._round_index + 1}/{self._budget}]",
            f"best {best}",
            f"streak {self._streak}/{self._patience if self._patience is not None else '?'}",
        ]
        if self._epoch is not None:
            loss = f" (val_loss {self._val_loss:.4f})" if _finite(self._val_loss) else ""
            parts.append(f"epoch {self._epoch}{loss}")
        parts.append(f"{_duration(now - self._round_start)} in")
        parts.append(f"ETA {self._eta(now)}")
        return " · ".join(parts)

    def _round_line(self, record: Mapping[str, Any]) -> str:
        index = record.get("round_index")
        if record.get("status", "ok") == "ok":
            outcome = f"metric {fmt(record.get('metric'))}"
        else:
            outcome = f"FAILED ({record.get('message') or 'no message'})"
        best_at = f" at round {self._best_round}" if _finite(self._best) else ""
        line = (
            f"round {index} [{index + 1}/{self._budget}]: {outcome} "
            f"(best {fmt(self._best)}{best_at}), "
            f"streak {self._streak}/{self._patience}, {_epochs(record.get('epochs'))}, "
            f"{fmt(record.get('wall_seconds'), '.1f')}s"
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
            f"{index!s:>5}  {arch_short(record.get('arch')):<28.28}  "
            f"{fmt(record.get('dropout_rate'), '.3f'):>7}  {record.get('epochs', '-')!s:>6}  "
            f"{fmt(record.get('metric')):>8}  {marker:^4}  {status}"
        )
        lines.append(row if len(row) <= 100 else row[:97] + "...")
    lines.append("(* best instance, + new best when run)")
    budget = f"{summary.get('rounds_run', '-')} run, budget {summary.get('rounds_budget', '-')}"
    wall = summary.get("wall_seconds")
    items = [
        (
            "best round",
            f"{best_round} ({summary.get('metric', 'metric')} "
            f"{fmt(summary.get('best_metric'))}, mode {summary.get('mode', '-')})",
        ),
        ("test metric", fmt(summary.get("test_metric"))),
    ]
    if "knn_top1" in summary:
        items.append(("knn top-1", fmt(summary["knn_top1"])))
    items += [
        ("rounds", budget),
        ("patience", _patience_text(summary.get("patience", "-"), summary.get("r"))),
        ("stop reason", str(summary.get("stop_reason") or "-")),
        ("best arch", arch_short(summary.get("best_arch"))),
        ("wall time", f"{wall:.1f} s ({_duration(wall)})" if _finite(wall) else "-"),
    ]
    lines.append("")
    lines += [f"{name:<12} {value}"[:100] for name, value in items]
    return "\n".join(lines)


def _epochs(epochs: Any) -> str:
    return plural(epochs, "epoch") if isinstance(epochs, int) else "- epochs"


def arch_short(arch: Any) -> str:
    """``{"backbone": "mlp", "depth": 2, "width": 128}`` -> ``mlp d2 w128``."""
    if not isinstance(arch, Mapping):
        return "-" if arch is None else str(arch)
    parts = [str(arch.get("backbone", "?"))]
    for key, value in arch.items():
        if key != "backbone" and not (
            key in ARCH_LABEL_DEFAULTS and value == ARCH_LABEL_DEFAULTS[key]
        ):
            short = _ARCH_ABBREVIATIONS.get(key)
            if isinstance(value, float):  # a searched range: 3 digits tell values apart
                value = f"{value:.3g}"
            parts.append(f"{short}{value}" if short else f"{key}={value}")
    return " ".join(parts)

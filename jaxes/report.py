"""Command line: read runs, finished, running or killed, without touching them.

    python -m jaxes.report runs/digits              the rounds of one run, one row each
    python -m jaxes.report runs/a runs/b runs/c     one row per run: best, test, rounds, stop
    python -m jaxes.report runs/* --csv > runs.csv  the same table as CSV
    python -m jaxes.report runs/digits --plot       redraw runs/digits/rounds.png

It reads ``config.json``, ``rounds.jsonl``, ``summary.json`` and the committed resume state,
and writes nothing (``--plot`` writes only ``rounds.png``). A round that a killed run recorded
but never committed is left out: the resume recomputes it. No JAX is imported, so it is quick
beside a live run. This is what ``trials_dataframe`` is in Optuna, or ``ResultGrid`` in Ray.

Exit codes: 0 done, 2 a path that is no run (one sentence on stderr).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from jaxes import cli, files, plot, progress
from jaxes import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class Run:
    """What a workdir says about its run, read once."""

    path: Path
    config: dict
    records: list[dict]
    summary: dict | None
    resume: dict | None
    running: bool

    @property
    def status(self) -> str:
        if self.summary is not None:
            return "finished"
        if self.running:
            return "running"
        return "stopped" if self.records else "not started"

    @property
    def last(self) -> dict:
        return self.records[-1] if self.records else {}


def read(path: str | Path) -> Run:
    """Reads a workdir without writing to it.

    Raises:
      workdir.WorkdirError: ``path`` is no run of ``jaxes.main``.
    """
    path = Path(path)
    if not path.is_dir():
        raise workdir_lib.WorkdirError(f"{path} is not a directory; give a run's --workdir.")
    config = workdir_lib.read_config(path)
    records = workdir_lib.read_rounds(path)
    state_path = path / files.CHECKPOINTS / files.RESUME_STATE
    try:
        resume = json.loads(state_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        resume = None
    committed = resume["next_round"] if resume else 0
    summary = workdir_lib.read_summary(path)
    if summary is None:
        records = records[:committed]  # a record past the commit is recomputed on resume
    return Run(path, config, records, summary, resume, workdir_lib.is_locked(path))


def _hparam(run: Run, record: dict, name: str) -> Any:
    return record.get(name, run.config.get("train", {}).get(name))


ROUND_COLUMNS = ("round", "arch", "dropout", "learning_rate", "weight_decay", "epochs", "metric",
                 "best", "streak", "patience", "budget", "seconds", "status")  # fmt: skip
RUN_COLUMNS = ("run", "status", "metric", "best", "best_round", "test", "rounds", "budget",
               "stop", "seconds")  # fmt: skip


def best_round(run: Run) -> int | None:
    """The run's best round: the finished summary's, else the newest committed record's."""
    if run.summary is not None:
        return run.summary.get("best_round")
    return run.last.get("best_round")


def round_rows(run: Run) -> list[dict]:
    """One row per committed round: architecture, hyper-parameters, outcome and time.

    ``best`` marks the run's best instance (so far, for a run that has not finished).
    """
    best = best_round(run)
    return [
        {
            "round": r.get("round_index"),
            "arch": progress.arch_short(r.get("arch")),
            "dropout": r.get("dropout_rate"),
            "learning_rate": _hparam(run, r, "learning_rate"),
            "weight_decay": _hparam(run, r, "weight_decay"),
            "epochs": r.get("epochs"),
            "metric": r.get("metric"),
            "best": r.get("round_index") == best,
            "streak": r.get("streak"),
            "patience": r.get("patience"),
            "budget": r.get("rounds_budget"),
            "seconds": r.get("wall_seconds"),
            "status": r.get("status") if r.get("status") == "ok" else f"failed: {r.get('message')}",
        }
        for r in run.records
    ]


def run_row(run: Run) -> dict:
    """One row for a whole run: best, test, rounds, stop reason and wall time."""
    summary, last = run.summary or {}, run.last
    seconds = summary.get("wall_seconds")
    if seconds is None and run.resume:
        seconds = run.resume.get("wall_seconds")
    return {
        "run": str(run.path),
        "status": run.status,
        "metric": run.config.get("metric"),
        "best": summary.get("best_metric", last.get("best")),
        "best_round": best_round(run),
        "test": summary.get("test_metric"),
        "rounds": len(run.records),
        "budget": summary.get("rounds_budget", last.get("rounds_budget")),
        "stop": summary.get("stop_reason"),
        "seconds": seconds,
    }


_FORMATS = {"dropout": ".3f", "learning_rate": ".3g", "weight_decay": ".3g", "seconds": ".1f"}


def _cell(value: Any, spec: str = ".4f") -> str:
    if isinstance(value, bool):
        return "*" if value else ""
    if isinstance(value, float):
        return progress.fmt(value, spec)
    return "-" if value is None else str(value)


def format_table(rows: list[dict], columns: tuple[str, ...]) -> str:
    """A plain-text table, columns as wide as their widest cell."""
    cells = [[_cell(row[name], _FORMATS.get(name, ".4f")) for name in columns] for row in rows]
    widths = [max([len(name), *(len(c[i]) for c in cells)]) for i, name in enumerate(columns)]
    lines = ["  ".join(name.ljust(w) for name, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def headline(run: Run) -> str:
    """One line about a run: where it stands and its best so far."""
    row = run_row(run)
    text = f"{run.path}: {run.status}"
    if run.summary:
        text += f" (stop: {row['stop']})"
    text += f", {progress.plural(row['rounds'], 'round')} of budget {_cell(row['budget'])}"
    if row["best"] is not None:
        text += f", best {row['metric']} {_cell(row['best'])} at round {row['best_round']}"
    if row["test"] is not None:
        text += f", test {_cell(row['test'])}"
    return text


def write_csv(rows: list[dict], columns: tuple[str, ...], stream) -> None:
    writer = csv.DictWriter(stream, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({name: row[name] for name in columns} for row in rows)


def redraw(run: Run) -> Path:
    """Redraws ``rounds.png`` of ``run`` from its records; returns its path."""
    path = run.path / files.PLOT
    stop = (run.summary or {}).get("stop_reason")
    metric = run.config.get("metric", "metric")
    plot.plot_rounds(run.records, path, metric_name=metric, mode=run.config.get("mode", "max"),
                     stop_reason=stop)  # fmt: skip
    return path


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    parser = cli.Parser(prog="python -m jaxes.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="a --workdir of jaxes.main")
    parser.add_argument("--csv", action="store_true", help="write the table as CSV to stdout")
    parser.add_argument("--plot", action="store_true", help="redraw each run's rounds.png")
    args = parser.parse_args(argv)
    try:
        runs = [read(path) for path in args.runs]
        if args.plot:
            for run in runs:
                print(f"wrote {redraw(run)}", file=sys.stderr)
    except workdir_lib.WorkdirError as error:
        cli.fail(str(error))
    except OSError as error:
        cli.fail(cli.describe_os_error(error))
    if len(runs) == 1:
        rows, columns = round_rows(runs[0]), ROUND_COLUMNS
    else:
        rows, columns = [run_row(run) for run in runs], RUN_COLUMNS
    try:
        if args.csv:
            write_csv(rows, columns, sys.stdout)
        else:
            if len(runs) == 1:
                print(headline(runs[0]))
            print(format_table(rows, columns))
        sys.stdout.flush()
    except BrokenPipeError:  # `... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())

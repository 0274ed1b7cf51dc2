"""Command line: ``python -m jaxes.main --config=configs/digits.py --workdir=runs/digits``.

Overrides: ``--config.rounds=20``, ``--config.search.strategy=random``. Variants:
``--config=configs/digits.py:smoke``. Many hosts: ``--coordinator=HOST:PORT --num_processes=N
--process_id=I`` on each process, or ``--distributed`` to let ``jax.distributed.initialize``
read the cluster launcher's environment (SLURM, TPU pods, ...).

Exit codes: 0 done (or already finished), 2 bad command line / config / workdir / data, or a
full disk (one sentence on stderr), 130 after Ctrl-C and 143 after SIGTERM (rerun to resume).
"""

from __future__ import annotations

import ast
import contextlib
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jaxes import checkpoint, cli, confighelp, data, guard, rounds, runconfig, search, workdir
from jaxes.cli import fail

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/digits.py[:variant].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created, or resumed).")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0, multi-process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Initialize jax.distributed from the cluster environment."
)
_COMPILE_CACHE = flags.DEFINE_string(
    "compile_cache",
    "~/.cache/jaxes/jax",
    "JAX's persistent compilation cache: a rerun (or another run of the same shapes) compiles "
    "nothing. '' turns it off; $JAX_COMPILATION_CACHE_DIR, if set, wins.",
)

USER_ERRORS = (
    runconfig.ConfigError,
    workdir.WorkdirError,
    data.DataError,
    search.SearchError,
    checkpoint.CheckpointError,
)


def _one_line(text: str) -> str:
    """The gist of an error text: a traceback collapses to its final line."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip(" .")]
    if len(lines) > 1 and any(line.startswith("Traceback") for line in lines):
        return f"{lines[0].rstrip(':')}: {lines[-1]}"
    return " ".join(lines).rstrip(".") + "."


HELP_FLAGS = ("-h", "-help", "--help", "--helpshort", "-?")


def _help(argv: list[str]) -> str:
    ours = [_CONFIG, _WORKDIR, _COORDINATOR, _NUM_PROCESSES, _PROCESS_ID, _DISTRIBUTED]
    lines = [f"  --{flag.name}: {flags.FLAGS[flag.name].help}" for flag in ours]
    return confighelp.help_text(__doc__, lines, argv)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, but a bad flag or config override exits 2 with one sentence."""
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print(_help(argv[1:]))
        sys.exit(0)
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        fail(_one_line(e))
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        # ml_collections raises these for a bad --config file or override.
        spec = confighelp.config_spec(argv[1:])
        config = confighelp.load(spec) if spec else None
        if config is not None and (message := confighelp.unknown_field(config, argv[1:])):
            fail(message)
        text = str(e)
        with contextlib.suppress(ValueError, SyntaxError):
            text = str(ast.literal_eval(text))  # a KeyError's message arrives quoted
        name, *hint = text.splitlines() or [""]
        if hint and hint[0].startswith("Did you mean"):  # an unknown --config.FIELD
            fail(f"the config has no field {name}. {hint[0]}")
        fail(f"bad --config: {_one_line(text)}")
    if flags.FLAGS.config is None:
        fail("--config is required, e.g. --config=configs/digits.py.")
    try:
        flags.FLAGS.config.to_dict()  # a config file that failed to load raises only on use
    except OSError as e:
        reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
        fail(
            f"cannot load --config={flags.FLAGS['config'].serialize().split('=', 1)[-1]}: {reason}"
        )
    if not flags.FLAGS.workdir:
        fail("--workdir is required, e.g. --workdir=runs/digits.")
    return rest


def init_distributed() -> None:
    """Joins a multi-process run if asked to; CPU processes talk through gloo."""
    explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if any(value is not None for value in explicit):
        coordinator, num_processes, process_id = explicit
        if None in explicit:
            fail("--coordinator, --num_processes and --process_id go together; give all three.")
        if not (num_processes >= 1 and 0 <= process_id < num_processes):
            fail(f"--process_id={process_id} must be in [0, --num_processes={num_processes}).")
        kwargs = {
            "coordinator_address": coordinator,
            "num_processes": num_processes,
            "process_id": process_id,
        }
    elif _DISTRIBUTED.value:
        kwargs = {}  # the cluster launcher's environment says everything
    else:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:
        fail(f"jax.distributed.initialize failed: {_one_line(e)}")


def enable_compile_cache() -> None:
    """Points JAX's persistent compilation cache at ``--compile_cache`` (unless the environment
    already chose one): every program a run compiles is reused by the next run."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or not _COMPILE_CACHE.value:
        return
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(_COMPILE_CACHE.value))
    # Cache every program that took a noticeable time; tiny helpers are cheaper to recompile.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; settings go in --config.FIELD=VALUE.")
    if not flags.FLAGS["verbosity"].present:
        # Libraries (TFDS, Orbax) log routine warnings; the run's own output is the progress.
        logging.set_verbosity(logging.ERROR)
    init_distributed()
    enable_compile_cache()
    try:
        rounds.run(_CONFIG.value, _WORKDIR.value)
    except guard.Interrupted as e:
        print(f"jaxes: {e}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Leave without interpreter teardown: the signal may have landed inside JAX, whose
        # threads can crash a normal shutdown. Every file is committed already (see guard.py).
        os._exit(e.exit_code)
    except (*USER_ERRORS, guard.DiskFull) as e:
        fail(str(e))
    except OSError as e:  # an unwritable --workdir or data dir
        fail(cli.describe_os_error(e))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

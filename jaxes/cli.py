"""What every jaxes command does with misuse: one sentence on stderr, exit code 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


def fail(message: str) -> NoReturn:
    """Prints ``jaxes: message`` to stderr and exits 2."""
    print(f"jaxes: {message}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one sentence and exit 2, not a usage block."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message}; see `{self.prog} --help`.")


def describe_os_error(error: OSError) -> str:
    """One sentence for a file-system error (an unwritable path, a full disk, ...)."""
    where = error.filename or "a file"
    return f"{where}: {error.strerror or error}; check the path, its permissions and free space."

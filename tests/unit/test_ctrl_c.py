"""Ctrl-C reaches a command whose event loop's wake-up socket is full."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

# A loop stalled (blocked on standard input) after 100 000 wake-ups from another
# thread: the loop's wake-up socket is full, so a signal byte written to it is lost.
# Ctrl-C then arrives; the script reads a line (by then Python has run the handler),
# says so, reads another (a second Ctrl-C may come before it) and waits in the loop.
SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, threading
    from runtime.cli.common import CtrlC

    async def main(ctrl_c):
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if MODE == "ctrl-c":
            ctrl_c.attach(task)
        else:
            loop.add_signal_handler(2, task.cancel)
        flood = threading.Thread(
            target=lambda: [loop.call_soon_threadsafe(int) for _ in range(100_000)]
        )
        flood.start()
        flood.join()
        print("full", flush=True)
        sys.stdin.readline()
        print("read", flush=True)
        sys.stdin.readline()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            print("cancelled", flush=True)
            return 130
        return 0

    with CtrlC() as ctrl_c:
        sys.exit(asyncio.run(main(ctrl_c)))
    """
)


def _run(mode: str, signals: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", f"MODE = {mode!r}\n" + SCRIPT],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline() == "full\n"
    proc.send_signal(signal.SIGINT)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "read\n"
    if signals == 2:
        proc.send_signal(signal.SIGINT)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return proc


def test_ctrl_c_cancels_the_task_when_the_wake_up_socket_is_full():
    proc = _run("ctrl-c", 1)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (130, "cancelled\n", "")


def test_the_loops_own_signal_handler_loses_that_ctrl_c():
    # Why CtrlC does not use loop.add_signal_handler: the same Ctrl-C is dropped.
    proc = _run("loop", 1)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.communicate(timeout=3)
    proc.kill()
    _, err = proc.communicate(timeout=60)
    assert "signal wakeup fd" in err


def test_a_second_ctrl_c_exits_at_once():
    # The second one arrives before the loop has run the cancellation the first scheduled.
    proc = _run("ctrl-c", 2)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (130, "", "")

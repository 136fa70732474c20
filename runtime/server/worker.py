"""One ``voxloop serve`` worker process: the uvicorn server with a graceful drain, and the
app factory that ``--workers N`` spawns in each process.

SIGTERM (or Ctrl-C) drains instead of cutting (:func:`drain_on_signals`, entered by the
app's lifespan): readiness (``/readyz``) goes false and
new sessions are refused at once; live sessions finish the reply they are speaking
and end with ``session.ended`` (close 1000); when ``--drain-timeout`` passes, the
rest are handed off (state kept, close 1012) so their clients resume on another
worker; then the server stops. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn
from prometheus_client.multiprocess import mark_process_dead
from starlette.applications import Starlette
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess
from uvicorn.supervisors.multiprocess import Process

from runtime.sessions import SessionRunner

log = logging.getLogger("voxloop.server")

DEFAULT_DRAIN_S = 30.0


def find_runner(app: Any) -> SessionRunner | None:
    """The session runner of a (possibly middleware-wrapped) voxloop app."""
    for _ in range(8):
        if isinstance(app, Starlette):
            runner = getattr(app.state, "runner", None)
            return runner if isinstance(runner, SessionRunner) else None
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


class WorkerServer(uvicorn.Server):
    """A uvicorn server for which a SIGTERM/SIGINT stop is a clean exit (0).

    uvicorn re-raises the signal after a graceful shutdown (exit 143 for SIGTERM);
    here the handler records it for the shutdown line instead.
    """

    stop_signal: int | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        handled = (signal.SIGINT, signal.SIGTERM)
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.stop_signal = self.stop_signal or sig
        super().handle_exit(sig, frame)


@contextlib.contextmanager
def drain_on_signals(runner: SessionRunner, timeout_s: float) -> Iterator[None]:
    """While in this block (the app's lifespan), SIGTERM/SIGINT drain before the server stops.

    The server's own handlers (installed before the app starts) run once the drain is
    over, so the server then shuts down as usual with no session left to cut.
    Must be entered on the main thread, in the server's event loop.
    """
    loop = asyncio.get_running_loop()
    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.getsignal(sig) for sig in handled}
    draining: list[asyncio.Task[None]] = []

    def stop(sig: int, frame: FrameType | None) -> None:
        handler = previous[signal.Signals(sig)]
        if callable(handler):
            handler(sig, frame)

    async def drain_then_stop(sig: int) -> None:
        live = runner.live_sessions
        log.info(f"draining {live} session(s) for up to {timeout_s:g} s")
        handed = await runner.drain(timeout_s)
        log.info(f"drained: {live - handed} session(s) ended, {handed} handed off to resume")
        stop(sig, None)

    def on_signal(sig: int, frame: FrameType | None) -> None:
        if draining:  # a second signal: stop now
            stop(sig, frame)
            return
        runner.draining = True  # readiness false, new sessions refused, from now on
        draining.append(loop.create_task(drain_then_stop(sig)))

    for sig in handled:
        signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for task in draining:
            task.cancel()


class Supervisor(Multiprocess):
    """uvicorn's supervisor of ``serve --workers N`` (spawns the workers, restarts one that
    dies, stops them all on SIGTERM), which also tells the shared metrics when a worker is
    gone: its live gauges (sessions running, queued events) are dropped from the sum, its
    counters and histograms stay in it.

    ``sockets``: one listening socket per worker (``SO_REUSEPORT`` on one port; see
    :func:`runtime.cli.serve.listening_sockets`), worker *i* serving ``sockets[i]`` and its
    replacement the same one, so connections queued while a worker died are served by the
    next; or one socket all workers share. ``metrics_dir`` is the
    ``PROMETHEUS_MULTIPROC_DIR`` the workers were started with.
    """

    def __init__(self, config: uvicorn.Config, sockets: list[Any], metrics_dir: str) -> None:
        super().__init__(config, sockets)
        self.metrics_dir = metrics_dir
        self._known: set[int] = set()
        self._per_worker = len(sockets) == config.workers > 1

    def _forget_gone(self) -> None:
        alive = {p.pid for p in self.processes if p.pid is not None and p.exitcode is None}
        for pid in self._known - alive:
            mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]
        self._known = alive

    def _spawn(self, index: int) -> Process:
        sockets = [self.sockets[index]] if self._per_worker else self.sockets
        process = Process(self.config, sockets)
        process.start()
        return process

    def init_processes(self) -> None:
        self.processes = [self._spawn(i) for i in range(self.processes_num)]
        self._forget_gone()

    def keep_subprocess_alive(self) -> None:
        """As uvicorn's, with the replacement spawned on the dead worker's socket."""
        if self.should_exit.is_set():
            return
        for index, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()  # gone or hung
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                # It failed before serving: the app or the socket is broken, and every
                # replacement would fail the same way.
                log.error(f"worker {process.pid} failed to start; stopping")
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            log.info(f"worker {process.pid} died; starting another")
            self.processes[index] = self._spawn(index)
        self._forget_gone()

    def restart_all(self) -> None:
        """SIGHUP: replace each worker in turn, the new one on the old one's socket and in
        service before the old one is stopped (as uvicorn's)."""
        for index, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new = self._spawn(index)
            if not new.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit):
                new.kill()
                new.join()
                if not self.should_exit.is_set():
                    log.error(f"worker {new.pid} was not ready in time; keeping {old.pid}")
                return
            old.terminate()
            old.join()
            self.processes[index] = new

    def handle_signals(self) -> None:
        super().handle_signals()
        self._forget_gone()

    def join_all(self) -> None:
        super().join_all()
        self._forget_gone()


def app_from_env() -> Starlette:
    """The app of a spawned worker: settings from the environment the parent prepared."""
    from runtime.server.app import create_app, settings_from_env
    from runtime.server.logs import configure

    configure(logging.INFO)
    if os.environ.get("VOXLOOP_NO_ACCESS_LOG"):
        logging.getLogger("voxloop.access").setLevel(logging.WARNING)
    return create_app(settings_from_env(os.environ))

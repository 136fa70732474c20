"""A throwaway Redis server for tests (Debian's redis-server package), on a free loopback port,
in a temporary directory, with no persistence; stopped by the test that started it."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator

from .helpers import missing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A running ``redis-server``; yields its ``redis://127.0.0.1:PORT/0`` URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        missing("redis-server is not installed (apt-get install redis-server; .ci/run does)")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="voxloop-redis-") as root:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--dir", root, "--loglevel", "notice"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            _wait_ready(proc, port)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            assert proc.stdout is not None
            proc.stdout.close()


def _wait_ready(proc: subprocess.Popen[str], port: int) -> None:
    # redis-server logs this line once it accepts connections (then: nothing more to read).
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "Ready to accept connections" in line:
            return
    raise RuntimeError(f"redis-server on port {port} exited {proc.wait()}: {''.join(seen)}")

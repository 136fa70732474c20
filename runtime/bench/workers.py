"""The worker processes of a ``voxloop serve --workers N`` run, as Linux's ``/proc`` shows them.

Used by the chaos soak and the worker tests: which processes are the workers (the
supervisor's children, not multiprocessing's resource tracker), how much memory each
holds, and which worker accepted a given client connection (the kernel picks one per
connection).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = [
    "connection_worker", "established", "listening", "open_sockets", "rss_kb", "worker_pids",
]  # fmt: skip

PROC = Path("/proc")


def worker_pids(parent: int) -> list[int]:
    """The app processes of a ``serve --workers`` supervisor ``parent``, sorted (its
    multiprocessing resource tracker left out); empty if it has none or is gone."""
    found = []
    for entry in PROC.iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The process name in /proc/PID/stat may hold spaces and parentheses.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
            if int(fields[1]) == parent and b"resource_tracker" not in cmdline:
                found.append(int(entry.name))
    return sorted(found)


def rss_kb(pid: int) -> int:
    """Resident memory of ``pid`` in KiB (``VmRSS``); 0 once the process is gone."""
    with contextlib.suppress(OSError):
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _tcp_inodes(pid: int, server_port: int, client_port: int) -> set[str]:
    """Socket inodes of TCP connections from local ``server_port`` to remote ``client_port``."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in (PROC / str(pid) / "net" / table).read_text().splitlines()[1:]:
                cols = line.split()
                local, remote, inode = cols[1], cols[2], cols[9]
                if (int(local.rsplit(":", 1)[1], 16) == server_port
                        and int(remote.rsplit(":", 1)[1], 16) == client_port):  # fmt: skip
                    inodes.add(inode)
    return inodes


def connection_worker(workers: list[int], server_port: int, client_port: int) -> int | None:
    """The pid among ``workers`` holding the accepted end of the connection a client made
    from local port ``client_port`` to ``server_port``; None if none of them does."""
    if not workers:
        return None
    wanted = {f"socket:[{inode}]" for inode in _tcp_inodes(workers[0], server_port, client_port)}
    for pid in workers:
        fds = PROC / str(pid) / "fd"
        with contextlib.suppress(OSError):
            for fd in fds.iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in wanted:
                        return pid
    return None


def _held(workers: list[int], server_port: int, state: str) -> dict[int, set[str]]:
    """The TCP sockets on local ``server_port`` in ``state`` (``/proc/net/tcp``'s hex
    code) that each of ``workers`` holds open, as ``socket:[inode]`` links."""
    if not workers:
        return {}
    inodes = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in (PROC / str(workers[0]) / "net" / table).read_text().splitlines()[1:]:
                cols = line.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == server_port and cols[3] == state:
                    inodes.add(f"socket:[{cols[9]}]")
    held: dict[int, set[str]] = {}
    for pid in workers:
        held[pid] = set()
        with contextlib.suppress(OSError):
            for fd in (PROC / str(pid) / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if (link := os.readlink(fd)) in inodes:
                        held[pid].add(link)
    return held


def established(workers: list[int], server_port: int) -> dict[int, int]:
    """How many accepted TCP connections on ``server_port`` each of ``workers`` holds."""
    return {pid: len(socks) for pid, socks in _held(workers, server_port, "01").items()}


def listening(workers: list[int], server_port: int) -> dict[int, set[str]]:
    """The listening sockets on ``server_port`` each of ``workers`` holds
    (``socket:[inode]``): one each, all different, when each has its own."""
    return _held(workers, server_port, "0A")


def open_sockets(pid: int) -> int:
    """How many sockets ``pid`` holds open (TCP, Unix); 0 once the process is gone."""
    held = 0
    with contextlib.suppress(OSError):
        for fd in (PROC / str(pid) / "fd").iterdir():
            with contextlib.suppress(OSError):
                held += os.readlink(fd).startswith("socket:")
    return held

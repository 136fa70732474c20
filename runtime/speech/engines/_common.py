"""Helpers shared by the embedded engines: model verification and threaded runs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

from audio.resample import Resampler
from runtime.speech.tts import AudioChunk

_VERIFIED: dict[tuple[str, int, int], str] = {}
_VERIFIED_LOCK = threading.Lock()


class ModelVerificationError(RuntimeError):
    """A model file is missing or is not the pinned file."""


def verify_sha256(path: Path, expected: str) -> None:
    """Check a model file against its pinned sha256 (cached per path, size and mtime).

    Raises:
        ModelVerificationError: missing file or a different hash.
    """
    try:
        stat = path.stat()
    except OSError:
        raise ModelVerificationError(f"model file {path} is missing") from None
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _VERIFIED_LOCK:
        if _VERIFIED.get(key) == expected:
            return
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    actual = digest.hexdigest()
    if actual != expected:
        raise ModelVerificationError(
            f"model file {path} has sha256 {actual}, expected {expected}; "
            "reinstall the pinned package"
        )
    with _VERIFIED_LOCK:
        _VERIFIED[key] = expected


class PulledRun:
    """A TTS run that pulls one chunk at a time from a blocking generator in a worker thread.

    Pull-based: the next sentence is synthesized when the consumer asks for
    it, so a slow consumer is natural backpressure and nothing piles up.
    :meth:`cancel` makes the run yield nothing more; the worker stops at the
    next sentence boundary.
    """

    def __init__(
        self,
        produce: Callable[[threading.Event], Iterator[tuple[bytes, str]]],
        *,
        native_rate: int,
        sample_rate: int,
        executor: concurrent.futures.Executor,
    ) -> None:
        self._produce = produce
        self._cancelled = threading.Event()
        self._iter: Iterator[tuple[bytes, str]] | None = None
        self._executor = executor
        self._resampler = Resampler(native_rate, sample_rate)
        self._rate = sample_rate
        self._done = False

    def __aiter__(self) -> Self:
        return self

    def cancel(self) -> None:
        self._cancelled.set()

    async def aclose(self) -> None:
        """Cancel (the worker holds nothing else: it stops at the next sentence)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _next(self) -> tuple[bytes, str] | None:
        if self._iter is None:
            self._iter = self._produce(self._cancelled)
        if self._cancelled.is_set():
            return None
        return next(self._iter, None)

    async def __anext__(self) -> AudioChunk:
        while not self._done:
            if self._cancelled.is_set():
                self._done = True
                break
            loop = asyncio.get_running_loop()
            item = await loop.run_in_executor(self._executor, self._next)
            if self._cancelled.is_set():
                self._done = True
                break
            if item is None:
                self._done = True
                tail = self._resampler.flush()
                if tail:
                    return AudioChunk(pcm=tail, sample_rate=self._rate)
                break
            pcm, text = item
            out = self._resampler.process(pcm)
            if out:
                return AudioChunk(pcm=out, sample_rate=self._rate, text=text)
        raise StopAsyncIteration

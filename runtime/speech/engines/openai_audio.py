"""Remote speech through any OpenAI-compatible audio server.

* STT: ``POST {base_url}/audio/transcriptions`` (multipart: a WAV ``file`` and
  ``model``; JSON ``{"text": …}`` back) — what faster-whisper-server,
  speaches, vLLM and LocalAI expose.
* TTS: ``POST {base_url}/audio/speech`` with ``response_format: "pcm"``:
  raw 16-bit mono PCM (24 kHz unless configured) streamed back, resampled
  once to the sink's rate as it arrives.

The base URL goes through the same URL policy, pinned connections and
secret handling as chat-completions endpoints. A turn uses the same pause
trick as the embedded engine: at a pause the audio so far is sent, and if the
user does not go on, that request's answer is the final transcript.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import wave
from collections.abc import AsyncGenerator, Sequence
from typing import Any, Final, Self

import httpx

from audio.frame import AudioFrame, check_pcm, check_rate
from audio.resample import Resampler
from runtime.endpoints import Resolver, SystemResolver, URLPolicy
from runtime.errors import (
    EndpointError,
    MalformedStream,
)
from runtime.llm.client import USER_AGENT, _error_detail, _retry_after_s
from runtime.llm.stream import status_error
from runtime.llm.transport import PinnedHTTP, map_http_errors
from runtime.secret import Secret
from runtime.speech.stt import Transcript
from runtime.speech.tts import AudioChunk, UnknownVoice, Voice

OPENAI_VOICES: Final = ("alloy", "ash", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer")


def _wav_bytes(pcm: bytes, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm)
    return buf.getvalue()


async def _raise_for_status(response: httpx.Response, api_key: Secret | None) -> None:
    if response.status_code < 300:
        return
    body = await response.aread()
    raise status_error(
        response.status_code,
        _error_detail(body[:4096], api_key),
        _retry_after_s(response.headers.get("retry-after")),
    )


class _Remote:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: Secret | None,
        policy: URLPolicy | None,
        resolver: Resolver | None,
        timeout_s: float,
        verify: Any,
    ) -> None:
        self._api_key = api_key
        self._client = PinnedHTTP(
            base_url,
            policy=policy or URLPolicy(),
            resolver=resolver or SystemResolver(),
            headers={"User-Agent": USER_AGENT},
            timeout=httpx.Timeout(timeout_s),
            api_key=api_key,
            verify=verify,
        )

    async def aclose(self) -> None:
        await self._client.aclose()


class OpenAISTT(_Remote):
    """STT through ``/audio/transcriptions``.

    Args:
        base_url: e.g. ``https://api.openai.com/v1`` or a self-hosted server.
        model: sent as ``model``.
        api_key: sent as a Bearer token.
        policy: URL policy (the strict default suits stored endpoints).
        resolver: host resolver (injectable for tests).
        timeout_s: deadline per request.
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str = "whisper-1",
        api_key: Secret | None = None,
        language: str | None = "en",
        policy: URLPolicy | None = None,
        resolver: Resolver | None = None,
        timeout_s: float = 15.0,
        verify: Any = True,
    ) -> None:
        super().__init__(
            base_url, api_key=api_key, policy=policy, resolver=resolver, timeout_s=timeout_s,
            verify=verify,
        )  # fmt: skip
        self._model = model
        self._language = language

    @property
    def name(self) -> str:
        return "openai"

    async def _post(self, pcm: bytes, sample_rate: int, prompt: str = "") -> str:
        await self._client.ensure_pinned()
        data = {"model": self._model, "response_format": "json"}
        if self._language:
            data["language"] = self._language
        if prompt:
            data["prompt"] = prompt
        files = {"file": ("audio.wav", _wav_bytes(pcm, sample_rate), "audio/wav")}
        async with map_http_errors("the speech server"):
            response = await self._client.http.post(
                f"{self._client.url.url}/audio/transcriptions", data=data, files=files
            )
            await _raise_for_status(response, self._api_key)
        try:
            doc = response.json()
        except ValueError:
            raise MalformedStream("speech server answered with something other than JSON",
                                  retryable=False) from None  # fmt: skip
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            raise MalformedStream("speech server answer has no 'text'", retryable=False)
        return str(doc["text"]).strip()

    async def transcribe(self, pcm: bytes, sample_rate: int) -> Transcript:
        """Transcribe a whole buffer.

        Raises:
            ValueError: bad PCM or rate.
            EndpointError: the server failed (typed as for chat endpoints).
            URLPolicyError: the server's address is not allowed.
        """
        pcm = check_pcm(pcm)
        check_rate(sample_rate)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        text = await self._post(pcm, sample_rate) if pcm else ""
        return Transcript(
            text=text,
            audio_ms=len(pcm) / 2 / sample_rate * 1000,
            decode_ms=(loop.time() - t0) * 1000,
        )

    def start_turn(self, sample_rate: int = 16000) -> RemoteTurn:
        return RemoteTurn(self, check_rate(sample_rate))


class RemoteTurn:
    """A turn against a request/response STT: the pause trick with whole requests."""

    def __init__(self, engine: OpenAISTT, sample_rate: int) -> None:
        self._engine = engine
        self._rate = sample_rate
        self._pcm = bytearray()
        self._spec: tuple[int, asyncio.Task[Transcript]] | None = None
        self._resumed = False
        self._closed = False

    @property
    def partial(self) -> Transcript | None:
        if self._spec is None or not self._spec[1].done() or self._spec[1].cancelled():
            return None
        if self._spec[1].exception() is not None:
            return None
        result = self._spec[1].result()
        return Transcript(text=result.text, final=False, audio_ms=result.audio_ms)

    async def speculative(self) -> Transcript | None:
        """The answer to the request sent at the last pause (``None`` if there was none)."""
        if self._spec is None:
            return None
        result = await asyncio.shield(self._spec[1])
        return Transcript(text=result.text, final=False, audio_ms=result.audio_ms)

    def push(self, frame: AudioFrame) -> None:
        if self._closed:
            raise RuntimeError("push() on a closed turn")
        if frame.sample_rate != self._rate:
            raise ValueError(f"turn expects {self._rate} Hz audio, got {frame.sample_rate} Hz")
        self._pcm += frame.pcm

    def resume(self) -> None:
        self._resumed = True

    def pause(self) -> None:
        if self._closed or not self._pcm:
            return
        if self._spec is not None:
            if self._spec[0] == len(self._pcm):
                return
            self._spec[1].cancel()
        self._resumed = False
        pcm = bytes(self._pcm)
        self._spec = (
            len(pcm),
            asyncio.ensure_future(self._engine.transcribe(pcm, self._rate)),
        )

    async def finalize(self) -> Transcript:
        if self._closed:
            raise RuntimeError("finalize() on a closed turn")
        self._closed = True
        if self._spec is not None and not self._resumed:
            result = await self._spec[1]
            return Transcript(
                text=result.text, audio_ms=len(self._pcm) / 2 / self._rate * 1000,
                decode_ms=result.decode_ms, speculative=True,
            )  # fmt: skip
        if self._spec is not None:
            self._spec[1].cancel()
        return await self._engine.transcribe(bytes(self._pcm), self._rate)

    async def aclose(self) -> None:
        self._closed = True
        if self._spec is not None:
            task = self._spec[1]
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, EndpointError):
                await task


class OpenAITTS(_Remote):
    """TTS through ``/audio/speech`` with streamed PCM.

    Args:
        base_url: e.g. ``https://api.openai.com/v1`` or a self-hosted server.
        model: sent as ``model``.
        voices: voice ids the server offers (the OpenAI set by default).
        pcm_rate: the rate of the server's ``pcm`` format (24 kHz for OpenAI).
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str = "tts-1",
        voices: Sequence[str] = OPENAI_VOICES,
        default_voice: str | None = None,
        pcm_rate: int = 24000,
        api_key: Secret | None = None,
        policy: URLPolicy | None = None,
        resolver: Resolver | None = None,
        timeout_s: float = 15.0,
        verify: Any = True,
    ) -> None:
        super().__init__(
            base_url, api_key=api_key, policy=policy, resolver=resolver, timeout_s=timeout_s,
            verify=verify,
        )  # fmt: skip
        if not voices:
            raise ValueError("at least one voice is required")
        self._model = model
        self._pcm_rate = check_rate(pcm_rate)
        self._voices = [
            Voice(id=v, name=v, language="", engine="openai", sample_rate=pcm_rate) for v in voices
        ]
        self._default = default_voice or voices[0]

    @property
    def name(self) -> str:
        return "openai"

    def voices(self) -> list[Voice]:
        return list(self._voices)

    def synthesize(
        self, text: str, *, voice: str | None = None, sample_rate: int = 24000
    ) -> RemoteSpeech:
        chosen = voice or self._default
        if not any(v.id == chosen for v in self._voices):
            raise UnknownVoice(chosen, self._voices)
        return RemoteSpeech(self, text, chosen, check_rate(sample_rate))


class RemoteSpeech:
    """One ``/audio/speech`` response, yielded as PCM chunks as they arrive."""

    def __init__(self, engine: OpenAITTS, text: str, voice: str, sample_rate: int) -> None:
        self._engine = engine
        self._text = text
        self._voice = voice
        self._rate = sample_rate
        self._cancelled = False
        self._gen: AsyncGenerator[AudioChunk, None] | None = None

    def __aiter__(self) -> Self:
        return self

    def cancel(self) -> None:
        """Stop: nothing more is yielded and the HTTP response is closed."""
        self._cancelled = True

    async def _close(self) -> None:
        if self._gen is not None:
            await self._gen.aclose()

    async def __anext__(self) -> AudioChunk:
        if not self._cancelled:
            if self._gen is None:
                self._gen = self._chunks()
            chunk = await anext(self._gen)
            if not self._cancelled:
                return chunk
        await self._close()
        raise StopAsyncIteration

    async def _chunks(self) -> AsyncGenerator[AudioChunk, None]:
        if not self._text.strip():
            return
        engine = self._engine
        client = engine._client
        await client.ensure_pinned()
        body = {
            "model": engine._model,
            "input": self._text,
            "voice": self._voice,
            "response_format": "pcm",
        }
        resampler = Resampler(engine._pcm_rate, self._rate)
        carry = b""
        async with (
            map_http_errors("the speech server", before_response=False),
            client.http.stream("POST", f"{client.url.url}/audio/speech", json=body) as response,
        ):
            await _raise_for_status(response, engine._api_key)
            async for data in response.aiter_bytes():
                data = carry + data
                cut = len(data) - len(data) % 2
                carry = data[cut:]
                out = resampler.process(data[:cut])
                if out:
                    yield AudioChunk(pcm=out, sample_rate=self._rate, text=self._text)
        tail = resampler.flush()
        if tail:
            yield AudioChunk(pcm=tail, sample_rate=self._rate, text=self._text)

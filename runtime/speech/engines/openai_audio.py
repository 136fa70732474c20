"""Remote speech through any OpenAI-compatible audio server.

* STT: ``POST {base_url}/audio/transcriptions`` (multipart: a WAV ``file`` and
  ``model``; JSON ``{"text": …}`` back) — what faster-whisper-server,
  speaches, vLLM and LocalAI expose.
* TTS: ``POST {base_url}/audio/speech`` with ``response_format: "pcm"``:
  raw 16-bit mono PCM (24 kHz unless configured) streamed back, resampled
  once to the sink's rate as it arrives. Servers do not all honour the
  format: a WAV answer (``audio/wav``, or a body that starts with a RIFF/WAVE
  header whatever its label) is read as it streams and only its audio is
  played, at the rate its header gives; ``audio/L16;rate=…`` gives its rate;
  FLAC, Ogg and MP3 answers are decoded whole by libsndfile once they have
  arrived; anything else is a :class:`MalformedStream` naming the format
  (never header or container bytes played as samples).

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
from collections.abc import AsyncGenerator, Coroutine, Sequence
from typing import Any, Final, Self, cast

import httpx
import numpy as np
import soundfile

from audio.frame import AudioFrame, check_pcm, check_rate
from audio.resample import Resampler
from audio.wav import WavStreamReader
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
        async with map_http_errors("the speech server", http=self._client):
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
        self._readers: set[asyncio.Task[None]] = set()

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

    def _read(self, reading: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a run's reader, held here until it ends (a run holds only its task)."""
        task = asyncio.ensure_future(reading)
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)
        return task

    async def aclose(self) -> None:
        """Stop the runs still reading, then close the connections."""
        readers = list(self._readers)
        for task in readers:
            task.cancel()
        if readers:
            await asyncio.wait(readers)
        await super().aclose()


_WAV_TYPES: Final = frozenset({"audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"})
_RAW_TYPES: Final = frozenset(
    {"", "audio/pcm", "audio/l16", "audio/raw", "application/octet-stream"}
)
_DECODED_TYPES: Final = frozenset(
    {"audio/flac", "audio/x-flac", "audio/ogg", "audio/opus", "audio/mpeg", "audio/mp3"}
)
_CONTAINER_MAGIC: Final = (b"fLaC", b"OggS", b"ID3")
_SNIFF: Final = 12
_MAX_DECODED_BODY: Final = 32 << 20


class SpeechBody:
    """What a ``/audio/speech`` answer holds, as mono PCM16 and its rate.

    Pure: bytes in, ``(pcm, rate)`` out. The first 12 bytes decide how the
    body is read (see the module docstring); until then nothing comes out.

    Args:
        content_type: the response's ``Content-Type``.
        pcm_rate: the rate of raw PCM when the server does not say.
    """

    def __init__(self, content_type: str, pcm_rate: int) -> None:
        media, _, params = content_type.partition(";")
        self._type = media.strip().lower()
        self._rate = pcm_rate
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "rate" and value.strip().isdigit():
                self._rate = check_rate(int(value.strip()))
        self._head = b""
        self._mode: str | None = None
        self._wav = WavStreamReader()
        self._whole = bytearray()
        self._carry = b""

    @property
    def rate(self) -> int | None:
        """The rate of what :meth:`feed` returns, once known."""
        if self._mode == "wav":
            fmt = self._wav.format
            return fmt.sample_rate if fmt is not None else None
        return self._rate if self._mode == "raw" else None

    def feed(self, data: bytes) -> bytes:
        """Next bytes of the body; returns the PCM they complete (at :attr:`rate`).

        Raises:
            MalformedStream: a format that cannot be played.
        """
        if self._mode is None:
            self._head += data
            if len(self._head) < _SNIFF:
                return b""
            data, self._head = self._head, b""
            self._mode = self._choose(data)
        try:
            if self._mode == "wav":
                return self._wav.feed(data)
        except ValueError as exc:
            raise MalformedStream(
                f"speech server answered a WAV body: {exc}", retryable=False
            ) from None
        if self._mode == "decode":
            self._whole += data
            if len(self._whole) > _MAX_DECODED_BODY:
                raise MalformedStream("speech server answer is larger than 32 MiB", retryable=False)
            return b""
        data = self._carry + data
        cut = len(data) - len(data) % 2
        self._carry = data[cut:]
        return data[:cut]

    def finish(self) -> tuple[bytes, int | None]:
        """The body ended: the PCM still held and its rate.

        Raises:
            MalformedStream: the body ended early or could not be decoded.
        """
        pcm = b""
        if self._mode is None:
            # Shorter than the sniffing window: decide on what there is.
            head, self._head = self._head, b""
            self._mode = self._choose(head)
            pcm = self.feed(head)
        if self._mode == "wav":
            try:
                self._wav.finish()
            except ValueError as exc:
                raise MalformedStream(
                    f"speech server answered a WAV body: {exc}", retryable=False
                ) from None
        elif self._mode == "decode":
            return self._decode()
        return pcm, self.rate

    def _choose(self, head: bytes) -> str:
        if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
            return "wav"
        if self._type in _WAV_TYPES:
            return "wav"  # the reader names what is wrong with it
        if head.startswith(_CONTAINER_MAGIC) or self._type in _DECODED_TYPES:
            return "decode"
        if self._type in _RAW_TYPES:
            return "raw"
        raise MalformedStream(
            f"speech server answered {self._type!r}, which voxloop cannot play "
            "(raw PCM, WAV, FLAC, Ogg and MP3 are played)",
            retryable=False,
        )

    def _decode(self) -> tuple[bytes, int]:
        try:
            samples, rate = soundfile.read(io.BytesIO(bytes(self._whole)), dtype="float64")
        except soundfile.LibsndfileError as exc:
            raise MalformedStream(
                f"speech server answered {self._type or 'audio'} that does not decode "
                f"({exc.error_string})",
                retryable=False,
            ) from None
        if samples.ndim > 1:
            samples = samples.mean(axis=1)
        try:
            check_rate(int(rate))
        except ValueError as exc:
            raise MalformedStream(
                f"speech server answered audio at {exc}", retryable=False
            ) from None
        pcm: bytes = np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2").tobytes()
        return pcm, int(rate)


class RemoteSpeech:
    """One ``/audio/speech`` response, yielded as PCM chunks as they arrive.

    A task of the engine's reads the response and hands its chunks over one at a
    time, so the consumer's frame never holds a suspended generator of the response:
    dropped unclosed, such a chain (this run's generator, httpx's and httpcore's) is
    finalised by asyncio one generator per task, in no set order, and the collector
    first runs the finalisers of the connection it reaches (an unclosed socket and
    transport). :meth:`aclose` (or :meth:`cancel`) stops the reader, which closes the
    response in its own task; a run dropped unclosed stops it when it is finalised.
    The reader holds nothing of the run, so dropping the run is what frees it.
    """

    def __init__(self, engine: OpenAITTS, text: str, voice: str, sample_rate: int) -> None:
        self._engine = engine
        self._text = text
        self._voice = voice
        self._rate = sample_rate
        self._cancelled = False
        self._done = False
        # One chunk ahead at most: the server is held while the consumer is slow.
        self._chunks: asyncio.Queue[AudioChunk | Exception | None] = asyncio.Queue(1)
        self._reader: asyncio.Task[None] | None = None

    def __aiter__(self) -> Self:
        return self

    def __del__(self) -> None:
        reader = self._reader
        if reader is not None and not reader.done():
            with contextlib.suppress(RuntimeError):  # its loop is closed: nothing runs it
                reader.cancel()

    def cancel(self) -> None:
        """Stop: nothing more is yielded and the HTTP response is closed."""
        self._cancelled = True
        if self._reader is not None:
            self._reader.cancel()

    async def aclose(self) -> None:
        """Stop and close the HTTP response now (safe to call more than once)."""
        self.cancel()
        if self._reader is not None:
            await asyncio.wait([self._reader])

    async def __anext__(self) -> AudioChunk:
        if not (self._cancelled or self._done):
            if self._reader is None:
                self._reader = self._engine._read(
                    _read_speech(self._engine, self._text, self._voice, self._rate, self._chunks)
                )
            item = await self._chunks.get()
            if item is None or isinstance(item, Exception):
                self._done = True
                if item is not None:
                    raise item
            elif not self._cancelled:
                return item
        await self.aclose()
        raise StopAsyncIteration


async def _read_speech(
    engine: OpenAITTS,
    text: str,
    voice: str,
    rate: int,
    out: asyncio.Queue[AudioChunk | Exception | None],
) -> None:
    """Read one ``/audio/speech`` answer into ``out``: its chunks at ``rate``, then
    ``None``, or the error it ended with (raised to the consumer: an
    :class:`EndpointError`, a :class:`URLPolicyError`)."""
    try:
        async with contextlib.aclosing(_speech_chunks(engine, text, voice, rate)) as chunks:
            async for chunk in chunks:
                await out.put(chunk)
    except Exception as exc:
        await out.put(exc)
        return
    await out.put(None)


async def _speech_chunks(
    engine: OpenAITTS, text: str, voice: str, rate: int
) -> AsyncGenerator[AudioChunk, None]:
    if not text.strip():
        return
    client = engine._client
    await client.ensure_pinned()
    body = {
        "model": engine._model,
        "input": text,
        "voice": voice,
        "response_format": "pcm",
    }
    resampler: Resampler | None = None

    def play(pcm: bytes, pcm_rate: int | None) -> bytes:
        nonlocal resampler
        if not pcm or pcm_rate is None:
            return b""
        if resampler is None:
            resampler = Resampler(pcm_rate, rate)
        return resampler.process(pcm)

    async with (
        map_http_errors("the speech server", before_response=False, http=client),
        client.http.stream("POST", f"{client.url.url}/audio/speech", json=body) as response,
    ):
        await _raise_for_status(response, engine._api_key)
        speech = SpeechBody(response.headers.get("content-type", ""), engine._pcm_rate)
        pieces = cast("AsyncGenerator[bytes, None]", response.aiter_bytes())
        async with contextlib.aclosing(pieces):
            async for data in pieces:
                out = play(speech.feed(data), speech.rate)
                if out:
                    yield AudioChunk(pcm=out, sample_rate=rate, text=text)
        rest, rest_rate = speech.finish()
    out = play(rest, rest_rate)
    if resampler is not None:
        out += resampler.flush()
    if out:
        yield AudioChunk(pcm=out, sample_rate=rate, text=text)

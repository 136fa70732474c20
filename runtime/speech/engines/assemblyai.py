"""AssemblyAI Universal-Streaming STT (WebSocket API v3).

Theory of operation
-------------------
``wss://streaming.assemblyai.com/v3/ws?sample_rate=…&encoding=pcm_s16le&
speech_model=…&format_turns=true`` with ``Authorization: <api key>``. The
server sends ``Begin``, then ``Turn`` messages (``transcript`` is the running
text of the turn; ``end_of_turn`` marks the final one; ``turn_is_formatted``
when punctuation/casing were applied), and ``Termination`` after the client's
``Terminate``. Audio goes up as binary frames of raw PCM (~50 ms each).

:func:`parse_server_message` is the pure protocol core (dict in, typed event
out, :class:`~runtime.errors.MalformedStream` for anything else). A turn
(:class:`AssemblyAITurn`) opens a session when it starts, streams frames as
they come, and on :meth:`~AssemblyAITurn.finalize` sends ``ForceEndpoint``
and ``Terminate`` and collects every end-of-turn transcript (the formatted
ones when formatting is on) until ``Termination``: the service handles
messages in order, so ``Termination`` comes after the forced end of turn,
and turns the server ended on its own while the user went on (its
endpointing) are kept, in order, however late their messages arrive.
Partial ``Turn`` messages (``end_of_turn: false``) only update
:attr:`~AssemblyAITurn.partial`.

Failures: a handshake the service refuses (HTTP 401/403: the key) is an
:class:`~runtime.errors.EndpointAuthError` quoting the service's message; an
``Error`` message (sent just before the service closes the socket) and a
close with an error code become typed errors (auth codes: 1008, 3005, 4001)
quoting the service's text. Everything quoted has the key redacted, since
the service may echo what it was given. The URL goes through the URL policy
and the connection is pinned to the checked address like every other
endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlencode

import websockets
from websockets.asyncio.client import ClientConnection, connect

from audio.frame import AudioFrame, check_pcm, check_rate
from runtime.endpoints import (
    Resolver,
    SystemResolver,
    URLPolicy,
    connection_failure,
    parse_endpoint_url,
    resolve_endpoint,
    ssl_cause,
    tls_verify,
)
from runtime.errors import (
    EndpointAuthError,
    EndpointConnectError,
    EndpointError,
    EndpointTimeout,
    MalformedStream,
    StreamDropped,
)
from runtime.llm.client import _error_detail
from runtime.secret import Secret
from runtime.speech.stt import Transcript

DEFAULT_HOST: Final = "https://streaming.assemblyai.com"
_AUTH_CODES: Final = frozenset({1008, 3005, 4001})
CHUNK_MS: Final = 50


@dataclass(frozen=True, slots=True, kw_only=True)
class Begin:
    id: str
    expires_at: Any = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Turn:
    turn_order: int
    transcript: str
    end_of_turn: bool
    turn_is_formatted: bool
    end_of_turn_confidence: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Termination:
    audio_duration_seconds: float | None = None
    session_duration_seconds: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerError:
    error: str
    error_code: int | None = None


ServerEvent = Begin | Turn | Termination | ServerError | None


def parse_server_message(message: str | bytes) -> ServerEvent:
    """Decode one server message. Unknown message types (``SpeechStarted``, …) give ``None``.

    Raises:
        MalformedStream: not JSON, or a known type without its required fields.
    """
    try:
        doc = json.loads(message)
    except ValueError:
        raise MalformedStream(
            "streaming STT sent a message that is not JSON", retryable=False
        ) from None
    if not isinstance(doc, dict):
        raise MalformedStream("streaming STT sent a message that is not an object", retryable=False)
    kind = doc.get("type")
    try:
        if kind == "Begin":
            return Begin(id=str(doc["id"]), expires_at=doc.get("expires_at"))
        if kind == "Turn":
            transcript = doc["transcript"]
            if not isinstance(transcript, str):
                raise TypeError
            return Turn(
                turn_order=int(doc["turn_order"]),
                transcript=transcript,
                end_of_turn=bool(doc["end_of_turn"]),
                turn_is_formatted=bool(doc.get("turn_is_formatted", False)),
                end_of_turn_confidence=float(doc.get("end_of_turn_confidence") or 0.0),
            )
        if kind == "Termination":
            return Termination(
                audio_duration_seconds=doc.get("audio_duration_seconds"),
                session_duration_seconds=doc.get("session_duration_seconds"),
            )
        if kind == "Error" or ("error" in doc and kind is None):
            return ServerError(error=str(doc.get("error")), error_code=doc.get("error_code"))
    except (KeyError, TypeError, ValueError):
        raise MalformedStream(
            f"streaming STT sent a malformed {kind} message", retryable=False
        ) from None
    return None


class AssemblyAIStreamingSTT:
    """AssemblyAI Universal-Streaming as a :class:`~runtime.speech.stt.SpeechToText`.

    Args:
        api_key: the AssemblyAI key (sent as ``Authorization``; never logged).
        host: ``https://streaming.assemblyai.com`` (or the EU host); ``wss``
            is used for ``https`` hosts and ``ws`` for ``http`` ones (tests).
        speech_model: e.g. ``universal-streaming-english``.
        format_turns: ask for punctuated, formatted final transcripts.
        policy, resolver: URL policy and resolver, as for every endpoint.
        timeout_s: connect and final-transcript deadline.
    """

    def __init__(
        self,
        api_key: Secret,
        *,
        host: str = DEFAULT_HOST,
        speech_model: str = "universal-streaming-english",
        format_turns: bool = True,
        policy: URLPolicy | None = None,
        resolver: Resolver | None = None,
        timeout_s: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        extra_params: Mapping[str, str] | None = None,
    ) -> None:
        self._policy = policy or URLPolicy()
        self._url = parse_endpoint_url(host, self._policy)
        self._resolver = resolver or SystemResolver()
        self._key = api_key
        self._model = speech_model
        self._format = format_turns
        self._timeout = timeout_s
        self._ssl = ssl_context
        self._extra = dict(extra_params or {})

    @property
    def name(self) -> str:
        return "assemblyai"

    async def aclose(self) -> None:
        return None

    async def _connect(self, sample_rate: int) -> ClientConnection:
        pinned = await resolve_endpoint(self._url, self._policy, self._resolver)
        params = {
            "sample_rate": str(sample_rate),
            "encoding": "pcm_s16le",
            "speech_model": self._model,
            "format_turns": "true" if self._format else "false",
            **self._extra,
        }
        scheme = "wss" if self._url.scheme == "https" else "ws"
        authority = f"[{self._url.host}]" if ":" in self._url.host else self._url.host
        uri = f"{scheme}://{authority}:{self._url.port}{self._url.path}/v3/ws?{urlencode(params)}"
        kwargs: dict[str, Any] = {
            # Connect to the checked address; TLS and Host stay the name.
            "host": str(pinned.addresses[0]),
            "port": self._url.port,
            "additional_headers": {"Authorization": self._key.reveal()},
            "open_timeout": self._timeout,
            "max_size": 1 << 20,
            "proxy": None,
        }
        if scheme == "wss":
            kwargs["ssl"] = self._ssl or _default_ssl()
            kwargs["server_hostname"] = self._url.host
        try:
            return await connect(uri, **kwargs)
        except websockets.InvalidStatus as exc:
            status = exc.response.status_code
            detail = _error_detail(bytes(exc.response.body or b""), self._key)
            suffix = f": {detail}" if detail else ""
            if status in (401, 403):
                raise EndpointAuthError(
                    f"streaming STT refused the credentials (HTTP {status}){suffix}",
                    retryable=False, status_code=status,
                ) from None  # fmt: skip
            raise EndpointConnectError(
                f"streaming STT refused the connection (HTTP {status}){suffix}",
                retryable=status >= 500, status_code=status,
            ) from None  # fmt: skip
        except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
            raise EndpointConnectError(
                f"could not connect to the streaming STT: {_connect_words(exc)}", retryable=True
            ) from None

    def start_turn(self, sample_rate: int = 16000) -> AssemblyAITurn:
        return AssemblyAITurn(self, check_rate(sample_rate))

    async def transcribe(self, pcm: bytes, sample_rate: int) -> Transcript:
        """Stream a whole buffer through one session and return its text.

        Raises:
            ValueError: bad PCM or rate.
            EndpointError: connection, authentication or protocol failure.
        """
        pcm = check_pcm(pcm)
        turn = self.start_turn(sample_rate)
        try:
            await turn.open()
            step = sample_rate * CHUNK_MS // 1000 * 2
            for i in range(0, len(pcm), step):
                turn.push(AudioFrame(pcm=pcm[i : i + step], sample_rate=sample_rate))
            return await turn.finalize()
        finally:
            await turn.aclose()


class AssemblyAITurn:
    """One streaming session used for one user turn."""

    def __init__(self, engine: AssemblyAIStreamingSTT, sample_rate: int) -> None:
        self._engine = engine
        self._rate = sample_rate
        self._ws: ClientConnection | None = None
        self._opening: asyncio.Task[None] | None = None
        # Audio goes as binary frames, control messages as text frames.
        self._outbox: asyncio.Queue[bytes | str | None] = asyncio.Queue(maxsize=200)
        self._finals: list[str] = []
        self._latest = ""
        self._terminated = asyncio.Event()
        self._error: EndpointError | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._audio_bytes = 0
        self._terminate_sent = False
        self._closed = False

    async def open(self) -> None:
        """Connect now (otherwise the first :meth:`push` connects in the background)."""
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
        await asyncio.shield(self._opening)

    async def _open(self) -> None:
        self._ws = await self._engine._connect(self._rate)
        self._tasks = [
            asyncio.ensure_future(self._reader(self._ws)),
            asyncio.ensure_future(self._writer(self._ws)),
        ]

    async def _reader(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                event = parse_server_message(message)
                if isinstance(event, Turn):
                    self._latest = event.transcript
                    formatted_ok = event.turn_is_formatted or not self._engine._format
                    if event.end_of_turn and formatted_ok:
                        if event.transcript.strip():
                            self._finals.append(event.transcript.strip())
                        self._latest = ""
                elif isinstance(event, Termination):
                    self._terminated.set()
                elif isinstance(event, ServerError):
                    code = f" (code {event.error_code})" if event.error_code is not None else ""
                    self._error = self._typed(
                        event.error_code, f"streaming STT reported an error{code}: {event.error}"
                    )
                    break
        except MalformedStream as exc:
            self._error = exc
        except websockets.ConnectionClosed:
            pass
        finally:
            if ws.close_code not in (None, 1000) and self._error is None:
                reason = ws.close_reason or ""
                self._error = self._typed(
                    ws.close_code,
                    f"streaming STT closed the session ({ws.close_code} {reason}".strip() + ")",
                )
            self._terminated.set()

    def _typed(self, code: int | None, message: str) -> EndpointError:
        message = self._engine._key.redact(" ".join(message.split()))[:240]
        if code in _AUTH_CODES:
            return EndpointAuthError(message, retryable=False)
        return StreamDropped(message, retryable=False)

    async def _writer(self, ws: ClientConnection) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                item = await self._outbox.get()
                if item is None:
                    return
                await ws.send(item)

    @property
    def partial(self) -> Transcript | None:
        text = " ".join([*self._finals, self._latest]).strip()
        return Transcript(text=text, final=False) if text else None

    def push(self, frame: AudioFrame) -> None:
        if self._closed:
            raise RuntimeError("push() on a closed turn")
        if frame.sample_rate != self._rate:
            raise ValueError(f"turn expects {self._rate} Hz audio, got {frame.sample_rate} Hz")
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
        self._audio_bytes += len(frame.pcm)
        if self._outbox.full():
            # Backlog while connecting: keep the newest audio (drop-oldest).
            self._outbox.get_nowait()
        self._outbox.put_nowait(frame.pcm)

    def pause(self) -> None:
        """Endpointing is the server's own; nothing to start early."""

    def resume(self) -> None:
        return None

    async def finalize(self) -> Transcript:
        if self._closed:
            raise RuntimeError("finalize() on a closed turn")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            async with asyncio.timeout(self._engine._timeout):
                await self.open()
                if self._error is None:
                    await self._outbox.put(json.dumps({"type": "ForceEndpoint"}))
                    await self._outbox.put(json.dumps({"type": "Terminate"}))
                    self._terminate_sent = True
                    await self._terminated.wait()
        except TimeoutError:
            raise EndpointTimeout("no final transcript from the streaming STT in time",
                                  retryable=False) from None  # fmt: skip
        if self._error is not None:
            raise self._error
        self._closed = True
        return Transcript(
            text=" ".join(self._finals).strip(),
            audio_ms=self._audio_bytes / 2 / self._rate * 1000,
            decode_ms=(loop.time() - t0) * 1000,
        )

    async def aclose(self) -> None:
        """Send ``Terminate``, wait briefly for ``Termination``, close."""
        self._closed = True
        if self._opening is None:
            return
        with contextlib.suppress(EndpointError, asyncio.CancelledError):
            await self._opening
        ws = self._ws
        if ws is None:
            return
        with contextlib.suppress(websockets.ConnectionClosed, TimeoutError):
            async with asyncio.timeout(2.0):
                if not self._terminate_sent:
                    await self._outbox.put(json.dumps({"type": "Terminate"}))
                await self._outbox.put(None)
                await self._terminated.wait()
        await ws.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _default_ssl() -> ssl.SSLContext:
    """The system roots, plus ``VOXLOOP_CA_BUNDLE`` if set."""
    verify = tls_verify()
    return verify if isinstance(verify, ssl.SSLContext) else ssl.create_default_context()


def _connect_words(exc: BaseException) -> str:
    """Why a connection to the streaming STT failed, in words (no library class names)."""
    if isinstance(exc, websockets.InvalidHandshake) and ssl_cause(exc) is None:
        return "it did not answer the upgrade request with a WebSocket handshake"
    return connection_failure(exc)

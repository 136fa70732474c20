"""The session runner: one place that turns a configured session into a running conversation.

Theory of operation
-------------------
Network adapters (the Voice Agent WebSocket, the telephony bridge, the browser
page) own a socket each and nothing else. They hand the runner a
:class:`~runtime.protocol.events.SessionPatch` (or a resume request) and a
callback for outgoing protocol events, and get back a :class:`LiveSession`.

:class:`SessionRunner` (one per worker process):

* binds a session to a stored agent (``agent_id``, the only key) or to an
  inline configuration and merges in the server's default endpoint
  (``VOXLOOP_LLM_*``) when neither names an ``llm``;
* decrypts the endpoint key only in memory, as a :class:`~runtime.secret.Secret`;
* checks the endpoint URL again with the URL policy (resolved, every address
  checked, connections pinned to the checked addresses);
* enforces the limits: sessions per worker (``at_capacity``), session
  duration (``session_expired``);
* keeps a dropped session's state (configuration with its secrets sealed,
  history, clocks) in a :class:`SessionStateStore` for the resume grace
  period, so ``session.resume`` continues the conversation.

:class:`LiveSession` owns one :class:`~runtime.conversation.session.ConversationSession`
and every task of the session in one ``TaskGroup``:

* audio in: wire bytes → decoded and resampled once to 16 kHz → 20 ms frames
  in a bounded buffer (drop-oldest, ``audio_rate_violation`` when a client
  sends faster than real time) → released to the core in real time; when a
  client stops sending, silence keeps the timeline moving so a turn still ends;
* audio out: the core writes to a :class:`PacedSink` that admits audio only a
  small bounded lead (300 ms by default) ahead of real time; its position is
  the playout truth for what the listener heard. Audio is produced at the
  output encoding's rate and encoded once (μ-law in → μ-law out is not
  transcoded twice);
* core events → protocol events, including the split of a reply around a
  client tool call (``transcript.agent`` → ``tool.call`` → ``reply.done``, and
  a new ``reply.started`` when the answer continues after ``tool.result``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import hmac
import itertools
import json
import logging
import secrets as pysecrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from audio.frame import AudioFrame, check_rate
from audio.g711 import alaw_decode, alaw_encode, ulaw_decode, ulaw_encode
from audio.reframe import Reframer
from audio.resample import Resampler
from runtime.conversation import events as core
from runtime.conversation.config import SessionConfig, TurnDetection
from runtime.conversation.session import RATE, ConversationSession
from runtime.conversation.tools import ClientTool, HttpTool, Tool
from runtime.endpoints import Resolver, URLPolicy, check_endpoint_url
from runtime.errors import URLPolicyError
from runtime.llm.client import ChatClient, Endpoint
from runtime.protocol import events as ev
from runtime.secret import Secret
from runtime.speech.stt import SpeechToText
from runtime.speech.tts import TextToSpeech

log = logging.getLogger("voxloop.session")

FRAME_MS: Final = 20
RESUME_GRACE_S: Final = 30.0


class SessionRefused(Exception):
    """A session cannot be bound, resumed or continued.

    Attributes:
        code: the protocol error code; ``fatal`` codes end the connection.
        param: the offending field, when there is one.
    """

    def __init__(self, code: ev.ErrorCode, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.code: ev.ErrorCode = code
        self.message = message
        self.param = param

    @property
    def fatal(self) -> bool:
        return self.code in ev.FATAL_CODES


# -- limits and identities --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunnerLimits:
    """Per-worker limits (environment: ``VOXLOOP_MAX_SESSIONS`` …; see the README).

    Attributes:
        max_sessions: live sessions per worker process.
        max_duration_s: session length when the credential sets none.
        resume_grace_s: how long a dropped session stays resumable.
        output_lead_ms: how far ``reply.audio`` may run ahead of real time.
        output_buffer_ms: how far synthesised audio may queue ahead of real time on
            the server (unsent; dropped on an interruption).
        input_buffer_ms: client audio held ahead of real time before dropping.
        outbound_messages: server events queued for a client before it is dropped.
        ready_timeout_s: time for the first message after the upgrade.
    """

    max_sessions: int = 16
    max_duration_s: int = 10_800
    resume_grace_s: float = RESUME_GRACE_S
    output_lead_ms: int = 300
    output_buffer_ms: int = 300
    input_buffer_ms: int = 2000
    outbound_messages: int = 512
    ready_timeout_s: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RunnerLimits:
        """Read ``VOXLOOP_MAX_SESSIONS``, ``VOXLOOP_MAX_SESSION_SECONDS``,
        ``VOXLOOP_AUDIO_LEAD_MS``, ``VOXLOOP_AUDIO_BUFFER_MS``, ``VOXLOOP_INPUT_BUFFER_MS``,
        ``VOXLOOP_OUTBOUND_MESSAGES``.

        Raises:
            ValueError: a value is not a positive integer.
        """

        def number(name: str, default: int) -> int:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            if not raw.isdigit() or int(raw) <= 0:
                raise ValueError(f"{name} must be a positive integer")
            return int(raw)

        d = cls()
        return cls(
            max_sessions=number("VOXLOOP_MAX_SESSIONS", d.max_sessions),
            max_duration_s=number("VOXLOOP_MAX_SESSION_SECONDS", d.max_duration_s),
            output_lead_ms=number("VOXLOOP_AUDIO_LEAD_MS", d.output_lead_ms),
            output_buffer_ms=number("VOXLOOP_AUDIO_BUFFER_MS", d.output_buffer_ms),
            input_buffer_ms=number("VOXLOOP_INPUT_BUFFER_MS", d.input_buffer_ms),
            outbound_messages=number("VOXLOOP_OUTBOUND_MESSAGES", d.outbound_messages),
        )


@dataclass(frozen=True, slots=True)
class Principal:
    """Who opened the connection.

    Attributes:
        kind: ``key`` (an API key), ``token`` (a single-use token), ``resume``
            (a resume token: only ``session.resume`` is allowed).
        owner: a stable, non-secret id of the credential's owner.
        max_duration_s: the session cap the credential carries (``None``: the default).
        resume_token: the presented resume token (``kind == "resume"``).
    """

    kind: Literal["key", "token", "resume"]
    owner: str
    max_duration_s: int | None = None
    resume_token: Secret | None = None


def key_owner(api_key: str) -> str:
    """A non-secret id for an API key (for ownership checks; never the key)."""
    return "key:" + hashlib.sha256(b"voxloop-owner\0" + api_key.encode()).hexdigest()[:24]


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# -- the effective configuration ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionSpec:
    """A bound session's effective configuration (secrets held as :class:`Secret`)."""

    system_prompt: str = ""
    greeting: str | None = None
    voice: str | None = None
    tools: tuple[ev.ToolSpec, ...] = ()
    input_format: ev.AudioFormat = field(default_factory=ev.AudioFormat)
    output_format: ev.AudioFormat = field(default_factory=ev.AudioFormat)
    volume: float = 100.0
    keyterms: tuple[str, ...] = ()
    turn_detection: TurnDetection = field(default_factory=TurnDetection)
    llm: ev.LLMSpec | None = None
    agent_id: str | None = None

    def public(self) -> dict[str, Any]:
        """The configuration as ``session.ready``/``session.updated`` report it (no secrets)."""
        td = self.turn_detection
        return {
            **({"agent_id": self.agent_id} if self.agent_id else {}),
            "system_prompt": self.system_prompt,
            "greeting": self.greeting,
            "tools": [t.to_json() for t in self.tools],
            "input": {
                "format": self.input_format.to_json(),
                "keyterms": list(self.keyterms),
                "turn_detection": {
                    "vad_threshold": td.vad_threshold,
                    "min_silence": td.min_silence_ms,
                    "max_silence": td.max_silence_ms,
                    "interrupt_response": td.interrupt_response,
                },
            },
            "output": {
                "voice": self.voice,
                "format": self.output_format.to_json(),
                "volume": self.volume,
            },
            "llm": [{"base_url": self.llm.base_url, "model": self.llm.model}] if self.llm else [],
        }

    def core_config(self) -> SessionConfig:
        return SessionConfig(
            system_prompt=self.system_prompt,
            greeting=self.greeting,
            voice=self.voice,
            tools=tuple(_core_tool(t) for t in self.tools),
            turn_detection=self.turn_detection,
        )

    def apply(self, patch: ev.SessionPatch) -> SessionSpec:
        """This configuration with a ``session.update`` applied.

        Raises:
            SessionRefused: ``invalid_config`` for turn-detection values that
                do not fit together.
        """
        spec = self
        if patch.system_prompt is not None:
            spec = dataclasses.replace(spec, system_prompt=patch.system_prompt)
        if "greeting" in patch.keys:
            spec = dataclasses.replace(spec, greeting=patch.greeting or None)
        if patch.tools is not None:
            spec = dataclasses.replace(spec, tools=patch.tools)
        if patch.llm is not None:
            spec = dataclasses.replace(spec, llm=patch.llm[0] if patch.llm else None)
        if patch.input is not None:
            if patch.input.format is not None:
                spec = dataclasses.replace(spec, input_format=patch.input.format)
            if patch.input.keyterms is not None:
                spec = dataclasses.replace(spec, keyterms=patch.input.keyterms)
            if patch.input.turn_detection is not None:
                spec = dataclasses.replace(
                    spec, turn_detection=_turn_detection(spec.turn_detection,
                                                         patch.input.turn_detection)
                )  # fmt: skip
        if patch.output is not None:
            out = patch.output
            if out.voice is not None:
                spec = dataclasses.replace(spec, voice=out.voice)
            if out.format is not None:
                spec = dataclasses.replace(spec, output_format=out.format)
            if out.volume is not None:
                spec = dataclasses.replace(spec, volume=out.volume)
        return spec

    def immutable_change(self, patch: ev.SessionPatch) -> str | None:
        """The first field a later update may not change, if it changes one."""
        if "greeting" in patch.keys and (patch.greeting or None) != self.greeting:
            return "session.greeting"
        if patch.output is not None:
            if patch.output.voice is not None and patch.output.voice != self.voice:
                return "session.output.voice"
            if patch.output.format is not None and patch.output.format != self.output_format:
                return "session.output.format"
        return None


def _turn_detection(base: TurnDetection, patch: ev.TurnDetectionPatch) -> TurnDetection:
    min_silence = patch.min_silence if patch.min_silence is not None else base.min_silence_ms
    max_silence = patch.max_silence if patch.max_silence is not None else base.max_silence_ms
    if patch.min_silence is not None and patch.max_silence is None:
        max_silence = max(max_silence, min_silence)
    if min_silence > max_silence:
        raise SessionRefused(
            "invalid_config", "min_silence must not exceed max_silence",
            param="session.input.turn_detection.min_silence",
        )  # fmt: skip
    return dataclasses.replace(
        base,
        vad_threshold=(
            patch.vad_threshold if patch.vad_threshold is not None else base.vad_threshold
        ),
        min_silence_ms=min_silence,
        max_silence_ms=max_silence,
        pause_ms=min(base.pause_ms, min_silence),
        interrupt_response=(
            patch.interrupt_response
            if patch.interrupt_response is not None
            else base.interrupt_response
        ),
    )


def _core_tool(tool: ev.ToolSpec) -> Tool:
    if tool.http is None:
        return ClientTool(
            name=tool.name, description=tool.description, parameters=tool.parameters,
            timeout_s=tool.timeout_seconds,
        )  # fmt: skip
    return HttpTool(
        name=tool.name, url=tool.http.url, description=tool.description,
        parameters=tool.parameters, method=tool.http.method, headers=tool.http.headers,
        timeout_s=tool.timeout_seconds,
    )  # fmt: skip


# -- resumable state -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResumableState:
    """What a dropped session needs to continue (JSON-serialisable; secrets sealed).

    Attributes:
        spec: :meth:`SessionSpec.public` plus sealed secrets (``llm_key``, ``tool_headers``).
        history: the messages of the conversation so far.
        started_at, expires_at: wall-clock seconds.
    """

    session_id: str
    owner: str
    resume_token_hash: str
    spec: dict[str, Any]
    history: list[dict[str, Any]]
    started_at: float
    expires_at: float
    audio_seconds: float


class SessionStateStore(Protocol):
    """Where dropped sessions wait for a resume (memory here; Redis for several workers)."""

    async def save(self, state: ResumableState, ttl_s: float) -> None:
        """Keep ``state`` for ``ttl_s`` seconds."""

    async def take(self, session_id: str) -> ResumableState | None:
        """Remove and return the state, or ``None`` if unknown or expired (atomic)."""

    async def discard(self, session_id: str) -> None:
        """Forget a session (ended for good)."""


class MemorySessionStore:
    """:class:`SessionStateStore` in this process's memory (one worker)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._states: dict[str, tuple[float, ResumableState]] = {}

    def _expire(self) -> None:
        now = self._clock()
        for sid in [s for s, (deadline, _) in self._states.items() if deadline <= now]:
            del self._states[sid]

    async def save(self, state: ResumableState, ttl_s: float) -> None:
        self._expire()
        self._states[state.session_id] = (self._clock() + ttl_s, state)

    async def take(self, session_id: str) -> ResumableState | None:
        self._expire()
        entry = self._states.pop(session_id, None)
        return None if entry is None else entry[1]

    async def discard(self, session_id: str) -> None:
        self._states.pop(session_id, None)

    def __len__(self) -> int:
        self._expire()
        return len(self._states)


# -- engines ---------------------------------------------------------------------------------


class Engines:
    """The worker's speech engines, loaded once on first use and shared by its sessions."""

    def __init__(self, stt: str = "whisper", tts: str = "piper") -> None:
        self._names = (stt, tts)
        self._lock = asyncio.Lock()
        self._loaded: tuple[SpeechToText, TextToSpeech] | None = None

    async def get(self) -> tuple[SpeechToText, TextToSpeech]:
        """The (STT, TTS) pair.

        Raises:
            ModelVerificationError, ValueError: an engine cannot be loaded.
        """
        async with self._lock:
            if self._loaded is None:
                from runtime.speech.engines.registry import load_stt, load_tts

                stt = await load_stt(self._names[0])
                tts = await load_tts(self._names[1])
                self._loaded = (stt, tts)
            return self._loaded

    async def aclose(self) -> None:
        if self._loaded is not None:
            stt, tts = self._loaded
            self._loaded = None
            await stt.aclose()
            await tts.aclose()


# -- audio at the edge -----------------------------------------------------------------------


class PacedSink:
    """The session's speaker: accepts audio like a device and sends it paced to real time.

    :meth:`write` queues audio on a virtual playout timeline, waiting while
    more than ``buffer_ms`` is queued (so the TTS can work ahead of playback
    and a slow sentence does not leave the listener in silence). :meth:`run`
    sends it in ``piece_ms`` pieces, each when its playout time is at most
    ``lead_ms`` away, so a listener never holds more than ``lead_ms`` of
    unplayed audio, and the playout position (``played_samples``, the loop
    clock against the timeline) is what was heard. :meth:`clear_buffer`
    drops what was not played; pieces not yet sent are never sent.

    Args:
        sample_rate: the output encoding's rate (audio is produced at it).
        lead_ms: how far ahead of real time audio is sent.
        on_audio: receives each piece (PCM16 at ``sample_rate``) and the tag
            that was current when it was written.
        tag: called at each :meth:`write` (which reply the audio belongs to).
        piece_ms: the size of the pieces sent.
        buffer_ms: how far ahead of real time audio is accepted (>= ``lead_ms``).
    """

    def __init__(
        self,
        sample_rate: int,
        lead_ms: int,
        on_audio: Callable[[bytes, Any], None],
        tag: Callable[[], Any] = lambda: None,
        piece_ms: int = 40,
        buffer_ms: int = 0,
    ) -> None:
        self._rate = check_rate(sample_rate)
        self._lead = sample_rate * lead_ms // 1000
        self._buffer = sample_rate * max(buffer_ms, lead_ms) // 1000
        self._piece = sample_rate * piece_ms // 1000 * 2
        self._on_audio = on_audio
        self._tag = tag
        self._t0 = asyncio.get_running_loop().time()
        self._end = 0
        self._written = 0
        # (timeline position in samples, pcm, tag) not sent yet; bounded by the
        # write-side wait (buffer + one chunk).
        self._pending: collections.deque[tuple[int, bytes, Any]] = collections.deque()
        self._wake = asyncio.Event()

    @property
    def sample_rate(self) -> int:
        return self._rate

    def _now(self) -> int:
        return int((asyncio.get_running_loop().time() - self._t0) * self._rate)

    @property
    def queued_samples(self) -> int:
        """Samples written that the listener has not heard yet."""
        return max(0, self._end - self._now())

    @property
    def played_samples(self) -> int:
        return self._written - self.queued_samples

    async def write(self, pcm: bytes) -> None:
        # A timer, not polling: sleep exactly until the queue is back under its bound.
        while (ahead := self._end - self._now()) > self._buffer:  # noqa: ASYNC110
            await asyncio.sleep((ahead - self._buffer) / self._rate)
        tag = self._tag()
        pos = max(self._end, self._now())
        for i in range(0, len(pcm), self._piece):
            piece = pcm[i : i + self._piece]
            self._pending.append((pos, piece, tag))
            pos += len(piece) // 2
        self._end = pos
        self._written += len(pcm) // 2
        self._wake.set()

    def clear_buffer(self) -> int:
        dropped = self.queued_samples
        self._written -= dropped
        if dropped:
            self._end = self._now()
        self._pending.clear()
        return dropped

    async def wait_for_playout(self) -> None:
        while (remaining := self._end - self._now()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(remaining / self._rate)

    async def run(self) -> None:
        """Send the queued audio in real time, forever (cancel to stop)."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            pos, piece, tag = self._pending[0]
            send_at = self._t0 + (pos - self._lead) / self._rate
            if send_at > loop.time():
                await asyncio.sleep(send_at - loop.time())
                continue  # cleared meanwhile?
            self._pending.popleft()
            self._on_audio(piece, tag)


class AudioIngress:
    """Client audio → 16 kHz 20 ms frames, bounded and released in real time.

    Args:
        fmt: the input encoding.
        capacity_ms: audio held ahead of real time; beyond it the oldest is dropped.
    """

    def __init__(self, fmt: ev.AudioFormat, capacity_ms: int) -> None:
        self._frames: collections.deque[AudioFrame] = collections.deque(
            maxlen=max(1, capacity_ms // FRAME_MS)
        )
        self._arrived = asyncio.Event()
        self.dropped_frames = 0
        self.received_samples = 0
        self._pts = 0
        self.set_format(fmt)

    def set_format(self, fmt: ev.AudioFormat) -> None:
        self._format = fmt
        self._carry = b""
        self._resampler = Resampler(fmt.sample_rate, RATE)
        self._reframer = Reframer(RATE, FRAME_MS)

    @property
    def received_seconds(self) -> float:
        return self.received_samples / self._format.sample_rate

    def feed(self, data: bytes) -> int:
        """Decode and queue one ``input.audio`` payload; returns frames dropped (0: fine)."""
        if self._format.encoding == "audio/pcmu":
            pcm = ulaw_decode(data)
        elif self._format.encoding == "audio/pcma":
            pcm = alaw_decode(data)
        else:
            # A sample may straddle two messages: keep the odd byte for the next one.
            data = self._carry + data
            cut = len(data) - len(data) % 2
            pcm, self._carry = data[:cut], data[cut:]
        self.received_samples += len(pcm) // 2
        dropped = 0
        for frame in self._reframer.process(self._resampler.process(pcm)):
            if len(self._frames) == self._frames.maxlen:
                dropped += 1
            self._frames.append(frame)
        self.dropped_frames += dropped
        self._arrived.set()
        return dropped

    async def frames(self) -> AsyncIterator[AudioFrame]:
        """Frames in real time; silence fills in when the client falls silent."""
        loop = asyncio.get_running_loop()
        step = FRAME_MS / 1000
        due: float | None = None
        silent = bytes(RATE * FRAME_MS // 1000 * 2)
        while True:
            now = loop.time()
            if self._frames:
                frame = self._frames.popleft()
                if due is None or due < now - 0.2:
                    due = now  # first audio, or the client fell behind: re-anchor
                if due > now:
                    await asyncio.sleep(due - now)
                due += step
                self._pts = frame.end_pts
                yield frame
                continue
            self._arrived.clear()
            if due is None:
                await self._arrived.wait()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, due + 0.2 - now)):
                    await self._arrived.wait()
                    continue
            # Nothing arrived for 200 ms past due: the line is silent.
            frame = AudioFrame(pcm=silent, sample_rate=RATE, pts=self._pts)
            self._pts = frame.end_pts
            due = loop.time() + step
            yield frame


def _encoder(fmt: ev.AudioFormat, volume: float) -> Callable[[bytes], bytes]:
    import numpy as np

    gain = max(0.0, min(100.0, volume)) / 100.0

    def scale(pcm: bytes) -> bytes:
        if gain >= 1.0:
            return pcm
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) * gain
        return bytes(samples.round().astype("<i2").tobytes())

    if fmt.encoding == "audio/pcmu":
        return lambda pcm: ulaw_encode(scale(pcm))
    if fmt.encoding == "audio/pcma":
        return lambda pcm: alaw_encode(scale(pcm))
    return scale


# -- the live session -------------------------------------------------------------------------

Emit = Callable[[ev.ServerEvent], None]
EndReason = Literal["ended", "expired", "dropped"]


@dataclass(slots=True)
class _ProtoReply:
    """The protocol's view of one core reply (split in two around a client tool call)."""

    core_id: str
    reply_id: str
    item_id: str
    samples: int = 0  # written to the sink (the timeline of the deltas)
    sent: int = 0  # sent to the client
    delta_end_ms: int = 0
    texts: list[str] = field(default_factory=list)
    closed: bool = False  # reply.done sent for this part (a tool call is pending)
    spoken_before: list[str] = field(default_factory=list)


class LiveSession:
    """One running conversation. Create with :meth:`SessionRunner.start`.

    Call :meth:`run` in a task; feed client events with :meth:`handle`;
    end it with :meth:`end` (``session.end``) or by cancelling :meth:`run`
    (a dropped socket: the state is kept for a resume).
    """

    def __init__(
        self,
        runner: SessionRunner,
        *,
        session_id: str,
        spec: SessionSpec,
        owner: str,
        started_at: float,
        expires_at: float,
        history: list[dict[str, Any]] | None,
        audio_seconds: float,
        emit: Emit,
    ) -> None:
        self.runner = runner
        self.session_id = session_id
        self.spec = spec
        self.owner = owner
        self.started_at = started_at
        self.expires_at = expires_at
        self._prior_history = history
        self._audio_before = audio_seconds
        self._emit = emit
        self.resume_token = "rt_" + pysecrets.token_urlsafe(24)
        self._ingress = AudioIngress(spec.input_format, runner.limits.input_buffer_ms)
        self._encode = _encoder(spec.output_format, spec.volume)
        self._session: ConversationSession | None = None
        self._llm: ChatClient | None = None
        self._ended = asyncio.Event()
        self._started = asyncio.Event()
        self._end_reason: EndReason = "dropped"
        self._replies: dict[str, _ProtoReply] = {}
        self._ids = itertools.count(1)
        self._user_item: str | None = None
        self._last_user_item: str | None = None  # of the last transcript.user sent
        self._early_results: list[ev.ToolResult] = []
        self._pending_calls: dict[str, str] = {}  # call_id -> core reply id
        self._last_violation = -1.0
        self._tg: asyncio.TaskGroup | None = None
        self._sink: PacedSink | None = None
        self._speaking: _ProtoReply | None = None
        self._item_ids = itertools.count(1)
        self._cancelled: set[str] = set()

    # -- lifecycle ------------------------------------------------------------------

    @property
    def audio_seconds(self) -> float:
        return self._audio_before + self._ingress.received_seconds

    async def run(self) -> EndReason:
        """Run until the session ends, expires, or is cancelled (dropped).

        Returns:
            Why it stopped: ``ended`` (``session.end``), ``expired``.
        """
        stt, tts = await self.runner.engines.get()
        assert self.spec.llm is not None
        self._llm = self.runner.chat_client(self.spec.llm)
        sink = PacedSink(
            self.spec.output_format.sample_rate, self.runner.limits.output_lead_ms,
            self._on_audio, tag=lambda: self._speaking,
            buffer_ms=self.runner.limits.output_buffer_ms,
        )  # fmt: skip
        self._sink = sink
        config = self.spec.core_config()
        if self._prior_history is not None:
            config = dataclasses.replace(config, greeting=None)  # already spoken
        session = ConversationSession(
            config=config, llm=self._llm, stt=stt, tts=tts, sink=sink,
            on_event=self._on_core_event, tool_policy=self.runner.policy,
            tool_resolver=self.runner.resolver, prior_history=self._prior_history or (),
        )  # fmt: skip
        self._session = session
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                conversation = tg.create_task(session.run(self._frames()))
                pacer = tg.create_task(sink.run())
                remaining = self.expires_at - time.time()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, remaining)):
                        await self._ended.wait()
                if not self._ended.is_set():
                    self._end_reason = "expired"
                conversation.cancel()
                pacer.cancel()
        finally:
            self._tg = None
            await self._llm.aclose()
        return self._end_reason

    async def wait_started(self) -> None:
        """Wait until the conversation runs (client events may be handled from then on)."""
        await self._started.wait()

    async def _frames(self) -> AsyncIterator[AudioFrame]:
        # The core asks for the first frame once it runs (history begun, greeting started).
        self._started.set()
        async for frame in self._ingress.frames():
            yield frame

    def end(self) -> None:
        """``session.end``: stop now; the state is not kept."""
        self._end_reason = "ended"
        self._ended.set()

    def history(self) -> list[dict[str, Any]]:
        if self._session is not None:
            return [dict(m) for m in self._session.history]
        return list(self._prior_history or [])

    def snapshot(self) -> ResumableState:
        """The state to keep for a resume (secrets sealed)."""
        return self.runner.seal_state(self)

    # -- client events ----------------------------------------------------------------

    def handle(self, event: ev.ClientEvent) -> None:
        """Apply one client event (after ``session.ready``).

        Raises:
            SessionRefused: a rule of the session was broken (``agent_id_not_first``,
                ``immutable_field``, ``invalid_config`` …); the session goes on.
        """
        session = self._session
        match event:
            case ev.InputAudio(audio=audio):
                if self._ingress.feed(audio):
                    now = time.monotonic()
                    if now - self._last_violation >= 1.0:
                        self._last_violation = now
                        raise SessionRefused(
                            "audio_rate_violation",
                            "audio is arriving faster than real time; the oldest was dropped",
                            param="audio",
                        )
            case ev.SessionUpdate(session=patch):
                self._update(patch)
            case ev.ReplyCreate(instructions=instructions):
                if session is not None:
                    session.create_reply(instructions)
            case ev.ConversationMessage(role=role, content=content):
                if session is not None:
                    session.add_message(role, content)
            case ev.ToolResult() as result:
                self._tool_result(result)
            case ev.ReplyCancel(reply_id=reply_id):
                self._cancel_reply(reply_id)
            case ev.SessionEnd():
                self.end()
            case ev.SessionResume():
                raise SessionRefused(
                    "invalid_format", "session.resume must be the first message", param="type"
                )

    def _cancel_reply(self, reply_id: str | None) -> None:
        current = [r for r in self._replies.values() if not r.closed]
        if reply_id is not None and all(r.reply_id != reply_id for r in current):
            raise SessionRefused(
                "invalid_value", f"reply {reply_id[:64]!r} is not in progress", param="reply_id"
            )
        if self._session is not None and self._session.cancel_reply():
            self._cancelled.update(r.core_id for r in current)

    def _update(self, patch: ev.SessionPatch) -> None:
        if patch.agent_id is not None:
            raise SessionRefused(
                "agent_id_not_first", "agent_id may only be sent in the first session.update",
                param="session.agent_id",
            )  # fmt: skip
        if (name := self.spec.immutable_change(patch)) is not None:
            raise SessionRefused(
                "immutable_field", f"{name} cannot change after session.ready", param=name
            )
        if patch.llm is not None:
            raise SessionRefused(
                "immutable_field", "session.llm cannot change after session.ready",
                param="session.llm",
            )  # fmt: skip
        spec = self.spec.apply(patch)
        if spec.voice is not None and not self.runner.voice_known(spec.voice):
            raise SessionRefused(
                "invalid_value", f"unknown voice {spec.voice!r}", param="session.output.voice"
            )
        self.spec = spec
        if patch.input is not None and patch.input.format is not None:
            self._ingress.set_format(spec.input_format)
        self._encode = _encoder(spec.output_format, spec.volume)
        if self._session is not None:
            config = spec.core_config()
            self._session.reconfigure(
                dataclasses.replace(config, greeting=self._session.config.greeting)
            )
        self._emit(ev.SessionUpdated(config=spec.public()))

    def _tool_result(self, result: ev.ToolResult) -> None:
        core_id = self._pending_calls.get(result.call_id)
        if core_id is None:
            raise SessionRefused(
                "invalid_value", f"no tool call {result.call_id!r} is waiting for a result",
                param="call_id",
            )  # fmt: skip
        reply = self._replies.get(core_id)
        if reply is not None and not reply.closed:
            # Sent before reply.done: held until the reply's part is over.
            self._early_results.append(result)
            return
        self._submit(result)

    def _submit(self, result: ev.ToolResult) -> None:
        self._pending_calls.pop(result.call_id, None)
        if self._session is not None:
            self._session.submit_tool_result(
                result.call_id, result.result, is_error=result.is_error
            )

    # -- core events -> protocol events ---------------------------------------------

    def _new_id(self, prefix: str) -> str:
        counter = self._item_ids if prefix == "item" else self._ids
        return f"{prefix}_{self.session_id[-6:]}_{next(counter)}"

    def _reply(self, core_id: str) -> _ProtoReply:
        reply = self._replies.get(core_id)
        if reply is None:
            reply = _ProtoReply(core_id, self._new_id("reply"), self._new_id("item"))
            self._replies[core_id] = reply
        return reply

    def _reopen(self, reply: _ProtoReply) -> None:
        # The answer continues after a tool result: a new protocol reply.
        reply.spoken_before += reply.texts
        reply.texts = []
        reply.reply_id = self._new_id("reply")
        reply.item_id = self._new_id("item")
        reply.samples = 0
        reply.sent = 0
        reply.delta_end_ms = 0
        reply.closed = False
        self._emit(ev.ReplyStarted(reply_id=reply.reply_id, item_id=reply.item_id))

    def _on_audio(self, pcm: bytes, reply: _ProtoReply | None) -> None:
        if reply is None:
            return
        reply.sent += len(pcm) // 2
        self._emit(ev.ReplyAudio(data=self._encode(pcm), reply_id=reply.reply_id))

    def _on_core_event(self, event: core.ConversationEvent) -> None:
        emit = self._emit
        match event:
            case core.SpeechStarted(continued=continued):
                # The user went on with the turn just transcribed: its item is replaced.
                reuse = self._last_user_item if continued else None
                self._user_item = reuse or self._new_id("item")
                emit(ev.InputSpeechStarted())
            case core.SpeechStopped():
                emit(ev.InputSpeechStopped())
            case core.UserTranscriptDelta(text=text):
                emit(ev.TranscriptUserDelta(text=text, item_id=self._user_item))
            case core.UserTranscript(text=text, item_id=item_id):
                self._last_user_item = self._user_item or item_id
                emit(ev.TranscriptUser(text=text, item_id=self._last_user_item))
                self._user_item = None
            case core.ReplyStarted(reply_id=core_id):
                reply = self._reply(core_id)
                self._speaking = reply
                emit(ev.ReplyStarted(reply_id=reply.reply_id, item_id=reply.item_id))
            case core.ReplyAudio(reply_id=core_id, pcm=pcm):
                # Written to the sink, which sends it paced (_on_audio).
                reply = self._reply(core_id)
                if reply.closed:
                    self._reopen(reply)
                reply.samples += len(pcm) // 2
            case core.AgentTranscriptDelta(reply_id=core_id, delta=delta):
                reply = self._reply(core_id)
                if reply.closed:
                    self._reopen(reply)
                rate = self.spec.output_format.sample_rate
                end_ms = reply.samples * 1000 // rate
                reply.texts.append(delta)
                emit(ev.TranscriptAgentDelta(
                    delta=delta, reply_id=reply.reply_id, item_id=reply.item_id,
                    start_ms=reply.delta_end_ms, end_ms=end_ms,
                ))  # fmt: skip
                reply.delta_end_ms = end_ms
            case core.ToolCallRequested(reply_id=core_id, call_id=call_id, name=name,
                                        arguments=arguments):  # fmt: skip
                self._pending_calls[call_id] = core_id
                if self._tg is not None:
                    self._tg.create_task(self._close_for_tool(core_id, call_id, name, arguments))
            case core.AgentTranscript(reply_id=core_id, text=text, interrupted=interrupted):
                reply = self._reply(core_id)
                if reply.closed:
                    if not interrupted:
                        return  # nothing was said after the tool result
                    self._reopen(reply)
                before = " ".join(reply.spoken_before)
                if before and text.startswith(before):
                    text = text[len(before) :].strip()
                emit(ev.TranscriptAgent(
                    text=text, reply_id=reply.reply_id, item_id=reply.item_id,
                    interrupted=interrupted,
                ))  # fmt: skip
            case core.ReplyDone(reply_id=core_id, status=status):
                done = self._replies.pop(core_id, None) or self._reply(core_id)
                self._replies.pop(core_id, None)
                if done.closed and status == "completed":
                    return
                if status == "interrupted" and core_id in self._cancelled:
                    self._cancelled.discard(core_id)
                    emit(ev.ReplyDone(reply_id=done.reply_id, status="cancelled"))
                else:
                    emit(ev.ReplyDone(reply_id=done.reply_id, status=status))
                if status == "interrupted":
                    # Results for an interrupted reply are dropped (the call is over).
                    for call_id, owner in list(self._pending_calls.items()):
                        if owner == core_id:
                            del self._pending_calls[call_id]
                    self._early_results = [
                        r for r in self._early_results if r.call_id in self._pending_calls
                    ]
            case core.ReplyError(reply_id=core_id, code=code, message=message,
                                 retryable=retryable, status_code=status_code):  # fmt: skip
                reply = self._reply(core_id)
                emit(ev.ReplyError(
                    reply_id=reply.reply_id, code=code, message=message, retryable=retryable,
                    status_code=status_code,
                ))  # fmt: skip
            case core.TurnMetrics():
                pass

    async def _close_for_tool(
        self, core_id: str, call_id: str, name: str, arguments: dict[str, Any]
    ) -> None:
        """Finish the reply's first part once its transition phrase has been played.

        The core asks for the tool as soon as the model's round ends, while
        the phrase before the call may still be in the TTS. Once no audio has
        arrived for a moment and the sink has played what it admitted, the
        part ends: ``transcript.agent`` → ``tool.call`` → ``reply.done``.
        """
        reply = self._replies.get(core_id)
        if reply is None:
            return
        sink = self._sink
        quiet = 0
        last = reply.samples
        while quiet < 3:
            await asyncio.sleep(0.05)
            if core_id not in self._replies:
                return  # interrupted meanwhile
            queued = sink.queued_samples if sink is not None else 0
            if reply.samples == last and queued == 0:
                quiet += 1
            else:
                quiet = 0
                last = reply.samples
        self._emit(ev.TranscriptAgent(
            text=" ".join(reply.texts), reply_id=reply.reply_id, item_id=reply.item_id,
            interrupted=False,
        ))  # fmt: skip
        self._emit(ev.ToolCall(
            call_id=call_id, name=name, arguments=arguments, reply_id=reply.reply_id
        ))  # fmt: skip
        self._emit(ev.ReplyDone(reply_id=reply.reply_id, status="completed"))
        reply.closed = True
        early = [r for r in self._early_results if r.call_id == call_id]
        self._early_results = [r for r in self._early_results if r.call_id != call_id]
        for result in early:
            self._submit(result)


# -- the runner ---------------------------------------------------------------------------


class SessionRunner:
    """Binds, starts, limits and resumes the sessions of one worker.

    Args:
        load_agent: a stored agent by id, its secrets opened in memory (``None``: absent).
        box: seals the secrets of resumable state.
        policy, resolver: the URL policy for endpoints and HTTP tools.
        default_llm: the server's endpoint for sessions without ``llm``.
        voices: installed voice ids (and aliases).
        engines: the shared speech engines.
        limits: see :class:`RunnerLimits`.
        states: where dropped sessions wait for a resume.
    """

    def __init__(
        self,
        *,
        load_agent: Callable[[str], Awaitable[Any]],
        box: Any,
        policy: URLPolicy,
        resolver: Resolver,
        default_llm: ev.LLMSpec | None,
        voices: frozenset[str],
        engines: Engines,
        limits: RunnerLimits | None = None,
        states: SessionStateStore | None = None,
    ) -> None:
        self.load_agent = load_agent
        self.box = box
        self.policy = policy
        self.resolver = resolver
        self.default_llm = default_llm
        self.voices = voices
        self.engines = engines
        self.limits = limits or RunnerLimits()
        self.states: SessionStateStore = states or MemorySessionStore()
        self.active = 0
        # Sessions running on this worker; the event is set once a session's
        # state has been kept (or discarded) after its socket went away.
        self._running: dict[str, asyncio.Event] = {}

    def voice_known(self, voice: str) -> bool:
        return not self.voices or voice in self.voices

    def chat_client(self, llm: ev.LLMSpec) -> ChatClient:
        return ChatClient(
            Endpoint(llm.base_url, llm.model, llm.api_key), policy=self.policy,
            resolver=self.resolver,
        )  # fmt: skip

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the worker's session slots.

        Raises:
            SessionRefused: ``at_capacity``.
        """
        if self.active >= self.limits.max_sessions:
            raise SessionRefused("at_capacity", "this server is at capacity; try again shortly")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    # -- binding ----------------------------------------------------------------------

    async def bind(self, patch: ev.SessionPatch) -> SessionSpec:
        """The effective configuration for a first ``session.update``.

        Raises:
            SessionRefused: ``agent_not_found``, ``agent_init_failed`` (a stored
                agent that cannot run), ``invalid_value``/``invalid_config`` (an
                inline configuration that cannot run; the client may send another).
        """
        if patch.agent_id is not None:
            spec = await self._stored(patch.agent_id)
            fatal: ev.ErrorCode = "agent_init_failed"
        else:
            spec = SessionSpec().apply(patch)
            fatal = "invalid_config"
        if spec.voice is not None and not self.voice_known(spec.voice):
            raise SessionRefused(
                "invalid_value" if fatal == "invalid_config" else fatal,
                f"unknown voice {spec.voice!r}", param="session.output.voice",
            )  # fmt: skip
        if spec.llm is None:
            if self.default_llm is None:
                raise SessionRefused(
                    fatal,
                    "no llm is configured: give the agent or session an llm entry, or set "
                    "VOXLOOP_LLM_BASE_URL and VOXLOOP_LLM_MODEL on the server",
                    param="session.llm",
                )
            spec = dataclasses.replace(spec, llm=self.default_llm)
        await self.check_endpoint(spec, fatal)
        return spec

    async def check_endpoint(self, spec: SessionSpec, code: ev.ErrorCode) -> None:
        """Resolve and check the endpoint URL again (a name may now point elsewhere).

        Raises:
            SessionRefused: ``code``, saying why the URL is not allowed.
        """
        assert spec.llm is not None
        try:
            await check_endpoint_url(spec.llm.base_url, self.policy, self.resolver)
        except URLPolicyError as exc:
            raise SessionRefused(
                code, f"the llm endpoint is not allowed: {exc}", param="llm[0].base_url"
            ) from None

    async def _stored(self, agent_id: str) -> SessionSpec:
        try:
            agent = await self.load_agent(agent_id)
        except Exception as exc:  # a sealed secret that does not open, the store failing
            log.warning("stored agent cannot be loaded", extra={"error": type(exc).__name__})
            raise SessionRefused(
                "agent_init_failed", "the stored agent cannot be loaded (see the server log)",
                param="session.agent_id",
            ) from None  # fmt: skip
        if agent is None:
            raise SessionRefused(
                "agent_not_found", f"no agent with id {agent_id[:80]!r}", param="session.agent_id"
            )
        doc = agent.doc
        tools = []
        for tool in doc.get("tools", []):
            tool = dict(tool)
            if "http" in tool:
                opened = agent.tool_headers.get(tool["name"], {})
                tool["http"] = {
                    **tool["http"],
                    "headers": [{"name": k, "value": v.reveal()} for k, v in opened.items()],
                }
            tools.append(tool)
        output = dict(doc.get("output") or {})
        if doc.get("voice") is not None and "voice" not in output:
            output["voice"] = doc["voice"]
        session = {
            "system_prompt": doc.get("system_prompt", ""),
            "greeting": doc.get("greeting"),
            "tools": tools,
            "input": doc.get("input") or {},
            "output": output,
        }
        try:
            patch = ev.parse_session(session)
        except ev.ProtocolError as exc:
            raise SessionRefused(
                "agent_init_failed", f"the stored agent cannot run: {exc.message}",
                param=exc.param,
            ) from None  # fmt: skip
        spec = dataclasses.replace(SessionSpec().apply(patch), agent_id=str(doc["id"]))
        if agent.llm:
            entry = agent.llm[0]
            spec = dataclasses.replace(
                spec,
                llm=ev.LLMSpec(base_url=entry.base_url, model=entry.model, api_key=entry.api_key),
            )
        return spec

    # -- starting and resuming ------------------------------------------------------

    def start(
        self, spec: SessionSpec, principal: Principal, emit: Emit, *, now: float | None = None
    ) -> LiveSession:
        """A new session (run it with :meth:`LiveSession.run`)."""
        started = time.time() if now is None else now
        duration = min(
            principal.max_duration_s or self.limits.max_duration_s, self.limits.max_duration_s
        )
        return LiveSession(
            self, session_id="sess_" + pysecrets.token_hex(12), spec=spec,
            owner=principal.owner, started_at=started, expires_at=started + duration,
            history=None, audio_seconds=0.0, emit=emit,
        )  # fmt: skip

    async def resume(self, session_id: str, principal: Principal, emit: Emit) -> LiveSession:
        """Continue a dropped session.

        Raises:
            SessionRefused: ``session_not_found`` (unknown, ended, or past the
                grace period), ``session_forbidden`` (another credential's
                session), ``session_expired``.
        """
        running = self._running.get(session_id)
        if running is not None:
            # The old socket is still being torn down here: wait for its state.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await running.wait()
        state = await self.states.take(session_id)
        if state is None:
            raise SessionRefused(
                "session_not_found", "no resumable session with that id", param="session_id"
            )
        allowed = (principal.kind == "key" and principal.owner == state.owner) or (
            principal.kind == "resume"
            and principal.resume_token is not None
            and hmac.compare_digest(
                _token_hash(principal.resume_token.reveal()), state.resume_token_hash
            )
        )
        if not allowed:
            await self.states.save(state, self.limits.resume_grace_s)
            raise SessionRefused(
                "session_forbidden", "that session belongs to another credential",
                param="session_id",
            )  # fmt: skip
        if state.expires_at <= time.time():
            raise SessionRefused("session_expired", "the session reached its maximum duration")
        spec = self._unseal(state)
        return LiveSession(
            self, session_id=state.session_id, spec=spec, owner=state.owner,
            started_at=state.started_at, expires_at=state.expires_at, history=state.history,
            audio_seconds=state.audio_seconds, emit=emit,
        )  # fmt: skip

    def attach(self, live: LiveSession) -> None:
        """Note that ``live`` runs on this worker (until :meth:`release`)."""
        self._running[live.session_id] = asyncio.Event()

    async def release(self, live: LiveSession, *, keep: bool) -> None:
        """The session's socket is gone: keep its state for a resume, or forget it."""
        try:
            if keep:
                await self.states.save(live.snapshot(), self.limits.resume_grace_s)
            else:
                await self.states.discard(live.session_id)
        finally:
            done = self._running.pop(live.session_id, None)
            if done is not None:
                done.set()

    def seal_state(self, live: LiveSession) -> ResumableState:
        spec = live.spec
        context = f"session:{live.session_id}"
        doc = spec.public()
        doc["tools"] = []
        for tool in spec.tools:
            t = tool.to_json()
            if tool.http is not None:
                t["http"]["headers"] = [
                    {"name": k, "sealed": self.box.seal(v, context=f"{context}:tool:{k}")}
                    for k, v in tool.http.headers.items()
                ]
            doc["tools"].append(t)
        if spec.llm is not None and spec.llm.api_key is not None:
            doc["llm_key"] = self.box.seal(spec.llm.api_key, context=f"{context}:llm")
        return ResumableState(
            session_id=live.session_id, owner=live.owner,
            resume_token_hash=_token_hash(live.resume_token), spec=doc,
            history=live.history(), started_at=live.started_at, expires_at=live.expires_at,
            audio_seconds=live.audio_seconds,
        )  # fmt: skip

    def _unseal(self, state: ResumableState) -> SessionSpec:
        doc = json.loads(json.dumps(state.spec))
        context = f"session:{state.session_id}"
        for tool in doc["tools"]:
            if "http" in tool:
                tool["http"]["headers"] = [
                    {"name": h["name"],
                     "value": self.box.open(h["sealed"],
                                            context=f"{context}:tool:{h['name']}").reveal()}
                    for h in tool["http"]["headers"]
                ]  # fmt: skip
        llm = doc.pop("llm", [])
        key = doc.pop("llm_key", None)
        agent_id = doc.pop("agent_id", None)
        patch = ev.parse_session(doc)
        spec = SessionSpec().apply(patch)
        td = doc["input"]["turn_detection"]
        spec = dataclasses.replace(
            spec,
            agent_id=agent_id,
            turn_detection=dataclasses.replace(
                spec.turn_detection, min_silence_ms=td["min_silence"],
                max_silence_ms=td["max_silence"],
                pause_ms=min(spec.turn_detection.pause_ms, td["min_silence"]),
            ),
        )  # fmt: skip
        if llm:
            api_key = self.box.open(key, context=f"{context}:llm") if key else None
            spec = dataclasses.replace(
                spec,
                llm=ev.LLMSpec(base_url=llm[0]["base_url"], model=llm[0]["model"],
                               api_key=api_key),
            )  # fmt: skip
        return spec


def default_llm_from_env(env: Mapping[str, str]) -> ev.LLMSpec | None:
    """The server's default endpoint (``VOXLOOP_LLM_BASE_URL``, ``_MODEL``, ``_API_KEY``).

    Raises:
        ValueError: a base URL without a model.
    """
    base_url = env.get("VOXLOOP_LLM_BASE_URL", "").strip()
    if not base_url:
        return None
    model = env.get("VOXLOOP_LLM_MODEL", "").strip()
    if not model:
        raise ValueError("VOXLOOP_LLM_BASE_URL is set: set VOXLOOP_LLM_MODEL too")
    key = env.get("VOXLOOP_LLM_API_KEY", "")
    return ev.LLMSpec(base_url=base_url, model=model, api_key=Secret(key) if key else None)

"""``voxloop connect``: a person on the line of a Voice Agent server.

Two modes, both on :class:`~runtime.client.connection.VoiceAgentClient`:

* :func:`connect_file` / :func:`connect_pcm` (headless): a WAV file is
  streamed in real time in 50 ms chunks as if it were the microphone (then
  silence until the agent is done), and the agent's audio is "played" in real
  time on a virtual speaker, so barge-in and the heard text behave as with a
  person. It writes the same stereo recording as ``voxloop talk`` (left the
  user, right the agent as heard, one timeline starting at ``session.ready``)
  and per-turn metrics timed at the client.
* :func:`connect_live`: the microphone and speaker.

Audio is PCM16 mono at 24 kHz inside; :class:`WireCodec` converts to and from
the session's wire encodings (``audio/pcm`` 24 kHz, ``audio/pcmu`` and
``audio/pcma`` 8 kHz) once, at the edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from audio.g711 import alaw_decode, alaw_encode, ulaw_decode, ulaw_encode
from audio.resample import Resampler
from audio.wav import interleave, read_speech_file, write_wav
from runtime.client.connection import (
    Auth,
    ConnectionDropped,
    Event,
    SessionResumed,
    VoiceAgentClient,
)
from runtime.client.metrics import ClientTurnMetrics, TurnTimer
from runtime.client.protocol import PlaybackFlush
from runtime.conversation.sinks import AudioSink, TimelineSink
from runtime.protocol.events import (
    ENCODINGS,
    Encoding,
    InputSpeechStarted,
    InputSpeechStopped,
    ReplyAudio,
    ReplyDone,
    ReplyStarted,
    SessionPatch,
    ToolCall,
)

RATE: Final = 24000
AEC_RATE: Final = 16000  # the microphone's rate with echo cancellation (the APM has no 24 kHz)
CHUNK_MS: Final = 50
TAIL_S: Final = 1.0
MAX_WAIT_S: Final = 60.0
REPLY_WAIT_S: Final = 15.0

ToolHandler = Callable[[ToolCall], Awaitable[tuple[str, bool]]]
"""Runs a client tool: ``(result text, is_error)``."""


class WireCodec:
    """PCM16 at 24 kHz ⇄ one direction's wire encoding (stateful resampling).

    Raises:
        ValueError: an unknown encoding.
    """

    def __init__(self, encoding: Encoding) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown audio encoding {encoding!r}")
        self.encoding = encoding
        self.wire_rate = ENCODINGS[encoding]
        self._down = Resampler(RATE, self.wire_rate) if self.wire_rate != RATE else None
        self._up = Resampler(self.wire_rate, RATE) if self.wire_rate != RATE else None

    def encode(self, pcm: bytes) -> bytes:
        """24 kHz PCM16 → wire bytes."""
        if self._down is None:
            return pcm
        narrow = self._down.process(pcm)
        return ulaw_encode(narrow) if self.encoding == "audio/pcmu" else alaw_encode(narrow)

    def decode(self, data: bytes) -> bytes:
        """Wire bytes → 24 kHz PCM16 (a PCM sample split across messages is carried over)."""
        if self._up is None:
            return data
        narrow = ulaw_decode(data) if self.encoding == "audio/pcmu" else alaw_decode(data)
        return self._up.process(narrow)


def session_encodings(session: SessionPatch) -> tuple[Encoding, Encoding]:
    """The (input, output) encodings an inline configuration asks for.

    A stored-agent bind gets its formats from the agent; the effective ones
    are read from ``session.ready``'s ``config`` (:func:`ready_encodings`).
    """
    inp = session.input.format.encoding if session.input and session.input.format else None
    out = session.output.format.encoding if session.output and session.output.format else None
    return inp or "audio/pcm", out or "audio/pcm"


def ready_encodings(
    config: Mapping[str, Any] | None, default: tuple[Encoding, Encoding]
) -> tuple[Encoding, Encoding]:
    """The encodings of ``session.ready``'s effective ``config`` (``default`` where absent)."""

    def pick(side: str, fallback: Encoding) -> Encoding:
        doc = (config or {}).get(side)
        fmt = doc.get("format") if isinstance(doc, dict) else None
        enc = fmt.get("encoding") if isinstance(fmt, dict) else None
        return enc if isinstance(enc, str) and enc in ENCODINGS else fallback  # type: ignore[return-value]

    return pick("input", default[0]), pick("output", default[1])


@dataclass(slots=True)
class _Activity:
    """What keeps a headless run on the line."""

    speaking: bool = False
    awaiting_since: float | None = None
    replies: int = 0
    tools: int = 0
    resuming: bool = False

    def busy(self, now: float) -> bool:
        awaiting = self.awaiting_since is not None and now - self.awaiting_since < REPLY_WAIT_S
        return self.speaking or awaiting or self.replies > 0 or self.tools > 0 or self.resuming

    def on_event(self, event: Event, now: float) -> None:
        match event:
            case InputSpeechStarted():
                self.speaking = True
            case InputSpeechStopped():
                self.speaking = False
                self.awaiting_since = now
            case ReplyStarted():
                self.awaiting_since = None
                self.replies += 1
            case ReplyDone():
                self.replies = max(0, self.replies - 1)
            case ConnectionDropped():
                # The socket went away: its replies end there; a reply that was awaited or
                # being spoken is awaited again from the resumed session (which answers the
                # user's last words when their reply was not done).
                self.resuming = True
                if self.replies or self.awaiting_since is not None:
                    self.awaiting_since = now
                self.replies = 0
                self.speaking = False
            case SessionResumed():
                self.resuming = False
                if self.awaiting_since is not None:
                    self.awaiting_since = now


@dataclass(frozen=True, slots=True)
class ConnectResult:
    """A headless run.

    Attributes:
        metrics: one entry per answered user turn, timed at the client.
        duration_s: length of the recording.
        user, agent: the two channels (24 kHz PCM16).
        session_id: the server's session id.
    """

    metrics: list[ClientTurnMetrics]
    duration_s: float
    user: bytes = field(repr=False)
    agent: bytes = field(repr=False)
    session_id: str | None


class _Conversation:
    """Consumes a client's events: plays audio, flushes, runs tools, times turns."""

    def __init__(
        self,
        client: VoiceAgentClient,
        sink: AudioSink,
        output: WireCodec,
        *,
        on_event: Callable[[Event], None],
        tool_handler: ToolHandler | None,
        tg: asyncio.TaskGroup,
    ) -> None:
        self.client = client
        self.sink = sink
        self.output = output
        self.on_event = on_event
        self.tool_handler = tool_handler
        self.tg = tg
        self.timer = TurnTimer(RATE)
        self.activity = _Activity()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        async for event in self.client.events():
            now = loop.time()
            self.activity.on_event(event, now)
            self.timer.on_event(event, now)
            self.on_event(event)
            match event:
                case ReplyAudio(data=data):
                    pcm = self.output.decode(data)
                    if pcm:
                        await self.sink.write(pcm)
                case PlaybackFlush():
                    self.sink.clear_buffer()
                case ToolCall() if self.tool_handler is not None:
                    self.activity.tools += 1
                    self.tg.create_task(self._run_tool(event, self.tool_handler))

    async def _run_tool(self, call: ToolCall, handler: ToolHandler) -> None:
        try:
            result, is_error = await handler(call)
            with contextlib.suppress(ValueError):  # the session ended meanwhile
                await self.client.submit_tool_result(call.call_id, result, is_error=is_error)
                # The answer continues in a new reply: wait for it as after a user turn.
                self.activity.awaiting_since = asyncio.get_running_loop().time()
        finally:
            self.activity.tools -= 1


async def connect_file(input_wav: Path, **kwargs: Any) -> ConnectResult:
    """:func:`connect_pcm` on a WAV file (any rate, mixed down to mono).

    Raises:
        ValueError: the file is not usable (see :func:`~audio.wav.read_speech_file`).
    """
    return await connect_pcm(read_speech_file(input_wav).mono_at(RATE), **kwargs)


async def connect_pcm(
    pcm: bytes,
    *,
    url: str,
    auth: Auth,
    session: SessionPatch,
    output_wav: Path | None = None,
    metrics_json: Path | None = None,
    on_event: Callable[[Event], None] | None = None,
    tool_handler: ToolHandler | None = None,
    stop: asyncio.Event | None = None,
    resume_window_s: float = 30.0,
) -> ConnectResult:
    """Run one whole conversation headless: 24 kHz mono PCM16 as the user.

    The input is streamed in real time in 50 ms chunks from ``session.ready``
    on, then silence until the agent has been quiet for 1 s (at most 60 s);
    then ``session.end``. Setting ``stop`` ends it early (cleanly).

    Raises:
        ServerUnreachable, HandshakeRejected, SessionFailure: see
            :class:`VoiceAgentClient`; a session that failed mid-way raises
            its :class:`SessionFailure` after the recording is written.
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    client = VoiceAgentClient(url, session=session, auth=auth, resume_window_s=resume_window_s)
    async with client:
        inp, out = ready_encodings(client.protocol.ready_config, session_encodings(session))
        input_codec, output_codec = WireCodec(inp), WireCodec(out)
        t0 = loop.time()
        sink = TimelineSink(RATE, t0, high_water_ms=1000)
        recorded = bytearray()
        async with asyncio.TaskGroup() as tg:
            conv = _Conversation(
                client, sink, output_codec, on_event=on_event or (lambda _e: None),
                tool_handler=tool_handler, tg=tg,
            )  # fmt: skip

            async def send() -> None:
                step = RATE * CHUNK_MS // 1000 * 2
                chunks = [pcm[i : i + step] for i in range(0, len(pcm), step)]
                idle_since: float | None = None
                i = 0
                while not stop.is_set() and not client.over:
                    if i < len(chunks):
                        chunk = chunks[i]
                    else:
                        chunk = bytes(step)
                        now = loop.time()
                        if conv.activity.busy(now) or sink.queued_samples:
                            idle_since = None
                        elif idle_since is None:
                            idle_since = now
                        elif now - idle_since >= TAIL_S:
                            break
                        if (i - len(chunks)) * CHUNK_MS / 1000 >= MAX_WAIT_S:
                            break
                    t_end = t0 + (len(recorded) + len(chunk)) / 2 / RATE
                    with contextlib.suppress(asyncio.TimeoutError):
                        async with asyncio.timeout_at(t_end):
                            await stop.wait()
                    if stop.is_set():
                        break
                    recorded.extend(chunk)
                    conv.timer.audio_sent(chunk, t_end)
                    await client.send_audio(input_codec.encode(chunk))
                    i += 1
                await client.end()

            tg.create_task(send())
            await conv.run()
        await sink.wait_for_playout()
    user = bytes(recorded)
    total = max(len(user), len(sink.timeline)) // 2
    if output_wav is not None:
        stereo = interleave(user + bytes(total * 2 - len(user)), sink.audio(total))
        await asyncio.to_thread(write_wav, output_wav, stereo, RATE, 2)
    metrics = conv.timer.metrics
    if metrics_json is not None:
        doc = {"session_id": client.session_id, "turns": [m.to_json() for m in metrics]}
        text = json.dumps(doc, indent=2) + "\n"
        await asyncio.to_thread(metrics_json.write_text, text, encoding="utf-8")
    if client.error is not None:
        raise client.error
    return ConnectResult(metrics, total / RATE, user, sink.audio(total), client.session_id)


async def connect_live(
    *,
    url: str,
    auth: Auth,
    session: SessionPatch,
    stop: asyncio.Event,
    input_device: int | str | None = None,
    output_device: int | str | None = None,
    on_event: Callable[[Event], None] | None = None,
    on_ready: Callable[[], None] | None = None,
    tool_handler: ToolHandler | None = None,
    echo: Literal["aec", "half-duplex", "off"] = "half-duplex",
    echo_tail_ms: int = 200,
) -> list[ClientTurnMetrics]:
    """Talk through the microphone and speaker until ``stop`` is set, then end cleanly.

    ``echo`` keeps the agent from hearing itself on open speakers, as in
    ``voxloop talk``:

    * ``"aec"``: WebRTC echo cancellation (:func:`audio.aec.echo_path`) on the
      microphone's thread, with exactly what the speaker plays as the
      reference; the microphone runs at 16 kHz (the canceller's rate) and is
      resampled to the wire's 24 kHz (full duplex: interrupt by voice);
    * ``"half-duplex"``: the microphone is silenced while the agent is audible
      and ``echo_tail_ms`` after;
    * ``"off"``: nothing (headphones).

    Raises:
        DeviceUnavailable: PortAudio or a device is missing.
        EchoCancellerUnavailable: ``"aec"`` without the ``aec`` extra.
        ServerUnreachable, HandshakeRejected, SessionFailure: see :class:`VoiceAgentClient`.
    """
    from audio.devices import Microphone, Speaker
    from audio.echo import EchoPath, HalfDuplexGate
    from audio.frame import AudioFrame

    loop = asyncio.get_running_loop()
    path: EchoPath | None = None
    mic_rate = RATE
    if echo == "aec":
        from audio.aec import echo_path

        mic_rate = AEC_RATE
        path = echo_path(AEC_RATE)
    gate = HalfDuplexGate(tail_ms=echo_tail_ms) if echo == "half-duplex" else None
    up = Resampler(mic_rate, RATE) if mic_rate != RATE else None
    speaker = Speaker(output_device, sample_rate=RATE, on_played=path.played if path else None)
    microphone = Microphone(
        input_device, sample_rate=mic_rate, frame_ms=CHUNK_MS,
        process=path.captured if path else None,
    )  # fmt: skip
    async with (
        speaker,
        microphone as mic,
        VoiceAgentClient(url, session=session, auth=auth) as client,
    ):
        inp, out = ready_encodings(client.protocol.ready_config, session_encodings(session))
        input_codec = WireCodec(inp)
        if on_ready is not None:
            on_ready()
        async with asyncio.TaskGroup() as tg:
            conv = _Conversation(
                client, speaker, WireCodec(out), on_event=on_event or (lambda _e: None),
                tool_handler=tool_handler, tg=tg,
            )  # fmt: skip

            async def send() -> None:
                frames = aiter(mic)
                origin: float | None = None  # loop time of the microphone's sample 0
                sent = 0  # samples at RATE, with echo cancellation (the microphone is at 16 kHz)
                while not stop.is_set() and not client.over:
                    nxt = asyncio.ensure_future(anext(frames))
                    halt = asyncio.ensure_future(stop.wait())
                    try:
                        await asyncio.wait({nxt, halt}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        halt.cancel()
                    if not nxt.done():
                        nxt.cancel()
                        break
                    try:
                        frame = nxt.result()
                    except StopAsyncIteration:
                        break
                    # A device that delivers faster than real time (a virtual one) is held
                    # back to it; a real microphone never runs ahead, so this never waits.
                    now = loop.time()
                    if origin is None:
                        origin = now - frame.end_pts / mic_rate
                    if (ahead := origin + frame.end_pts / mic_rate - now) > 0:
                        await asyncio.sleep(ahead)
                    if up is not None:  # the cleaned 16 kHz block, at the wire's rate
                        frame = AudioFrame(pcm=up.process(frame.pcm), sample_rate=RATE, pts=sent)
                        sent += len(frame.pcm) // 2
                    if gate is not None:
                        queued = speaker.statistics().buffered_samples
                        if queued:
                            gate.playing(frame.end_pts + queued)
                        frame = gate.process(frame)
                    conv.timer.audio_sent(frame.pcm, loop.time())
                    await client.send_audio(input_codec.encode(frame.pcm))
                await client.end()

            tg.create_task(send())
            await conv.run()
    if client.error is not None:
        raise client.error
    return conv.timer.metrics

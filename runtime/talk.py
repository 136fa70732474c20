"""``voxloop talk``: a conversation with the microphone and speaker, or from a WAV file.

File mode streams the input file in real time as if it were the microphone
(then silence until the agent is done), and writes a stereo recording on one
timeline — left the user, right the agent exactly as a listener heard it
(an interrupted reply is cut where it was cut) — and per-turn metrics.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from audio.frame import AudioFrame
from audio.reframe import Reframer
from audio.resample import resample_all
from audio.wav import interleave, read_speech_file, write_wav
from runtime.conversation.config import SessionConfig
from runtime.conversation.events import ConversationEvent, TurnMetrics
from runtime.conversation.session import RATE, ConversationSession
from runtime.conversation.sinks import AudioSink, TimelineSink
from runtime.llm.client import ChatClient
from runtime.llm.fallback import FallbackChatClient
from runtime.speech.stt import SpeechToText
from runtime.speech.tts import TextToSpeech

OUTPUT_RATE: Final = 24000
TAIL_S: Final = 1.0
MAX_WAIT_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class FileResult:
    metrics: list[TurnMetrics]
    history: list[dict[str, Any]]
    duration_s: float
    user: bytes  # 24 kHz, the left channel
    agent: bytes  # 24 kHz, the right channel


class LoopPacer:
    """Releases frames on the event loop's clock, from a shared origin ``t0``."""

    def __init__(self, t0: float) -> None:
        self._t0 = t0

    async def wait_until(self, t: float) -> None:
        delay = self._t0 + t - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)


async def _file_frames(
    pcm16k: bytes,
    pacer: LoopPacer,
    session: ConversationSession,
    recorded: bytearray,
    on_input_second: Callable[[int], None] | None = None,
) -> AsyncIterator[AudioFrame]:
    reframer = Reframer(RATE, 20)
    frames = reframer.process(pcm16k) + reframer.flush()
    for frame in frames:
        await pacer.wait_until(frame.end_pts / RATE)
        recorded += frame.pcm
        if on_input_second is not None and frame.end_pts // RATE > frame.pts // RATE:
            on_input_second(frame.end_pts // RATE)
        yield frame
    if on_input_second is not None and frames and frames[-1].end_pts % RATE:
        on_input_second(frames[-1].end_pts // RATE + 1)
    # The user stays on the line, silent, until the agent is done.
    pts = frames[-1].end_pts if frames else 0
    silent = bytes(640)
    idle_since: float | None = None
    limit = pts + int(MAX_WAIT_S * RATE)
    while pts < limit:
        frame = AudioFrame(pcm=silent, sample_rate=RATE, pts=pts)
        await pacer.wait_until(frame.end_pts / RATE)
        recorded += silent
        yield frame
        pts = frame.end_pts
        if session.busy:
            idle_since = None
        elif idle_since is None:
            idle_since = pts / RATE
        elif pts / RATE - idle_since >= TAIL_S:
            return


async def talk_file(
    input_wav: Path,
    *,
    llm: ChatClient | FallbackChatClient,
    stt: SpeechToText,
    tts: TextToSpeech,
    config: SessionConfig,
    output_wav: Path | None = None,
    metrics_json: Path | None = None,
    on_event: Callable[[ConversationEvent], None] | None = None,
    on_input_second: Callable[[int], None] | None = None,
) -> FileResult:
    """Run a whole conversation from a WAV file in real time.

    Args:
        on_input_second: called with n each time n seconds of the input (rounded up
            at its end) have been streamed, for progress displays.

    If the conversation is cancelled (Ctrl-C), ``output_wav`` and
    ``metrics_json`` still receive everything up to that moment before the
    cancellation propagates.

    Raises:
        ValueError: the input file is not usable (see :func:`~audio.wav.read_speech_file`).
    """
    pcm16k = read_speech_file(input_wav).mono_at(RATE)
    return await talk_pcm(
        pcm16k, llm=llm, stt=stt, tts=tts, config=config, output_wav=output_wav,
        metrics_json=metrics_json, on_event=on_event, on_input_second=on_input_second,
    )  # fmt: skip


async def talk_pcm(
    pcm16k: bytes,
    *,
    llm: ChatClient | FallbackChatClient,
    stt: SpeechToText,
    tts: TextToSpeech,
    config: SessionConfig,
    output_wav: Path | None = None,
    metrics_json: Path | None = None,
    on_event: Callable[[ConversationEvent], None] | None = None,
    on_session: Callable[[ConversationSession], None] | None = None,
    on_input_second: Callable[[int], None] | None = None,
) -> FileResult:
    """:func:`talk_file` on 16 kHz mono PCM already in memory."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05
    sink = TimelineSink(OUTPUT_RATE, t0)
    session = ConversationSession(
        config=config, llm=llm, stt=stt, tts=tts, sink=sink,
        on_event=on_event or (lambda _e: None),
    )  # fmt: skip
    if on_session is not None:
        on_session(session)
    recorded = bytearray()
    frames = _file_frames(pcm16k, LoopPacer(t0), session, recorded, on_input_second)
    try:
        await session.run(frames)
        await sink.wait_for_playout()
    except asyncio.CancelledError:
        # Interrupted: keep what was said so far (written here, without awaiting,
        # because the task is being cancelled), then let the cancellation go on.
        _write_outputs(session, sink, recorded, output_wav, metrics_json)
        raise
    user, total = await asyncio.to_thread(
        _write_outputs, session, sink, recorded, output_wav, metrics_json
    )
    return FileResult(
        session.metrics, session.history, total / OUTPUT_RATE, user, sink.audio(total)
    )


def _write_outputs(
    session: ConversationSession,
    sink: TimelineSink,
    recorded: bytearray,
    output_wav: Path | None,
    metrics_json: Path | None,
) -> tuple[bytes, int]:
    """Write the stereo recording and the metrics; return the user channel and its length."""
    user = resample_all(bytes(recorded), RATE, OUTPUT_RATE)
    total = max(len(user), len(sink.timeline)) // 2
    if output_wav is not None:
        stereo = interleave(user + bytes(total * 2 - len(user)), sink.audio(total))
        write_wav(output_wav, stereo, OUTPUT_RATE, 2)
    if metrics_json is not None:
        doc = {"turns": [m.to_json() for m in session.metrics]}
        metrics_json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return user, total


EchoMode = Literal["aec", "half-duplex", "off"]
ECHO_MODES: Final[tuple[EchoMode, ...]] = ("aec", "half-duplex", "off")


def default_echo_mode() -> EchoMode:
    """``"aec"`` with the echo canceller installed (the ``aec`` extra), else ``"half-duplex"``."""
    from audio import aec

    return "aec" if aec.available() else "half-duplex"


async def talk_live(
    *,
    llm: ChatClient | FallbackChatClient,
    stt: SpeechToText,
    tts: TextToSpeech,
    config: SessionConfig,
    input_device: int | str | None = None,
    output_device: int | str | None = None,
    on_event: Callable[[ConversationEvent], None] | None = None,
    echo: EchoMode | None = None,
    echo_tail_ms: int = 200,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Talk through the microphone and speaker until cancelled (Ctrl-C).

    ``echo`` keeps the agent from hearing itself on open speakers:

    * ``"aec"``: WebRTC echo cancellation on the microphone's thread, with what
      the speaker plays as the reference (full duplex: the user can interrupt
      by voice);
    * ``"half-duplex"``: the microphone is silenced while the agent is audible
      and ``echo_tail_ms`` after (use headphones to barge in);
    * ``"off"``: nothing (headphones);
    * ``None``: :func:`default_echo_mode`.

    Raises:
        DeviceUnavailable: PortAudio or a device is missing.
        EchoCancellerUnavailable: ``"aec"`` without the ``aec`` extra.
    """
    from audio.devices import Microphone, Speaker
    from audio.echo import EchoPath, HalfDuplexGate

    mode = default_echo_mode() if echo is None else echo
    path: EchoPath | None = None
    if mode == "aec":
        from audio.aec import echo_path

        path = echo_path(RATE)
    gate = HalfDuplexGate(tail_ms=echo_tail_ms) if mode == "half-duplex" else None
    speaker = Speaker(
        output_device, sample_rate=OUTPUT_RATE, on_played=path.played if path else None
    )
    sink: AudioSink = speaker
    session = ConversationSession(
        config=config, llm=llm, stt=stt, tts=tts, sink=sink,
        on_event=on_event or (lambda _e: None),
    )  # fmt: skip

    async def frames(mic: Microphone) -> AsyncIterator[AudioFrame]:
        async for frame in mic:
            if gate is None:
                yield frame
                continue
            queued = speaker.statistics().buffered_samples
            if queued:
                gate.playing(frame.end_pts + queued * RATE // OUTPUT_RATE)
            yield gate.process(frame)

    microphone = Microphone(input_device, sample_rate=RATE, process=path.captured if path else None)
    async with speaker, microphone as mic:
        if on_ready is not None:
            on_ready()
        await session.run(frames(mic))

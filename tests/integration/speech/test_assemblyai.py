"""AssemblyAI Universal-Streaming: our client, and our loopback server checked with the official SDK."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.server import serve
from whisper_normalizer.english import EnglishTextNormalizer

from audio.reframe import Reframer
from audio.resample import resample_all
from audio.wav import read_wav
from runtime.endpoints import StaticResolver, URLPolicy
from runtime.errors import (
    EndpointAuthError,
    EndpointConnectError,
    MalformedStream,
    StreamDropped,
    URLPolicyError,
)
from runtime.secret import Secret
from runtime.speech.engines.assemblyai import (
    AssemblyAIStreamingSTT,
    Begin,
    Termination,
    Turn,
    parse_server_message,
)
from runtime.speech.engines.whisper import WhisperSTT

from ...helpers import SPEECH
from .aai_server import ServerBehaviour, SessionLog, make_handler, make_process_request

KEY = "aai-test-key-5678"
normalise = EnglishTextNormalizer()


@contextlib.asynccontextmanager
async def aai_server(
    whisper: WhisperSTT, behaviour: ServerBehaviour | None = None
) -> AsyncIterator[tuple[str, list[SessionLog]]]:
    sessions: list[SessionLog] = []
    async with serve(
        make_handler(whisper, KEY, sessions, behaviour),
        "127.0.0.1",
        0,
        process_request=make_process_request(KEY),
    ) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", sessions


@pytest.fixture
async def aai(whisper: WhisperSTT) -> AsyncIterator[tuple[str, list[SessionLog]]]:
    async with aai_server(whisper) as running:
        yield running


def client(host: str, key: str = KEY, **kwargs) -> AssemblyAIStreamingSTT:
    return AssemblyAIStreamingSTT(Secret(key), host=host, policy=URLPolicy.operator(), **kwargs)


async def test_transcribe_streams_a_whole_session(aai):
    host, sessions = aai
    audio = read_wav(SPEECH / "shared-06-piper.wav")
    result = await client(host).transcribe(audio.mono(), 16000)
    assert normalise(result.text) == normalise("What time does the pharmacy close on Sundays?")
    [log] = sessions
    assert log.params == {
        "sample_rate": "16000",
        "encoding": "pcm_s16le",
        "speech_model": "universal-streaming-english",
        "format_turns": "true",
    }
    assert log.audio_bytes == len(audio.mono())
    assert [m["type"] for m in log.messages] == ["ForceEndpoint", "Terminate"]
    assert log.terminated


async def test_live_turn_at_8khz_with_partial(aai):
    host, sessions = aai
    pcm = resample_all(read_wav(SPEECH / "shared-04-piper.wav").mono(), 16000, 8000)
    turn = client(host).start_turn(sample_rate=8000)
    try:
        for frame in Reframer(8000, 20).process(pcm):
            turn.push(frame)  # connects in the background on the first frame
        final = await turn.finalize()
        assert normalise(final.text) == normalise("Please cancel my subscription.")
        assert turn.partial is not None
    finally:
        await turn.aclose()
    assert sessions[0].params["sample_rate"] == "8000"
    assert sessions[0].terminated


async def test_wrong_key_is_refused_in_the_handshake_and_never_shown(aai):
    host, sessions = aai
    with pytest.raises(EndpointAuthError) as info:
        await client(host, key="aai-wrong-0000").transcribe(bytes(16000), 16000)
    # The service quoted the key in its refusal; the error keeps the message, not the key.
    assert str(info.value) == (
        "streaming STT refused the credentials (HTTP 401): Invalid API key: ********"
    )
    assert sessions == []  # refused before any session began


@pytest.mark.parametrize(
    ("behaviour", "kind", "message"),
    [
        (
            ServerBehaviour(error=(3005, "Unauthorized connection: key {key} was revoked")),
            EndpointAuthError,
            "streaming STT reported an error (code 3005): "
            "Unauthorized connection: key ******** was revoked",
        ),
        (
            ServerBehaviour(error=(3008, "Session Expired: Maximum session duration exceeded")),
            StreamDropped,
            "streaming STT reported an error (code 3008): "
            "Session Expired: Maximum session duration exceeded",
        ),
        (
            ServerBehaviour(close=(4001, "Not Authorized: {key}")),
            EndpointAuthError,
            "streaming STT closed the session (4001 Not Authorized: ********)",
        ),
    ],
)
async def test_error_messages_and_close_reasons_are_typed_and_redacted(
    whisper: WhisperSTT, behaviour: ServerBehaviour, kind, message: str
):
    async with aai_server(whisper, behaviour) as (host, sessions):
        with pytest.raises(kind) as info:
            await client(host).transcribe(bytes(16000), 16000)
    assert type(info.value) is kind and str(info.value) == message
    assert info.value.retryable is False
    assert [m["type"] for m in sessions[0].sent][:2] == (
        ["Begin", "Error"] if behaviour.error else ["Begin"]
    )


async def test_partials_update_the_turn_and_only_the_end_of_turn_counts(whisper: WhisperSTT):
    audio = read_wav(SPEECH / "shared-06-piper.wav").mono()
    async with aai_server(whisper, ServerBehaviour(partial_every_s=0.8)) as (host, sessions):
        result = await client(host).transcribe(audio, 16000)
    assert normalise(result.text) == normalise("What time does the pharmacy close on Sundays?")
    partials = [m for m in sessions[0].sent if m["type"] == "Turn" and not m["end_of_turn"]]
    # The unformatted end-of-turn copy is one of them; the rest are running partials.
    assert len(partials) >= 3
    assert sum(m["type"] == "Turn" and m["end_of_turn"] is True for m in sessions[0].sent) == 1


async def test_turns_the_server_ends_itself_are_kept(whisper: WhisperSTT):
    first = read_wav(SPEECH / "shared-09-piper.wav").mono()
    second = read_wav(SPEECH / "shared-04-piper.wav").mono()
    pcm = first + bytes(2 * 16000) + second  # a second of silence between them
    behaviour = ServerBehaviour(end_turn_after_silence_ms=700)
    async with aai_server(whisper, behaviour) as (host, sessions):
        result = await client(host).transcribe(pcm, 16000)
    assert normalise(result.text) == normalise(
        "Yes, that's correct. Please cancel my subscription."
    )
    ends = [m for m in sessions[0].sent if m["type"] == "Turn" and m["end_of_turn"]]
    assert [m["turn_order"] for m in ends] == [0, 1]
    assert [m["type"] for m in sessions[0].messages] == ["ForceEndpoint", "Terminate"]


async def test_unformatted_turns_when_formatting_is_off(aai):
    host, _ = aai
    result = await client(host, format_turns=False).transcribe(
        read_wav(SPEECH / "shared-09-piper.wav").mono(), 16000
    )
    assert result.text == "yes that's correct"


def test_url_policy_applies():
    with pytest.raises(URLPolicyError):
        AssemblyAIStreamingSTT(Secret(KEY), host="http://streaming.example.com")


async def test_a_connection_failure_reads_as_words():
    """No library class name (ConnectionRefusedError, InvalidMessage) in what a session says."""
    with socket.socket() as closed:  # bound, never listening: refused
        closed.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{closed.getsockname()[1]}"
        with pytest.raises(EndpointConnectError) as info:
            await client(refused).transcribe(bytes(3200), 16000)
    assert str(info.value) == "could not connect to the streaming STT: connection refused"


async def test_private_resolution_is_refused():
    stt = AssemblyAIStreamingSTT(
        Secret(KEY),
        host="https://streaming.example.com",
        resolver=StaticResolver({"streaming.example.com": ["127.0.0.1"]}),
    )
    with pytest.raises(URLPolicyError, match="loopback"):
        await stt.transcribe(bytes(3200), 16000)


def test_protocol_core_parses_and_rejects():
    assert parse_server_message('{"type": "Begin", "id": "x", "expires_at": 1}') == Begin(
        id="x", expires_at=1
    )
    turn = parse_server_message(
        json.dumps(
            {
                "type": "Turn",
                "turn_order": 2,
                "turn_is_formatted": True,
                "end_of_turn": True,
                "transcript": "Hi.",
                "end_of_turn_confidence": 0.7,
                "words": [],
            }
        )
    )
    assert turn == Turn(
        turn_order=2,
        transcript="Hi.",
        end_of_turn=True,
        turn_is_formatted=True,
        end_of_turn_confidence=0.7,
    )
    assert isinstance(
        parse_server_message('{"type": "Termination", "audio_duration_seconds": 3}'), Termination
    )
    assert parse_server_message('{"type": "SpeechStarted", "timestamp": 5}') is None
    for bad in ("nope", "[1]", '{"type": "Turn", "turn_order": 1}', '{"type": "Begin"}'):
        with pytest.raises(MalformedStream):
            parse_server_message(bad)


# The SDK opens its socket in a way websockets 15+ deprecates; that is the SDK's business.
@pytest.mark.filterwarnings(
    "ignore:connect\\(\\) must be used as a context manager:DeprecationWarning"
)
async def test_loopback_server_is_faithful_to_the_official_sdk(aai):
    # The official AssemblyAI SDK parses every message our test server sends.
    from assemblyai.streaming.v3 import (
        StreamingClient,
        StreamingClientOptions,
        StreamingEvents,
        StreamingParameters,
    )

    host, _ = aai
    events: list[object] = []
    errors: list[object] = []
    pcm = read_wav(SPEECH / "shared-07-piper.wav").mono()

    def run_sdk() -> None:
        sdk = StreamingClient(
            StreamingClientOptions(api_key=KEY, api_host=host.replace("http://", "ws://"))
        )
        sdk.on(StreamingEvents.Begin, lambda _c, e: events.append(e))
        sdk.on(StreamingEvents.Turn, lambda _c, e: events.append(e))
        sdk.on(StreamingEvents.Termination, lambda _c, e: events.append(e))
        sdk.on(StreamingEvents.Error, lambda _c, e: errors.append(e))
        sdk.connect(StreamingParameters(sample_rate=16000, format_turns=True))  # type: ignore[call-arg]
        sdk.stream(pcm[i : i + 1600] for i in range(0, len(pcm), 1600))
        sdk.force_endpoint()
        sdk.disconnect(terminate=True)

    await asyncio.to_thread(run_sdk)
    assert errors == []
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "BeginEvent" and kinds[-1] == "TerminationEvent"
    turns: list[Any] = [e for e in events if type(e).__name__ == "TurnEvent"]
    assert turns and turns[-1].end_of_turn and turns[-1].turn_is_formatted
    assert normalise(turns[-1].transcript) == normalise("Tell me a short joke about computers.")


async def test_cli_transcribes_through_the_remote_engine(aai):
    host, sessions = aai
    env = {**os.environ, "AAI_KEY": KEY}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runtime.cli", "transcribe", str(SPEECH / "shared-10-piper.wav"),
        "--engine", "assemblyai", "--base-url", host, "--api-key-env", "AAI_KEY",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err
    assert normalise(out.decode()) == normalise("No, I meant next Friday, not this one.")
    assert KEY.encode() not in out + err
    assert sessions[-1].terminated

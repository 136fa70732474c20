"""AssemblyAI Universal-Streaming: our client, and our loopback server checked with the official SDK."""

from __future__ import annotations

import asyncio
import json
import os
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
from runtime.errors import EndpointAuthError, MalformedStream, URLPolicyError
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
from .aai_server import SessionLog, make_handler

KEY = "aai-test-key-5678"
normalise = EnglishTextNormalizer()


@pytest.fixture
async def aai(whisper: WhisperSTT) -> AsyncIterator[tuple[str, list[SessionLog]]]:
    sessions: list[SessionLog] = []
    async with serve(make_handler(whisper, KEY, sessions), "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", sessions


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


async def test_wrong_key_is_an_auth_error_without_the_key(aai):
    host, _ = aai
    with pytest.raises(EndpointAuthError) as info:
        await client(host, key="aai-wrong-0000").transcribe(bytes(16000), 16000)
    assert "aai-wrong-0000" not in str(info.value)


async def test_unformatted_turns_when_formatting_is_off(aai):
    host, _ = aai
    result = await client(host, format_turns=False).transcribe(
        read_wav(SPEECH / "shared-09-piper.wav").mono(), 16000
    )
    assert result.text == "yes that's correct"


def test_url_policy_applies():
    with pytest.raises(URLPolicyError):
        AssemblyAIStreamingSTT(Secret(KEY), host="http://streaming.example.com")


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

"""OpenAI-compatible remote STT/TTS against a loopback server speaking the real protocol."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import jiwer
import pytest
from whisper_normalizer.english import EnglishTextNormalizer

from audio.reframe import Reframer
from audio.wav import read_wav
from runtime.endpoints import StaticResolver, URLPolicy
from runtime.errors import EndpointAuthError, EndpointServerError, MalformedStream, URLPolicyError
from runtime.secret import Secret
from runtime.speech.engines.openai_audio import OpenAISTT, OpenAITTS
from runtime.speech.engines.piper import PiperTTS
from runtime.speech.engines.whisper import WhisperSTT
from runtime.speech.tts import UnknownVoice

from ...helpers import SPEECH, serve_asgi
from .openai_audio_server import NATIVE_RATE, Recorder, make_app

KEY = "sk-audio-secret-1234"
normalise = EnglishTextNormalizer()


@pytest.fixture
async def audio_server(whisper: WhisperSTT, piper: PiperTTS) -> AsyncIterator[tuple[str, Recorder]]:
    recorder = Recorder()
    async with serve_asgi(make_app(whisper, piper, KEY, recorder)) as port:
        yield f"http://127.0.0.1:{port}/v1", recorder


def op(**kwargs):
    return {"policy": URLPolicy.operator(), **kwargs}


async def test_remote_transcription(audio_server):
    url, recorder = audio_server
    stt = OpenAISTT(url, model="whisper-tiny", api_key=Secret(KEY), **op())
    try:
        audio = read_wav(SPEECH / "shared-03-piper.wav")
        result = await stt.transcribe(audio.mono(), 16000)
        assert normalise(result.text) == normalise(
            "How long does it take to drive from Boston to New York?"
        )
        assert recorder.requests[-1]["model"] == "whisper-tiny"
        assert recorder.requests[-1]["seconds"] == pytest.approx(audio.duration_s, abs=0.01)
        assert (await stt.transcribe(b"", 16000)).text == ""
    finally:
        await stt.aclose()


async def test_remote_turn_uses_the_pause_trick(audio_server):
    url, recorder = audio_server
    stt = OpenAISTT(url, api_key=Secret(KEY), **op())
    try:
        pcm = read_wav(SPEECH / "shared-05-piper.wav").mono()
        turn = stt.start_turn()
        for frame in Reframer(16000, 20).process(pcm):
            turn.push(frame)
        turn.pause()
        final = await turn.finalize()
        assert final.speculative
        assert normalise(final.text) == normalise("I'd like to change my delivery address.")
        assert len(recorder.requests) == 1  # the pause's request was the final one
    finally:
        await stt.aclose()


async def test_remote_speech_streams_pcm_at_the_requested_rate(audio_server, whisper: WhisperSTT):
    url, recorder = audio_server
    tts = OpenAITTS(url, model="tts-1", api_key=Secret(KEY), **op())
    try:
        chunks = [
            c
            async for c in tts.synthesize(
                "Please cancel my subscription.", voice="nova", sample_rate=16000
            )
        ]
        assert all(c.sample_rate == 16000 for c in chunks)
        pcm = b"".join(c.pcm for c in chunks)
        heard = await whisper.transcribe(pcm, 16000)
        assert jiwer.wer(normalise("Please cancel my subscription."), normalise(heard.text)) == 0
        body = recorder.requests[-1]
        assert (body["model"], body["voice"], body["response_format"]) == ("tts-1", "nova", "pcm")
        with pytest.raises(UnknownVoice, match="alloy"):
            tts.synthesize("hi", voice="robot")
        run = tts.synthesize("One. Two. Three. Four.", sample_rate=24000)
        async for _ in run:
            run.cancel()
        assert [c async for c in run] == []
    finally:
        await tts.aclose()


async def test_errors_are_typed_and_the_key_never_shows(audio_server, caplog):
    caplog.set_level(logging.DEBUG)
    url, recorder = audio_server
    stt = OpenAISTT(url, api_key=Secret("sk-wrong-key-999"), **op())
    tts = OpenAITTS(url, api_key=Secret(KEY), **op())
    try:
        with pytest.raises(EndpointAuthError) as info:
            await stt.transcribe(bytes(32000), 16000)
        # The server quoted the key in its message and a header.
        assert str(info.value) == (
            "endpoint refused the credentials (HTTP 401): Incorrect API key provided: ********"
        )
        recorder.fail_next = 503
        with pytest.raises(EndpointServerError) as failed:
            [c async for c in tts.synthesize("Hello.")]
        assert str(failed.value) == "endpoint failed (HTTP 503): simulated failure for ********"
    finally:
        await stt.aclose()
        await tts.aclose()
    assert "sk-wrong-key-999" not in caplog.text and KEY not in caplog.text


async def speak(url: str, text: str, rate: int) -> bytes:
    tts = OpenAITTS(url, api_key=Secret(KEY), **op())
    try:
        chunks = [c async for c in tts.synthesize(text, sample_rate=rate)]
    finally:
        await tts.aclose()
    assert all(c.sample_rate == rate for c in chunks)
    return b"".join(c.pcm for c in chunks)


@pytest.mark.parametrize("container", ["wav", "wav-streamed", "flac"])
async def test_container_answers_play_only_their_samples(audio_server, container):
    url, recorder = audio_server
    recorder.container = container
    pcm = await speak(url, "Your table is booked.", NATIVE_RATE)
    # Exactly the samples the server synthesized: no header, no trailing chunk
    # (each would click), at the rate the container gives.
    assert pcm == recorder.sent_pcm and len(pcm) > 20000


async def test_container_at_another_rate_is_resampled_to_the_sink(audio_server, whisper):
    url, recorder = audio_server
    recorder.container = "wav"
    pcm = await speak(url, "Please cancel my subscription.", 16000)
    sent_s = len(recorder.sent_pcm) / 2 / NATIVE_RATE
    assert abs(len(pcm) / 2 / 16000 - sent_s) < 0.005
    heard = await whisper.transcribe(pcm, 16000)
    assert normalise(heard.text) == normalise("Please cancel my subscription.")


async def test_a_format_that_cannot_be_played_is_a_clear_error(audio_server):
    url, recorder = audio_server
    recorder.container = "aac"
    with pytest.raises(MalformedStream) as info:
        await speak(url, "Hello.", 24000)
    assert str(info.value) == (
        "speech server answered 'audio/aac', which voxloop cannot play "
        "(raw PCM, WAV, FLAC, Ogg and MP3 are played)"
    )


async def test_url_policy_applies_to_speech_servers():
    with pytest.raises(URLPolicyError):
        OpenAISTT("http://speech.example.com/v1")
    stt = OpenAISTT(
        "https://speech.example.com/v1",
        resolver=StaticResolver({"speech.example.com": ["10.0.0.7"]}),
    )
    try:
        with pytest.raises(URLPolicyError, match="private"):
            await stt.transcribe(bytes(3200), 16000)
    finally:
        await stt.aclose()

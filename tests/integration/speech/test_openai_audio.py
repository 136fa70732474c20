"""OpenAI-compatible remote STT/TTS against a loopback server speaking the real protocol."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jiwer
import pytest
import websockets
from whisper_normalizer.english import EnglishTextNormalizer

from audio.reframe import Reframer
from audio.resample import resample_all
from audio.wav import read_wav
from runtime.endpoints import StaticResolver, URLPolicy
from runtime.errors import EndpointAuthError, EndpointServerError, MalformedStream, URLPolicyError
from runtime.llm.reference import ReplyPlan
from runtime.secret import Secret
from runtime.speech.engines.openai_audio import OpenAISTT, OpenAITTS, RemoteSpeech
from runtime.speech.engines.piper import PiperTTS
from runtime.speech.engines.whisper import WhisperSTT
from runtime.speech.tts import UnknownVoice

from ...helpers import SPEECH, EndpointThread, serve_asgi
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


async def speaker(run: RemoteSpeech, first: asyncio.Event, *, closes: bool) -> None:
    """Plays ``run`` as the conversation's speaker does, into a sink that stays full."""
    try:
        async for _ in run:
            first.set()
            await asyncio.Event().wait()
    finally:
        if closes:
            await run.aclose()


async def test_a_speech_cut_mid_stream_closes_its_answer_and_logs_nothing(audio_server, caplog):
    """A barge-in cancels the speaker while it waits on the sink, between two chunks: the
    answer is closed at once (the server sees the client go) and nothing is logged at ERROR,
    whether the speaker closes the run or just drops it, and again at the next barge-in."""
    url, recorder = audio_server
    recorder.hold = asyncio.Event()
    tts = OpenAITTS(url, api_key=Secret(KEY), **op())
    text = "Let me tell you about the weather in Paris this week. Monday starts cloudy."
    try:
        for closes in (False, True, False, True):
            first = asyncio.Event()
            task = asyncio.create_task(
                speaker(tts.synthesize(text, sample_rate=16000), first, closes=closes)
            )
            await first.wait()
            task.cancel()  # the barge-in
            await asyncio.wait([task])
            assert task.cancelled()
            del task
            gc.collect()  # a dropped run is finalised now, not at some later collection
            assert await recorder.streams_ended.get() == "client gone"
        recorder.hold.set()
        chunks = [c async for c in tts.synthesize("Hello.", sample_rate=16000)]
        assert await recorder.streams_ended.get() == "complete"
        assert sum(len(c.pcm) for c in chunks) > 0
    finally:
        await tts.aclose()
    gc.collect()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


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


# -- voxloop serve with the remote engines in its settings -----------------------------------


def _serve(tmp_path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "serve", "--port", "0", "--data-dir",
         str(tmp_path / "data"), "--no-access-log"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "VOXLOOP_API_KEYS": "vk-remote-engines", **env},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"VOXLOOP_STT": "openai"}, "voxloop: error: VOXLOOP_STT=openai needs VOXLOOP_STT_BASE_URL "
         "(an OpenAI-compatible https://host/v1)"),
        ({"VOXLOOP_TTS": "openai"}, "voxloop: error: VOXLOOP_TTS=openai needs VOXLOOP_TTS_BASE_URL "
         "(an OpenAI-compatible https://host/v1)"),
        ({"VOXLOOP_STT": "assemblyai"}, "voxloop: error: VOXLOOP_STT=assemblyai needs "
         "VOXLOOP_STT_API_KEY"),
        ({"VOXLOOP_TTS": "whisper"}, "voxloop: error: VOXLOOP_TTS='whisper' is not a TTS engine "
         "(available: piper, espeak, openai)"),
        ({"VOXLOOP_STT": "openai", "VOXLOOP_STT_BASE_URL": "notaurl"}, "voxloop: error: "
         "VOXLOOP_STT_BASE_URL: URL scheme must be https, not none"),
        ({"VOXLOOP_STT": "openai", "VOXLOOP_STT_BASE_URL": "http://stt.example.com/v1"},
         "voxloop: error: VOXLOOP_STT_BASE_URL: URL scheme must be https; plain http is allowed "
         "only for private hosts on the operator's allowlist (VOXLOOP_ALLOW_PRIVATE_ENDPOINTS)"),
        ({"VOXLOOP_TTS": "openai", "VOXLOOP_TTS_BASE_URL": "https://127.0.0.1:1/v1"},
         "voxloop: error: VOXLOOP_TTS_BASE_URL: host '127.0.0.1' resolves to a loopback address "
         "(127.0.0.1), which is not allowed; to allow it, add the host or its network to "
         "VOXLOOP_ALLOW_PRIVATE_ENDPOINTS"),
    ],
)  # fmt: skip
def test_serve_refuses_a_remote_engine_without_its_settings(tmp_path, env, line):
    proc = _serve(tmp_path, env)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (2, "", line + "\n")


async def test_serve_speaks_through_the_remote_engines_its_settings_name(audio_server, tmp_path):
    url, recorder = audio_server
    reply = "It is sunny in Boston."
    with EndpointThread(ReplyPlan(replies=(reply,), ttft_ms=20, itl_ms=5), api_key="sk-l") as llm:
        proc = _serve(tmp_path, {
            "VOXLOOP_ALLOW_PRIVATE_ENDPOINTS": "127.0.0.1",
            "VOXLOOP_STT": "openai", "VOXLOOP_STT_BASE_URL": url,
            "VOXLOOP_STT_MODEL": "whisper-remote", "VOXLOOP_STT_API_KEY": KEY,
            "VOXLOOP_TTS": "openai", "VOXLOOP_TTS_BASE_URL": url,
            "VOXLOOP_TTS_MODEL": "tts-remote", "VOXLOOP_TTS_API_KEY": KEY,
        })  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        try:
            http = proc.stdout.readline().rsplit(" ", 1)[1].strip()
            headers = {"Authorization": "Bearer vk-remote-engines"}
            # A stored agent names one of the remote engine's own voices.
            async with httpx.AsyncClient(base_url=http, headers=headers) as rest:
                created = await rest.post("/v1/agents", json={
                    "name": "Remote", "system_prompt": "Be brief.", "voice": {"voice_id": "nova"},
                    "llm": [{"base_url": llm.base_url, "model": "m", "api_key": "sk-l"}],
                })  # fmt: skip
                assert created.status_code == 201, created.text
                assert created.json().get("warnings", []) == []
            async with websockets.connect("ws" + http[4:] + "/v1/ws",
                                          additional_headers=headers) as ws:  # fmt: skip
                await ws.send(json.dumps({"type": "session.update",
                                          "session": {"agent_id": created.json()["id"]}}))  # fmt: skip
                seen: list[dict[str, Any]] = []
                while not seen or seen[-1]["type"] != "session.ready":
                    seen.append(json.loads(await ws.recv()))
                audio = read_wav(SPEECH / "shared-03-piper.wav")
                pcm = resample_all(audio.mono(), audio.sample_rate, 24000) + bytes(48000 * 2)

                async def read() -> None:
                    while seen[-1]["type"] != "reply.done":
                        seen.append(json.loads(await ws.recv()))

                reader = asyncio.create_task(read())
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                for i in range(0, len(pcm), 4800):  # 100 ms messages, in real time
                    chunk = base64.b64encode(pcm[i : i + 4800]).decode()
                    await ws.send(json.dumps({"type": "input.audio", "audio": chunk}))
                    await asyncio.sleep(max(0.0, t0 + (i + 4800) / 48000 - loop.time()))
                async with asyncio.timeout(120):
                    await reader
                await ws.send(json.dumps({"type": "session.end"}))
                async for _ in ws:
                    pass
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            log = proc.stderr.read()
            proc.stdout.close()
            proc.stderr.close()
    user = next(d for d in seen if d["type"] == "transcript.user")
    assert normalise(user["text"]) == normalise(
        "How long does it take to drive from Boston to New York?"
    )
    agent = next(d for d in seen if d["type"] == "transcript.agent")
    assert agent["text"] == reply
    heard = b"".join(base64.b64decode(d["data"]) for d in seen if d["type"] == "reply.audio")
    assert len(heard) > 24000 * 2 * 0.5  # the reply spoken, from the remote TTS
    # The engines are the settings' ones: their models and key reached the audio server.
    paths = {(r["path"], r["model"]) for r in recorder.requests}
    assert paths == {("transcriptions", "whisper-remote"), ("speech", "tts-remote")}
    assert {r["voice"] for r in recorder.requests if r["path"] == "speech"} == {"nova"}
    lines = [json.loads(x) for x in log.splitlines() if x.startswith("{")]
    ready = next(x for x in lines if x["msg"] == "speech engines ready")
    assert (ready["stt"], ready["tts"]) == ("openai", "openai")
    # The session's end line says how its audio was paced.
    over = next(x for x in lines if x["msg"] == "session over")
    assert {"pacing_p50_ms", "pacing_p99_ms", "pacing_max_ms", "underrun_ms"} <= set(over)
    assert 0 <= over["pacing_p50_ms"] <= over["pacing_p99_ms"] <= over["pacing_max_ms"]
    assert KEY not in log and "Traceback" not in log

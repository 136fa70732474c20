"""A loopback OpenAI-compatible audio server backed by the real embedded engines.

``POST /v1/audio/transcriptions`` (multipart ``file`` + ``model``) transcribes
with Whisper; ``POST /v1/audio/speech`` (``response_format: "pcm"``) streams
24 kHz PCM16 from Piper — the wire protocol of OpenAI's audio endpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from audio.wav import read_wav
from runtime.speech.engines.piper import PiperTTS
from runtime.speech.engines.whisper import WhisperSTT


@dataclass
class Recorder:
    requests: list[dict[str, Any]] = field(default_factory=list)
    fail_next: int | None = None


def make_app(stt: WhisperSTT, tts: PiperTTS, api_key: str, recorder: Recorder) -> Starlette:
    def unauthorized(request: Request) -> Response | None:
        if request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse(
                {"error": {"message": "Incorrect API key provided"}}, status_code=401
            )
        if recorder.fail_next is not None:
            status, recorder.fail_next = recorder.fail_next, None
            return JSONResponse({"error": {"message": "simulated failure"}}, status_code=status)
        return None

    async def transcriptions(request: Request) -> Response:
        await request.body()  # like real servers: read the upload before answering
        denied = unauthorized(request)
        if denied:
            return denied
        async with request.form() as form:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                return JSONResponse({"error": {"message": "'file' is required"}}, status_code=400)
            audio = read_wav(await upload.read())
            recorder.requests.append(
                {
                    "path": "transcriptions",
                    "model": form.get("model"),
                    "seconds": audio.duration_s,
                    "prompt": form.get("prompt"),
                }
            )
        result = await stt.transcribe(audio.mono(), audio.sample_rate)
        return JSONResponse({"text": result.text})

    async def speech(request: Request) -> Response:
        denied = unauthorized(request)
        if denied:
            return denied
        body = await request.json()
        recorder.requests.append({"path": "speech", **body})
        if body.get("response_format") != "pcm":
            return JSONResponse({"error": {"message": "only pcm here"}}, status_code=400)

        async def pcm():
            async for chunk in tts.synthesize(body["input"], sample_rate=24000):
                yield chunk.pcm

        return StreamingResponse(pcm(), media_type="audio/pcm")

    return Starlette(
        routes=[
            Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
            Route("/v1/audio/speech", speech, methods=["POST"]),
        ]
    )

"""A loopback OpenAI-compatible audio server backed by the real embedded engines.

``POST /v1/audio/transcriptions`` (multipart ``file`` + ``model``) transcribes
with Whisper; ``POST /v1/audio/speech`` (``response_format: "pcm"``) streams
24 kHz PCM16 from Piper — the wire protocol of OpenAI's audio endpoints.

Like servers that ignore ``response_format``, it can answer with a container
instead (``Recorder.container``): a WAV at Piper's own 22.05 kHz with a
``LIST`` chunk before the audio and another after it; a WAV streamed with
placeholder sizes and labelled ``application/octet-stream``; FLAC; or a
format nobody decodes here (``audio/aac``). Like a careless server, its error
answers quote the key they were given (message and header).
"""

from __future__ import annotations

import asyncio
import io
import struct
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import soundfile
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from audio.wav import read_wav
from runtime.speech.engines.piper import PiperTTS
from runtime.speech.engines.whisper import WhisperSTT

Container = Literal["pcm", "wav", "wav-streamed", "flac", "aac"]


@dataclass
class Recorder:
    requests: list[dict[str, Any]] = field(default_factory=list)
    fail_next: int | None = None
    container: Container = "pcm"
    sent_pcm: bytes = b""  # the samples of the last speech answer, as synthesized
    # Set: a pcm answer sends its first audio, then holds the rest until it is set (a server
    # still streaming when the client goes away).
    hold: asyncio.Event | None = None
    streams_ended: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    """How each pcm answer ended: ``complete`` or ``client gone`` (the client closed it)."""


def make_app(stt: WhisperSTT, tts: PiperTTS, api_key: str, recorder: Recorder) -> Starlette:
    def unauthorized(request: Request) -> Response | None:
        presented = request.headers.get("authorization", "")
        echo = {"x-presented-authorization": presented}
        key = presented.removeprefix("Bearer ")
        if presented != f"Bearer {api_key}":
            return JSONResponse(
                {"error": {"message": f"Incorrect API key provided: {key}"}},
                status_code=401,
                headers=echo,
            )
        if recorder.fail_next is not None:
            status, recorder.fail_next = recorder.fail_next, None
            return JSONResponse(
                {"error": {"message": f"simulated failure for {key}"}},
                status_code=status,
                headers=echo,
            )
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

        if recorder.container == "pcm":

            async def pcm():
                ended = "client gone"
                try:
                    async for chunk in tts.synthesize(body["input"], sample_rate=24000):
                        recorder.sent_pcm += chunk.pcm
                        yield chunk.pcm
                        if recorder.hold is not None:
                            await recorder.hold.wait()
                    ended = "complete"
                finally:
                    recorder.streams_ended.put_nowait(ended)

            recorder.sent_pcm = b""
            return StreamingResponse(pcm(), media_type="audio/pcm")
        samples = b"".join(
            [c.pcm async for c in tts.synthesize(body["input"], sample_rate=NATIVE_RATE)]
        )
        recorder.sent_pcm = samples
        return container_response(recorder.container, samples)

    return Starlette(
        routes=[
            Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
            Route("/v1/audio/speech", speech, methods=["POST"]),
        ]
    )


NATIVE_RATE = 22050


def _chunk(name: bytes, body: bytes, size: int | None = None) -> bytes:
    size = len(body) if size is None else size
    return name + struct.pack("<I", size) + body + (b"\0" if len(body) % 2 else b"")


def container_response(container: Container, pcm: bytes) -> Response:
    fmt = _chunk(b"fmt ", struct.pack("<HHIIHH", 1, 1, NATIVE_RATE, NATIVE_RATE * 2, 2, 16))
    if container == "wav":
        info = _chunk(b"LIST", b"INFOISFT\x0d\x00\x00\x00Lavf61.7.100\x00")
        body = b"WAVE" + info + fmt + _chunk(b"data", pcm) + _chunk(b"id3 ", b"ID3\x04tail")
        wav = b"RIFF" + struct.pack("<I", len(body)) + body
        return Response(wav, media_type="audio/wav")
    if container == "wav-streamed":
        head = b"RIFF\xff\xff\xff\xffWAVE" + fmt + b"data\xff\xff\xff\xff"

        async def pieces():
            yield head[:7]
            yield head[7:]
            for at in range(0, len(pcm), 4001):
                yield pcm[at : at + 4001]

        return StreamingResponse(pieces(), media_type="application/octet-stream")
    if container == "flac":
        buf = io.BytesIO()
        soundfile.write(buf, np.frombuffer(pcm, "<i2"), NATIVE_RATE, format="FLAC")
        return Response(buf.getvalue(), media_type="audio/flac")
    return Response(b"\xff\xf1" + bytes(200), media_type="audio/aac")

"""A loopback server speaking AssemblyAI's Universal-Streaming v3 protocol.

Transcripts come from the real embedded Whisper. A wrong key is refused in the
WebSocket handshake (HTTP 401, a JSON body); otherwise ``Begin`` on connect;
binary PCM frames buffer; ``ForceEndpoint`` ends the turn (an unformatted
end-of-turn ``Turn``, then the formatted one when ``format_turns=true``);
``Terminate`` gets ``Termination`` and a 1000 close.

Behaviours of the real service a test can switch on (:class:`ServerBehaviour`):

* ``partial_every_s``: while audio streams in, an unformatted ``Turn`` with
  ``end_of_turn: false`` (the running transcript) after every that many
  seconds of audio;
* ``end_turn_after_silence_ms``: the server ends a turn on its own once that
  much silence follows speech (its own endpointing), without ``ForceEndpoint``;
* ``error``: right after ``Begin``, an ``Error`` message (``error_code``,
  ``error``) and a close with that code; ``close``: a close with a code and
  reason and no ``Error`` message before it.

Like a careless real server, it quotes the key it was given: in the handshake
rejection's body, in ``Error`` messages and in close reasons.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlparse

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from runtime.speech.engines.whisper import WhisperSTT


@dataclass
class SessionLog:
    params: dict[str, str] = field(default_factory=dict)
    audio_bytes: int = 0
    messages: list[dict[str, object]] = field(default_factory=list)
    sent: list[dict[str, object]] = field(default_factory=list)
    terminated: bool = False


@dataclass
class ServerBehaviour:
    partial_every_s: float | None = None
    end_turn_after_silence_ms: int | None = None
    error: tuple[int, str] | None = None  # (error_code, message); "{key}" is the presented key
    close: tuple[int, str] | None = None  # a close without an Error message first


def make_process_request(api_key: str):
    """Refuses a wrong key in the handshake, as the service does (HTTP 401)."""

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        presented = request.headers.get("Authorization", "")
        if presented == api_key:
            return None
        body = json.dumps({"error": f"Invalid API key: {presented}"})
        response = connection.respond(HTTPStatus.UNAUTHORIZED, body)
        response.headers["Content-Type"] = "application/json"
        return response

    return process_request


def make_handler(
    stt: WhisperSTT,
    api_key: str,
    sessions: list[SessionLog],
    behaviour: ServerBehaviour | None = None,
):
    behaviour = behaviour or ServerBehaviour()

    async def handler(ws: ServerConnection) -> None:
        log = SessionLog()
        sessions.append(log)
        assert ws.request is not None
        query = parse_qs(urlparse(ws.request.path).query)
        log.params = {k: v[0] for k, v in query.items()}
        presented = ws.request.headers.get("Authorization", "")
        rate = int(log.params.get("sample_rate", "16000"))
        formatted = log.params.get("format_turns", "").lower() == "true"  # the SDK sends "True"
        started = time.time()

        async def send(doc: dict[str, object]) -> None:
            log.sent.append(doc)
            await ws.send(json.dumps(doc))

        await send({"type": "Begin", "id": str(uuid.uuid4()), "expires_at": int(started) + 600})
        if behaviour.close is not None:
            code, reason = behaviour.close
            await ws.close(code, reason.replace("{key}", presented))
            return
        if behaviour.error is not None:
            code, text = behaviour.error
            text = text.replace("{key}", presented)
            await send({"type": "Error", "error_code": code, "error": text})
            await ws.close(code, text[:120])
            return
        buffer = bytearray()
        turn_order = 0
        next_partial = behaviour.partial_every_s
        heard_speech = False
        silence_ms = 0.0

        async def end_turn() -> None:
            nonlocal turn_order
            result = await stt.transcribe(bytes(buffer), rate)
            words = [
                {"start": 0, "end": 0, "text": w, "confidence": 0.9, "word_is_final": True}
                for w in result.text.split()
            ]
            base = {
                "type": "Turn",
                "turn_order": turn_order,
                "end_of_turn_confidence": 0.9,
                "words": words,
            }
            raw = result.text.lower().replace(",", "").replace(".", "").replace("?", "")
            await send(
                {
                    **base,
                    "turn_is_formatted": False,
                    "end_of_turn": not formatted,
                    "transcript": raw,
                }
            )
            if formatted:
                await send(
                    {
                        **base,
                        "turn_is_formatted": True,
                        "end_of_turn": True,
                        "transcript": result.text,
                    }
                )
            turn_order += 1
            buffer.clear()

        async for message in ws:
            if isinstance(message, bytes):
                buffer += message
                log.audio_bytes += len(message)
                seconds = len(buffer) / 2 / rate
                if next_partial is not None and seconds >= next_partial:
                    next_partial += behaviour.partial_every_s or 0
                    partial = await stt.transcribe(bytes(buffer), rate)
                    await send(
                        {
                            "type": "Turn",
                            "turn_order": turn_order,
                            "end_of_turn": False,
                            "turn_is_formatted": False,
                            "end_of_turn_confidence": 0.1,
                            "transcript": partial.text.lower().strip(" .,?"),
                            "words": [],
                        }
                    )
                if behaviour.end_turn_after_silence_ms is not None:
                    x = np.frombuffer(message[: len(message) // 2 * 2], "<i2").astype(np.float64)
                    loud = x.size > 0 and float(np.sqrt(np.mean(x**2))) > 300
                    heard_speech = heard_speech or loud
                    silence_ms = 0.0 if loud else silence_ms + x.size / rate * 1000
                    if heard_speech and silence_ms >= behaviour.end_turn_after_silence_ms:
                        await end_turn()
                        heard_speech, silence_ms = False, 0.0
                        next_partial = behaviour.partial_every_s
                continue
            doc = json.loads(message)
            log.messages.append(doc)
            if doc.get("type") == "ForceEndpoint":
                await end_turn()
                next_partial = behaviour.partial_every_s
            elif doc.get("type") == "Terminate":
                log.terminated = True
                await send(
                    {
                        "type": "Termination",
                        "audio_duration_seconds": int(log.audio_bytes / 2 / rate),
                        "session_duration_seconds": int(time.time() - started),
                    }
                )
                await ws.close(1000)
                return

    return handler

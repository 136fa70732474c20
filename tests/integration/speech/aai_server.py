"""A loopback server speaking AssemblyAI's Universal-Streaming v3 protocol.

Transcripts come from the real embedded Whisper. Begin on connect; binary
PCM frames buffer; ``ForceEndpoint`` ends the turn (an unformatted partial,
then the end-of-turn ``Turn``, formatted when ``format_turns=true``);
``Terminate`` gets ``Termination`` and a 1000 close. A wrong key is closed
with 1008, like a policy violation.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlparse

from websockets.asyncio.server import ServerConnection

from runtime.speech.engines.whisper import WhisperSTT


@dataclass
class SessionLog:
    params: dict[str, str] = field(default_factory=dict)
    audio_bytes: int = 0
    messages: list[dict[str, object]] = field(default_factory=list)
    terminated: bool = False


def make_handler(stt: WhisperSTT, api_key: str, sessions: list[SessionLog]):
    async def handler(ws: ServerConnection) -> None:
        log = SessionLog()
        sessions.append(log)
        assert ws.request is not None
        query = parse_qs(urlparse(ws.request.path).query)
        log.params = {k: v[0] for k, v in query.items()}
        if ws.request.headers.get("Authorization") != api_key:
            await ws.close(1008, "Invalid API key")
            return
        rate = int(log.params.get("sample_rate", "16000"))
        formatted = log.params.get("format_turns", "").lower() == "true"  # the SDK sends "True"
        started = time.time()
        await ws.send(
            json.dumps({"type": "Begin", "id": str(uuid.uuid4()), "expires_at": int(started) + 600})
        )
        buffer = bytearray()
        turn_order = 0
        async for message in ws:
            if isinstance(message, bytes):
                buffer += message
                log.audio_bytes += len(message)
                continue
            doc = json.loads(message)
            log.messages.append(doc)
            if doc.get("type") == "ForceEndpoint":
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
                await ws.send(
                    json.dumps(
                        {
                            **base,
                            "turn_is_formatted": False,
                            "end_of_turn": not formatted,
                            "transcript": raw,
                        }
                    )
                )
                if formatted:
                    await ws.send(
                        json.dumps(
                            {
                                **base,
                                "turn_is_formatted": True,
                                "end_of_turn": True,
                                "transcript": result.text,
                            }
                        )
                    )
                turn_order += 1
                buffer.clear()
            elif doc.get("type") == "Terminate":
                log.terminated = True
                await ws.send(
                    json.dumps(
                        {
                            "type": "Termination",
                            "audio_duration_seconds": int(log.audio_bytes / 2 / rate),
                            "session_duration_seconds": int(time.time() - started),
                        }
                    )
                )
                await ws.close(1000)
                return

    return handler

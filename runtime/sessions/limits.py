"""Per-worker limits: sessions, durations, buffers, queues (``VOXLOOP_*`` settings)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

RESUME_GRACE_S: Final = 30.0
# The words an on/off setting takes (any case).
_YES: Final = ("1", "true", "yes")
_NO: Final = ("0", "false", "no")


def positive_setting(env: Mapping[str, str], name: str, default: int) -> int:
    """The positive integer setting ``name`` (ASCII digits only), or ``default`` when unset.

    Raises:
        ValueError: the value is not a positive integer (the message names the setting).
    """
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isascii() or not raw.isdigit() or int(raw) <= 0:
        raise ValueError(f"{name} must be a positive integer")
    return int(raw)


@dataclass(frozen=True, slots=True)
class RunnerLimits:
    """Per-worker limits (environment: ``VOXLOOP_MAX_SESSIONS`` …; see docs/deployment.md).

    Attributes:
        max_sessions: live sessions per worker process.
        max_duration_s: session length when the credential sets none.
        resume_grace_s: how long a dropped session stays resumable.
        output_lead_ms: how far ``reply.audio`` may run ahead of real time.
        output_buffer_ms: how far synthesised audio may queue ahead of real time on
            the server (unsent; dropped on an interruption).
        input_buffer_ms: client audio held ahead of real time before dropping.
        outbound_messages: server events queued for a client before it is dropped.
        ready_timeout_s: time for the first message after the upgrade.
        unbound_per_credential: connections of one credential that may wait at
            once for their first message (they take no session slot; a connection
            stops counting once its first valid message arrives).
        client_stall_s: a client that takes none of the events waiting for it
            (in the event queue or the socket's write buffer) for this long is
            dropped with close 1008.
        close_timeout_s: time for a close frame to leave; the connection is then
            aborted (its descriptor released).
        single_llm_entry: accept one ``llm`` entry only, as the hosted API does
            (``VOXLOOP_LLM_SINGLE_ENTRY=1``; off: an entry and its fallbacks).
        early_decode: sessions decode a turn after 40 ms of silence for the speculative
            reply's request (``TurnDetection.speculate_ms``); ``VOXLOOP_EARLY_DECODE=0``
            turns it off, for more sessions per core at ~120 ms more to the first audio.
    """

    max_sessions: int = 16
    max_duration_s: int = 10_800
    resume_grace_s: float = RESUME_GRACE_S
    output_lead_ms: int = 300
    output_buffer_ms: int = 300
    input_buffer_ms: int = 2000
    outbound_messages: int = 512
    ready_timeout_s: float = 10.0
    unbound_per_credential: int = 16
    client_stall_s: float = 10.0
    close_timeout_s: float = 2.0
    single_llm_entry: bool = False
    early_decode: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RunnerLimits:
        """Read ``VOXLOOP_MAX_SESSIONS``, ``VOXLOOP_MAX_SESSION_SECONDS``,
        ``VOXLOOP_AUDIO_LEAD_MS``, ``VOXLOOP_AUDIO_BUFFER_MS``, ``VOXLOOP_INPUT_BUFFER_MS``,
        ``VOXLOOP_OUTBOUND_MESSAGES``, ``VOXLOOP_UNBOUND_PER_CREDENTIAL``,
        ``VOXLOOP_CLIENT_STALL_SECONDS``, ``VOXLOOP_LLM_SINGLE_ENTRY`` (``1``/``true``/``yes``),
        ``VOXLOOP_EARLY_DECODE`` (``0``/``false``/``no`` turns it off; ``1``/``true``/``yes``).

        Raises:
            ValueError: a number is not a positive integer, or ``VOXLOOP_EARLY_DECODE``
                is not one of the words above.
        """

        def number(name: str, default: int) -> int:
            return positive_setting(env, name, default)

        d = cls()
        return cls(
            max_sessions=number("VOXLOOP_MAX_SESSIONS", d.max_sessions),
            max_duration_s=number("VOXLOOP_MAX_SESSION_SECONDS", d.max_duration_s),
            output_lead_ms=number("VOXLOOP_AUDIO_LEAD_MS", d.output_lead_ms),
            output_buffer_ms=number("VOXLOOP_AUDIO_BUFFER_MS", d.output_buffer_ms),
            input_buffer_ms=number("VOXLOOP_INPUT_BUFFER_MS", d.input_buffer_ms),
            outbound_messages=number("VOXLOOP_OUTBOUND_MESSAGES", d.outbound_messages),
            unbound_per_credential=number(
                "VOXLOOP_UNBOUND_PER_CREDENTIAL", d.unbound_per_credential
            ),
            client_stall_s=float(number("VOXLOOP_CLIENT_STALL_SECONDS", int(d.client_stall_s))),
            single_llm_entry=env.get("VOXLOOP_LLM_SINGLE_ENTRY", "").strip().lower() in _YES,
            early_decode=_switch(env, "VOXLOOP_EARLY_DECODE", d.early_decode),
        )


def _switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    """An on/off setting: ``1``/``true``/``yes`` or ``0``/``false``/``no`` (any case).

    Raises:
        ValueError: any other value, named in the message.
    """
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _YES:
        return True
    if raw in _NO:
        return False
    raise ValueError(f"{name} must be 1, true or yes, or 0, false or no")

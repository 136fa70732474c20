"""The session host: one place that turns a configured session into a running conversation.

Theory of operation
-------------------
Network adapters (the Voice Agent WebSocket in ``runtime.server.realtime``, the
telephony bridge, the browser page's socket) own a socket each and nothing else.
They hand the runner a :class:`~runtime.protocol.events.SessionPatch` (or a
resume request) and a callback for outgoing protocol events, and get back a
:class:`LiveSession`. This package imports none of them.

One module per part:

* :mod:`~runtime.sessions.runner` — :class:`SessionRunner` (one per worker
  process) binds a session to a stored agent (``agent_id``, the only key) or to an
  inline configuration and merges in the server's default endpoint
  (``VOXLOOP_LLM_*``) when neither names an ``llm``; decrypts the endpoint key only
  in memory, as a :class:`~runtime.secret.Secret`; checks the endpoint URL again
  with the URL policy; enforces the limits; keeps a dropped session's state for
  the resume grace period.
* :mod:`~runtime.sessions.spec` — :class:`SessionSpec`, the effective
  configuration and how a ``session.update`` patches it; the server's default endpoint.
* :mod:`~runtime.sessions.limits` — :class:`RunnerLimits` (``VOXLOOP_*`` settings).
* :mod:`~runtime.sessions.principals` — :class:`Principal`: who opened the connection.
* :mod:`~runtime.sessions.resume` — :class:`ResumableState` and the
  :class:`SessionStateStore` it waits in (memory for one worker).
* :mod:`~runtime.sessions.engines` — :class:`Engines`, the shared speech engines.
* :mod:`~runtime.sessions.ingress` — :class:`AudioIngress`: wire bytes → decoded and
  resampled once to 16 kHz → 20 ms frames in a bounded buffer (drop-oldest,
  ``audio_rate_violation`` when a client sends faster than real time) → released
  to the core in real time; silence keeps the timeline moving when a client stops.
* :mod:`~runtime.sessions.playout` — :class:`PacedSink`: admits audio only a small
  bounded lead (300 ms by default) ahead of real time; its position is the playout
  truth for what the listener heard. Audio is produced at the output encoding's
  rate and encoded once (μ-law in → μ-law out is not transcoded twice).
* :mod:`~runtime.sessions.live` — :class:`LiveSession` owns one
  :class:`~runtime.conversation.session.ConversationSession` and every task of
  the session in one ``TaskGroup``, and renders core events as protocol events,
  including the split of a reply around a client tool call (``transcript.agent``
  → ``tool.call`` → ``reply.done``, and a new ``reply.started`` when the answer
  continues after ``tool.result``).
* :mod:`~runtime.sessions.errors` — :class:`SessionRefused`, the typed refusal.
"""

from runtime.sessions.engines import Engines, EnginesUnavailable, load_failure
from runtime.sessions.errors import SessionRefused
from runtime.sessions.ingress import FRAME_MS, AudioIngress
from runtime.sessions.limits import RESUME_GRACE_S, RunnerLimits
from runtime.sessions.live import Emit, EndReason, LiveSession
from runtime.sessions.playout import PacedSink, wire_encoder
from runtime.sessions.principals import Principal, key_owner, token_hash
from runtime.sessions.resume import MemorySessionStore, ResumableState, SessionStateStore
from runtime.sessions.runner import SessionRunner
from runtime.sessions.spec import SessionSpec, default_llm_from_env

__all__ = [
    "FRAME_MS",
    "RESUME_GRACE_S",
    "AudioIngress",
    "Emit",
    "EndReason",
    "Engines",
    "EnginesUnavailable",
    "LiveSession",
    "MemorySessionStore",
    "PacedSink",
    "Principal",
    "ResumableState",
    "RunnerLimits",
    "SessionRefused",
    "SessionRunner",
    "SessionSpec",
    "SessionStateStore",
    "default_llm_from_env",
    "key_owner",
    "load_failure",
    "token_hash",
    "wire_encoder",
]

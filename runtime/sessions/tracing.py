"""OpenTelemetry traces of answered turns (the optional ``otel`` extra).

With ``VOXLOOP_OTEL_TRACES=1`` each answered user turn becomes a ``voxloop.turn`` span
with its parts as children, laid end to end as the voice-to-voice time is defined
(``v2v = endpointing + stt + first_sentence + tts_first_audio + overhead``):
``voxloop.endpointing`` (the silence that ended the turn), ``voxloop.stt`` (the final
transcript), ``voxloop.llm`` (request to the first speakable segment; the endpoint's
``ttft_ms`` as an attribute) and ``voxloop.tts`` (to the first audio). Every span
carries ``voxloop.session_id``, ``voxloop.agent_id`` and ``voxloop.reply_id``; no
transcript text and no secrets.

Spans go to the tracer provider the process has: one set up by
``opentelemetry-instrument`` or the host application, or, when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set and ``opentelemetry-exporter-otlp`` is
installed, an OTLP exporter configured here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from runtime.conversation import events as core

PARTS = (
    ("voxloop.endpointing", "endpointing_ms"),
    ("voxloop.stt", "stt_final_ms"),
    ("voxloop.llm", "first_sentence_ms"),
    ("voxloop.tts", "tts_first_audio_ms"),
)


class TurnTracer:
    """Turns :class:`~runtime.conversation.events.TurnMetrics` into spans.

    Args:
        tracer: an OpenTelemetry ``Tracer``.
        clock_ns: the session clock (``perf_counter_ns``) the events' ``t_ns`` use.
    """

    def __init__(self, tracer: Any, clock_ns: Any = time.perf_counter_ns) -> None:
        self._tracer = tracer
        self._clock_ns = clock_ns

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TurnTracer | None:
        """The tracer ``VOXLOOP_OTEL_TRACES`` asks for, or ``None``.

        Raises:
            ValueError: traces are asked for but ``opentelemetry-sdk`` is not installed.
        """
        if env.get("VOXLOOP_OTEL_TRACES", "").strip().lower() not in ("1", "true", "yes"):
            return None
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            raise ValueError(
                "VOXLOOP_OTEL_TRACES is set but OpenTelemetry is not installed: "
                "pip install 'voxloop[otel]'"
            ) from None
        if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") and not isinstance(
            trace.get_tracer_provider(), TracerProvider
        ):
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )
            except ImportError:
                raise ValueError(
                    "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter is not installed: "
                    "pip install opentelemetry-exporter-otlp-proto-http"
                ) from None
            provider = TracerProvider()
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            trace.set_tracer_provider(provider)
        return cls(trace.get_tracer("voxloop"))

    def observe(self, session_id: str, agent_id: str | None, event: core.ConversationEvent) -> None:
        """Record the spans of one answered turn (other events are ignored)."""
        if not isinstance(event, core.TurnMetrics) or event.v2v_ms is None:
            return
        # Wall-clock nanoseconds of the event: the session clock is monotonic.
        end_ns = time.time_ns() - (self._clock_ns() - event.t_ns)
        start_ns = end_ns - round(event.v2v_ms * 1e6)
        attributes = {
            "voxloop.session_id": session_id, "voxloop.agent_id": agent_id or "inline",
            "voxloop.reply_id": event.reply_id, "voxloop.v2v_ms": event.v2v_ms,
            "voxloop.interrupted": event.interrupted, "voxloop.speculative": event.speculative,
        }  # fmt: skip
        turn = self._tracer.start_span("voxloop.turn", start_time=start_ns, attributes=attributes)
        from opentelemetry import trace

        context = trace.set_span_in_context(turn)
        at = start_ns
        for name, field in PARTS:
            ms = getattr(event, field)
            if ms is None:
                continue
            span_attributes: dict[str, Any] = {
                "voxloop.session_id": session_id,
                "voxloop.reply_id": event.reply_id,
            }
            if name == "voxloop.llm" and event.ttft_ms is not None:
                span_attributes["voxloop.ttft_ms"] = event.ttft_ms
            span = self._tracer.start_span(
                name, context=context, start_time=at, attributes=span_attributes
            )
            at += round(ms * 1e6)
            span.end(end_time=at)
        turn.end(end_time=end_ns)

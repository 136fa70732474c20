"""Turn spans: one per answered turn, its parts end to end, ids and no text."""

from __future__ import annotations

import itertools

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from runtime.conversation import events as core
from runtime.sessions.tracing import TurnTracer


def turn(**fields: object) -> core.TurnMetrics:
    values: dict[str, object] = {
        "t_ns": 5_000_000_000, "reply_id": "reply_3", "user_text": "secret words",
        "agent_text": "more words", "interrupted": False, "stt_final_ms": 120.0,
        "ttft_ms": 180.0, "first_sentence_ms": 260.0, "tts_first_audio_ms": 90.0,
        "v2v_ms": 800.0, "overhead_ms": 30.0, "endpointing_ms": 300.0, "speculative": False,
    }  # fmt: skip
    values.update(fields)
    return core.TurnMetrics(**values)  # type: ignore[arg-type]


@pytest.fixture
def recorded() -> tuple[TurnTracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # The event happened 2 s before "now" on the session clock.
    return TurnTracer(provider.get_tracer("t"), clock_ns=lambda: 7_000_000_000), exporter


def test_an_answered_turn_is_a_span_with_its_parts_end_to_end(recorded) -> None:
    tracer, exporter = recorded
    tracer.observe("sess_1", "agent_9", turn())
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert sorted(spans) == ["voxloop.endpointing", "voxloop.llm", "voxloop.stt", "voxloop.tts",
                             "voxloop.turn"]  # fmt: skip
    root = spans["voxloop.turn"]
    assert root.end_time - root.start_time == 800_000_000
    parts = [spans[n] for n in ("voxloop.endpointing", "voxloop.stt", "voxloop.llm", "voxloop.tts")]
    assert [p.end_time - p.start_time for p in parts] == [300e6, 120e6, 260e6, 90e6]
    assert parts[0].start_time == root.start_time
    assert all(a.end_time == b.start_time for a, b in itertools.pairwise(parts))
    assert all(p.parent is not None and p.parent.span_id == root.context.span_id for p in parts)
    assert dict(root.attributes or {}) == {
        "voxloop.session_id": "sess_1", "voxloop.agent_id": "agent_9",
        "voxloop.reply_id": "reply_3", "voxloop.v2v_ms": 800.0, "voxloop.interrupted": False,
        "voxloop.speculative": False,
    }  # fmt: skip
    assert (spans["voxloop.llm"].attributes or {})["voxloop.ttft_ms"] == 180.0
    # The transcripts never reach a span.
    for span in spans.values():
        assert "secret" not in str(dict(span.attributes or {}))


def test_other_events_and_unanswered_turns_make_no_span(recorded) -> None:
    tracer, exporter = recorded
    tracer.observe("sess_1", None, core.ReplyDone(t_ns=1, reply_id="r", status="completed"))
    tracer.observe("sess_1", None, turn(v2v_ms=None))
    tracer.observe("sess_1", None, turn(stt_final_ms=None))
    spans = exporter.get_finished_spans()
    assert sorted(s.name for s in spans) == ["voxloop.endpointing", "voxloop.llm", "voxloop.tts",
                                             "voxloop.turn"]  # fmt: skip
    assert dict(next(s for s in spans if s.name == "voxloop.turn").attributes or {})[
        "voxloop.agent_id"] == "inline"  # fmt: skip


def test_traces_asked_for_without_the_sdk_installed_is_one_clear_error(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_otel(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("opentelemetry"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    assert TurnTracer.from_env({}) is None
    monkeypatch.setattr(builtins, "__import__", no_otel)
    with pytest.raises(ValueError, match=r"pip install 'voxloop\[otel\]'"):
        TurnTracer.from_env({"VOXLOOP_OTEL_TRACES": "1"})

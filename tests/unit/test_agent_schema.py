"""The agent schema: body parsing and validation (pure), and the generated OpenAPI document."""

from __future__ import annotations

import json
from typing import Any

import pytest

from runtime.agents.schema import (
    MAX_DEPTH,
    MAX_MESSAGE,
    FieldError,
    openapi_document,
    parse_json,
    validate_agent,
)

VOICES = frozenset({"ivy"})
LLM_KEY = "sk-schema-secret-123"
BASE: dict[str, Any] = {"name": "A", "system_prompt": "p", "voice": "ivy"}


def error(body: Any, *, partial: bool = False) -> tuple[str, str]:
    with pytest.raises(FieldError) as info:
        validate_agent(body, partial=partial, voices=VOICES)
    assert LLM_KEY not in str(info.value)
    return info.value.param, info.value.message


def parse_error(raw: bytes) -> tuple[str, str]:
    with pytest.raises(FieldError) as info:
        parse_json(raw)
    return info.value.param, info.value.message


@pytest.mark.parametrize(
    ("raw", "param", "message"),
    [
        (b'{"input": {"x": NaN}}', "body", "NaN is not a JSON number"),
        (b'{"a": [Infinity]}', "body", "Infinity is not a JSON number"),
        (b'{"a": -Infinity}', "body", "-Infinity is not a JSON number"),
        (b'{"a": 1e400}', "body", "a number is too large"),
        (b'{"a": ' + b"9" * 5000 + b"}", "body", "is not valid JSON"),
        (b'{"name": "\\ud800"}', "name", "contains an unpaired surrogate (not valid Unicode)"),
        (b'{"\\udfff": 1}', "body", "contains an unpaired surrogate (not valid Unicode)"),
        (b'{"tools": [{"name": "a\\u0000b"}]}', "tools[0].name", "must not contain NUL characters"),
        (b"[" * 1000 + b"]" * 1000, "body", f"is nested deeper than {MAX_DEPTH} levels"),
        (b"[" * 100_000 + b"]" * 100_000, "body", f"is nested deeper than {MAX_DEPTH} levels"),
        (b'{"a": "\xff"}', "body", "is not valid JSON"),
        (b"{not json", "body", "is not valid JSON"),
    ],
)
def test_bodies_no_database_can_hold_are_refused(raw: bytes, param: str, message: str):
    assert parse_error(raw) == (param, message)


def test_nesting_up_to_the_limit_is_accepted():
    doc = parse_json(b'{"input": ' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}")
    assert isinstance(doc["input"], list)
    deep = b'{"input": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}"
    assert parse_error(deep)[1] == f"is nested deeper than {MAX_DEPTH} levels"
    # The legal surrogate pair is fine.
    assert parse_json(b'{"name": "\\ud83d\\ude00"}') == {"name": "\U0001f600"}


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({}, "name", "is required"),
        ({**BASE, "colour": 1}, "colour", "is not a known field"),
        ({**BASE, "input": {"format": {"encoding": "audio/pcm", "bits": 16}}}, "input.format.bits", "is not a known field"),
        ({**BASE, "input": {"turn_detection": {"min_silence": "500"}}}, "input.turn_detection.min_silence", "must be an integer"),
        ({**BASE, "input": {"turn_detection": {"min_silence": 10}}}, "input.turn_detection.min_silence", "input should be greater than or equal to 50"),
        ({**BASE, "input": {"turn_detection": {"interrupt_response": 1}}}, "input.turn_detection.interrupt_response", "must be true or false"),
        ({**BASE, "output": {"voice": "ivy"}}, "output.voice", "is not a known field"),
        ({**BASE, "output": {"volume": True}}, "output.volume", "must be a number"),
        ({**BASE, "name": "   "}, "name", "must not be empty"),
        ({**BASE, "voice": 7}, "voice", "must be an object"),
        ({**BASE, "voice": {"voice_id": "ivy", "speed": 2}}, "voice.speed", "is not a known field"),
        ({**BASE, "voice": "x" * 900_000}, "voice.voice_id", "string should have at most 200 characters"),
        ({**BASE, "llm": [{"base_url": "https://a.example/v1", "model": "m"}]}, "llm[0].api_key", "is required"),
        ({**BASE, "llm": [{"base_url": "https://a.example/v1", "model": "m\r\nX-Evil: 1", "api_key": LLM_KEY}]}, "llm[0].model", "must not contain line breaks or NUL characters"),
        ({**BASE, "llm": [{"base_url": "https://a.example/v1", "model": "m", "api_key": LLM_KEY + "\n"}]}, "llm[0].api_key", "must not contain line breaks or NUL characters"),
        ({**BASE, "llm": [{"base_url": "https://a.example/v1", "model": "m", "api_key": ""}]}, "llm[0].api_key", "must not be empty"),
        ({**BASE, "llm": [{"base_url": "https://a.example/v1", "model": "m", "api_key": LLM_KEY}] * 9}, "llm", "accepts at most 8 entries, not 9"),
        ({**BASE, "tools": [{"name": "a"}, {"name": "a"}]}, "tools", "tool name 'a' is used twice"),
        ({**BASE, "tools": [{"name": "a b"}]}, "tools[0].name", "string should match pattern '^[A-Za-z0-9_-]+$'"),
        ({**BASE, "tools": [{"name": "a", "timeout_seconds": 0}]}, "tools[0].timeout_seconds", "input should be greater than or equal to 1"),
        ({**BASE, "tools": [{"name": "a", "timeout_seconds": True}]}, "tools[0].timeout_seconds", "must be an integer"),
        ({**BASE, "tools": [{"name": "a", "http": {"url": "https://t.example", "headers": [{"name": "X\r\nY", "value": "v"}]}}]}, "tools[0].http.headers[0].name", "must be an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)"),
        ({**BASE, "tools": [{"name": "a", "http": {"url": "https://t.example", "headers": [{"name": "A", "value": "v", "remove": True}]}}]}, "tools[0].http.headers[0]", "give value or remove, not both"),
        ({**BASE, "tools": [{"name": "a", "http": {"url": "https://t.example", "headers": [{"name": "A", "value": "v"}, {"name": "a", "value": "w"}]}}]}, "tools[0].http.headers", "header 'a' is given twice"),
        ({**BASE, "tools": [{"name": "a", "http": {"url": "https://t.example", "http_method": "TRACE"}}]}, "tools[0].http.http_method", "input should be 'GET', 'POST', 'PUT', 'PATCH' or 'DELETE'"),
        ({**BASE, "tools": [{"name": "a", "http": {"url": "https://t.example", "retries": 1}}]}, "tools[0].http.retries", "is not a known field"),
        ({**BASE, "voice": "nova"}, "voice", "unknown voice 'nova'; known voices: ivy"),
        # What the WebSocket would refuse to run is refused here, in its words.
        ({**BASE, "input": {"format": {"encoding": "audio/pcmu", "sample_rate": 24000}}}, "input.format.sample_rate", "must be 8000 for audio/pcmu"),
        ({**BASE, "input": {"format": {"sample_rate": 16000}}}, "input.format.sample_rate", "must be 24000 for audio/pcm"),
        ({**BASE, "output": {"format": {"encoding": "audio/pcm", "sample_rate": 8000}}}, "output.format.sample_rate", "must be 24000 for audio/pcm"),
        ({**BASE, "input": {"turn_detection": {"min_silence": 900, "max_silence": 500}}}, "input.turn_detection.min_silence", "must not exceed max_silence"),
    ],
)  # fmt: skip
def test_invalid_bodies_name_the_field(body: dict[str, Any], param: str, message: str):
    assert error(body) == (param, message)


def test_update_keeps_absent_fields_and_refuses_null_for_required_ones():
    assert error({"name": None}, partial=True) == ("name", "must be a string")
    assert error({"llm": None}, partial=True) == ("llm", "must be a list")
    out = validate_agent({"greeting": None}, partial=True, voices=VOICES)
    assert out.fields == {"greeting": None} and out.tools is None and out.llm is None
    out = validate_agent({"llm": []}, partial=True, voices=VOICES)
    assert out.llm == [] and out.fields == {}


def test_a_valid_body_keeps_only_what_was_given_and_wraps_secrets():
    body = {
        **BASE,
        "input": {"turn_detection": {"min_silence": 400}, "keyterms": ["voxloop"]},
        "tools": [
            {
                "name": "lookup",
                "http": {"url": "https://t.example/x", "headers": {"Authorization": "Bearer t"}},
                "response_instructions": {"success": "Say it."},
            }
        ],
        "llm": [{"base_url": "https://a.example/v1", "model": "m", "api_key": LLM_KEY}],
    }
    out = validate_agent(body, partial=False, voices=VOICES)
    assert out.fields == {
        "name": "A",
        "system_prompt": "p",
        "voice": {"voice_id": "ivy"},
        "input": {"turn_detection": {"min_silence": 400}, "keyterms": ["voxloop"]},
        "output": {},
    }
    assert out.llm is not None and out.llm[0].api_key.reveal() == LLM_KEY
    assert LLM_KEY not in repr(out)
    assert out.tools is not None
    tool = out.tools[0]
    assert tool.doc == {
        "type": "function",
        "name": "lookup",
        "description": "",
        "parameters": {"type": "object", "properties": {}},
        "execution_mode": "interactive",
        "timeout_seconds": 120,
        "response_instructions": {"success": "Say it."},
        "http": {"url": "https://t.example/x", "http_method": "POST"},
    }
    assert [(h.name, h.value.reveal() if h.value else None) for h in tool.headers] == [
        ("Authorization", "Bearer t")
    ]


def test_error_messages_are_bounded():
    param, message = error({**BASE, "tools": [{"name": "a", "description": "d" * 30_000}]})
    assert param == "tools[0].description" and len(message) <= MAX_MESSAGE


def test_openapi_is_generated_from_the_models():
    doc = openapi_document("9.9")
    json.dumps(doc)  # serialisable
    schemas = doc["components"]["schemas"]
    assert schemas["AgentCreate"]["required"] == ["name", "system_prompt", "voice"]
    assert schemas["AgentCreate"]["additionalProperties"] is False
    assert schemas["InputConfig"]["additionalProperties"] is False
    assert "turn_detection" in schemas["InputConfig"]["properties"]
    assert schemas["LLMIn"]["properties"]["api_key"]["writeOnly"] is True
    assert "api_key" not in schemas["LLMOut"]["properties"]
    assert set(doc["paths"]) == {"/v1/agents", "/v1/agents/{agent_id}", "/v1/token", "/v1/voices"}
    put = doc["paths"]["/v1/agents/{agent_id}"]["put"]
    assert put["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/AgentUpdate"
    }
    assert set(put["responses"]) == {"200", "401", "404", "422", "503"}
    # Every reference resolves.
    text = json.dumps(doc)
    for name in {part.split('"')[0] for part in text.split("#/components/schemas/")[1:]}:
        assert name in schemas, name

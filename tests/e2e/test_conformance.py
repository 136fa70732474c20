"""Conformance with the hosted Voice Agent API's published documents, on the wire.

A real ``voxloop serve`` is driven with requests and event sequences written from the
published reference (REST agents, tokens, voices, errors; every client and server event;
lifecycle rules; close codes), by a client written here from that reference alone: it
speaks JSON over ``httpx`` and ``websockets`` and reads the server's frames as raw JSON,
never through voxloop's own codec. Every assertion message names the documented rule it
checks. The REST flows also run through ``minmo`` (a third-party client from PyPI that
deploys agents and mints tokens for the hosted API) with only its host changed.

The rules, as the published documents state them:

* REST errors: ``{code, message, param, request_id, errors?, detail}`` with the request
  id in ``X-Request-ID`` too; unknown routes and methods are JSON (``not_found``,
  ``method_not_allowed``).
* Tokens: ``GET /v1/token?expires_in_seconds=1..600`` -> ``{token, expires_in_seconds}``;
  ``POST /v1/tokens {expires_in_seconds: 1..600 (60)}`` -> ``{token, expires_at}``; a
  token is single-use and goes in ``Authorization: Bearer`` or ``?token=``.
* Session: the first message is ``session.update``; ``session.ready`` carries
  ``session_id``, ``expires_at``, ``resume_token`` and ``config`` whose ``input`` and
  ``output`` are ``{"type": "audio", …}`` with ``output.voice`` a string; later updates
  get ``session.updated``; ``session.end`` -> ``session.ended`` -> close 1000.
* Reply: ``reply.started`` -> ``reply.audio``… -> ``transcript.agent`` -> ``reply.done``.
* Tools: ``tool.call {call_id, name, arguments: object}`` then ``reply.done``; the
  client answers ``tool.result {call_id, result: string}``; the next reply follows.
* Resume: within 30 s, ``session.resume {session_id}`` with the account's key, a fresh
  token of that account or the resume token; another account -> ``session_forbidden``
  and close 1008.
"""

from __future__ import annotations

import base64
import datetime
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from runtime.llm.reference import ReplyPlan

from ..helpers import EndpointThread
from .voice_agent import API_KEY, LLM_KEY, OTHER_KEY, EventSocket, Server, running_server, sockets

ERROR_KEYS = {"code", "message", "param", "request_id", "detail"}
TURN_DETECTION_KEYS = {"vad_threshold", "min_silence", "max_silence", "interrupt_response"}


@pytest.fixture(scope="module")
def endpoint() -> Iterator[EndpointThread]:
    with EndpointThread(ReplyPlan(replies=("Okay.",)), api_key=LLM_KEY) as thread:
        yield thread


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(
        tmp_path_factory.mktemp("conformance") / "data",
        {"VOXLOOP_ALLOW_PRIVATE_ENDPOINTS": "127.0.0.1"},
    ) as srv:
        yield srv


def llm(endpoint: EndpointThread, **extra: Any) -> list[dict[str, Any]]:
    return [{"base_url": endpoint.base_url, "model": "agent-model", "api_key": LLM_KEY, **extra}]


def http(server: Server, key: str | None = API_KEY, **headers: str) -> httpx.Client:
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.http, headers={**auth, **headers}, timeout=30)


def error_envelope(r: httpx.Response, status: int, code: str, param: str | None = None) -> None:
    """[REST errors] the published error envelope, request id in body and header."""
    assert r.status_code == status, (f"[REST errors] status {status}", r.text)
    assert r.headers["content-type"].startswith("application/json"), (
        "[REST errors] every error body is JSON",
        r.headers["content-type"],
    )
    body = r.json()
    assert set(body) - {"errors"} == ERROR_KEYS, ("[REST errors] envelope keys", body)
    assert body["code"] == code, ("[REST errors] machine-readable code", body)
    assert body["param"] == param, ("[REST errors] param names the field", body)
    assert body["message"] and body["detail"] == body["message"], (
        "[REST errors] message, and detail kept for older clients",
        body,
    )
    assert body["request_id"] == r.headers["x-request-id"], (
        "[REST errors] request_id is the X-Request-ID header",
        body,
    )
    if param is not None:
        assert body["errors"][0] == {"param": param, "message": body["message"]}, (
            "[REST errors] errors lists each field problem",
            body,
        )


# -- the WebSocket client, from the published event reference ------------------------------


def _frame(message: str | bytes) -> dict[str, Any]:
    assert isinstance(message, str), "[WebSocket] every frame is a JSON text frame"
    doc = json.loads(message)
    assert isinstance(doc, dict) and isinstance(doc.get("type"), str), (
        "[server events] every event is an object with a type",
        message[:200],
    )
    return doc


Wire = EventSocket[dict[str, Any]]
"""A Voice Agent client: JSON text frames out, raw JSON frames in."""


@pytest.fixture
async def wire() -> AsyncIterator[Any]:
    def make(ws: websockets.ClientConnection) -> Wire:
        return Wire(ws, _frame, lambda doc: doc["type"], within_s=60.0, closed_within_s=30.0)

    async with sockets(make) as open_ws:

        async def open_(
            url: str, *, bearer: str | None = API_KEY, query: str = "", path: str = "/v1/ws"
        ) -> Wire:
            headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
            client: Wire = await open_ws(url.rsplit("/v1/", 1)[0] + path + query, headers)
            return client

        yield open_


def shape(event: dict[str, Any], *required: str) -> None:
    """[server events] exactly the documented fields (``timestamp`` is optional everywhere)."""
    assert set(event) - {"timestamp"} == {"type", *required}, (
        f"[{event['type']}] documented fields {sorted(required)}",
        event,
    )


def kinds(events: list[dict[str, Any]]) -> list[str]:
    """Event types with runs of audio and deltas folded into one."""
    out: list[str] = []
    for e in events:
        if (
            not out
            or out[-1] != e["type"]
            or e["type"] not in ("reply.audio", "transcript.agent.delta")
        ):
            out.append(e["type"])
    return out


def check_config(config: dict[str, Any], voice: str) -> None:
    """[session.ready config] the published SessionConfig shape a client parses."""
    assert config["input"]["type"] == "audio", "[session.ready config] input.type is 'audio'"
    assert config["output"]["type"] == "audio", "[session.ready config] output.type is 'audio'"
    assert config["output"]["voice"] == voice, (
        "[session.ready config] output.voice is the voice name (a string, never null)",
        config["output"],
    )
    assert set(config["input"]["turn_detection"]) == TURN_DETECTION_KEYS, (
        "[session.ready config] the effective turn-detection values",
        config["input"]["turn_detection"],
    )
    fmt = config["output"]["format"]
    assert fmt["encoding"] in ("audio/pcm", "audio/pcmu", "audio/pcma"), "[audio] encodings"
    if fmt["encoding"] == "audio/pcm":
        assert fmt["sample_rate"] == 24000, "[audio] audio/pcm is 24 kHz"
    for tool in config["tools"]:
        assert tool["type"] == "function" and isinstance(tool["name"], str), "[tools] flat form"
    for entry in config["llm"]:
        assert set(entry) >= {"base_url", "model"} and "api_key" not in entry, (
            "[llm] the key is write-only",
            entry,
        )


# -- REST ------------------------------------------------------------------------------------


def test_every_rest_error_is_the_json_envelope(server: Server) -> None:
    with http(server, None) as c:
        error_envelope(c.get("/v1/agents"), 401, "missing_authorization")
    with http(server, "wrong") as c:
        error_envelope(c.get("/v1/agents"), 401, "unauthorized")
    with http(server) as c:
        error_envelope(c.get("/v1/no-such-route"), 404, "not_found")
        r = c.patch("/v1/agents")
        error_envelope(r, 405, "method_not_allowed")
        assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "POST"}, (
            "[HTTP] a 405 names the allowed methods"
        )
        error_envelope(c.get("/v1/agents/agent_missing"), 404, "agent_not_found")
        error_envelope(
            c.post("/v1/agents", json={"name": "x", "system_prompt": "y"}),
            422, "validation_error", "voice",
        )  # fmt: skip
        error_envelope(c.get("/v1/token"), 400, "invalid_request", "expires_in_seconds")
        # A client's own request id is kept, in the body and the header.
        r = c.get("/v1/agents/agent_missing", headers={"X-Request-ID": "req-abc.123"})
        error_envelope(r, 404, "agent_not_found")
        assert r.json()["request_id"] == "req-abc.123", "[REST errors] the client's request id"


def test_tokens_in_both_published_forms(server: Server) -> None:
    with http(server) as c:
        r = c.get("/v1/token", params={"expires_in_seconds": 60})
        assert r.status_code == 200 and set(r.json()) == {"token", "expires_in_seconds"}, (
            "[GET /v1/token] -> {token, expires_in_seconds}",
            r.text,
        )
        assert r.json()["expires_in_seconds"] == 60
        before = time.time()
        r = c.post("/v1/tokens", json={})
        assert r.status_code == 200 and set(r.json()) == {"token", "expires_at"}, (
            "[POST /v1/tokens] -> {token, expires_at}",
            r.text,
        )
        expires = datetime.datetime.fromisoformat(r.json()["expires_at"]).timestamp()
        assert before + 59 <= expires <= time.time() + 61, (
            "[POST /v1/tokens] expires_in_seconds defaults to 60",
            r.json(),
        )
        r = c.post("/v1/tokens", json={"expires_in_seconds": 600})
        expires = datetime.datetime.fromisoformat(r.json()["expires_at"]).timestamp()
        assert expires >= before + 599, "[POST /v1/tokens] expires_in_seconds up to 600"
        for bad in (0, 601, "60", True):
            error_envelope(
                c.post("/v1/tokens", json={"expires_in_seconds": bad}),
                422, "validation_error", "expires_in_seconds",
            )  # fmt: skip
    with http(server, None) as c:
        error_envelope(c.post("/v1/tokens", json={}), 401, "missing_authorization")


def test_voices_every_hosted_name_speaks_and_aliases_are_told(server: Server) -> None:
    with http(server) as c:
        voices = c.get("/v1/voices").json()
        by_id = {v["voice_id"]: v for v in voices}
        installed = {v["voice_id"] for v in voices if v["installed"] and v["speaks_with"] ==
                     v["voice_id"]}  # fmt: skip
        # [voices] the catalogue clients use: each resolves to a voice this server has.
        for name in ("anna", "ivy", "james", "jane", "george", "alba", "michael", "charles",
                     "paul", "vera", "lola", "estelle", "juergen", "giovanni", "rafael",
                     "claire"):  # fmt: skip
            assert name in by_id, f"[voices] GET /v1/voices lists {name!r}"
            assert by_id[name]["speaks_with"] in installed, (
                f"[voices] {name!r} speaks with an installed voice",
                by_id[name],
            )
        genders = {v["gender"] for v in voices if v["voice_id"] in installed
                   and v["language"].lower().startswith("en")}  # fmt: skip
        assert {"female", "male"} <= genders, ("[voices] a female and a male English voice",
                                               genders)  # fmt: skip
        r = c.post("/v1/agents", json={"name": "Alias", "system_prompt": "Hi.",
                                       "voice": {"voice_id": "james"}})  # fmt: skip
        assert r.status_code == 201, ("[voices] a hosted name is accepted", r.text)
        warning = next(w for w in r.json()["warnings"] if w["code"] == "voice_alias")
        assert warning["param"] == "voice" and by_id["james"]["speaks_with"] in warning["message"]
        error_envelope(
            c.post("/v1/agents", json={"name": "Bad", "system_prompt": "Hi.",
                                       "voice": {"voice_id": "nobody"}}),
            422, "validation_error", "voice",
        )  # fmt: skip


def test_agents_tool_ids_list_forms_and_fields_never_silent(
    server: Server, endpoint: EndpointThread
) -> None:
    tools = [
        {"type": "function", "name": "lookup", "description": "Look up an order",
         "parameters": {"type": "object", "properties": {"order": {"type": "string"}}}},
        {"type": "function", "name": "transfer", "description": "Transfer"},
    ]  # fmt: skip
    with http(server) as c:
        r = c.post("/v1/agents", json={"name": "Tools", "system_prompt": "Help.",
                                       "voice": {"voice_id": "anna"}, "tools": tools,
                                       "llm": llm(endpoint)})  # fmt: skip
        assert r.status_code == 201, r.text
        agent = r.json()
        ids = {t["name"]: t["id"] for t in agent["tools"]}
        assert all(isinstance(i, str) and i for i in ids.values()), (
            "[agents] each tool has a server-assigned id",
            agent["tools"],
        )
        assert len(set(ids.values())) == 2
        assert c.get(f"/v1/agents/{agent['id']}").json()["tools"] == agent["tools"], (
            "[agents] tool ids are stable across reads"
        )
        # A client that sends the whole agent back (ids included) replaces the tools; the
        # ids stay while the names do, and a renamed tool gets a new one.
        sent = [dict(agent["tools"][0]), {**agent["tools"][1], "name": "handoff"}]
        r = c.put(f"/v1/agents/{agent['id']}", json={"tools": sent})
        assert r.status_code == 200, r.text
        after = {t["name"]: t["id"] for t in r.json()["tools"]}
        assert after["lookup"] == ids["lookup"], "[agents] id stable while the name is unchanged"
        assert after["handoff"] not in ids.values(), "[agents] a new name is a new tool"

        # [agents list] the docs' bare array, and the paged envelope for paging clients.
        plain = c.get("/v1/agents").json()
        assert isinstance(plain, list) and plain[0]["id"] == agent["id"], (
            "[agents list] the documented bare array, newest first",
            plain,
        )
        assert set(plain[0]) == {"id", "name", "created_at", "updated_at", "deleted_at"}
        with http(server, **{"User-Agent": "assemblyai-agents-python/0.9.0"}) as sdk:
            by_agent = sdk.get("/v1/agents").json()
        for page in (c.get("/v1/agents", params={"limit": 200}).json(), by_agent):
            assert set(page) == {"agents", "has_more", "response_metadata"}, (
                "[agents list] {agents, has_more, response_metadata.next_cursor}",
                page,
            )
            assert [a["id"] for a in page["agents"]] == [a["id"] for a in plain]
            assert page["has_more"] is False and page["response_metadata"] == {"next_cursor": ""}

        # [fields] accepted without effect -> a warning naming the field; telephony and
        # what this server cannot do -> refused naming the field; never silently dropped.
        r = c.put(f"/v1/agents/{agent['id']}", json={"input": {
            "transcription_mode": "max_accuracy", "language_codes": ["en"],
            "voice_focus": "near-field", "continuous_partials": True,
            "turn_detection": {"interruption_delay": 300, "type": "semantic_vad"}}})  # fmt: skip
        assert r.status_code == 200, r.text
        ignored = [w["param"] for w in r.json()["warnings"] if w["code"] == "ignored_field"]
        assert ignored == [
            "input.transcription_mode", "input.language_codes", "input.voice_focus",
            "input.continuous_partials", "input.turn_detection.type",
            "input.turn_detection.interruption_delay",
        ], ("[fields] every accepted-but-ignored field is named", r.json()["warnings"])  # fmt: skip
        refused = [
            ({"pre_connect_requests": []}, "pre_connect_requests", "not supported yet"),
            ({"transfer_targets": []}, "transfer_targets", "not supported yet"),
            ({"output": {"type": "text"}}, "output.type", "not supported yet"),
            ({"tools": [{"name": "pay", "execution_mode": "hold"}]},
             "tools[0].execution_mode", "not supported yet"),
            ({"tools": [{"name": "pin", "dtmf_collected_arguments": []}]},
             "tools[0].dtmf_collected_arguments", "not supported yet"),
        ]  # fmt: skip
        for body, param, words in refused:
            r = c.put(f"/v1/agents/{agent['id']}", json=body)
            error_envelope(r, 422, "validation_error", param)
            assert words in r.json()["message"], ("[fields] the refusal says why", r.json())


# -- the WebSocket -------------------------------------------------------------------------


async def test_session_lifecycle_and_every_server_event_on_the_wire(
    server: Server, endpoint: EndpointThread, wire: Any
) -> None:
    endpoint.answer(ReplyPlan(replies=("Noted.",), ttft_ms=30, itl_ms=5))
    client = await wire(server.ws)
    # [lifecycle 1] anything before session.update is an error, and the socket stays open.
    await client.send({"type": "input.audio", "audio": base64.b64encode(bytes(960)).decode()})
    err = await client.next("session.error")
    shape(err, "code", "message", "param")
    assert err["code"] == "invalid_format"
    greeting = "Hello, how can I help?"
    await client.send({"type": "session.update", "session": {
        "system_prompt": "Be brief.", "greeting": greeting, "llm": llm(endpoint),
        "input": {"turn_detection": {"min_silence": 600}},
    }})  # fmt: skip
    ready = await client.next("session.ready")
    shape(ready, "session_id", "config", "expires_at", "resume_token")
    assert isinstance(ready["expires_at"], int), "[session.ready] expires_at is unix seconds"
    check_config(ready["config"], "anna")
    assert ready["config"]["input"]["turn_detection"]["min_silence"] == 600, (
        "[session.ready config] the effective values"
    )
    assert ready["config"]["warnings"] == [], "[voices] the default voice is no alias"

    # [lifecycle 5] the greeting: reply.started -> reply.audio… -> transcript.agent -> reply.done.
    events = await client.until("reply.done")
    order = kinds([e for e in events if e["type"] != "transcript.agent.delta"])
    assert order == ["reply.started", "reply.audio", "transcript.agent", "reply.done"], (
        "[lifecycle 5] the greeting's event order",
        order,
    )
    started, final, done = events[0], events[-2], events[-1]
    reply_id = started["reply_id"]
    shape(started, "reply_id", "item_id")
    for e in events:
        if e["type"] == "reply.audio":
            shape(e, "data", "reply_id")
            assert e["reply_id"] == reply_id, "[reply.audio] belongs to its reply"
            assert len(base64.b64decode(e["data"], validate=True)) % 2 == 0, "[audio] PCM16"
        if e["type"] == "transcript.agent.delta":
            shape(e, "delta", "reply_id", "item_id", "start_ms", "end_ms")
    shape(final, "text", "reply_id", "item_id", "interrupted")
    assert (final["text"], final["interrupted"]) == (greeting, False), "[greeting] spoken verbatim"
    shape(done, "reply_id", "status")
    assert (done["reply_id"], done["status"]) == (reply_id, "completed")

    # [lifecycle 6] a later update is acknowledged with session.updated and the config.
    await client.send({"type": "session.update", "session": {
        "system_prompt": "Be briefer.",
        "input": {"transcription_mode": "max_accuracy"},
    }})  # fmt: skip
    updated = await client.next("session.updated")
    shape(updated, "config")
    check_config(updated["config"], "anna")
    assert updated["config"]["system_prompt"] == "Be briefer."
    assert [w["param"] for w in updated["config"]["warnings"]] == [
        "session.input.transcription_mode"
    ], "[fields] an accepted-but-ignored field is reported, not silently dropped"

    # [errors] bad input is a typed error and the session goes on.
    for text, code, param in (
        ("{not json", "invalid_format", None),
        (json.dumps({"type": "session.update", "session": {"greeting": "Other"}}),
         "immutable_field", "session.greeting"),
        (json.dumps({"type": "session.update", "session": {"output": {"voice": "james"}}}),
         "immutable_field", "session.output.voice"),
        (json.dumps({"type": "session.update", "session": {"webhook": {
            "url": "https://hooks.example.com", "events": ["session.started"]}}}),
         "invalid_config", "session.webhook"),
        (json.dumps({"type": "input.audio", "audio": "%%"}), "invalid_audio", "audio"),
    ):  # fmt: skip
        await client.send(text)
        err = await client.next("session.error")
        assert (err["code"], err.get("param")) == (code, param), ("[errors] code and param", err)

    # [reply.create / conversation.message] an injected user message, then a reply.
    await client.send({"type": "conversation.message", "role": "user", "content": "Hi."})
    await client.send({"type": "reply.create"})
    events = await client.until("reply.done")
    assert next(e for e in events if e["type"] == "transcript.agent")["text"] == "Noted."
    body = endpoint.chats()[-1].body
    assert body is not None and "max_tokens" not in body, (
        "[custom llm] no max_tokens by default, as the hosted platform sends none",
        body,
    )

    # [lifecycle 9] session.end -> session.ended -> close 1000.
    await client.send({"type": "session.end"})
    events, code = await client.closed()
    assert events[-1]["type"] == "session.ended" and code == 1000, (
        "[teardown] session.ended, then close 1000",
        events,
        code,
    )
    shape(events[-1], "session_duration_seconds", "audio_duration_seconds")


async def test_tool_call_carries_arguments_as_an_object(
    server: Server, endpoint: EndpointThread, wire: Any
) -> None:
    endpoint.answer(
        ReplyPlan(tool_name="get_weather", tool_arguments='{"city": "Paris"}',
                  replies=("Let me check.",), ttft_ms=30, itl_ms=5),
        ReplyPlan(replies=("Twenty degrees.",), ttft_ms=30, itl_ms=5),
    )  # fmt: skip
    client = await wire(server.ws)
    tool = {"type": "function", "name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}  # fmt: skip
    await client.send({"type": "session.update",
                       "session": {"llm": llm(endpoint), "tools": [tool]}})  # fmt: skip
    ready = await client.next("session.ready")
    assert ready["config"]["tools"][0]["name"] == "get_weather"
    await client.send({"type": "conversation.message", "role": "user", "content": "Weather?"})
    await client.send({"type": "reply.create"})
    call = await client.next("tool.call")
    # The raw frame, as a client of the hosted API reads it: "arguments" is a JSON object.
    assert call["arguments"] == {"city": "Paris"}, ("[tool.call] arguments is an object", call)
    assert "args" not in call, "[tool.call] the current name is arguments"
    assert {"type", "call_id", "name", "arguments"} <= set(call) <= {
        "type", "call_id", "name", "arguments", "reply_id", "timestamp",
    }, ("[tool.call] {call_id, name, arguments}", call)  # fmt: skip
    assert call["name"] == "get_weather" and isinstance(call["call_id"], str)
    done = await client.next("reply.done")
    assert kinds(client.seen)[-3:] == ["transcript.agent", "tool.call", "reply.done"], (
        "[tools] tool.call, then reply.done; the result is sent after reply.done"
    )
    assert done["status"] == "completed"
    await client.send({"type": "tool.result", "call_id": call["call_id"],
                       "result": json.dumps({"temp_c": 20})})  # fmt: skip
    events = await client.until("reply.done")
    assert events[0]["type"] == "reply.started", "[tools] the result starts the next reply"
    assert next(e for e in events if e["type"] == "transcript.agent")["text"] == ("Twenty degrees.")
    request = endpoint.chats()[-1].body
    assert request is not None
    assert request["messages"][-1] == {"role": "tool", "tool_call_id": call["call_id"],
                                       "content": '{"temp_c": 20}'}  # fmt: skip


async def test_temporary_tokens_as_bearer_or_query_and_resume_by_account(
    server: Server, endpoint: EndpointThread, wire: Any
) -> None:
    def mint(key: str = API_KEY) -> str:
        with http(server, key) as c:
            return str(c.post("/v1/tokens", json={"expires_in_seconds": 60}).json()["token"])

    # [tokens] a temporary token as Authorization: Bearer starts one session.
    token = mint()
    client = await wire(server.ws, bearer=token)
    await client.send(
        {"type": "session.update", "session": {"llm": llm(endpoint), "output": {"voice": "jane"}}}
    )
    ready = await client.next("session.ready")
    check_config(ready["config"], "jane")
    alias = ready["config"]["warnings"]
    assert [(w["code"], w["param"]) for w in alias] == [("voice_alias", "session.output.voice")], (
        "[voices] an alias is accepted with a warning",
        alias,
    )
    # [tokens] single use: the same token again is refused on the upgrade, close 1008.
    again = await wire(server.ws, bearer=token)
    events, code = await again.closed()
    assert [e.get("code") for e in events] == ["unauthorized"] and code == 1008
    await client.ws.close()  # a drop: no session.end -> resumable for 30 s

    # [resume] another account is refused: session_forbidden, close 1008.
    other = await wire(server.ws, bearer=mint(OTHER_KEY))
    await other.send({"type": "session.resume", "session_id": ready["session_id"]})
    events, code = await other.closed()
    assert [e.get("code") for e in events] == ["session_forbidden"] and code == 1008, (
        "[resume] another account's credential is refused",
        events,
    )
    # [resume] a fresh token of the owning account, in ?token= (as a browser sends it).
    resumed = await wire(server.ws, bearer=None, query=f"?token={mint()}")
    await resumed.send({"type": "session.resume", "session_id": ready["session_id"]})
    back = await resumed.next("session.ready")
    assert back["session_id"] == ready["session_id"], "[resume] the same session continues"
    check_config(back["config"], "jane")
    await resumed.ws.close()
    # [resume] the owning account's key.
    keyed = await wire(server.ws)
    await keyed.send({"type": "session.resume", "session_id": ready["session_id"]})
    third = await keyed.next("session.ready")
    assert third["session_id"] == ready["session_id"]
    await keyed.ws.close()
    # [resume] the latest resume token from session.ready, as a Bearer credential.
    last = await wire(server.ws, bearer=third["resume_token"])
    await last.send({"type": "session.resume", "session_id": ready["session_id"]})
    assert (await last.next("session.ready"))["session_id"] == ready["session_id"]
    await last.send({"type": "session.end"})
    events, code = await last.closed()
    assert events[-1]["type"] == "session.ended" and code == 1000


async def test_a_refused_first_update_can_be_corrected_on_the_older_path(
    server: Server, endpoint: EndpointThread, wire: Any
) -> None:
    # [paths] /v1/voice, an older path in some examples, is the same endpoint.
    client = await wire(server.ws, path="/v1/voice")
    await client.send(
        {"type": "session.update", "session": {"llm": llm(endpoint), "output": {"voice": "nobody"}}}
    )
    err = await client.next("session.error")
    assert (err["code"], err["param"]) == ("invalid_value", "session.output.voice"), (
        "[errors] an unknown voice is invalid_value, and the session stays open",
        err,
    )
    await client.send(
        {"type": "session.update", "session": {"llm": llm(endpoint), "output": {"voice": "ivy"}}}
    )
    ready = await client.next("session.ready")
    check_config(ready["config"], "ivy")
    assert [e["type"] for e in client.seen] == ["session.error", "session.ready"], (
        "[lifecycle] no agent_timeout after a corrected first update",
        client.seen,
    )


async def test_a_stored_agent_with_its_own_max_tokens(
    server: Server, endpoint: EndpointThread, wire: Any
) -> None:
    with http(server) as c:
        r = c.post("/v1/agents", json={"name": "Capped", "system_prompt": "Short answers.",
                                       "voice": {"voice_id": "anna"},
                                       "llm": llm(endpoint, max_tokens=77)})  # fmt: skip
    assert r.status_code == 201, r.text
    assert r.json()["llm"] == [{"base_url": endpoint.base_url, "model": "agent-model",
                                "max_tokens": 77}]  # fmt: skip
    endpoint.answer(ReplyPlan(replies=("Short.",), ttft_ms=30, itl_ms=5))
    client = await wire(server.ws)
    await client.send({"type": "session.update", "session": {"agent_id": r.json()["id"]}})
    ready = await client.next("session.ready")
    check_config(ready["config"], "anna")
    assert ready["config"]["warnings"][0]["code"] == "voice_alias"
    await client.send({"type": "conversation.message", "role": "user", "content": "Hi."})
    await client.send({"type": "reply.create"})
    await client.until("reply.done")
    body = endpoint.chats()[-1].body
    assert body is not None and body["max_tokens"] == 77, "[custom llm] the agent's own cap"


# -- a third-party client from PyPI -----------------------------------------------------------


def test_minmo_deploys_and_mints_against_this_server(
    server: Server, endpoint: EndpointThread, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from minmo import VoiceAgent
    from minmo.providers import assemblyai as provider

    monkeypatch.chdir(tmp_path)
    # Only the host changes: the client's base URL, nothing else.
    monkeypatch.setattr(provider, "BASE_URL", server.http + "/v1")
    agent = VoiceAgent(prompt="You answer questions about orders.", api_key=API_KEY,
                       name="minmo-orders", llm=llm(endpoint)[0])  # fmt: skip

    @agent.tool  # type: ignore[untyped-decorator]
    def lookup_order(order_id: str) -> str:
        """Look up an order by its id."""
        return order_id

    record = agent.deploy()
    assert record["name"] == "minmo-orders" and record["voice"] == {"voice_id": "alba"}, (
        "[minmo] its default hosted voice 'alba' is accepted",
        record,
    )
    assert [t["name"] for t in record["tools"]] == ["lookup_order"] and record["tools"][0]["id"]
    assert [w["code"] for w in record["warnings"]] == ["voice_alias"]
    token = agent.mint_token()
    assert isinstance(token, str) and token, "[minmo] GET /v1/token answers {token, …}"

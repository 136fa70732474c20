"""The session runner's pure parts: configuration, limits, audio ingress, resumable state."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
import pytest

from audio.g711 import alaw_encode, ulaw_encode
from runtime.agents.secrets import KeyRing, SecretBox
from runtime.conversation.config import TurnDetection
from runtime.endpoints import StaticResolver, URLPolicy
from runtime.llm.client import ChatClient, ClientTimeouts
from runtime.llm.fallback import FallbackChatClient
from runtime.protocol import events as ev
from runtime.secret import Secret
from runtime.sessions import (
    AudioIngress,
    Engines,
    LiveSession,
    MemorySessionStore,
    Principal,
    ResumableState,
    RunnerLimits,
    SessionRefused,
    SessionRunner,
    SessionSpec,
    default_llm_from_env,
    key_owner,
    token_hash,
)

from ..helpers import tone


def patch(doc: dict[str, object]) -> ev.SessionPatch:
    return ev.parse_session(doc)


def test_spec_applies_updates_and_names_immutable_changes() -> None:
    spec = SessionSpec().apply(
        patch({"system_prompt": "A", "greeting": "Hi", "output": {"voice": "ivy", "volume": 40},
               "input": {"turn_detection": {"min_silence": 500, "interrupt_response": False}}})
    )  # fmt: skip
    assert (spec.system_prompt, spec.greeting, spec.voice, spec.volume) == ("A", "Hi", "ivy", 40.0)
    td = spec.turn_detection
    assert (td.min_silence_ms, td.max_silence_ms, td.interrupt_response) == (500, 1200, False)
    assert td.pause_ms == TurnDetection().pause_ms
    # The same values are no change; different ones are, field by field.
    assert spec.immutable_change(patch({"greeting": "Hi", "output": {"voice": "ivy"}})) is None
    assert spec.immutable_change(patch({"greeting": None})) == "session.greeting"
    assert spec.immutable_change(patch({"output": {"voice": "joe"}})) == "session.output.voice"
    assert (
        spec.immutable_change(patch({"output": {"format": {"encoding": "audio/pcma"}}}))
        == "session.output.format"
    )
    assert spec.immutable_change(patch({"output": {"volume": 10}})) is None
    # A short min_silence pulls the speculative pause down with it.
    short = spec.apply(patch({"input": {"turn_detection": {"min_silence": 100}}}))
    assert (short.turn_detection.min_silence_ms, short.turn_detection.pause_ms) == (100, 100)
    with pytest.raises(SessionRefused) as info:
        spec.apply(patch({"input": {"turn_detection": {"max_silence": 200}}}))
    assert (info.value.code, info.value.param) == (
        "invalid_config",
        "session.input.turn_detection.min_silence",
    )


def test_public_config_has_no_secrets() -> None:
    spec = SessionSpec().apply(
        patch({"tools": [{"name": "t", "http": {"url": "https://x.example/t",
                          "headers": [{"name": "Authorization", "value": "tool-secret"}]}}],
               "llm": [{"base_url": "https://e.example/v1", "model": "m", "api_key": "llm-secret"}]})
    )  # fmt: skip
    public = spec.public()
    text = repr(public)
    assert "tool-secret" not in text and "llm-secret" not in text
    assert public["llm"] == [{"base_url": "https://e.example/v1", "model": "m"}]
    assert public["tools"][0]["http"] == {"url": "https://x.example/t", "http_method": "POST"}
    assert public["input"]["format"] == {"encoding": "audio/pcm", "sample_rate": 24000}
    core = spec.core_config()
    assert [t.name for t in core.tools] == ["t"]


def test_limits_and_default_endpoint_from_the_environment() -> None:
    limits = RunnerLimits.from_env({"VOXLOOP_MAX_SESSIONS": "3", "VOXLOOP_AUDIO_LEAD_MS": "120"})
    assert (limits.max_sessions, limits.output_lead_ms, limits.max_duration_s) == (3, 120, 10_800)
    assert (limits.output_buffer_ms, limits.outbound_messages) == (300, 512)
    tuned = RunnerLimits.from_env(
        {"VOXLOOP_AUDIO_BUFFER_MS": "900", "VOXLOOP_OUTBOUND_MESSAGES": "64"}
    )
    assert (tuned.output_buffer_ms, tuned.outbound_messages) == (900, 64)
    for bad in ("0", "-1", "ten", "1.5"):
        with pytest.raises(ValueError, match="VOXLOOP_MAX_SESSIONS"):
            RunnerLimits.from_env({"VOXLOOP_MAX_SESSIONS": bad})
    assert default_llm_from_env({}) is None
    llm = default_llm_from_env(
        {"VOXLOOP_LLM_BASE_URL": "https://e.example/v1", "VOXLOOP_LLM_MODEL": "m",
         "VOXLOOP_LLM_API_KEY": "k"}
    )  # fmt: skip
    assert llm == ev.LLMSpec(base_url="https://e.example/v1", model="m", api_key=Secret("k"))
    with pytest.raises(ValueError, match="VOXLOOP_LLM_MODEL"):
        default_llm_from_env({"VOXLOOP_LLM_BASE_URL": "https://e.example/v1"})


def test_memory_store_expires_and_takes_once() -> None:
    now = [100.0]
    store = MemorySessionStore(clock=lambda: now[0])
    state = _state("sess_a")

    async def run() -> None:
        await store.save(state, 30)
        assert len(store) == 1
        now[0] += 29.9
        assert await store.take("sess_a") == state
        assert await store.take("sess_a") is None  # taken once
        await store.save(state, 30)
        now[0] += 30.0
        assert await store.take("sess_a") is None  # expired
        await store.save(state, 30)
        await store.discard("sess_a")
        assert len(store) == 0

    asyncio.run(run())


def _state(session_id: str) -> ResumableState:
    return ResumableState(
        session_id=session_id, owner="key:x", resume_token_hash="h", spec={}, history=[],
        started_at=0.0, expires_at=1.0, audio_seconds=0.0,
    )  # fmt: skip


# -- audio ingress ---------------------------------------------------------------------------


def test_odd_length_pcm_chunks_carry_the_byte_over() -> None:
    pcm = tone(440, 1.0, 24000)
    whole = AudioIngress(ev.AudioFormat(), capacity_ms=5000)
    split = AudioIngress(ev.AudioFormat(), capacity_ms=5000)
    whole.feed(pcm)
    for i in range(0, len(pcm), 1999):
        split.feed(pcm[i : i + 1999])
    assert split.received_samples == whole.received_samples == 24000
    assert split.received_seconds == 1.0
    a = np.frombuffer(b"".join(f.pcm for f in whole._frames), "<i2").astype(int)
    b = np.frombuffer(b"".join(f.pcm for f in split._frames), "<i2").astype(int)
    # The same samples: a stateful resampler rounds differently at chunk boundaries by a
    # few LSB; a lost or misplaced byte would turn every later sample into noise.
    assert len(a) == len(b) > 0
    assert np.abs(a - b).max() <= 4


@pytest.mark.parametrize(("encoding", "encode"), [("audio/pcmu", ulaw_encode),
                                                  ("audio/pcma", alaw_encode)])  # fmt: skip
def test_g711_input_is_decoded_to_16_khz_frames(encoding: str, encode: object) -> None:
    ingress = AudioIngress(ev.AudioFormat(encoding=encoding), capacity_ms=5000)  # type: ignore[arg-type]
    ingress.feed(encode(tone(300, 1.0, 8000)))  # type: ignore[operator]
    assert ingress.received_samples == 8000
    frames = list(ingress._frames)
    assert all(f.sample_rate == 16000 and f.samples == 320 for f in frames)
    assert 44 <= len(frames) <= 50  # 1 s at 20 ms, less the resampler's delay


def test_audio_beyond_the_buffer_drops_the_oldest() -> None:
    ingress = AudioIngress(ev.AudioFormat(), capacity_ms=200)
    first = ingress.feed(bytes(24000 * 2 // 10))  # 100 ms: fits
    assert first == 0
    dropped = ingress.feed(bytes(24000 * 2))  # 1 s more
    assert dropped == ingress.dropped_frames > 40
    assert len(ingress._frames) == 10  # the bound, 200 ms


# -- resumable state ----------------------------------------------------------------------------


async def test_state_is_sealed_and_resumed_only_by_its_owner() -> None:
    box = SecretBox(KeyRing.generate())
    runner = SessionRunner(
        load_agent=_no_agent, box=box, policy=URLPolicy(), resolver=StaticResolver({}),
        default_llm=None, voices=frozenset(), engines=Engines(),
    )  # fmt: skip
    spec = SessionSpec().apply(
        patch({"system_prompt": "P", "greeting": "G", "output": {"volume": 30},
               "input": {"turn_detection": {"min_silence": 700, "max_silence": 900}},
               "tools": [{"name": "t", "http": {"url": "https://x.example/t",
                          "headers": [{"name": "X-Key", "value": "tool-secret"}]}}],
               "llm": [{"base_url": "https://e.example/v1", "model": "m", "api_key": "llm-secret"}]})
    )  # fmt: skip
    owner = Principal(kind="key", owner=key_owner("operator-key"))
    live = await _dropped(runner, spec, owner, now=1000.0)
    stored = await runner.states.take(live.session_id)
    assert stored is not None
    text = repr(stored)
    assert "tool-secret" not in text and "llm-secret" not in text and live.resume_token not in text
    await runner.states.save(stored, 30)

    other = Principal(kind="key", owner=key_owner("other-key"))
    with pytest.raises(SessionRefused) as info:
        await runner.resume(live.session_id, other, lambda e: None)
    assert info.value.code == "session_forbidden"
    wrong_token = Principal(kind="resume", owner="", resume_token=Secret("rt_wrong"))
    with pytest.raises(SessionRefused):
        await runner.resume(live.session_id, wrong_token, lambda e: None)

    token = Principal(kind="resume", owner="", resume_token=Secret(live.resume_token))
    with pytest.raises(SessionRefused) as info:  # expired: started at t=1000 with a 3 h cap
        await runner.resume(live.session_id, token, lambda e: None)
    assert info.value.code == "session_expired"

    fresh = await _dropped(runner, spec, owner)
    resumed = await runner.resume(fresh.session_id, owner, lambda e: None)
    assert resumed.session_id == fresh.session_id
    assert resumed.expires_at == fresh.expires_at
    assert dataclasses.replace(resumed.spec, tools=()) == dataclasses.replace(spec, tools=())
    http = resumed.spec.tools[0].http
    assert http is not None and http.headers == {"X-Key": Secret("tool-secret")}
    assert resumed.spec.llm is not None and resumed.spec.llm.api_key == Secret("llm-secret")
    with pytest.raises(SessionRefused) as info:
        await runner.resume(fresh.session_id, owner, lambda e: None)
    assert info.value.code == "session_not_found"
    assert isinstance(resumed, LiveSession)


async def test_a_refused_resume_leaves_the_grace_period_as_it_was() -> None:
    now = [0.0]
    states = MemorySessionStore(clock=lambda: now[0])
    runner = SessionRunner(
        load_agent=_no_agent, box=SecretBox(KeyRing.generate()), policy=URLPolicy(),
        resolver=StaticResolver({}), default_llm=None, voices=frozenset(), engines=Engines(),
        states=states,
    )  # fmt: skip
    owner = Principal(kind="key", owner=key_owner("operator-key"))
    other = Principal(kind="key", owner=key_owner("other-key"))
    live = await _dropped(runner, SessionSpec(), owner)  # kept for 30 s from t=0
    for t in (10.0, 20.0, 29.0):
        now[0] = t
        with pytest.raises(SessionRefused) as info:
            await runner.resume(live.session_id, other, lambda e: None)
        assert info.value.code == "session_forbidden"
    now[0] = 30.5  # past the grace the drop began, whatever was attempted since
    with pytest.raises(SessionRefused) as info:
        await runner.resume(live.session_id, owner, lambda e: None)
    assert info.value.code == "session_not_found"


async def test_the_owner_takes_a_session_over_from_its_open_socket() -> None:
    runner = SessionRunner(
        load_agent=_no_agent, box=SecretBox(KeyRing.generate()), policy=URLPolicy(),
        resolver=StaticResolver({}), default_llm=None, voices=frozenset(), engines=Engines(),
    )  # fmt: skip
    owner = Principal(kind="key", owner=key_owner("operator-key"))
    other = Principal(kind="key", owner=key_owner("other-key"))
    live = runner.start(SessionSpec(), owner, lambda e: None)
    dropped: list[str] = []

    def take_over() -> None:  # what the old socket's handler does: let go, keep the state
        dropped.append(live.session_id)
        asyncio.get_running_loop().create_task(runner.release(live, keep=True))

    runner.attach(live, take_over)
    with pytest.raises(SessionRefused) as info:
        await runner.resume(live.session_id, other, lambda e: None)
    assert info.value.code == "session_forbidden" and dropped == []
    resumed = await runner.resume(live.session_id, owner, lambda e: None)
    assert dropped == [live.session_id]
    assert resumed.session_id == live.session_id


async def _no_agent(agent_id: str) -> None:
    return None


async def _dropped(
    runner: SessionRunner, spec: SessionSpec, owner: Principal, now: float | None = None
) -> LiveSession:
    """A session started on ``runner`` whose socket went away: its state kept for a resume."""
    live = runner.start(spec, owner, lambda e: None, now=now)
    runner.attach(live, lambda: None)
    await runner.release(live, keep=True)
    return live


# -- fallback endpoints ---------------------------------------------------------------------

LLMS: list[dict[str, str]] = [
    {"base_url": "https://a.example/v1", "model": "ma", "api_key": "key-a-1"},
    {"base_url": "https://b.example/v1", "model": "mb"},
    {"base_url": "https://c.example/v1", "model": "mc", "api_key": "key-c-3"},
]
HOSTS = {"a.example": ["93.184.216.34"], "b.example": ["93.184.216.35"],
         "c.example": ["93.184.216.36"]}  # fmt: skip


def _runner(limits: RunnerLimits | None = None, hosts: dict[str, list[str]] = HOSTS):
    return SessionRunner(
        load_agent=_no_agent, box=SecretBox(KeyRing.generate()), policy=URLPolicy(),
        resolver=StaticResolver(hosts), default_llm=None, voices=frozenset(), engines=Engines(),
        limits=limits,
    )  # fmt: skip


async def test_a_session_carries_every_llm_entry_in_order_and_resumes_with_their_keys() -> None:
    runner = _runner()
    spec = await runner.bind(patch({"llm": LLMS}))
    assert [(e.base_url, e.model, e.api_key) for e in spec.endpoints] == [
        ("https://a.example/v1", "ma", Secret("key-a-1")),
        ("https://b.example/v1", "mb", None),
        ("https://c.example/v1", "mc", Secret("key-c-3")),
    ]
    assert spec.public()["llm"] == [
        {"base_url": "https://a.example/v1", "model": "ma"},
        {"base_url": "https://b.example/v1", "model": "mb"},
        {"base_url": "https://c.example/v1", "model": "mc"},
    ]
    client = runner.chat_client(*spec.endpoints)
    assert isinstance(client, FallbackChatClient)
    assert [c.endpoint.base_url for c in client.clients] == [e.base_url for e in spec.endpoints]
    await client.aclose()
    owner = Principal(kind="key", owner=key_owner("operator-key"))
    live = await _dropped(runner, spec, owner)
    stored = await runner.states.take(live.session_id)
    assert stored is not None
    assert "key-a-1" not in repr(stored) and "key-c-3" not in repr(stored)
    await runner.states.save(stored, 30)
    resumed = await runner.resume(live.session_id, owner, lambda e: None)
    assert resumed.spec.endpoints == spec.endpoints


async def test_each_entry_url_is_checked_and_the_single_entry_setting_refuses_a_second() -> None:
    runner = _runner(hosts={**HOSTS, "b.example": ["10.0.0.5"]})
    with pytest.raises(SessionRefused) as info:
        await runner.bind(patch({"llm": LLMS}))
    assert (info.value.code, info.value.param) == ("invalid_config", "llm[1].base_url")
    strict = _runner(RunnerLimits.from_env({"VOXLOOP_LLM_SINGLE_ENTRY": "1"}))
    assert strict.limits.single_llm_entry and not RunnerLimits.from_env({}).single_llm_entry
    with pytest.raises(SessionRefused) as info:
        await strict.bind(patch({"llm": LLMS}))
    assert (info.value.code, info.value.param) == ("invalid_config", "session.llm[1]")
    assert info.value.message == ev.SINGLE_ENTRY_MESSAGE
    one = await strict.bind(patch({"llm": LLMS[:1]}))
    assert len(one.endpoints) == 1
    single = strict.chat_client(*one.endpoints)
    assert isinstance(single, ChatClient)
    await single.aclose()


async def test_the_early_decode_setting_turns_speculate_ms_off_for_the_workers_sessions() -> None:
    spec = await _runner().bind(patch({"llm": LLMS[:1]}))
    assert _runner().core_config(spec).turn_detection.speculate_ms == 40
    for off in ("0", "false", "No"):
        limits = RunnerLimits.from_env({"VOXLOOP_EARLY_DECODE": off})
        td = _runner(limits).core_config(spec).turn_detection
        assert (td.speculate_ms, td.pause_ms, td.min_silence_ms) == (None, 160, 300)
    assert RunnerLimits.from_env({"VOXLOOP_EARLY_DECODE": "yes"}).early_decode is True
    with pytest.raises(ValueError, match=r"^VOXLOOP_EARLY_DECODE must be 1, true or yes, or 0"):
        RunnerLimits.from_env({"VOXLOOP_EARLY_DECODE": "off"})


async def test_each_entry_keeps_its_own_settings_through_the_client_and_a_resume() -> None:
    runner = SessionRunner(
        load_agent=_no_agent, box=SecretBox(KeyRing.generate()), policy=URLPolicy(),
        resolver=StaticResolver(HOSTS), default_llm=None, voices=frozenset(), engines=Engines(),
        max_tokens=300,
    )  # fmt: skip
    own = {**LLMS[0], "first_token_timeout_ms": 800, "max_tokens": 50, "think_block": "none"}
    spec = await runner.bind(patch({"llm": [own, {**LLMS[1], "think_block": "auto"}]}))
    # The settings given are shown (think_block "auto" is the default, shown by its absence).
    assert spec.public()["llm"] == [
        {"base_url": "https://a.example/v1", "model": "ma", "max_tokens": 50,
         "first_token_timeout_ms": 800, "think_block": "none"},
        {"base_url": "https://b.example/v1", "model": "mb"},
    ]  # fmt: skip
    assert spec.core_config().max_tokens is None  # each entry's client sends its own
    client = runner.chat_client(*spec.endpoints, max_tokens=spec.max_tokens)
    assert isinstance(client, FallbackChatClient)
    first, second = client.clients
    assert (first.max_tokens, second.max_tokens) == (50, 300)  # the server's for the second
    assert first.timeouts == ClientTimeouts(first_token_s=0.8, first_token_budget_s=0.8)
    assert second.timeouts == ClientTimeouts()
    await client.aclose()
    owner = Principal(kind="key", owner=key_owner("operator-key"))
    live = await _dropped(runner, spec, owner)
    resumed = await runner.resume(live.session_id, owner, lambda e: None)
    assert resumed.spec.endpoints == spec.endpoints and resumed.spec.max_tokens == 300


# -- every setting survives a resume -------------------------------------------------------------

EVERY_SETTING = SessionSpec(
    system_prompt="P", greeting="G", voice="ivy",
    tools=(ev.ToolSpec(
        name="lookup", description="d", execution_mode="hold", timeout_seconds=7.5,
        parameters={"type": "object", "properties": {"q": {"type": "string"}}},
        http=ev.HttpToolSpec(url="https://x.example/t", method="GET",
                             headers={"X-Key": Secret("tool-secret")}),
    ),),
    input_format=ev.AudioFormat(encoding="audio/pcmu"),
    output_format=ev.AudioFormat(encoding="audio/pcma"),
    volume=30.0, keyterms=("voxloop",),
    turn_detection=TurnDetection(
        vad_threshold=0.7, min_silence_ms=500, max_silence_ms=900, interrupt_response=False,
        pause_ms=120, min_speech_ms=80, barge_in_ms=250, barge_in_min_words=2,
        speculate_ms=20,
    ),
    llm=ev.LLMSpec(base_url="https://a.example/v1", model="ma", api_key=Secret("key-a-1"),
                   think_block="template", max_tokens=50, first_token_timeout_ms=800),
    fallbacks=(
        ev.LLMSpec(base_url="https://b.example/v1", model="mb", think_block="none"),
        ev.LLMSpec(base_url="https://c.example/v1", model="mc", api_key=Secret("key-c-3"),
                   max_tokens=70, first_token_timeout_ms=1500),
    ),
    agent_id="agent_1", voice_id="en_US-joe-medium",
    warnings=({"param": "session.x", "code": "ignored_field", "message": "m"},),
    max_tokens=300,
)  # fmt: skip


def _left_at_default(obj: object) -> list[str]:
    """The fields of dataclass ``obj`` that hold their default."""
    out = []
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue
        if getattr(obj, f.name) == default:
            out.append(f.name)
    return out


def _differences(before: object, after: object, path: str = "spec") -> list[str]:
    """Every field (nested dataclasses and tuples of them, field by field) that differs."""
    if dataclasses.is_dataclass(before) and not isinstance(before, type):
        return [d for f in dataclasses.fields(before)
                for d in _differences(getattr(before, f.name), getattr(after, f.name),
                                      f"{path}.{f.name}")]  # fmt: skip
    if isinstance(before, tuple) and isinstance(after, tuple) and len(before) == len(after):
        return [d for i, (b, a) in enumerate(zip(before, after, strict=True))
                for d in _differences(b, a, f"{path}[{i}]")]  # fmt: skip
    return [] if before == after else [f"{path}: {before!r} became {after!r}"]


def test_the_spec_used_by_the_resume_test_sets_every_field() -> None:
    """A field added later without a value here would not be checked by the resume test."""
    spec = EVERY_SETTING
    assert spec.llm is not None and spec.tools[0].http is not None
    for obj in (spec, spec.llm, spec.turn_detection, spec.tools[0], spec.tools[0].http):
        assert _left_at_default(obj) == [], type(obj).__name__


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_every_setting_survives_a_resume_field_by_field(store: str) -> None:
    from contextlib import ExitStack

    from redis.asyncio import Redis

    from runtime.sessions.shared_state import RedisSessionStore

    from ..redis_server import redis_server

    with ExitStack() as stack:
        states = None
        redis = None
        if store == "redis":
            redis = Redis.from_url(stack.enter_context(redis_server()))
            states = RedisSessionStore(redis)
        runner = SessionRunner(
            load_agent=_no_agent, box=SecretBox(KeyRing.generate()), policy=URLPolicy(),
            resolver=StaticResolver(HOSTS), default_llm=None, voices=frozenset(),
            engines=Engines(), states=states,
        )  # fmt: skip
        owner = Principal(kind="key", owner=key_owner("operator-key"))
        live = await _dropped(runner, EVERY_SETTING, owner)
        stored = await runner.states.peek(live.session_id)
        assert stored is not None
        text = repr(stored)
        assert "tool-secret" not in text and "key-a-1" not in text and "key-c-3" not in text
        resumed = await runner.resume(live.session_id, owner, lambda e: None)
        assert _differences(EVERY_SETTING, resumed.spec) == []
        if redis is not None:
            await redis.aclose()


async def test_a_state_an_earlier_version_wrote_is_still_resumed() -> None:
    """A worker of the previous version drained its sessions into Redis as the public config
    plus sealed keys: a worker of this one resumes them with what that held."""
    box = SecretBox(KeyRing.generate())
    runner = SessionRunner(
        load_agent=_no_agent, box=box, policy=URLPolicy(), resolver=StaticResolver(HOSTS),
        default_llm=None, voices=frozenset(), engines=Engines(),
    )  # fmt: skip
    spec = SessionSpec().apply(
        patch({"system_prompt": "P", "greeting": "G", "output": {"volume": 30},
               "input": {"turn_detection": {"min_silence": 700, "max_silence": 900}},
               "llm": [{"base_url": "https://a.example/v1", "model": "ma", "api_key": "key-a-1"},
                       {"base_url": "https://b.example/v1", "model": "mb"}]})
    )  # fmt: skip
    sid = "sess_legacy"
    doc = spec.public()
    doc["llm_key"] = box.seal(Secret("key-a-1"), context=f"session:{sid}:llm")
    doc["llm_fallback_keys"] = [None]
    doc["voice_id"] = None
    doc["server_max_tokens"] = 300
    owner = Principal(kind="key", owner=key_owner("operator-key"))
    await runner.states.save(
        ResumableState(
            session_id=sid, owner=owner.owner, resume_token_hash=token_hash("rt_x"), spec=doc,
            history=[], started_at=time.time(), expires_at=time.time() + 600, audio_seconds=0.0,
        ),
        30,
    )  # fmt: skip
    resumed = await runner.resume(sid, owner, lambda e: None)
    assert resumed.spec == dataclasses.replace(spec, max_tokens=300)


async def test_a_field_the_server_does_not_know_is_a_warning_never_silence() -> None:
    runner = SessionRunner(
        load_agent=_no_agent, box=SecretBox(KeyRing.generate()), policy=URLPolicy(),
        resolver=StaticResolver(HOSTS), default_llm=None, voices=frozenset(), engines=Engines(),
    )  # fmt: skip
    spec = await runner.bind(patch({"llm": [LLMS[0]], "system_prompt": "Hi.",
                                    "input": {"turn_detection": {"min_silense": 300,
                                                                 "interruption_delay": 5}}}))  # fmt: skip
    assert [dict(w) for w in spec.warnings] == [
        {"param": "session.input.turn_detection.min_silense", "code": "unknown_field",
         "message": "session.input.turn_detection.min_silense is not a field this server knows; "
                    "it has no effect"},
        {"param": "session.input.turn_detection.interruption_delay", "code": "ignored_field",
         "message": "session.input.turn_detection.interruption_delay is accepted but has no "
                    "effect on this server: barge-in is decided by the speech detector and the "
                    "turn model"},
    ]  # fmt: skip


@pytest.mark.parametrize("lost_after", ["running", "save"])
async def test_a_state_redis_loses_during_a_checkpoint_is_kept_again_at_the_next_renewal(
    lost_after: str,
) -> None:
    # Redis loses everything (a restart without persistence) right after one of the
    # checkpoint's two writes; the lease renewal that follows must leave the state kept.
    from redis.asyncio import Redis

    from runtime.sessions.shared_state import RedisSessionStore

    from ..redis_server import redis_server

    class Losing(RedisSessionStore):
        armed = False

        async def _lose_after(self, call: str) -> None:
            if self.armed and call == lost_after:
                self.armed = False
                await redis.flushall()

        async def save(self, state: ResumableState, ttl_s: float) -> None:
            await super().save(state, ttl_s)
            await self._lose_after("save")

        async def running(self, session_id: str, ttl_s: float) -> bool:
            kept = await super().running(session_id, ttl_s)
            await self._lose_after("running")
            return kept

    with redis_server() as url:
        redis = Redis.from_url(url)
        states = Losing(redis)
        runner = SessionRunner(
            load_agent=_no_agent, box=SecretBox(KeyRing.generate()), policy=URLPolicy(),
            resolver=StaticResolver(HOSTS), default_llm=None, voices=frozenset(),
            engines=Engines(), states=states, checkpoints=True,
        )  # fmt: skip
        owner = Principal(kind="key", owner=key_owner("operator-key"))
        live = await _dropped(runner, EVERY_SETTING, owner)
        await states.discard(live.session_id)
        states.armed = True
        await runner.checkpoint(live)
        assert states.armed is False
        await runner.renew_lease(live)
        kept = await states.peek(live.session_id)
        assert kept is not None and kept.session_id == live.session_id
        await redis.aclose()

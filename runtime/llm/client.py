"""The streaming chat-completions client for the user's own endpoint.

Theory of operation
-------------------
One :class:`ChatClient` talks to one endpoint (``base_url`` + ``model`` +
optional ``api_key``) over a pooled, keep-alive httpx client whose transport
connects only to addresses the URL policy checked (``runtime.llm.transport``).

``client.stream(request)`` is an async context manager yielding a
:class:`ChatStream`; iterating it yields the typed events of
``runtime.llm.stream``. Inside, bytes go through the pure SSE decoder and the
pure chunk decoder; this module only does the I/O, the deadlines, the
retries and the timestamps.

* Deadlines are chosen for a voice call, where every second before the first
  token is silence the caller hears. ``first_token_s`` bounds one attempt,
  from the start of that attempt (connect included) to the first generated
  delta (content, reasoning or tool call, even if held back);
  ``first_token_budget_s`` bounds the whole reply across its retries — the
  longest silence an endpoint can cause before the apology. After the first
  delta, ``stall_s`` bounds the gap between deltas. Heartbeats (empty
  deltas, role-only chunks, comments) do not reset them. A request may carry
  its own budget (``ChatRequest.first_token_timeout_s``), so an agent or a
  session can choose one.
* Retries happen only while nothing has reached the consumer yet, only for
  retryable errors, and only while they can still help: at least
  ``RetryPolicy.min_retry_budget_s`` of the budget must remain once any
  ``Retry-After`` has been waited (which is honoured up to
  ``max_retry_wait_s``). A first attempt that used its whole deadline leaves
  no room for a second one, so a silent endpoint costs one deadline, not
  two. The ``stream_options.include_usage`` field is dropped (one extra
  attempt, remembered by the client) when the endpoint rejects the request
  with 400/422.
* Bodies: the client advertises gzip, deflate and br and decodes them (SSE
  bodies and error bodies alike); another ``Content-Encoding`` is a
  :class:`MalformedStream` naming it. ``data: [DONE]`` ends the stream at
  once, even when the server keeps the connection open. A 2xx body that
  ends without a single server-sent event (an HTML page from a proxy, a body
  in an encoding the server did not declare) is a retryable
  :class:`MalformedStream` quoting its first bytes, never an empty reply. A
  2xx JSON answer (a server that ignored ``stream: true``) is read as one
  event: a whole completion is the reply, an ``error`` object follows its code.
* Template-opened reasoning (see ``runtime.llm.think``): a reply's first
  words are never held on the default path. The client reads them as the
  setting says (``leading_reasoning``), else as earlier replies of the same
  base URL and model showed (a :class:`ReasoningMemory` shared by every client
  of the process), else — for a model named in the template-opened families —
  held until the stream decides, else as the answer, at once. A reply that
  shows the guess was wrong (a lone ``</think>``) is remembered, and one
  warning per endpoint names the setting that avoids it. :meth:`ChatClient.warm_up`
  sends one short request that teaches this before the first turn.
* Cancellation: leaving the context (normally, by error, or by cancelling the
  consuming task) closes the HTTP response under a shielded, time-limited
  cleanup, so the endpoint sees the disconnect and the pool stays consistent;
  ``CancelledError`` is re-raised.
* Timestamps come from an injected :class:`~runtime.clock.Clock` and follow
  the metric definitions (``headers_ms``, ``first_event_ms``, ``ttft_ms``,
  ``first_answer_ms``, ``itl_ms``, ``tpot_ms``, ``e2e_ms``).

The ``api_key`` is a :class:`~runtime.secret.Secret`; it is sent only in the
``Authorization`` header and is redacted from every error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import itertools
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

import httpx

from runtime.clock import Clock, MonotonicClock, ns_to_ms
from runtime.endpoints import (
    EndpointURL,
    PinnedEndpoint,
    Resolver,
    SystemResolver,
    URLPolicy,
)
from runtime.errors import (
    EndpointError,
    EndpointRateLimited,
    EndpointStalled,
    EndpointTimeout,
    MalformedStream,
    StreamDropped,
)
from runtime.llm.sse import SSEDecoder, SSEEvent
from runtime.llm.stream import (
    ChatChunkDecoder,
    ChatEvent,
    Finish,
    ReasoningDelta,
    StreamStarted,
    TextDelta,
    ToolCallDelta,
    Usage,
    status_error,
)
from runtime.llm.think import template_family
from runtime.llm.transport import PinnedHTTP, dropped_words, map_http_errors
from runtime.secret import Secret

log = logging.getLogger("voxloop.llm")

_ERROR_BODY_LIMIT: Final = 4096
_ERROR_TEXT_LIMIT: Final = 200
_CLEANUP_TIMEOUT_S: Final = 2.0
_BODY_HEAD_LIMIT: Final = 512
_JSON_BODY_LIMIT: Final = 1 << 20
# After [DONE]: how long, and how much, to read for the end of the body.
_DRAIN_S: Final = 0.05
_DRAIN_LIMIT: Final = 65536
# What httpx decodes (br through the ``brotli`` dependency): the client
# advertises exactly these in Accept-Encoding.
_DECODED_ENCODINGS: Final = frozenset({"identity", "gzip", "deflate", "br"})
USER_AGENT: Final = "voxloop/0.1"
WARM_UP_PROMPT: Final = "Say hello."
"""The user message of :meth:`ChatClient.warm_up` (after the session's system prompt)."""
WARM_UP_MAX_TOKENS: Final = 32


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An OpenAI-compatible chat-completions endpoint."""

    base_url: str
    model: str
    api_key: Secret | None = None
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.base_url


@dataclass(frozen=True, slots=True)
class ClientTimeouts:
    """Deadlines in seconds, chosen for a voice call (see the module docstring).

    Attributes:
        connect_s: TCP connect, TLS handshake, pool wait and request write.
        first_token_s: one attempt, from its start to its first generated delta.
        first_token_budget_s: the whole reply, across retries, to its first delta
            (a request's ``first_token_timeout_s`` replaces it).
        stall_s: the longest gap between deltas once generation started.
    """

    connect_s: float = 3.0
    first_token_s: float = 4.0
    first_token_budget_s: float = 5.0
    stall_s: float = 3.0

    def __post_init__(self) -> None:
        if min(self.connect_s, self.first_token_s, self.first_token_budget_s, self.stall_s) <= 0:
            raise ValueError("deadlines must be positive")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries before the first token. ``max_attempts=1`` disables them.

    Attributes:
        max_attempts: attempts per reply, the first included.
        backoff_s: wait before retry *n* is ``backoff_s * n`` (at least).
        max_retry_wait_s: a longer ``Retry-After`` is not waited out.
        min_retry_budget_s: a retry starts only if this much of the first-token
            budget is left after the wait (a shorter attempt cannot help).
    """

    max_attempts: int = 2
    backoff_s: float = 0.1
    max_retry_wait_s: float = 2.0
    min_retry_budget_s: float = 1.5


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatRequest:
    """One chat-completions request (``stream: true`` is always sent)."""

    messages: Sequence[Mapping[str, Any]]
    tools: Sequence[Mapping[str, Any]] = ()
    temperature: float | None = None
    max_tokens: int | None = None
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    first_token_timeout_s: float | None = None
    """The longest wait for the first token across retries (``None``: the client's budget)."""


@dataclass(slots=True)
class StreamTimings:
    """Monotonic timestamps (ns, injected clock) of one streamed request."""

    started_ns: int
    sent_ns: int | None = None
    headers_ns: int | None = None
    first_event_ns: int | None = None
    first_token_ns: int | None = None
    first_answer_ns: int | None = None
    ended_ns: int | None = None
    token_ns: list[int] = field(default_factory=list)
    new_connection: bool = False
    attempts: int = 0
    completion_tokens: int | None = None
    http_version: str | None = None

    def _since_sent(self, ns: int | None) -> float | None:
        if ns is None or self.sent_ns is None:
            return None
        return ns_to_ms(ns - self.sent_ns)

    @property
    def connect_ms(self) -> float | None:
        """From the call to the request being handed to the socket (pool wait, TCP, TLS)."""
        return None if self.sent_ns is None else ns_to_ms(self.sent_ns - self.started_ns)

    @property
    def headers_ms(self) -> float | None:
        return self._since_sent(self.headers_ns)

    @property
    def first_event_ms(self) -> float | None:
        return self._since_sent(self.first_event_ns)

    @property
    def ttft_ms(self) -> float | None:
        return self._since_sent(self.first_token_ns)

    @property
    def first_answer_ms(self) -> float | None:
        return self._since_sent(self.first_answer_ns)

    @property
    def e2e_ms(self) -> float | None:
        return self._since_sent(self.ended_ns)

    @property
    def itl_ms(self) -> list[float]:
        t = self.token_ns
        return [ns_to_ms(b - a) for a, b in itertools.pairwise(t)]

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens else len(self.token_ns)

    @property
    def tpot_ms(self) -> float | None:
        tokens = self.output_tokens
        if tokens < 2 or len(self.token_ns) < 2:
            return None
        return ns_to_ms(self.token_ns[-1] - self.token_ns[0]) / (tokens - 1)


def _retry_after_s(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_detail(body: bytes, secret: Secret | None) -> str:
    text = body.decode("utf-8", errors="replace")
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        err = doc.get("error", doc)
        if isinstance(err, dict):
            for key in ("message", "detail"):
                if isinstance(err.get(key), str):
                    text = err[key]
                    break
        elif isinstance(err, str):
            text = err
        elif isinstance(doc.get("detail"), str):
            text = doc["detail"]
    text = " ".join(text.split())
    if secret is not None:
        text = secret.redact(text)
    if len(text) > _ERROR_TEXT_LIMIT:
        text = text[:_ERROR_TEXT_LIMIT] + "…"
    return text


class ReasoningMemory:
    """Whether each endpoint's replies start inside a template-opened think block.

    Keyed by ``(base_url, model)``; bounded (the least recently learned
    entries are forgotten first).
    """

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._known: dict[tuple[str, str], bool] = {}
        self._warned: set[tuple[str, str]] = set()

    def get(self, key: tuple[str, str]) -> bool | None:
        return self._known.get(key)

    def forget(self, key: tuple[str, str]) -> None:
        self._known.pop(key, None)

    def clear(self) -> None:
        self._known.clear()
        self._warned.clear()

    def warn_once(self, key: tuple[str, str]) -> bool:
        """Whether a wrong guess about ``key`` is to be logged (``True`` the first time)."""
        if key in self._warned:
            return False
        self._warned.add(key)
        return True

    def remember(self, key: tuple[str, str], leading_reasoning: bool) -> None:
        self._known.pop(key, None)
        self._known[key] = leading_reasoning
        while len(self._known) > self._size:
            del self._known[next(iter(self._known))]


REASONING_MEMORY: Final = ReasoningMemory()


class TTFTMemory:
    """Recent times to first token of each endpoint, in seconds.

    Keyed by ``(base_url, model)``; each time is measured from the start of the
    request's stream (connect included: what a caller waits) to its first
    generated delta. Every client of the process adds to it (the warm-up
    request, earlier replies), and :class:`~runtime.llm.fallback.FallbackChatClient`
    reads it to decide when to ask the next entry. Bounded: ``keep`` times per
    endpoint, ``size`` endpoints (the least recently measured forgotten first).
    """

    def __init__(self, size: int = 256, keep: int = 16) -> None:
        self._size = size
        self._keep = keep
        self._times: dict[tuple[str, str], list[float]] = {}

    def record(self, key: tuple[str, str], seconds: float) -> None:
        times = self._times.pop(key, [])
        times.append(seconds)
        del times[: -self._keep]
        self._times[key] = times
        while len(self._times) > self._size:
            del self._times[next(iter(self._times))]

    def recent(self, key: tuple[str, str]) -> tuple[float, ...]:
        """The endpoint's recent times to first token, oldest first (seconds)."""
        return tuple(self._times.get(key, ()))

    def clear(self) -> None:
        self._times.clear()


TTFT_MEMORY: Final = TTFTMemory()


class ChatClient:
    """Streams chat completions from one endpoint.

    Args:
        endpoint: where to send requests.
        policy: the URL policy (stored endpoints use the default, strict one;
            commands a machine's owner runs use :meth:`URLPolicy.operator`).
        resolver: resolves the endpoint's host once (injectable for tests).
        clock: monotonic clock for the timestamps.
        timeouts: connect, first-token and stall deadlines.
        retry: retries before the first token.
        verify: TLS verification (``True``, or an ``ssl.SSLContext``).
        http2: offer HTTP/2 (needs the ``http2`` extra).
        leading_reasoning: whether the endpoint's chat template opens a think
            block before every reply — the ``think_block`` setting (``None``:
            auto, see ``runtime.llm.think``: what this endpoint's replies showed,
            else the model name, else the reply streams at once).
        reasoning_memory: where decisions about endpoints are remembered
            (default: the process-wide :data:`REASONING_MEMORY`).
        max_tokens: this endpoint's ``max_tokens``, sent when the request has
            none; a request asking fewer (the warm-up) keeps its own (``None``:
            the request's, if any).
        ttft_memory: where the times to first token are kept (default: the
            process-wide :data:`TTFT_MEMORY`).

    Raises:
        URLPolicyError: the base URL is not allowed (raised here for syntax,
            and by :meth:`prewarm`/:meth:`stream` for resolved addresses).
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        policy: URLPolicy | None = None,
        resolver: Resolver | None = None,
        clock: Clock | None = None,
        timeouts: ClientTimeouts | None = None,
        retry: RetryPolicy | None = None,
        verify: ssl.SSLContext | bool = True,
        http2: bool = False,
        limits: httpx.Limits | None = None,
        leading_reasoning: bool | None = None,
        reasoning_memory: ReasoningMemory | None = None,
        max_tokens: int | None = None,
        ttft_memory: TTFTMemory | None = None,
    ) -> None:
        if max_tokens is not None and max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        self.endpoint = endpoint
        self.max_tokens = max_tokens
        self._ttfts = TTFT_MEMORY if ttft_memory is None else ttft_memory
        self._memory = REASONING_MEMORY if reasoning_memory is None else reasoning_memory
        self._memory_key = (endpoint.base_url, endpoint.model)
        self._configured = leading_reasoning is not None
        self._family = template_family(endpoint.model)
        self._leading = (
            leading_reasoning
            if leading_reasoning is not None
            else self._memory.get(self._memory_key)
        )
        if self._leading is None and self._family is None:
            self._leading = False
        self._clock = clock or MonotonicClock()
        self._timeouts = timeouts or ClientTimeouts()
        self._retry = retry or RetryPolicy()
        self._pinned_http = PinnedHTTP(
            endpoint.base_url,
            policy=policy or URLPolicy(),
            resolver=resolver or SystemResolver(),
            headers={"User-Agent": USER_AGENT, "Accept": "text/event-stream"},
            timeout=httpx.Timeout(
                connect=self._timeouts.connect_s,
                read=None,
                write=self._timeouts.connect_s,
                pool=self._timeouts.connect_s,
            ),
            api_key=endpoint.api_key,
            verify=verify,
            http2=http2,
            limits=limits,
        )
        self._url: EndpointURL = self._pinned_http.url
        self._transport = self._pinned_http.transport
        self._http = self._pinned_http.http
        self.include_usage = True

    def __repr__(self) -> str:
        return f"ChatClient(base_url={self._url.url!r}, model={self.endpoint.model!r})"

    @property
    def leading_reasoning(self) -> bool | None:
        """How the next reply's first words are read: ``True`` — reasoning until
        ``</think>``; ``False`` — the answer, streamed at once; ``None`` — held
        until the stream decides (a model of a template-opened family not seen yet).
        """
        return self._leading

    @property
    def reasoning_source(self) -> str:
        """Why :attr:`leading_reasoning` is what it is: ``"setting"``, ``"learned"``
        (earlier replies of this base URL and model), ``"model name"`` or ``"default"``."""
        if self._configured:
            return "setting"
        if self._memory.get(self._memory_key) is not None:
            return "learned"
        return "model name" if self._family is not None else "default"

    def learn_reasoning(self, leading_reasoning: bool | None) -> None:
        """Remember what a reply showed (``None``: forget it). A setting given to the
        constructor is never overridden."""
        if self._configured:
            return
        if leading_reasoning is None:
            self._memory.forget(self._memory_key)
            self._leading = None if self._family is not None else False
        else:
            self._memory.remember(self._memory_key, leading_reasoning)
            self._leading = leading_reasoning

    @property
    def timeouts(self) -> ClientTimeouts:
        """The client's deadlines."""
        return self._timeouts

    def recent_ttfts_s(self) -> tuple[float, ...]:
        """This base URL and model's recent times to first token in this process
        (seconds from the request's start, oldest first; see :class:`TTFTMemory`)."""
        return self._ttfts.recent(self._memory_key)

    def _record_ttft(self, seconds: float) -> None:
        self._ttfts.record(self._memory_key, seconds)

    def _refresh_reasoning(self) -> None:
        """Pick up what another client of the same endpoint learned meanwhile."""
        if not self._configured:
            known = self._memory.get(self._memory_key)
            if known is not None:
                self._leading = known

    @property
    def url(self) -> EndpointURL:
        return self._url

    @property
    def connections_opened(self) -> int:
        """TCP connections opened so far (keep-alive reuse keeps this low)."""
        return self._pinned_http.backend.connects

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _ensure_pinned(self) -> PinnedEndpoint:
        return await self._pinned_http.ensure_pinned()

    async def prewarm(self) -> bool:
        """Resolve, check and open the connection (TCP + TLS) before the first request.

        Sends ``GET {base_url}/models``, whose answer is read and discarded so
        the connection returns to the pool. Failures are not raised: a cold
        first request is the fallback.

        Returns:
            ``False`` when no connection could be opened (refused, unreachable,
            connect timeout, TLS failure), else ``True`` (whatever the status).

        Raises:
            URLPolicyError: the endpoint's addresses are not allowed.
        """
        await self._ensure_pinned()
        try:
            async with self._http.stream("GET", f"{self._url.url}/models") as response:
                received = 0
                async for chunk in response.aiter_raw():
                    received += len(chunk)
                    if received > 65536:
                        break
        except (httpx.ConnectError, httpx.ConnectTimeout):
            log.info("endpoint prewarm failed to connect", extra={"endpoint": self._url.url})
            return False
        except httpx.HTTPError:
            log.info("endpoint prewarm failed", extra={"endpoint": self._url.url})
        return True

    async def warm_up(self, system_prompt: str) -> str | None:
        """Send one short request before the first turn; never raises an endpoint error.

        The request is the system prompt and :data:`WARM_UP_PROMPT`, at
        temperature 0 and :data:`WARM_UP_MAX_TOKENS` tokens. The endpoint
        caches the prompt's prefix for the first real request (llama.cpp's
        time to first token drops several fold), and the reply teaches the
        client whether replies start inside a template-opened think block:
        a ``</think>`` says they do; reasoning in a field, a ``<think>`` or a
        reply that stops on its own without either says they do not; a reply
        cut at the token limit teaches nothing. Cancelling it (a reply is
        about to be requested) closes the request at once.

        Returns:
            The finish reason, or ``None`` if the request failed.

        Raises:
            URLPolicyError: the endpoint's addresses are not allowed.
        """
        request = ChatRequest(
            messages=[
                {"role": "system", "content": system_prompt},
                {"role": "user", "content": WARM_UP_PROMPT},
            ],
            temperature=0.0,
            max_tokens=WARM_UP_MAX_TOKENS,
        )
        try:
            async with self.stream(request, decide=True) as stream:
                async for _ in stream:
                    pass
                return stream.finish_reason or ""
        except (EndpointError, OSError) as exc:
            log.info("endpoint warm-up failed", extra={"kind": type(exc).__name__})
            return None

    async def check(self) -> None:
        """Check that the endpoint takes a chat-completions request from this client.

        Sends one streamed request (a one-word user message, the configured model
        and key) and checks the status; the answer is not read (the connection is
        closed at the headers), so no more than a token or two is generated.

        Raises:
            EndpointError: the request failed (401/403 :class:`EndpointAuthError`,
                404 and other 4xx :class:`EndpointRejected`, no connection
                :class:`EndpointConnectError`, no response headers within the
                first-token deadline :class:`EndpointTimeout` …).
            URLPolicyError: the endpoint's addresses are not allowed.
        """
        await self._ensure_pinned()
        timings = StreamTimings(started_ns=self._clock.now_ns())
        request = ChatRequest(messages=[{"role": "user", "content": "Hi"}])
        limit = self._timeouts.first_token_s
        try:
            async with asyncio.timeout(limit):
                response, _ = await self._open(request, timings)
        except TimeoutError:
            raise EndpointTimeout(
                f"no response within {limit:g} s of the request", retryable=True
            ) from None
        await response.aclose()

    def build_body(self, request: ChatRequest) -> dict[str, Any]:
        """The JSON body sent for ``request``."""
        body: dict[str, Any] = {
            "model": self.endpoint.model,
            "messages": list(request.messages),
            "stream": True,
        }
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        if request.tools:
            body["tools"] = list(request.tools)
            body["tool_choice"] = "auto"
        if request.temperature is not None:
            body["temperature"] = request.temperature
        caps = [n for n in (request.max_tokens, self.max_tokens) if n is not None]
        if caps:
            body["max_tokens"] = min(caps)
        body.update(request.extra_body)
        return body

    @contextlib.asynccontextmanager
    async def stream(
        self, request: ChatRequest, *, decide: bool = False
    ) -> AsyncIterator[ChatStream]:
        """Open a streamed completion.

        Args:
            request: what to send.
            decide: hold the reply's first words until the stream shows whether
                the template opened a think block, whatever is known (a
                request no one listens to, such as :meth:`warm_up`, learns
                more this way). A setting given to the constructor still wins.

        Yields:
            A :class:`ChatStream`; iterate it for events, read ``timings``.

        Raises:
            EndpointError: the request failed (subclass says how).
            URLPolicyError: the endpoint's addresses are not allowed.
        """
        await self._ensure_pinned()
        self._refresh_reasoning()
        leading = self._leading if self._configured or not decide else None
        chat = ChatStream(self, request, self._clock.now_ns(), leading_reasoning=leading)
        try:
            yield chat
        finally:
            await chat.aclose()

    # -- used by ChatStream -------------------------------------------------

    async def _open(
        self, request: ChatRequest, timings: StreamTimings
    ) -> tuple[httpx.Response, bytes | None]:
        """Send the request and check the status; retry the include_usage fallback.

        Returns:
            The response, and for a 2xx JSON answer (a server that ignored
            ``stream: true``, or a proxy's error object) that answer re-framed
            as one server-sent event.
        """
        dropped_usage = False
        while True:
            body = self.build_body(request)
            response = await self._send(body, timings)
            if response.status_code < 300:
                ctype = response.headers.get("content-type", "")
                if ctype.startswith("application/json"):
                    return response, await self._json_as_event(response)
                unknown = [
                    coding
                    for coding in response.headers.get_list("content-encoding", split_commas=True)
                    if coding.strip().lower() not in _DECODED_ENCODINGS
                ]
                if unknown:
                    await response.aclose()
                    raise MalformedStream(
                        f"endpoint compressed the stream with {', '.join(unknown)!r}, "
                        "which voxloop does not decode (gzip, deflate and br are)",
                        retryable=False,
                    )
                return response, None
            detail = await self._read_error_body(response)
            status = response.status_code
            if status in (400, 422) and self.include_usage and not dropped_usage:
                log.info("endpoint rejected stream_options; retrying without it")
                self.include_usage = False
                dropped_usage = True
                continue
            if dropped_usage:
                # The failure was not about stream_options: keep asking for usage.
                self.include_usage = True
            raise status_error(status, detail, _retry_after_s(response.headers.get("retry-after")))

    async def _send(self, body: dict[str, Any], timings: StreamTimings) -> httpx.Response:
        clock = self._clock

        async def trace(name: str, info: Mapping[str, Any]) -> None:
            if name == "connection.connect_tcp.started":
                timings.new_connection = True
            elif name.endswith(".send_request_headers.started"):
                timings.sent_ns = clock.now_ns()
            elif name.endswith(".receive_response_headers.complete"):
                timings.headers_ns = clock.now_ns()

        http_request = self._http.build_request(
            "POST",
            f"{self._url.url}/chat/completions",
            content=json.dumps(body, separators=(",", ":")).encode(),
            headers={"Content-Type": "application/json"},
            extensions={"trace": trace},
        )
        async with map_http_errors("the endpoint", http=self._pinned_http):
            response = await self._http.send(http_request, stream=True)
        timings.http_version = response.http_version
        if timings.headers_ns is None:
            timings.headers_ns = clock.now_ns()
        if timings.sent_ns is None:
            timings.sent_ns = timings.started_ns
        return response

    async def _json_as_event(self, response: httpx.Response) -> bytes:
        """A whole JSON answer as one SSE event, if it is a completion or an error."""
        raw = await self._read_body(response, stop_at=_JSON_BODY_LIMIT + 1)
        try:
            doc = json.loads(raw) if len(raw) <= _JSON_BODY_LIMIT else None
        except ValueError:
            doc = None
        if isinstance(doc, dict) and ("choices" in doc or doc.get("error")):
            return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"
        detail = _error_detail(raw[:_ERROR_BODY_LIMIT], self.endpoint.api_key)
        raise MalformedStream(
            "endpoint answered with a JSON body that is not a chat completion"
            + (f": {detail}" if detail else ""),
            retryable=False,
        )

    async def _read_error_body(self, response: httpx.Response) -> str:
        raw = await self._read_body(response, stop_at=_ERROR_BODY_LIMIT)
        return _error_detail(raw[:_ERROR_BODY_LIMIT], self.endpoint.api_key)

    async def _read_body(self, response: httpx.Response, *, stop_at: int) -> bytes:
        """The body read until ``stop_at`` bytes have come (or it ends, stalls or fails); closed."""
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self._timeouts.stall_s):
                async for chunk in response.aiter_bytes():
                    chunks.append(chunk)
                    size += len(chunk)
                    if size >= stop_at:
                        break
        except (httpx.HTTPError, TimeoutError):
            # Undecodable (DecodingError) or cut short: what came is still worth reading.
            pass
        finally:
            await response.aclose()
        return b"".join(chunks)


class ChatStream:
    """The events of one streamed completion (async iterator).

    Attributes:
        timings: timestamps of the current attempt (``attempts`` counts them).
        usage: the usage reported by the endpoint, if any.
        finish_reason: the finish reason, if one was received.
    """

    def __init__(
        self,
        client: ChatClient,
        request: ChatRequest,
        started_ns: int,
        *,
        leading_reasoning: bool | None = None,
    ) -> None:
        self._client = client
        self._leading = leading_reasoning
        self._request = request
        self._clock = client._clock
        self.timings = StreamTimings(started_ns=started_ns)
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        # As a FallbackStream reports them: one endpoint is entry 0, nothing skipped.
        self.entry: int | None = 0
        self.skipped: list[tuple[int, str]] = []
        self._response: httpx.Response | None = None
        self._raw: AsyncIterator[bytes] | None = None
        self._sse = SSEDecoder()
        self._chunks = ChatChunkDecoder(leading_reasoning=leading_reasoning)
        self._pending: list[ChatEvent] = []
        self._generated = False  # output reached the consumer: no retry from here on
        self._deferred: EndpointError | None = None
        self._spoke = False
        self._started_sent = False
        self._eof = False
        self._closed = False
        self._sse_events = 0
        self._head = bytearray()
        loop = asyncio.get_running_loop()
        timeouts = client._timeouts
        budget = request.first_token_timeout_s or timeouts.first_token_budget_s
        self._budget_s = budget
        self._budget_deadline = loop.time() + budget
        self._deadline = self._budget_deadline

    @property
    def host(self) -> str | None:
        """The endpoint's host (for metrics and logs)."""
        return self._client.url.host

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ChatEvent:
        while True:
            if self._pending:
                event = self._pending.pop(0)
                if isinstance(event, StreamStarted):
                    if self._started_sent:
                        continue
                    self._started_sent = True
                elif isinstance(event, TextDelta | ReasoningDelta | ToolCallDelta):
                    self._generated = True
                return event
            if self._deferred is not None:
                # What the endpoint sent before its error has been delivered.
                exc, self._deferred = self._deferred, None
                await self._fail(exc)
                continue
            if self._eof or self._closed:
                if self._response is not None and self._chunks.done:
                    await self._drain()
                raise StopAsyncIteration
            try:
                await self._fill()
            except EndpointError as exc:
                await self._fail(exc)

    async def _fail(self, exc: EndpointError) -> None:
        """Retry if that is safe and can help; otherwise close and raise ``exc``."""
        key = self._client.endpoint.api_key
        if key is not None:
            # In-band messages and quoted bodies come from the server,
            # which may echo the presented key.
            exc.args = tuple(key.redact(a) if isinstance(a, str) else a for a in exc.args)
        if self._generated:
            # Output already reached the consumer: repeating the request
            # would repeat it, so no error after that point is retry-safe.
            exc.retryable = False
        if not await self._should_retry(exc):
            self._closed = True
            await self._close_response()
            raise exc

    async def _should_retry(self, exc: EndpointError) -> bool:
        policy = self._client._retry
        if self._generated or not exc.retryable or self.timings.attempts >= policy.max_attempts:
            return False
        wait = policy.backoff_s * self.timings.attempts
        if isinstance(exc, EndpointRateLimited) and exc.retry_after_s is not None:
            if exc.retry_after_s > policy.max_retry_wait_s:
                return False
            wait = max(wait, exc.retry_after_s)
        left = self._budget_deadline - asyncio.get_running_loop().time() - wait
        if left < policy.min_retry_budget_s:
            # Too little of the first-token budget is left for a retry to help.
            return False
        log.info("retrying endpoint request", extra={"kind": exc.kind})
        await self._close_response()
        await asyncio.sleep(wait)
        self._sse = SSEDecoder()
        self._chunks = ChatChunkDecoder(leading_reasoning=self._leading)
        self._pending.clear()
        self._eof = False
        self._sse_events = 0
        self._head.clear()
        self.timings = StreamTimings(
            started_ns=self.timings.started_ns, attempts=self.timings.attempts
        )
        return True

    def _start_attempt(self) -> None:
        t = self._client._timeouts
        now = asyncio.get_running_loop().time()
        self._deadline = min(now + t.first_token_s, self._budget_deadline)

    def _token_received(self) -> None:
        self._deadline = asyncio.get_running_loop().time() + self._client._timeouts.stall_s

    async def _fill(self) -> None:
        """Read until at least one event is pending or the stream ended."""
        try:
            async with asyncio.timeout_at(self._deadline) as deadline:
                if self._response is None:
                    self.timings.attempts += 1
                    self._start_attempt()
                    deadline.reschedule(self._deadline)
                    self._response, whole = await self._client._open(self._request, self.timings)
                    self._raw = _once(whole) if whole is not None else self._response.aiter_bytes()
                assert self._raw is not None
                while not self._pending:
                    try:
                        data = await anext(self._raw)
                    except StopAsyncIteration:
                        self._finish()
                        return
                    before = self._chunks.deltas
                    self._feed(data)
                    if self._chunks.done:
                        self._finish()
                        return
                    if self._chunks.deltas != before:
                        self._token_received()
                        deadline.reschedule(self._deadline)
        except TimeoutError:
            await self._close_response()
            t = self._client._timeouts
            if self._chunks.deltas:
                raise EndpointStalled(
                    f"no token for {t.stall_s:g} s (stall deadline)",
                    retryable=not self._generated,
                ) from None
            limit = min(t.first_token_s, self._budget_s)
            raise EndpointTimeout(
                f"no token within {limit:g} s of the request", retryable=True
            ) from None
        except httpx.DecodingError as exc:
            response = self._response
            coding = response.headers.get("content-encoding", "") if response is not None else ""
            await self._close_response()
            raise MalformedStream(
                f"endpoint sent a body that does not decode as {coding or 'declared'!r}",
                retryable=not self._generated,
            ) from exc
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.StreamError) as exc:
            await self._close_response()
            raise StreamDropped(
                f"connection dropped mid-stream: {dropped_words(exc)}",
                retryable=not self._generated,
            ) from exc
        except httpx.HTTPError as exc:
            await self._close_response()
            raise StreamDropped(
                f"stream failed: {dropped_words(exc)}", retryable=not self._generated
            ) from exc

    def _feed(self, data: bytes) -> None:
        if len(self._head) < _BODY_HEAD_LIMIT:
            self._head += data[: _BODY_HEAD_LIMIT - len(self._head)]
        self._sse.receive_data(data)
        pending = self._sse.pending_data
        if pending is not None and pending.strip() == "[DONE]":
            # "data: [DONE]" without the blank line that would dispatch it, on a
            # connection the server keeps open: it is the end all the same.
            self._sse.receive_eof()
        self._decode(self._sse.events_received())

    def _decode(self, events: list[SSEEvent]) -> None:
        for sse in events:
            self._sse_events += 1
            try:
                decoded = self._chunks.receive_event(sse)
            except EndpointError as exc:
                if not any(
                    isinstance(e, TextDelta | ReasoningDelta | ToolCallDelta) for e in self._pending
                ):
                    raise
                # Deliver what came before the error first (it may be spoken),
                # then raise it: the reply is never taken as finished.
                self._deferred = exc
                self._eof = True
                return
            self._accept(decoded)
            if self._chunks.done:
                return

    def _finish(self) -> None:
        if not self._chunks.done:
            self._sse.receive_eof()
            self._decode(self._sse.events_received())
        if self._sse_events == 0:
            raise MalformedStream(
                f"endpoint answered {self._describe_body()} without a single server-sent event",
                retryable=True,
            )
        self._accept(self._chunks.receive_eof())
        self._eof = True
        self.timings.ended_ns = self._clock.now_ns()
        self._learn()

    def _learn(self) -> None:
        """What this reply showed about the endpoint's template (see the module docstring)."""
        client = self._client
        chunks = self._chunks
        if client._configured:
            return
        if self._leading is None:
            decided = chunks.leading_reasoning
            if decided is True:
                client.learn_reasoning(True)
            elif decided is False and not chunks.decided_by_end:
                client.learn_reasoning(False)  # reasoning in a field, or a <think>
            elif decided is False and self._spoke and self.finish_reason == "stop":
                client.learn_reasoning(False)  # a whole answer with no think block
        elif self._leading is False and chunks.stray_close:
            # The guess was wrong: the template opened the block and what came
            # before the lone </think> was taken as the answer.
            known = client.reasoning_source == "learned"
            client.learn_reasoning(True)
            key = client._memory_key
            if client._memory.warn_once(key):
                log.warning(
                    "endpoint %s model %s opens a think block in its chat template; the "
                    "reasoning before the first </think> was taken as the answer once. "
                    "Set think_block to 'template' (--think-block template, or the "
                    "agent's llm think_block) to read it as reasoning from the start",
                    key[0],
                    key[1],
                    extra={"endpoint": key[0], "model": key[1], "was_learned": known},
                )
        elif self._leading is True and chunks.deltas and not chunks.think_closed:
            # The endpoint no longer behaves as learned (another model behind
            # the same name?): learn again from the next reply.
            client.learn_reasoning(None)

    def _describe_body(self) -> str:
        response = self._response
        ctype = response.headers.get("content-type", "") if response is not None else ""
        status = f"HTTP {response.status_code}" if response is not None else "a success"
        head = " ".join(bytes(self._head).decode("utf-8", errors="replace").split())
        if len(head) > 120:
            head = head[:120] + "…"
        what = f"{status} ({ctype or 'no content type'})"
        return f"{what} with {head!r}" if head else f"{what} with an empty body"

    def _accept(self, events: list[ChatEvent]) -> None:
        now = self._clock.now_ns()
        t = self.timings
        # Token times follow what the endpoint generated, held-back content included.
        new = self._chunks.deltas - len(t.token_ns)
        if new > 0:
            if t.first_token_ns is None:
                t.first_token_ns = now
                self._client._record_ttft((now - t.started_ns) / 1e9)
            t.token_ns.extend([now] * new)
        for event in events:
            if isinstance(event, StreamStarted):
                if t.first_event_ns is None:
                    t.first_event_ns = now
            elif isinstance(event, TextDelta | ReasoningDelta | ToolCallDelta):
                if isinstance(event, TextDelta):
                    self._spoke = True
                    if t.first_answer_ns is None:
                        t.first_answer_ns = now
            elif isinstance(event, Usage):
                self.usage = event
                t.completion_tokens = event.completion_tokens
            elif isinstance(event, Finish):
                self.finish_reason = event.reason
            self._pending.append(event)

    async def _drain(self) -> None:
        """After ``[DONE]``: read the end of the body if it comes at once (the
        connection then goes back to the pool), else close it — a server that
        holds the response open is not waited for."""
        raw = self._raw
        received = 0
        try:
            async with asyncio.timeout(_DRAIN_S):
                while raw is not None and received <= _DRAIN_LIMIT:
                    received += len(await anext(raw))
        except (StopAsyncIteration, TimeoutError, httpx.HTTPError):
            pass
        await self._close_response()

    async def _close_response(self) -> None:
        response, self._response = self._response, None
        raw, self._raw = self._raw, None
        if response is None:
            return
        # Shielded and time-limited: the endpoint must see the disconnect even
        # when the consumer was cancelled (the caller's CancelledError is re-raised
        # by the caller's own await, never swallowed here).
        closing = asyncio.ensure_future(self._aclose(response, raw))
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(_CLEANUP_TIMEOUT_S):
                    await closing
            raise

    @staticmethod
    async def _aclose(response: httpx.Response, raw: AsyncIterator[bytes] | None) -> None:
        with contextlib.suppress(httpx.HTTPError, OSError, TimeoutError):
            async with asyncio.timeout(_CLEANUP_TIMEOUT_S):
                if raw is not None and hasattr(raw, "aclose"):
                    await raw.aclose()
                await response.aclose()

    async def aclose(self) -> None:
        """Close the response (idempotent). The endpoint sees the disconnect."""
        self._closed = True
        await self._close_response()

    async def collect_text(self) -> str:
        """Consume the stream and return the speakable text."""
        parts = [event.text async for event in self if isinstance(event, TextDelta)]
        return "".join(parts)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data

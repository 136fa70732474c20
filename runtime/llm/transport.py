"""An httpx transport that connects only to addresses checked by the URL policy.

The URL policy (``runtime.endpoints``) resolves an endpoint's name once and
checks every address. This transport's network backend then maps that name to
those addresses when httpcore opens a TCP connection, so a second DNS answer
can never be used (DNS rebinding). TLS still verifies the certificate against
the *name* and sends it as SNI, and ``Host`` stays the name. Connections to
names that were not pinned, and Unix sockets, are refused. Proxies from the
environment are ignored (they would bypass the pinning).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import ssl
import typing
from typing import Final

import httpcore
import httpx

from runtime.endpoints import (
    EndpointURL,
    IPAddress,
    PinnedEndpoint,
    Resolver,
    URLPolicy,
    parse_endpoint_url,
    plain_http_message,
    resolve_endpoint,
    speaks_plain_http,
    ssl_cause,
    tls_failure,
    tls_verify,
)
from runtime.errors import EndpointConnectError, EndpointTimeout, EndpointTLSError, StreamDropped
from runtime.secret import Secret


class _NoHeaderValues(logging.Filter):
    """Keeps response header values out of httpcore's debug log.

    httpcore logs every response's headers at DEBUG. A server may echo the
    credentials it was given in a header, so with debug logging on the key
    would reach the log; the record keeps only the event name.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("receive_response_headers.complete"):
            record.msg = message.split(" ", 1)[0] + " (header values not logged)"
            record.args = None
        return True


for _name in ("httpcore.http11", "httpcore.http2"):
    logging.getLogger(_name).addFilter(_NoHeaderValues())


class PinnedNetworkBackend(httpcore.AsyncNetworkBackend):
    """Resolves nothing itself: connects ``(host, port)`` to pinned addresses only."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._inner = inner or httpcore.AnyIOBackend()
        self._pins: dict[tuple[str, int], tuple[IPAddress, ...]] = {}
        self.connects = 0

    def pin(self, host: str, port: int, addresses: typing.Sequence[IPAddress]) -> None:
        if not addresses:
            raise ValueError("at least one address is required")
        self._pins[(host.lower(), port)] = tuple(addresses)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = self._pins.get((host.lower().strip("[]"), port))
        if addresses is None:
            raise httpcore.ConnectError(
                "connection refused: host was not checked by the URL policy"
            )
        last: Exception | None = None
        for address in addresses:
            try:
                stream = await self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
                continue
            self.connects += 1
            return stream
        assert last is not None
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not allowed for endpoints")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


@functools.cache
def system_tls_context() -> ssl.SSLContext:
    """One verifying TLS context with the system roots, shared by the process's clients.

    Loading the roots costs tens of milliseconds of CPU; done for every client (each
    session opens one), it stalled the event loop every time a session started.
    """
    return httpx.create_ssl_context(verify=True, trust_env=False)


class PinnedTransport(httpx.AsyncHTTPTransport):
    """``httpx.AsyncHTTPTransport`` whose connection pool uses a :class:`PinnedNetworkBackend`.

    httpx does not expose httpcore's ``network_backend`` argument, so the pool
    is built here with the same settings httpx would use (httpx 0.28 series,
    pinned in ``pyproject.toml``; the integration tests fail if this breaks).
    """

    def __init__(
        self,
        backend: PinnedNetworkBackend,
        *,
        verify: ssl.SSLContext | bool = True,
        http2: bool = False,
        limits: httpx.Limits | None = None,
    ) -> None:
        limits = limits or httpx.Limits(max_connections=20, max_keepalive_connections=10)
        if verify is True:
            verify = tls_verify()  # the system roots, plus VOXLOOP_CA_BUNDLE if set
        if verify is True:
            verify = system_tls_context()
        super().__init__(verify=verify, http2=http2, trust_env=False, limits=limits)
        ssl_context = httpx.create_ssl_context(verify=verify, trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=http2,
            network_backend=backend,
        )
        self.backend = backend

    def pool_connection_count(self) -> int:
        """How many connections the pool holds (for tests and statistics)."""
        pool = self._pool
        assert isinstance(pool, httpcore.AsyncConnectionPool)
        return len(pool.connections)


class PinnedHTTP:
    """An httpx client bound to one endpoint: URL policy checked, resolved once, pinned.

    Used by every client of user-configured endpoints (chat completions,
    speech servers). Redirects are never followed and proxies from the
    environment are ignored.

    Raises:
        URLPolicyError: the base URL is not allowed (syntax, at construction;
            addresses, at :meth:`ensure_pinned`).
    """

    def __init__(
        self,
        base_url: str,
        *,
        policy: URLPolicy,
        resolver: Resolver,
        headers: dict[str, str],
        timeout: httpx.Timeout,
        api_key: Secret | None = None,
        verify: ssl.SSLContext | bool = True,
        http2: bool = False,
        limits: httpx.Limits | None = None,
    ) -> None:
        self.url: EndpointURL = parse_endpoint_url(base_url, policy)
        self._policy = policy
        self._resolver = resolver
        self.backend = PinnedNetworkBackend()
        self.transport = PinnedTransport(self.backend, verify=verify, http2=http2, limits=limits)
        self._pinned: PinnedEndpoint | None = None
        self._lock = asyncio.Lock()
        all_headers = dict(headers)
        if api_key:
            all_headers["Authorization"] = f"Bearer {api_key.reveal()}"
        self.http = httpx.AsyncClient(
            transport=self.transport,
            headers=all_headers,
            timeout=timeout,
            follow_redirects=False,
            trust_env=False,
        )

    async def ensure_pinned(self) -> PinnedEndpoint:
        """Resolve and check the endpoint's addresses once; later calls reuse them."""
        if self._pinned is None:
            async with self._lock:
                if self._pinned is None:
                    pinned = await resolve_endpoint(self.url, self._policy, self._resolver)
                    self.backend.pin(self.url.host, self.url.port, pinned.addresses)
                    self._pinned = pinned
        return self._pinned

    async def speaks_plain_http(self) -> bool:
        """Whether this https endpoint's server answers in plain http (asked after a
        TLS handshake with it failed; ``False`` for http URLs and unpinned endpoints)."""
        if self.url.scheme != "https" or self._pinned is None:
            return False
        return await speaks_plain_http(str(self._pinned.addresses[0]), self.url.port)

    async def aclose(self) -> None:
        await self.http.aclose()


class map_http_errors:
    """Convert httpx failures into the typed endpoint errors, at one boundary.

    A class rather than a generator-based context manager: used inside an async
    generator (a streamed speech answer), a generator-based one would be a second
    generator to finalise when that one is dropped, and asyncio finalises the two
    concurrently ("aclose(): asynchronous generator is already running").

    A TLS handshake that fails because the server speaks plain http (asked of the
    server when ``http`` is given) is the one line every command gives for it
    (:func:`runtime.endpoints.plain_http_message`), not OpenSSL's text.

    Args:
        peer: how messages name the other side ("the endpoint", "the speech server").
        before_response: failures before any response byte are safe to retry.
        http: the client the request went through (to ask its server in plain http).
    """

    def __init__(
        self, peer: str, *, before_response: bool = True, http: PinnedHTTP | None = None
    ) -> None:
        self._peer = peer
        self._before_response = before_response
        self._http = http

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> bool:
        if isinstance(exc, httpx.HTTPError):
            typed = _typed(exc, self._peer, self._before_response)
            if (
                isinstance(typed, EndpointTLSError)
                and typed.retryable  # not a certificate that does not verify
                and self._http is not None
                and await self._http.speaks_plain_http()
            ):
                typed = EndpointTLSError(plain_http_message(self._http.url.url), retryable=False)
            raise typed from exc
        return False


def _typed(exc: httpx.HTTPError, peer: str, before_response: bool) -> Exception:
    """The typed endpoint error for an httpx failure."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        tls = ssl_cause(exc)
        if tls is not None:
            verify = isinstance(tls, ssl.SSLCertVerificationError)
            return EndpointTLSError(
                f"TLS handshake with {peer} failed: {tls_failure(tls)}", retryable=not verify
            )
        return EndpointConnectError(
            f"could not connect to {peer}: {_connect_detail(exc)}", retryable=True
        )
    if isinstance(exc, httpx.TimeoutException):
        what = _TIMEOUTS.get(type(exc), "no answer in time")
        return EndpointTimeout(f"{peer} timed out: {what}", retryable=before_response)
    return StreamDropped(
        f"the connection to {peer} failed: {dropped_words(exc)}", retryable=before_response
    )


def dropped_words(exc: Exception) -> str:
    """What an httpx failure after the connection was made means, in words."""
    return next((w for kind, w in _DROPS if isinstance(exc, kind)), "the HTTP exchange failed")


# What each httpx failure means, in words (httpx's class names are not for the people who
# read these messages: a session's reply.error, a benchmark's table).
_TIMEOUTS: Final[dict[type[httpx.TimeoutException], str]] = {
    httpx.ConnectTimeout: "no connection within the connect timeout",
    httpx.ReadTimeout: "nothing received within the read timeout",
    httpx.WriteTimeout: "the request could not be sent within the write timeout",
    httpx.PoolTimeout: "no free connection within the pool timeout",
}
_DROPS: Final[tuple[tuple[type[Exception], str], ...]] = (
    (httpx.RemoteProtocolError, "the server closed the connection or broke the HTTP protocol"),
    (httpx.LocalProtocolError, "the request could not be sent as HTTP"),
    (httpx.ReadError, "the connection broke while receiving"),
    (httpx.WriteError, "the connection broke while sending"),
    (httpx.DecodingError, "the answer's content encoding does not decode"),
    (httpx.StreamError, "the answer's body could not be read"),
    (httpx.TooManyRedirects, "too many redirects"),
    (httpx.UnsupportedProtocol, "the URL's scheme is not http or https"),
)


def _connect_detail(exc: httpx.HTTPError) -> str:
    """The OS reason (``Connection refused``) when the chain holds one, else httpx's text."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno:
            return os.strerror(current.errno)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    text = " ".join(str(exc).split())
    return text[:160] if text else "the connection failed"

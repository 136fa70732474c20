"""The voxloop error tree.

Every error says whose fault it was and whether retrying is safe::

    VoiceAgentError
    ├── URLPolicyError            the URL is not allowed (caller's fault, never retry)
    └── EndpointError             a chat-completions endpoint call failed
        ├── EndpointConnectError      could not connect (network; retryable)
        │   └── EndpointTLSError          the TLS handshake failed (a certificate
        │                                 that does not verify is not retryable)
        ├── EndpointAuthError         401/403 (caller's credentials; not retryable)
        ├── EndpointRateLimited       429 (endpoint; retryable after ``retry_after_s``)
        ├── EndpointRejected          other 4xx, 3xx redirects (caller's request; not retryable)
        ├── EndpointServerError       5xx (endpoint; retryable)
        ├── EndpointTimeout           nothing generated before the first-token deadline
        ├── EndpointStalled           the gap between tokens exceeded the stall deadline
        ├── MalformedStream           the body is not an OpenAI chat-completions SSE stream
        └── StreamDropped             the connection ended mid-stream

Third-party exceptions are converted at one boundary (``runtime.llm.client``)
with ``raise ... from``. Messages never contain credentials.
"""

from __future__ import annotations

from typing import Literal

Fault = Literal["caller", "endpoint", "network"]


class VoiceAgentError(Exception):
    """Root of every error voxloop raises on purpose."""


class URLPolicyError(VoiceAgentError, ValueError):
    """A URL was rejected by the endpoint URL policy."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class EndpointError(VoiceAgentError):
    """A call to a chat-completions endpoint failed.

    Attributes:
        kind: stable short name used in metrics and error events.
        fault: whose fault it was.
        retryable: whether sending the same request again is safe and may work.
        status_code: the HTTP status, when the endpoint answered with one.
    """

    kind: str = "error"
    fault: Fault = "endpoint"

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status_code = status_code


class EndpointConnectError(EndpointError):
    kind = "connect"
    fault: Fault = "network"


class EndpointTLSError(EndpointConnectError):
    kind = "tls"


class EndpointAuthError(EndpointError):
    kind = "auth"
    fault: Fault = "caller"


class EndpointRateLimited(EndpointError):
    kind = "rate_limit"

    def __init__(
        self, message: str, *, retry_after_s: float | None, status_code: int = 429
    ) -> None:
        super().__init__(message, retryable=True, status_code=status_code)
        self.retry_after_s = retry_after_s


class EndpointRejected(EndpointError):
    kind = "rejected"
    fault: Fault = "caller"


class EndpointServerError(EndpointError):
    kind = "server"


class EndpointTimeout(EndpointError):
    kind = "timeout"


class EndpointStalled(EndpointError):
    kind = "stall"


class MalformedStream(EndpointError):
    kind = "malformed"


class StreamDropped(EndpointError):
    kind = "dropped"
    fault: Fault = "network"

"""Why a session cannot be bound, resumed or continued."""

from __future__ import annotations

from runtime.protocol import events as ev


class SessionRefused(Exception):
    """A session cannot be bound, resumed or continued.

    Attributes:
        code: the protocol error code; ``fatal`` codes end the connection.
        param: the offending field, when there is one.
    """

    def __init__(self, code: ev.ErrorCode, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.code: ev.ErrorCode = code
        self.message = message
        self.param = param

    @property
    def fatal(self) -> bool:
        return self.code in ev.FATAL_CODES

"""A string that never shows itself in reprs, logs or error messages."""

from __future__ import annotations

from typing import Final

_MASK: Final = "********"


class Secret:
    """Wraps a credential such as an endpoint ``api_key``.

    ``str()``, ``repr()`` and formatting all print a mask; the only way to the
    value is :meth:`reveal`, which makes every use greppable.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("a secret must be a string")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def redact(self, text: str) -> str:
        """Return ``text`` with every occurrence of the secret masked."""
        if not self._value:
            return text
        return text.replace(self._value, _MASK)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return f"Secret('{_MASK}')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("secrets are not picklable")

"""Text from outside (an endpoint's stream, a tool's arguments) made safe to speak and send.

An OpenAI-compatible endpoint may stream any JSON string: ``\\u0000``, a lone
``\\ud800`` escape, C0/C1 control characters. Python decodes those into a
``str`` that a speech engine refuses (``embedded null character``) and that
cannot be encoded as UTF-8 for a WebSocket frame (a lone surrogate). Nothing
such a string contains may end a session, so every string read from an
endpoint passes through :func:`safe_text` (or :func:`safe_json` for a decoded
document) before anything else sees it.

Kept: letters of every script, marks, symbols, emoji, tab, line feed and
carriage return, bidirectional and zero-width formatting characters.
Removed: NUL and the other C0 controls, DEL and the C1 controls, unpaired
surrogates (every surrogate in a decoded ``str`` is unpaired), and the
noncharacters U+FFFE and U+FFFF.
"""

from __future__ import annotations

import re
from typing import Any, Final

_UNSAFE: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")


def safe_text(text: str) -> str:
    """``text`` without the characters listed in the module docstring."""
    return _UNSAFE.sub("", text) if _UNSAFE.search(text) else text


def safe_json(value: Any) -> Any:
    """A decoded JSON value with :func:`safe_text` applied to every string and key."""
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, dict):
        return {safe_text(str(k)): safe_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [safe_json(v) for v in value]
    return value


def unsafe_char(text: str) -> str | None:
    """A description of the first character a client may not send, or ``None``.

    Clients are held to what the REST API accepts: no NUL, no unpaired surrogate.
    """
    if "\x00" in text:
        return "must not contain NUL characters"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired surrogate (not valid Unicode)"
    return None

"""Streaming split of text on an open/close tag pair (``<think>…</think>``, code fences).

Pure and incremental: text that could be the beginning of the next tag is held
back until a later call decides it, so tags split across deltas are found and
any split of the same text gives the same pieces (joined).
"""

from __future__ import annotations


class TagSplitter:
    """Splits streamed text into pieces outside and inside ``open_tag … close_tag``."""

    __slots__ = ("_close", "_held", "_inside", "_open")

    def __init__(self, open_tag: str, close_tag: str) -> None:
        if not open_tag or not close_tag:
            raise ValueError("tags must be non-empty")
        self._open = open_tag
        self._close = close_tag
        self._inside = False
        self._held = ""

    @property
    def inside(self) -> bool:
        return self._inside

    def feed(self, text: str) -> list[tuple[bool, str]]:
        """Return the decided ``(inside, text)`` pieces of ``text``."""
        out: list[tuple[bool, str]] = []
        buf = self._held + text
        self._held = ""
        while buf:
            tag = self._close if self._inside else self._open
            at = buf.find(tag)
            if at != -1:
                if at:
                    out.append((self._inside, buf[:at]))
                self._inside = not self._inside
                buf = buf[at + len(tag) :]
                continue
            keep = 0
            for n in range(min(len(tag) - 1, len(buf)), 0, -1):
                if tag.startswith(buf[-n:]):
                    keep = n
                    break
            if len(buf) > keep:
                out.append((self._inside, buf[: len(buf) - keep]))
            self._held = buf[len(buf) - keep :]
            break
        return out

    def flush(self) -> list[tuple[bool, str]]:
        """Release text held back at the end of the stream."""
        held, self._held = self._held, ""
        return [(self._inside, held)] if held else []

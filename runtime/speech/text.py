"""Incremental text for TTS: turns streamed LLM deltas into speakable segments.

Theory of operation
-------------------
:class:`SpeechSegmenter` is pure and streaming. Deltas are pushed as they
arrive; whole segments are released as soon as the text decides them:

* A sentence ends at ``.``, ``!``, ``?`` or ``…`` (plus closing quotes or
  brackets) followed by whitespace and then a character that can start a
  sentence. It does not end inside ``3.5``, ``$29.99``, ``example.com``,
  ``e.g.``/``Dr.``/``U.S.`` (known abbreviations and initials), a numbered-list
  marker (``1.`` at the start of a line) or an ellipsis followed by lower case.
  Line breaks end a segment (lists, paragraphs).
* The first segment is eager: once ``eager_chars`` characters are in, it is
  released at the first clause mark (``,`` ``;`` ``:`` ``—``) so the first
  audio can start early.
* Later segments are batched: a boundary is taken only when the segment has at
  least ``min_chars`` characters; a run longer than ``max_chars`` without a
  boundary is broken at its last clause mark or space.
* Released text is cleaned for speech: code fences (with their contents),
  ``<think>`` reasoning, markdown emphasis/headings/bullets/quotes, link
  targets and emoji are dropped. Numbers, dates and times are left for the TTS.

Every decision looks only at text already received (a boundary is decided
when the character after it is seen, or at :meth:`flush`), so any split of
the same text yields the same segments.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from runtime.tags import TagSplitter

_ENDERS: Final = ".!?…"
_CLOSERS: Final = "\"')]}\u201d\u2019\u00bb"
_CLAUSE: Final = ",;:—"
_ABBREVIATIONS: Final = frozenset(
    {
        "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "etc", "e.g", "i.e",
        "approx", "no", "fig", "dept", "est", "inc", "ltd", "co", "corp", "jan", "feb", "mar",
        "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "a.m", "p.m", "ave",
        "blvd", "rd", "gen", "col", "lt", "sgt", "capt", "gov", "sen", "rep", "rev", "hon",
    }
)  # fmt: skip
_INITIALS = re.compile(r"^(?:[A-Za-z]\.)*[A-Za-z]$")
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_LINE_MARKUP = re.compile(r"^\s*(?:#{1,6}\s+|>\s*|[-*+•]\s+)", re.MULTILINE)
_EMPHASIS = re.compile(r"(\*{1,3}|_{2,3}|~~|`+)")
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_MARK = re.compile(r"\s+([.,!?;:…])")


@dataclass(frozen=True, slots=True)
class SegmenterConfig:
    """Tuning of :class:`SpeechSegmenter` (characters of raw text)."""

    eager_chars: int = 24
    min_chars: int = 40
    max_chars: int = 220

    def __post_init__(self) -> None:
        if not 0 < self.eager_chars <= self.max_chars or not 0 < self.min_chars <= self.max_chars:
            raise ValueError("segmenter lengths must be positive and at most max_chars")


def clean_for_speech(text: str) -> str:
    """Remove markup and emoji; collapse whitespace. Returns ``""`` for markup only."""
    text = _LINK.sub(r"\1", text)
    text = _LINE_MARKUP.sub("", text)
    text = _EMPHASIS.sub("", text)
    kept = []
    for ch in text:
        if ch in "\u200d\ufe0f\ufe0e" or unicodedata.category(ch) in ("So", "Cs", "Co", "Cn"):
            continue
        kept.append(ch)
    return _SPACE_BEFORE_MARK.sub(r"\1", _SPACES.sub(" ", "".join(kept))).strip()


class SpeechSegmenter:
    """Streaming sentence/clause segmenter for incremental TTS.

    Args:
        config: segment lengths.
        normaliser: applied to each released segment after cleaning (e.g. to
            spell out numbers, dates and times for a TTS that reads them
            badly); by default they are left for the TTS.
    """

    __slots__ = ("_buf", "_config", "_fence", "_normaliser", "_released", "_think")

    def __init__(
        self,
        config: SegmenterConfig | None = None,
        normaliser: Callable[[str], str] | None = None,
    ) -> None:
        self._config = config or SegmenterConfig()
        self._normaliser = normaliser
        self._buf = ""
        self._released = 0
        self._think = TagSplitter("<think>", "</think>")
        self._fence = TagSplitter("```", "```")

    @property
    def released(self) -> int:
        """How many segments were released so far."""
        return self._released

    def push(self, delta: str) -> list[str]:
        """Add a delta; return the segments it completes (possibly none)."""
        for in_think, piece in self._think.feed(delta):
            if not in_think:
                self._add(self._fence.feed(piece))
        return self._drain(final=False)

    def flush(self) -> list[str]:
        """End of the reply: release everything that is left."""
        for in_think, piece in self._think.flush():
            if not in_think:
                self._add(self._fence.feed(piece))
        self._add(self._fence.flush())
        return self._drain(final=True)

    def _add(self, pieces: list[tuple[bool, str]]) -> None:
        for in_fence, piece in pieces:
            if in_fence:
                # Code is not read aloud; the fence still ends the segment.
                self._buf += "\n"
            else:
                self._buf += piece

    def _drain(self, *, final: bool) -> list[str]:
        out: list[str] = []
        while True:
            cut = self._next_cut(final=final)
            if cut is None:
                break
            raw, self._buf = self._buf[:cut], self._buf[cut:]
            text = clean_for_speech(raw)
            if text and self._normaliser is not None:
                text = self._normaliser(text).strip()
            if text:
                out.append(text)
                self._released += 1
        return out

    def _next_cut(self, *, final: bool) -> int | None:
        buf = self._buf
        if not buf:
            return None
        cfg = self._config
        first = self._released == 0
        i = 0
        n = len(buf)
        while i < n:
            if i >= cfg.max_chars:
                return self._forced_cut(buf, cfg.max_chars)
            ch = buf[i]
            if ch == "\n":
                if clean_for_speech(buf[:i]):
                    return i + 1
                # Leading markup-only lines go with the next segment.
                i += 1
                continue
            if ch in _ENDERS:
                end = i + 1
                while end < n and (buf[end] in _ENDERS or buf[end] in _CLOSERS):
                    end += 1
                if end >= n:
                    break  # undecided until more text arrives
                if not buf[end].isspace():
                    i = end
                    continue
                nxt = end
                while nxt < n and buf[nxt] in " \t":
                    nxt += 1
                if nxt >= n:
                    break
                if self._is_sentence_end(buf, i, end, buf[nxt]):
                    length = len(buf[:end].strip())
                    if first or length >= cfg.min_chars:
                        return end
                i = end
                continue
            if ch in _CLAUSE:
                if i + 1 >= n:
                    break
                if buf[i + 1].isspace() and first and i + 1 >= cfg.eager_chars:
                    return i + 1
            i += 1
        if final:
            return n
        return None

    @staticmethod
    def _forced_cut(buf: str, limit: int) -> int:
        window = buf[:limit]
        for marks in (_CLAUSE, " "):
            at = max(window.rfind(m) for m in marks)
            if at > 0:
                return at + 1
        return limit

    @staticmethod
    def _is_sentence_end(buf: str, at: int, end: int, following: str) -> bool:
        mark = buf[at]
        start = max(buf.rfind(" ", 0, at), buf.rfind("\n", 0, at)) + 1
        word = buf[start:at].lstrip("\"'([{\u201c\u2018\u00ab")
        if mark == ".":
            if buf[at:end].startswith("...") or buf[at:end].startswith("…"):
                return not following.islower()
            if word.lower() in _ABBREVIATIONS or _INITIALS.match(word):
                return False
            if word.isdigit() and (start == 0 or buf[start - 1] == "\n"):
                return False  # a numbered-list marker such as "1."
        if mark == "…":
            return not following.islower()
        return not following.islower()

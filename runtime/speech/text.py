"""Incremental text for TTS: turns streamed LLM deltas into speakable segments.

Theory of operation
-------------------
:class:`SpeechSegmenter` is pure and streaming. Deltas are pushed as they
arrive; whole segments are released as soon as the text decides them.

Markup first. ``<think>`` reasoning and code fences (with their contents) are
dropped; inline HTML tags are removed (``<br>``, ``<p>``, ``<li>`` and other
block tags become line breaks) and character references (``&amp;``,
``&#8212;``) are decoded *before* segmenting, so a tag or an entity split
across deltas is held back until it is complete and its ``;`` never ends a
clause.

Boundaries, in every script (the marks come from Unicode's
``Sentence_Terminal`` and ``Terminal_Punctuation`` properties, through
:mod:`regex`):

* A sentence ends at a terminal mark (``. ! ? …``, CJK ``。！？``, the
  Devanagari danda ``।``, the Arabic ``؟``, the Urdu ``۔``, Armenian,
  Ethiopic, Myanmar, …) plus closing quotes or brackets. Marks of
  space-separated scripts need whitespace after them and a next character that
  can start a sentence (not lower case), so ``3.5``, ``example.com`` and
  ``Well... maybe`` do not end one; full-width marks end a sentence whatever
  follows (CJK writes no space).
* Abbreviations are decided by what follows: a title (``Dr.``, ``Mr.``,
  ``St.``) or an introducer (``e.g.``, ``vs.``) never ends a sentence; ``No.``
  and month names do not before a number; ``etc.``, ``Inc.``, ``a.m.``,
  ``U.S.`` end one only before a capitalised word; a single capital letter
  (``J. K. Rowling``) is an initial. A numbered-list marker (``1.`` at the
  start of a line) is not an end. Line breaks end a segment.
* Clause marks: ``, ; : —`` and their equivalents in other scripts (``，、``,
  the Arabic comma ``،``, …).

Release policy (the first segment is what the listener waits for):

* First segment: at the first sentence end or line break; at a clause mark
  once ``eager_chars`` characters are in; otherwise, once ``first_words``
  words have arrived (or ``first_after_ms`` have passed since the first text,
  when the caller passes times), at the last clause mark, or else at a word
  boundary that does not leave a dangling article, preposition or number.
* Second segment: at a sentence end or clause mark once ``min_chars``
  characters are in (it must be ready before the short first one has played).
* Later segments are batched for prosody: a sentence end is taken only when
  the segment has at least ``min_chars`` characters (a full-width character
  counts three); a run longer than
  ``max_chars`` without one is broken at its last clause mark or space.
* Released text is cleaned for speech (:func:`clean_for_speech`): markdown
  emphasis/headings/bullets/quotes, link targets and whole emoji sequences
  (skin-tone modifiers, keycaps, flags, tag sequences, ZWJ sequences) are
  dropped. Numbers, dates and times are left for the TTS.

Without times, every decision looks only at text already received (a boundary
is decided when the character after it is seen, or at :meth:`flush`), so any
split of the same text yields the same segments.
"""

from __future__ import annotations

import functools
import html
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import regex

from runtime.safetext import safe_text
from runtime.tags import TagSplitter

_CLOSERS: Final = "\"')]}\u201d\u2019\u00bb\u300d\u300f\u3011\uff09\u300b\u3009"
_OPENERS: Final = "\"'([{\u201c\u2018\u00ab\u300c\u300e\u3010\uff08\u300a\u3008\u00bf\u00a1"
_SENTENCE_MARK = regex.compile(r"[\p{Sentence_Terminal}\u037e\u2026]")
_CLAUSE_MARK = regex.compile(r"[\p{Terminal_Punctuation}\u2014\u2013]")
# Titles precede a name or number; introducers precede an example. Neither ends a sentence.
_TITLES: Final = frozenset(
    {
        "mr", "mrs", "ms", "dr", "prof", "st", "mt", "ft", "gen", "col", "lt", "sgt", "capt",
        "gov", "sen", "rep", "rev", "hon", "pres", "supt", "messrs", "mme", "mlle", "fr",
    }
)  # fmt: skip
_INTRODUCERS: Final = frozenset({"e.g", "i.e", "vs", "cf", "approx", "viz", "incl", "ca"})
# Before a number these are labels ("No. 5", "Fig. 3", "Jan. 12"), not ends.
_BEFORE_NUMBERS: Final = frozenset(
    {
        "no", "nos", "fig", "figs", "vol", "p", "pp", "ch", "sec", "art", "ex", "tel", "ext",
        "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
    }
)  # fmt: skip
# End a sentence only before a capitalised word.
_ABBREVIATIONS: Final = frozenset(
    {
        "etc", "inc", "ltd", "co", "corp", "llc", "plc", "jr", "sr", "esq", "dept", "est",
        "a.m", "p.m", "ave", "blvd", "rd", "hwy", "univ", "assn", "bros", "min", "max",
        *_BEFORE_NUMBERS,
    }
)  # fmt: skip
_INITIALS = re.compile(r"^(?:[A-Za-z]\.)+[A-Za-z]$")
# A first segment cut at a word boundary must not end on one of these.
_BINDING: Final = frozenset(
    {
        "a", "an", "the", "to", "of", "in", "on", "at", "for", "with", "from", "by", "and", "or",
        "but", "my", "your", "our", "their", "his", "her", "its", "this", "that", "these",
        "those", "is", "are", "was", "were", "be", "will", "can", "i", "you", "we", "it", "as",
        "not", "very", "so", "if", "than", "into", "about", "some", "any", "no", "every",
    }
)  # fmt: skip
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_LINE_MARKUP = re.compile(r"^\s*(?:#{1,6}\s+|>\s*|[-*+•]\s+)", re.MULTILINE)
_EMPHASIS = re.compile(r"(\*{1,3}|_{2,3}|~~|`+)")
_ALL_SPACE = re.compile(r"\s+")
_SPACE_BEFORE_MARK = re.compile(r"\s+([.,!?;:…])")
# Emoji: a grapheme cluster with a pictograph, a keycap or a flag goes whole; stray
# components (skin tones, joiners, variation selectors, tag characters) go too.
_GRAPHEME = regex.compile(r"\X")
_EMOJI_PART = regex.compile(r"[\p{Extended_Pictographic}\p{Regional_Indicator}\u20e3]")
_EMOJI_STRAY = regex.compile(
    r"[\p{Emoji_Modifier}\u200d\ufe0e\ufe0f\U000e0020-\U000e007f\U0001f9b0-\U0001f9b3]"
)
_KEEP_SYMBOLS: Final = frozenset("°℃℉№")
_HTML_TAGS: Final = frozenset(
    {
        "a", "abbr", "b", "bdi", "bdo", "big", "cite", "code", "del", "dfn", "em", "font", "i",
        "ins", "kbd", "mark", "q", "s", "samp", "small", "span", "strike", "strong", "sub", "sup",
        "time", "tt", "u", "var", "wbr", "img", "label", "nobr",
    }
)  # fmt: skip
_HTML_BREAKS: Final = frozenset(
    {
        "br", "p", "div", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6",
        "hr", "blockquote", "pre", "table", "tr", "td", "th", "thead", "tbody", "section",
        "article", "header", "footer", "nav", "aside", "main", "figure", "figcaption",
        "details", "summary", "address", "center",
    }
)  # fmt: skip
_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]*)(?:[ \t][^<>\n]*)?/?>")
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});?")
_ENTITY_PREFIX = re.compile(r"&(?:#[xX]?[0-9A-Fa-f]{0,7}|[A-Za-z][A-Za-z0-9]{0,31})?$")
_TAG_PREFIX = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:[ \t][^<>\n]*)?/?$|</?$")
_MAX_HELD: Final = 256


@dataclass(frozen=True, slots=True)
class SegmenterConfig:
    """Tuning of :class:`SpeechSegmenter` (characters and words of raw text).

    Attributes:
        eager_chars: the first segment ends at a clause mark once it has this many characters.
        first_words: with no mark yet, the first segment ends at a word boundary once this
            many words are in (``0``: never; wait for a mark).
        first_after_ms: with no mark yet, the first segment ends at a word boundary once
            this long has passed since the first text (only when :meth:`SpeechSegmenter.push`
            is given times; ``None``: never).
        min_chars: later segments end at a sentence end once they have this many characters.
        max_chars: a run this long without a boundary is cut at its last clause mark or space.
    """

    eager_chars: int = 12
    first_words: int = 7
    first_after_ms: float | None = 250.0
    min_chars: int = 30
    max_chars: int = 220

    def __post_init__(self) -> None:
        if not 0 < self.eager_chars <= self.max_chars or not 0 < self.min_chars <= self.max_chars:
            raise ValueError("segmenter lengths must be positive and at most max_chars")
        if self.first_words < 0 or (self.first_after_ms is not None and self.first_after_ms < 0):
            raise ValueError("first_words and first_after_ms must not be negative")


@functools.lru_cache(maxsize=4096)
def _mark(ch: str) -> str:
    """``"S"`` sentence mark, ``"C"`` clause mark, ``""`` neither."""
    if _SENTENCE_MARK.match(ch):
        return "S"
    if _CLAUSE_MARK.match(ch):
        return "C"
    return ""


@functools.lru_cache(maxsize=4096)
def _wide(ch: str) -> bool:
    return unicodedata.east_asian_width(ch) in ("W", "F")


def _needs_space(ch: str) -> bool:
    """Marks of space-separated scripts end something only before whitespace (``3.5``,
    ``3,000``, ``10:30``); full-width marks (CJK) end it whatever follows."""
    return not _wide(ch)


def _weight(text: str) -> int:
    """Length for the segment thresholds: a full-width character (a CJK syllable) counts 3."""
    return sum(3 if _wide(ch) else 1 for ch in text.strip())


def _html_to_text(text: str) -> str:
    def tag(m: re.Match[str]) -> str:
        name = m.group(2).lower()
        if name in _HTML_BREAKS:
            return "\n"
        if name in _HTML_TAGS:
            return ""
        return m.group(0)

    return html.unescape(_TAG.sub(tag, text))


def _strip_emoji(text: str) -> str:
    out: list[str] = []
    for cluster in _GRAPHEME.findall(text):
        if _EMOJI_PART.search(cluster):
            if cluster[0] in _KEEP_SYMBOLS:
                out.append(cluster[0])
            continue
        kept = []
        for ch in _EMOJI_STRAY.sub("", cluster):
            category = unicodedata.category(ch)
            if category in ("Cs", "Co", "Cn") or (category == "So" and ch not in _KEEP_SYMBOLS):
                continue
            kept.append(ch)
        out.append("".join(kept))
    return "".join(out)


def _clean(text: str) -> str:
    text = _LINK.sub(r"\1", text)
    text = _LINE_MARKUP.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = _strip_emoji(text)
    return _SPACE_BEFORE_MARK.sub(r"\1", _ALL_SPACE.sub(" ", text)).strip()


def clean_for_speech(text: str) -> str:
    """Text as it should be spoken: markup, HTML and emoji removed, entities decoded.

    Returns one line with single spaces; ``""`` when nothing speakable is left.
    """
    return _clean(safe_text(_html_to_text(text)))


def reads_finished(text: str) -> bool:
    """Whether ``text`` ends like a finished sentence, in any script.

    A trailing ellipsis (``...``, ``…``) reads unfinished: the speaker trailed
    off. Closing quotes and brackets after the mark are ignored.
    """
    text = text.rstrip().rstrip(_CLOSERS)
    if not text or text.endswith(("...", "…", "..")):
        return False
    return _mark(text[-1]) == "S"


class _MarkupFilter:
    """Streaming HTML tag removal and entity decoding: holds back an unfinished tag or entity."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held = ""

    def feed(self, text: str) -> str:
        buf = self._held + text
        cut = len(buf)
        for mark, prefix in (("<", _TAG_PREFIX), ("&", _ENTITY_PREFIX)):
            at = buf.rfind(mark)
            if at != -1 and len(buf) - at <= _MAX_HELD and prefix.fullmatch(buf, at):
                cut = at
                break
        self._held = buf[cut:]
        return _html_to_text(buf[:cut])

    def flush(self) -> str:
        held, self._held = self._held, ""
        return _html_to_text(held)


class SpeechSegmenter:
    """Streaming sentence/clause segmenter for incremental TTS.

    Args:
        config: segment lengths and the first-segment policy.
        normaliser: applied to each released segment after cleaning (e.g. to
            spell out numbers, dates and times for a TTS that reads them
            badly); by default they are left for the TTS.
    """

    __slots__ = (
        "_buf", "_config", "_fence", "_markup", "_normaliser", "_now", "_released", "_t_first",
        "_think",
    )  # fmt: skip

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
        self._markup = _MarkupFilter()
        self._t_first: float | None = None
        self._now: float | None = None

    @property
    def released(self) -> int:
        """How many segments were released so far."""
        return self._released

    def push(self, delta: str, now_ms: float | None = None) -> list[str]:
        """Add a delta; return the segments it completes (possibly none).

        Args:
            delta: the next piece of the reply.
            now_ms: the current time (any monotonic origin, ms). Given, the
                first segment is also released ``first_after_ms`` after the
                first text arrived, at the best word boundary so far.
        """
        for in_think, piece in self._think.feed(delta):
            if not in_think:
                self._add(self._fence.feed(piece))
        if now_ms is not None:
            self._now = now_ms
            if self._t_first is None and self._buf.strip():
                self._t_first = now_ms
        return self._drain(final=False)

    def poll(self, now_ms: float) -> list[str]:
        """Release the first segment if its time has come while no text arrived."""
        return self.push("", now_ms)

    def flush(self) -> list[str]:
        """End of the reply: release everything that is left."""
        for in_think, piece in self._think.flush():
            if not in_think:
                self._add(self._fence.feed(piece))
        self._add(self._fence.flush())
        self._buf += self._markup.flush()
        return self._drain(final=True)

    def _add(self, pieces: list[tuple[bool, str]]) -> None:
        for in_fence, piece in pieces:
            if in_fence:
                # Code is not read aloud; the fence still ends the segment.
                self._buf += self._markup.flush() + "\n"
            else:
                self._buf += self._markup.feed(piece)

    def _drain(self, *, final: bool) -> list[str]:
        out: list[str] = []
        while True:
            cut = self._next_cut(final=final)
            if cut is None:
                break
            raw, self._buf = self._buf[:cut], self._buf[cut:]
            text = _clean(raw)
            if text and self._normaliser is not None:
                text = self._normaliser(text).strip()
            if text:
                out.append(text)
                self._released += 1
        return out

    def _first_due(self) -> bool:
        after = self._config.first_after_ms
        return (
            after is not None
            and self._t_first is not None
            and self._now is not None
            and self._now - self._t_first >= after
        )

    def _next_cut(self, *, final: bool) -> int | None:
        buf = self._buf
        if not buf:
            return None
        cfg = self._config
        first = self._released == 0
        second = self._released == 1
        i = 0
        n = len(buf)
        words = 0
        last_clause = 0  # end of the last clause mark (first segment)
        last_word = 0  # a word boundary that leaves no dangling word (first segment)
        due = first and self._first_due()
        while i < n:
            if i >= cfg.max_chars:
                return self._forced_cut(buf, cfg.max_chars)
            ch = buf[i]
            if ch == "\n":
                if _clean(buf[:i]):
                    return i + 1
                # Leading markup-only lines go with the next segment.
                i += 1
                continue
            if ch.isspace():
                if i > 0 and not buf[i - 1].isspace():
                    words += 1
                    if first:
                        start = max(buf.rfind(" ", 0, i), buf.rfind("\n", 0, i)) + 1
                        word = buf[start:i].strip(_OPENERS + _CLOSERS).lower()
                        # Not after a number either: "6:45 | a.m.", "3 | items".
                        if (
                            word
                            and word not in _BINDING
                            and not any(c.isdigit() for c in word)
                            and _clean(buf[:i])
                        ):
                            last_word = i + 1
                        if cfg.first_words and words >= cfg.first_words + 4 and _clean(buf[:i]):
                            return last_clause or last_word or i + 1
                        if cfg.first_words and words >= cfg.first_words:
                            cut = last_clause or last_word
                            if cut:
                                return cut
                i += 1
                continue
            kind = _mark(ch)
            if kind == "S":
                end = i + 1
                while end < n and (_mark(buf[end]) == "S" or buf[end] in _CLOSERS):
                    end += 1
                if end >= n:
                    break  # undecided until more text arrives
                spaced = _needs_space(ch)
                if spaced and not buf[end].isspace():
                    i = end
                    continue
                nxt = end
                while nxt < n and buf[nxt] in " \t":
                    nxt += 1
                if nxt >= n:
                    break
                if not spaced or self._is_sentence_end(buf, i, end, nxt):
                    length = _weight(buf[:end])
                    if (first or length >= cfg.min_chars) and _clean(buf[:end]):
                        return end
                i = end
                continue
            if kind == "C":
                if i + 1 >= n:
                    break
                spaced = _needs_space(ch)
                if not spaced or buf[i + 1].isspace():
                    length = _weight(buf[: i + 1])
                    if first and length >= cfg.eager_chars:
                        return i + 1
                    if second and length >= cfg.min_chars:
                        return i + 1
                    if first and _clean(buf[: i + 1]) and words >= 1:
                        last_clause = i + 1
            i += 1
        if final:
            return n
        if due:
            return last_clause or last_word or None
        return None

    @staticmethod
    def _forced_cut(buf: str, limit: int) -> int:
        window = buf[:limit]
        at = max((i for i, ch in enumerate(window) if _mark(ch) == "C"), default=-1)
        if at > 0:
            return at + 1
        at = max(window.rfind(" "), window.rfind("\n"))
        if at > 0:
            return at + 1
        return limit

    @staticmethod
    def _is_sentence_end(buf: str, at: int, end: int, nxt: int) -> bool:
        mark = buf[at]
        following = buf[nxt]
        if following.islower():
            return False
        if mark != "." or buf[at:end].startswith(("..", "…")):
            return True
        start = max(buf.rfind(" ", 0, at), buf.rfind("\n", 0, at)) + 1
        word = buf[start:at].lstrip(_OPENERS)
        lower = word.lower()
        if lower in _TITLES or lower in _INTRODUCERS:
            return False
        if following.isdigit() and lower in _BEFORE_NUMBERS:
            return False
        if len(word) == 1 and word.isupper():
            return False  # an initial: "J. K. Rowling"
        if lower in _ABBREVIATIONS or _INITIALS.match(word):
            # "etc. The", "U.S. Then": an end only before a capitalised word.
            return following.isupper()
        # A numbered-list marker such as "1." is no end.
        return not (word.isdigit() and (start == 0 or buf[start - 1] == "\n"))

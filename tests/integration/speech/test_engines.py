"""The embedded engines on real audio: accuracy, the pause trick, bad input, cancellation."""

from __future__ import annotations

import ctypes
import re
import threading
from pathlib import Path

import espeakng_loader
import jiwer
import numpy as np
import pytest
from whisper_normalizer.english import EnglishTextNormalizer

from audio.frame import AudioFrame
from audio.reframe import Reframer
from audio.resample import resample_all
from audio.vad import frame_level_db
from audio.wav import read_wav
from runtime.bench.ttft import VOICE_QUESTIONS
from runtime.speech.engines._common import ModelVerificationError, verify_sha256
from runtime.speech.engines.espeak import EspeakTTS, espeak_accepts, espeak_name
from runtime.speech.engines.piper import PiperTTS
from runtime.speech.engines.whisper import _SILENCE_DBFS as SILENCE_DBFS
from runtime.speech.engines.whisper import (
    MAX_PROMPT_TOKENS,
    WhisperConfig,
    WhisperSTT,
    _logsumexp,
)
from runtime.speech.text import SpeechSegmenter
from runtime.speech.tts import UnknownVoice

from ...helpers import REAL, SPEECH, manifest, noise

normalise = EnglishTextNormalizer()

HARVARD = (
    "The birch canoe slid on the smooth planks. Glue the sheet to the dark blue background. "
    "It's easy to tell the depth of a well. Four hours of steady work faced us."
)
PROMPTS = {
    "hello-world": "Hello world.",
    "tt-weasels": "Weasels have eaten our phone system.",
    "all-circuits-busy-now": "All circuits are busy now.",
}


def _normalise(text: str) -> str:
    # Whisper's normaliser folds "seven thirty" to "730" but leaves "7 30" alone;
    # both are the same clock time.
    return re.sub(r"\b(\d{1,2}) (\d{2})\b", r"\1\2", normalise(text))


def wer(refs: list[str], hyps: list[str]) -> float:
    return float(jiwer.wer([_normalise(r) for r in refs], [_normalise(h) for h in hyps]))


# More sentences for the TTS round trip: Piper samples noise, so a bigger set
# keeps the measured WER stable from run to run.
ROUND_TRIP_EXTRA = (
    *VOICE_QUESTIONS[1:],
    "Your order shipped this morning and should arrive on Thursday.",
    "I can book a table for four people at eight o'clock.",
    "The pharmacy on Main Street is open until nine tonight.",
    "Please hold while I transfer you to a specialist.",
    "Thanks for calling, and have a wonderful day.",
)


async def test_wer_on_the_test_utterances_is_at_most_5_percent(whisper: WhisperSTT):
    refs, hyps = [], []
    for item in manifest():
        audio = read_wav(SPEECH / str(item["file"]))
        result = await whisper.transcribe(audio.mono(), audio.sample_rate)
        refs.append(str(item["text"]))
        hyps.append(result.text)
        assert result.decode_ms > 0 and result.audio_ms > 1000
    assert wer(refs, hyps) <= 0.05


async def test_real_recordings(whisper: WhisperSTT):
    audio = read_wav(REAL / "speech_orig_16k.wav")
    harvard = await whisper.transcribe(audio.mono(), audio.sample_rate)
    assert wer([HARVARD], [harvard.text]) <= 0.10
    refs, hyps = [], []
    for name, text in PROMPTS.items():
        prompt = read_wav(REAL / f"{name}.wav")  # 8 kHz telephone audio
        hyps.append((await whisper.transcribe(prompt.mono(), prompt.sample_rate)).text)
        refs.append(text)
    assert wer(refs, hyps) <= 0.25  # "weasels" is a hard word for tiny.en


@pytest.mark.parametrize("engine", ["piper", "espeak"])
async def test_tts_round_trip_through_the_stt(
    engine: str, request: pytest.FixtureRequest, whisper: WhisperSTT
):
    tts = request.getfixturevalue(engine)
    refs, hyps = [], []
    for text in [*(str(item["text"]) for item in manifest()), *ROUND_TRIP_EXTRA]:
        pcm = b"".join([c.pcm async for c in tts.synthesize(text, sample_rate=16000)])
        hyps.append((await whisper.transcribe(pcm, 16000)).text)
        refs.append(text)
    # Piper is the default voice: 5 % at most. espeak is the robotic fallback,
    # which Whisper tiny.en transcribes far worse (about 25 % WER here).
    assert wer(refs, hyps) <= (0.05 if engine == "piper" else 0.35)


async def test_empty_silence_and_noise_give_no_text(whisper: WhisperSTT):
    assert (await whisper.transcribe(b"", 16000)).text == ""
    assert (await whisper.transcribe(bytes(3 * 32000), 16000)).text == ""
    assert (await whisper.transcribe(noise(3.0, 16000, dbfs=-60), 16000)).text == ""
    assert (await whisper.transcribe(bytes(800), 8000)).text == ""
    with pytest.raises(ValueError, match="even number"):
        await whisper.transcribe(b"\x00", 16000)
    with pytest.raises(ValueError, match="unsupported sample rate"):
        await whisper.transcribe(b"", 11025)


def turn_frames(pcm: bytes, rate: int = 16000) -> list[AudioFrame]:
    return Reframer(rate, 20).process(pcm)


async def test_pause_trick_returns_the_speculative_result(whisper: WhisperSTT):
    pcm = read_wav(SPEECH / "shared-02-piper.wav").mono()
    one_shot = await whisper.transcribe(pcm, 16000)
    turn = whisper.start_turn()
    for frame in turn_frames(pcm):
        turn.push(frame)
    turn.pause()
    for frame in turn_frames(bytes(16000)):  # the end-of-turn silence
        turn.push(frame)
    final = await turn.finalize()
    assert final.speculative and final.final
    assert final.text == one_shot.text
    assert (
        turn.partial is not None and turn.partial.text == one_shot.text and not turn.partial.final
    )


async def test_end_confidence_tells_a_sentence_cut_open_by_a_pause(whisper: WhisperSTT):
    lead, pause = bytes(int(0.24 * 16000) * 2), bytes(int(0.16 * 16000) * 2)
    # "I want to fly from Boston to | New York next week.", said whole and cut at the pause:
    # Whisper writes a full stop it is unsure of (the voice was still going on).
    cut = lead + read_wav(SPEECH / "cut-boston.wav").mono() + pause
    text, _, confidence, _ = whisper.decode_confident(cut)
    assert text.endswith("Boston.")
    assert confidence is not None and confidence < 0.45
    # Finished sentences: a sure full stop or question mark.
    for name in ("shared-00-piper", "shared-05-piper"):
        text, _, confidence, _ = whisper.decode_confident(read_wav(SPEECH / f"{name}.wav").mono())
        assert text.endswith((".", "?")), text
        assert confidence is not None and confidence > 0.85, (name, confidence)
    # How well the words were made out (mean token probability) comes with a transcription.
    clear = await whisper.transcribe(read_wav(SPEECH / "shared-05-piper.wav").mono(), 16000)
    assert clear.confidence is not None and clear.confidence > 0.7, clear.confidence
    assert (await whisper.transcribe(bytes(32000), 16000)).confidence is None  # no words
    # No mark at the end, nothing to be sure of; and the turn's partial carries the figure.
    assert whisper.decode_confident(read_wav(SPEECH / "cut-boston.wav").mono())[2] is None
    turn = whisper.start_turn()
    for frame in turn_frames(cut):
        turn.push(frame)
    turn.pause()
    final = await turn.finalize()
    assert final.end_confidence is not None and final.end_confidence < 0.45
    assert turn.partial is not None and turn.partial.end_confidence == final.end_confidence


def test_a_finished_greeting_that_trails_off_is_read_as_ending(whisper: WhisperSTT):
    # The real 8 kHz "Hello world!" decoded as at the user's pause: Whisper writes an
    # ellipsis, hesitating between "World" and "world" (the same word) and between the
    # ellipsis and a full stop or "!". The end confidence counts the word whatever its
    # case and every sentence mark: 0.41, where the chosen pieces alone give 0.28.
    audio = read_wav(REAL / "hello-world.wav")
    pcm = resample_all(audio.mono(), audio.sample_rate, 16000)
    turn = bytes(int(0.6 * 16000) * 2) + pcm + bytes(32000)
    text, _, end_confidence, _ = whisper.decode_confident(
        turn[int(0.42 * 16000) * 2 : int(2.18 * 16000) * 2]
    )
    assert text == "Hello World..."
    assert end_confidence is not None and 0.38 < end_confidence < 0.45


def test_a_decoder_running_on_into_the_padding_keeps_the_first_saying(whisper: WhisperSTT):
    # "What time is it?" up to the pause: the short-window decoder says it again and again
    # into the padding. The first saying is kept, with its confidences (the slow 30 s
    # fallback gives none, and the turn would then wait for max_silence_ms).
    pcm = read_wav(SPEECH / "question-span.wav").mono()
    text, _, end_confidence, confidence = whisper.decode_confident(pcm)
    assert text == "What time is it?"
    assert end_confidence is not None and end_confidence >= 0.6
    assert confidence is not None and confidence > 0.8


async def test_resume_after_a_pause_decodes_the_whole_turn(whisper: WhisperSTT):
    first = read_wav(SPEECH / "shared-09-piper.wav").mono()  # "Yes, that's correct."
    second = read_wav(SPEECH / "shared-04-piper.wav").mono()  # "Please cancel my subscription."
    turn = whisper.start_turn()
    for frame in turn_frames(first):
        turn.push(frame)
    turn.pause()
    turn.resume()
    for frame in turn_frames(second):
        turn.push(frame)
    final = await turn.finalize()  # no pause at the end: decoded now
    assert not final.speculative
    assert wer(["Yes, that's correct. Please cancel my subscription."], [final.text]) <= 0.15


async def test_long_turns_commit_earlier_text_and_decode_only_the_rest():
    engine = WhisperSTT(config=WhisperConfig(commit_after_s=2.0))
    try:
        parts = [read_wav(SPEECH / f"shared-0{i}-piper.wav").mono() for i in (4, 5)]
        turn = engine.start_turn(sample_rate=8000)
        for part in parts:
            for frame in turn_frames(resample_all(part, 16000, 8000), 8000):
                turn.push(frame)
            turn.pause()
            assert turn._spec is not None
            await turn._spec.future  # let the speculation finish before the user goes on
            turn.resume()
        turn.pause()
        final = await turn.finalize()
        assert turn._committed  # the first part was committed, not decoded again
        assert (
            wer(
                ["Please cancel my subscription. I'd like to change my delivery address."],
                [final.text],
            )
            <= 0.2
        )
    finally:
        await engine.aclose()


# Short clips of real speech (Piper, the joe voice, noise scales 0, centred in exactly
# 0.2, 0.5 and 1 s): what the last stretch of a long turn holds after its earlier text
# was committed.
SHORT_CLIPS = {
    0.2: ("short-no", "No."),
    0.5: ("short-thank-you", "Thank you."),
    1.0: ("short-yes-please", "Yes, please."),
}


def previous_text(whisper: WhisperSTT, tokens: int) -> str:
    """Committed text of ``tokens`` tokens (or the fewest words past it): the end of the test
    utterances said three times over (a prompt that ends on a sentence, as a commit at a
    pause does); one token is a word."""
    if tokens <= 1:
        return "Okay" if tokens else ""
    tk = whisper._tokenizer
    words = " ".join([str(r["text"]) for r in manifest()] * 3).split()
    for k in range(1, len(words) + 1):  # the front cut at a word
        text = " ".join(words[-k:])
        if len(tk.encode(" " + text)) >= tokens:
            return text
    raise AssertionError(f"no text of {tokens} tokens")


@pytest.mark.parametrize("seconds", sorted(SHORT_CLIPS))
@pytest.mark.parametrize(
    "tokens", [0, 1, 80, MAX_PROMPT_TOKENS, 300], ids=["0", "1", "80", "limit", "over"]
)
def test_a_short_clip_after_a_long_committed_text_keeps_its_words(
    whisper: WhisperSTT, tokens: int, seconds: float
):
    # CTranslate2 counts the prompt in the decoder's max_length: a prompt longer than a
    # short clip's token budget left nothing to generate (no text, no logits).
    name, words = SHORT_CLIPS[seconds]
    pcm = read_wav(SPEECH / f"{name}.wav").mono()
    assert len(pcm) == int(seconds * 16000) * 2
    previous = previous_text(whisper, tokens)
    said = len(whisper._tokenizer.encode(" " + previous)) if previous else 0
    assert tokens <= said < tokens + 4
    # Whisper's own rule: the most recent MAX_PROMPT_TOKENS tokens, the front cut.
    prompt = whisper._prompt(previous)
    kept = min(said, MAX_PROMPT_TOKENS)
    start = [*whisper._tokenizer.sot_sequence, whisper._tokenizer.no_timestamps]
    assert prompt[-len(start) :] == start
    assert len(prompt) == len(start) + (kept + 1 if kept else 0)
    if kept:
        assert prompt[1 : 1 + kept] == whisper._tokenizer.encode(" " + previous)[-kept:]
    text, _, end_confidence, confidence = whisper.decode_confident(pcm, previous)
    assert _normalise(text) == _normalise(words)
    assert confidence is not None and 0.0 <= confidence <= 1.0
    assert end_confidence is None or 0.0 <= end_confidence <= 1.0


async def test_turn_misuse_is_refused(whisper: WhisperSTT):
    turn = whisper.start_turn()
    with pytest.raises(ValueError, match="expects 16000 Hz"):
        turn.push(AudioFrame(pcm=bytes(320), sample_rate=8000))
    await turn.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        turn.push(AudioFrame(pcm=bytes(640), sample_rate=16000))


async def test_inference_runs_in_worker_threads(whisper: WhisperSTT, piper: PiperTTS):
    seen: set[str] = set()
    original = whisper.decode_confident

    def recording(
        pcm: bytes, previous_text: str = ""
    ) -> tuple[str, float, float | None, float | None]:
        seen.add(threading.current_thread().name)
        return original(pcm, previous_text)

    whisper.decode_confident = recording  # type: ignore[method-assign]
    try:
        await whisper.transcribe(read_wav(SPEECH / "shared-00-piper.wav").mono(), 16000)
        turn = whisper.start_turn()
        for frame in turn_frames(read_wav(SPEECH / "shared-01-piper.wav").mono()):
            turn.push(frame)
        await turn.finalize()
    finally:
        del whisper.decode_confident
    assert seen and all(name.startswith("voxloop-stt") for name in seen)
    assert threading.current_thread().name not in seen


async def test_piper_streams_sentence_by_sentence_at_the_requested_rate(piper: PiperTTS):
    chunks = [
        c
        async for c in piper.synthesize("First sentence here. And a second one.", sample_rate=8000)
    ]
    assert len(chunks) >= 2
    assert all(c.sample_rate == 8000 for c in chunks)
    assert sum(c.duration_ms for c in chunks) > 1000


async def test_cancel_stops_synthesis_at_once(piper: PiperTTS):
    run = piper.synthesize("One. Two. Three. Four. Five. Six. Seven.", sample_rate=24000)
    got = []
    async for chunk in run:
        got.append(chunk)
        run.cancel()
    assert len(got) == 1
    assert [c async for c in run] == []


@pytest.mark.parametrize("engine", ["piper", "espeak"])
async def test_markup_only_text_gives_no_audio_and_no_error(
    engine: str, request: pytest.FixtureRequest
):
    tts = request.getfixturevalue(engine)
    segmenter = SpeechSegmenter()
    segments = segmenter.push("**  ** 😀 ```\ncode\n```") + segmenter.flush()
    assert segments == []
    assert [c async for c in tts.synthesize("   ", sample_rate=16000)] == []


@pytest.mark.parametrize("engine", ["piper", "espeak"])
def test_unknown_voice_lists_the_installed_voices(engine: str, request: pytest.FixtureRequest):
    tts = request.getfixturevalue(engine)
    with pytest.raises(UnknownVoice) as info:
        tts.synthesize("hi", voice="no-such-voice")
    for voice in tts.voices():
        assert voice.id in str(info.value)


def test_voices_and_aliases(piper: PiperTTS, espeak: EspeakTTS):
    [joe] = piper.voices()
    assert joe.id == "en_US-joe-medium" and "ivy" in joe.aliases and joe.sample_rate == 22050
    piper.synthesize("hi", voice="ivy")  # the hosted API's voice id maps to the installed voice
    assert {v.id for v in espeak.voices()} >= {"espeak-en-us"}


class EspeakVoiceStruct(ctypes.Structure):
    """espeak-ng's ``espeak_VOICE`` (speak_lib.h)."""

    _fields_ = [
        ("name", ctypes.c_char_p), ("languages", ctypes.c_char_p),
        ("identifier", ctypes.c_char_p), ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte), ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]  # fmt: skip


async def test_every_espeak_voice_is_a_name_espeak_ng_takes_and_speaks_its_own_accent(
    espeak: EspeakTTS,
):
    # espeak-ng has no voice called "en-gb" (its British English is "en"): a name it does
    # not take leaves the previous voice speaking.
    assert not espeak_accepts("en-gb")
    for voice in espeak.voices():
        assert espeak_accepts(espeak_name(voice.id)), voice.id
        assert {espeak_name(alias) for alias in voice.aliases} == {espeak_name(voice.id)}

    # What espeak-ng speaks with after each synthesis: its voice file (+ variant).
    lib = ctypes.CDLL(espeakng_loader.get_library_path())  # the engine's own (one per process)
    lib.espeak_GetCurrentVoice.restype = ctypes.POINTER(EspeakVoiceStruct)
    spoken_with: dict[str, str] = {}
    for name in ("espeak-en-us", "espeak-en-gb", "espeak-en-us-f", "en-gb", "espeak-en",
                  "espeak-en-f", "en-us"):  # fmt: skip
        chunks = [c async for c in espeak.synthesize("Hello.", voice=name)]
        assert sum(len(c.pcm) for c in chunks) > 0
        spoken_with[name] = lib.espeak_GetCurrentVoice().contents.identifier.decode()
    assert spoken_with == {
        "espeak-en-us": "gmw/en-US", "espeak-en-gb": "gmw/en", "espeak-en-us-f": "gmw/en-US+f3",
        "en-gb": "gmw/en", "espeak-en": "gmw/en", "espeak-en-f": "gmw/en+f3", "en-us": "gmw/en-US",
    }  # fmt: skip
    with pytest.raises(UnknownVoice) as info:
        espeak.synthesize("hi", voice="en-GB")
    assert str(info.value) == (
        "unknown voice 'en-GB'; installed voices: espeak-en-us, espeak-en-gb, espeak-en, "
        "espeak-en-us-f, espeak-en-f"
    )


def test_model_files_are_verified(tmp_path: Path):
    model = tmp_path / "model.bin"
    model.write_bytes(b"not the pinned model")
    with pytest.raises(ModelVerificationError, match="expected 1a5a"):
        verify_sha256(model, "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a")
    with pytest.raises(ModelVerificationError, match="missing"):
        verify_sha256(tmp_path / "absent.bin", "00")
    with pytest.raises(ModelVerificationError, match="no Whisper model"):
        WhisperSTT(model_dir=tmp_path / "empty")


async def test_load_warms_the_decoder_on_audio_it_decodes_and_times_a_warm_decode():
    heard: list[tuple[int, float, str]] = []

    class Recording(WhisperSTT):
        def decode_confident(
            self, pcm: bytes, previous_text: str = ""
        ) -> tuple[str, float, float | None, float | None]:
            result = super().decode_confident(pcm, previous_text)
            heard.append((len(pcm), frame_level_db(pcm), result[0]))
            return result

    engine = await Recording.load()
    try:
        # One second of 16 kHz audio, loud enough to be decoded (near-silence is skipped
        # without running the model), giving no text; twice: the second decode, set up, is
        # the first recent decode time (the early speculative decode is timed by it).
        assert len(heard) == 2 and heard[0] == heard[1]
        [(size, level, text)] = heard[:1]
        assert size == 32000 and text == ""
        assert level > SILENCE_DBFS
        assert engine.warmup_ms is not None and engine.warmup_ms > 0
        assert engine.recent_decode_ms is not None and engine.recent_decode_ms > 0
    finally:
        await engine.aclose()


def test_logsumexp_matches_the_pairwise_reduction_on_vocabulary_rows():
    rng = np.random.default_rng(7)
    for scale, shift in ((1.0, 0.0), (30.0, -500.0), (300.0, 800.0)):
        row = rng.normal(shift, scale, 51864)
        assert _logsumexp(row) == pytest.approx(float(np.logaddexp.reduce(row)), abs=1e-9)
    # One dominant logit: the result is that logit (no overflow, no underflow to -inf).
    row = np.full(51864, -1e4)
    row[3] = 1e4
    assert _logsumexp(row) == 1e4

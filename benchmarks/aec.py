"""Echo cancellation on a simulated laptop: ERLE, double talk, CPU, and whole conversations.

Part 1, signals (seconds): the agent's voice (the Piper utterances in
``tests/data/speech``, played at 24 kHz) goes through :class:`audio.room.EchoRoom`
in each condition, and :class:`audio.echo.EchoPath` (WebRTC AEC3 plus the
residual-echo gate) cleans the microphone, 20 ms at a time, as in live mode.

* ERLE: echo return loss enhancement, 10·log10(mic energy / output energy)
  over the echo-only run after the first second (noise included, so a quiet
  room caps it).
* residual speech: echo-only frames the session's VAD (webrtcvad behind the
  noise gate, and audible) calls speech, and the longest such run (barge-in
  needs 200 ms in a row); before the gate, and after it.
* double talk: real recorded speech (Harvard sentences, codec2) spoken over
  the agent; the share of the user's speech frames (by the VAD on the clean
  recording) the VAD still calls speech after cancellation, and the level
  change of those frames.
* CPU: CPU time of ``EchoPath.played`` + ``EchoPath.captured`` per 20 ms frame
  (mean, and 99th percentile), as the device threads spend it in live mode.

Part 2, conversations (``--conversations N``, minutes): the real session
(Whisper, Piper, the reference endpoint) on the simulated laptop
(:func:`runtime.echo_sim.talk_through_room`), N conversations per condition
and scenario, each also run on a clean microphone for comparison:

* ``listen``: the user asks, then listens to the whole reply;
* ``backchannel``: the user says "Okay." during the reply;
* ``interrupt``: the user interrupts 1.5-4 s into the reply.

Reported: self-interruptions (a reply cut though the user said nothing, or
said only a back-channel, or before the user began), phantom user turns (a
transcript that does not end within 3 s of the user's speech: the agent's own
voice taken for the user's), interruptions detected and how long after the
user's speech began (by the VAD on the clean recording), and the WER of the
user's transcripts, with AEC and on the clean microphone.

Run:
    nice -n 10 python -m benchmarks.aec                     # part 1
    nice -n 10 python -m benchmarks.aec --conversations 1   # and part 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from audio.aec import WebRtcEchoCanceller, echo_path
from audio.echo import EchoPath
from audio.resample import resample_all
from audio.room import EchoRoom, RoomConfig
from audio.vad import default_vad, frame_level_db, segment_pcm
from audio.wav import read_wav

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
RATE = 16000
SPEAKER_RATE = 24000
LATENCY_S = 0.04  # the speaker's reported output latency in the simulation

CONDITIONS: dict[str, RoomConfig] = {
    "near 20 ms": RoomConfig(delay_ms=20, rt60_s=0.2, echo_db=-6, drive=0.5, seed=1),
    "200 ms, reverberant": RoomConfig(delay_ms=200, rt60_s=0.5, echo_db=-6, drive=1.0, seed=2),
    "loud, distorting": RoomConfig(delay_ms=80, rt60_s=0.3, echo_db=0, drive=1.5, seed=3),
    "noisy -45 dBFS": RoomConfig(delay_ms=120, rt60_s=0.3, echo_db=-6, noise_dbfs=-45, seed=4),
    "drift +0.1 %": RoomConfig(delay_ms=100, rt60_s=0.3, echo_db=-3, drift=0.001, seed=5),
    "drift -0.1 %": RoomConfig(delay_ms=150, rt60_s=0.3, echo_db=-3, drift=-0.001, seed=6),
}


def agent_voice(seconds: float) -> bytes:
    """The agent's voice at the speaker's rate: the Piper utterances, back to back."""
    pcm = b""
    for path in sorted((DATA / "speech").glob("shared-*-piper.wav")):
        pcm += read_wav(path).mono()
        if len(pcm) >= seconds * RATE * 2:
            break
    return resample_all(pcm[: int(seconds * RATE) * 2], RATE, SPEAKER_RATE)


def user_voice() -> bytes:
    """Real recorded speech (Harvard sentences), 16 kHz."""
    return read_wav(DATA / "real" / "speech_orig_16k.wav").mono()


@dataclass
class SignalRow:
    condition: str
    erle_db: float
    residual_speech_pct_raw: float
    longest_residual_ms_raw: int
    residual_speech_pct: float
    longest_residual_ms: int
    double_talk_kept_pct: float
    double_talk_kept_pct_raw: float
    double_talk_level_db: float
    cpu_us_per_frame: float
    cpu_us_p99: float


def _simulate(
    room: RoomConfig, far24: bytes, user16: bytes, *, gate: bool
) -> tuple[bytes, bytes, list[float]]:
    """Run the echo path; returns (mic, cleaned, per-frame cost in µs)."""
    acoustic = EchoRoom(
        RoomConfig(**{**asdict(room), "delay_ms": room.delay_ms + LATENCY_S * 1000}),
        speaker_rate=SPEAKER_RATE,
    )
    path = (
        echo_path(RATE)
        if gate
        else EchoPath(WebRtcEchoCanceller(RATE, noise_suppression=True), RATE, gate_residual=False)
    )
    mic, out, cost = bytearray(), bytearray(), []
    far_step, near_step = SPEAKER_RATE // 50, RATE // 50 * 2
    frames = min(int(len(far24) / 2 / far_step / (1 + room.drift)), len(user16) // near_step)
    for k in range(frames):
        t = k * 0.02
        # The speaker's clock runs ``drift`` fast: a little more audio per tick.
        start = round(k * far_step * (1 + room.drift))
        end = round((k + 1) * far_step * (1 + room.drift))
        far = far24[start * 2 : end * 2]
        acoustic.play(far)
        near = acoustic.capture(user16[k * near_step : (k + 1) * near_step])
        started = time.thread_time_ns()  # CPU time: robust to a busy machine
        path.played(far, SPEAKER_RATE, t + LATENCY_S)
        cleaned = path.captured(near, t)
        cost.append((time.thread_time_ns() - started) / 1000)
        mic += near
        out += cleaned
    return bytes(mic), bytes(out), cost


def _speech_frames(pcm: bytes) -> list[bool]:
    vad = default_vad(RATE, 20)
    return [
        vad.speech_probability(pcm[i : i + 640]) >= 0.5
        and frame_level_db(pcm[i : i + 640]) >= -55.0
        for i in range(0, len(pcm) - 639, 640)
    ]


def _longest_run_ms(flags: list[bool]) -> int:
    best = run = 0
    for f in flags:
        run = run + 1 if f else 0
        best = max(best, run)
    return best * 20


def signal_row(name: str, room: RoomConfig, seconds: float) -> SignalRow:
    far = agent_voice(seconds)
    silence = bytes(int(seconds * RATE) * 2)
    mic, raw, _ = _simulate(room, far, silence, gate=False)
    _, gated, cost = _simulate(room, far, silence, gate=True)  # the whole live path
    skip = RATE * 2  # the first second
    m = np.frombuffer(mic, "<i2").astype(np.float64)[skip // 2 :]
    o = np.frombuffer(raw, "<i2").astype(np.float64)[skip // 2 :]
    erle = 10 * np.log10(float(np.sum(m**2)) / max(float(np.sum(o**2)), 1.0))
    raw_speech, gated_speech = _speech_frames(raw), _speech_frames(gated)
    # Double talk: the user talks over the agent from 2 s on.
    user = user_voice()
    near = bytes(2 * RATE * 2) + user
    near = near[: len(silence)] + bytes(max(0, len(silence) - len(near)))
    _, dt_gated, _ = _simulate(room, far, near, gate=True)
    _, dt_raw, _ = _simulate(room, far, near, gate=False)
    truth = _speech_frames(near)
    kept = _speech_frames(dt_gated)
    kept_raw = _speech_frames(dt_raw)
    talk = [i for i, t in enumerate(truth) if t]
    levels = [
        frame_level_db(dt_gated[i * 640 : i * 640 + 640])
        - frame_level_db(near[i * 640 : i * 640 + 640])
        for i in talk
    ]
    return SignalRow(
        condition=name,
        erle_db=round(erle, 1),
        residual_speech_pct_raw=round(100 * sum(raw_speech) / len(raw_speech), 2),
        longest_residual_ms_raw=_longest_run_ms(raw_speech),
        residual_speech_pct=round(100 * sum(gated_speech) / len(gated_speech), 2),
        longest_residual_ms=_longest_run_ms(gated_speech),
        double_talk_kept_pct=round(100 * sum(kept[i] for i in talk) / len(talk), 1),
        double_talk_kept_pct_raw=round(100 * sum(kept_raw[i] for i in talk) / len(talk), 1),
        double_talk_level_db=round(statistics.median(levels), 1),
        cpu_us_per_frame=round(statistics.fmean(cost), 1),
        cpu_us_p99=round(float(np.percentile(cost, 99)), 1),
    )


# -- part 2: many replies, offline ---------------------------------------------------

REPLY = (
    "Paris will be mild this week. Monday starts cloudy with a light breeze. "
    "Tuesday brings scattered showers in the afternoon, and Wednesday is sunny and warm. "
    "Thursday cools down again with some wind from the north."
)
QUESTIONS = ("shared-00-piper", "shared-03-piper", "shared-06-piper")
INTERRUPTIONS = ("shared-11-piper", "shared-10-piper", "shared-04-piper")
SCENARIOS = ("listen", "interrupt", "early interrupt", "double talk")


@dataclass
class RepliesRow:
    condition: str
    replies: int
    self_interruptions: int  # bursts the session would transcribe, none of them the user's
    interruptions_heard: str  # interruptions that became a burst, of all
    heard_after_s: float | None  # median: from the user's first speech to the burst's 200 ms
    double_talk_kept_pct: float  # user speech frames over the agent the VAD still finds
    onset_kept_pct: float  # of an interruption's first 400 ms (early: in the first 1.2 s)
    early_onset_kept_pct: float
    double_talk_wer_pct: float | None  # Whisper on what the session heard, interruptions
    clean_wer_pct: float | None  # the same utterances, clean
    self_interruptions_at: list[str]  # reply, scenario, seconds into the reply


def _agent_reply() -> bytes:
    """The reply in the agent's voice (Piper), at the speaker's rate."""
    from runtime.speech.engines.piper import PiperTTS

    async def speak() -> bytes:
        tts = PiperTTS(noise_scale=0.0, noise_w=0.0)
        try:
            return b"".join([c.pcm async for c in tts.synthesize(REPLY, sample_rate=SPEAKER_RATE)])
        finally:
            await tts.aclose()

    return asyncio.run(speak())


def _session_speech(pcm: bytes) -> list[bool]:
    """Per 20 ms, whether the session's speech gate calls it speech."""
    from runtime.conversation.session import SpeechGate

    gate = SpeechGate(default_vad(RATE, 20), 0.5)
    return [gate.is_speech(pcm[i : i + 640]) for i in range(0, len(pcm) - 639, 640)]


def _bursts(flags: list[bool]) -> list[tuple[int, int]]:
    """The session's barge-in bursts that reach ``barge_in_ms`` of speech: (first frame,
    frame at which they reach it). A burst ends after ``BURST_END_MS`` of quiet."""
    from runtime.conversation.config import TurnDetection
    from runtime.conversation.policy import BURST_END_MS

    need = TurnDetection().barge_in_ms
    found: list[tuple[int, int]] = []
    first, speech_ms, quiet_ms, reached = -1, 0, 0, -1
    for i, speech in enumerate(flags):
        if first < 0:
            if not speech:
                continue
            first, speech_ms, quiet_ms, reached = i, 0, 0, -1
        if speech:
            speech_ms, quiet_ms = speech_ms + 20, 0
        else:
            quiet_ms += 20
            if quiet_ms >= BURST_END_MS:
                if reached >= 0:
                    found.append((first, reached))
                first = -1
                continue
        if speech_ms >= need and reached < 0:
            reached = i
    if first >= 0 and reached >= 0:
        found.append((first, reached))
    return found


def _through_room(room: RoomConfig, user: bytes, timeline: bytes) -> bytes:
    """What the session hears: ``user`` (16 kHz) and the speaker's ``timeline`` (24 kHz)
    through the room and live mode's echo path, 20 ms at a time."""
    acoustic = EchoRoom(
        RoomConfig(**{**asdict(room), "delay_ms": room.delay_ms + LATENCY_S * 1000}),
        speaker_rate=SPEAKER_RATE,
    )
    path = echo_path(RATE)
    heard = bytearray()
    far_step = SPEAKER_RATE // 50
    for k in range(len(user) // 640):
        start = round(k * far_step * (1 + room.drift))
        end = round((k + 1) * far_step * (1 + room.drift))
        far = timeline[start * 2 : end * 2]
        far += bytes((end - start) * 2 - len(far))
        acoustic.play(far)
        near = acoustic.capture(user[k * 640 : (k + 1) * 640])
        path.played(far, SPEAKER_RATE, k * 0.02 + LATENCY_S)
        heard += path.captured(near, k * 0.02)
    return bytes(heard)


def replies_row(name: str, room: RoomConfig, n: int, reply: bytes, stt: Any) -> RepliesRow:
    """``n`` replies in ``room``: the user asks, the agent replies, and the user listens,
    interrupts 2-5 s in, interrupts in the canceller's first 1.2 s, or talks over it
    (8 s of recorded speech) in turn. Seeded: the same numbers every run."""
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    normalise = EnglishTextNormalizer()
    texts = _manifest()
    harvard = user_voice()
    rng = np.random.default_rng(0)
    reply_s = len(reply) / 2 / SPEAKER_RATE
    selfs = heard = interruptions = 0
    after: list[float] = []
    counts = {"kept": [0, 0], "onset": [0, 0], "early": [0, 0]}
    refs: list[str] = []
    hyps: list[str] = []
    clean: list[str] = []
    where: list[str] = []
    for i in range(n):
        scenario = SCENARIOS[i % len(SCENARIOS)]
        user = (
            bytes(int(0.4 * RATE) * 2)
            + read_wav(DATA / "speech" / f"{QUESTIONS[i % len(QUESTIONS)]}.wav").mono()
        )
        reply_at = len(user) / 2 / RATE + float(rng.uniform(0.8, 1.8))
        into = {"interrupt": rng.uniform(2.0, 5.0), "early interrupt": rng.uniform(0.2, 1.2)}
        piece, words = b"", ""
        start = reply_at + float(into.get(scenario, 3.0))
        if scenario in ("interrupt", "early interrupt"):
            stop = INTERRUPTIONS[i % len(INTERRUPTIONS)]
            piece, words = read_wav(DATA / "speech" / f"{stop}.wav").mono(), texts[stop]
        elif scenario == "double talk":
            at = int(rng.integers(0, len(harvard) // 2 - 8 * RATE)) * 2
            piece = harvard[at : at + 8 * RATE * 2]
        if not piece:
            start = reply_at + reply_s
        user += bytes(int((start - len(user) / 2 / RATE) * RATE) * 2) + piece + bytes(RATE * 2)
        timeline = bytes(int(reply_at * SPEAKER_RATE) * 2) + reply
        seed = room.seed * 1000 + int(rng.integers(0, 1000))
        out = _through_room(RoomConfig(**{**asdict(room), "seed": seed}), user, timeline)
        flags, truth = _session_speech(out), _session_speech(user)
        first = int(start / 0.02)
        onset = next((j for j in range(first, len(truth)) if truth[j]), len(truth))
        end = int((start + len(piece) / 2 / RATE) / 0.02)
        found = False
        for b0, reached in _bursts(flags):
            if b0 * 0.02 < reply_at - 0.1:
                continue  # the question
            if piece and reached >= onset - 5 and b0 <= end + 15:
                # The user's (it reaches barge-in after the user began).
                if scenario != "double talk" and not found:
                    found = True
                    heard += 1
                    after.append((reached - onset) * 0.02)
            elif b0 * 0.02 < reply_at + reply_s + 1.0:
                selfs += 1
                where.append(f"{i} {scenario} {b0 * 0.02 - reply_at:.2f}")
        if not piece:
            continue
        over = [
            j
            for j in range(onset, min(end, len(truth)))
            if truth[j] and j * 0.02 < reply_at + reply_s
        ]
        counts["kept"][0] += sum(flags[j] for j in over)
        counts["kept"][1] += len(over)
        if scenario != "double talk":
            interruptions += 1
            key = "early" if scenario == "early interrupt" else "onset"
            first20 = [j for j in over if j < onset + 20]
            counts[key][0] += sum(flags[j] for j in first20)
            counts[key][1] += len(first20)
            lo, hi = (
                max(0, int((start - 0.3) * RATE)) * 2,
                int((start + len(piece) / 2 / RATE + 0.3) * RATE) * 2,
            )
            refs.append(normalise(words))
            hyps.append(normalise(asyncio.run(stt.transcribe(out[lo:hi], RATE)).text))
            clean.append(normalise(asyncio.run(stt.transcribe(user[lo:hi], RATE)).text))
    pct = {k: round(100 * a / b, 1) if b else 0.0 for k, (a, b) in counts.items()}
    return RepliesRow(
        condition=name,
        replies=n,
        self_interruptions=selfs,
        interruptions_heard=f"{min(heard, interruptions)}/{interruptions}",
        heard_after_s=round(statistics.median(after), 2) if after else None,
        double_talk_kept_pct=pct["kept"],
        onset_kept_pct=pct["onset"],
        early_onset_kept_pct=pct["early"],
        double_talk_wer_pct=round(100 * jiwer.wer(refs, hyps), 1) if refs else None,
        clean_wer_pct=round(100 * jiwer.wer(refs, clean), 1) if refs else None,
        self_interruptions_at=where,
    )


# -- part 3: conversations ---------------------------------------------------------


def _manifest() -> dict[str, str]:
    rows = [json.loads(x) for x in (DATA / "speech" / "manifest.jsonl").read_text().splitlines()]
    return {r["file"].removesuffix(".wav"): r["text"] for r in rows if x_ok(r)}


def x_ok(row: dict[str, Any]) -> bool:
    return isinstance(row.get("file"), str) and isinstance(row.get("text"), str)


async def conversations(n: int, names: list[str]) -> dict[str, Any]:
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    from runtime.conversation import events as ev
    from runtime.conversation.config import SessionConfig
    from runtime.echo_sim import talk_through_room
    from runtime.endpoints import URLPolicy
    from runtime.llm.client import ChatClient, Endpoint
    from runtime.llm.reference import ReferenceEndpoint, ReplyPlan
    from runtime.speech.engines.piper import PiperTTS
    from runtime.speech.engines.whisper import WhisperSTT

    normalise = EnglishTextNormalizer()
    texts = _manifest()
    stt, tts = WhisperSTT(), PiperTTS(noise_scale=0.0, noise_w=0.0)
    okay = b"".join([c.pcm async for c in tts.synthesize("Okay.", sample_rate=RATE)])
    rng = np.random.default_rng(0)

    def utt(name: str) -> bytes:
        return read_wav(DATA / "speech" / f"{name}.wav").mono()

    def sil(s: float) -> bytes:
        return bytes(int(s * RATE) * 2)

    results: dict[str, Any] = {}
    log: list[dict[str, Any]] = []
    async with ReferenceEndpoint(ReplyPlan(ttft_ms=50, itl_ms=5, replies=(REPLY,))) as server:
        for cond in ["clean", *names]:
            room = None if cond == "clean" else CONDITIONS[cond]
            stats: dict[str, Any] = {
                "replies": 0, "self_interruptions": 0, "phantom_turns": 0,
                "interruptions": 0, "interruptions_detected": 0, "detect_s": [],
                "refs": [], "hyps": [],
            }  # fmt: skip
            for i in range(n):
                for scenario in ("listen", "backchannel", "interrupt"):
                    q = QUESTIONS[i % len(QUESTIONS)]
                    said = [texts[q]]
                    user = sil(0.4) + utt(q)
                    asked = len(user) / (2 * RATE)
                    gap = float(rng.uniform(3.0, 5.5))  # the reply starts ~1.5 s after
                    if scenario == "backchannel":
                        user += sil(gap) + okay
                    elif scenario == "interrupt":
                        stop = INTERRUPTIONS[i % len(INTERRUPTIONS)]
                        user += sil(gap) + utt(stop)
                        said.append(texts[stop])
                    user += sil(0.5)
                    llm = ChatClient(Endpoint(server.base_url, "m"), policy=URLPolicy.operator())
                    async with llm:
                        r = await talk_through_room(
                            user, room=room, echo="off" if room is None else "aec", llm=llm,
                            stt=stt, tts=tts, config=SessionConfig(), max_wait_s=25.0,
                        )  # fmt: skip
                    done = [(t, e) for t, e in r.events if isinstance(e, ev.ReplyDone)]
                    # When the user's second utterance begins (by the VAD on the clean audio).
                    onset = next(
                        (a for a, _ in segment_pcm(user, RATE, default_vad()) if a > asked), None
                    )
                    # A user turn is the user's if most of its words are words the user said.
                    words = set(normalise(" ".join(said)).split())
                    turns = [e.text for _, e in r.events if isinstance(e, ev.UserTranscript)]
                    heard: list[str] = []
                    phantom: list[str] = []
                    for text in turns:
                        w = normalise(text).split()
                        (heard if sum(x in words for x in w) * 2 >= len(w) else phantom).append(
                            text
                        )
                    stats["phantom_turns"] += len(phantom)
                    stats["replies"] += len(done)
                    first_cut = next((t for t, e in done if e.status == "interrupted"), None)
                    if first_cut is not None and (
                        scenario != "interrupt" or onset is None or first_cut < onset
                    ):
                        stats["self_interruptions"] += 1
                    elif scenario == "interrupt":
                        stats["interruptions"] += 1
                        if first_cut is not None and onset is not None:
                            stats["interruptions_detected"] += 1
                            stats["detect_s"].append(first_cut - onset)
                    stats["refs"].append(normalise(" ".join(said)))
                    stats["hyps"].append(normalise(" ".join(heard)))
                    log.append({
                        "microphone": cond, "scenario": scenario, "said": said, "heard": heard,
                        "phantom": phantom, "onset_s": onset, "first_cut_s": first_cut,
                    })  # fmt: skip
                    print(f"  {cond:>20} {scenario:>11}: {heard} {phantom}", file=sys.stderr)
            wer = jiwer.wer(stats.pop("refs"), stats.pop("hyps"))
            detect = stats.pop("detect_s")
            stats["wer_pct"] = round(100 * wer, 1)
            stats["detect_median_s"] = round(statistics.median(detect), 2) if detect else None
            results[cond] = stats
            print(cond, stats, file=sys.stderr)
    await stt.aclose()
    await tts.aclose()
    results["log"] = log
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="echo cancellation on a simulated laptop")
    parser.add_argument("--seconds", type=float, default=20.0, help="agent speech per condition")
    parser.add_argument("--replies", type=int, default=24, help="offline replies per condition")
    parser.add_argument("--conversations", type=int, default=0, help="per condition and scenario")
    parser.add_argument("--conditions", nargs="*", default=list(CONDITIONS))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/aec.json"))
    args = parser.parse_args(argv)
    unknown = [c for c in args.conditions if c not in CONDITIONS]
    if unknown:
        parser.error(f"unknown conditions {unknown}; known: {list(CONDITIONS)}")
    rows = [signal_row(name, CONDITIONS[name], args.seconds) for name in args.conditions]
    header = (
        "| condition | ERLE dB | residual speech frames, AEC only → gated | longest run ms "
        "| double talk: user frames kept (AEC only) | level dB | µs/frame (p99) |"
    )
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.condition} | {r.erle_db} | {r.residual_speech_pct_raw} % → "
            f"{r.residual_speech_pct} % | {r.longest_residual_ms_raw} → {r.longest_residual_ms} "
            f"| {r.double_talk_kept_pct} % ({r.double_talk_kept_pct_raw} %) "
            f"| {r.double_talk_level_db} | {r.cpu_us_per_frame} ({r.cpu_us_p99}) |"
        )
    doc: dict[str, Any] = {"signals": [asdict(r) for r in rows]}
    if args.replies:
        from runtime.speech.engines.whisper import WhisperSTT

        reply = _agent_reply()
        stt = WhisperSTT()
        many = [
            replies_row(name, CONDITIONS[name], args.replies, reply, stt)
            for name in args.conditions
        ]
        asyncio.run(stt.aclose())
        doc["replies"] = [asdict(r) for r in many]
        print()
        print("| condition | replies | self-interruptions | interruptions heard | after s "
              "| double talk kept | onset kept (early) | WER in double talk (clean) |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for m in many:
            print(
                f"| {m.condition} | {m.replies} | {m.self_interruptions} "
                f"| {m.interruptions_heard} | {m.heard_after_s} | {m.double_talk_kept_pct} % "
                f"| {m.onset_kept_pct} % ({m.early_onset_kept_pct} %) "
                f"| {m.double_talk_wer_pct} % ({m.clean_wer_pct} %) |"
            )
    if args.conversations:
        doc["conversations"] = asyncio.run(conversations(args.conversations, args.conditions))
        print()
        print("| microphone | replies | self-interruptions | phantom user turns "
              "| interruptions detected | median detection s | user WER % |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|")
        for cond, s in doc["conversations"].items():
            if cond == "log":
                continue
            print(
                f"| {cond} | {s['replies']} | {s['self_interruptions']} | {s['phantom_turns']} "
                f"| {s['interruptions_detected']}/{s['interruptions']} | {s['detect_median_s']} "
                f"| {s['wer_pct']} |"
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

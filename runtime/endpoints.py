"""The endpoint URL policy.

Theory of operation
-------------------
A stored endpoint URL (an agent's ``llm[].base_url``, an HTTP tool) is a
request the *server* makes on behalf of a *client*, so it is an SSRF vector.
The policy is applied in two steps:

1. :func:`parse_endpoint_url` is pure. It accepts only a plain
   ``https://host[:port][/path]`` (``http`` where the policy allows it) and
   rejects every form that is known to confuse URL parsers or to smuggle a
   private address: userinfo (``user@host``), backslashes, whitespace and
   control characters, zone ids, and numeric IPv4 spellings other than the
   canonical dotted quad (``2130706433``, ``0x7f.1``, ``0177.0.0.1``,
   ``127.1``). Names are IDNA-normalised before checks, so look-alike
   characters cannot spell ``localhost``.
2. :func:`resolve_endpoint` resolves the name once through an injected
   :class:`Resolver`, checks **every** address, and returns a
   :class:`PinnedEndpoint`. The HTTP client then connects to those checked
   addresses only (TLS SNI and ``Host`` stay the name), so a DNS answer that
   changes after the check (rebinding) cannot redirect the request.
   Redirects are never followed.

Whether an address is public is decided from the IANA special-purpose address
registries, kept here as tables (:data:`IPV4_SPECIAL`, :data:`IPV6_SPECIAL`;
Python's ``ipaddress.is_global`` changes between patch releases): the most
specific block an address falls in decides, by the registry's "Globally
Reachable" column; multicast is never public; IPv6 must also be in the global
unicast space ``2000::/3`` (so the deprecated site-local ``fec0::/10`` and
anything not yet allocated are refused). IPv6 forms that embed an IPv4 address
(NAT64, 6to4, Teredo) are judged by the embedded address; IPv4-mapped and
IPv4-compatible forms are refused outright, as hosts never publish them.

Operators who run endpoints on their own network allow private hosts by name
or CIDR (:meth:`URLPolicy.with_allowlist`, the server's
``VOXLOOP_ALLOW_PRIVATE_ENDPOINTS``) or wholesale (``allow_private``). Such
hosts may also use plain ``http``; a public address always needs ``https``.
Private certificate authorities are trusted through :func:`tls_verify`
(``VOXLOOP_CA_BUNDLE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NamedTuple, Protocol
from urllib.parse import urlsplit

from runtime.errors import URLPolicyError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_LENGTH: Final = 2048
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
_FORBIDDEN_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
_ASCII_DIGITS = re.compile(r"[0-9]+")
# Only the well-known prefix embeds the IPv4 address in its last 32 bits. The local-use
# prefix 64:ff9b:1::/48 (RFC 8215) may place it anywhere (RFC 6052 formats) and is not
# globally reachable: it is refused as a block, whatever it seems to embed.
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"),)
ALLOWLIST_SETTING: Final = "VOXLOOP_ALLOW_PRIVATE_ENDPOINTS"
CA_BUNDLE_SETTING: Final = "VOXLOOP_CA_BUNDLE"


class SpecialBlock(NamedTuple):
    """One row of an IANA special-purpose address registry."""

    network: IPNetwork
    name: str
    globally_reachable: bool


def _blocks(rows: Sequence[tuple[str, str, bool]]) -> tuple[SpecialBlock, ...]:
    return tuple(SpecialBlock(ipaddress.ip_network(n), name, g) for n, name, g in rows)


# https://www.iana.org/assignments/iana-ipv4-special-registry (plus multicast, RFC 5771).
IPV4_SPECIAL: Final = _blocks([
    ("0.0.0.0/8", "this-network", False),
    ("0.0.0.0/32", "unspecified", False),
    ("10.0.0.0/8", "private", False),
    ("100.64.0.0/10", "shared (CGNAT)", False),
    ("127.0.0.0/8", "loopback", False),
    ("169.254.0.0/16", "link-local", False),
    ("172.16.0.0/12", "private", False),
    ("192.0.0.0/24", "IETF protocol assignment", False),
    ("192.0.0.0/29", "IPv4 service continuity", False),
    ("192.0.0.8/32", "IPv4 dummy", False),
    ("192.0.0.9/32", "PCP anycast", True),
    ("192.0.0.10/32", "TURN anycast", True),
    ("192.0.0.170/32", "NAT64/DNS64 discovery", False),
    ("192.0.0.171/32", "NAT64/DNS64 discovery", False),
    ("192.0.2.0/24", "documentation", False),
    ("192.31.196.0/24", "AS112", True),
    ("192.52.193.0/24", "AMT", True),
    ("192.88.99.0/24", "deprecated 6to4 relay anycast", False),
    ("192.168.0.0/16", "private", False),
    ("192.175.48.0/24", "AS112 direct delegation", True),
    ("198.18.0.0/15", "benchmarking", False),
    ("198.51.100.0/24", "documentation", False),
    ("203.0.113.0/24", "documentation", False),
    ("224.0.0.0/4", "multicast", False),
    ("240.0.0.0/4", "reserved", False),
    ("255.255.255.255/32", "limited broadcast", False),
])  # fmt: skip

# https://www.iana.org/assignments/iana-ipv6-special-registry (plus multicast ff00::/8).
# NAT64, Teredo and 6to4 addresses are judged by the IPv4 address they embed.
IPV6_SPECIAL: Final = _blocks([
    ("::1/128", "loopback", False),
    ("::/128", "unspecified", False),
    ("::ffff:0:0/96", "IPv4-mapped", False),
    ("64:ff9b::/96", "NAT64", True),
    ("64:ff9b:1::/48", "local-use NAT64", False),
    ("100::/64", "discard-only", False),
    ("100:0:0:1::/64", "dummy", False),
    ("2001::/23", "IETF protocol assignment", False),
    ("2001::/32", "Teredo", False),
    ("2001:1::1/128", "PCP anycast", True),
    ("2001:1::2/128", "TURN anycast", True),
    ("2001:1::3/128", "DNS-SD SRP anycast", True),
    ("2001:2::/48", "benchmarking", False),
    ("2001:3::/32", "AMT", True),
    ("2001:4:112::/48", "AS112", True),
    ("2001:10::/28", "deprecated ORCHID", False),
    ("2001:20::/28", "ORCHIDv2", True),
    ("2001:30::/28", "drone remote ID tags", True),
    ("2001:db8::/32", "documentation", False),
    ("2002::/16", "6to4", False),
    ("2620:4f:8000::/48", "AS112 direct delegation", True),
    ("3fff::/20", "documentation", False),
    ("5f00::/16", "segment routing SIDs", False),
    ("fc00::/7", "unique-local (private)", False),
    ("fe80::/10", "link-local", False),
    ("fec0::/10", "deprecated site-local", False),
    ("ff00::/8", "multicast", False),
])  # fmt: skip

_GLOBAL_UNICAST_V6: Final = ipaddress.IPv6Network("2000::/3")


def special_block(address: IPAddress) -> SpecialBlock | None:
    """The most specific special-purpose block ``address`` is in, if any."""
    table = IPV4_SPECIAL if address.version == 4 else IPV6_SPECIAL
    best: SpecialBlock | None = None
    for block in table:
        if address in block.network and (
            best is None or block.network.prefixlen > best.network.prefixlen
        ):
            best = block
    return best


_LOCAL_NAMES: Final = ("localhost",)
_LOCAL_SUFFIXES: Final = (".localhost",)


@dataclass(frozen=True, slots=True)
class URLPolicy:
    """What endpoint URLs are acceptable.

    Attributes:
        require_https: refuse ``http://`` (the default for stored endpoints).
        allow_private: accept any non-public address (a machine owner's CLI).
        allowed_hosts: names that may resolve to non-public addresses.
        allowed_networks: non-public networks that are acceptable.
    """

    require_https: bool = True
    allow_private: bool = False
    allowed_hosts: frozenset[str] = frozenset()
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def operator(cls) -> URLPolicy:
        """The policy for commands a machine's owner runs (``talk``, ``bench``)."""
        return cls(require_https=False, allow_private=True)

    def with_allowlist(self, entries: Iterable[str]) -> URLPolicy:
        """Return a copy that also allows the given host names and CIDRs.

        Raises:
            ValueError: an entry is neither a host name nor a network.
        """
        hosts = set(self.allowed_hosts)
        networks = list(self.allowed_networks)
        for raw in entries:
            entry = raw.strip().lower()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            name = _normalise_name(entry, original=raw)
            hosts.add(name)
        return URLPolicy(
            require_https=self.require_https,
            allow_private=self.allow_private,
            allowed_hosts=frozenset(hosts),
            allowed_networks=tuple(networks),
        )

    def permits_address(self, address: IPAddress, host: str) -> bool:
        if is_public_address(address):
            return True
        return self.permits_private(address, host)

    def permits_private(self, address: IPAddress, host: str) -> bool:
        """Whether a non-public ``address`` is on the operator's allowlist."""
        if address.is_unspecified or address.is_multicast:
            return False
        if self.allow_private or host in self.allowed_hosts:
            return True
        return any(
            address in net for net in self.allowed_networks if net.version == address.version
        )

    @property
    def has_allowlist(self) -> bool:
        return self.allow_private or bool(self.allowed_hosts or self.allowed_networks)


@dataclass(frozen=True, slots=True)
class EndpointURL:
    """A URL that passed the syntactic checks.

    Attributes:
        url: the normalised URL, without a trailing slash.
        host: the IDNA-normalised name, or the address for IP literals
            (IPv6 without brackets).
        address: the address when the host is an IP literal.
    """

    url: str
    scheme: str
    host: str
    port: int
    path: str
    address: IPAddress | None = None


@dataclass(frozen=True, slots=True)
class PinnedEndpoint:
    """An endpoint whose addresses were resolved once and checked."""

    endpoint: EndpointURL
    addresses: tuple[IPAddress, ...] = field(default=())


class Resolver(Protocol):
    """Resolves a host name to addresses (as strings).

    Raises:
        OSError: the name does not resolve.
    """

    async def resolve(self, host: str, port: int) -> Sequence[str]: ...


class SystemResolver:
    """The operating system's resolver (``getaddrinfo``), without blocking the loop."""

    async def resolve(self, host: str, port: int) -> Sequence[str]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [str(info[4][0]) for info in infos]


class StaticResolver:
    """Answers from a fixed table (tests, and operators who pin hosts)."""

    def __init__(self, table: Mapping[str, Sequence[str]]) -> None:
        self._table = {k.lower(): list(v) for k, v in table.items()}
        self.calls = 0

    async def resolve(self, host: str, port: int) -> Sequence[str]:
        self.calls += 1
        try:
            return self._table[host.lower()]
        except KeyError:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None


def has_user_info(url: str) -> bool:
    """Whether ``url`` carries ``user[:password]@`` before its host (a URL that cannot be
    parsed has none; its other faults are reported where it is parsed)."""
    try:
        return "@" in urlsplit(url).netloc
    except ValueError:
        return False


def _reject(reason: str, message: str) -> URLPolicyError:
    return URLPolicyError(message, reason=reason)


def describe_address(address: IPAddress) -> str:
    """A short reason why an address is not public (for error messages)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return "IPv4-mapped"
        if int(address) >> 32 == 0 and not address.is_loopback and not address.is_unspecified:
            return "IPv4-compatible"
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return f"{describe_address(embedded)} (embedded in IPv6)"
    block = special_block(address)
    if block is not None:
        return block.name
    if isinstance(address, ipaddress.IPv6Address) and address not in _GLOBAL_UNICAST_V6:
        return "unallocated"
    return "not globally routable"


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    for net in _NAT64:
        if address in net:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public_address(address: IPAddress) -> bool:
    """Whether a connection to ``address`` reaches the public internet only.

    Decided from :data:`IPV4_SPECIAL` / :data:`IPV6_SPECIAL` (see the module
    docstring), not from ``ipaddress.is_global``.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return False
        # IPv4-compatible (::a.b.c.d, deprecated by RFC 4291 §2.5.5.1).
        if int(address) >> 32 == 0:
            return False
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return is_public_address(embedded)
        if address not in _GLOBAL_UNICAST_V6 and address not in _NAT64[0]:
            return False
    block = special_block(address)
    return block is None or block.globally_reachable


def _normalise_name(host: str, *, original: str) -> str:
    name = host.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise _reject("host", f"URL has no host: {original!r}")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise _reject("host", "host name is not a valid internationalised name") from None
    if len(name) > 253:
        raise _reject("host", "host name is longer than 253 characters")
    labels = name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise _reject("host", f"host name {name!r} has characters outside a-z, 0-9 and '-'")
    return name


def _parse_ipv4_literal(host: str) -> ipaddress.IPv4Address:
    # WHATWG URL: a host whose last label is numeric is an IPv4 address. Only the
    # canonical dotted quad is accepted; other spellings are how SSRF filters
    # are bypassed (inet_aton accepts 2130706433, 0x7f000001, 0177.1, 127.1).
    parts = host.split(".")
    # ASCII digits only: fullwidth, Arabic-Indic and superscript digits pass str.isdigit().
    canonical = len(parts) == 4 and all(
        _ASCII_DIGITS.fullmatch(p) and (p == "0" or not p.startswith("0")) and int(p) <= 255
        for p in parts
    )
    if not canonical:
        raise _reject("numeric-host", f"non-canonical numeric IPv4 host {host!r}")
    return ipaddress.IPv4Address(host)


def parse_endpoint_url(url: str, policy: URLPolicy) -> EndpointURL:
    """Check the syntax of an endpoint base URL and normalise it.

    Args:
        url: the URL as the user gave it, e.g. ``https://api.example.com/v1``.
        policy: what is allowed.

    Returns:
        The normalised URL. IP-literal hosts are checked here as well.

    Raises:
        URLPolicyError: the URL is malformed or not allowed; the message says why.
    """
    if not isinstance(url, str):
        raise _reject("type", "URL must be a string")
    if len(url) > MAX_URL_LENGTH:
        raise _reject("length", f"URL is longer than {MAX_URL_LENGTH} characters")
    if _FORBIDDEN_CHARS.search(url):
        raise _reject("characters", "URL contains whitespace, control characters or backslashes")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise _reject("syntax", f"URL cannot be parsed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        shown = (scheme or "none")[:20]
        allowed = "https" if policy.require_https and not policy.has_allowlist else "https or http"
        raise _reject("scheme", f"URL scheme must be {allowed}, not {shown}")
    if scheme == "http" and policy.require_https and not policy.has_allowlist:
        raise _reject("scheme", _HTTPS_ONLY)
    if parts.query or url.rstrip("/").endswith("?"):
        raise _reject("query", "base URL must not have a query string")
    if parts.fragment or "#" in url:
        raise _reject("fragment", "base URL must not have a fragment")
    netloc = parts.netloc
    if "@" in netloc:
        raise _reject("userinfo", "URL must not contain user information ('user@')")
    if not netloc:
        raise _reject("host", "URL has no host")

    address: IPAddress | None = None
    port_text = ""
    if netloc.startswith("["):
        end = netloc.find("]")
        if end == -1:
            raise _reject("host", "unterminated IPv6 literal")
        literal = netloc[1:end]
        rest = netloc[end + 1 :]
        if rest and not rest.startswith(":"):
            raise _reject("host", "unexpected text after IPv6 literal")
        port_text = rest[1:] if rest else ""
        if rest == ":":
            raise _reject("port", "URL has an empty port")
        if "%" in literal:
            raise _reject("host", "IPv6 zone identifiers are not allowed")
        try:
            address = ipaddress.IPv6Address(literal)
        except ValueError:
            raise _reject("host", f"invalid IPv6 literal {literal!r}") from None
        host = str(address)
    else:
        host_text, sep, port_text = netloc.rpartition(":")
        if not sep:
            host_text, port_text = netloc, ""
        elif not host_text:
            raise _reject("host", "URL has no host")
        elif not port_text:
            raise _reject("port", "URL has an empty port")
        if ":" in host_text or "[" in host_text or "]" in host_text:
            raise _reject("host", "IPv6 addresses must be written in brackets")
        lowered = host_text.lower().rstrip(".")
        last_label = lowered.rsplit(".", 1)[-1]
        if lowered and _NUMERIC_LABEL.match(last_label):
            address = _parse_ipv4_literal(lowered)
            host = str(address)
        else:
            host = _normalise_name(host_text, original=url)
            if _NUMERIC_LABEL.match(host.rsplit(".", 1)[-1]):
                # An internationalised name that normalises to digits ("127.0.0.¹"):
                # a number spelled in other scripts is never an address.
                raise _reject("numeric-host", "numeric host written with non-ASCII digits")

    if port_text:
        if (
            not _ASCII_DIGITS.fullmatch(port_text)
            or len(port_text) > 5
            or not 0 < int(port_text) <= 65535
        ):
            raise _reject("port", f"invalid port {port_text!r}")
        port = int(port_text)
    else:
        port = 443 if scheme == "https" else 80

    if address is not None:
        check_address(address, host, policy)
        _check_http(scheme, address, host, policy)
    elif (
        not policy.allow_private
        and host not in policy.allowed_hosts
        and (host in _LOCAL_NAMES or host.endswith(_LOCAL_SUFFIXES))
    ):
        raise _reject(
            "private-address",
            f"host {host!r} is a local name; to allow it, add it to {ALLOWLIST_SETTING}",
        )

    path = parts.path.rstrip("/")
    shown_host = f"[{host}]" if isinstance(address, ipaddress.IPv6Address) else host
    default_port = 443 if scheme == "https" else 80
    authority = shown_host if port == default_port else f"{shown_host}:{port}"
    return EndpointURL(
        url=f"{scheme}://{authority}{path}",
        scheme=scheme,
        host=host,
        port=port,
        path=path,
        address=address,
    )


_HTTPS_ONLY: Final = (
    "URL scheme must be https; plain http is allowed only for private hosts on the "
    f"operator's allowlist ({ALLOWLIST_SETTING})"
)


def _check_http(scheme: str, address: IPAddress, host: str, policy: URLPolicy) -> None:
    """Plain http under a strict policy: only to allowlisted non-public addresses."""
    if scheme != "http" or not policy.require_https:
        return
    if is_public_address(address) or not policy.permits_private(address, host):
        raise _reject(
            "scheme",
            f"host {host!r} is public ({address}): URL scheme must be https "
            f"(plain http is allowed only for private hosts on {ALLOWLIST_SETTING})",
        )


def check_address(address: IPAddress, host: str, policy: URLPolicy) -> None:
    """Raise :class:`URLPolicyError` unless ``policy`` permits connecting to ``address``."""
    if not policy.permits_address(address, host):
        kind = describe_address(address)
        article = "an" if kind[:1].lower() in "aeiou" else "a"  # "an IPv4-mapped", "a loopback"
        raise _reject(
            "private-address",
            f"host {host[:80]!r} resolves to {article} {kind} address ({address}), "
            "which is not allowed; to allow it, add the host or its network to "
            f"{ALLOWLIST_SETTING}",
        )


async def resolve_endpoint(
    endpoint: EndpointURL, policy: URLPolicy, resolver: Resolver
) -> PinnedEndpoint:
    """Resolve ``endpoint`` once and check every address it resolves to.

    Raises:
        URLPolicyError: the name does not resolve, or any address is not allowed.
    """
    if endpoint.address is not None:
        return PinnedEndpoint(endpoint, (endpoint.address,))
    try:
        answers = await resolver.resolve(endpoint.host, endpoint.port)
    except OSError:
        raise _reject("unresolvable", f"host {endpoint.host!r} does not resolve") from None
    addresses: list[IPAddress] = []
    for answer in answers:
        try:
            address = ipaddress.ip_address(answer.split("%", 1)[0])
        except ValueError:
            raise _reject("unresolvable", "resolver returned an invalid address") from None
        check_address(address, endpoint.host, policy)
        _check_http(endpoint.scheme, address, endpoint.host, policy)
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise _reject("unresolvable", f"host {endpoint.host!r} does not resolve")
    return PinnedEndpoint(endpoint, tuple(addresses))


async def check_endpoint_url(url: str, policy: URLPolicy, resolver: Resolver) -> PinnedEndpoint:
    """Parse, resolve and check ``url`` in one call."""
    return await resolve_endpoint(parse_endpoint_url(url, policy), policy, resolver)


def tls_verify(
    ca_bundle: str | Path | None = None, env: Mapping[str, str] | None = None
) -> ssl.SSLContext | bool:
    """What to verify TLS peers with: the system roots, plus a private CA bundle if given.

    Args:
        ca_bundle: a PEM file of extra trusted certificates (a private CA, a
            self-signed endpoint). ``None`` reads ``VOXLOOP_CA_BUNDLE`` from ``env``.
        env: the environment (default ``os.environ``).

    Returns:
        ``True`` (system roots) or an ``ssl.SSLContext`` that trusts the system
        roots and the bundle; pass it as ``verify=`` to any voxloop client.

    Raises:
        ValueError: the bundle cannot be read or holds no certificate (one line).
    """
    source = ca_bundle if ca_bundle is not None else (env or os.environ).get(CA_BUNDLE_SETTING)
    if not source:
        return True
    context = ssl.create_default_context()
    try:
        context.load_verify_locations(cafile=str(source))
    except FileNotFoundError:
        raise ValueError(f"the CA bundle {source} does not exist") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or "no PEM certificate in it"
        raise ValueError(f"the CA bundle {source} cannot be used: {reason}") from None
    return context


PLAIN_HTTP_PROBE_S: Final = 5.0
"""How long :func:`speaks_plain_http` waits for the connection and the answer (seconds)."""


async def speaks_plain_http(host: str, port: int) -> bool:
    """Whether the server at ``host:port`` answers a plain-http request (no TLS).

    Asked after a TLS handshake failed, to tell "this is an http server" from
    other TLS failures (OpenSSL's own text for it differs between versions).
    Never raises: an address that does not answer is ``False``.
    """
    try:
        async with asyncio.timeout(PLAIN_HTTP_PROBE_S):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(b"HEAD / HTTP/1.0\r\nHost: " + host.encode() + b"\r\n\r\n")
                await writer.drain()
                head = await reader.read(5)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return False
    return head == b"HTTP/"


def plain_http_message(url: str, flag: str = "") -> str:
    """The one line for an https/wss URL whose server speaks plain http.

    ``flag``: the option that gave the URL (``--base-url``), shown before it.
    """
    parts = urlsplit(url)
    plain = {"https": "http", "wss": "ws"}.get(parts.scheme.lower(), parts.scheme)
    fixed = parts._replace(scheme=plain).geturl()
    head = f"{flag} {url}" if flag else url
    return f"{head}: the server at {parts.netloc} speaks plain http, not TLS; use {fixed}"


def tls_failure(exc: ssl.SSLError) -> str:
    """What a failed TLS handshake says, in words: what does not verify in a certificate
    (``unable to get local issuer certificate``), else OpenSSL's reason read as words
    (``WRONG_VERSION_NUMBER`` -> ``wrong version number``)."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return str(exc.verify_message)
    return (exc.reason or "").replace("_", " ").lower() or str(exc)


def ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind a failure (through ``__cause__``/``__context__``), if there is one."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def connection_failure(exc: BaseException) -> str:
    """Why a connection failed, in words, whatever library raised it (its chain is read):
    ``TLS handshake failed: …``, the OS's reason (``connection refused``), ``no answer in
    time``, else ``the connection failed``. Never a library's class name."""
    tls = ssl_cause(exc)
    if tls is not None:
        return f"TLS handshake failed: {tls_failure(tls)}"
    seen: set[int] = set()
    current: BaseException | None = exc
    timed_out = False
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno:
            return os.strerror(current.errno).lower()
        timed_out = timed_out or isinstance(current, TimeoutError)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return "no answer in time" if timed_out else "the connection failed"

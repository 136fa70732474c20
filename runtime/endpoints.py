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

An address is public when Python's ``ipaddress`` calls it global and it is not
multicast or reserved; IPv6 forms that embed an IPv4 address (IPv4-mapped,
IPv4-compatible, NAT64, 6to4) are judged by the embedded address, and the
mapped/compatible forms are refused outright, as hosts never publish them.
Operators who run endpoints on their own network allow private hosts by name
or CIDR (:meth:`URLPolicy.with_allowlist`) or wholesale (``allow_private``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol
from urllib.parse import urlsplit

from runtime.errors import URLPolicyError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_LENGTH: Final = 2048
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
_FORBIDDEN_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
_NAT64 = (
    ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("64:ff9b:1::/48"),
)
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
        if self.allow_private or host in self.allowed_hosts:
            return not address.is_unspecified and not address.is_multicast
        return any(
            address in net for net in self.allowed_networks if net.version == address.version
        )


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


def _reject(reason: str, message: str) -> URLPolicyError:
    return URLPolicyError(message, reason=reason)


def describe_address(address: IPAddress) -> str:
    """A short reason why an address is not public (for error messages)."""
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
    )
    for name, flag in checks:
        if flag:
            return name
    if isinstance(address, ipaddress.IPv4Address) and address in ipaddress.IPv4Network(
        "100.64.0.0/10"
    ):
        return "shared (CGNAT)"
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
    """Whether a connection to ``address`` reaches the public internet only."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return False
        # IPv4-compatible (::a.b.c.d, deprecated by RFC 4291 §2.5.5.1).
        if int(address) >> 32 == 0:
            return False
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return is_public_address(embedded)
    return bool(
        address.is_global
        and not address.is_multicast
        and not address.is_reserved
        and not address.is_unspecified
    )


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
    canonical = len(parts) == 4 and all(
        p.isdigit() and (p == "0" or not p.startswith("0")) and int(p) <= 255 for p in parts
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
    allowed_schemes = ("https",) if policy.require_https else ("https", "http")
    if scheme not in allowed_schemes:
        shown = scheme or "none"
        raise _reject("scheme", f"URL scheme must be {' or '.join(allowed_schemes)}, not {shown}")
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
                # An internationalised name that normalises to digits.
                address = _parse_ipv4_literal(host)
                host = str(address)

    if port_text:
        if not port_text.isdigit() or len(port_text) > 5 or not 0 < int(port_text) <= 65535:
            raise _reject("port", f"invalid port {port_text!r}")
        port = int(port_text)
    else:
        port = 443 if scheme == "https" else 80

    if address is not None:
        check_address(address, host, policy)
    elif (
        not policy.allow_private
        and host not in policy.allowed_hosts
        and (host in _LOCAL_NAMES or host.endswith(_LOCAL_SUFFIXES))
    ):
        raise _reject("private-address", f"host {host!r} is a local name")

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


def check_address(address: IPAddress, host: str, policy: URLPolicy) -> None:
    """Raise :class:`URLPolicyError` unless ``policy`` permits connecting to ``address``."""
    if not policy.permits_address(address, host):
        raise _reject(
            "private-address",
            f"host {host!r} resolves to a {describe_address(address)} address ({address}), "
            "which is not allowed",
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
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise _reject("unresolvable", f"host {endpoint.host!r} does not resolve")
    return PinnedEndpoint(endpoint, tuple(addresses))


async def check_endpoint_url(url: str, policy: URLPolicy, resolver: Resolver) -> PinnedEndpoint:
    """Parse, resolve and check ``url`` in one call."""
    return await resolve_endpoint(parse_endpoint_url(url, policy), policy, resolver)

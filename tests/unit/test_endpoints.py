from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.endpoints import (
    IPV4_SPECIAL,
    IPV6_SPECIAL,
    StaticResolver,
    URLPolicy,
    check_address,
    check_endpoint_url,
    is_public_address,
    parse_endpoint_url,
    resolve_endpoint,
    special_block,
    tls_verify,
)
from runtime.errors import URLPolicyError

STRICT = URLPolicy()

# Public names resolve through this table; nothing touches real DNS.
RESOLVER = StaticResolver(
    {
        "api.example.com": ["93.184.216.34"],
        "v6.example.com": ["2606:2800:220:1:248:1893:25c8:1946"],
        "dual.example.com": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"],
        "rebind.example.com": ["93.184.216.34", "127.0.0.1"],
        "internal.example.com": ["10.1.2.3"],
        "metadata.example.com": ["169.254.169.254"],
        "nip.example.com": ["127.0.0.1"],
        "mapped.example.com": ["::ffff:10.0.0.1"],
        "nat64-private.example.com": ["64:ff9b::a00:1"],
        "nat64-public.example.com": ["64:ff9b::5db8:d822"],
        "cgnat.example.com": ["100.64.1.1"],
        "zero.example.com": ["0.0.0.0"],
        "linklocal6.example.com": ["fe80::1%eth0"],
        "ula.example.com": ["fd12:3456::1"],
        "garbage.example.com": ["not-an-ip"],
        "empty.example.com": [],
        "vllm.corp.example": ["10.20.30.40"],
    }
)

HOSTILE_URLS = [
    # scheme
    "http://api.example.com/v1",
    "ftp://api.example.com/",
    "file:///etc/passwd",
    "gopher://api.example.com/",
    "javascript:alert(1)",
    "//api.example.com/v1",
    "api.example.com/v1",
    "",
    # loopback / private / special IPv4 literals
    "https://127.0.0.1/v1",
    "https://127.0.0.2:8443/v1",
    "https://10.0.0.1/v1",
    "https://172.16.5.4/v1",
    "https://192.168.1.1/v1",
    "https://169.254.169.254/latest/meta-data",
    "https://100.64.0.1/",
    "https://0.0.0.0/",
    "https://224.0.0.1/",
    "https://240.0.0.1/",
    "https://255.255.255.255/",
    "https://192.0.2.1/",
    "https://198.18.0.1/",
    # numeric IPv4 encodings
    "https://2130706433/",
    "https://0x7f000001/",
    "https://0x7f.0x0.0x0.0x1/",
    "https://0177.0.0.1/",
    "https://017700000001/",
    "https://127.1/",
    "https://127.0.1/",
    "https://0/",
    "https://1.2.3.4.5/",
    "https://01.02.03.04/",
    # IPv6 forms
    "https://[::1]/v1",
    "https://[::]/",
    "https://[::ffff:127.0.0.1]/",
    "https://[::ffff:7f00:1]/",
    "https://[::127.0.0.1]/",
    "https://[fe80::1]/",
    "https://[fe80::1%25eth0]/",
    "https://[fc00::1]/",
    "https://[fd00:ec2::254]/",
    "https://[ff02::1]/",
    "https://[64:ff9b::7f00:1]/",
    "https://[2002:7f00:1::1]/",
    "https://[2002:a00:1::]/",
    "https://[2001:db8::1]/",
    "https://[::1",
    "https://::1/",
    # userinfo and parser confusion
    "https://user:pass@api.example.com/v1",
    "https://api.example.com@127.0.0.1/",
    "https://127.0.0.1@api.example.com/",
    "https://api.example.com#@127.0.0.1/",
    "https://api.example.com?@127.0.0.1/",
    "https://api.example.com\\@127.0.0.1/",
    "https://api.example.com /v1",
    "https://api.exa\tmple.com/v1",
    "https://api.example.com\r\nHost: evil/",
    "https://api.example.com/v1?key=1",
    "https://api.example.com/v1#frag",
    # local names
    "https://localhost/v1",
    "https://LOCALHOST./v1",
    "https://foo.localhost/v1",
    "https://ⓛⓞⓒⓐⓛⓗⓞⓢⓣ/v1",
    "https://xn--/v1",
    "https://exa_mple.com/",
    "https://-bad-.example.com/",
    # ports
    "https://api.example.com:0/",
    "https://api.example.com:65536/",
    "https://api.example.com:-1/",
    "https://api.example.com:80a/",
    "https://api.example.com:/",
    # length
    "https://" + "a" * 2100 + ".com/",
]

# Names that parse but resolve to forbidden addresses (rebinding and friends).
HOSTILE_BY_DNS = [
    "https://rebind.example.com/v1",
    "https://internal.example.com/v1",
    "https://metadata.example.com/",
    "https://nip.example.com/",
    "https://mapped.example.com/",
    "https://nat64-private.example.com/",
    "https://cgnat.example.com/",
    "https://zero.example.com/",
    "https://linklocal6.example.com/",
    "https://ula.example.com/",
    "https://garbage.example.com/",
    "https://empty.example.com/",
    "https://unknown.example.com/",
]


def test_the_hostile_table_is_large():
    assert len(HOSTILE_URLS) + len(HOSTILE_BY_DNS) >= 40


@pytest.mark.parametrize("url", HOSTILE_URLS)
async def test_hostile_urls_are_rejected(url: str):
    with pytest.raises(URLPolicyError) as info:
        await check_endpoint_url(url, STRICT, RESOLVER)
    assert str(info.value)  # every rejection says why
    assert info.value.reason


@pytest.mark.parametrize("url", HOSTILE_BY_DNS)
async def test_names_resolving_to_forbidden_addresses_are_rejected(url: str):
    endpoint = parse_endpoint_url(url, STRICT)  # syntactically fine
    with pytest.raises(URLPolicyError, match=r"resolve|not allowed|invalid address"):
        await resolve_endpoint(endpoint, STRICT, RESOLVER)


@pytest.mark.parametrize(
    ("url", "normalised", "addresses"),
    [
        ("https://api.example.com/v1/", "https://api.example.com/v1", ["93.184.216.34"]),
        ("HTTPS://API.Example.COM./v1", "https://api.example.com/v1", ["93.184.216.34"]),
        ("https://api.example.com:443/v1", "https://api.example.com/v1", ["93.184.216.34"]),
        ("https://api.example.com:8443", "https://api.example.com:8443", ["93.184.216.34"]),
        (
            "https://v6.example.com/v1",
            "https://v6.example.com/v1",
            ["2606:2800:220:1:248:1893:25c8:1946"],
        ),
        (
            "https://dual.example.com/v1",
            "https://dual.example.com/v1",
            ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"],
        ),
        (
            "https://nat64-public.example.com",
            "https://nat64-public.example.com",
            ["64:ff9b::5db8:d822"],
        ),
        ("https://93.184.216.34/v1", "https://93.184.216.34/v1", ["93.184.216.34"]),
        ("https://[2606:4700::1111]/v1", "https://[2606:4700::1111]/v1", ["2606:4700::1111"]),
    ],
)
async def test_public_urls_are_accepted_and_normalised(
    url: str, normalised: str, addresses: list[str]
):
    pinned = await check_endpoint_url(url, STRICT, RESOLVER)
    assert pinned.endpoint.url == normalised
    assert [str(a) for a in pinned.addresses] == addresses


async def test_idna_names_are_normalised_before_resolution():
    resolver = StaticResolver({"xn--bcher-kva.example": ["93.184.216.34"]})
    pinned = await check_endpoint_url("https://bücher.example/v1", STRICT, resolver)
    assert pinned.endpoint.host == "xn--bcher-kva.example"


async def test_resolution_happens_once_and_is_pinned():
    resolver = StaticResolver({"api.example.com": ["93.184.216.34"]})
    endpoint = parse_endpoint_url("https://api.example.com/v1", STRICT)
    pinned = await resolve_endpoint(endpoint, STRICT, resolver)
    assert resolver.calls == 1
    assert pinned.addresses == (ipaddress.ip_address("93.184.216.34"),)


async def test_operator_allowlist_by_cidr_and_by_host():
    by_cidr = STRICT.with_allowlist(["10.20.0.0/16"])
    pinned = await check_endpoint_url("https://vllm.corp.example/v1", by_cidr, RESOLVER)
    assert str(pinned.addresses[0]) == "10.20.30.40"
    with pytest.raises(URLPolicyError):
        await check_endpoint_url("https://internal.example.com/v1", by_cidr, RESOLVER)

    by_host = STRICT.with_allowlist(["vllm.corp.example"])
    await check_endpoint_url("https://vllm.corp.example/v1", by_host, RESOLVER)
    with pytest.raises(URLPolicyError):
        await check_endpoint_url("https://internal.example.com/v1", by_host, RESOLVER)
    # Allowlisted private hosts may use plain http (a vLLM on the LAN); public hosts never.
    pinned = await check_endpoint_url("http://vllm.corp.example:8000/v1", by_host, RESOLVER)
    assert pinned.endpoint.url == "http://vllm.corp.example:8000/v1"
    await check_endpoint_url("http://10.20.30.40/v1", by_cidr, RESOLVER)
    for policy in (by_host, by_cidr, URLPolicy(allow_private=True)):
        with pytest.raises(URLPolicyError, match="must be https") as info:
            await check_endpoint_url("http://api.example.com/v1", policy, RESOLVER)
        assert "VOXLOOP_ALLOW_PRIVATE_ENDPOINTS" in str(info.value)
    with pytest.raises(URLPolicyError, match="VOXLOOP_ALLOW_PRIVATE_ENDPOINTS"):
        await check_endpoint_url("http://vllm.corp.example/v1", STRICT, RESOLVER)
    with pytest.raises(URLPolicyError, match="VOXLOOP_ALLOW_PRIVATE_ENDPOINTS"):
        await check_endpoint_url("https://internal.example.com/v1", by_host, RESOLVER)


def test_allowlist_entries_are_validated():
    with pytest.raises(URLPolicyError):
        STRICT.with_allowlist(["not a host!"])


async def test_operator_policy_allows_local_http_but_not_tricks():
    op = URLPolicy.operator()
    pinned = await check_endpoint_url("http://127.0.0.1:8080/v1", op, RESOLVER)
    assert pinned.endpoint.url == "http://127.0.0.1:8080/v1"
    await check_endpoint_url("http://[::1]:8080/v1", op, RESOLVER)
    for url in (
        "http://2130706433/",
        "http://user@127.0.0.1/",
        "http://0.0.0.0/",
        "http://[ff02::1]/",
    ):
        with pytest.raises(URLPolicyError):
            await check_endpoint_url(url, op, RESOLVER)


def test_reasons_name_the_kind_of_address():
    with pytest.raises(URLPolicyError, match="loopback"):
        parse_endpoint_url("https://127.0.0.1/", STRICT)
    with pytest.raises(URLPolicyError, match="CGNAT"):
        parse_endpoint_url("https://100.64.0.1/", STRICT)
    with pytest.raises(URLPolicyError, match="non-canonical numeric"):
        parse_endpoint_url("https://0x7f000001/", STRICT)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("64:ff9b::808:808", True),
        ("2002:808:808::1", True),
        ("::ffff:8.8.8.8", False),
        ("::8.8.8.8", False),
        ("64:ff9b::a00:1", False),
        # Local-use NAT64: refused whatever it embeds (private 10.0.0.1 at /48, /96, or public).
        ("64:ff9b:1:a00:1::", False),
        ("64:ff9b:1::a00:1", False),
        ("64:ff9b:1::5db8:d822", False),
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", False),  # Teredo, embedded 10.0.0.1
        ("100.64.0.1", False),
        ("233.252.0.1", False),
    ],
)
def test_is_public_address(address: str, public: bool):
    assert is_public_address(ipaddress.ip_address(address)) is public


# -- the IANA special-purpose tables -------------------------------------------------------


def _inside(block) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    net = block.network
    return [net.network_address, net.broadcast_address, net[net.num_addresses // 2]]


@pytest.mark.parametrize("block", [*IPV4_SPECIAL, *IPV6_SPECIAL], ids=lambda b: str(b.network))
def test_every_special_purpose_block_follows_its_registry_row(block):
    for address in _inside(block):
        found = special_block(address)
        assert found is not None
        if found.network != block.network:
            # A more specific row inside this block decides for this address.
            assert found.network.subnet_of(block.network)
            continue
        expected = block.globally_reachable
        if block.name in ("Teredo", "6to4", "NAT64", "local-use NAT64"):
            continue  # judged by the embedded IPv4 address (tested below)
        assert is_public_address(address) is expected, (address, block.name)
        if not expected:
            with pytest.raises(URLPolicyError, match="not allowed"):
                literal = f"[{address}]" if address.version == 6 else str(address)
                parse_endpoint_url(f"https://{literal}/v1", STRICT)


def test_the_tables_hold_the_registry_rows():
    v4 = {str(b.network): b.globally_reachable for b in IPV4_SPECIAL}
    v6 = {str(b.network): b.globally_reachable for b in IPV6_SPECIAL}
    assert len(v4) == 26 and len(v6) == 27
    assert v4["192.0.0.8/32"] is False and v4["192.0.0.9/32"] is True
    assert v6["3fff::/20"] is False and v6["fec0::/10"] is False and v6["2001:20::/28"] is True


@pytest.mark.parametrize(
    "url",
    [
        "https://[fec0::1]/v1",
        "https://[fec0::ffff:7f00:1]/v1",
        "https://192.0.0.8/v1",
        "https://[3fff::1]/v1",
        "https://[5f00::1]/v1",
        "https://[100:0:0:1::1]/v1",
        "https://[4000::1]/v1",  # not allocated (outside 2000::/3)
        "https://192.88.99.1/v1",
        "https://198.18.0.1/v1",
    ],
)
async def test_addresses_the_issue_measured_are_refused(url: str):
    with pytest.raises(URLPolicyError, match="VOXLOOP_ALLOW_PRIVATE_ENDPOINTS"):
        await check_endpoint_url(url, STRICT, RESOLVER)


async def test_names_pinned_to_special_addresses_are_refused():
    resolver = StaticResolver(
        {"a.example": ["fec0::1"], "b.example": ["192.0.0.8"], "c.example": ["3fff::1"]}
    )
    for host in ("a.example", "b.example", "c.example"):
        with pytest.raises(URLPolicyError, match="not allowed"):
            await check_endpoint_url(f"https://{host}/v1", STRICT, resolver)


@pytest.mark.parametrize(
    "url",
    [
        "https://１２７.0.0.1/v1",  # fullwidth
        "https://127.０.0.1/v1",
        "https://١٢٧.0.0.1/v1",  # Arabic-Indic
        "https://۱۲۷.0.0.1/v1",  # Extended Arabic-Indic
        "https://¹²⁷.0.0.1/v1",  # superscript
        "https://127.0.0.¹/v1",
        "https://१२७.0.0.1/v1",  # Devanagari
        "https://api.example.com:４４３/v1",
        "https://api.example.com:²/v1",
        "https://[::１]/v1",
        "https://example.１２７/v1",
    ],
)
def test_non_ascii_digit_spellings_are_policy_errors(url: str):
    with pytest.raises(URLPolicyError):
        parse_endpoint_url(url, STRICT)
    with pytest.raises(URLPolicyError):
        parse_endpoint_url(url, URLPolicy.operator())


@settings(max_examples=300, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from(list("0123456789.:[]/%@-abcfx١٢７¹²⁷０ :\\?#")),
        max_size=30,
    )
)
def test_any_host_text_is_a_policy_error_or_a_url(host: str):
    for policy in (STRICT, URLPolicy.operator()):
        try:
            endpoint = parse_endpoint_url(f"https://{host}/v1", policy)
        except URLPolicyError:
            continue
        assert endpoint.host.isascii()
        assert parse_endpoint_url(endpoint.url, policy).url == endpoint.url


def test_ca_bundle_is_loaded_from_the_setting(tmp_path):
    import ssl

    import trustme

    ca = trustme.CA()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    assert tls_verify(env={}) is True
    context = tls_verify(env={"VOXLOOP_CA_BUNDLE": str(bundle)})
    assert isinstance(context, ssl.SSLContext)
    assert any(c.get("subject") for c in context.get_ca_certs())
    with pytest.raises(ValueError, match="does not exist"):
        tls_verify(tmp_path / "missing.pem")
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="cannot be used"):
        tls_verify(tmp_path / "bad.pem")


@pytest.mark.parametrize(
    ("address", "said"),
    [
        ("::ffff:10.0.0.1", "an IPv4-mapped address (::ffff:a00:1)"),
        ("::", "an unspecified address (::)"),
        ("127.0.0.1", "a loopback address (127.0.0.1)"),
        ("10.1.2.3", "a private address (10.1.2.3)"),
    ],
)
def test_a_refused_address_is_named_in_plain_english(address: str, said: str):
    with pytest.raises(URLPolicyError) as info:
        check_address(ipaddress.ip_address(address), "h", URLPolicy())
    assert str(info.value).startswith(f"host 'h' resolves to {said}, which is not allowed")

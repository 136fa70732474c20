"""The production resolver (``getaddrinfo``), on names that resolve the same everywhere."""

from __future__ import annotations

import ipaddress

import pytest

from runtime.endpoints import SystemResolver, URLPolicy, check_endpoint_url
from runtime.errors import URLPolicyError


async def test_localhost_resolves_to_loopback_addresses():
    answers = await SystemResolver().resolve("localhost", 8080)
    addresses = {ipaddress.ip_address(a.split("%", 1)[0]) for a in answers}
    assert addresses and all(a.is_loopback for a in addresses)


async def test_pinned_endpoint_through_the_system_resolver():
    pinned = await check_endpoint_url(
        "http://localhost:8080/v1", URLPolicy.operator(), SystemResolver()
    )
    assert pinned.endpoint.host == "localhost" and pinned.endpoint.port == 8080
    assert pinned.addresses and all(a.is_loopback for a in pinned.addresses)


async def test_a_name_that_never_resolves():
    # RFC 6761: names under .invalid never resolve.
    with pytest.raises(URLPolicyError, match=r"^host 'voxloop\.invalid' does not resolve$"):
        await check_endpoint_url("https://voxloop.invalid/v1", URLPolicy(), SystemResolver())

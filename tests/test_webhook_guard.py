"""The SSRF rules of webhook destinations (shared/webhook_guard.py): the address classifier, the
operator's allowlist, the checks when a URL is set and the one lookup at delivery."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import SettingsError, WebhookUrlRefused
from shared.settings import Settings
from shared.webhook_guard import (
    LOOPBACK_ALLOW,
    PUBLIC_ONLY,
    DeliveryRefused,
    IPAddress,
    WebhookAllow,
    check_url,
    refusal,
    vet,
)

# one address of every kind that must never be a webhook destination, and why
INTERNAL = {
    "0.0.0.0": "unspecified",
    "127.0.0.1": "loopback",
    "127.8.9.10": "loopback",
    "10.1.2.3": "private",
    "172.16.0.9": "private",
    "192.168.1.1": "private",
    "169.254.169.254": "link-local",  # the cloud metadata service
    "100.64.0.1": "shared address space (CGNAT 100.64.0.0/10)",
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "240.0.0.1": "reserved",
    "255.255.255.255": "reserved",
    "192.0.2.10": "not globally routable",  # TEST-NET-1
    "198.18.0.1": "not globally routable",  # benchmarking
    "::": "unspecified",
    "::1": "loopback",
    "fe80::1": "link-local",
    "fc00::1": "private (unique local)",
    "fd12:3456::1": "private (unique local)",
    "ff02::1": "multicast",
    "fec0::1": "site-local",
    "2001:db8::1": "not globally routable",  # documentation
}
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e"]


@pytest.mark.parametrize(("address", "why"), sorted(INTERNAL.items()))
def test_internal_addresses_are_refused_with_their_kind(address: str, why: str) -> None:
    assert refusal(ipaddress.ip_address(address)) == why


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


def test_scoped_ipv6_is_refused() -> None:
    assert refusal(ipaddress.ip_address("fe80::1%eth0")) is not None


# ---------------------------------------------------------------------------- IPv6 forms of IPv4

# every IPv4 address that is not public (a sample of each kind, and random ones around them)
internal_v4 = st.sampled_from([ipaddress.IPv4Address(a) for a in INTERNAL if ":" not in a]) | st.builds(
    ipaddress.IPv4Address, st.integers(min_value=0, max_value=2**32 - 1)
).filter(lambda ip: refusal(ip) is not None)
public_v4 = st.builds(ipaddress.IPv4Address, st.integers(min_value=0, max_value=2**32 - 1)).filter(
    lambda ip: refusal(ip) is None
)


def _forms(v4: ipaddress.IPv4Address) -> dict[str, ipaddress.IPv6Address]:
    n = int(v4)
    return {
        "IPv4-mapped": ipaddress.IPv6Address((0xFFFF << 32) | n),
        "IPv4-compatible": ipaddress.IPv6Address(n),
        "6to4": ipaddress.IPv6Address((0x2002 << 112) | (n << 80) | 1),
        "NAT64": ipaddress.IPv6Address((0x0064FF9B << 96) | n),
        "NAT64 local": ipaddress.IPv6Address((0x0064FF9B0001 << 80) | n),
    }


@given(internal_v4)
def test_ipv6_forms_of_an_internal_ipv4_address_are_refused(v4: ipaddress.IPv4Address) -> None:
    for form, v6 in _forms(v4).items():
        if form == "IPv4-compatible" and int(v4) <= 1:
            continue  # ::, ::1: IPv6's own unspecified and loopback (refused, as themselves)
        why = refusal(v6)
        assert why is not None, (form, v6)
        assert str(v4) in why or int(v4) <= 1, (form, v6, why)


@given(public_v4)
def test_ipv6_forms_of_a_public_ipv4_address_are_judged_by_it(v4: ipaddress.IPv4Address) -> None:
    forms = _forms(v4)
    for form in ("IPv4-mapped", "IPv4-compatible", "6to4", "NAT64"):
        assert refusal(forms[form]) is None, (form, forms[form])
    assert refusal(forms["NAT64 local"]) is not None  # 64:ff9b:1::/48 is local use only


@given(internal_v4)
def test_the_allowlist_admits_the_mapped_form_of_an_admitted_ipv4_network(v4: ipaddress.IPv4Address) -> None:
    allow = WebhookAllow.parse(f"{v4}/32")
    mapped = ipaddress.IPv6Address((0xFFFF << 32) | int(v4))
    assert allow.admits_address(v4) and allow.admits_address(mapped)
    assert not PUBLIC_ONLY.admits_address(v4) and not PUBLIC_ONLY.admits_address(mapped)


# ---------------------------------------------------------------------------- the allowlist


def test_allowlist_parses_cidrs_addresses_and_host_names() -> None:
    allow = WebhookAllow.parse(" 10.0.0.0/8, 192.168.7.7 ,fd00::/8, hooks.internal, .corp.example ,")
    assert allow.admits_address(ipaddress.ip_address("10.9.9.9"))
    assert allow.admits_address(ipaddress.ip_address("192.168.7.7"))
    assert not allow.admits_address(ipaddress.ip_address("192.168.7.8"))
    assert allow.admits_address(ipaddress.ip_address("fd00::5"))
    assert allow.admits_host("hooks.internal") and allow.admits_host("HOOKS.internal.")
    assert allow.admits_host("a.b.corp.example") and not allow.admits_host("corp.example.evil")
    assert not allow.admits_host("other.internal")


@pytest.mark.parametrize("bad", ["not a host!", "10.0.0.0/33", "-bad-.example", "a..b"])
def test_a_bad_allowlist_entry_is_refused_at_start(bad: str) -> None:
    with pytest.raises(SettingsError, match="WALINK_WEBHOOK_ALLOW"):
        Settings.from_env({"WALINK_WEBHOOK_ALLOW": bad})


def test_the_allowlist_is_empty_by_default() -> None:
    assert Settings().webhook_allow == ""
    assert WebhookAllow.parse(Settings().webhook_allow) == PUBLIC_ONLY


# ---------------------------------------------------------------------------- when a URL is set


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:3001/v1/sessions", "127.0.0.1 is loopback"),
        ("http://[::1]/hook", "::1 is loopback"),
        ("http://[::ffff:127.0.0.1]/hook", "loopback (IPv4-mapped 127.0.0.1)"),
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254 is link-local"),
        ("http://10.0.0.5/hook", "10.0.0.5 is private"),
        ("http://2130706433/hook", "127.0.0.1 is loopback"),  # 127.0.0.1 as one number
        ("http://0x7f.1/hook", "127.0.0.1 is loopback"),
        ("http://localhost:8080/hook", "localhost is an internal name"),
        ("http://api.localhost/hook", "internal name"),
        ("http://metadata.google.internal/x", "internal name"),
        ("http://walink-worker-0/hook", "single-label name"),
        ("ftp://example.com/hook", "http(s)"),
        ("http:///hook", "no host"),
        ("http://exa mple.com/hook", "control characters"),
        ("http://example.com/\x00hook", "control characters"),
        ("http://example.com:99999/hook", "not a valid URL"),
    ],
)
def test_setting_an_internal_url_is_refused_with_why(url: str, why: str) -> None:
    with pytest.raises(WebhookUrlRefused) as info:
        check_url(url, PUBLIC_ONLY)
    assert why in info.value.message
    assert info.value.status == 400


@pytest.mark.parametrize(
    "url", ["https://hooks.example.com/walink", "http://93.184.216.34:8080/x", "https://[2606:4700::1111]/"]
)
def test_setting_a_public_url_passes(url: str) -> None:
    assert check_url(url, PUBLIC_ONLY) == url


def test_the_allowlist_admits_internal_urls_when_set() -> None:
    assert check_url("http://127.0.0.1:9000/hook", LOOPBACK_ALLOW)
    assert check_url("http://[::1]:9000/hook", LOOPBACK_ALLOW)
    assert check_url("http://hooks.internal/x", WebhookAllow.parse("hooks.internal"))
    with pytest.raises(WebhookUrlRefused):
        check_url("http://10.0.0.1/x", LOOPBACK_ALLOW)


# ---------------------------------------------------------------------------- at delivery


def resolver(*answers: list[str]) -> tuple[list[str], object]:
    """A resolver answering ``answers`` in turn (the last one from then on); records each lookup."""
    asked: list[str] = []

    async def resolve(host: str, port: int) -> list[IPAddress]:
        asked.append(host)
        answer = answers[min(len(asked), len(answers)) - 1]
        return [ipaddress.ip_address(a) for a in answer]

    return asked, resolve


async def test_a_name_resolving_to_loopback_is_refused_at_delivery() -> None:
    asked, resolve = resolver(["127.0.0.1"])
    with pytest.raises(DeliveryRefused) as info:
        await vet("http://evil.example.com/hook", PUBLIC_ONLY, resolve)  # type: ignore[arg-type]
    assert info.value.message == (
        "refused: 127.0.0.1 is loopback (not in WALINK_WEBHOOK_ALLOW); evil.example.com resolved to 127.0.0.1"
    )
    assert asked == ["evil.example.com"]


async def test_delivery_keeps_only_the_public_addresses_of_a_name() -> None:
    _asked, resolve = resolver(["10.0.0.1", "93.184.216.34", "::1", "2606:4700::1111"])
    destination = await vet("https://hooks.example.com:8443/x?y=1", PUBLIC_ONLY, resolve)  # type: ignore[arg-type]
    assert [str(a) for a in destination.addresses] == ["93.184.216.34", "2606:4700::1111"]
    assert destination.url_for(destination.addresses[1]) == "https://[2606:4700::1111]:8443/x?y=1"
    assert destination.host_header == "hooks.example.com:8443"


async def test_a_literal_address_is_judged_without_a_lookup() -> None:
    asked, resolve = resolver(["93.184.216.34"])
    with pytest.raises(DeliveryRefused, match=r"refused: 169\.254\.169\.254 is link-local"):
        await vet("http://169.254.169.254/latest", PUBLIC_ONLY, resolve)  # type: ignore[arg-type]
    assert asked == []


@given(st.text(max_size=200) | st.from_regex(r"https?://[^/]{0,40}(/.{0,20})?", fullmatch=True))
def test_checking_any_url_either_passes_or_says_why(url: str) -> None:
    try:
        assert check_url(url, PUBLIC_ONLY) == url
    except WebhookUrlRefused as exc:
        assert exc.message.startswith("webhook_url")

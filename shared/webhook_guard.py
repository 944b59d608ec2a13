"""Where webhooks may go: public addresses only, unless the operator's allowlist admits more.

Workers POST webhooks from inside the cluster, so a tenant's ``webhook_url`` must never reach
loopback, the workers' ports, the cloud metadata service or pod addresses. The rule, applied to
every address a delivery would connect to:

* refused: unspecified, loopback, private (RFC 1918, ULA ``fc00::/7``), link-local
  (``169.254/16``, ``fe80::/10``), multicast, CGNAT (``100.64/10``), site-local, reserved and any
  other address that is not globally routable;
* IPv6 forms that carry an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible
  ``::a.b.c.d``, 6to4 ``2002::/16``, NAT64 ``64:ff9b::/96`` and ``64:ff9b:1::/48``) are judged by
  the IPv4 address they carry (Python's ``is_global`` alone gets several of these wrong);
* admitted anyway: what ``WALINK_WEBHOOK_ALLOW`` names (comma-separated CIDRs, addresses or host
  names; ``.example.com`` admits every name under ``example.com``).

At delivery (:func:`vet`) the host is resolved once and the POST goes to a vetted address literal
(the ``Host`` header and TLS server name stay the URL's), so a second, different DNS answer
(rebinding) can never be what is connected to. When a URL is set (:func:`check_url`), what can be
known without DNS is checked at once — literal addresses and names that are internal by
construction — so a tenant hears why at once; the delivery-time check is the real guard.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from shared.errors import SettingsError, WalinkError, WebhookUrlRefused

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOW_SETTING = "WALINK_WEBHOOK_ALLOW"
RESOLVE_TIMEOUT_S = 5.0  # the longest a delivery waits for DNS

_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_RFC1918 = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_ULA = ipaddress.IPv6Network("fc00::/7")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_COMPAT = ipaddress.IPv6Network("::/96")
_SIXTOFOUR = ipaddress.IPv6Network("2002::/16")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
# names that only ever mean something inside a network (RFC 6761, RFC 8375, common private suffixes)
_INTERNAL_SUFFIXES = (".localhost", ".local", ".internal", ".localdomain", ".home.arpa", ".lan", ".intranet")
_HOST_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


class DeliveryRefused(WalinkError):
    """A webhook whose destination the SSRF rules refuse (recorded on the event, never retried)."""

    code = "webhook_refused"


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 address carries, and the form that carries it."""
    if ip in _MAPPED:
        return "IPv4-mapped", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _COMPAT and int(ip) > 1:  # not :: nor ::1, which are IPv6's own
        return "IPv4-compatible", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _SIXTOFOUR:
        return "6to4", ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF)
    if ip in _NAT64 or ip in _NAT64_LOCAL:
        return "NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _plain_refusal(ip: IPAddress) -> str | None:
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv4Address):
        if ip in _CGNAT:
            return "shared address space (CGNAT 100.64.0.0/10)"
        if any(ip in net for net in _RFC1918):
            return "private"
    else:
        if ip in _ULA:
            return "private (unique local)"
        if ip.is_site_local:
            return "site-local"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private or not ip.is_global:
        return "not globally routable"
    return None


def unwrap(ip: IPAddress) -> IPAddress:
    """The address that decides: the IPv4 address an IPv6 form carries, else ``ip`` itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ipaddress.IPv6Address(int(ip)))  # without a %zone
        if embedded is not None:
            return embedded[1]
    return ip


def refusal(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public destination (e.g. ``"loopback"``), or None when it is one."""
    if isinstance(ip, ipaddress.IPv6Address):
        bare = ipaddress.IPv6Address(int(ip))  # without a %zone
        embedded = _embedded_ipv4(bare)
        if embedded is not None:
            form, v4 = embedded
            inner = _plain_refusal(v4)
            if inner is not None:
                return f"{inner} ({form} {v4})"
            if form == "NAT64" and bare in _NAT64_LOCAL:
                return "not globally routable (local-use NAT64)"
            return None
        if ip.scope_id:
            return "link-local (scoped)"
        return _plain_refusal(bare)
    return _plain_refusal(ip)


def _normalise_host(host: str) -> str:
    return host.strip().rstrip(".").lower()


@dataclass(frozen=True, slots=True)
class WebhookAllow:
    """The operator's allowlist: networks (CIDRs, addresses) and host names (``.suffix`` for a zone)."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, raw: str) -> WebhookAllow:
        """``WALINK_WEBHOOK_ALLOW``: comma-separated CIDRs, addresses or host names; bad entries raise."""
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        for entry in (e.strip() for e in raw.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = _normalise_host(entry)
            labels = name.removeprefix(".").split(".")
            if not all(_HOST_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
                raise SettingsError(f"{ALLOW_SETTING}: {entry!r} is not a CIDR, an address or a host name")
            hosts.add(name)
        return cls(tuple(networks), frozenset(hosts))

    def admits_address(self, ip: IPAddress) -> bool:
        candidates = {ip, unwrap(ip)}
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            candidates.add(ipaddress.IPv6Address(int(ip)))
        return any(c.version == net.version and c in net for c in candidates for net in self.networks)

    def admits_host(self, host: str) -> bool:
        name = _normalise_host(host)
        return any(name == h or (h.startswith(".") and name.endswith(h)) for h in self.hosts)

    def __str__(self) -> str:
        return ",".join([*(str(n) for n in self.networks), *sorted(self.hosts)]) or "(empty)"


PUBLIC_ONLY = WebhookAllow()  # the default: public addresses only
LOOPBACK_ALLOW = WebhookAllow.parse("127.0.0.0/8,::1")  # what `make run` and the tests set, explicitly


def check_address(ip: IPAddress, allow: WebhookAllow) -> None:
    """Raise :class:`DeliveryRefused` (with why) unless ``ip`` is public or admitted by ``allow``."""
    reason = refusal(ip)
    if reason is not None and not allow.admits_address(ip):
        raise DeliveryRefused(f"refused: {ip} is {reason} (not in {ALLOW_SETTING})")


def _literal_address(host: str) -> IPAddress | None:
    """``host`` as an address: standard forms, and the legacy IPv4 forms (``2130706433``, ``0x7f.1``)."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    if re.fullmatch(r"[0-9a-fA-FxX.]+", host) and any(c.isdigit() for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _split(url: str) -> tuple[SplitResult, str]:
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise WebhookUrlRefused(f"webhook_url is not a valid URL: {exc}") from None
    if parts.scheme not in {"http", "https"}:
        raise WebhookUrlRefused("webhook_url must be an http(s) URL")
    if not host:
        raise WebhookUrlRefused("webhook_url has no host")
    return parts, host


def check_url(url: str, allow: WebhookAllow) -> str:
    """Check a ``webhook_url`` when it is set; returns it, or raises :class:`WebhookUrlRefused` with why.

    Only what DNS cannot change is judged here (literal addresses, names internal by construction);
    a name that resolves to an internal address is refused at delivery, where it is recorded.
    """
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise WebhookUrlRefused("webhook_url must not contain spaces or control characters")
    _, host = _split(url)
    if allow.admits_host(host):
        return url
    address = _literal_address(host)
    if address is not None:
        reason = refusal(address)
        if reason is not None and not allow.admits_address(address):
            raise WebhookUrlRefused(f"webhook_url refused: {address} is {reason} (not in {ALLOW_SETTING})")
        return url
    name = _normalise_host(host)
    if name == "localhost" or name.endswith(_INTERNAL_SUFFIXES):
        raise WebhookUrlRefused(f"webhook_url refused: {name} is an internal name (not in {ALLOW_SETTING})")
    if "." not in name:
        raise WebhookUrlRefused(
            f"webhook_url refused: {name} is a single-label name, resolved through the cluster's search"
            f" domains (not in {ALLOW_SETTING})"
        )
    return url


Resolve = Callable[[str, int], Awaitable[list[IPAddress]]]


async def resolve_system(host: str, port: int) -> list[IPAddress]:
    """The host's addresses from the system resolver (``getaddrinfo``), in its order, without repeats."""
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(
        loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP), RESOLVE_TIMEOUT_S
    )
    seen: dict[IPAddress, None] = {}
    for family, *_rest, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            seen.setdefault(ipaddress.ip_address(str(sockaddr[0])), None)
    return list(seen)


@dataclass(frozen=True, slots=True)
class Destination:
    """Where one delivery connects: vetted address literals, and the URL's own host for ``Host``/TLS."""

    url: str
    host: str
    port: int
    addresses: tuple[IPAddress, ...]

    def url_for(self, address: IPAddress) -> str:
        """The URL with its host replaced by ``address`` (so nothing resolves it again)."""
        parts = urlsplit(self.url)
        literal = f"[{address}]" if address.version == 6 else str(address)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = (userinfo + "@" if userinfo else "") + f"{literal}:{self.port}"
        return parts._replace(netloc=netloc).geturl()

    @property
    def host_header(self) -> str:
        default = 443 if urlsplit(self.url).scheme == "https" else 80
        name = f"[{self.host}]" if ":" in self.host else self.host
        return name if self.port == default else f"{name}:{self.port}"


async def vet(url: str, allow: WebhookAllow, resolve: Resolve = resolve_system) -> Destination:
    """Resolve ``url``'s host once and keep the addresses it may reach; raises :class:`DeliveryRefused`."""
    try:
        parts, host = _split(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except WebhookUrlRefused as exc:
        raise DeliveryRefused(f"refused: {exc.message}") from None
    literal = _literal_address(host)
    if literal is not None:
        check_address(literal, allow)
        return Destination(url, host, port, (literal,))
    try:
        addresses = await resolve(host, port)
    except (OSError, UnicodeError) as exc:  # an unknown name is the receiver's fault: retried
        raise OSError(f"cannot resolve {host}: {exc}") from exc
    if not addresses:
        raise OSError(f"cannot resolve {host}: no address")
    if allow.admits_host(host):
        return Destination(url, host, port, tuple(addresses))
    admitted: list[IPAddress] = []
    refusals: list[str] = []
    for address in addresses:
        try:
            check_address(address, allow)
        except DeliveryRefused as exc:
            refusals.append(exc.message)
        else:
            admitted.append(address)
    if not admitted:
        raise DeliveryRefused(f"{refusals[0]}; {host} resolved to {_listed(addresses)}")
    return Destination(url, host, port, tuple(admitted))


def _listed(addresses: Iterable[IPAddress]) -> str:
    return ", ".join(str(a) for a in addresses)

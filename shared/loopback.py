"""Is an address, a host name or a ``Host`` header this machine's own (loopback)?

Loopback is where development conveniences stay: the dev API key in the dashboard, a worker
without an internal token, unsigned heartbeats. Only literal loopback addresses (127.0.0.0/8,
``::1``, and ``::ffff:127.x.x.x``) and the name ``localhost`` count; nothing is resolved, so no
DNS answer can make a remote host look local.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost"})
# request headers that say a proxy stands between the client and us: the peer is then the proxy
PROXY_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP", "X-Forwarded-Host")


def is_loopback_host(host: str | None) -> bool:
    """A literal loopback address or ``localhost`` (case-insensitive; brackets of IPv6 allowed)."""
    if not host:
        return False
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host in LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def host_of_header(value: str | None) -> str | None:
    """The host part of a ``Host`` header (``name``, ``name:port``, ``[v6]`` or ``[v6]:port``)."""
    if not value:
        return None
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            return None
        return value[1:end]
    if value.count(":") > 1:  # a bare IPv6 address is not a valid Host header
        return None
    return value.split(":", 1)[0]


def is_loopback_url(url: str) -> bool:
    """An http(s) URL whose host is loopback (see :func:`is_loopback_host`)."""
    try:
        return is_loopback_host(urlsplit(url).hostname)
    except ValueError:
        return False

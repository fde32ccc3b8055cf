"""Which reverse proxies are believed, and what they tell us about the client's request.

Owns: the one notion of a trusted proxy (``TRUSTED_PROXIES``: addresses or CIDR networks):
the client address behind ``X-Forwarded-For`` and the public base URL behind
``X-Forwarded-Proto/Host/Prefix`` or ``Forwarded`` (RFC 7239). Headers from any other peer
are the client's to forge and are ignored.
Calls: nothing (the standard library).
Called by: ``hub.api.ratelimit`` (client IP of the per-IP limit), ``hub.api.app`` (the base
URL of each FHIR request), ``hub.api.auth_routes`` (SMART discovery's endpoints).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from starlette.types import Scope

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

FHIR_MOUNT = "/fhir"  # where hub.api.app mounts the FHIR API
# What may be echoed into links: a host name or [IPv6] literal with an optional port, and a
# path prefix of unreserved characters (anything else falls back to localhost / no prefix).
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_PREFIX = re.compile(r"[A-Za-z0-9._~/-]+")


def _headers(scope: Scope, name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in scope.get("headers", []) if key == name]


def _forwarded(scope: Scope) -> dict[str, str]:
    """The first element of RFC 7239 ``Forwarded`` (the hop nearest the client)."""
    values = _headers(scope, b"forwarded")
    if not values:
        return {}
    first = values[0].split(",")[0]
    pairs: dict[str, str] = {}
    for part in first.split(";"):
        name, _, value = part.strip().partition("=")
        if name and value:
            pairs[name.strip().lower()] = value.strip().strip('"')
    return pairs


class TrustedProxies:
    """The proxies whose forwarding headers are believed. Parsed at start-up, so a
    malformed setting fails then rather than on the first request."""

    def __init__(self, proxies: Iterable[str]) -> None:
        self.networks: tuple[Network, ...] = tuple(ipaddress.ip_network(p, strict=False) for p in proxies)

    def trusted(self, address: Address) -> bool:
        return any(address in network for network in self.networks)

    def peer_trusted(self, scope: Scope) -> bool:
        peer = (scope.get("client") or ("unknown", 0))[0]
        try:
            return self.trusted(ipaddress.ip_address(peer))
        except ValueError:
            return False

    def client_address(self, scope: Scope) -> Address | str:
        """The client: the TCP peer, or the first ``X-Forwarded-For`` hop our proxies did
        not vouch for. A peer that is no IP address (a test client) is returned as is."""
        peer = (scope.get("client") or ("unknown", 0))[0]
        try:
            address: Address = ipaddress.ip_address(peer)
        except ValueError:
            return str(peer)
        if self.trusted(address):
            # X-Forwarded-For lists client, proxy1, proxy2...; each proxy appends the peer it
            # saw. Walk from the right past our own proxies: the first hop they did not
            # vouch for is the client. Entries left of it are the client's to forge.
            hops = [
                part.strip() for value in _headers(scope, b"x-forwarded-for") for part in value.split(",")
            ]
            for hop in reversed(hops):
                try:
                    hop_address = ipaddress.ip_address(hop)
                except ValueError:
                    break  # garbage from a trusted proxy: stop at the last hop we could read
                address = hop_address
                if not self.trusted(address):
                    break
        return address

    def public_root(self, scope: Scope) -> str:
        """Scheme, host and path prefix where the client reached this server, without a
        trailing slash ("https://hub.example.vn/ehealth"): the request's own when the peer
        is not a trusted proxy, else what ``Forwarded`` or ``X-Forwarded-*`` report."""
        scheme = str(scope.get("scheme") or "http")
        host = next(iter(_headers(scope, b"host")), "")
        if not host:
            server = scope.get("server")
            host = f"{server[0]}:{server[1]}" if server else "localhost"
        prefix = str(scope.get("root_path") or "")
        if self.peer_trusted(scope):
            forwarded = _forwarded(scope)
            if forwarded:
                scheme = forwarded.get("proto", scheme)
                host = forwarded.get("host", host)
            else:
                proto = next(iter(_headers(scope, b"x-forwarded-proto")), "")
                fwd_host = next(iter(_headers(scope, b"x-forwarded-host")), "")
                scheme = proto.split(",")[0].strip() or scheme
                host = fwd_host.split(",")[0].strip() or host
            fwd_prefix = next(iter(_headers(scope, b"x-forwarded-prefix")), "")
            prefix = fwd_prefix.split(",")[0].strip() or prefix
        scheme = scheme.lower() if scheme.lower() in ("http", "https") else "http"
        if not _HOST.fullmatch(host):
            host = "localhost"  # not a host[:port]: never echo it into links
        prefix = "/" + prefix.strip("/") if _PREFIX.fullmatch(prefix.strip("/")) else ""
        return f"{scheme}://{host}{prefix}"

    def fhir_base(self, scope: Scope) -> str:
        """The FHIR base URL of the request (``public_root`` + ``/fhir``)."""
        return self.public_root(scope) + FHIR_MOUNT


class PublicBase:
    """The FHIR base URL of each request's links: ``BASE_URL`` when configured, else where
    the client connected (``TrustedProxies.fhir_base``)."""

    def __init__(self, configured: str | None, proxies: TrustedProxies) -> None:
        self.configured = configured.rstrip("/") if configured else None
        self.proxies = proxies

    def of(self, scope: Scope) -> str:
        return self.configured or self.proxies.fhir_base(scope)

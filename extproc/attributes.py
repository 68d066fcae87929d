"""One typed, immutable view of a request or connection.

Every engine reads only this. Each Envoy API (CheckRequest, ProcessingRequest,
access-log entries) has one adapter that builds it, so the engines never see a
protobuf and can be tested with plain values.

Absent attributes are empty: no peer certificate means `source_principals == ()`,
plaintext means `sni == ""`, no JWT means `jwt_payload is None`. Istio's matchers
never match an empty value, which is what makes `not*` fields true for absent
attributes.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

EMPTY_MAPPING: Mapping[str, Any] = {}

# The entries of each header name Envoy delivered more than once, in order (see HttpRequest.lines).
HeaderLines = Mapping[str, tuple[str, ...]]
NO_LINES: HeaderLines = MappingProxyType({})  # shared and immutable: the common case allocates nothing


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    path: str  # as Envoy forwards it (already normalised by the HCM), query included
    host: str  # the :authority header
    headers: Mapping[str, str]  # lower-case names; repeated headers joined with ","
    scheme: str = ""
    protocol: str = ""
    id: str = ""
    # Only the names that arrived as more than one entry (ext_proc, ext_authz with
    # encode_raw_headers), each with its entries in order; their `headers` value is the entries
    # joined with ",". Envoy's RBAC matches a header condition against each entry on its own,
    # so the header matchers read these first. Empty (the shared NO_LINES) when nothing
    # repeats, or when Envoy joined the entries before we saw them (ext_authz's string map).
    lines: HeaderLines = field(default_factory=lambda: NO_LINES)

    @property
    def url_path(self) -> str:
        """The path without query and fragment, as Envoy's `url_path` matcher sees it."""
        p = self.path
        for sep in "?#":
            i = p.find(sep)
            if i != -1:
                p = p[:i]
        return p


@dataclass(frozen=True, slots=True)
class Attributes:
    # The physical peer (Envoy RBAC `direct_remote_ip`).
    source_ip: IPAddress | None = None
    source_port: int = 0
    # The original client after x-forwarded-for processing (Envoy RBAC `remote_ip`).
    remote_ip: IPAddress | None = None
    destination_ip: IPAddress | None = None
    destination_port: int = 0
    # Identities from the peer certificate in the order Envoy's `authenticated`
    # matcher tries them: URI SANs, then DNS SANs, then the subject.
    source_principals: tuple[str, ...] = ()
    sni: str = ""
    http: HttpRequest | None = None
    # The verified JWT payload (claims), or None when the request carried no valid token.
    jwt_payload: Mapping[str, Any] | None = None
    # Envoy dynamic metadata by filter name, for `experimental.envoy.filters.*` conditions.
    filter_metadata: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: EMPTY_MAPPING)

    @property
    def is_http(self) -> bool:
        return self.http is not None

    @property
    def source_principal(self) -> str:
        return self.source_principals[0] if self.source_principals else ""


@functools.lru_cache(maxsize=8192)
def parse_ip(value: str) -> IPAddress | None:
    """An address, or None. Cached: `ipaddress` costs ~5 µs and peers repeat on every request."""
    if not value:
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def remote_ip_from_xff(xff: str | None, direct: IPAddress | None, trusted_hops: int = 0) -> IPAddress | None:
    """The client address Envoy's HCM derives from x-forwarded-for.

    The header seen by ext_authz already carries the peer Envoy appended when
    `use_remote_address` is true, so in both HCM modes the client is the entry
    `trusted_hops + 1` from the right. Too few entries, or an entry that is not an
    IP address, make Envoy fall back to the connection's peer; so do we.
    """
    if not xff:
        return direct
    s = xff
    for _ in range(trusted_hops):
        cut = s.rfind(",")
        if cut == -1:
            return direct
        s = s[:cut]
    cut = s.rfind(",")
    if cut != -1 and cut + 1 < len(s):
        s = s[cut + 1 :]
    s = s.strip(" \t")
    ip = parse_ip(s)
    return ip if ip is not None else direct


def split_host_port(value: str) -> tuple[str, int] | None:
    """ "10.0.0.1:8080" or "[::1]:8080" -> (ip, port). Envoy's CEL prints addresses this way."""
    if value.startswith("["):
        end = value.find("]")
        if end == -1 or value[end + 1 : end + 2] != ":":
            return None
        host, port = value[1:end], value[end + 2 :]
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            return None
    if not port.isdigit() or not host:
        return None
    return host, int(port)

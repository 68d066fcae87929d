"""Build Attributes from an ext_authz CheckRequest (HTTP or network filter).

What Envoy 1.40 actually sends, checked against a live Envoy:
  * `source.address` is the physical peer even when x-forwarded-for is present; the
    HCM's client address is not in the request, so we derive it from the header the
    same way the HCM does (`remote_ip_from_xff`).
  * `source.principal` is the first URI SAN, else the first DNS SAN, else the
    subject. Envoy's RBAC `authenticated` matcher tries every URI SAN and DNS SAN,
    so when the filter sets `include_peer_certificate` we read all of them.
  * repeated request headers arrive joined with "," (`a=1,b=2` even for HTTP/1 cookie
    lines); with `encode_raw_headers` they arrive one by one in `header_map`, as Envoy's
    header map holds them, and the header matchers test each entry as Envoy's RBAC does
    (see extproc/services/headers.py). Only then can extproc tell `x: a` + `x: b` from
    `x: a,b`.
  * `tls_session` is present (empty) on plaintext connections when
    `include_tls_session` is set; only its `sni` means anything.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from envoy.service.auth.v3 import external_auth_pb2

from extproc.attributes import (
    NO_LINES,
    Attributes,
    HeaderLines,
    HttpRequest,
    IPAddress,
    parse_ip,
    remote_ip_from_xff,
)
from extproc.lru import CacheCounters, LruCache
from extproc.path_normalization import DEFAULT_MODE, Mode, normalize
from extproc.services.headers import (
    DEFAULT_MAX_HEADER_BYTES,
    MAX_HEADERS,
    MalformedRequest,
    check_size,
    decode_header_map,
)
from extproc.services.protoconv import struct_to_dict

JWT_AUTHN_FILTER = "envoy.filters.http.jwt_authn"

log = logging.getLogger(__name__)

PATH_MEMO_SIZE = 4096
PATH_MEMO_MAX_LENGTH = 256
_SAME = "\x00same"  # never a path: a NUL makes a path invalid

__all__ = [
    "JWT_AUTHN_FILTER",
    "CheckAdapter",
    "MalformedRequest",
    "PeerCertificateCache",
    "forwarded_check_request",
    "http_headers",
    "http_request",
]

# CheckRequest.http fields that Envoy also sends as pseudo-headers.
_HEADER_FIELDS = {":method": "method", ":path": "path", ":authority": "host", ":scheme": "scheme"}


class PeerCertificateCache:
    """Parsed identities of peer certificates, keyed by the PEM Envoy sends.

    A mesh has few distinct client certificates and each connection sends the same
    one on every request, so a small LRU turns a ~50 µs parse into a dict hit.
    """

    def __init__(self, capacity: int = 1024) -> None:
        self.counters = CacheCounters("peer_certificate")
        self._items: LruCache[str, tuple[str, ...]] = LruCache(capacity, self.counters)

    def principals(self, encoded_pem: str) -> tuple[str, ...]:
        """The identities of a certificate as ext_authz sends it (URL-encoded PEM)."""
        return self._items.get_or_make(encoded_pem, _principals_from_encoded)

    def principals_of_pem(self, pem: str) -> tuple[str, ...]:
        """The same for a PEM that is not URL-encoded (ext_proc's `connection.peer_certificate`)."""
        return self._items.get_or_make(pem, _principals_from_pem)


def _principals_from_encoded(encoded_pem: str) -> tuple[str, ...]:
    return _principals_from_pem(unquote(encoded_pem))


def _principals_from_pem(pem: str) -> tuple[str, ...]:
    # Imported on the first certificate: a server that never sees one never loads cryptography.
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError as e:
        raise MalformedRequest("bad-peer-certificate", str(e)) from None
    out: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        out.extend(san.get_values_for_type(x509.UniformResourceIdentifier))
        out.extend(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    subject = cert.subject.rfc4514_string()
    out.append(subject)
    return tuple(out)


class CheckAdapter:
    def __init__(
        self,
        *,
        xff_num_trusted_hops: int = 0,
        jwt_payload_key: str = "payload",
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_headers: int = MAX_HEADERS,
        cert_cache: PeerCertificateCache | None = None,
        path_normalization: Mode = DEFAULT_MODE,
    ) -> None:
        self.xff_num_trusted_hops = xff_num_trusted_hops
        self.path_normalization = path_normalization
        # Requests whose path was not what an Envoy normalizing as `path_normalization` would
        # have sent: the Envoy in front is configured with less normalization (or none).
        self.unnormalized_paths = 0
        # Recent paths and what policies match for them (_SAME: the path itself): most requests
        # repeat a path, and a dict hit costs less than the canonicalizer's scan.
        self._paths: dict[str, str] = {}
        self.jwt_payload_key = jwt_payload_key
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.cert_cache = cert_cache or PeerCertificateCache()

    def is_http(self, req: external_auth_pb2.CheckRequest) -> bool:
        http: bool = req.attributes.HasField("request")
        return http

    def policy_path(self, path: str) -> str:
        """The path policies match: `path` normalized as --path-normalization says (see
        extproc/path_normalization.py), so a DENY holds behind an Envoy that does not normalize.
        Counts and reports (once) a path Envoy should already have normalized; raises
        MalformedRequest for a path Envoy would have rejected."""
        got = self._paths.get(path)
        if got is None:
            mode = self.path_normalization
            got = path if mode is Mode.NONE else normalize(path, mode)
            if got is None:
                raise MalformedRequest("invalid-path", "the path holds a NUL (raw or %00), which Envoy rejects")
            paths = self._paths
            if len(paths) >= PATH_MEMO_SIZE:
                paths.clear()
            if got == path:
                got = _SAME
            if len(path) <= PATH_MEMO_MAX_LENGTH:  # bounded in bytes too, whatever clients send
                paths[path] = got
        if got is _SAME:
            return path
        self.unnormalized_paths += 1
        if self.unnormalized_paths == 1:
            log.warning(
                "a request arrived with the path %r, which an Envoy normalizing paths as --path-normalization "
                "%s would have sent as %r: policies match the normalized path, but the upstream may receive the "
                "raw one. Set the HTTP connection manager's normalization as Istio does (see README, Path "
                "normalization); further such requests are counted in extproc_unnormalized_paths_total",
                path[:200],
                self.path_normalization.value,
                got[:200],
            )
        return got

    def attributes(
        self,
        req: external_auth_pb2.CheckRequest,
        headers: Mapping[str, str] | None = None,
        lines: HeaderLines = NO_LINES,
        path: str | None = None,
    ) -> Attributes:
        """The request's Attributes; `headers` and `lines`, when given, are its already decoded
        and checked headers (from `http_headers`), and `path` its `policy_path`, so none is
        worked out twice."""
        a = req.attributes
        src = a.source
        dst = a.destination
        if not src.address.HasField("socket_address") or not dst.address.HasField("socket_address"):
            raise MalformedRequest("missing-address", "source and destination socket addresses are required")
        if src.certificate:
            principals = self.cert_cache.principals(src.certificate)
        elif src.principal:
            principals = (src.principal,)
        else:
            principals = ()
        filter_metadata: dict[str, Any] = {}
        if a.HasField("metadata_context"):
            for name, struct in a.metadata_context.filter_metadata.items():
                filter_metadata[name] = struct_to_dict(struct)
        http = None
        if a.HasField("request"):
            h = a.request.http
            if headers is not None:
                checked = dict(headers)
            else:
                checked, lines = http_headers(h, self.max_headers, self.max_header_bytes)
            if path is None:
                path = self.policy_path(h.path)
            http = http_request(checked, h.method, path, h.host, h.scheme, h.protocol, h.id, lines)
        return self.build(
            source=src.address.socket_address.address,
            source_port=src.address.socket_address.port_value,
            destination=dst.address.socket_address.address,
            destination_port=dst.address.socket_address.port_value,
            principals=principals,
            sni=a.tls_session.sni,
            http=http,
            filter_metadata=filter_metadata,
        )

    def build(
        self,
        *,
        source: str,
        source_port: int,
        destination: str,
        destination_port: int,
        principals: tuple[str, ...],
        sni: str,
        http: HttpRequest | None,
        filter_metadata: dict[str, Any],
    ) -> Attributes:
        """Attributes from the values any transport delivers; what both ext_authz and ext_proc
        requests become, so the engines see the same thing for the same request."""
        source_ip = parse_ip(source)
        destination_ip = parse_ip(destination)
        if source_ip is None or destination_ip is None:
            raise MalformedRequest("bad-address", "source or destination is not an IP address")
        jwt_ns = filter_metadata.get(JWT_AUTHN_FILTER)
        payload = jwt_ns.get(self.jwt_payload_key) if jwt_ns else None
        if payload is not None and not isinstance(payload, dict):
            payload = None
        remote_ip: IPAddress | None = source_ip
        if http is not None:
            remote_ip = remote_ip_from_xff(http.headers.get("x-forwarded-for"), source_ip, self.xff_num_trusted_hops)
        return Attributes(
            source_ip=source_ip,
            source_port=source_port,
            remote_ip=remote_ip,
            destination_ip=destination_ip,
            destination_port=destination_port,
            source_principals=principals,
            sni=sni,
            http=http,
            jwt_payload=payload,
            filter_metadata=filter_metadata,
        )


def http_request(
    headers: dict[str, str],
    method: str,
    path: str,
    host: str,
    scheme: str = "",
    protocol: str = "",
    id: str = "",
    lines: HeaderLines = NO_LINES,
) -> HttpRequest:
    """The HTTP part of Attributes. `method`, `path` and `host` are what the transport names
    apart from the headers (ext_authz's fields), if anything; the pseudo-headers stand in."""
    method = method or headers.get(":method", "")
    path = path or headers.get(":path", "")
    host = host or headers.get(":authority", "")
    if not method:
        raise MalformedRequest("missing-method", "the HTTP request has no method")
    if not path and method != "CONNECT":
        raise MalformedRequest("missing-path", "the HTTP request has no path")
    # Matchers read pseudo-headers from the map, as Envoy's RBAC does from its header map (where
    # :path is the normalized path, as `path` is).
    headers.setdefault(":method", method)
    if path:
        headers[":path"] = path
    if host:
        headers.setdefault(":authority", host)
    return HttpRequest(
        method=method, path=path, host=host, headers=headers, scheme=scheme, protocol=protocol, id=id, lines=lines
    )


def http_headers(
    h: external_auth_pb2.AttributeContext.HttpRequest,
    max_headers: int = MAX_HEADERS,
    max_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> tuple[dict[str, str], HeaderLines]:
    """A CheckRequest's request headers, lower-case names, from whichever shape Envoy used, and
    the entries of repeated names when Envoy sent them apart (`encode_raw_headers`; the string
    map has them joined already); raises MalformedRequest for too many, too large or
    undecodable headers."""
    lines = NO_LINES
    if h.HasField("header_map") and len(h.header_map.headers) > 0:
        headers, lines = decode_header_map(h.header_map, max_headers)
    else:
        if len(h.headers) > max_headers:
            raise MalformedRequest("too-many-headers", f"{len(h.headers)} headers")
        headers = {k.lower(): v for k, v in h.headers.items()}
    check_size(headers, max_bytes)
    return headers, lines


def forwarded_check_request(
    headers: Mapping[str, str],
    *,
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    principal: str = "",
    certificate: str = "",
    sni: str = "",
    protocol: str = "",
    request_id: str = "",
    body: bytes = b"",
    metadata_context: Any = None,
) -> external_auth_pb2.CheckRequest:
    """The CheckRequest Envoy's gRPC ext_authz filter would send, for a CUSTOM gRPC provider
    asked on behalf of a transport that received something else (ext_proc, HTTP checks).
    `headers` hold the pseudo-headers; `certificate` is URL-encoded PEM, as Envoy sends it."""
    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    for hp, side in ((source, a.source), (destination, a.destination)):
        if hp is not None:
            side.address.socket_address.address, side.address.socket_address.port_value = hp
    if certificate:
        a.source.certificate = certificate
    else:
        a.source.principal = principal
    if sni:
        a.tls_session.sni = sni
    http = a.request.http
    for name, value in headers.items():
        field = _HEADER_FIELDS.get(name)
        if field is not None:
            setattr(http, field, value)
    http.headers.update(headers)
    http.protocol = protocol
    http.id = request_id
    if body:
        try:
            http.body = body.decode()
        except UnicodeDecodeError:
            http.raw_body = body  # what Envoy sends with `pack_as_bytes`
        http.size = len(body)
    if metadata_context is not None:
        a.metadata_context.CopyFrom(metadata_context)
    return req

"""Envoy's HTTP authorization check (ext_authz `http_service`) as the pipeline's input.

Over `http_service` Envoy sends the client's request line (method, and the original `:path`
with its query) and its `Host`, the request headers the filter allows (envoy/authz-http.yaml
allows all of them, with `encode_raw_headers` so repeated names arrive line by line, as the
header matchers need), plus three headers of its own (`content-length`, `x-envoy-internal`,
`x-envoy-expected-rq-timeout-ms`). What the gRPC CheckRequest carries about the connection
comes in one header the Envoy config writes with substitution formatters
(../shared/reference/http-ext-authz.md, Q2):

    x-extproc-connection: %DOWNSTREAM_DIRECT_REMOTE_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS%
                          %REQUESTED_SERVER_NAME% %DOWNSTREAM_PEER_URI_SAN%
                          %DOWNSTREAM_PEER_DNS_SAN% %DOWNSTREAM_PEER_SUBJECT%

Six fields, separated by single spaces: the physical peer and our address (ip:port), the
SNI, the peer certificate's URI SANs and DNS SANs (each list joined with ","), and its
subject (the rest of the line: a subject may hold spaces). An absent value is an empty
field. None of the first five can hold a space, so the split is exact.

Why one header, and why it can be trusted: `headers_to_add` overwrites a header the client
sent under the same name, but only when the formatted value is not empty; a header holding
only `%DOWNSTREAM_PEER_URI_SAN%` is not set on a plaintext connection, and a client's own
survives (checked against Envoy 1.40: the reference's "spoofing hole"). The peer address is
never empty, so this header is always written by Envoy and no client value reaches us
whatever the connection. The shipped configs also drop every client header named
`x-extproc-*` (`disallowed_headers`) so nothing of the sort reaches us either way.

Envoy's dynamic metadata, which a gRPC check carries for `metadata_context_namespaces`
(jwt_authn's verified claims for `requestPrincipals`, a filter's namespace for
`experimental.envoy.filters.*` conditions), comes one namespace per header:

    x-extproc-md-<namespace>: =%DYNAMIC_METADATA(<namespace>)%

the namespace as JSON after a "=", which keeps the value from ever being empty (an absent
namespace formats as nothing), so Envoy always overwrites a client's header of that name;
a value without the "=" did not come from that formatter and the check is malformed.

Attributes are built as the gRPC adapter builds them, through `CheckAdapter.build`, from a
header map shaped like the CheckRequest's: pseudo-headers `:method`, `:path`, `:authority`
(and `:scheme` from `x-forwarded-proto`), without `host`, Envoy's three headers and ours.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2

from extproc.attributes import NO_LINES, Attributes, HeaderLines, split_host_port
from extproc.decision.cache import KeyPlan, repeated_key_part
from extproc.services.check_adapter import CheckAdapter, forwarded_check_request, http_request
from extproc.services.headers import MalformedRequest, check_size

CONNECTION_HEADER = "x-extproc-connection"
DIRECTION_HEADER = "x-extproc-direction"
OUR_PREFIX = "x-extproc-"
METADATA_PREFIX = "x-extproc-md-"
# Envoy's HTTP ext_authz client adds these to every check itself; they are not the client's.
ENVOY_ADDED = frozenset({"content-length", "x-envoy-internal", "x-envoy-expected-rq-timeout-ms", "host"})
# Names whose value in the policies' header map is not the check's header of that name.
_RESHAPED = ENVOY_ADDED | {":method", ":path", ":authority", ":scheme"}
MEMO_SIZE = 4096  # connection and metadata values kept parsed


def _clients(items: Mapping[str, Any]) -> dict[str, Any]:
    """`items` without Envoy's own headers and ours: what the client sent."""
    return {k: v for k, v in items.items() if k not in ENVOY_ADDED and not k.startswith(OUR_PREFIX)}


__all__ = [
    "CONNECTION_HEADER",
    "DIRECTION_HEADER",
    "METADATA_PREFIX",
    "Connection",
    "HttpCheckAdapter",
    "parse_connection",
]


@dataclass(frozen=True, slots=True)
class Connection:
    """The connection facts of one `x-extproc-connection` value."""

    peer: str
    peer_port: int
    local: str
    local_port: int
    sni: str
    principals: tuple[str, ...]  # URI SANs, then DNS SANs, then the subject (Envoy's `authenticated` order)
    uri_sans: str  # as Envoy wrote them, for the CheckRequest a CUSTOM provider gets
    key: tuple[object, ...]  # what a decision can depend on: everything but the peer's port


def parse_connection(value: str) -> Connection:
    """The facts of an `x-extproc-connection` value; MalformedRequest if it is not one."""
    parts = value.split(" ", 5)
    if len(parts) != 6:
        raise MalformedRequest("bad-connection-header", f"{CONNECTION_HEADER} has {len(parts)} of 6 fields")
    peer_text, local_text, sni, uri, dns, subject = parts
    peer = split_host_port(peer_text)
    local = split_host_port(local_text)
    if peer is None or local is None:
        raise MalformedRequest("bad-connection-header", f"{CONNECTION_HEADER} holds no peer and local address")
    principals = (*filter(None, uri.split(",")), *filter(None, dns.split(",")), *filter(None, (subject,)))
    return Connection(
        peer=peer[0],
        peer_port=peer[1],
        local=local[0],
        local_port=local[1],
        sni=sni,
        principals=principals,
        uri_sans=uri,
        key=(peer[0], local_text, sni, uri, dns, subject),
    )


class HttpCheckAdapter:
    """Decision keys, Attributes and CUSTOM CheckRequests from HTTP checks, through the one
    CheckAdapter every transport shares (path normalization, limits, Attributes)."""

    def __init__(self, adapter: CheckAdapter) -> None:
        self.adapter = adapter
        # A connection sends the same value with every request: parsed once.
        self._connections: dict[str, Connection] = {}
        # Metadata values repeat too (a token's claims): parsed once.
        self._metadata: dict[str, dict[str, Any]] = {}
        self._direct_names: dict[int, tuple[KeyPlan, tuple[str, ...]]] = {}

    def connection(self, headers: Mapping[str, str]) -> Connection:
        value = headers.get(CONNECTION_HEADER)
        if value is None:
            raise MalformedRequest(
                "missing-connection-header",
                f"no {CONNECTION_HEADER} header: the ext_authz http_service must set it (see envoy/authz-http.yaml)",
            )
        got = self._connections.get(value)
        if got is None:
            got = parse_connection(value)
            if len(self._connections) >= MEMO_SIZE:
                self._connections.clear()  # bounded; the connections of the moment fill it again
            self._connections[value] = got
        return got

    def decision_key(
        self,
        plan: KeyPlan,
        method: str,
        path: str,
        headers: Mapping[str, str],
        lines: HeaderLines,
        conn: Connection,
    ) -> tuple[object, ...]:
        """What the decision can depend on (see extproc/decision/cache.py): the method, the path
        policies match, the host and scheme, the connection without the peer's port, and the
        other headers the plan names."""
        get = headers.get
        key: tuple[object, ...] = ("ext_authz_http", method, path, get("host"), get("x-forwarded-proto"))
        key += conn.key
        if plan.metadata:
            key += tuple(sorted((k, v) for k, v in headers.items() if k.startswith(METADATA_PREFIX)))
        key += tuple([get(name) for name in self._direct(plan)])
        if lines:
            lines = _clients(lines)
            if lines:
                key += repeated_key_part(plan, lines)
        return key

    def _direct(self, plan: KeyPlan) -> tuple[str, ...]:
        """The plan's headers whose policy value is the check's header of that name (cached per
        plan): the pseudo-headers' values are in every key already (method, the path policies
        match, host, x-forwarded-proto), and Envoy's headers and ours are never a policy's."""
        got = self._direct_names.get(id(plan))
        if got is None or got[0] is not plan:
            if len(self._direct_names) >= 64:
                self._direct_names.clear()
            names = tuple(n for n in plan.headers if n not in _RESHAPED and not n.startswith(OUR_PREFIX))
            got = self._direct_names[id(plan)] = (plan, names)
        return got[1]

    def filter_metadata(self, headers: Mapping[str, str]) -> dict[str, Any]:
        """Envoy's dynamic metadata by namespace, from the x-extproc-md-* headers."""
        out: dict[str, Any] = {}
        for name, value in headers.items():
            if not name.startswith(METADATA_PREFIX):
                continue
            if not value.startswith("="):
                raise MalformedRequest(
                    "bad-metadata-header", f"{name} must be '=%DYNAMIC_METADATA(...)%' (see envoy/authz-http.yaml)"
                )
            if len(value) == 1:
                continue  # the namespace is absent for this request
            got = self._metadata.get(value)
            if got is None:
                try:
                    got = json.loads(value[1:])
                except ValueError:
                    raise MalformedRequest("bad-metadata-header", f"{name} is not JSON") from None
                if not isinstance(got, dict):
                    raise MalformedRequest("bad-metadata-header", f"{name} is not a JSON object")
                if len(self._metadata) >= MEMO_SIZE:
                    self._metadata.clear()
                self._metadata[value] = got
            out[name[len(METADATA_PREFIX) :]] = got
        return out

    @staticmethod
    def policy_headers(method: str, target: str, headers: Mapping[str, str]) -> dict[str, str]:
        """The header map a gRPC CheckRequest would carry for this request."""
        out = _clients(headers)
        out[":method"] = method
        out[":path"] = target
        host = headers.get("host")
        if host is not None:
            out[":authority"] = host
        scheme = headers.get("x-forwarded-proto")
        if scheme:
            out[":scheme"] = scheme
        return out

    def attributes(
        self,
        method: str,
        target: str,
        path: str,
        headers: Mapping[str, str],
        lines: HeaderLines,
        conn: Connection,
    ) -> Attributes:
        """The request's Attributes; `path` is `target` as policies match it (`policy_path`)."""
        adapter = self.adapter
        seen = self.policy_headers(method, target, headers)
        if len(seen) > adapter.max_headers:
            raise MalformedRequest("too-many-headers", f"{len(seen)} headers")
        check_size(seen, adapter.max_header_bytes)
        if lines:
            lines = _clients(lines) or NO_LINES
        http = http_request(
            seen,
            method,
            path,
            headers.get("host", ""),
            seen.get(":scheme", ""),
            "",
            headers.get("x-request-id", ""),
            lines,
        )
        return adapter.build(
            source=conn.peer,
            source_port=conn.peer_port,
            destination=conn.local,
            destination_port=conn.local_port,
            principals=conn.principals,
            sni=conn.sni,
            http=http,
            filter_metadata=self.filter_metadata(headers),
        )

    @staticmethod
    def check_request(attrs: Attributes, conn: Connection, body: bytes) -> external_auth_pb2.CheckRequest:
        """The CheckRequest Envoy's gRPC ext_authz filter would send, for a CUSTOM gRPC provider."""
        http = attrs.http
        assert http is not None
        principal = conn.uri_sans.split(",", 1)[0] if conn.uri_sans else (conn.principals[0] if conn.principals else "")
        return forwarded_check_request(
            http.headers,
            source=(conn.peer, conn.peer_port),
            destination=(conn.local, conn.local_port),
            principal=principal,
            sni=conn.sni,
            request_id=http.id,
            body=body,
            metadata_context=_metadata_proto(attrs.filter_metadata) if attrs.filter_metadata else None,
        )


def _metadata_proto(metadata: Mapping[str, Any]) -> base_pb2.Metadata:
    md = base_pb2.Metadata()
    for namespace, fields in metadata.items():
        md.filter_metadata[namespace].update(fields)
    return md

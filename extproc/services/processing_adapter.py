"""ext_proc's request-headers message as the pipeline's input: Attributes and a decision key.

In the `extproc` mode the ext_proc filter's request-headers message is read into the same
Attributes the ext_authz adapter builds for the same request (`attributes`, through the one
`CheckAdapter.build`), and keyed for the decision cache the same way (`decision_key`), so JWT
verification, AuthorizationPolicy and the decision metadata behave the same in both modes and
are tested once. The CheckRequest Envoy's ext_authz filter would have sent (`check_request`)
is built only when a CUSTOM provider must receive one.

What ext_proc does not send by default must be asked for with the filter's
`request_attributes` (see envoy/extproc.yaml), or policies on peers cannot be evaluated:

    source.address, destination.address          "ip:port" of the downstream connection
    filter_state["extproc.peer_address"]          the physical peer (see below)
    connection.peer_certificate                   the client certificate, PEM (all SANs)
    connection.uri_san_peer_certificate           fallback when the PEM is not sent
    connection.requested_server_name              SNI

`source.address` is the stream's remote address: when the HCM trusts x-forwarded-for it is
the header's last entry (port 0), not the peer. ext_authz sends the peer, and `ipBlocks`
(Envoy RBAC's `direct_remote_ip`) needs it, so envoy/extproc.yaml records
%DOWNSTREAM_DIRECT_REMOTE_ADDRESS% in filter state with the set_filter_state filter and asks
for it as an attribute. Filter state cannot be set by a client, so it is safe to trust.
Without it `source.address` is all there is, and any client can choose it through
x-forwarded-for: a request is then denied as malformed (`missing-peer-address`) while a
policy reads `ipBlocks` or `source.ip`, and decided with `source.address` standing in
otherwise; either way it is counted in `extproc_misconfigured_requests_total` and the log
says once what to add (ExternalProcessorService._without_peer_address).

A request without addresses is denied as malformed, the same as a CheckRequest without
them: the server fails closed rather than evaluating `ipBlocks` against nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2

from extproc.attributes import NO_LINES, Attributes, HeaderLines, split_host_port
from extproc.decision.cache import KeyPlan, repeated_key_part
from extproc.services.check_adapter import CheckAdapter, forwarded_check_request, http_request
from extproc.services.headers import MalformedRequest
from extproc.services.protoconv import struct_to_dict

EXT_PROC_ATTRIBUTES = "envoy.filters.http.ext_proc"
# The physical peer, recorded by set_filter_state before ext_proc (see the module docstring).
PEER_ADDRESS_STATE = "extproc.peer_address"
PEER_ADDRESS_ATTRIBUTE = f'filter_state["{PEER_ADDRESS_STATE}"]'
# The kind counted (extproc_misconfigured_requests) for a request without it, and the kind of
# its denial when the policies read the peer (extproc_malformed_requests).
MISSING_PEER_ADDRESS = "missing-peer-address"
# The namespace our decision metadata is written to; the filter must list it in
# metadata_options.receiving_namespaces.untyped for Envoy to keep it.
METADATA_NAMESPACE = "extproc"


# The attributes read per request (see the module docstring and envoy/extproc.yaml).
SOURCE_ADDRESS = "source.address"
DESTINATION_ADDRESS = "destination.address"
PEER_CERTIFICATE = "connection.peer_certificate"
PEER_URI_SAN = "connection.uri_san_peer_certificate"
LOCAL_URI_SAN = "connection.uri_san_local_certificate"
SNI = "connection.requested_server_name"
PROTOCOL = "request.protocol"
# Response attributes of an outbound ext_proc filter: the upstream connection and its cluster,
# what the client side's labels need (no attribute of the request carries them).
UPSTREAM_PEER_URI_SAN = "upstream.uri_san_peer_certificate"
UPSTREAM_LOCAL_URI_SAN = "upstream.uri_san_local_certificate"
UPSTREAM_ADDRESS = "upstream.address"
CLUSTER_NAME = "xds.cluster_name"
# istio.services[0] of the cluster's metadata, field by field: CEL cannot turn a map into a
# string here, and the whole metadata arrives only as protobuf text.
_SERVICE0 = 'xds.cluster_metadata.filter_metadata["istio"]["services"][0]'
SERVICE_HOST = _SERVICE0 + '["host"]'
SERVICE_NAME = _SERVICE0 + '["name"]'
SERVICE_NAMESPACE = _SERVICE0 + '["namespace"]'
OUTBOUND_RESPONSE_ATTRIBUTES = (
    UPSTREAM_PEER_URI_SAN,
    UPSTREAM_LOCAL_URI_SAN,
    UPSTREAM_ADDRESS,
    CLUSTER_NAME,
    SERVICE_HOST,
    SERVICE_NAME,
    SERVICE_NAMESPACE,
)
REQUEST_ID = "request.id"


class AttributeCache:
    """`attribute_strings` by the attributes' encoded bytes, bounded.

    A connection sends the same attributes with every request (its addresses, its client
    certificate), so reading them costs one encoding and a lookup instead of a walk over a
    Struct (measured 4.7 µs a message with the shipped request_attributes, against about 1).
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._entries: dict[bytes, dict[str, str]] = {}

    def get(self, req: ep.ProcessingRequest) -> dict[str, str]:
        s = req.attributes.get(EXT_PROC_ATTRIBUTES)
        if s is None:
            return {}
        raw = s.SerializeToString()
        got = self._entries.get(raw)
        if got is None:
            got = _strings(s)
            if len(self._entries) >= self.size:
                self._entries.clear()  # bounded; the connections of the moment fill it again
            self._entries[raw] = got
        return got


def attribute_strings(req: ep.ProcessingRequest) -> dict[str, str]:
    """The string and number attributes the filter sent with this message (CEL text -> value)."""
    s = req.attributes.get(EXT_PROC_ATTRIBUTES)
    return _strings(s) if s is not None else {}


def _strings(s: struct_pb2.Struct) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, v in s.fields.items():
        kind = v.WhichOneof("kind")
        if kind == "string_value":
            out[name] = v.string_value
        elif kind == "number_value":
            out[name] = str(int(v.number_value))
        elif kind == "bool_value":
            out[name] = "true" if v.bool_value else "false"
    return out


def attributes(
    adapter: CheckAdapter,
    headers: dict[str, str],
    attrs: Mapping[str, str],
    req: ep.ProcessingRequest | None = None,
    lines: HeaderLines = NO_LINES,
) -> Attributes:
    """The Attributes ext_authz's adapter gives for the same request (`headers` and `lines`
    decoded and checked by `headers.decode_header_map`: ext_proc always sends each entry of
    Envoy's header map apart); MalformedRequest when they cannot be built."""
    peer = split_host_port(attrs.get(PEER_ADDRESS_ATTRIBUTE) or attrs.get(SOURCE_ADDRESS, ""))
    local = split_host_port(attrs.get(DESTINATION_ADDRESS, ""))
    if peer is None or local is None:
        raise MalformedRequest("missing-address", "source and destination socket addresses are required")
    pem = attrs.get(PEER_CERTIFICATE, "")
    if pem:
        principals = adapter.cert_cache.principals_of_pem(pem)
    else:
        uri_san = attrs.get(PEER_URI_SAN, "")
        principals = (uri_san,) if uri_san else ()
    filter_metadata: dict[str, Any] = {}
    if req is not None and req.HasField("metadata_context"):
        for name, struct in req.metadata_context.filter_metadata.items():
            filter_metadata[name] = struct_to_dict(struct)
    http = http_request(
        dict(headers),
        "",
        "",
        "",
        headers.get(":scheme", ""),
        attrs.get(PROTOCOL, ""),
        attrs.get(REQUEST_ID, ""),
        lines,
    )
    return adapter.build(
        source=peer[0],
        source_port=peer[1],
        destination=local[0],
        destination_port=local[1],
        principals=principals,
        sni=attrs.get(SNI, ""),
        http=http,
        filter_metadata=filter_metadata,
    )


def decision_key(
    plan: KeyPlan,
    headers: Mapping[str, str],
    attrs: Mapping[str, str],
    req: ep.ProcessingRequest,
    lines: HeaderLines = NO_LINES,
) -> tuple[object, ...] | None:
    """What the decision of this request can depend on (see extproc/decision/cache.py): the
    peer's address without its port, our address, the client certificate or its URI SAN, the
    SNI, the filter metadata when policies read it, and the headers the plan names (with their
    entries when a name repeats). None when the addresses cannot be read (the request is then
    decided, and denied, the slow way)."""
    peer = split_host_port(attrs.get(PEER_ADDRESS_ATTRIBUTE) or attrs.get(SOURCE_ADDRESS, ""))
    if peer is None:
        return None
    key: tuple[object, ...] = (
        "ext_proc",
        peer[0],
        attrs.get(DESTINATION_ADDRESS, ""),
        attrs.get(PEER_CERTIFICATE, ""),
        attrs.get(PEER_URI_SAN, ""),
        attrs.get(SNI, ""),
    )
    if plan.metadata:
        key += (req.metadata_context.SerializeToString(deterministic=True),)
    get = headers.get
    key += tuple([get(name) for name in plan.headers])
    return key + repeated_key_part(plan, lines) if lines else key


def check_request(
    headers: Mapping[str, str], attrs: Mapping[str, str], metadata: ep.ProcessingRequest | None = None
) -> external_auth_pb2.CheckRequest:
    """The CheckRequest Envoy's ext_authz filter would send for this request.

    `headers` are the request headers (lower-case, repeated values joined with ","), as
    ext_authz sends them when `encode_raw_headers` is off.
    """
    peer = split_host_port(attrs.get(PEER_ADDRESS_ATTRIBUTE) or attrs.get(SOURCE_ADDRESS, ""))
    pem = attrs.get(PEER_CERTIFICATE, "")
    return forwarded_check_request(
        headers,
        source=peer,
        destination=split_host_port(attrs.get(DESTINATION_ADDRESS, "")),
        principal="" if pem else attrs.get(PEER_URI_SAN, ""),
        certificate=quote(pem, safe="") if pem else "",  # ext_authz sends it URL-encoded
        sni=attrs.get(SNI, ""),
        protocol=attrs.get(PROTOCOL, ""),
        request_id=attrs.get(REQUEST_ID, ""),
        metadata_context=metadata.metadata_context
        if metadata is not None and metadata.HasField("metadata_context")
        else None,
    )


def rewrite_query(path: str, remove: set[str], overwrite: list[tuple[str, str]]) -> bytes:
    """`path` with query parameters removed or set, exactly as Envoy's ext_authz filter does it.

    Envoy splits the query without decoding it (`QueryParamsMulti::parseQueryString`), so names
    match as spelt (the verifier hands over the spellings it found), keeps the parameters in
    a map sorted by name (values of one name in order, a bare `m` becoming `m=`), and writes
    them back as they were. The differential tests against jwt_authn pin this down, so the
    upstream sees the same path in both modes.
    """
    raw = path.encode("utf-8", "surrogateescape")
    base, sep, query = raw.partition(b"?")
    params: dict[bytes, list[bytes]] = {}
    if sep:
        for part in query.split(b"&") if query else ():
            name, _, value = part.partition(b"=")
            params.setdefault(name, []).append(value)
    for gone in remove:
        params.pop(gone.encode(), None)
    for key, text in overwrite:
        params[key.encode()] = [text.encode()]
    if not params:
        return base
    return base + b"?" + b"&".join(k + b"=" + v for k in sorted(params) for v in params[k])

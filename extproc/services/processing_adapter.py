"""ext_proc <-> ext_authz: one enforcement pipeline for both filters.

In the `extproc` mode the ext_proc filter's request-headers message is turned into the
CheckRequest that Envoy's ext_authz filter would have sent for the same request, and the
CheckResponse the pipeline produces is turned back into what ext_proc expects: header
mutations when allowed, an ImmediateResponse when denied. So JWT verification,
AuthorizationPolicy, CUSTOM providers (which forward exactly this CheckRequest) and the
decision metadata behave the same in both modes, and are tested once.

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
for it as an attribute. Filter state cannot be set by a client, so it is safe to trust;
without it, `source.address` stands in.

A request without addresses is denied as malformed, the same as a CheckRequest without
them: the server fails closed rather than evaluating `ipBlocks` against nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

EXT_PROC_ATTRIBUTES = "envoy.filters.http.ext_proc"
# The physical peer, recorded by set_filter_state before ext_proc (see the module docstring).
PEER_ADDRESS_STATE = "extproc.peer_address"
PEER_ADDRESS_ATTRIBUTE = f'filter_state["{PEER_ADDRESS_STATE}"]'
# The namespace our decision metadata is written to; the filter must list it in
# metadata_options.receiving_namespaces.untyped for Envoy to keep it.
METADATA_NAMESPACE = "extproc"

_HEADER_FIELDS = {":method": "method", ":path": "path", ":authority": "host", ":scheme": "scheme"}


def attribute_strings(req: ep.ProcessingRequest) -> dict[str, str]:
    """The string and number attributes the filter sent with this message (CEL text -> value)."""
    out: dict[str, str] = {}
    s = req.attributes.get(EXT_PROC_ATTRIBUTES)
    if s is None:
        return out
    for name, v in s.fields.items():
        kind = v.WhichOneof("kind")
        if kind == "string_value":
            out[name] = v.string_value
        elif kind == "number_value":
            out[name] = str(int(v.number_value))
        elif kind == "bool_value":
            out[name] = "true" if v.bool_value else "false"
    return out


def _split_host_port(value: str) -> tuple[str, int] | None:
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


def check_request(
    headers: Mapping[str, str], attrs: Mapping[str, str], metadata: ep.ProcessingRequest | None = None
) -> external_auth_pb2.CheckRequest:
    """The CheckRequest Envoy's ext_authz filter would send for this request.

    `headers` are the request headers (lower-case, repeated values joined with ","), as
    ext_authz sends them when `encode_raw_headers` is off.
    """
    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    peer = attrs.get(PEER_ADDRESS_ATTRIBUTE) or attrs.get("source.address", "")
    for value, side in ((peer, a.source), (attrs.get("destination.address", ""), a.destination)):
        hp = _split_host_port(value)
        if hp is not None:
            side.address.socket_address.address, side.address.socket_address.port_value = hp
    pem = attrs.get("connection.peer_certificate", "")
    if pem:
        a.source.certificate = quote(pem, safe="")  # ext_authz sends it URL-encoded
    else:
        a.source.principal = attrs.get("connection.uri_san_peer_certificate", "")
    sni = attrs.get("connection.requested_server_name", "")
    if sni:
        a.tls_session.sni = sni
    http = a.request.http
    for name, value in headers.items():
        field = _HEADER_FIELDS.get(name)
        if field is not None:
            setattr(http, field, value)
    http.headers.update(headers)
    http.protocol = attrs.get("request.protocol", "")
    http.id = attrs.get("request.id", "")
    if metadata is not None and metadata.HasField("metadata_context"):
        a.metadata_context.CopyFrom(metadata.metadata_context)
    return req


def set_header(name: str, value: str) -> base_pb2.HeaderValueOption:
    """Set (overwrite) one header, value in raw_value as ext_proc expects."""
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, raw_value=value.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _value(hvo: base_pb2.HeaderValueOption) -> str:
    h = hvo.header
    return h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value


def _append(hvo: base_pb2.HeaderValueOption) -> base_pb2.HeaderValueOption:
    """ext_authz's append semantics carried over (the deprecated `append` flag included)."""
    out = base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=hvo.header.key, raw_value=_value(hvo).encode()))
    if hvo.HasField("append"):
        out.append_action = (
            base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
            if hvo.append.value
            else base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        )
    else:
        out.append_action = hvo.append_action
    return out


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
    for name in remove:
        params.pop(name.encode(), None)
    for name, value in overwrite:
        params[name.encode()] = [value.encode()]
    if not params:
        return base
    return base + b"?" + b"&".join(k + b"=" + v for k in sorted(params) for v in params[k])


def request_mutation(
    ok: external_auth_pb2.OkHttpResponse,
    path: str,
    extra: tuple[tuple[str, str], ...] = (),
    remove: tuple[str, ...] = (),
) -> ep.HeadersResponse:
    """An ext_authz OK response as ext_proc request-header changes.

    Query parameters (jwt_authn strips `access_token`) are removed by rewriting `:path`,
    which ext_proc may change (only `:authority`, `:scheme`, `:method`, `host` and
    `x-envoy-*` are protected by default).
    """
    resp = ep.HeadersResponse()
    mut = resp.response.header_mutation
    for hvo in ok.headers:
        mut.set_headers.append(_append(hvo))
    for name, value in extra:
        mut.set_headers.append(set_header(name, value))
    removed = [*ok.headers_to_remove, *remove]
    if removed:
        mut.remove_headers.extend(removed)
    if ok.query_parameters_to_remove or ok.query_parameters_to_set:
        new_path = rewrite_query(
            path, set(ok.query_parameters_to_remove), [(p.key, p.value) for p in ok.query_parameters_to_set]
        )
        mut.set_headers.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=":path", raw_value=new_path),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        )
    return resp


def response_headers_to_add(ok: external_auth_pb2.OkHttpResponse) -> tuple[base_pb2.HeaderValueOption, ...]:
    """What the OK response asks Envoy to put on the response, applied at response headers."""
    return tuple(_append(h) for h in ok.response_headers_to_add)


def immediate_response(resp: external_auth_pb2.CheckResponse, details: str) -> ep.ImmediateResponse:
    """A denial as ext_proc's local reply: the same status, body and headers ext_authz would send.

    `details` becomes Envoy's %RESPONSE_CODE_DETAILS%, named like the native filters'
    (`rbac_access_denied_matched_policy[...]`, `jwt_authn_access_denied{...}`), so access
    logs read the same as with Istio's filters.
    """
    denied = resp.denied_response
    code = denied.status.code if resp.HasField("denied_response") and denied.status.code else 403
    out = ep.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=code),
        body=denied.body.encode(),
        details=details,
    )
    for hvo in denied.headers:
        out.headers.set_headers.append(_append(hvo))
    return out


def namespaced(md: struct_pb2.Struct) -> struct_pb2.Struct:
    """ext_proc dynamic metadata is keyed by namespace; ours lives in METADATA_NAMESPACE."""
    out = struct_pb2.Struct()
    if md.fields:
        out.fields[METADATA_NAMESPACE].struct_value.CopyFrom(md)
    return out

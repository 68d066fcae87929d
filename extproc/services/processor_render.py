"""A Verdict as ext_proc replies: header mutations when allowed, a local reply when denied.

As for ext_authz (extproc/services/authz_render.py), each reply is the concatenation of
encoded ProcessingResponse parts, which protobuf parses as their merge: the verdict's part,
encoded once per verdict and kept with it, then the metadata exchange's (constant per
server) and the trace context's (per request). Header values go in `raw_value`, as ext_proc
expects. The decision metadata travels in one part only, under our namespace: a map entry
repeated in a later part would replace the earlier one, not merge with it.

What ext_authz can say and ext_proc cannot, and how it is carried over:
* query parameters to remove or set (jwt_authn strips `access_token`): `:path` is rewritten
  exactly as Envoy's ext_authz filter rewrites it (`rewrite_query`), per request;
* headers for the upstream's response (a CUSTOM provider's `response_headers_to_add`): kept
  with the stream and set when the response headers come through;
* a denial's %RESPONSE_CODE_DETAILS%: the ImmediateResponse `details`, named like the native
  filters' (`rbac_access_denied_matched_policy[...]`, `jwt_authn_access_denied{...}`).
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.services import wire
from extproc.services.processing_adapter import METADATA_NAMESPACE, rewrite_query
from extproc.telemetry.exchange import PeerExchange
from extproc.telemetry.peer import METADATA_HEADER, METADATA_ID_HEADER
from extproc.verdict import Append, HeaderOp, Verdict

MEMO_REQUEST = "ext_proc"
MEMO_RESPONSE = "ext_proc_response"
_OVERWRITE = Append.OVERWRITE_IF_EXISTS_OR_ADD


def header_options(ops: Iterable[HeaderOp]) -> list[base_pb2.HeaderValueOption]:
    return [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=op.name, raw_value=op.value.encode("utf-8", "surrogateescape")),
            append_action=op.action,
        )
        for op in ops
    ]


def _with_metadata(resp: ep.ProcessingResponse, v: Verdict) -> None:
    if v.metadata:
        resp.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.update(v.metadata)


def request_reply(v: Verdict) -> ep.ProcessingResponse:
    """The verdict's reply to the request headers: its mutations, or its local reply."""
    resp = ep.ProcessingResponse()
    if v.allowed:
        common = resp.request_headers.response
        common.SetInParent()
        if v.headers or v.remove_headers:
            mut = common.header_mutation
            mut.set_headers.extend(header_options(v.headers))
            mut.remove_headers.extend(v.remove_headers)
    else:
        imm = resp.immediate_response
        imm.status.code = v.status or 403
        if v.body:
            imm.body = v.body.encode()
        if v.details:
            imm.details = v.details
        imm.headers.set_headers.extend(header_options(v.response_headers))
    _with_metadata(resp, v)
    return resp


def encoded_request_reply(v: Verdict) -> bytes:
    data = v.memo.get(MEMO_REQUEST)
    if data is None:
        data = v.memo[MEMO_REQUEST] = request_reply(v).SerializeToString()
    return data  # type: ignore[no-any-return]


def response_part(v: Verdict) -> bytes:
    """The headers an allowed verdict puts on the upstream's response, as a response-headers reply."""
    data = v.memo.get(MEMO_RESPONSE)
    if data is None:
        resp = ep.ProcessingResponse()
        resp.response_headers.response.SetInParent()
        if v.allowed and v.response_headers:
            resp.response_headers.response.header_mutation.set_headers.extend(header_options(v.response_headers))
        data = v.memo[MEMO_RESPONSE] = resp.SerializeToString()
    return data  # type: ignore[no-any-return]


def path_part(v: Verdict, path: str) -> bytes:
    """Query changes, as the rewritten `:path` (the only part that depends on the request)."""
    resp = ep.ProcessingResponse()
    value = rewrite_query(path, set(v.remove_query), list(v.set_query))
    resp.request_headers.response.header_mutation.set_headers.add(
        header=base_pb2.HeaderValue(key=":path", raw_value=value), append_action=_OVERWRITE
    )
    out: bytes = resp.SerializeToString()
    return out


_REQUEST_HEADERS = wire.tag_of(ep.ProcessingResponse, "request_headers")
_RESPONSE = wire.tag_of(ep.HeadersResponse, "response")
_MUTATION = wire.tag_of(ep.CommonResponse, "header_mutation")
_SET = wire.tag_of(ep.HeaderMutation, "set_headers")
_REMOVE = wire.tag_of(ep.HeaderMutation, "remove_headers")


def trace_part(headers: tuple[tuple[str, str], ...], remove: tuple[str, ...]) -> bytes:
    """The trace headers for the upstream, in wire format directly (see extproc/services/wire.py)."""
    return wire.set_headers((_REQUEST_HEADERS, _RESPONSE, _MUTATION), _SET, headers, True, _REMOVE, remove)


# What an outbound request needs when nothing else changes it: an empty reply (continue).
CONTINUE_REQUEST = ep.ProcessingResponse(request_headers=ep.HeadersResponse()).SerializeToString()
CONTINUE_RESPONSE = ep.ProcessingResponse(response_headers=ep.HeadersResponse()).SerializeToString()


class ExchangeParts:
    """Istio's HTTP metadata exchange as ext_proc reply parts, built once per server."""

    def __init__(self, exchange: PeerExchange) -> None:
        own = header_options(HeaderOp(name, value) for name, value in exchange.headers)
        pair = (METADATA_HEADER, METADATA_ID_HEADER)

        def part(phase: str, set_own: bool, remove_pair: bool) -> bytes:
            r = ep.ProcessingResponse()
            mut = getattr(r, phase).response.header_mutation
            if set_own:
                mut.set_headers.extend(own)
            if remove_pair:
                mut.remove_headers.extend(pair)
            encoded: bytes = r.SerializeToString()
            return encoded

        # Outbound: ours on the request; the server's pair read and removed from the response.
        self.outbound_request = part("request_headers", True, False)
        self.outbound_response = part("response_headers", False, True)
        # Inbound, when the peer sent its pair: removed from the request, ours on the response
        # (or on the denial, so the client labels its 403s with our workload).
        self.inbound_request = part("request_headers", False, True)
        self.inbound_response = part("response_headers", True, False)
        denied = ep.ProcessingResponse()
        denied.immediate_response.headers.set_headers.extend(own)
        self.denied = denied.SerializeToString()

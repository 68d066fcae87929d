"""A Verdict as the HTTP response Envoy's ext_authz `http_service` client reads.

What Envoy 1.40 does with the response (../shared/reference/http-ext-authz.md, Q3-Q5):
* only status 200 allows. The 200's headers go to the upstream request if their names are in
  `allowed_upstream_headers` (set semantics), to the client's response if in
  `allowed_client_headers_on_success`; `x-envoy-auth-headers-to-remove` lists request headers
  to delete (one or more lines; pseudo-headers and `host` cannot be removed);
* any other status below 500 is a denial with that status, body and the headers
  `allowed_client_headers` lets through (`www-authenticate` always);
* on both, headers named in `dynamic_metadata_from_headers` become dynamic metadata in the
  `envoy.filters.http.ext_authz` namespace, key = header name, value = a string. Our
  decision-metadata keys are header names as they stand (`enforced_engine_result`,
  `extproc_trace`, ...), so access logs and the access-log service read the same keys in
  `authz-http` as in `authz+als`; none is a name a client response or an upstream may see,
  because every allowlist in envoy/authz-http.yaml is explicit.

So a response is: status line, the verdict's header lines, per-request lines (the peer
metadata exchange, the trace context), `content-length` and the body. The verdict's part is
rendered once and kept in `Verdict.memo`, like the gRPC renderer's encoded CheckResponse.

What `http_service` cannot carry, and what happens instead (the README says the same):
query-parameter changes. When a parameter must go (a JWT verified from `?access_token=` and
not forwarded), `x-extproc-remove-query` names it, as an upstream header; envoy/authz-http.yaml
runs a header_mutation filter after ext_authz behind a matcher on that header, which removes
the parameters it lists by name (a name the client percent-encoded too) and the header, so
the query changes exactly when jwt_authn would have changed it (checked against Envoy 1.40).
Parameters to set (a CUSTOM gRPC provider's `query_parameters_to_set`) are dropped and
counted by the service. Append/add-if-absent header actions are written as a set.
A denial's status is one Envoy reads as a denial (1xx and 200 become 403) or, for a 5xx, as an
error: the filter's `status_on_error` applies, without the body and headers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any, NamedTuple

from extproc.telemetry.exchange import PeerExchange
from extproc.telemetry.peer import METADATA_HEADER, METADATA_ID_HEADER
from extproc.verdict import PEER_METADATA, PEER_METADATA_ID, HeaderOp, Verdict

MEMO_KEY = "ext_authz_http"
REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
REMOVE_QUERY_HEADER = "x-extproc-remove-query"  # see the module docstring
PEER_FRAGMENTS = 1024  # distinct peer metadata values whose lines are kept rendered

# Control characters end or split a header line; a value holding one (a claim copied to a
# header, say) is written with each replaced by a space, never as it is.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# A field name is an RFC 9110 token; a name that is not one is dropped, never written.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}


class Rendered(NamedTuple):
    """A verdict's part of the response: everything before the per-request lines, and after."""

    head: bytes  # status line and the verdict's header lines
    tail: bytes  # content-length, the blank line, the body
    tail_no_body: bytes  # the same for a HEAD check


def status_line(status: int) -> bytes:
    got = _STATUS_LINES.get(status)
    return got if got is not None else f"HTTP/1.1 {status} Status {status}\r\n".encode()


def denial_status(status: int) -> int:
    """The status a denial is sent with: Envoy allows on 200 and waits past a 1xx, so those (and
    a missing status) become 403. A 5xx (a CUSTOM provider's statusOnError) is sent as it is:
    Envoy treats it as an error and answers the filter's `status_on_error`, which a user with
    such a provider sets to the same code (README)."""
    return status if 201 <= status <= 599 else 403


def header_line(name: str, value: str) -> bytes:
    """One header line, or nothing for a name that is not a token."""
    if not _TOKEN.fullmatch(name):
        return b""
    if _CONTROL.search(value):
        value = _CONTROL.sub(" ", value)
    return f"{name}: {value}\r\n".encode()


def metadata_value(value: Any) -> str:
    """Dynamic metadata from headers is flat strings: a number or flag as its text, a structure as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def metadata_lines(metadata: Mapping[str, Any]) -> bytes:
    return b"".join(header_line(k, metadata_value(v)) for k, v in metadata.items())


def _lines(ops: Iterable[HeaderOp]) -> bytes:
    return b"".join(header_line(op.name, op.value) for op in ops)


def remove_line(names: Iterable[str]) -> bytes:
    names = [n for n in names if _TOKEN.fullmatch(n)]
    return header_line(REMOVE_HEADER, ", ".join(names)) if names else b""


def _render(v: Verdict) -> Rendered:
    if v.allowed:
        head = b"".join(
            (
                _STATUS_LINES[200],
                _lines(v.headers),
                remove_line(v.remove_headers),
                header_line(REMOVE_QUERY_HEADER, ", ".join(v.remove_query)) if v.remove_query else b"",
                _lines(v.response_headers),
                metadata_lines(v.metadata),
            )
        )
        body = b""
    else:
        head = b"".join((status_line(denial_status(v.status)), _lines(v.response_headers), metadata_lines(v.metadata)))
        body = v.body.encode()
    length = b"content-length: %d\r\n\r\n" % len(body)
    return Rendered(head, length + body, length)


def rendered(v: Verdict) -> Rendered:
    """The verdict's part, rendered once and kept with the verdict."""
    memo = v.memo
    got = memo.get(MEMO_KEY)
    if got is None:
        got = memo[MEMO_KEY] = _render(v)
    return got


def trace_lines(
    headers: tuple[tuple[str, str], ...], remove: tuple[str, ...], allowed: bool, metadata: Mapping[str, Any] | None
) -> bytes:
    """The trace context: headers for the upstream (an allowed request only), span ids for the log."""
    out = b""
    if allowed:
        if headers:
            # The names are the propagator's own and the values its output (ids it made, or
            # parsed and checked from the request), so the common case is written as it
            # stands; anything that would need cleaning takes the careful path.
            if _CONTROL.search("".join([value for _, value in headers])):
                out = b"".join(header_line(name, value) for name, value in headers)
            else:
                out = "".join([f"{name}: {value}\r\n" for name, value in headers]).encode()
        if remove:
            out += remove_line(remove)
    if metadata:
        out += metadata_lines(metadata)
    return out


class ExchangeLines:
    """Istio's HTTP metadata exchange as response lines, built once per server (the HTTP
    counterpart of authz_render.ExchangeParts).

    Inbound, when the peer sent its pair: remove it before the application sees it, answer with
    ours (to the client, on the upstream's response or on the denial), and hand the peer's to
    the access log as dynamic metadata, under keys of its own (a response header named
    `x-envoy-peer-metadata` is ours, for the client). Outbound: add ours to the request.
    """

    def __init__(self, exchange: PeerExchange) -> None:
        self.source = exchange
        own = b"".join(header_line(name, value) for name, value in exchange.headers)
        self.allowed = remove_line((METADATA_HEADER, METADATA_ID_HEADER)) + own
        self.denied = own
        self.outbound = own
        self._received: dict[tuple[str, str], bytes] = {}

    def received(self, value: str, node_id: str) -> bytes:
        """The peer's pair as metadata lines; a sidecar sends the same pair every time."""
        key = (value, node_id)
        data = self._received.get(key)
        if data is None:
            data = header_line(PEER_METADATA, value) + header_line(PEER_METADATA_ID, node_id)
            if len(self._received) >= PEER_FRAGMENTS:
                self._received.clear()  # bounded; a new mix of peers simply renders again
            self._received[key] = data
        return data

"""CUSTOM action: consult the external authorizer named in `extensionProviders`.

extproc stands where Istio puts Envoy's ext_authz filter for a CUSTOM policy, so
the provider sees what it would see from Envoy and its answer is applied the same
way:

  * gRPC providers (`envoyExtAuthzGrpc`) get the CheckRequest Envoy sent us; an OK
    status allows (its `ok_response` header changes are passed on to Envoy), any
    other status denies with the provider's own `denied_response`.
  * HTTP providers (`envoyExtAuthzHttp`) get a request built like Envoy's raw HTTP
    ext_authz client builds it: the original method, `pathPrefix` + original path,
    no body (or, with `includeRequestBodyInCheck`, the body Envoy buffered into the
    CheckRequest), and only `:authority`, `authorization` and the headers named in
    `includeRequestHeadersInCheck`, plus `includeAdditionalHeadersInCheck`, plus what
    Envoy's async HTTP client and router add to every such call: `x-envoy-internal: true`
    and `x-envoy-expected-rq-timeout-ms` (the provider's timeout in whole milliseconds,
    absent when the timeout is 0, which Envoy reads as none). 200 allows; any other
    status denies with that status, body and the headers `headersToDownstreamOnDeny`
    selects; a 5xx is an error.
  * Errors (unreachable, timeout, 5xx) follow `failOpen` and `statusOnError`
    (default 403, empty body), as Envoy's `failure_mode_allow` and `status_on_error` do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2

from extproc.attributes import Attributes
from extproc.config.providers import GrpcProviderSettings, HeaderPattern, HttpProviderSettings
from extproc.decision.decide import GRPC_PERMISSION_DENIED, GRPC_UNAVAILABLE, Changes, CustomDenial, header_op
from extproc.services.protoconv import struct_to_dict
from extproc.snapshot.compiled import Snapshot
from extproc.verdict import HeaderOp

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("extproc.custom")

# Headers Envoy's HTTP ext_authz client always forwards (raw_http_client_impl), in
# addition to the user's includeRequestHeadersInCheck patterns.
ALWAYS_FORWARDED = (":authority", "authorization", ":method", ":path")
# Set on every call by Envoy's async HTTP client (AsyncStreamImpl::sendHeaders).
ENVOY_INTERNAL = ("x-envoy-internal", "true")
# Set by the router from the call's timeout (FilterUtility::finalTimeout), unless it is 0.
EXPECTED_TIMEOUT = "x-envoy-expected-rq-timeout-ms"
# Response headers that never go back to the client from a denying HTTP provider.
_HOP_BY_HOP = {"connection", "transfer-encoding", "keep-alive", "upgrade", "proxy-connection", "te", "trailer"}


@dataclass(frozen=True)
class CustomAllowed:
    """A provider allowed (or failed with failOpen): the request goes on, with its changes."""

    kind: str  # allowed | error_allowed
    reason: str
    changes: Changes | None = None  # the request changes an allowing provider asked for

    allowed = True


@dataclass(frozen=True)
class CustomDenied:
    """A provider denied (or failed, fail-closed): what the client is answered."""

    kind: str  # denied | error_denied
    reason: str
    denial: CustomDenial

    allowed = False


CustomOutcome = CustomAllowed | CustomDenied


def _error(settings: GrpcProviderSettings | HttpProviderSettings, is_http: bool, why: str) -> CustomOutcome:
    if settings.fail_open:
        return CustomAllowed("error_allowed", f"provider {settings.name} failed ({why}); failOpen allows")
    denial = CustomDenial(GRPC_UNAVAILABLE, why, settings.status_on_error if is_http else 0)
    return CustomDenied("error_denied", f"provider {settings.name} failed ({why})", denial)


def _value(h: base_pb2.HeaderValue) -> str:
    value: str = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return value


def header_ops(options: Iterable[base_pb2.HeaderValueOption]) -> tuple[HeaderOp, ...]:
    """Envoy HeaderValueOptions as data, with ext_authz's append semantics."""
    return tuple(
        header_op(o.header.key, _value(o.header), o.append.value if o.HasField("append") else None, o.append_action)
        for o in options
    )


def ok_changes(resp: external_auth_pb2.CheckResponse) -> Changes:
    """An allowing gRPC provider's OkHttpResponse (and metadata) as request changes."""
    ok = resp.ok_response
    metadata = {**struct_to_dict(ok.dynamic_metadata), **struct_to_dict(resp.dynamic_metadata)}
    return Changes(
        headers=header_ops(ok.headers),
        remove_headers=tuple(ok.headers_to_remove),
        remove_query=tuple(ok.query_parameters_to_remove),
        set_query=tuple((q.key, q.value) for q in ok.query_parameters_to_set),
        response_headers=header_ops(ok.response_headers_to_add),
        metadata=metadata,
    )


def denial_of(resp: external_auth_pb2.CheckResponse) -> CustomDenial:
    """A denying gRPC provider's CheckResponse as data: its status, reply and metadata."""
    d = resp.denied_response
    return CustomDenial(
        grpc_code=resp.status.code,
        message=resp.status.message,
        status=d.status.code,
        body=d.body,
        headers=header_ops(d.headers),
        metadata=struct_to_dict(resp.dynamic_metadata),
    )


def _set_header(key: str, value: str) -> HeaderOp:
    return HeaderOp(key, value)


def _matches(patterns: tuple[HeaderPattern, ...] | None, name: str) -> bool:
    return patterns is not None and any(p.matches(name) for p in patterns)


def timeout_ms(seconds: float) -> int:
    """A timeout as Envoy holds it: whole milliseconds, the rest dropped (DurationUtil)."""
    return round(seconds * 1_000_000) // 1000


class ProviderPool:
    """Clients for the providers of the current snapshot, created on first use."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._session: aiohttp.ClientSession | None = None  # made when an HTTP provider is first asked

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def check(
        self,
        snap: Snapshot,
        provider: str,
        request: external_auth_pb2.CheckRequest,
        attrs: Attributes,
    ) -> CustomOutcome:
        settings = snap.providers[provider]
        if isinstance(settings, GrpcProviderSettings):
            return await self._grpc(settings, request, attrs.is_http)
        return await self._http(settings, attrs, request)

    # --- gRPC ----------------------------------------------------------------

    async def _grpc(
        self, s: GrpcProviderSettings, request: external_auth_pb2.CheckRequest, is_http: bool
    ) -> CustomOutcome:
        channel = self._channels.get(s.target)
        if channel is None:
            channel = grpc.aio.insecure_channel(s.target)
            self._channels[s.target] = channel
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        try:
            resp: external_auth_pb2.CheckResponse = await stub.Check(request, timeout=s.timeout_s)
        except grpc.aio.AioRpcError as e:
            return _error(s, is_http, f"gRPC {e.code().name}")
        except asyncio.CancelledError:
            raise
        if resp.HasField("error_response"):
            return _error(s, is_http, "the provider returned an error_response")
        if resp.status.code == code_pb2.OK:
            return CustomAllowed("allowed", f"provider {s.name} allowed", changes=ok_changes(resp))
        return CustomDenied("denied", f"provider {s.name} denied", denial=denial_of(resp))

    # --- HTTP ----------------------------------------------------------------

    def _http_session(self) -> aiohttp.ClientSession:
        import aiohttp  # only servers with an HTTP provider pay for the client

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                auto_decompress=False, skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
            )
        return self._session

    async def _http(
        self, s: HttpProviderSettings, attrs: Attributes, request: external_auth_pb2.CheckRequest
    ) -> CustomOutcome:
        if attrs.http is None:  # Istio never sends TCP checks to an HTTP provider
            return CustomAllowed("allowed", "HTTP provider skipped for TCP")
        http = attrs.http
        headers: dict[str, str] = {}
        for name, value in http.headers.items():
            if name in ("content-length", ":scheme", ":method", ":path"):
                continue
            if name in ALWAYS_FORWARDED or _matches(s.allowed_request_headers, name):
                headers["host" if name == ":authority" else name] = value
        for k, v in s.additional_headers:
            headers[k] = v
        # What Envoy's own client adds after the filter built the request, overriding the client's.
        headers[ENVOY_INTERNAL[0]] = ENVOY_INTERNAL[1]
        ms = timeout_ms(s.timeout_s)
        if ms > 0:
            headers[EXPECTED_TIMEOUT] = str(ms)
        body = b""
        if s.include_request_body:
            h = request.attributes.request.http
            body = h.raw_body or h.body.encode()
        headers["content-length"] = str(len(body))
        url = s.base_url + s.path_prefix + http.path
        import aiohttp

        try:
            async with self._http_session().request(
                http.method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=s.timeout_s),
            ) as resp:
                body = await resp.read()
                status = resp.status
                resp_headers = [(k.lower(), v) for k, v in resp.headers.items()]
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            return _error(s, True, f"HTTP request failed: {type(e).__name__}")

        if status >= 500:
            return _error(s, True, f"HTTP {status}")
        if status == 200:
            upstream, downstream = s.headers_to_upstream_on_allow, s.headers_to_downstream_on_allow
            changes = Changes(
                headers=tuple(_set_header(k, v) for k, v in resp_headers if _matches(upstream, k)),
                response_headers=tuple(_set_header(k, v) for k, v in resp_headers if _matches(downstream, k)),
            )
            return CustomAllowed("allowed", f"provider {s.name} allowed", changes=changes)

        denial = CustomDenial(
            grpc_code=GRPC_PERMISSION_DENIED,
            status=status,
            body=body.decode("utf-8", "replace"),
            headers=tuple(
                _set_header(k, v)
                for k, v in resp_headers
                if k not in _HOP_BY_HOP
                and k not in ("content-length", "host")
                and (s.headers_to_downstream_on_deny is None or _matches(s.headers_to_downstream_on_deny, k))
            ),
        )
        return CustomDenied("denied", f"provider {s.name} denied with HTTP {status}", denial=denial)

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
    `includeRequestHeadersInCheck`, plus `includeAdditionalHeadersInCheck`. 200
    allows; any other status denies with that status, body and the headers
    `headersToDownstreamOnDeny` selects; a 5xx is an error.
  * Errors (unreachable, timeout, 5xx) follow `failOpen` and `statusOnError`
    (default 403, empty body), as Envoy's `failure_mode_allow` and `status_on_error` do.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp
import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from extproc.attributes import Attributes
from extproc.config.providers import GrpcProviderSettings, HeaderPattern, HttpProviderSettings
from extproc.config.snapshot import Snapshot

log = logging.getLogger("extproc.custom")

# Headers Envoy's HTTP ext_authz client always forwards (raw_http_client_impl), in
# addition to the user's includeRequestHeadersInCheck patterns.
ALWAYS_FORWARDED = (":authority", "authorization", ":method", ":path")
# Response headers that never go back to the client from a denying HTTP provider.
_HOP_BY_HOP = {"connection", "transfer-encoding", "keep-alive", "upgrade", "proxy-connection", "te", "trailer"}


@dataclass
class CustomOutcome:
    allowed: bool
    kind: str  # allowed | denied | error_allowed | error_denied
    reason: str
    ok_response: external_auth_pb2.OkHttpResponse | None = None
    response: external_auth_pb2.CheckResponse | None = None  # the deny to return


def _error(settings: GrpcProviderSettings | HttpProviderSettings, is_http: bool, why: str) -> CustomOutcome:
    if settings.fail_open:
        return CustomOutcome(True, "error_allowed", f"provider {settings.name} failed ({why}); failOpen allows")
    resp = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.UNAVAILABLE, message=why))
    if is_http:
        resp.denied_response.status.code = settings.status_on_error
    return CustomOutcome(False, "error_denied", f"provider {settings.name} failed ({why})", response=resp)


def _set_header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _matches(patterns: tuple[HeaderPattern, ...] | None, name: str) -> bool:
    return patterns is not None and any(p.matches(name) for p in patterns)


class ProviderPool:
    """Clients for the providers of the current snapshot, created on first use."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._session: aiohttp.ClientSession | None = None

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
            ok = resp.ok_response if resp.HasField("ok_response") else None
            if resp.HasField("dynamic_metadata"):
                ok = ok or external_auth_pb2.OkHttpResponse()
                ok.dynamic_metadata.MergeFrom(resp.dynamic_metadata)
            return CustomOutcome(True, "allowed", f"provider {s.name} allowed", ok_response=ok)
        return CustomOutcome(False, "denied", f"provider {s.name} denied", response=resp)

    # --- HTTP ----------------------------------------------------------------

    def _http_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                auto_decompress=False, skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
            )
        return self._session

    async def _http(
        self, s: HttpProviderSettings, attrs: Attributes, request: external_auth_pb2.CheckRequest
    ) -> CustomOutcome:
        if attrs.http is None:  # Istio never sends TCP checks to an HTTP provider
            return CustomOutcome(True, "allowed", "HTTP provider skipped for TCP")
        http = attrs.http
        headers: dict[str, str] = {}
        for name, value in http.headers.items():
            if name in ("content-length", ":scheme", ":method", ":path"):
                continue
            if name in ALWAYS_FORWARDED or _matches(s.allowed_request_headers, name):
                headers["host" if name == ":authority" else name] = value
        for k, v in s.additional_headers:
            headers[k] = v
        body = b""
        if s.include_request_body:
            h = request.attributes.request.http
            body = h.raw_body or h.body.encode()
        headers["content-length"] = str(len(body))
        url = s.base_url + s.path_prefix + http.path
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
            ok = external_auth_pb2.OkHttpResponse()
            for k, v in resp_headers:
                if _matches(s.headers_to_upstream_on_allow, k):
                    ok.headers.append(_set_header(k, v))
                if _matches(s.headers_to_downstream_on_allow, k):
                    ok.response_headers_to_add.append(_set_header(k, v))
            return CustomOutcome(True, "allowed", f"provider {s.name} allowed", ok_response=ok)

        denied = external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED),
            denied_response=external_auth_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=status), body=body.decode("utf-8", "replace")
            ),
        )
        for k, v in resp_headers:
            if k in _HOP_BY_HOP or k in ("content-length", "host"):
                continue
            if s.headers_to_downstream_on_deny is None or _matches(s.headers_to_downstream_on_deny, k):
                denied.denied_response.headers.append(_set_header(k, v))
        return CustomOutcome(False, "denied", f"provider {s.name} denied with HTTP {status}", response=denied)

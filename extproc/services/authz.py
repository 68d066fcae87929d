"""envoy.service.auth.v3.Authorization: ext_authz for HTTP and TCP.

The servicer is a thin shell: adapter -> engines -> response. It reads the current
snapshot once per call, so a concurrent reload never mixes configurations.

Stages run in Istio's filter order: CUSTOM (ext_authz), then RequestAuthentication (what
Envoy's jwt_authn would do), then DENY/ALLOW (what Envoy's RBAC would do).

In central mode (`--central`) one server checks for many sidecars: each Check names its
workload in the filter's context extensions (see services/central.py), and is checked
against that workload's snapshot, taken from one configuration generation. A Check that
names no usable workload is denied.

Responses are what users of Istio's native filters expect:
  * JWT failure: 401 (403 for a disallowed audience) with jwt_authn's body and
    `WWW-Authenticate`, even where the policies would allow;
  * deny: 403 with body `RBAC: access denied` (TCP: Envoy closes the connection);
  * allow: header changes only from a CUSTOM provider and from JWT verification (token
    stripped, claim and payload headers set);
  * either way, `dynamic_metadata` says what decided and why, under Envoy RBAC's own
    key names, so access logs can print it with
    %DYNAMIC_METADATA(envoy.filters.http.ext_authz:enforced_effective_policy_id)%.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from extproc.attributes import Attributes
from extproc.authn.cache import TokenCache
from extproc.authn.jwks_source import JwksRegistry
from extproc.authn.verifier import AuthnResult, authenticate, www_authenticate
from extproc.authz import engine
from extproc.authz.engine import Decision
from extproc.config.snapshot import Snapshot
from extproc.services.central import ContextWorkloads, IdentityError
from extproc.services.check_adapter import CheckAdapter, MalformedRequest
from extproc.services.custom import CustomOutcome, ProviderPool
from extproc.services.protoconv import struct_to_dict
from extproc.telemetry import exchange as mx
from extproc.telemetry.record import Direction
from extproc.tracing.tracer import Tracing

log = logging.getLogger("extproc.authz")


LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@dataclass
class AuthzStats:
    """Plain counters; the admin endpoint renders them. Never touched by a lock on the hot path."""

    checks: dict[str, int] = field(default_factory=lambda: {"http": 0, "tcp": 0})
    decisions: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (protocol, result, stage)
    malformed: dict[str, int] = field(default_factory=dict)
    internal_errors: int = 0
    custom_calls: dict[tuple[str, str], int] = field(default_factory=dict)  # (provider, outcome)
    dry_run: dict[tuple[str, str], int] = field(default_factory=dict)  # (ALLOW|DENY, allowed|denied)
    audit_hits: int = 0
    latency_sum_s: float = 0.0
    # Check handling time: counts per LATENCY_BUCKETS_S bound (not cumulative), last = above all.
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    jwt: dict[str, int] = field(default_factory=dict)  # verification outcome -> count
    jwt_refetch_retries: int = 0

    def count(self, table: dict[Any, int], key: Any) -> None:
        table[key] = table.get(key, 0) + 1


class LogOnce:
    """Logs the first occurrence of each kind of bad input, then only periodic counts.

    A hostile client can send a flood of malformed requests; the log must stay useful.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._seen: dict[str, int] = {}
        self._last_summary = time.monotonic()

    def __call__(self, kind: str, message: str) -> None:
        n = self._seen.get(kind, 0)
        self._seen[kind] = n + 1
        if n == 0:
            self.logger.warning("%s (further %s events are counted, not logged)", message, kind)
        now = time.monotonic()
        if now - self._last_summary >= self.interval_s:
            self._last_summary = now
            summary = ", ".join(f"{k}={v}" for k, v in sorted(self._seen.items()))
            self.logger.warning("bad requests so far: %s", summary)


def _denied_http(status: int = 403, body: str = engine.DENIED_BODY) -> external_auth_pb2.DeniedHttpResponse:
    return external_auth_pb2.DeniedHttpResponse(status=http_status_pb2.HttpStatus(code=status), body=body)


def decision_metadata(decision: Decision, snapshot_version: int) -> dict[str, Any]:
    md: dict[str, Any] = {
        "enforced_engine_result": decision.engine_result,
        "extproc_stage": decision.stage,
        "extproc_reason": decision.reason,
        "extproc_snapshot": snapshot_version,
    }
    if decision.policy_id is not None:
        md["enforced_effective_policy_id"] = decision.policy_id
    if decision.audit_policy_id is not None:
        md["access_log_hint"] = True
        md["audit_effective_policy_id"] = decision.audit_policy_id
    for s in decision.shadow:
        prefix = "istio_dry_run_allow_" if s.action == "ALLOW" else "istio_dry_run_deny_"
        md[prefix + "shadow_engine_result"] = s.engine_result
        if s.policy_id is not None:
            md[prefix + "shadow_effective_policy_id"] = s.policy_id
    return md


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        adapter: CheckAdapter,
        providers: ProviderPool,
        stats: AuthzStats | None = None,
        jwks: JwksRegistry | None = None,
        token_cache: TokenCache | None = None,
        exchange: mx.PeerExchange | None = None,
        direction: Direction = Direction.INBOUND,
        tracing: Tracing | None = None,
        central: ContextWorkloads | None = None,
    ) -> None:
        self._snapshot = snapshot
        self.exchange = exchange
        self.central = central
        self.direction = direction
        self.tracing = tracing if tracing is not None and tracing.propagates else None
        self._adapter = adapter
        self._providers = providers
        self.stats = stats or AuthzStats()
        self._log_bad = LogOnce(log)
        self.jwks = jwks or JwksRegistry()
        self.token_cache = token_cache if token_cache is not None else TokenCache()

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        started = time.perf_counter()
        try:
            snap: Snapshot | None = None
            exchange = self.exchange
            if self.central is not None:
                found = self.central.for_check(request.attributes)
                if isinstance(found, IdentityError):
                    return self._no_workload(request, found)
                snap, exchange = found
            if direction_of(context, self.direction) is Direction.OUTBOUND:
                resp = self._outbound(request, exchange)
            else:
                resp = await self._check(request, snap)
                if exchange is not None and request.attributes.request.HasField("http"):
                    self._inbound_exchange(request, resp, exchange)
            if self.tracing is not None and request.attributes.request.HasField("http"):
                self._trace(request, resp)
            return resp
        except Exception:  # a bug must deny, not crash the stream or the server
            return self._internal_error(request)
        finally:
            self._observe(started)

    async def decide(self, request: external_auth_pb2.CheckRequest) -> external_auth_pb2.CheckResponse:
        """Inbound enforcement alone (CUSTOM, JWT, DENY/ALLOW), for the ext_proc filter.

        The caller does the metadata exchange and tracing itself, in its own message format.
        """
        started = time.perf_counter()
        try:
            return await self._check(request)
        except Exception:
            return self._internal_error(request)
        finally:
            self._observe(started)

    def _no_workload(
        self, request: external_auth_pb2.CheckRequest, problem: IdentityError
    ) -> external_auth_pb2.CheckResponse:
        """Central mode, a Check that names no usable workload: fail closed (logged once per problem)."""
        is_http = self._adapter.is_http(request)
        protocol = "http" if is_http else "tcp"
        self.stats.checks[protocol] += 1
        self.stats.count(self.stats.malformed, problem.kind)
        self.stats.count(self.stats.decisions, (protocol, "denied", "malformed"))
        resp = self._deny(is_http=is_http, reason=f"central mode: no workload identity: {problem.message}")
        resp.status.message = f"{engine.DENIED_BODY}: no workload identity: {problem.message}"
        return resp

    def _internal_error(self, request: external_auth_pb2.CheckRequest) -> external_auth_pb2.CheckResponse:
        self.stats.internal_errors += 1
        log.exception("internal error while checking a request; denying it")
        return self._deny(is_http=self._adapter.is_http(request), reason="internal error")

    def _observe(self, started: float) -> None:
        elapsed = time.perf_counter() - started
        self.stats.latency_sum_s += elapsed
        self.stats.latency_counts[bisect.bisect_left(LATENCY_BUCKETS_S, elapsed)] += 1

    def _trace(self, request: external_auth_pb2.CheckRequest, resp: external_auth_pb2.CheckResponse) -> None:
        """Continue or start the request's trace: headers for the upstream, ids for the access log.

        A denied request gets no headers (nothing goes upstream) but still gets its span.
        """
        assert self.tracing is not None
        out = self.tracing.begin(request_headers(request.attributes.request.http))
        if out is None:
            return
        if resp.status.code == code_pb2.OK:
            ok = resp.ok_response
            for name, value in out.headers:
                ok.headers.append(
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(key=name, value=value),
                        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                    )
                )
            if out.remove:
                ok.headers_to_remove.extend(out.remove)
        if self.tracing.wants_span(out):
            resp.dynamic_metadata.update(self.tracing.metadata(out))

    def _outbound(
        self, request: external_auth_pb2.CheckRequest, exchange: mx.PeerExchange | None
    ) -> external_auth_pb2.CheckResponse:
        """A client-side check: policies apply only inbound, so this allows and adds our metadata."""
        is_http = request.attributes.request.HasField("http")
        protocol = "http" if is_http else "tcp"
        self.stats.checks[protocol] += 1
        self.stats.count(self.stats.decisions, (protocol, "allowed", "outbound"))
        resp = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK))
        if is_http and exchange is not None:
            for name, value in exchange.headers:
                resp.ok_response.headers.append(
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(key=name, value=value),
                        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                    )
                )
        return resp

    def _inbound_exchange(
        self,
        request: external_auth_pb2.CheckRequest,
        resp: external_auth_pb2.CheckResponse,
        exchange: mx.PeerExchange,
    ) -> None:
        """Read and remove the client's metadata; hand it to the access log; answer with ours."""
        got = mx.received(request.attributes.request.http.headers)
        if got is None:
            return
        value, node_id = got
        resp.dynamic_metadata.update({mx.METADATA_HEADER: value, mx.METADATA_ID_HEADER: node_id})
        # Our pair goes on every response the peer gets, a denial included, as istio/proxy's
        # peer_metadata filter does: the client then labels its 403s with our workload.
        if resp.status.code == code_pb2.OK:
            ok = resp.ok_response
            ok.headers_to_remove.extend((mx.METADATA_HEADER, mx.METADATA_ID_HEADER))
            target = ok.response_headers_to_add
        elif resp.HasField("denied_response"):
            target = resp.denied_response.headers
        else:
            return
        for name, own in exchange.headers:
            target.append(
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=name, value=own),
                    append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                )
            )

    async def _check(
        self, request: external_auth_pb2.CheckRequest, snap: Snapshot | None = None
    ) -> external_auth_pb2.CheckResponse:
        if snap is None:
            snap = self._snapshot()
        is_http = self._adapter.is_http(request)
        protocol = "http" if is_http else "tcp"
        self.stats.checks[protocol] += 1
        try:
            attrs = self._adapter.attributes(request)
        except MalformedRequest as e:
            self.stats.count(self.stats.malformed, e.kind)
            self.stats.count(self.stats.decisions, (protocol, "denied", "malformed"))
            self._log_bad(e.kind, f"denied a malformed CheckRequest: {e}")
            return self._deny(is_http=is_http, reason=f"malformed request: {e.kind}")

        program = snap.http if is_http else snap.tcp
        extra_ok: external_auth_pb2.OkHttpResponse | None = None

        if program.custom.by_provider or program.custom.bad:
            hits, bad = engine.custom_providers(program, attrs)
            if bad is not None:
                decision = engine.bad_custom_decision(program, bad)
                return self._finish(snap, decision, attrs, protocol, None)
            for provider, rule_id in hits:
                outcome = await self._providers.check(snap, provider, request, attrs)
                self.stats.count(self.stats.custom_calls, (provider, outcome.kind))
                if not outcome.allowed:
                    self.stats.count(self.stats.decisions, (protocol, "denied", "custom"))
                    log.debug("CUSTOM provider %s denied (%s) after %s matched", provider, outcome.kind, rule_id)
                    return self._custom_denied(outcome, rule_id, snap.version)
                extra_ok = _merge_ok(extra_ok, outcome.ok_response)

        authn: AuthnResult | None = None
        if is_http and snap.authn.enabled:
            authn = await self._authenticate(snap, attrs)
            if not authn.ok:
                return self._jwt_denied(snap, authn, attrs)
            # request.auth.* now come from our own verification, never from client input.
            attrs = dataclasses.replace(attrs, jwt_payload=authn.payload)
            extra_ok = _merge_ok(extra_ok, _jwt_ok(authn))

        decision = engine.evaluate(program, attrs)
        resp = self._finish(snap, decision, attrs, protocol, extra_ok)
        if authn is not None and authn.verified:
            resp.dynamic_metadata.update({"extproc_request_principal": authn.verified[-1][1]})
        return resp

    async def _authenticate(self, snap: Snapshot, attrs: Attributes) -> AuthnResult:
        http = attrs.http
        assert http is not None

        def run() -> AuthnResult:
            return authenticate(
                snap.authn, http.method, http.headers, int(time.time()), self.jwks.keys_for, self.token_cache
            )

        result = run()
        # Keys never fetched yet, or a kid we do not know (a rotation): refetch, rate-limited.
        if not result.ok and result.refresh_wanted and await self.jwks.refresh(result.missing_keys, result.unknown_kid):
            self.stats.jwt_refetch_retries += 1
            result = run()
        outcome = "cors_preflight" if result.cors_preflight else result.status.metric_name
        if result.ok and not result.cors_preflight:
            outcome = "verified" if result.verified else "no_token"
        self.stats.count(self.stats.jwt, outcome)
        return result

    def _jwt_denied(self, snap: Snapshot, authn: AuthnResult, attrs: Attributes) -> external_auth_pb2.CheckResponse:
        http = attrs.http
        assert http is not None
        self.stats.count(self.stats.decisions, ("http", "denied", "jwt"))
        where = authn.failures[-1] if authn.failures else None
        reason = authn.status.message + (f" (token in {where[1]}, RequestAuthentication {where[0]})" if where else "")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("http %s %s: JWT rejected, %s: %s", http.method, http.path, authn.http_code, reason)
        resp = external_auth_pb2.CheckResponse(
            status=status_pb2.Status(
                code=code_pb2.UNAUTHENTICATED if authn.http_code == 401 else code_pb2.PERMISSION_DENIED,
                message=authn.status.message,
            )
        )
        denied = _denied_http(authn.http_code, authn.status.message)
        denied.headers.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(
                    key="www-authenticate", value=www_authenticate(authn.status, http.headers, http.scheme)
                ),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        )
        resp.denied_response.CopyFrom(denied)
        resp.dynamic_metadata.update(
            {
                "enforced_engine_result": "denied",
                "extproc_stage": "jwt",
                "extproc_reason": reason,
                "extproc_snapshot": snap.version,
            }
        )
        return resp

    def _finish(
        self,
        snap: Snapshot,
        decision: Decision,
        attrs: Attributes,
        protocol: str,
        extra_ok: external_auth_pb2.OkHttpResponse | None,
    ) -> external_auth_pb2.CheckResponse:
        stats = self.stats
        stats.count(stats.decisions, (protocol, decision.engine_result, decision.stage))
        if decision.audit_policy_id is not None:
            stats.audit_hits += 1
        for s in decision.shadow:
            stats.count(stats.dry_run, (str(s.action), s.engine_result))
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s %s %s from %s: %s (%s)",
                protocol,
                attrs.http.method if attrs.http else "",
                attrs.http.path if attrs.http else f"{attrs.destination_ip}:{attrs.destination_port}",
                attrs.source_principal or attrs.source_ip,
                decision.engine_result,
                decision.reason,
            )
        md = decision_metadata(decision, snap.version)
        if decision.allowed:
            resp = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK))
            if extra_ok is not None:
                resp.ok_response.CopyFrom(extra_ok)
                if extra_ok.HasField("dynamic_metadata"):
                    md = {**struct_to_dict(extra_ok.dynamic_metadata), **md}
            resp.dynamic_metadata.update(md)
            return resp
        resp = external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message=engine.DENIED_BODY)
        )
        if protocol == "http":
            resp.denied_response.CopyFrom(_denied_http())
        resp.dynamic_metadata.update(md)
        return resp

    def _deny(self, *, is_http: bool, reason: str) -> external_auth_pb2.CheckResponse:
        resp = external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message=engine.DENIED_BODY)
        )
        if is_http:
            resp.denied_response.CopyFrom(_denied_http())
        resp.dynamic_metadata.update(
            {"enforced_engine_result": "denied", "extproc_stage": "error", "extproc_reason": reason}
        )
        return resp

    def _custom_denied(self, outcome: CustomOutcome, rule_id: str, version: int) -> external_auth_pb2.CheckResponse:
        resp = outcome.response
        md = {
            "enforced_engine_result": "denied",
            "extproc_stage": "custom",
            "extproc_reason": outcome.reason,
            "extproc_snapshot": version,
            "extproc_custom_policy_id": rule_id,
        }
        resp.dynamic_metadata.update(md)
        return resp


DIRECTION_HEADER = "x-extproc-direction"


def request_headers(http: external_auth_pb2.AttributeContext.HttpRequest) -> Mapping[str, str]:
    """The request headers of a CheckRequest, from `header_map` when Envoy encodes them raw."""
    if http.headers or not http.HasField("header_map"):
        return http.headers
    out: dict[str, str] = {}
    for hv in http.header_map.headers:
        value = hv.raw_value.decode("utf-8", "replace") if hv.raw_value else hv.value
        key = hv.key.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def direction_of(context: grpc.aio.ServicerContext, default: Direction) -> Direction:
    """The direction named in the call's initial metadata (the Envoy filter's
    `grpc_service.initial_metadata`), so one extproc can serve inbound and outbound listeners."""
    for md in context.invocation_metadata() or ():
        if md.key == DIRECTION_HEADER:
            return (
                Direction.INBOUND
                if md.value == "inbound"
                else Direction.OUTBOUND
                if md.value == "outbound"
                else default
            )
    return default


def _jwt_ok(authn: AuthnResult) -> external_auth_pb2.OkHttpResponse | None:
    """Header changes of a successful verification, as jwt_authn would make them."""
    if not authn.remove_headers and not authn.set_headers and not authn.remove_query_params:
        return None
    ok = external_auth_pb2.OkHttpResponse()
    for name, values in authn.set_headers:
        # jwt_authn adds one entry per verified token; the upstream sees them joined with ",".
        ok.headers.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=name, value=",".join(values)),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        )
    ok.headers_to_remove.extend(authn.remove_headers)
    ok.query_parameters_to_remove.extend(authn.remove_query_params)
    return ok


def _merge_ok(
    acc: external_auth_pb2.OkHttpResponse | None, new: external_auth_pb2.OkHttpResponse | None
) -> external_auth_pb2.OkHttpResponse | None:
    if new is None:
        return acc
    if acc is None:
        out = external_auth_pb2.OkHttpResponse()
        out.CopyFrom(new)
        return out
    acc.MergeFrom(new)
    return acc

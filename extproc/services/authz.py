"""envoy.service.auth.v3.Authorization: ext_authz for HTTP and TCP.

The servicer is a thin shell: CheckRequest -> (decision cache | Attributes -> Enforcer) ->
Verdict -> CheckResponse. It reads the current snapshot once per call, so a concurrent
reload never mixes configurations.

The common request costs little: the request's decision key is read straight from the
CheckRequest (the values the snapshot's policies can read, see extproc/decision/cache.py),
and a request decided before with the same key gets its Verdict from the cache, already
encoded; only the peer metadata exchange and the trace context are added per request
(extproc/services/authz_render.py). Attributes are built, and the engines run, only on a miss.

In central mode (`--central`) one server checks for many sidecars: each Check names its
workload in the filter's context extensions (see services/central.py), and is checked
against that workload's snapshot, taken from one configuration generation. A Check that
names no usable workload is denied.

Responses are what users of Istio's native filters expect (see extproc/decision/decide.py),
and `dynamic_metadata` says what decided and why, under Envoy RBAC's own key names, so
access logs can print it with
%DYNAMIC_METADATA(envoy.filters.http.ext_authz:enforced_effective_policy_id)%.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2

from extproc.attributes import NO_LINES, Attributes, HeaderLines
from extproc.decision import decide as stages
from extproc.decision.cache import DecisionCache, KeyPlan, repeated_key_part
from extproc.services import authz_render as render
from extproc.services.central import ContextWorkloads, IdentityError
from extproc.services.check_adapter import CheckAdapter, MalformedRequest, http_headers
from extproc.services.enforcer import LATENCY_BUCKETS_S, AuthzStats, Enforcer
from extproc.snapshot.compiled import Snapshot
from extproc.telemetry import exchange as mx
from extproc.telemetry.record import Direction
from extproc.tracing.tracer import Tracing
from extproc.verdict import DENIED_BODY, Stage, Verdict

log = logging.getLogger("extproc.authz")

SERVICE = "envoy.service.auth.v3.Authorization"
DIRECTION_HEADER = "x-extproc-direction"

__all__ = ["LATENCY_BUCKETS_S", "AuthorizationService", "AuthzStats", "LogOnce", "direction_of", "malformed"]


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


# What Enforcer.decide needs for a Check the cache did not answer: its attributes, the time,
# the snapshot's decision cache and the request's key in it.
_Miss = tuple[Attributes, int, DecisionCache | None, tuple[object, ...] | None]


def direction_of(context: grpc.aio.ServicerContext[Any, Any], default: Direction) -> Direction:
    """The direction named in the call's initial metadata (the Envoy filter's
    `grpc_service.initial_metadata`), so one extproc can serve inbound and outbound listeners."""
    for key, value in context.invocation_metadata() or ():
        if key == DIRECTION_HEADER:
            return Direction.INBOUND if value == "inbound" else Direction.OUTBOUND if value == "outbound" else default
    return default


def _sized(raw: bytes) -> tuple[external_auth_pb2.CheckRequest, int]:
    """The request, and its encoded size: a request no larger than the header limit cannot hold
    a header block over it, so the exact count is needed only for larger ones."""
    return external_auth_pb2.CheckRequest.FromString(raw), len(raw)


def decision_key(
    plan: KeyPlan,
    a: external_auth_pb2.AttributeContext,
    h: external_auth_pb2.AttributeContext.HttpRequest,
    headers: Mapping[str, str],
    path: str,
    lines: HeaderLines = NO_LINES,
) -> tuple[object, ...]:
    """What the decision of this HTTP request can depend on, read straight from the CheckRequest:
    the connection (addresses, principals, SNI; the source port is not, nothing reads it), the
    method, the path policies match (`CheckAdapter.policy_path`), the host and scheme fields,
    the filter metadata when policies read it, and the headers the plan names, with their
    separate entries when a name repeats (`x: a` + `x: b` and `x: a,b` decide differently).
    The adapter builds Attributes from nothing else."""
    src = a.source
    dst = a.destination.address.socket_address
    key: tuple[object, ...] = (
        "ext_authz",
        h.method,
        path,
        h.host,
        h.scheme,
        src.address.socket_address.address,
        src.certificate,
        src.principal,
        dst.address,
        dst.port_value,
        a.tls_session.sni,
    )
    if plan.metadata:
        key += (a.metadata_context.SerializeToString(deterministic=True),)
    get = headers.get
    key += tuple([get(name) for name in plan.headers])
    return key + repeated_key_part(plan, lines) if lines else key


def malformed(stats: AuthzStats, log_bad: LogOnce, e: MalformedRequest, *, http: bool, what: str) -> Verdict:
    """The denial of a request extproc refuses to evaluate: counted, logged once per kind."""
    protocol = "http" if http else "tcp"
    stats.checks[protocol] += 1
    stats.count(stats.malformed, e.kind)
    stats.count(stats.decisions, (protocol, "denied", Stage.MALFORMED.value))
    log_bad(e.kind, f"denied a malformed {what}: {e}")
    return stages.malformed(e.kind, http=http)


class AuthorizationService:
    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        adapter: CheckAdapter | None = None,
        enforcer: Enforcer | None = None,
        exchange: mx.PeerExchange | None = None,
        direction: Direction = Direction.INBOUND,
        tracing: Tracing | None = None,
        central: ContextWorkloads | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._snapshot = snapshot
        self._clock = clock  # wall clock, for exp/nbf
        self.adapter = adapter if adapter is not None else CheckAdapter()
        self.enforcer = enforcer if enforcer is not None else Enforcer()
        self.stats: AuthzStats = self.enforcer.stats
        self.exchange = exchange
        self.central = central
        self.direction = direction
        self.tracing = tracing if tracing is not None and tracing.propagates else None
        self._log_bad = LogOnce(log)
        self._parts = render.ExchangeParts(exchange) if exchange is not None else None
        self._central_parts: dict[int, render.ExchangeParts] = {}

    def handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        """The Check method, answering with bytes it encoded itself (see authz_render)."""
        return {"Check": grpc.unary_unary_rpc_method_handler(self._rpc, request_deserializer=_sized)}

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        """One Check, for callers that hold a parsed request (the gRPC method uses `_rpc`)."""
        return await self._rpc((request, None), context)

    async def _rpc(
        self, sized: tuple[external_auth_pb2.CheckRequest, int | None], context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        request, size = sized
        started = time.perf_counter()
        stats = self.stats
        try:
            a = request.attributes
            parts = self._parts
            if self.central is not None:
                found = self.central.for_check(a)
                if isinstance(found, IdentityError):
                    return self._no_workload(request, found)
                snap, exchange = found
                parts = self._exchange_parts(exchange)
            else:
                snap = self._snapshot()
            direction = direction_of(context, self.direction) if context is not None else self.direction
            if not a.HasField("request"):
                return await self._tcp(request, snap, direction)

            h = a.request.http
            raw = h.headers
            if direction is Direction.OUTBOUND:
                stats.decided("http", stages.OUTBOUND_HTTP, None)
                out = [render.encoded(stages.OUTBOUND_HTTP)]
                if parts is not None:
                    out.append(parts.outbound)
                headers = raw if raw else self._headers_or_empty(h)
                allowed = True
            else:
                verdict, headers, miss = self._lookup(request, a, h, raw, size, snap)
                if miss is not None:  # not cached: the engines run, and may ask the network
                    verdict = await self.enforcer.decide(
                        snap, miss[0], now=miss[1], cache=miss[2], key=miss[3], custom_request=lambda: request
                    )
                assert verdict is not None  # _lookup answers with a verdict or with a miss
                out = [render.encoded(verdict)]
                if parts is not None:
                    got = raw.get(mx.METADATA_HEADER)
                    if got:
                        out.append(parts.allowed if verdict.allowed else parts.denied)
                        out.append(parts.received(got, raw.get(mx.METADATA_ID_HEADER, "")))
                allowed = verdict.allowed
            tracing = self.tracing
            if tracing is not None:
                trace = tracing.begin(headers)
                if trace is not None:
                    md = tracing.metadata(trace) if tracing.wants_span(trace) else None
                    out.append(render.trace_part(trace.headers, trace.remove, allowed, md))
            return b"".join(out)
        except Exception:  # a bug must deny, not crash the stream or the server
            return self._internal_error(request)
        finally:
            stats.observe(started)

    def _lookup(
        self,
        request: external_auth_pb2.CheckRequest,
        a: external_auth_pb2.AttributeContext,
        h: external_auth_pb2.AttributeContext.HttpRequest,
        raw: Mapping[str, str],
        size: int | None,
        snap: Snapshot,
    ) -> tuple[Verdict | None, Mapping[str, str], _Miss | None]:
        """An inbound HTTP Check's verdict when it is cached (or malformed), and its headers (a map
        with lower-case names, for the trace context); otherwise None, the headers, and what
        `Enforcer.decide` needs: (Attributes, now, cache, key). Synchronous, so a cached
        request costs no coroutine."""
        adapter = self.adapter
        enforcer = self.enforcer
        try:
            if raw and size is not None and size <= adapter.max_header_bytes and len(raw) <= adapter.max_headers:
                headers = raw  # the whole request is smaller than the header limit
                lines = NO_LINES  # the string map: Envoy joined repeated names already
                # Envoy lower-cases header names; a map that is not is read the slow way, so the
                # key sees exactly what the policies see.
                keyed = "".join(raw).islower()
            else:
                headers, lines = http_headers(h, adapter.max_headers, adapter.max_header_bytes)
                keyed = True
            path = adapter.policy_path(h.path)
            cache = enforcer.cache(snap)
            now = int(self._clock())
            key = None
            if cache is not None and keyed:
                key = decision_key(cache.plan, a, h, headers, path, lines)
                verdict = enforcer.cached(cache, key, now)
                if verdict is not None:
                    return verdict, headers, None
            attrs = adapter.attributes(request, headers, lines, path)
        except MalformedRequest as e:
            return self._malformed(e, http=True), raw, None
        return None, headers, (attrs, now, cache, key)

    def _headers_or_empty(self, h: external_auth_pb2.AttributeContext.HttpRequest) -> Mapping[str, str]:
        try:
            return http_headers(h, self.adapter.max_headers, self.adapter.max_header_bytes)[0]
        except MalformedRequest:
            return {}

    async def _tcp(self, request: external_auth_pb2.CheckRequest, snap: Snapshot, direction: Direction) -> bytes:
        """A network ext_authz Check: once per connection, so never cached."""
        if direction is Direction.OUTBOUND:
            self.stats.decided("tcp", stages.OUTBOUND_TCP, None)
            return render.encoded(stages.OUTBOUND_TCP)
        try:
            attrs = self.adapter.attributes(request)
        except MalformedRequest as e:
            return render.encoded(self._malformed(e, http=False))
        verdict = await self.enforcer.decide(snap, attrs, now=int(self._clock()), custom_request=lambda: request)
        return render.encoded(verdict)

    def _malformed(self, e: MalformedRequest, *, http: bool) -> Verdict:
        return malformed(self.stats, self._log_bad, e, http=http, what="CheckRequest")

    def _exchange_parts(self, exchange: mx.PeerExchange | None) -> render.ExchangeParts | None:
        """Central mode: each workload answers the exchange with its own metadata."""
        if exchange is None:
            return None
        parts = self._central_parts.get(id(exchange))
        if parts is None or parts.source is not exchange:
            if len(self._central_parts) >= 1024:
                self._central_parts.clear()
            parts = self._central_parts[id(exchange)] = render.ExchangeParts(exchange)
        return parts

    def _no_workload(self, request: external_auth_pb2.CheckRequest, problem: IdentityError) -> bytes:
        """Central mode, a Check that names no usable workload: fail closed (logged once per problem)."""
        is_http = request.attributes.HasField("request")
        protocol = "http" if is_http else "tcp"
        stats = self.stats
        stats.checks[protocol] += 1
        stats.count(stats.malformed, problem.kind)
        stats.count(stats.decisions, (protocol, "denied", Stage.MALFORMED.value))
        verdict = stages.error(
            f"central mode: no workload identity: {problem.message}",
            http=is_http,
            stage=Stage.MALFORMED,
            message=f"{DENIED_BODY}: no workload identity: {problem.message}",
        )
        return render.encoded(verdict)

    def _internal_error(self, request: external_auth_pb2.CheckRequest) -> bytes:
        self.stats.internal_errors += 1
        log.exception("internal error while checking a request; denying it")
        return render.encoded(stages.error("internal error", http=request.attributes.HasField("request")))

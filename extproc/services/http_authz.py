"""Envoy's HTTP authorization protocol (ext_authz `http_service`): the `authz-http` mode.

The same pipeline as the gRPC Check (extproc/services/authz.py), behind a cheaper transport:
HTTP check -> (decision cache | Attributes -> Enforcer) -> Verdict -> HTTP response. The
listener (extproc/server/check_http.py) calls the service with the parsed request; a check
whose decision is cached is answered synchronously, with the verdict's rendered bytes joined
to the per-request lines (peer metadata exchange, trace context), and no coroutine is made.
Only a check the engines must decide returns a coroutine, which the listener awaits.

The connection facts come from the `x-extproc-connection` header the Envoy config writes
(extproc/services/http_check_adapter.py says why it can be trusted), the direction from
`x-extproc-direction`; a check without the connection header is denied as malformed, and
counted, and logged once: the Envoy in front is not configured as envoy/authz-http.yaml is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from extproc.attributes import Attributes, HeaderLines
from extproc.decision import decide as stages
from extproc.decision.cache import DecisionCache
from extproc.services import http_check_render as render
from extproc.services.authz import LogOnce, malformed
from extproc.services.check_adapter import CheckAdapter
from extproc.services.enforcer import AuthzStats, Enforcer
from extproc.services.headers import MalformedRequest, check_size
from extproc.services.http_check_adapter import DIRECTION_HEADER, Connection, HttpCheckAdapter
from extproc.snapshot.compiled import Snapshot
from extproc.telemetry import exchange as mx
from extproc.telemetry.record import Direction
from extproc.tracing.tracer import Tracing
from extproc.verdict import Verdict

log = logging.getLogger("extproc.authz")

_DIRECTIONS = {"inbound": Direction.INBOUND, "outbound": Direction.OUTBOUND}

# What a check the cache could not answer hands to the engines: (Attributes, now, cache, key, connection).
Miss = tuple[Attributes, int, DecisionCache | None, tuple[object, ...] | None, Connection]

__all__ = ["HttpAuthorizationService"]


class HttpAuthorizationService:
    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        adapter: CheckAdapter | None = None,
        enforcer: Enforcer | None = None,
        exchange: mx.PeerExchange | None = None,
        direction: Direction = Direction.INBOUND,
        tracing: Tracing | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._snapshot = snapshot
        self._clock = clock  # wall clock, for exp/nbf
        self.core = adapter if adapter is not None else CheckAdapter()
        self.adapter = HttpCheckAdapter(self.core)
        self.enforcer = enforcer if enforcer is not None else Enforcer()
        self.stats: AuthzStats = self.enforcer.stats
        self.direction = direction
        self.tracing = tracing if tracing is not None and tracing.propagates else None
        self.lines = render.ExchangeLines(exchange) if exchange is not None else None
        self._log_bad = LogOnce(log)
        # Allowed requests whose query parameters a CUSTOM provider wanted set: http_service cannot.
        self.dropped_query_changes = 0

    def __call__(
        self, method: str, target: str, headers: dict[str, str], lines: HeaderLines, body: bytes, bad: str, size: int
    ) -> bytes | Awaitable[bytes]:
        """One check: the response, or a coroutine for it when the engines must run."""
        started = time.perf_counter()
        decided_later = False
        try:
            head_only = method == "HEAD"
            direction = _DIRECTIONS.get(headers.get(DIRECTION_HEADER, ""), self.direction)
            if direction is Direction.OUTBOUND:
                self.stats.decided("http", stages.OUTBOUND_HTTP, None)
                return self._answer(stages.OUTBOUND_HTTP, headers, head_only, outbound=True)
            snap = self._snapshot()
            try:
                verdict, miss = self._lookup(snap, method, target, headers, lines, bad, size)
            except MalformedRequest as e:
                verdict, miss = malformed(self.stats, self._log_bad, e, http=True, what="HTTP check"), None
            if miss is None:
                assert verdict is not None  # _lookup answers with a verdict or with a miss
                return self._answer(verdict, headers, head_only)
            decided_later = True
            return self._decide(snap, miss, body, headers, head_only, started)
        except Exception:  # a bug must deny, not crash the connection or the server
            return self._internal_error()
        finally:
            if not decided_later:
                self.stats.observe(started)

    def _lookup(
        self, snap: Snapshot, method: str, target: str, headers: dict[str, str], lines: HeaderLines, bad: str, size: int
    ) -> (
        tuple[Verdict, None]
        | tuple[None, tuple[Attributes, int, DecisionCache | None, tuple[object, ...] | None, Connection]]
    ):
        """The verdict when it is cached; otherwise what `Enforcer.decide` needs. Raises
        MalformedRequest for a check extproc refuses to evaluate."""
        core = self.core
        if bad:
            raise MalformedRequest("bad-header-encoding", f"header {bad!r} is not UTF-8")
        if len(headers) > core.max_headers:
            raise MalformedRequest("too-many-headers", f"{len(headers)} headers")
        if size > core.max_header_bytes:
            check_size(headers, core.max_header_bytes)  # the exact count, only when it can matter
        adapter = self.adapter
        conn = adapter.connection(headers)
        path = core.policy_path(target)
        cache = self.enforcer.cache(snap)
        now = int(self._clock())
        key = None
        if cache is not None:
            key = adapter.decision_key(cache.plan, method, path, headers, lines, conn)
            verdict = self.enforcer.cached(cache, key, now)
            if verdict is not None:
                return verdict, None
        attrs = adapter.attributes(method, target, path, headers, lines, conn)
        return None, (attrs, now, cache, key, conn)

    async def _decide(
        self,
        snap: Snapshot,
        miss: Miss,
        body: bytes,
        headers: dict[str, str],
        head_only: bool,
        started: float,
    ) -> bytes:
        attrs, now, cache, key, conn = miss
        try:
            verdict = await self.enforcer.decide(
                snap,
                attrs,
                now=now,
                cache=cache,
                key=key,
                custom_request=lambda: self.adapter.check_request(attrs, conn, body),
            )
            if verdict.set_query:
                self._query_changes()
            return self._answer(verdict, headers, head_only)
        except Exception:
            return self._internal_error()
        finally:
            self.stats.observe(started)

    def _answer(self, verdict: Verdict, headers: dict[str, str], head_only: bool, *, outbound: bool = False) -> bytes:
        r = render.rendered(verdict)
        out = [r.head]
        exchange = self.lines
        if exchange is not None:
            if outbound:
                out.append(exchange.outbound)
            else:
                got = headers.get(mx.METADATA_HEADER)
                if got:
                    out.append(exchange.allowed if verdict.allowed else exchange.denied)
                    out.append(exchange.received(got, headers.get(mx.METADATA_ID_HEADER, "")))
        tracing = self.tracing
        if tracing is not None:
            trace = tracing.begin(headers)
            if trace is not None:
                md = tracing.metadata(trace) if tracing.wants_span(trace) else None
                out.append(render.trace_lines(trace.headers, trace.remove, verdict.allowed, md))
        out.append(r.tail_no_body if head_only else r.tail)
        return b"".join(out)

    def _query_changes(self) -> None:
        """http_service cannot set query parameters: counted, and logged once."""
        self.dropped_query_changes += 1
        self._log_bad(
            "query-changes",
            "a CUSTOM provider asked to set query parameters, which ext_authz over HTTP cannot do; they were "
            "not set (use authz+als or extproc for such providers)",
        )

    def _internal_error(self) -> bytes:
        """A bug denies the request as the gRPC Check does (403, metadata saying `error`)."""
        self.stats.internal_errors += 1
        log.exception("internal error while checking a request; denying it")
        r = render.rendered(stages.error("internal error", http=True))
        return r.head + r.tail

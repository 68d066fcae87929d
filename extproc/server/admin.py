"""The admin HTTP listener: /healthz, /readyz, /metrics and /debug/*.

It runs on the same event loop as the gRPC server but owns no logic: every handler
renders state that the engines and the reloader already keep.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import asdict
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString as _float_to_go_string

from extproc import __version__
from extproc.authn.cache import TokenCache
from extproc.authn.jwks_source import JwksRegistry
from extproc.authz import engine
from extproc.debug import attributes_from_description
from extproc.server.http import Request, Response, Routes
from extproc.services.authz import LATENCY_BUCKETS_S, AuthzStats
from extproc.services.central import ContextWorkloads
from extproc.snapshot.central import workload_key
from extproc.snapshot.compiled import Snapshot
from extproc.snapshot.reload import SnapshotHolder
from extproc.telemetry.peer import PeerCache
from extproc.telemetry.recorder import Telemetry, WorkloadSinks
from extproc.tracing.tracer import Tracing

# prometheus_client's rendering of a float as Prometheus writes it (untyped there).
floatToGoString: Callable[[float], str] = _float_to_go_string


class TelemetryCollector(Collector):
    """extproc's view of its own telemetry pipeline: sources, series, bounds."""

    def __init__(self, telemetry: Telemetry, sources: Callable[[], dict[str, int]]) -> None:
        self.t = telemetry
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        t = self.t
        rec = CounterMetricFamily(
            "extproc_telemetry_requests", "HTTP requests recorded in the standard metrics, by source", labels=["source"]
        )
        for source, n in sorted(t.recorder.stats.http.items()):
            rec.add_metric([source], n)
        yield rec
        yield CounterMetricFamily(
            "extproc_telemetry_duplicates",
            "Access log entries not counted because ext_proc already recorded the request",
            value=t.recorder.stats.http_duplicates,
        )
        yield CounterMetricFamily(
            "extproc_telemetry_tcp_reports", "TCP access log reports recorded", value=t.recorder.stats.tcp_reports
        )
        yield GaugeMetricFamily(
            "extproc_telemetry_tcp_connections",
            "TCP connections whose byte totals are being tracked",
            value=len(t.tcp.connections) + (t.workloads.connections if t.workloads is not None else 0),
        )
        series = GaugeMetricFamily(
            "extproc_telemetry_series", "Series held per standard metric (cardinality)", labels=["metric"]
        )
        for name, n in sorted(t.store.series_counts().items()):
            series.add_metric([name], n)
        yield series
        yield GaugeMetricFamily(
            "extproc_telemetry_series_limit", "Most series kept before overflow", value=t.store.max_series
        )
        over = CounterMetricFamily(
            "extproc_telemetry_overflow_records",
            "Records added to a metric's overflow series because the series limit was reached",
            labels=["metric"],
        )
        for name, n in sorted(t.store.overflow_counts().items()):
            over.add_metric([name], n)
        yield over
        yield CounterMetricFamily(
            "extproc_telemetry_evicted_series", "Series dropped after being idle", value=t.store.evicted
        )
        src = CounterMetricFamily(
            "extproc_telemetry_source_events",
            "Access log entries and ext_proc streams received, by kind",
            labels=["kind"],
        )
        for kind, n in sorted(self.sources().items()):
            src.add_metric([kind], n)
        yield src


class CentralCollector(Collector):
    """Central mode: the per-workload caches, and what could not be attributed to a workload."""

    def __init__(
        self,
        holder: SnapshotHolder,
        checks: ContextWorkloads,
        sinks: WorkloadSinks,
        unidentified_entries: Callable[[], int],
    ) -> None:
        self.holder = holder
        self.checks = checks
        self.sinks = sinks
        self.unidentified_entries = unidentified_entries

    def lookups(self) -> list[tuple[str, int, int]]:
        """(cache, hits, misses) rows for extproc_cache_lookups_total: the snapshot of a Check's
        workload, the parsed destination.* values of a Check, an access log stream's workload."""
        st = self.holder.cache_stats
        return [
            ("workload_snapshot", st.hits, st.misses),
            ("context_extensions", self.checks.hits, self.checks.misses),
            ("node_workload", self.sinks.hits, self.sinks.misses),
        ]

    def collect(self) -> Iterator[Metric]:
        h = self.holder
        st = h.cache_stats
        cached = len(h.workloads) if h.workloads is not None else 0
        yield GaugeMetricFamily(
            "extproc_workload_snapshots", "Per-workload snapshots cached (central mode)", value=cached
        )
        yield GaugeMetricFamily(
            "extproc_workload_snapshots_limit", "Most per-workload snapshots cached (central mode)", value=h.cache_size
        )
        evictions = CounterMetricFamily(
            "extproc_cache_evictions", "Cache entries evicted to stay within bounds (LRU)", labels=["cache"]
        )
        evictions.add_metric(["workload_snapshot"], st.evictions)
        evictions.add_metric(["node_workload"], self.sinks.evictions)
        yield evictions
        yield CounterMetricFamily(
            "extproc_access_log_unidentified_entries",
            "Access log entries dropped in central mode because their stream's Envoy node named no workload",
            value=self.unidentified_entries(),
        )


class TracingCollector(Collector):
    """Trace contexts handled and spans exported: is the tracing pipeline keeping up?"""

    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing

    def collect(self) -> Iterator[Metric]:
        t = self.tracing
        ctx = CounterMetricFamily(
            "extproc_trace_contexts",
            "Requests whose trace context extproc continued or started, and whether it sampled them",
            labels=["trace", "sampled"],
        )
        for (trace, sampled), n in sorted(t.contexts.items()):
            ctx.add_metric([trace, sampled], n)
        yield ctx
        sink = t.sink
        if sink is None:
            return
        st = sink.stats
        spans = CounterMetricFamily(
            "extproc_spans",
            "Spans by fate: submitted to the export queue, dropped because it was full, "
            "exported, or lost in a failed export",
            labels=["outcome"],
        )
        for outcome, n in (
            ("submitted", st.submitted),
            ("dropped", st.dropped),
            ("exported", st.exported),
            ("failed", st.failed),
        ):
            spans.add_metric([outcome], n)
        yield spans
        yield GaugeMetricFamily("extproc_spans_queued", "Spans waiting for export", value=st.queued)


class RuntimeCollector(Collector):
    """The process as a long run sees it: the asyncio tasks alive on the serving loop (a leak
    of streams or timers shows as a count that climbs), next to prometheus_client's standard
    process_* metrics (resident memory, open file descriptors, start time: the last tells
    Prometheus a counter that went down belongs to a restarted process)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def collect(self) -> Iterator[Metric]:
        for _ in range(3):  # the set may change while a scrape thread walks it
            try:
                tasks = len(asyncio.all_tasks(self.loop))
                break
            except RuntimeError:
                continue
        else:
            return
        yield GaugeMetricFamily("extproc_asyncio_tasks", "asyncio tasks alive on the serving loop", value=tasks)


class ExtprocCollector(Collector):
    """Renders extproc's own counters at scrape time; requests only bump plain ints."""

    def __init__(
        self,
        stats: AuthzStats,
        holder: SnapshotHolder,
        cert_cache_stats: Callable[[], tuple[int, int]],
        jwks: JwksRegistry | None = None,
        token_cache: TokenCache | None = None,
        peer_cache: PeerCache | None = None,
        extra_caches: Callable[[], Iterable[tuple[str, int, int]]] | None = None,
        unnormalized_paths: Callable[[], tuple[str, int]] | None = None,
    ) -> None:
        self.unnormalized_paths = unnormalized_paths
        self.peer_cache = peer_cache
        self.extra_caches = extra_caches
        self.stats = stats
        self.holder = holder
        self.cert_cache_stats = cert_cache_stats
        self.jwks = jwks
        self.token_cache = token_cache

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        checks = CounterMetricFamily("extproc_checks", "ext_authz Check calls received", labels=["protocol"])
        for proto, n in sorted(s.checks.items()):
            checks.add_metric([proto], n)
        yield checks
        dec = CounterMetricFamily(
            "extproc_authz_decisions",
            "Authorization decisions by outcome and deciding stage",
            labels=["protocol", "result", "stage"],
        )
        for (proto, result, stage), n in sorted(s.decisions.items()):
            dec.add_metric([proto, result, stage], n)
        yield dec
        bad = CounterMetricFamily("extproc_malformed_requests", "Check requests denied as malformed", labels=["kind"])
        for kind, n in sorted(s.malformed.items()):
            bad.add_metric([kind], n)
        yield bad
        if self.unnormalized_paths is not None:
            mode, n = self.unnormalized_paths()
            paths = CounterMetricFamily(
                "extproc_unnormalized_paths",
                "HTTP requests whose path Envoy should already have normalized (its normalization is weaker than "
                "--path-normalization); policies matched the normalized path",
                labels=["normalization"],
            )
            paths.add_metric([mode], n)
            yield paths
        misconfigured = CounterMetricFamily(
            "extproc_misconfigured_requests",
            "Requests that arrived without a setting the Envoy filter needs (see the README's settings tables)",
            labels=["kind"],
        )
        for kind, n in sorted(s.misconfigured.items()):
            misconfigured.add_metric([kind], n)
        yield misconfigured
        yield CounterMetricFamily(
            "extproc_internal_errors", "Checks denied because of an internal error", value=s.internal_errors
        )
        custom = CounterMetricFamily(
            "extproc_custom_calls", "Calls to CUSTOM providers", labels=["provider", "outcome"]
        )
        for (prov, outcome), n in sorted(s.custom_calls.items()):
            custom.add_metric([prov, outcome], n)
        yield custom
        dry = CounterMetricFamily("extproc_dry_run_results", "Dry-run policy evaluations", labels=["action", "result"])
        for (action, result), n in sorted(s.dry_run.items()):
            dry.add_metric([action, result], n)
        yield dry
        yield CounterMetricFamily("extproc_audit_matches", "Requests matched by an AUDIT policy", value=s.audit_hits)
        cum, buckets = 0, []
        for bound, n in zip(LATENCY_BUCKETS_S, s.latency_counts, strict=False):
            cum += n
            buckets.append((floatToGoString(bound), cum))
        buckets.append(("+Inf", cum + s.latency_counts[-1]))
        yield HistogramMetricFamily(
            "extproc_check_duration_seconds",
            "Time extproc took to answer ext_authz Check calls",
            buckets=buckets,
            sum_value=s.latency_sum_s,
        )
        reloads = CounterMetricFamily("extproc_config_reloads", "Configuration loads", labels=["result"])
        reloads.add_metric(["success"], self.holder.counters.success)
        reloads.add_metric(["failure"], self.holder.counters.failure)
        yield reloads
        snap = self.holder.current
        yield GaugeMetricFamily(
            "extproc_config_snapshot_version", "Version of the serving snapshot", value=snap.version
        )
        yield GaugeMetricFamily(
            "extproc_config_last_reload_success", "1 if the last reload succeeded", value=int(self.holder.last.ok)
        )
        yield GaugeMetricFamily(
            "extproc_policies_applied", "AuthorizationPolicies applied to this workload", value=len(snap.policies)
        )
        hits, misses = self.cert_cache_stats()
        cache = CounterMetricFamily("extproc_cache_lookups", "Cache lookups", labels=["cache", "result"])
        cache.add_metric(["peer_certificate", "hit"], hits)
        cache.add_metric(["peer_certificate", "miss"], misses)
        if self.token_cache is not None:
            cache.add_metric(["jwt_signature", "hit"], self.token_cache.hits)
            cache.add_metric(["jwt_signature", "miss"], self.token_cache.misses)
        if self.peer_cache is not None:
            cache.add_metric(["peer_metadata", "hit"], self.peer_cache.hits)
            cache.add_metric(["peer_metadata", "miss"], self.peer_cache.misses)
        cache.add_metric(["decision", "hit"], s.cache.hits)
        cache.add_metric(["decision", "miss"], s.cache.misses)
        for name, hits, misses in self.extra_caches() if self.extra_caches is not None else ():
            cache.add_metric([name, "hit"], hits)
            cache.add_metric([name, "miss"], misses)
        yield cache
        decisions = snap.memo.get("decisions")
        yield GaugeMetricFamily(
            "extproc_decision_cache_entries",
            "HTTP decisions the serving snapshot's cache holds",
            value=len(decisions) if decisions is not None else 0,
        )
        yield CounterMetricFamily(
            "extproc_decision_cache_evictions",
            "Decisions evicted from the decision cache to stay within --decision-cache-size",
            value=s.cache.evictions,
        )
        yield CounterMetricFamily(
            "extproc_decision_cache_uncacheable",
            "Decisions not cached: a CUSTOM provider was asked, keys were fetched, or the request had no usable key",
            value=s.cache.uncacheable,
        )
        if self.token_cache is not None:
            yield GaugeMetricFamily(
                "extproc_jwt_cache_entries", "Tokens held by the JWT cache", value=len(self.token_cache)
            )
        jwt = CounterMetricFamily(
            "extproc_jwt_verifications",
            "RequestAuthentication outcomes: verified, no_token, cors_preflight, or the failure status",
            labels=["outcome"],
        )
        for outcome, n in sorted(s.jwt.items()):
            jwt.add_metric([outcome], n)
        yield jwt
        yield CounterMetricFamily(
            "extproc_jwt_rechecks",
            "Requests verified again after their key source was refetched (first fetch or unknown kid)",
            value=s.jwt_refetch_retries,
        )
        yield GaugeMetricFamily(
            "extproc_jwt_rules_applied", "jwtRules applied to this workload", value=len(snap.authn.providers)
        )
        if self.jwks is not None:
            fetches = CounterMetricFamily(
                "extproc_jwks_fetches", "JWKS fetches by key source and result", labels=["issuer", "source", "result"]
            )
            nkeys = GaugeMetricFamily("extproc_jwks_keys", "Keys currently held", labels=["issuer", "source"])
            age = GaugeMetricFamily(
                "extproc_jwks_last_success_timestamp_seconds",
                "Unix time of the last successful fetch (0 = never)",
                labels=["issuer", "source"],
            )
            kid = CounterMetricFamily(
                "extproc_jwks_kid_refetches", "Refetches triggered by an unknown kid", labels=["issuer", "source"]
            )
            for key, st in sorted(self.jwks.states.items()):
                lbl = [st.source.issuer, key]
                for result, n in sorted(st.fetches.items()):
                    fetches.add_metric([*lbl, result], n)
                nkeys.add_metric(lbl, len(st.keys.keys) if st.keys else 0)
                age.add_metric(lbl, st.last_success or 0)
                kid.add_metric(lbl, st.kid_refreshes)
            yield fetches
            yield nkeys
            yield age
            yield kid
        info = GaugeMetricFamily("extproc_build_info", "extproc version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info


def istio_build() -> bytes:
    """Istio's `istio_build` gauge, so dashboards that show the data-plane version find one."""
    return (
        "# HELP istio_build Istio component build info\n# TYPE istio_build gauge\n"
        f'istio_build{{component="proxy",tag="extproc-{__version__}"}} 1\n'
    ).encode()


METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _json(data: Any, status: int = 200) -> Response:
    return Response(status, (json.dumps(data, indent=2, default=str) + "\n").encode(), "application/json")


class AdminApp:
    def __init__(
        self,
        holder: SnapshotHolder,
        stats: AuthzStats,
        collector: ExtprocCollector,
        jwks: JwksRegistry | None = None,
        telemetry: Telemetry | None = None,
        extra_collectors: tuple[Collector, ...] = (),
    ) -> None:
        self.holder = holder
        self.stats = stats
        self.jwks = jwks
        self.telemetry = telemetry
        self.draining = False
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        for c in extra_collectors:
            self.registry.register(c)
        self.routes = Routes()
        for path, handler in (
            ("/healthz", self.healthz),
            ("/readyz", self.readyz),
            ("/metrics", self.metrics),
            ("/debug/config", self.debug_config),
            ("/debug/jwks", self.debug_jwks),
        ):
            self.routes.add("GET", path, handler)
        self.routes.add("POST", "/debug/explain", self.debug_explain)

    async def debug_jwks(self, _: Request) -> Response:
        """The applied jwtRules and, for remote key sources, fetch status and key age."""
        snap = self.holder.current
        states = self.jwks.states if self.jwks is not None else {}
        rules = []
        for p in snap.authn.providers:
            entry: dict[str, Any] = {"provider": p.name, "issuer": p.issuer, "requestAuthentication": p.origin}
            if p.inline_keys is not None:
                entry["keys"] = "inline"
                entry["kids"] = [k.kid for k in p.inline_keys.keys]
            elif p.remote is not None:
                st = states.get(p.remote.key)
                entry["keys"] = st.describe() if st is not None else {"haveKeys": False}
            rules.append(entry)
        return _json({"snapshot_version": snap.version, "jwtRules": rules})

    async def healthz(self, _: Request) -> Response:
        return Response(200, b"ok\n")

    def _status(self) -> dict[str, Any]:
        snap = self.holder.current
        last = self.holder.last
        out: dict[str, Any] = {
            "ready": not self.draining,
            "draining": self.draining,
            "mode": "central" if self.holder.central else "sidecar",
            "snapshot_version": snap.version,
            "policies": len(snap.policies),
            "last_reload": {
                "ok": last.ok,
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last.at)),
                "errors": list(last.errors),
                "warnings": list(last.warnings),
            },
        }
        if self.holder.workloads is not None:
            out["workload_snapshots"] = len(self.holder.workloads)
        return out

    async def readyz(self, _: Request) -> Response:
        # A snapshot always exists once the server listens (the first load must succeed),
        # so readiness only ends when draining; a failed reload is reported, not fatal.
        return _json(self._status(), 503 if self.draining else 200)

    async def metrics(self, _: Request) -> Response:
        return Response(200, content_type=METRICS_TYPE, stream=self._metrics_stream())

    async def _metrics_stream(self) -> AsyncIterator[bytes]:
        """The body piece by piece: each piece is rendered in a worker thread, so a large scrape
        never stalls the gRPC loop for its whole duration, and sent before the next is made, so
        memory holds one piece, not the whole body (145 MB at 10 000 series)."""
        own = await asyncio.to_thread(generate_latest, self.registry)
        if self.telemetry is not None:
            pieces = self.telemetry.store.render_chunks()
            while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                yield piece.encode()
            yield istio_build()
        yield own

    async def debug_config(self, _: Request) -> Response:
        snap = self.holder.current
        workloads = self.holder.workloads
        out: dict[str, Any] = {**self._status()}
        if workloads is None:
            out["workload"] = {
                "namespace": snap.workload.namespace,
                "name": snap.workload.name,
                "labels": dict(snap.workload.labels),
                "root_namespace": snap.workload.root_namespace,
                "trust_domains": list(snap.workload.trust_domains.domains),
            }
        else:
            st = self.holder.cache_stats
            out["central"] = {
                "root_namespace": snap.workload.root_namespace,
                "trust_domains": list(snap.workload.trust_domains.domains),
                "workload_snapshots": len(workloads),
                "limit": workloads.size,
                "hits": st.hits,
                "misses": st.misses,
                "evictions": st.evictions,
                # Most recently used first: which policies apply to each workload served so far.
                "workloads": [
                    {
                        "namespace": w.workload.namespace,
                        "labels": dict(w.workload.labels),
                        "applied": [f"{p.ref.namespace}/{p.ref.name}" for p in w.policies],
                        "jwt_rules": len(w.authn.providers),
                    }
                    for w in reversed(workloads.snapshots())
                ],
            }
        out.update(
            {
                "options": asdict(snap.options),
                "files": list(snap.files),
                # Central mode: every policy loaded (each workload's share is under central.workloads).
                "applied": [
                    {
                        "policy": f"{p.ref.namespace}/{p.ref.name}",
                        "action": str(p.ref.action),
                        "dry_run": p.ref.dry_run,
                        "provider": p.ref.provider,
                        "origin": p.ref.origin,
                        "http_rules": [r.rule_id for r in p.http if not r.never],
                        "tcp_rules": [r.rule_id for r in p.tcp if not r.never],
                    }
                    for p in snap.policies
                ],
                "ignored": [{"policy": name, "why": why} for name, why in snap.ignored_policies],
                "providers": {name: type(s).__name__ for name, s in snap.providers.items()},
                # Entries istiod would keep as unusable: the CUSTOM rules naming them deny.
                "invalid_providers": {name: list(bad.problems) for name, bad in snap.invalid_providers.items()},
                # WorkloadEntry/ServiceEntry: who a peer that exchanges no metadata is, by address.
                "peers": {
                    ip: [
                        {
                            "workload": f"{e.workload.namespace}/{e.workload.workload_name}",
                            "principal": e.principal,
                            "origin": e.origin,
                        }
                        for e in entries
                    ]
                    for ip, entries in snap.directory.by_address.items()
                },
                "services": {
                    host: f"{svc.namespace}/{svc.short_name}" for host, svc in snap.directory.services.items()
                },
            }
        )
        return _json(out)

    def _explained_snapshot(self, desc: Any) -> Snapshot:
        """The snapshot to explain against; central mode needs the request's `workload`."""
        workloads = self.holder.workloads
        if workloads is None:
            return self.holder.current
        w = desc.pop("workload", None) if isinstance(desc, dict) else None
        if not isinstance(w, dict) or not isinstance(w.get("namespace"), str) or not w["namespace"]:
            raise ValueError(
                'central mode: describe the workload too, e.g. "workload": {"namespace": "shop", '
                '"labels": {"app": "cart"}}'
            )
        labels = w.get("labels") or {}
        if not isinstance(labels, dict):
            raise ValueError("workload.labels must be an object of strings")
        return workloads.build(workload_key(w["namespace"], {str(k): str(v) for k, v in labels.items()}))

    async def debug_explain(self, request: Request) -> Response:
        try:
            desc = json.loads(request.body)
            snap = self._explained_snapshot(desc)
            attrs = attributes_from_description(desc, snap.options.xff_num_trusted_hops)
        except (ValueError, TypeError) as e:
            return _json({"error": str(e)}, 400)
        program = snap.http if attrs.is_http else snap.tcp
        hits, bad = engine.custom_providers(program, attrs)
        decision = engine.bad_custom_decision(program, bad) if bad else engine.evaluate(program, attrs)
        return _json(
            {
                "decision": decision.engine_result,
                "stage": decision.stage,
                "policy": decision.policy_id,
                "reason": decision.reason,
                "custom_providers_called": [{"provider": p, "rule": r} for p, r in hits],
                "audit": decision.audit_policy_id,
                "dry_run": [
                    {"action": str(s.action), "result": s.engine_result, "policy": s.policy_id} for s in decision.shadow
                ],
                "rules": [asdict(t) for t in engine.trace(program, attrs)],
            }
        )

"""The admin HTTP listener: /healthz, /readyz, /metrics and /debug/*.

It runs on the same event loop as the gRPC server but owns no logic: every handler
renders state that the engines and the reloader already keep.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from extproc import __version__
from extproc.authn.jwks_source import JwksRegistry
from extproc.authz import engine
from extproc.debug import attributes_from_description
from extproc.server.http import Request, Response, Routes
from extproc.services.authz import AuthzStats
from extproc.snapshot.central import workload_key
from extproc.snapshot.compiled import Snapshot
from extproc.snapshot.reload import SnapshotHolder
from extproc.telemetry.recorder import Telemetry


class RuntimeCollector(Collector):
    """The process as a long run sees it: its version, the asyncio tasks alive on the serving
    loop (a leak of streams or timers shows as a count that climbs), next to prometheus_client's standard
    process_* metrics (resident memory, open file descriptors, start time: the last tells
    Prometheus a counter that went down belongs to a restarted process)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("extproc_build_info", "extproc version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        for _ in range(3):  # the set may change while a scrape thread walks it
            try:
                tasks = len(asyncio.all_tasks(self.loop))
                break
            except RuntimeError:
                continue
        else:
            return
        yield GaugeMetricFamily("extproc_asyncio_tasks", "asyncio tasks alive on the serving loop", value=tasks)


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
        collectors: tuple[Collector, ...],
        jwks: JwksRegistry | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        """`collectors`: every source of /metrics; each lives beside the data it reads and this
        server only registers them."""
        self.holder = holder
        self.stats = stats
        self.jwks = jwks
        self.telemetry = telemetry
        self.draining = False
        self.registry = CollectorRegistry(auto_describe=False)
        for c in collectors:
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

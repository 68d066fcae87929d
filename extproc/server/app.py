"""Process wiring for `extproc serve`: gRPC services, admin listener, config watcher,
signals and graceful drain.

Start-up order matters: the first config load must succeed before anything
listens, so Envoy never talks to a server without policies. On SIGTERM/SIGINT the
health service and /readyz turn NOT_SERVING, the gRPC server stops accepting new
calls and gives in-flight ones `--drain-timeout` to finish, then the process exits 0.
SIGHUP forces a reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from typing import Any

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2, external_processor_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import ProcessCollector
from prometheus_client.registry import Collector

from extproc.authn.cache import TokenCache, TokenCacheCollector
from extproc.authn.jwks_source import JwksCollector, JwksRegistry
from extproc.config.errors import ConfigError
from extproc.lru import CacheCollector
from extproc.path_normalization import Mode as PathNormalization
from extproc.server import check_http, http
from extproc.server.admin import (
    AdminApp,
    RuntimeCollector,
)
from extproc.server.settings import ServeSettings
from extproc.services.accesslog import AccessLogService
from extproc.services.authz import AuthorizationService
from extproc.services.central import CentralCollector, ContextWorkloads, NodeWorkloads
from extproc.services.check_adapter import CheckAdapter
from extproc.services.custom import ProviderPool
from extproc.services.enforcer import AuthzCollector, AuthzStats, Enforcer
from extproc.services.http_authz import HttpAuthorizationService
from extproc.services.processor import CentralModeProcessor, ExternalProcessorService
from extproc.snapshot.central import DEFAULT_CACHE_SIZE, WorkloadSnapshots, mesh_identity
from extproc.snapshot.compiled import Options, WorkloadIdentity
from extproc.snapshot.reload import SnapshotCollector, SnapshotHolder
from extproc.telemetry.collector import TelemetryCollector
from extproc.telemetry.exchange import PeerExchange
from extproc.telemetry.peer import Workload
from extproc.telemetry.record import Direction, ServiceInfo
from extproc.telemetry.recorder import Telemetry
from extproc.tracing.collector import TracingCollector
from extproc.tracing.context import Format
from extproc.tracing.spans import ExportSettings
from extproc.tracing.tracer import Tracing, TracingSettings
from extproc.workload import node_id

log = logging.getLogger("extproc")

AUTHZ_SERVICE_NAME = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
ALS_SERVICE_NAME = als_pb2.DESCRIPTOR.services_by_name["AccessLogService"].full_name
EXT_PROC_SERVICE_NAME = external_processor_pb2.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
TELEMETRY_TICK_S = 10.0
HTTP_CHECK_HEAD_SLACK = 16 * 1024
GRPC_MAX_MESSAGE = 8 * 1024 * 1024  # Envoy may send up to ~8 MiB of headers (max_request_headers_kb=8192)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("grpc").setLevel(logging.WARNING)


CENTRAL_WORKLOAD = "extproc-central"  # the central server's own name, for its spans


def workload_of(settings: ServeSettings) -> WorkloadIdentity:
    """The sidecar's workload; in central mode, the template each request's workload is made from."""
    if settings.central:
        return mesh_identity(settings.root_namespace, settings.trust_domain, settings.trust_domain_aliases)
    return WorkloadIdentity(
        namespace=settings.namespace,
        labels=dict(settings.labels),
        name=settings.workload,
        root_namespace=settings.root_namespace,
        trust_domain=settings.trust_domain,
        trust_domain_aliases=settings.trust_domain_aliases,
    )


def local_workload(settings: ServeSettings) -> Workload:
    if settings.central:
        # Metrics and the exchange use each request's workload; this one only names the
        # server in its own spans.
        return Workload.from_labels(
            {}, workload_name=CENTRAL_WORKLOAD, namespace=settings.root_namespace, cluster=settings.cluster
        )
    # No IDENTITY in what the exchange sends: a sidecar's node metadata has none, and a peer
    # must learn our principal from our certificate, as from Istio's sidecars.
    return Workload.from_labels(
        settings.labels,
        workload_name=settings.workload,
        namespace=settings.namespace,
        cluster=settings.cluster,
    )


def telemetry_of(settings: ServeSettings) -> tuple[Telemetry, PeerExchange]:
    local = local_workload(settings)
    service = ServiceInfo(settings.service_host) if settings.service_host else None
    telemetry = Telemetry.create(
        local, service, max_series=settings.metrics_max_series, idle_expiry_s=settings.metrics_idle_expiry_s
    )
    if settings.central:
        telemetry.per_workload(service)
    return telemetry, PeerExchange(local, settings.node_id or node_id(settings.workload, local.namespace))


def tracing_of(settings: ServeSettings, local: Workload) -> Tracing:
    export = None
    if settings.otlp_endpoint:
        export = ExportSettings(
            endpoint=settings.otlp_endpoint,
            insecure=not settings.otlp_endpoint.startswith("https://"),
            max_queue_size=settings.trace_queue_size,
        )
    formats = tuple(Format(f) for f in settings.trace_formats)
    return Tracing(TracingSettings(formats, settings.trace_sampling, export if formats else None), local)


async def _telemetry_upkeep(telemetry: Telemetry) -> None:
    while True:
        await asyncio.sleep(TELEMETRY_TICK_S)
        telemetry.tick()


def register(server: grpc.aio.Server, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]) -> None:
    """Serve `handlers` as `service`, the way generated code registers a servicer."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def options_of(settings: ServeSettings) -> Options:
    return Options(
        jwt_payload_key=settings.jwt_payload_key,
        xff_num_trusted_hops=settings.xff_num_trusted_hops,
        multiple_custom_providers=settings.multiple_custom_providers,
    )


async def serve(settings: ServeSettings, holder: SnapshotHolder) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(holder.reload("SIGHUP")))

    stats = AuthzStats()
    adapter = CheckAdapter(
        xff_num_trusted_hops=settings.xff_num_trusted_hops,
        jwt_payload_key=settings.jwt_payload_key,
        max_header_bytes=settings.max_request_headers_kb * 1024,
        path_normalization=PathNormalization(settings.path_normalization),
    )
    providers = ProviderPool()
    jwks = JwksRegistry(settings.jwks_refresh_interval_s, settings.jwks_kid_refresh_interval_s)
    jwks.sync(holder.current.authn.remote_sources)
    holder.on_swap.append(lambda snap: jwks.sync(snap.authn.remote_sources))
    token_cache = TokenCache(settings.jwt_cache_size)
    enforcer = Enforcer(providers, jwks, token_cache, stats, cache_size=settings.decision_cache_size)
    direction = Direction(settings.direction)
    telemetry, exchange = telemetry_of(settings)
    telemetry.apply(holder.current.telemetry, holder.current.directory)
    holder.on_swap.append(lambda snap: telemetry.apply(snap.telemetry, snap.directory))
    try:
        tracing = tracing_of(settings, exchange.local)
    except RuntimeError as e:
        log.error("cannot export spans to %s: %s", settings.otlp_endpoint, e)
        return 2
    checks = nodes = None
    if holder.central:

        def generation() -> WorkloadSnapshots:
            assert holder.workloads is not None
            return holder.workloads

        checks = ContextWorkloads(generation, trust_domain=settings.trust_domain, cluster=settings.cluster)
        assert telemetry.workloads is not None
        nodes = NodeWorkloads(telemetry.workloads, trust_domain=settings.trust_domain, cluster=settings.cluster)
    authz = AuthorizationService(
        holder.get,
        adapter,
        enforcer,
        exchange=exchange,
        direction=direction,
        tracing=tracing,
        central=checks,
    )
    http_checks = (
        HttpAuthorizationService(holder.get, adapter, enforcer, exchange=exchange, direction=direction, tracing=tracing)
        if settings.http_listen is not None
        else None
    )
    als = AccessLogService(
        telemetry.recorder,
        telemetry.tcp,
        telemetry.peers,
        direction,
        tracing=tracing,
        central=nodes,
        directory=lambda: telemetry.directory,
    )
    processor = ExternalProcessorService(
        telemetry.recorder,
        telemetry.peers,
        exchange,
        direction,
        enforcer=enforcer,
        snapshot=holder.get,
        adapter=adapter,
        tracing=tracing,
        directory=lambda: telemetry.directory,
    )
    refuser = CentralModeProcessor()

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
            ("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
        # Beyond it grpc refuses a call at once with RESOURCE_EXHAUSTED, which Envoy's ext_authz
        # and ext_proc treat as an error: their failure mode applies instead of a queue growing.
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
    )
    register(server, AUTHZ_SERVICE_NAME, authz.handlers())
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(als, server)
    if holder.central:
        external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(refuser, server)
    else:
        register(server, EXT_PROC_SERVICE_NAME, processor.handlers())
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        bound = server.add_insecure_port(settings.listen.grpc_target)
    except RuntimeError as e:
        log.error("cannot listen on %s: %s", settings.listen.text, e)
        return 1
    if not settings.listen.is_unix and bound == 0:
        log.error("cannot listen on %s", settings.listen.text)
        return 1

    check_server: check_http.CheckServer | None = None
    if http_checks is not None and settings.http_listen is not None:
        try:
            check_server = await check_http.serve(
                http_checks,
                settings.http_listen.text,
                # Envoy's own limit on the client's headers, plus room for the request line and
                # the headers Envoy adds to a check; the exact limit is applied per request.
                max_head=settings.max_request_headers_kb * 1024 + HTTP_CHECK_HEAD_SLACK,
            )
        except OSError as e:
            log.error("cannot listen on %s (--http-listen): %s", settings.http_listen.text, e)
            return 1

    central: CentralCollector | None = None
    if checks is not None:
        assert telemetry.workloads is not None
        central = CentralCollector(holder, checks, telemetry.workloads, lambda: als.unidentified_entries)
    caches = [adapter.cert_cache.counters, stats.cache, telemetry.peers.counters, token_cache.counters]
    if checks is not None:
        assert telemetry.workloads is not None
        caches += [holder.cache_stats, checks.counters, telemetry.workloads.counters]
    sources = lambda: {  # noqa: E731
        "access_log_streams": als.streams,
        "access_log_http_entries": als.entries["http"],
        "access_log_tcp_entries": als.entries["tcp"],
        "access_log_bad_entries": als.bad_entries,
        "ext_proc_streams": processor.streams,
        "ext_proc_streams_ended_by_server": processor.ended_early,
        "ext_proc_bad_streams": processor.bad_streams,
        "ext_proc_denied": processor.denied,
        "ext_proc_streams_refused": refuser.refused,
    }
    extra: tuple[Collector, ...] = (
        AuthzCollector(
            stats, lambda: holder.current, lambda: (adapter.path_normalization.value, adapter.unnormalized_paths)
        ),
        SnapshotCollector(holder),
        CacheCollector(lambda: caches),
        TelemetryCollector(telemetry, sources),
        TracingCollector(tracing),
        RuntimeCollector(loop),
        ProcessCollector(registry=None),
    )
    if central is not None:
        extra += (central,)
    if jwks is not None:
        extra += (JwksCollector(jwks),)
    extra += (TokenCacheCollector(token_cache),)
    if check_server is not None and http_checks is not None:
        extra += (check_http.CheckListenerCollector(check_server, lambda: http_checks.dropped_query_changes),)
    admin = AdminApp(holder, stats, extra, jwks=jwks, telemetry=telemetry)
    host, port = settings.admin.host_port()
    try:
        admin_server = await http.serve(admin.routes, host, port)
    except OSError as e:
        log.error("cannot listen on admin address %s: %s", settings.admin.text, e)
        if check_server is not None:
            await check_server.close()
        return 1

    await server.start()
    served = (AUTHZ_SERVICE_NAME, ALS_SERVICE_NAME) + (() if holder.central else (EXT_PROC_SERVICE_NAME,))
    for name in ("", *served):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    watcher = asyncio.create_task(holder.watch(stop), name="config-watcher")
    upkeep = asyncio.create_task(_telemetry_upkeep(telemetry), name="telemetry-upkeep")
    if holder.central:
        assert holder.workloads is not None
        log.info(
            "serving ext_authz and access logs on %s (%s), admin on %s; central mode: each Check names its "
            "workload in the context extensions, each log stream in its node metadata, ext_proc is refused; "
            "snapshot %d with %d policies, %d JWT rules across the mesh; %d of at most %d workload snapshots cached",
            settings.listen.text,
            settings.direction,
            settings.admin.text,
            holder.current.version,
            len(holder.current.policies),
            len(holder.current.authn.providers),
            len(holder.workloads),
            holder.workloads.size,
        )
    else:
        _log_sidecar_start(settings, holder)

    await stop.wait()
    log.info("shutting down: draining in-flight calls for up to %.1fs", settings.drain_timeout_s)
    admin.draining = True
    await health_servicer.enter_graceful_shutdown()
    if check_server is not None:
        check_server.server.close()  # no new connections; the open ones are answered while gRPC drains
    await server.stop(grace=settings.drain_timeout_s)
    if check_server is not None:
        await check_server.close()
    for task in (watcher, upkeep):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    await providers.close()
    await jwks.close()
    # Spans still queued go out now, bounded so an unreachable collector cannot hold the exit.
    await asyncio.to_thread(tracing.shutdown, min(5.0, settings.drain_timeout_s))
    await admin_server.close()
    log.info("stopped")
    return 0


def _log_sidecar_start(settings: ServeSettings, holder: SnapshotHolder) -> None:
    log.info(
        "serving ext_authz, ext_proc and access logs on %s%s (%s), admin on %s; workload %s/%s labels=%s; "
        "snapshot %d with %d policies, %d JWT rules",
        settings.listen.text,
        f", HTTP ext_authz checks on {settings.http_listen.text}" if settings.http_listen is not None else "",
        settings.direction,
        settings.admin.text,
        settings.namespace,
        settings.workload or "-",
        ",".join(f"{k}={v}" for k, v in sorted(settings.labels.items())) or "-",
        holder.current.version,
        len(holder.current.policies),
        len(holder.current.authn.providers),
    )


def run(settings: ServeSettings) -> int:
    setup_logging(settings.log_level, settings.log_format)
    try:
        holder = SnapshotHolder.initial(
            settings.config_dirs,
            workload_of(settings),
            options_of(settings),
            central_cache_size=DEFAULT_CACHE_SIZE if settings.central else 0,
            settle_s=settings.config_settle_s,
        )
    except ConfigError as e:
        log.error("%s", e)
        return 2
    import uvloop

    return uvloop.run(serve(settings, holder))

"""The Envoy bootstrap of each mode and side, built from Envoy's typed API (envoy-data-plane).

Every name extproc reads back from Envoy (the direction metadata, the HTTP check's headers, the
access log's custom tags, ext_proc's attributes, the metadata namespaces) comes from the module
that reads it, so the config and its reader cannot drift apart.
"""

from __future__ import annotations

from datetime import timedelta

import betterproto2
from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog
from envoy_data_plane.envoy.config.bootstrap.v3 import (
    Admin,
    Bootstrap,
    BootstrapStaticResources,
    LayeredRuntime,
    RuntimeLayer,
)
from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    Cluster,
    ClusterDiscoveryType,
)
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import HeaderMutation as HeaderOp
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import HeaderMutationRules
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    ApiVersion,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    Http2ProtocolOptions,
    HttpUri,
    KeyValueMutation,
    SocketAddress,
    SubstitutionFormatString,
    TypedExtensionConfig,
)
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.route.v3 import Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost
from envoy_data_plane.envoy.extensions.access_loggers.grpc.v3 import (
    CommonGrpcAccessLogConfig,
    HttpGrpcAccessLogConfig,
    TcpGrpcAccessLogConfig,
)
from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
from envoy_data_plane.envoy.extensions.common.matching.v3 import ExtensionWithMatcher
from envoy_data_plane.envoy.extensions.filters.common.matcher.action.v3 import SkipFilter
from envoy_data_plane.envoy.extensions.filters.common.set_filter_state.v3 import FilterStateValue
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import (
    AuthorizationRequest,
    AuthorizationResponse,
    ExtAuthz,
    HttpService,
)
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
    ExternalProcessor,
    MetadataOptions,
    MetadataOptionsMetadataNamespaces,
    ProcessingMode,
    ProcessingModeBodySendMode,
    ProcessingModeHeaderSendMode,
)
from envoy_data_plane.envoy.extensions.filters.http.grpc_stats.v3 import FilterConfig as GrpcStats
from envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3 import HeaderMutation, Mutations
from envoy_data_plane.envoy.extensions.filters.http.header_to_metadata.v3 import (
    Config as HeaderToMetadata,
)
from envoy_data_plane.envoy.extensions.filters.http.header_to_metadata.v3 import (
    ConfigKeyValuePair,
    ConfigRule,
    ConfigValueType,
)
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.http.set_filter_state.v3 import Config as SetFilterState
from envoy_data_plane.envoy.extensions.filters.network.ext_authz.v3 import ExtAuthz as NetworkExtAuthz
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerCodecType,
    HttpConnectionManagerPathWithEscapedSlashesAction,
    HttpFilter,
)
from envoy_data_plane.envoy.extensions.filters.network.tcp_proxy.v3 import TcpProxy, TcpProxyTcpAccessLogOptions
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import (
    HttpRequestHeaderMatchInput,
    ListStringMatcher,
    RegexMatcher,
    StringMatcher,
)
from envoy_data_plane.envoy.type.tracing.v3 import CustomTag
from envoy_data_plane.google.protobuf import Any, Struct, Value
from envoy_data_plane.xds.core.v3 import TypedExtensionConfig as XdsExtension
from envoy_data_plane.xds.type.matcher.v3 import (
    Matcher,
    MatcherMatcherList,
    MatcherMatcherListFieldMatcher,
    MatcherMatcherListPredicate,
    MatcherMatcherListPredicateSinglePredicate,
    MatcherOnMatch,
    RegexMatcherGoogleRe2,
)
from envoy_data_plane.xds.type.matcher.v3 import RegexMatcher as XdsRegex
from envoy_data_plane.xds.type.matcher.v3 import StringMatcher as XdsString

from extproc.envoy_config.options import Endpoint as Address_
from extproc.envoy_config.options import Mode, Options
from extproc.services.accesslog import (
    AUTHZ_NAMESPACE,
    CLUSTER_TAG,
    GRPC_STATS_STATE,
    PEER_NAMESPACE,
    SERVICES_TAG,
    UPSTREAM_LOCAL_SAN_TAG,
    UPSTREAM_PEER_SAN_TAG,
)
from extproc.services.http_check_adapter import CONNECTION_HEADER, DIRECTION_HEADER, METADATA_PREFIX, OUR_PREFIX
from extproc.services.http_check_render import REMOVE_QUERY_HEADER
from extproc.services.processing_adapter import (
    DESTINATION_ADDRESS,
    LOCAL_URI_SAN,
    METADATA_NAMESPACE,
    OUTBOUND_RESPONSE_ATTRIBUTES,
    PEER_ADDRESS_ATTRIBUTE,
    PEER_ADDRESS_STATE,
    PEER_CERTIFICATE,
    PEER_URI_SAN,
    PROTOCOL,
    SNI,
    SOURCE_ADDRESS,
)

HCM = "envoy.filters.network.http_connection_manager"
JWT_AUTHN = "envoy.filters.http.jwt_authn"
PEER_METADATA = "x-envoy-peer-metadata"
PEER_METADATA_ID = "x-envoy-peer-metadata-id"
ONE_SECOND = timedelta(seconds=1)
# Every x- header but Envoy's own x-envoy-*: RE2 has no lookahead, so the regex spells out each
# prefix of "envoy-" that a name may leave.
NOT_ENVOY_X = "x-([^e].*|e([^n].*)?|en([^v].*)?|env([^o].*)?|envo([^y].*)?|envoy([^-].*)?)"
TRACE_HEADERS = ("traceparent", "tracestate", "b3")
# The connection facts of an HTTP check, in the order extproc/services/http_check_adapter.py
# reads them.
CHECK_CONNECTION = (
    "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %REQUESTED_SERVER_NAME% "
    "%DOWNSTREAM_PEER_URI_SAN% %DOWNSTREAM_PEER_DNS_SAN% %DOWNSTREAM_PEER_SUBJECT%"
)
# The client side's custom tags, each named as extproc/services/accesslog.py reads it.
OUTBOUND_TAGS = (
    (UPSTREAM_PEER_SAN_TAG, "%UPSTREAM_PEER_URI_SAN%"),
    (UPSTREAM_LOCAL_SAN_TAG, "%UPSTREAM_LOCAL_URI_SAN%"),
    (SERVICES_TAG, "%CLUSTER_METADATA(istio:services)%"),
    (CLUSTER_TAG, "%UPSTREAM_CLUSTER%"),
)
DECISION_KEYS = ("enforced_effective_policy_id", "extproc_reason", "istio_dry_run_deny_shadow_engine_result")


def bootstrap(opts: Options) -> Bootstrap:
    listeners = [_http_listener(opts)]
    if opts.tcp_listen is not None:
        listeners.append(_tcp_listener(opts, opts.tcp_listen))
    return Bootstrap(
        admin=Admin(address=_address(opts.admin)),
        static_resources=BootstrapStaticResources(listeners=listeners, clusters=_clusters(opts)),
        layered_runtime=LayeredRuntime(
            layers=[
                RuntimeLayer(
                    name="static",
                    static_layer=Struct(
                        fields={"overload.global_downstream_max_connections": Value(number_value=50000)}
                    ),
                )
            ]
        ),
    )


# -- names ------------------------------------------------------------------------------------


def upstream_cluster(opts: Options) -> str:
    return "app" if opts.inbound else "upstream"


def tcp_upstream_cluster(opts: Options) -> str:
    return upstream_cluster(opts) if opts.shared_upstream else f"{upstream_cluster(opts)}_tcp"


def listener_names(opts: Options) -> tuple[str, str]:
    return ("http", "tcp") if opts.inbound else ("outbound_http", "outbound_tcp")


def _prefix(opts: Options) -> str:
    return opts.side.value


# -- small pieces -----------------------------------------------------------------------------


def _address(ep: Address_) -> Address:
    return Address(socket_address=SocketAddress(address=ep.host, port_value=ep.port))


def _typed(message: betterproto2.Message) -> Any:
    return Any.pack(message)


def _direction(opts: Options) -> list[HeaderValue]:
    return [HeaderValue(key=DIRECTION_HEADER, value=opts.side.value)]


def _extproc_grpc(opts: Options, *, timeout: bool, direction: bool = True) -> GrpcService:
    return GrpcService(
        envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name="extproc", skip_envoy_headers=True),
        timeout=ONE_SECOND if timeout else None,
        initial_metadata=_direction(opts) if direction else [],
    )


def _exact(*names: str) -> list[StringMatcher]:
    return [StringMatcher(exact=n) for n in names]


def _prefixes(*names: str) -> list[StringMatcher]:
    return [StringMatcher(prefix=n) for n in names]


def _regex(pattern: str) -> StringMatcher:
    return StringMatcher(safe_regex=RegexMatcher(regex=pattern))


def _http_filter(name: str, config: betterproto2.Message) -> HttpFilter:
    return HttpFilter(name=name, typed_config=_typed(config))


def _format(text: str) -> SubstitutionFormatString:
    return SubstitutionFormatString(text_format_source=DataSource(inline_string=text))


# -- HTTP -------------------------------------------------------------------------------------


def _http_listener(opts: Options) -> Listener:
    name = listener_names(opts)[0]
    hcm = HttpConnectionManager(
        stat_prefix=f"{_prefix(opts)}_http",
        codec_type=HttpConnectionManagerCodecType.AUTO,
        normalize_path=True,
        merge_slashes=False,
        path_with_escaped_slashes_action=HttpConnectionManagerPathWithEscapedSlashesAction.KEEP_UNCHANGED,
        access_log=_http_access_logs(opts),
        route_config=RouteConfiguration(
            name="local" if opts.inbound else "outbound",
            virtual_hosts=[
                VirtualHost(
                    name=upstream_cluster(opts),
                    domains=["*"],
                    routes=[Route(match=RouteMatch(prefix="/"), route=RouteAction(cluster=upstream_cluster(opts)))],
                )
            ],
        ),
        http_filters=[*_http_filters(opts), _http_filter("envoy.filters.http.router", Router())],
    )
    return Listener(
        name=name,
        address=_address(opts.listen),
        filter_chains=[FilterChain(filters=[Filter(name=HCM, typed_config=_typed(hcm))])],
    )


def _http_access_logs(opts: Options) -> list[AccessLog]:
    logs = []
    if opts.inbound:
        logs.append(_stdout_log(opts))
    if opts.mode is not Mode.EXTPROC:  # ext_proc reports HTTP itself
        logs.append(
            AccessLog(
                name="envoy.access_loggers.http_grpc",
                typed_config=_typed(
                    HttpGrpcAccessLogConfig(
                        common_config=_als_common(opts, grpc_stats=True),
                        additional_request_headers_to_log=["content-type"],
                        additional_response_headers_to_log=["grpc-status"],
                        additional_response_trailers_to_log=["grpc-status"],
                    )
                ),
            )
        )
    return logs


def _stdout_log(opts: Options) -> AccessLog:
    ns = METADATA_NAMESPACE if opts.mode is Mode.EXTPROC else AUTHZ_NAMESPACE

    def md(key: str) -> str:
        return f"%DYNAMIC_METADATA({ns}:{key})%"

    line = (
        '[%START_TIME%] "%REQ(:METHOD)% %REQ(:PATH)%" %RESPONSE_CODE% %RESPONSE_CODE_DETAILS% '
        f'policy={md("enforced_effective_policy_id")} reason="{md("extproc_reason")}" '
        f"dry_run_deny={md('istio_dry_run_deny_shadow_engine_result')} audit={md('access_log_hint')} "
        f"principal={md('extproc_request_principal')}"
    )
    if opts.mode is Mode.EXTPROC:
        line += " trace=%REQ(TRACEPARENT)%"
    return AccessLog(
        name="envoy.access_loggers.stdout",
        typed_config=_typed(StdoutAccessLog(log_format=_format(line + "\n"))),
    )


def _als_common(opts: Options, *, grpc_stats: bool) -> CommonGrpcAccessLogConfig:
    return CommonGrpcAccessLogConfig(
        log_name=opts.side.value,
        transport_api_version=ApiVersion.V3,
        grpc_service=_extproc_grpc(opts, timeout=False),
        buffer_flush_interval=ONE_SECOND,
        custom_tags=[] if opts.inbound else _custom_tags(),
        filter_state_objects_to_log=[GRPC_STATS_STATE] if grpc_stats else [],
    )


def _custom_tags() -> list[CustomTag]:
    return [CustomTag(tag=tag, value=value) for tag, value in OUTBOUND_TAGS]


def _http_filters(opts: Options) -> list[HttpFilter]:
    if opts.mode is Mode.EXTPROC:
        ext_proc = _http_filter("envoy.filters.http.ext_proc", _ext_proc(opts))
        return [_peer_address_state(), ext_proc] if opts.inbound else [ext_proc]
    check = _ext_authz_http(opts) if opts.mode is Mode.AUTHZ_HTTP else _ext_authz_grpc(opts)
    filters = [_http_filter("envoy.filters.http.ext_authz", check)]
    if opts.mode is Mode.AUTHZ_HTTP and opts.inbound:
        filters.append(strip_verified_query_token())
    if not opts.inbound:
        filters.append(_http_filter("envoy.filters.http.header_to_metadata", _peer_metadata_to_log()))
    filters.append(
        _http_filter("envoy.filters.http.grpc_stats", GrpcStats(emit_filter_state=True, stats_for_all_methods=False))
    )
    return filters


def _ext_authz_grpc(opts: Options) -> ExtAuthz:
    if not opts.inbound:
        return ExtAuthz(
            grpc_service=_extproc_grpc(opts, timeout=True),
            transport_api_version=ApiVersion.V3,
            failure_mode_allow=True,
        )
    return ExtAuthz(
        grpc_service=_extproc_grpc(opts, timeout=True),
        transport_api_version=ApiVersion.V3,
        failure_mode_allow=False,
        include_peer_certificate=True,
        include_tls_session=True,
        metadata_context_namespaces=[JWT_AUTHN],
    )


def _ext_authz_http(opts: Options) -> ExtAuthz:
    server = HttpUri(uri=f"http://{opts.extproc_http}", cluster="extproc_http", timeout=ONE_SECOND)
    if not opts.inbound:
        trace = [*_exact(*TRACE_HEADERS), *_prefixes("x-b3-"), *_exact("x-request-id")]
        return ExtAuthz(
            http_service=HttpService(
                server_uri=server,
                authorization_request=AuthorizationRequest(headers_to_add=_direction(opts)),
                authorization_response=AuthorizationResponse(
                    allowed_upstream_headers=ListStringMatcher(patterns=[*_prefixes(PEER_METADATA), *trace]),
                    allowed_client_headers=ListStringMatcher(patterns=_exact(f"{OUR_PREFIX}none")),
                    dynamic_metadata_from_headers=ListStringMatcher(patterns=_prefixes("extproc_")),
                ),
            ),
            allowed_headers=ListStringMatcher(patterns=trace),
            transport_api_version=ApiVersion.V3,
            failure_mode_allow=True,
        )
    return ExtAuthz(
        http_service=HttpService(
            server_uri=server,
            authorization_request=AuthorizationRequest(
                headers_to_add=[
                    HeaderValue(key=CONNECTION_HEADER, value=CHECK_CONNECTION),
                    *_direction(opts),
                    HeaderValue(key=f"{METADATA_PREFIX}{JWT_AUTHN}", value=f"=%DYNAMIC_METADATA({JWT_AUTHN})%"),
                ]
            ),
            authorization_response=AuthorizationResponse(
                allowed_upstream_headers=ListStringMatcher(patterns=[*_exact(*TRACE_HEADERS), _regex(NOT_ENVOY_X)]),
                allowed_client_headers=ListStringMatcher(patterns=[*_prefixes(PEER_METADATA), _regex(NOT_ENVOY_X)]),
                allowed_client_headers_on_success=ListStringMatcher(patterns=_prefixes(PEER_METADATA)),
                dynamic_metadata_from_headers=ListStringMatcher(
                    patterns=[
                        *_prefixes("enforced_", "extproc_", "istio_dry_run_", "shadow_", "audit_"),
                        *_exact("access_log_hint"),
                    ]
                ),
            ),
        ),
        allowed_headers=ListStringMatcher(patterns=[_regex(".*")]),
        disallowed_headers=ListStringMatcher(patterns=_prefixes(OUR_PREFIX)),
        encode_raw_headers=True,
        transport_api_version=ApiVersion.V3,
        failure_mode_allow=False,
    )


def strip_verified_query_token(names: tuple[str, ...] = ("access_token",)) -> HttpFilter:
    """After ext_authz's HTTP service, which cannot remove a query parameter: removes `names`
    and extproc's marker header, and runs only when the check set that header."""
    strip = HeaderMutation(
        mutations=Mutations(
            query_parameter_mutations=[KeyValueMutation(remove=n) for n in names],
            request_mutations=[HeaderOp(remove=REMOVE_QUERY_HEADER)],
        )
    )
    unless_marked = MatcherMatcherListPredicate(
        not_matcher=MatcherMatcherListPredicate(
            single_predicate=MatcherMatcherListPredicateSinglePredicate(
                input=XdsExtension(
                    name="remove-query",
                    typed_config=_typed(HttpRequestHeaderMatchInput(header_name=REMOVE_QUERY_HEADER)),
                ),
                value_match=_xds_regex(".*"),
            )
        )
    )
    skip = MatcherOnMatch(action=XdsExtension(name="skip", typed_config=_typed(SkipFilter())))
    return _http_filter(
        "strip_verified_access_token",
        ExtensionWithMatcher(
            extension_config=TypedExtensionConfig(name="strip", typed_config=_typed(strip)),
            xds_matcher=Matcher(
                matcher_list=MatcherMatcherList(
                    matchers=[MatcherMatcherListFieldMatcher(predicate=unless_marked, on_match=skip)]
                )
            ),
        ),
    )


def _xds_regex(pattern: str) -> XdsString:
    return XdsString(safe_regex=XdsRegex(google_re2=RegexMatcherGoogleRe2(), regex=pattern))


def _peer_metadata_to_log() -> HeaderToMetadata:
    def rule(header: str) -> ConfigRule:
        return ConfigRule(
            header=header,
            on_header_present=ConfigKeyValuePair(
                metadata_namespace=PEER_NAMESPACE, key=header, type=ConfigValueType.STRING
            ),
            remove=True,
        )

    return HeaderToMetadata(response_rules=[rule(PEER_METADATA), rule(PEER_METADATA_ID)])


def _peer_address_state() -> HttpFilter:
    return _http_filter(
        "envoy.filters.http.set_filter_state",
        SetFilterState(
            on_request_headers=[
                FilterStateValue(
                    object_key=PEER_ADDRESS_STATE,
                    factory_key="envoy.string",
                    format_string=_format("%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%"),
                )
            ]
        ),
    )


def _ext_proc(opts: Options) -> ExternalProcessor:
    send, skip = ProcessingModeHeaderSendMode.SEND, ProcessingModeHeaderSendMode.SKIP
    mode = ProcessingMode(
        request_header_mode=send,
        response_header_mode=send,
        request_body_mode=ProcessingModeBodySendMode.NONE,
        response_body_mode=ProcessingModeBodySendMode.NONE,
        request_trailer_mode=skip,
        response_trailer_mode=send,
    )
    proc = ExternalProcessor(
        grpc_service=_extproc_grpc(opts, timeout=False),
        message_timeout=ONE_SECOND,
        processing_mode=mode,
        mutation_rules=HeaderMutationRules(allow_envoy=True),
    )
    if not opts.inbound:
        proc.failure_mode_allow = True
        proc.request_attributes = [SOURCE_ADDRESS, DESTINATION_ADDRESS, PROTOCOL]
        proc.response_attributes = list(OUTBOUND_RESPONSE_ATTRIBUTES)
        return proc
    proc.failure_mode_allow = False
    proc.request_attributes = [
        SOURCE_ADDRESS,
        DESTINATION_ADDRESS,
        PEER_ADDRESS_ATTRIBUTE,
        PEER_CERTIFICATE,
        PEER_URI_SAN,
        LOCAL_URI_SAN,
        SNI,
        PROTOCOL,
    ]
    proc.metadata_options = MetadataOptions(
        forwarding_namespaces=MetadataOptionsMetadataNamespaces(untyped=[JWT_AUTHN]),
        receiving_namespaces=MetadataOptionsMetadataNamespaces(untyped=[METADATA_NAMESPACE]),
    )
    return proc


# -- TCP --------------------------------------------------------------------------------------


def _tcp_listener(opts: Options, listen: Address_) -> Listener:
    filters = []
    if opts.inbound:
        filters.append(
            Filter(
                name="envoy.filters.network.ext_authz",
                typed_config=_typed(
                    NetworkExtAuthz(
                        stat_prefix=f"{_prefix(opts)}_tcp",
                        grpc_service=_extproc_grpc(opts, timeout=True, direction=False),
                        transport_api_version=ApiVersion.V3,
                        failure_mode_allow=False,
                        include_peer_certificate=True,
                        include_tls_session=True,
                    )
                ),
            )
        )
    proxy = TcpProxy(
        stat_prefix=f"{_prefix(opts)}_tcp",
        cluster=tcp_upstream_cluster(opts),
        access_log=[
            AccessLog(
                name="envoy.access_loggers.tcp_grpc",
                typed_config=_typed(TcpGrpcAccessLogConfig(common_config=_als_common(opts, grpc_stats=False))),
            )
        ],
        access_log_options=TcpProxyTcpAccessLogOptions(access_log_flush_interval=timedelta(seconds=5)),
    )
    filters.append(Filter(name="envoy.filters.network.tcp_proxy", typed_config=_typed(proxy)))
    return Listener(
        name=listener_names(opts)[1], address=_address(listen), filter_chains=[FilterChain(filters=filters)]
    )


# -- clusters ---------------------------------------------------------------------------------


def _static(name: str, ep: Address_, *, breakers: int | None = None, http2: bool = False) -> Cluster:
    """A static cluster of one endpoint; `breakers` sets explicit circuit breakers (connections),
    `http2` makes it speak HTTP/2 (gRPC)."""
    cluster = Cluster(
        name=name,
        type=ClusterDiscoveryType.STATIC,
        connect_timeout=ONE_SECOND,
        load_assignment=ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[LocalityLbEndpoints(lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=_address(ep)))])],
        ),
    )
    if breakers is not None:
        cluster.circuit_breakers = CircuitBreakers(
            thresholds=[
                CircuitBreakersThresholds(max_connections=breakers, max_pending_requests=100000, max_requests=100000)
            ]
        )
    if http2:
        h2 = HttpProtocolOptions(
            explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=Http2ProtocolOptions())
        )
        cluster.typed_extension_protocol_options = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(h2)
        }
    return cluster


def _clusters(opts: Options) -> list[Cluster]:
    clusters = [_static(upstream_cluster(opts), opts.upstream)]
    if opts.tcp_listen is not None and not opts.shared_upstream:
        clusters.append(_static(tcp_upstream_cluster(opts), opts.tcp_upstream))
    clusters.append(_static("extproc", opts.extproc, breakers=1024, http2=True))
    if opts.mode is Mode.AUTHZ_HTTP:
        clusters.append(_static("extproc_http", opts.extproc_http, breakers=100000))
    return clusters

"""The access-log adapter: entries to records, without a server."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import wrappers_pb2

from extproc.services.accesslog import AccessLogService, grpc_status, istio_flags, response_flags
from extproc.telemetry import labels as L
from extproc.telemetry.peer import Workload, encode
from extproc.telemetry.record import Direction
from extproc.telemetry.recorder import Telemetry
from tests.fixtures.exposition import samples


def _service() -> tuple[AccessLogService, Telemetry]:
    t = Telemetry.create(Workload.from_labels({"app": "httpbin"}, workload_name="httpbin", namespace="foo"))
    return AccessLogService(t.recorder, t.tcp, t.peers), t


def test_response_flags_use_envoys_short_codes_in_its_order() -> None:
    f = accesslog_pb2.ResponseFlags(upstream_retry_limit_exceeded=True, upstream_connection_failure=True)
    assert response_flags(f) == "UF,URX"
    f = accesslog_pb2.ResponseFlags()
    f.unauthorized_details.reason = accesslog_pb2.ResponseFlags.Unauthorized.EXTERNAL_SERVICE
    assert response_flags(f) == "UAEX"
    assert response_flags(accesslog_pb2.ResponseFlags()) == "-"
    assert len(L.RESPONSE_FLAG_CODES) == len(accesslog_pb2.ResponseFlags.DESCRIPTOR.fields)


def test_grpc_status_from_trailers_then_headers_then_the_http_code() -> None:
    assert grpc_status(True, 200, {"grpc-status": "5"}, {"grpc-status": "0"}) == "5"
    assert grpc_status(True, 200, {}, {"grpc-status": "14"}) == "14"
    assert grpc_status(True, 503, {}, {}) == "14"
    assert grpc_status(True, 403, {}, {}) == "7"
    assert grpc_status(True, 200, {}, {}) == "2"  # a gRPC answer without a status is UNKNOWN
    assert grpc_status(True, 0, {}, {}) == ""  # no response at all
    assert grpc_status(False, 200, {"grpc-status": "0"}, {}) == ""


def _entry(**kw: object) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry()
    c = e.common_properties
    c.downstream_remote_address.socket_address.address = "10.1.2.3"
    c.downstream_remote_address.socket_address.port_value = 41000
    c.downstream_local_address.socket_address.address = "10.0.0.7"
    c.downstream_local_address.socket_address.port_value = 8080
    c.duration.FromMilliseconds(12)
    c.downstream_wire_bytes_received = 300
    c.downstream_wire_bytes_sent = 1200
    e.request.authority = "httpbin.foo:8000"
    e.request.request_method = base_pb2.RequestMethod.Value("GET")
    e.request.request_id = str(kw.get("rid", ""))
    e.response.response_code.CopyFrom(wrappers_pb2.UInt32Value(value=int(kw.get("code", 200))))  # type: ignore[call-overload]
    peer = kw.get("peer")
    if peer:
        c.metadata.filter_metadata["envoy.filters.http.ext_authz"].update({"x-envoy-peer-metadata": peer})
    return e


def test_an_http_entry_records_duration_bytes_and_the_peer_from_ext_authz_metadata() -> None:
    svc, t = _service()
    peer = encode(Workload.from_labels({"app": "sleep"}, workload_name="sleep", namespace="bar"))
    svc.http_entry(_entry(peer=peer), Direction.INBOUND)
    text = t.store.render()
    [(lbl, n)] = samples(text, "istio_requests_total")
    assert (lbl["source_workload"], lbl["destination_service"], lbl["response_code"], n) == (
        "sleep",
        "httpbin.foo:8000",
        "200",
        1,
    )
    assert samples(text, "istio_request_duration_milliseconds_sum")[0][1] == 12.0
    assert samples(text, "istio_request_bytes_sum")[0][1] == 300
    assert samples(text, "istio_response_bytes_sum")[0][1] == 1200


def test_periodic_http_entries_are_not_counted() -> None:
    svc, t = _service()
    e = _entry()
    e.common_properties.access_log_type = accesslog_pb2.DownstreamPeriodic
    svc.http_entry(e, Direction.INBOUND)
    assert samples(t.store.render(), "istio_requests_total") == []


def test_a_bad_entry_is_skipped_and_counted_not_raised() -> None:
    svc, _ = _service()

    def boom(_e: object, _d: Direction) -> None:
        raise ValueError("bad")

    svc._guard(boom, _entry(), Direction.INBOUND)
    assert svc.bad_entries == 1


def test_tcp_entries_diff_cumulative_bytes_and_carry_addresses_for_overrides() -> None:
    svc, t = _service()
    for kind, sent, received in (
        (accesslog_pb2.TcpUpstreamConnected, 0, 0),
        (accesslog_pb2.TcpPeriodic, 100, 40),
        (accesslog_pb2.TcpPeriodic, 250, 40),
        (accesslog_pb2.TcpConnectionEnd, 300, 90),
    ):
        e = accesslog_pb2.TCPAccessLogEntry()
        e.common_properties.stream_id = "conn-1"
        e.common_properties.access_log_type = kind
        e.common_properties.downstream_remote_address.socket_address.address = "10.1.2.3"
        e.connection_properties.sent_bytes = sent
        e.connection_properties.received_bytes = received
        svc.tcp_entry(e, Direction.INBOUND)
    text = t.store.render()
    assert [v for _, v in samples(text, "istio_tcp_sent_bytes_total")] == [300]
    assert [v for _, v in samples(text, "istio_tcp_received_bytes_total")] == [90]
    assert [v for _, v in samples(text, "istio_tcp_connections_opened_total")] == [1]
    assert [v for _, v in samples(text, "istio_tcp_connections_closed_total")] == [1]
    assert t.tcp.connections == {}


# --- the client side's identities and service, from the entry's custom tags -------------------

SERVER_SAN = "spiffe://cluster.local/ns/foo/sa/httpbin"
CLIENT_SAN = "spiffe://cluster.local/ns/bar/sa/sleep"
SERVICES = '[{"host":"httpbin.foo.svc.cluster.local","name":"httpbin","namespace":"foo"}]'


def _client() -> tuple[AccessLogService, Telemetry]:
    t = Telemetry.create(Workload.from_labels({"app": "sleep"}, workload_name="sleep", namespace="bar"))
    return AccessLogService(t.recorder, t.tcp, t.peers, Direction.OUTBOUND), t


def _tagged(e: accesslog_pb2.HTTPAccessLogEntry | accesslog_pb2.TCPAccessLogEntry, **tags: str) -> None:
    for k, v in tags.items():
        e.common_properties.custom_tags[k] = v


def test_the_client_side_reads_upstream_principals_and_the_clusters_service_from_custom_tags() -> None:
    svc, t = _client()
    e = _entry()
    e.common_properties.upstream_cluster = "upstream"  # not istiod's name: the metadata names the service
    _tagged(
        e,
        upstream_peer_uri_san=f"{SERVER_SAN},spiffe://cluster.local/ns/foo/sa/other",
        upstream_local_uri_san=CLIENT_SAN,
        istio_services=SERVICES,
    )
    svc.http_entry(e, Direction.OUTBOUND)
    [(lbl, _)] = samples(t.store.render(), "istio_requests_total")
    assert lbl["destination_principal"] == SERVER_SAN  # the first SAN, as istio_stats.cc
    assert lbl["source_principal"] == CLIENT_SAN
    assert lbl["destination_workload_namespace"] == "foo"  # from the SPIFFE id
    assert (lbl["destination_service"], lbl["destination_service_name"], lbl["destination_service_namespace"]) == (
        "httpbin.foo.svc.cluster.local",
        "httpbin",
        "foo",
    )
    assert lbl["connection_security_policy"] == "unknown"


def test_a_local_reply_names_its_service_from_the_route_cluster_tag() -> None:
    svc, t = _client()
    e = _entry(code=503)
    _tagged(e, upstream_cluster="outbound|8000||httpbin.foo.svc.cluster.local", upstream_peer_uri_san="-")
    svc.http_entry(e, Direction.OUTBOUND)
    [(lbl, _)] = samples(t.store.render(), "istio_requests_total")
    assert (lbl["destination_service"], lbl["destination_service_name"]) == ("httpbin.foo.svc.cluster.local", "httpbin")
    assert lbl["destination_principal"] == "unknown"  # `-`: the formatter had nothing


def test_the_server_side_ignores_upstream_tags_for_principals() -> None:
    svc, t = _service()
    e = _entry()
    _tagged(e, upstream_peer_uri_san=SERVER_SAN, upstream_local_uri_san=CLIENT_SAN)
    svc.http_entry(e, Direction.INBOUND)
    [(lbl, _)] = samples(t.store.render(), "istio_requests_total")
    assert (lbl["source_principal"], lbl["destination_principal"]) == ("unknown", "unknown")


def test_tcp_client_entries_read_the_same_tags() -> None:
    svc, t = _client()
    e = accesslog_pb2.TCPAccessLogEntry()
    c = e.common_properties
    c.stream_id = "c1"
    c.access_log_type = accesslog_pb2.TcpConnectionEnd
    c.upstream_cluster = "outbound|9000||tcp-echo.foo.svc.cluster.local"
    _tagged(e, upstream_peer_uri_san=SERVER_SAN, upstream_local_uri_san=CLIENT_SAN)
    svc.tcp_entry(e, Direction.OUTBOUND)
    [(lbl, n)] = samples(t.store.render(), "istio_tcp_connections_closed_total")
    assert (lbl["source_principal"], lbl["destination_principal"], n) == (CLIENT_SAN, SERVER_SAN, 1)
    assert (lbl["destination_service"], lbl["destination_service_name"], lbl["destination_service_namespace"]) == (
        "tcp-echo.foo.svc.cluster.local",
        "tcp-echo",
        "foo",
    )


# --- response flags as Istio's sidecar reports them ------------------------------------------


def _uaex(e: accesslog_pb2.HTTPAccessLogEntry | accesslog_pb2.TCPAccessLogEntry, **extra: bool) -> None:
    f = e.common_properties.response_flags
    f.unauthorized_details.reason = accesslog_pb2.ResponseFlags.Unauthorized.EXTERNAL_SERVICE
    for k, v in extra.items():
        setattr(f, k, v)


@pytest.mark.parametrize(
    ("stage", "flags"),
    [
        ("deny", "-"),  # Envoy's RBAC filter: no flag
        ("no-match", "-"),
        ("jwt", "-"),  # jwt_authn: no flag
        ("custom", "UAEX"),  # CUSTOM is ext_authz in Istio too
        ("error", "UAEX"),
        (None, "UAEX"),  # an ext_authz failure with no decision of extproc's
    ],
)
def test_an_http_denial_carries_the_flag_istios_native_filter_would(stage: str | None, flags: str) -> None:
    svc, t = _service()
    e = _entry(code=403)
    _uaex(e)
    if stage is not None:
        e.common_properties.metadata.filter_metadata["envoy.filters.http.ext_authz"].update({"extproc_stage": stage})
    svc.http_entry(e, Direction.INBOUND)
    [(lbl, _)] = samples(t.store.render(), "istio_requests_total")
    assert lbl["response_flags"] == flags


def test_other_flags_stay_when_uaex_goes() -> None:
    e = accesslog_pb2.HTTPAccessLogEntry()
    _uaex(e, downstream_connection_termination=True)
    md = e.common_properties.metadata.filter_metadata["envoy.filters.http.ext_authz"]
    md.update({"extproc_stage": "deny"})
    assert istio_flags(response_flags(e.common_properties.response_flags), md) == "DC"
    assert istio_flags("UF,URX", None) == "UF,URX"


@pytest.mark.parametrize(("stage", "flags"), [(None, "-"), ("deny", "-"), ("custom", "UAEX")])
def test_a_tcp_denial_is_the_network_rbac_filters_unless_custom(stage: str | None, flags: str) -> None:
    svc, t = _service()
    e = accesslog_pb2.TCPAccessLogEntry()
    e.common_properties.stream_id = "c2"
    e.common_properties.access_log_type = accesslog_pb2.TcpConnectionEnd
    _uaex(e)
    if stage is not None:
        e.common_properties.metadata.filter_metadata["envoy.filters.network.ext_authz"].update({"extproc_stage": stage})
    svc.tcp_entry(e, Direction.INBOUND)
    [(lbl, _)] = samples(t.store.render(), "istio_tcp_connections_closed_total")
    assert lbl["response_flags"] == flags

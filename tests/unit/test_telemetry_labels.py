"""Istio's label values (`record.Labeler`, after istio/proxy's `IstioStatsFilter::populatePeerInfo`
and `log`), the label order and per-family subsets, the series store and its Prometheus text,
and the recorder's once-per-request and TCP delta bookkeeping."""

from __future__ import annotations

import math
from collections.abc import Iterable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.telemetry import labels as L
from extproc.telemetry.peer import Workload, encode
from extproc.telemetry.record import (
    Direction,
    HttpRecord,
    Labeler,
    Peer,
    ServiceInfo,
    TcpRecord,
    service_of_cluster,
    spiffe_namespace,
)
from extproc.telemetry.recorder import Recorder, TcpTracker
from extproc.telemetry.store import OVERFLOW, MetricPlan, MetricStore, Table, escape
from tests.fixtures.prometheus import promtool_check_metrics

# The list in the reference (IstioStatsFilter::log / populatePeerInfo, Wasm STD_ISTIO_DIMENSIONS).
ISTIO_LABEL_ORDER = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
]

REVIEWS_SAN = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"
PRODUCTPAGE_SAN = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage"

REVIEWS = Workload(
    workload_name="reviews-v2",
    namespace="bookinfo",
    canonical_service="reviews",
    canonical_revision="v2",
    app="reviews",
    version="v2",
    cluster="Kubernetes",
    identity=REVIEWS_SAN,
)
PRODUCTPAGE = Workload(
    workload_name="productpage-v1",
    namespace="bookinfo",
    canonical_service="productpage",
    canonical_revision="v1",
    app="productpage",
    version="v1",
    cluster="Kubernetes",
    identity=PRODUCTPAGE_SAN,
)


def peer(direction: Direction, workload: Workload | None = None, **kw: str) -> Peer:
    return Peer(direction=direction, workload=workload, peer_key=encode(workload) if workload else "", **kw)


def labelled(values: Iterable[str], names: Iterable[str] = L.LABELS) -> dict[str, str]:
    values = tuple(values)
    names = tuple(names)
    assert len(values) == len(names)
    return dict(zip(names, values, strict=True))


def http_labels(labeler: Labeler, p: Peer, **kw: object) -> dict[str, str]:
    return labelled(labeler.http(HttpRecord(peer=p, **kw)))  # type: ignore[arg-type]


# --- order and families ----------------------------------------------------------------------


def test_label_order_is_istios() -> None:
    assert list(L.LABELS) == ISTIO_LABEL_ORDER
    assert len(L.LABELS) == 25


def test_family_label_subsets() -> None:
    names = {m.name: tuple(L.LABELS[i] for i in m.labels) for m in L.METRICS}
    for m in (L.REQUESTS, L.REQUEST_DURATION, L.REQUEST_BYTES, L.RESPONSE_BYTES):
        assert m.family is L.Family.HTTP
        assert names[m.name] == tuple(ISTIO_LABEL_ORDER)
    for m in (L.REQUEST_MESSAGES, L.RESPONSE_MESSAGES):
        assert m.family is L.Family.GRPC
        assert len(names[m.name]) == 20
        assert names[m.name] == tuple(ISTIO_LABEL_ORDER[:20])
        assert names[m.name][-1] == "destination_cluster"
    for m in (L.TCP_SENT, L.TCP_RECEIVED, L.TCP_OPENED, L.TCP_CLOSED):
        assert m.family is L.Family.TCP
        assert len(names[m.name]) == 23
        assert names[m.name] == (
            *ISTIO_LABEL_ORDER[:20],
            "request_protocol",
            "response_flags",
            "connection_security_policy",
        )
    assert {m.name: m.kind for m in L.METRICS} == {
        "istio_requests": L.Kind.COUNTER,
        "istio_request_duration_milliseconds": L.Kind.HISTOGRAM,
        "istio_request_bytes": L.Kind.HISTOGRAM,
        "istio_response_bytes": L.Kind.HISTOGRAM,
        "istio_request_messages": L.Kind.COUNTER,
        "istio_response_messages": L.Kind.COUNTER,
        "istio_tcp_sent_bytes": L.Kind.COUNTER,
        "istio_tcp_received_bytes": L.Kind.COUNTER,
        "istio_tcp_connections_opened": L.Kind.COUNTER,
        "istio_tcp_connections_closed": L.Kind.COUNTER,
    }


def test_default_buckets_are_envoys() -> None:
    assert L.DEFAULT_BUCKETS == (
        0.5,
        1,
        5,
        10,
        25,
        50,
        100,
        250,
        500,
        1000,
        2500,
        5000,
        10000,
        30000,
        60000,
        300000,
        600000,
        1800000,
        3600000,
    )


# --- (a) full peer metadata and mTLS ---------------------------------------------------------


def test_inbound_full_metadata_and_mtls() -> None:
    labeler = Labeler(REVIEWS)
    p = peer(
        Direction.INBOUND,
        PRODUCTPAGE,
        peer_principal=PRODUCTPAGE_SAN,
        local_principal=REVIEWS_SAN,
        host="reviews:9080",
        upstream_cluster="inbound|9080||",
    )
    assert http_labels(labeler, p, response_code=200, duration_ms=3.0) == {
        "reporter": "destination",
        "source_workload": "productpage-v1",
        "source_canonical_service": "productpage",
        "source_canonical_revision": "v1",
        "source_workload_namespace": "bookinfo",
        "source_principal": PRODUCTPAGE_SAN,
        "source_app": "productpage",
        "source_version": "v1",
        "source_cluster": "Kubernetes",
        "destination_workload": "reviews-v2",
        "destination_workload_namespace": "bookinfo",
        "destination_principal": REVIEWS_SAN,
        "destination_app": "reviews",
        "destination_version": "v2",
        "destination_service": "reviews:9080",
        "destination_canonical_service": "reviews",
        "destination_canonical_revision": "v2",
        "destination_service_name": "reviews:9080",
        "destination_service_namespace": "bookinfo",
        "destination_cluster": "Kubernetes",
        "request_protocol": "http",
        "response_code": "200",
        "grpc_response_status": "",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls",
    }


def test_outbound_full_metadata_and_mtls() -> None:
    labeler = Labeler(PRODUCTPAGE)
    p = peer(
        Direction.OUTBOUND,
        REVIEWS,
        peer_principal=REVIEWS_SAN,
        local_principal=PRODUCTPAGE_SAN,
        host="reviews:9080",
        upstream_cluster="outbound|9080||reviews.bookinfo.svc.cluster.local",
    )
    assert http_labels(labeler, p, response_code=503, response_flags="UF,URX") == {
        "reporter": "source",
        "source_workload": "productpage-v1",
        "source_canonical_service": "productpage",
        "source_canonical_revision": "v1",
        "source_workload_namespace": "bookinfo",
        "source_principal": PRODUCTPAGE_SAN,
        "source_app": "productpage",
        "source_version": "v1",
        "source_cluster": "Kubernetes",
        "destination_workload": "reviews-v2",
        "destination_workload_namespace": "bookinfo",
        "destination_principal": REVIEWS_SAN,
        "destination_app": "reviews",
        "destination_version": "v2",
        "destination_service": "reviews.bookinfo.svc.cluster.local",  # the cluster's, not the Host header
        "destination_canonical_service": "reviews",
        "destination_canonical_revision": "v2",
        "destination_service_name": "reviews",
        "destination_service_namespace": "bookinfo",
        "destination_cluster": "Kubernetes",
        "request_protocol": "http",
        "response_code": "503",
        "grpc_response_status": "",
        "response_flags": "UF,URX",
        "connection_security_policy": "unknown",  # always, from the client side
    }


def test_outbound_principals_only_from_certificates() -> None:
    """Client side over plain text: no upstream certificate, so `unknown` for both principals, as
    Istio's sidecars report (testdata/metric/client_request_total.yaml.tmpl), even when the
    peer's metadata declares an IDENTITY."""
    got = http_labels(Labeler(PRODUCTPAGE), peer(Direction.OUTBOUND, REVIEWS, host="reviews:9080"))
    assert REVIEWS.identity == REVIEWS_SAN
    assert got["destination_principal"] == "unknown"
    assert got["source_principal"] == "unknown"
    assert got["destination_workload_namespace"] == "bookinfo"  # the metadata still names the namespace
    assert got["connection_security_policy"] == "unknown"


def test_inbound_never_takes_the_principal_from_peer_metadata() -> None:
    """Server side: principals only from TLS; a peer's self-declared IDENTITY is not a SAN."""
    got = http_labels(Labeler(REVIEWS), peer(Direction.INBOUND, PRODUCTPAGE, host="reviews:9080"))
    assert got["source_principal"] == "unknown"
    assert got["destination_principal"] == "unknown"
    assert got["connection_security_policy"] == "none"
    assert got["source_workload"] == "productpage-v1"
    assert got["source_workload_namespace"] == "bookinfo"  # from metadata


@pytest.mark.parametrize(
    ("peer_san", "local_san", "policy"),
    [
        (PRODUCTPAGE_SAN, REVIEWS_SAN, "mutual_tls"),
        (PRODUCTPAGE_SAN, "", "none"),
        ("", REVIEWS_SAN, "none"),
        ("", "", "none"),
    ],
)
def test_inbound_connection_security_policy(peer_san: str, local_san: str, policy: str) -> None:
    p = peer(Direction.INBOUND, None, peer_principal=peer_san, local_principal=local_san)
    labeler = Labeler(REVIEWS)
    assert http_labels(labeler, p)["connection_security_policy"] == policy
    assert labelled(labeler.tcp(TcpRecord(peer=p)))["connection_security_policy"] == policy
    out = peer(Direction.OUTBOUND, None, peer_principal=peer_san, local_principal=local_san)
    assert http_labels(labeler, out)["connection_security_policy"] == "unknown"


# --- (b) nothing known about the peer --------------------------------------------------------

NO_PEER_SOURCE = {
    "source_workload": "unknown",
    "source_canonical_service": "unknown",
    "source_canonical_revision": "latest",
    "source_workload_namespace": "unknown",
    "source_principal": "unknown",
    "source_app": "unknown",
    "source_version": "unknown",
    "source_cluster": "unknown",
}


def test_inbound_no_metadata_no_tls() -> None:
    got = http_labels(Labeler(REVIEWS), peer(Direction.INBOUND), response_code=200)
    assert got == {
        "reporter": "destination",
        **NO_PEER_SOURCE,
        "destination_workload": "reviews-v2",
        "destination_workload_namespace": "bookinfo",
        "destination_principal": "unknown",
        "destination_app": "reviews",
        "destination_version": "v2",
        "destination_service": "reviews",  # no Host: the local canonical service
        "destination_canonical_service": "reviews",
        "destination_canonical_revision": "v2",
        "destination_service_name": "reviews",
        "destination_service_namespace": "bookinfo",
        "destination_cluster": "Kubernetes",
        "request_protocol": "http",
        "response_code": "200",
        "grpc_response_status": "",
        "response_flags": "-",
        "connection_security_policy": "none",
    }


def test_outbound_no_metadata_no_tls() -> None:
    got = http_labels(Labeler(PRODUCTPAGE), peer(Direction.OUTBOUND, host="httpbin.org"), response_code=200)
    assert got == {
        "reporter": "source",
        "source_workload": "productpage-v1",
        "source_canonical_service": "productpage",
        "source_canonical_revision": "v1",
        "source_workload_namespace": "bookinfo",
        "source_principal": "unknown",
        "source_app": "productpage",
        "source_version": "v1",
        "source_cluster": "Kubernetes",
        "destination_workload": "unknown",
        "destination_workload_namespace": "unknown",
        "destination_principal": "unknown",
        "destination_app": "unknown",
        "destination_version": "unknown",
        "destination_service": "httpbin.org",
        "destination_canonical_service": "unknown",
        "destination_canonical_revision": "latest",
        "destination_service_name": "httpbin.org",
        "destination_service_namespace": "unknown",
        "destination_cluster": "unknown",
        "request_protocol": "http",
        "response_code": "200",
        "grpc_response_status": "",
        "response_flags": "-",
        "connection_security_policy": "unknown",
    }
    # No Host either (TCP): destination_service and its name are unknown too.
    got = labelled(Labeler(PRODUCTPAGE).tcp(TcpRecord(peer=peer(Direction.OUTBOUND))))
    assert got["destination_service"] == got["destination_service_name"] == "unknown"


def test_peer_with_empty_fields_is_like_no_peer() -> None:
    """A peer that sent metadata with empty fields: each missing field is `unknown` / `latest`."""
    partial = Workload(workload_name="sleep")
    got = http_labels(Labeler(REVIEWS), peer(Direction.INBOUND, partial))
    assert got == {**got, **NO_PEER_SOURCE, "source_workload": "sleep"}
    got = http_labels(Labeler(PRODUCTPAGE), peer(Direction.OUTBOUND, partial))
    assert got["destination_workload"] == "sleep"
    assert got["destination_canonical_revision"] == "latest"
    assert got["destination_canonical_service"] == "unknown"
    assert got["destination_cluster"] == "unknown"


def test_local_fields_have_no_fallback() -> None:
    """Local values come from node metadata with no default, so they may be "" (istio/istio#45782)."""
    bare = Workload(workload_name="w", namespace="ns")
    got = http_labels(Labeler(bare), peer(Direction.INBOUND))
    for name in ("destination_app", "destination_version", "destination_canonical_service", "destination_cluster"):
        assert got[name] == "", name
    assert got["destination_canonical_revision"] == ""
    got = http_labels(Labeler(bare), peer(Direction.OUTBOUND))
    for name in ("source_app", "source_version", "source_canonical_service", "source_canonical_revision"):
        assert got[name] == "", name


# --- (c) namespace from the SPIFFE id first ----------------------------------------------------


def test_spiffe_namespace() -> None:
    assert spiffe_namespace("spiffe://cluster.local/ns/foo/sa/bar") == "foo"
    assert spiffe_namespace("cluster.local/ns/foo/sa/bar") == "foo"
    assert spiffe_namespace("spiffe://td/ns/foo") == "foo"
    assert spiffe_namespace("spiffe://td/sa/bar") == ""
    assert spiffe_namespace("spiffe://td/ns//sa/bar") == ""
    assert spiffe_namespace("") == ""


def test_namespace_from_spiffe_id_beats_metadata() -> None:
    elsewhere = Workload(workload_name="sleep", namespace="meta-ns")
    san = "spiffe://cluster.local/ns/san-ns/sa/sleep"
    got = http_labels(Labeler(REVIEWS), peer(Direction.INBOUND, elsewhere, peer_principal=san))
    assert got["source_workload_namespace"] == "san-ns"
    assert got["source_principal"] == san

    got = http_labels(Labeler(PRODUCTPAGE), peer(Direction.OUTBOUND, elsewhere, peer_principal=san))
    assert got["destination_workload_namespace"] == "san-ns"
    assert got["destination_service_namespace"] == "san-ns"

    # Outbound with no upstream cert: a declared IDENTITY is no certificate; the metadata's
    # namespace stands.
    declared = Workload(workload_name="sleep", namespace="meta-ns", identity=san)
    got = http_labels(Labeler(PRODUCTPAGE), peer(Direction.OUTBOUND, declared))
    assert got["destination_workload_namespace"] == "meta-ns"
    assert got["destination_principal"] == "unknown"


def test_namespace_falls_back_to_metadata() -> None:
    elsewhere = Workload(workload_name="sleep", namespace="meta-ns")
    for san in ("", "spiffe://cluster.local/sa/sleep", "spiffe://cluster.local/ns//sa/sleep"):
        got = http_labels(Labeler(REVIEWS), peer(Direction.INBOUND, elsewhere, peer_principal=san))
        assert got["source_workload_namespace"] == "meta-ns", san
    # SAN without a namespace and no metadata: unknown.
    got = http_labels(Labeler(REVIEWS), peer(Direction.INBOUND, peer_principal="spiffe://td/sa/x"))
    assert got["source_workload_namespace"] == "unknown"
    assert got["source_principal"] == "spiffe://td/sa/x"
    # SAN namespace without metadata.
    got = http_labels(Labeler(REVIEWS), peer(Direction.INBOUND, peer_principal="spiffe://td/ns/x/sa/y"))
    assert got["source_workload_namespace"] == "x"
    assert got["source_workload"] == "unknown"


# --- (d) ServiceInfo (Istio's inbound cluster metadata) -----------------------------------------


def test_service_info_overrides_inbound_service_labels() -> None:
    svc = ServiceInfo(host="reviews.bookinfo.svc.cluster.local")
    p = peer(Direction.INBOUND, PRODUCTPAGE, host="10.0.0.7:9080")
    got = http_labels(Labeler(REVIEWS, svc), p)
    assert got["destination_service"] == "reviews.bookinfo.svc.cluster.local"
    assert got["destination_service_name"] == "reviews"  # host up to the first "."
    assert got["destination_service_namespace"] == "bookinfo"  # the local namespace

    svc = ServiceInfo(host="reviews-alias.shared.svc.cluster.local", name="reviews-alias")
    got = http_labels(Labeler(REVIEWS, svc), p)
    assert got["destination_service"] == "reviews-alias.shared.svc.cluster.local"
    assert got["destination_service_name"] == "reviews-alias"
    # As istio_stats.cc: the server side always reports its own namespace here.
    assert got["destination_service_namespace"] == "bookinfo"

    # TCP: no Host header at all, the service still comes from ServiceInfo.
    got = labelled(Labeler(REVIEWS, svc).tcp(TcpRecord(peer=peer(Direction.INBOUND))))
    assert got["destination_service"] == "reviews-alias.shared.svc.cluster.local"
    assert got["destination_service_name"] == "reviews-alias"


def test_service_info_is_inbound_only() -> None:
    svc = ServiceInfo(host="productpage.bookinfo.svc.cluster.local")
    got = http_labels(Labeler(PRODUCTPAGE, svc), peer(Direction.OUTBOUND, REVIEWS, host="reviews:9080"))
    assert got["destination_service"] == "reviews:9080"
    assert got["destination_service_name"] == "reviews:9080"
    assert got["destination_service_namespace"] == "bookinfo"  # the peer's namespace


@pytest.mark.parametrize(
    ("cluster", "expected"),
    [
        ("outbound|8000||httpbin.foo.svc.cluster.local", ("httpbin.foo.svc.cluster.local", "httpbin", "foo")),
        (
            "outbound|9080|v2|reviews.bookinfo.svc.cluster.local",
            ("reviews.bookinfo.svc.cluster.local", "reviews", "bookinfo"),
        ),
        ("outbound_.8000_._.httpbin.foo.svc.cluster.local", ("httpbin.foo.svc.cluster.local", "httpbin", "foo")),
        ("outbound|8000||httpbin.foo.svc.example.org", ("httpbin.foo.svc.example.org", "httpbin", "foo")),
        # A ServiceEntry host: istiod names the service after the host; no namespace to read.
        ("outbound|443||api.example.com", ("api.example.com", "api.example.com", "")),
        (
            "inbound|8080|http|reviews.bookinfo.svc.cluster.local",
            ("reviews.bookinfo.svc.cluster.local", "reviews", "bookinfo"),
        ),
    ],
)
def test_service_of_an_istiod_named_cluster(cluster: str, expected: tuple[str, str, str]) -> None:
    svc = service_of_cluster(cluster)
    assert svc is not None
    assert (svc.host, svc.short_name, svc.namespace) == expected


@pytest.mark.parametrize(
    "cluster",
    ["", "app", "server_http", "inbound|8080||", "outbound|8000|", "sideways|1||a.b.svc.cluster.local", "a|b|c|d|e"],
)
def test_other_cluster_names_name_no_service(cluster: str) -> None:
    assert service_of_cluster(cluster) is None


def test_client_side_service_from_the_cluster_then_its_metadata_then_the_host_header() -> None:
    labeler = Labeler(PRODUCTPAGE)
    named = peer(
        Direction.OUTBOUND,
        REVIEWS,
        host="reviews:9080",
        upstream_cluster="outbound|9080||reviews.bookinfo.svc.cluster.local",
    )
    got = http_labels(labeler, named)
    assert (got["destination_service"], got["destination_service_name"], got["destination_service_namespace"]) == (
        "reviews.bookinfo.svc.cluster.local",
        "reviews",
        "bookinfo",
    )
    # The cluster's logged istio.services[0] wins over its name, as in istio_stats.cc.
    meta = ServiceInfo("reviews.shared.global", name="reviews-global", namespace="shared")
    with_meta = peer(
        Direction.OUTBOUND,
        REVIEWS,
        host="reviews:9080",
        upstream_cluster="outbound|9080||reviews.bookinfo.svc.cluster.local",
    )
    with_meta.service = meta
    got = http_labels(labeler, with_meta)
    assert (got["destination_service"], got["destination_service_name"], got["destination_service_namespace"]) == (
        "reviews.shared.global",
        "reviews-global",
        "shared",
    )
    # A ServiceEntry host without metadata: the namespace is the peer's, as Istio falls back.
    se = peer(Direction.OUTBOUND, REVIEWS, host="api.example.com", upstream_cluster="outbound|443||api.example.com")
    got = http_labels(labeler, se)
    assert (got["destination_service"], got["destination_service_name"], got["destination_service_namespace"]) == (
        "api.example.com",
        "api.example.com",
        "bookinfo",
    )
    # No istiod cluster: the Host header, Istio's own fallback.
    plain = peer(Direction.OUTBOUND, REVIEWS, host="reviews:9080", upstream_cluster="reviews_cluster")
    got = http_labels(labeler, plain)
    assert (got["destination_service"], got["destination_service_name"]) == ("reviews:9080", "reviews:9080")
    # TCP has no Host header: without an istiod cluster the service is unknown.
    got = labelled(labeler.tcp(TcpRecord(peer=peer(Direction.OUTBOUND, REVIEWS, upstream_cluster="tcp"))))
    assert (got["destination_service"], got["destination_service_name"]) == ("unknown", "unknown")
    got = labelled(
        labeler.tcp(
            TcpRecord(
                peer=peer(
                    Direction.OUTBOUND, REVIEWS, upstream_cluster="outbound|9000||tcp-echo.bookinfo.svc.cluster.local"
                )
            )
        )
    )
    assert (got["destination_service"], got["destination_service_name"]) == (
        "tcp-echo.bookinfo.svc.cluster.local",
        "tcp-echo",
    )


def test_inbound_service_namespace_is_always_the_local_one() -> None:
    p = peer(
        Direction.INBOUND, PRODUCTPAGE, host="x", upstream_cluster="inbound|8080|http|reviews.other.svc.cluster.local"
    )
    got = http_labels(Labeler(REVIEWS), p)
    assert got["destination_service"] == "reviews.other.svc.cluster.local"
    assert got["destination_service_namespace"] == "bookinfo"


def test_service_info_short_name() -> None:
    assert ServiceInfo("a.b.svc.cluster.local").short_name == "a"
    assert ServiceInfo("plain").short_name == "plain"
    assert ServiceInfo("a.b", name="n").short_name == "n"


# --- (e) special clusters and routes ------------------------------------------------------------


@pytest.mark.parametrize("direction", list(Direction))
@pytest.mark.parametrize(
    ("route", "cluster", "name"),
    [
        ("block_all", "", "BlackHoleCluster"),
        ("allow_any", "", "PassthroughCluster"),
        ("allow_any", "BlackHoleCluster", "PassthroughCluster"),  # the route is looked at first
        ("", "BlackHoleCluster", "BlackHoleCluster"),
        ("", "PassthroughCluster", "PassthroughCluster"),
        ("", "InboundPassthroughCluster", "InboundPassthroughCluster"),
        ("", "InboundPassthroughClusterIpv4", "InboundPassthroughClusterIpv4"),
        ("", "InboundPassthroughClusterIpv6", "InboundPassthroughClusterIpv6"),
        ("default", "app", "example.com:8080"),  # no istiod-named cluster: the Host header
    ],
)
def test_special_clusters_and_routes(direction: Direction, route: str, cluster: str, name: str) -> None:
    svc = ServiceInfo(host="reviews.bookinfo.svc.cluster.local")
    p = peer(direction, host="example.com:8080", route_name=route, upstream_cluster=cluster)
    got = http_labels(Labeler(REVIEWS, svc if direction is Direction.OUTBOUND else None), p)
    assert got["destination_service_name"] == name
    assert got["destination_service"] == "example.com:8080"  # the Host header, whatever the name
    if direction is Direction.INBOUND and name != "example.com:8080":
        # ServiceInfo (cluster metadata) is not consulted for a special route or cluster.
        got = http_labels(Labeler(REVIEWS, svc), p)
        assert got["destination_service_name"] == name
        assert got["destination_service"] == "example.com:8080"
        assert got["destination_service_namespace"] == "bookinfo"


def test_special_cluster_without_host() -> None:
    got = labelled(
        Labeler(PRODUCTPAGE).tcp(TcpRecord(peer=peer(Direction.OUTBOUND, upstream_cluster="BlackHoleCluster")))
    )
    assert got["destination_service_name"] == "BlackHoleCluster"
    assert got["destination_service"] == "unknown"
    got = labelled(
        Labeler(REVIEWS).tcp(TcpRecord(peer=peer(Direction.INBOUND, upstream_cluster="InboundPassthroughClusterIpv4")))
    )
    assert got["destination_service_name"] == "InboundPassthroughClusterIpv4"
    assert got["destination_service"] == "reviews"


# --- (f) gRPC, (g) response code and flags ------------------------------------------------------


def test_grpc_protocol_and_status() -> None:
    labeler = Labeler(REVIEWS)
    p = peer(Direction.INBOUND, PRODUCTPAGE)
    got = http_labels(labeler, p, grpc=True, response_code=200, grpc_status="14")
    assert (got["request_protocol"], got["response_code"], got["grpc_response_status"]) == ("grpc", "200", "14")
    got = http_labels(labeler, p, grpc=True, response_code=200, grpc_status="0")
    assert got["grpc_response_status"] == "0"
    got = http_labels(labeler, p, grpc=True, response_code=0)  # no status known
    assert got["grpc_response_status"] == ""
    # Plain HTTP: never a gRPC status, even if one was filled in.
    got = http_labels(labeler, p, grpc=False, response_code=200, grpc_status="5")
    assert (got["request_protocol"], got["grpc_response_status"]) == ("http", "")


def test_response_code_and_flags_defaults() -> None:
    labeler = Labeler(REVIEWS)
    p = peer(Direction.INBOUND, PRODUCTPAGE)
    got = http_labels(labeler, p)
    assert (got["response_code"], got["response_flags"]) == ("0", "-")  # no response: value_or(0)
    assert http_labels(labeler, p, response_flags="")["response_flags"] == "-"
    assert http_labels(labeler, p, response_code=404, response_flags="NR")["response_flags"] == "NR"
    assert http_labels(labeler, p, response_code=404)["response_code"] == "404"


def test_tcp_labels() -> None:
    labeler = Labeler(REVIEWS)
    p = peer(Direction.INBOUND, PRODUCTPAGE, peer_principal=PRODUCTPAGE_SAN, local_principal=REVIEWS_SAN)
    full = labelled(labeler.tcp(TcpRecord(peer=p, response_flags="UF")))
    assert full["request_protocol"] == "tcp"
    assert full["response_flags"] == "UF"
    assert full["connection_security_policy"] == "mutual_tls"
    assert labelled(labeler.tcp(TcpRecord(peer=p, response_flags="")))["response_flags"] == "-"
    # The peer part is the same as for HTTP on the same connection.
    http = http_labels(labeler, p)
    assert {k: full[k] for k in ISTIO_LABEL_ORDER[:20]} == {k: http[k] for k in ISTIO_LABEL_ORDER[:20]}


def test_peer_labels_are_cached_and_bounded() -> None:
    labeler = Labeler(REVIEWS, cache_size=4)
    p = peer(Direction.INBOUND, PRODUCTPAGE)
    first = labeler.peer_labels(p)
    assert labeler.peer_labels(peer(Direction.INBOUND, PRODUCTPAGE)) is first
    for i in range(20):
        w = Workload(workload_name=f"w{i}")
        assert labelled(labeler.http(HttpRecord(peer=peer(Direction.INBOUND, w))))["source_workload"] == f"w{i}"
        assert len(labeler._peer_cache) <= 4
    # Distinct directions, principals and hosts are distinct entries.
    a = labelled(labeler.http(HttpRecord(peer=peer(Direction.INBOUND, PRODUCTPAGE, host="a"))))
    b = labelled(labeler.http(HttpRecord(peer=peer(Direction.INBOUND, PRODUCTPAGE, host="b"))))
    assert (a["destination_service"], b["destination_service"]) == ("a", "b")


# --- the store: rendering ------------------------------------------------------------------------


def table(store: MetricStore, metric: L.MetricDef, outbound: bool = False) -> Table:
    t = store.tables_for(outbound).get(metric.name)
    assert t is not None and not t.plan.disabled
    return t


def standard_store(**kw: object) -> MetricStore:
    return MetricStore([MetricPlan.standard(m) for m in L.METRICS], **kw)  # type: ignore[arg-type]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counter_rendering() -> None:
    store = standard_store()
    rec = Recorder(Labeler(REVIEWS), store)
    p = peer(Direction.INBOUND, PRODUCTPAGE, host="reviews:9080")
    for _ in range(3):
        rec.http(HttpRecord(peer=p, response_code=200), "access_log")
    rec.http(HttpRecord(peer=p, response_code=503), "access_log")
    text = store.render()
    assert text.count("# TYPE istio_requests_total counter\n") == 1
    assert "# HELP istio_requests_total Requests\n" in text
    lines = [ln for ln in text.splitlines() if ln.startswith("istio_requests_total{")]
    assert len(lines) == 2
    base = Labeler(REVIEWS).http(HttpRecord(peer=p, response_code=200))
    expected = ",".join(f'{n}="{v}"' for n, v in zip(L.LABELS, base, strict=True))
    assert f"istio_requests_total{{{expected}}} 3" in lines
    assert lines[0].startswith('istio_requests_total{reporter="destination",source_workload="productpage-v1",')
    # Inbound and outbound tables render under one family.
    rec.http(HttpRecord(peer=peer(Direction.OUTBOUND, PRODUCTPAGE), response_code=200), "access_log")
    text = store.render()
    assert text.count("# TYPE istio_requests_total counter\n") == 1
    assert len([ln for ln in text.splitlines() if ln.startswith("istio_requests_total{")]) == 3
    assert 'istio_requests_total{reporter="source",' in text
    # Only the families that have series are rendered.
    assert "istio_request_bytes" not in text
    assert "istio_tcp" not in text


def test_histogram_rendering() -> None:
    store = MetricStore([MetricPlan.standard(L.REQUEST_DURATION)])
    t = table(store, L.REQUEST_DURATION)
    base = Labeler(REVIEWS).http(HttpRecord(peer=peer(Direction.INBOUND)))
    values = [0.5, 0.7, 1.0, 7, 10, 4_000_000, 0.1]
    for v in values:
        t.observe(base, None, v)
    text = store.render()
    name = "istio_request_duration_milliseconds"
    assert f"# TYPE {name} histogram\n" in text
    buckets = {}
    for ln in text.splitlines():
        if ln.startswith(f"{name}_bucket{{"):
            le = ln.split('le="')[1].split('"')[0]
            buckets[le] = int(ln.rsplit(" ", 1)[1])
            assert ln.index("reporter=") < ln.index("le=")  # le comes last
    les = list(buckets)
    assert les == [*("0.5", "1.0", "5.0", "10.0", "25.0", "50.0", "100.0", "250.0", "500.0", "1000.0"),
                   *("2500.0", "5000.0", "10000.0", "30000.0", "60000.0", "300000.0", "600000.0"),
                   *("1.8e+06", "3.6e+06", "+Inf")]  # fmt: skip
    # Cumulative; a value equal to a bound falls in that bucket (le = less or equal).
    assert buckets["0.5"] == 2  # 0.1, 0.5
    assert buckets["1.0"] == 4  # + 0.7, 1.0
    assert buckets["5.0"] == 4
    assert buckets["10.0"] == 6  # + 7, 10
    assert buckets["3.6e+06"] == 6
    assert buckets["+Inf"] == len(values)
    counts = list(buckets.values())
    assert counts == sorted(counts)
    got = samples(text)
    (count,) = [v for (n, _), v in got.items() if n == f"{name}_count"]
    (total,) = [v for (n, _), v in got.items() if n == f"{name}_sum"]
    assert count == buckets["+Inf"] == len(values)
    assert math.isclose(total, sum(values))


def test_custom_buckets() -> None:
    store = MetricStore([MetricPlan.standard(L.REQUEST_BYTES)], buckets=(1, 10, 100))
    t = table(store, L.REQUEST_BYTES)
    base = Labeler(REVIEWS).http(HttpRecord(peer=peer(Direction.INBOUND)))
    for v in (0, 1, 50, 100, 101):
        t.observe(base, None, v)
    text = store.render()
    got = {ln.split('le="')[1].split('"')[0]: ln.rsplit(" ", 1)[1] for ln in text.splitlines() if "_bucket{" in ln}
    assert got == {"1.0": "2", "10.0": "2", "100.0": "4", "+Inf": "5"}
    assert "istio_request_bytes_sum{" in text and text.split("istio_request_bytes_sum{")[1].split("\n")[0].endswith(
        "} 252.0"
    )


def test_label_value_escaping() -> None:
    assert escape("plain") == "plain"
    assert escape('a"b') == 'a\\"b'
    assert escape("a\\b") == "a\\\\b"
    assert escape("a\nb") == "a\\nb"
    assert escape('\\"\n') == '\\\\\\"\\n'
    nasty = 'we"ird\\name\nline2'
    store = standard_store()
    rec = Recorder(Labeler(REVIEWS), store)
    rec.http(HttpRecord(peer=peer(Direction.INBOUND, Workload(workload_name=nasty), host=nasty)), "access_log")
    text = store.render()
    assert 'source_workload="we\\"ird\\\\name\\nline2"' in text
    parsed = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
    assert parsed[0].labels["source_workload"] == nasty
    assert parsed[0].labels["destination_service"] == nasty
    rc, out = promtool_check_metrics(text)
    assert rc == 0, out


def test_render_is_parseable_and_totals_match() -> None:
    store = standard_store()
    rec = Recorder(Labeler(REVIEWS), store)
    p = peer(Direction.INBOUND, PRODUCTPAGE, peer_principal=PRODUCTPAGE_SAN, local_principal=REVIEWS_SAN)
    rec.http(HttpRecord(peer=p, response_code=200, duration_ms=2.5, request_bytes=300, response_bytes=1200), "ext_proc")
    rec.http(
        HttpRecord(peer=p, grpc=True, response_code=200, grpc_status="0", request_messages=3, response_messages=5),
        "ext_proc",
    )
    got = samples(store.render())
    by_name: dict[str, float] = {}
    for (n, _), v in got.items():
        by_name[n] = by_name.get(n, 0) + v
    assert by_name["istio_requests_total"] == 2
    assert by_name["istio_request_duration_milliseconds_count"] == 1
    assert by_name["istio_request_bytes_sum"] == 300
    assert by_name["istio_response_bytes_sum"] == 1200
    assert by_name["istio_request_messages_total"] == 3
    assert by_name["istio_response_messages_total"] == 5
    # The gRPC message counters carry the 20 peer labels only.
    for (n, lbls), _ in got.items():
        if n == "istio_request_messages_total":
            assert [k for k, _ in lbls] == sorted(ISTIO_LABEL_ORDER[:20])


def test_tcp_rendering_has_23_labels_in_order() -> None:
    store = standard_store()
    rec = Recorder(Labeler(REVIEWS), store)
    tcp = TcpTracker(rec)
    tcp.report("s1", peer(Direction.INBOUND, PRODUCTPAGE), 10, 20, end=True, response_flags="UC")
    text = store.render()
    for name in ("istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total"):
        (line,) = [ln for ln in text.splitlines() if ln.startswith(name + "{")]
        names = [kv.split("=", 1)[0] for kv in line[len(name) + 1 : line.rindex("}")].split('",')]
        assert names == [*ISTIO_LABEL_ORDER[:20], "request_protocol", "response_flags", "connection_security_policy"]
        assert 'request_protocol="tcp",response_flags="UC",connection_security_policy="none"}' in line


def full_store_text() -> str:
    store = standard_store()
    rec = Recorder(Labeler(REVIEWS, ServiceInfo("reviews.bookinfo.svc.cluster.local")), store)
    tcp = TcpTracker(rec)
    for i, code in enumerate((200, 404, 503)):
        p = peer(
            Direction.INBOUND,
            Workload(workload_name=f"client-{i}", namespace="ns", app=f'a"p\\p{i}\n'),
            peer_principal=f"spiffe://cluster.local/ns/ns/sa/client-{i}",
            local_principal=REVIEWS_SAN,
        )
        rec.http(
            HttpRecord(peer=p, response_code=code, duration_ms=1.5 * i, request_bytes=100, response_bytes=2000),
            "access_log",
        )
        rec.http(
            HttpRecord(peer=p, grpc=True, response_code=200, grpc_status="0", request_messages=1, response_messages=2),
            "access_log",
        )
        tcp.report(f"s{i}", p, 100, 200, end=False)
        tcp.report(f"s{i}", p, 150, 200, end=True)
    return store.render()


def test_promtool_accepts_everything_but_istios_millisecond_name() -> None:
    """`promtool check metrics` parses the whole exposition; its only lint is Istio's metric name
    `istio_request_duration_milliseconds` (promtool wants base unit seconds), which is not ours to change."""
    text = full_store_text()
    for fam in ("istio_tcp_connections_closed_total", "istio_request_messages_total", "istio_response_bytes_bucket"):
        assert fam in text
    rc, out = promtool_check_metrics(text)
    problems = [ln for ln in out.splitlines() if ln.strip()]
    assert rc == 3, out  # 3 = lint problems only; 1 would mean it did not parse
    assert problems == ['istio_request_duration_milliseconds use base unit "seconds" instead of "milliseconds"']


def test_promtool_exit_0_without_the_duration_metric() -> None:
    text = full_store_text()
    name = L.REQUEST_DURATION.name
    kept = "".join(ln for ln in text.splitlines(keepends=True) if name not in ln)
    assert "istio_request_bytes_bucket" in kept and "istio_tcp_sent_bytes_total" in kept
    rc, out = promtool_check_metrics(kept)
    assert rc == 0, out


def test_promtool_exit_0_for_a_store_without_durations() -> None:
    store = MetricStore([MetricPlan.standard(m) for m in L.METRICS if m is not L.REQUEST_DURATION])
    rec = Recorder(Labeler(REVIEWS), store)
    rec.http(HttpRecord(peer=peer(Direction.INBOUND), response_code=200, request_bytes=5, response_bytes=7), "x")
    TcpTracker(rec).report("s", peer(Direction.INBOUND), 1, 2, end=True)
    rc, out = promtool_check_metrics(store.render())
    assert rc == 0, out


# --- the store: bounds ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def count_record(store: MetricStore, labeler: Labeler, p: Peer, code: int = 200) -> None:
    t = table(store, L.REQUESTS, p.direction is Direction.OUTBOUND)
    t.add(labeler.http(HttpRecord(peer=p, response_code=code)), None, 1)


def test_idle_series_are_evicted_on_tick() -> None:
    clock = FakeClock()
    store = MetricStore([MetricPlan.standard(L.REQUESTS)], idle_expiry_s=30, clock=clock)
    labeler = Labeler(REVIEWS)
    a = peer(Direction.INBOUND, Workload(workload_name="a"))
    b = peer(Direction.INBOUND, Workload(workload_name="b"))
    count_record(store, labeler, a)
    clock.now += 10
    assert store.tick() == 0  # epoch 1 starts at +10
    clock.now += 25
    assert store.tick() == 0  # +35: epoch 0 began 35 s ago; nothing was touched before it
    count_record(store, labeler, b)
    assert store.series_counts()[L.REQUESTS.name] == 2
    clock.now += 10
    # +45: epoch 1 began 35 s ago, so a series untouched since epoch 0 has been idle >= 30 s.
    assert store.tick() == 1
    assert store.series_counts()[L.REQUESTS.name] == 1
    assert store.evicted == 1 and store.count == 1
    text = store.render()
    assert 'source_workload="b"' in text and 'source_workload="a"' not in text
    # b stays while it is used.
    for _ in range(10):
        clock.now += 20
        count_record(store, labeler, b)
        assert store.tick() == 0
    # Last touched at the last tick; still there 29 s later, gone once it has been idle 30 s.
    clock.now += 29
    assert store.tick() == 0
    clock.now += 1
    assert store.tick() == 1
    assert store.count == 0
    assert store.render() == ""
    # A series that comes back starts again from zero.
    count_record(store, labeler, a)
    assert " 1\n" in store.render()


def test_no_eviction_when_expiry_disabled() -> None:
    clock = FakeClock()
    store = MetricStore([MetricPlan.standard(L.REQUESTS)], idle_expiry_s=0, clock=clock)
    count_record(store, Labeler(REVIEWS), peer(Direction.INBOUND))
    for _ in range(5):
        clock.now += 1e6
        assert store.tick() == 0
    assert store.count == 1


def test_max_series_overflow() -> None:
    store = MetricStore([MetricPlan.standard(L.REQUESTS), MetricPlan.standard(L.TCP_OPENED)], max_series=3)
    labeler = Labeler(REVIEWS)
    peers = [peer(Direction.INBOUND, Workload(workload_name=f"w{i}")) for i in range(10)]
    for p in peers:
        count_record(store, labeler, p)
    count_record(store, labeler, peers[0])  # an existing series keeps counting
    out = peer(Direction.OUTBOUND, Workload(workload_name="x"))
    count_record(store, labeler, out)
    count_record(store, labeler, out)
    assert table(store, L.REQUESTS).overflow_records == 7
    assert table(store, L.REQUESTS, outbound=True).overflow_records == 2
    assert store.overflow_counts()[L.REQUESTS.name] == 9
    text = store.render()
    got = samples(text)
    assert sum(got.values()) == 13  # totals exact
    overflow = {lbls: v for (_, lbls), v in got.items() if dict(lbls)["source_workload"] == OVERFLOW}
    assert len(overflow) == 2
    by_reporter = {dict(lbls)["reporter"]: v for lbls, v in overflow.items()}
    assert by_reporter == {"destination": 7, "source": 2}
    for lbls in overflow:
        assert all(v == OVERFLOW for k, v in lbls if k != "reporter")
    assert got[("istio_requests_total", tuple(sorted(zip(L.LABELS, labeler.http(HttpRecord(peer=peers[0], response_code=200)), strict=True))))] == 2  # fmt: skip
    # The bound is store-wide: the TCP table, empty so far, goes straight to its overflow series.
    tcp = table(store, L.TCP_OPENED)
    tcp.add(labeler.tcp(TcpRecord(peer=peers[1])), None, 1)
    assert tcp.overflow_records == 1
    (key,) = tcp.series
    assert key == ("destination", *[OVERFLOW] * 22)
    assert store.count == 3 + 2 + 1  # the real series plus one overflow series per metric and reporter
    rc, out_text = promtool_check_metrics(store.render())
    assert rc == 0, out_text


# --- the recorder --------------------------------------------------------------------------------


def requests_total(store: MetricStore) -> int:
    return sum(s.value for out in (False, True) for s in table(store, L.REQUESTS, out).series.values())  # type: ignore[union-attr]


def test_recorder_dedupes_ext_proc_and_access_log() -> None:
    store = standard_store()
    rec = Recorder(Labeler(REVIEWS), store)
    p = peer(Direction.INBOUND, PRODUCTPAGE)
    rec.http(HttpRecord(peer=p, response_code=200, request_id="r1"), "ext_proc")
    rec.http(HttpRecord(peer=p, response_code=200, request_id="r1"), "access_log")  # skipped
    assert requests_total(store) == 1
    assert rec.stats.http_duplicates == 1
    assert rec.stats.http == {"access_log": 0, "ext_proc": 1}
    # The claim is used up: a second access log entry with the same id counts.
    rec.http(HttpRecord(peer=p, response_code=200, request_id="r1"), "access_log")
    assert requests_total(store) == 2
    assert rec.stats.http_duplicates == 1
    # Without an id both count.
    rec.http(HttpRecord(peer=p, response_code=200), "ext_proc")
    rec.http(HttpRecord(peer=p, response_code=200), "access_log")
    assert requests_total(store) == 4
    # Two ext_proc reports of one id claim two access log entries.
    rec.http(HttpRecord(peer=p, request_id="r2"), "ext_proc")
    rec.http(HttpRecord(peer=p, request_id="r2"), "ext_proc")
    rec.http(HttpRecord(peer=p, request_id="r2"), "access_log")
    rec.http(HttpRecord(peer=p, request_id="r2"), "access_log")
    rec.http(HttpRecord(peer=p, request_id="r2"), "access_log")
    assert requests_total(store) == 7
    assert rec.stats.http_duplicates == 3
    # An access log entry arriving first is not a claim: both count.
    rec.http(HttpRecord(peer=p, request_id="r3"), "access_log")
    rec.http(HttpRecord(peer=p, request_id="r3"), "ext_proc")
    assert requests_total(store) == 9
    # An id another ext_proc record never claimed is counted from the access log.
    rec.http(HttpRecord(peer=p, request_id="other"), "access_log")
    assert requests_total(store) == 10


def test_recorder_http_metrics() -> None:
    store = standard_store()
    rec = Recorder(Labeler(REVIEWS), store)
    p = peer(Direction.INBOUND, PRODUCTPAGE)
    rec.http(HttpRecord(peer=p, response_code=200), "access_log")  # no duration or sizes: counter only
    assert store.series_counts() == {m.name: (1 if m is L.REQUESTS else 0) for m in L.METRICS}
    rec.http(HttpRecord(peer=p, response_code=200, duration_ms=0.0, request_bytes=0, response_bytes=0), "access_log")
    counts = store.series_counts()
    assert counts[L.REQUEST_DURATION.name] == counts[L.REQUEST_BYTES.name] == counts[L.RESPONSE_BYTES.name] == 1
    assert counts[L.REQUEST_MESSAGES.name] == 0
    # Message counts only for gRPC, and only when non-zero.
    rec.http(HttpRecord(peer=p, request_messages=4, response_messages=4), "access_log")
    rec.http(HttpRecord(peer=p, grpc=True, request_messages=0, response_messages=2), "access_log")
    counts = store.series_counts()
    assert counts[L.REQUEST_MESSAGES.name] == 0
    assert counts[L.RESPONSE_MESSAGES.name] == 1


def test_recorder_skips_disabled_metrics() -> None:
    plans = [MetricPlan.standard(m) for m in L.METRICS]
    plans[0] = MetricPlan(L.REQUESTS, plans[0].label_names, disabled=True)
    store = MetricStore(plans)
    rec = Recorder(Labeler(REVIEWS), store)
    rec.http(HttpRecord(peer=peer(Direction.INBOUND), duration_ms=1.0), "access_log")
    counts = store.series_counts()
    assert counts[L.REQUESTS.name] == 0 and counts[L.REQUEST_DURATION.name] == 1
    assert "istio_requests_total" not in store.render()


def tcp_values(store: MetricStore) -> dict[str, int]:
    out = {}
    for m in (L.TCP_OPENED, L.TCP_CLOSED, L.TCP_SENT, L.TCP_RECEIVED):
        out[m.name.removeprefix("istio_tcp_")] = sum(s.value for s in table(store, m).series.values())  # type: ignore[union-attr]
    return out


def test_tcp_tracker_turns_totals_into_deltas() -> None:
    store = standard_store()
    rec = Recorder(Labeler(REVIEWS), store)
    tcp = TcpTracker(rec)
    p = peer(Direction.INBOUND, PRODUCTPAGE)
    tcp.report("s1", p, 100, 50, end=False)
    assert tcp_values(store) == {
        "connections_opened": 1,
        "connections_closed": 0,
        "sent_bytes": 100,
        "received_bytes": 50,
    }
    assert len(tcp.connections) == 1
    tcp.report("s1", p, 300, 80, end=False)
    tcp.report("s1", p, 300, 80, end=False)  # nothing new
    assert tcp_values(store) == {
        "connections_opened": 1,
        "connections_closed": 0,
        "sent_bytes": 300,
        "received_bytes": 80,
    }
    tcp.report("s1", p, 350, 90, end=True)
    assert tcp_values(store) == {
        "connections_opened": 1,
        "connections_closed": 1,
        "sent_bytes": 350,
        "received_bytes": 90,
    }
    assert tcp.connections == {}
    assert len(tcp.connections) == 0
    assert rec.stats.tcp_reports == 4


def test_tcp_tracker_end_only_connection() -> None:
    store = standard_store()
    rec = Recorder(Labeler(REVIEWS), store)
    tcp = TcpTracker(rec)
    tcp.report("short", peer(Direction.INBOUND), 7, 9, end=True)
    assert tcp_values(store) == {"connections_opened": 1, "connections_closed": 1, "sent_bytes": 7, "received_bytes": 9}
    assert tcp.connections == {}


def test_tcp_tracker_keeps_the_first_peer_and_never_goes_negative() -> None:
    store = standard_store()
    rec = Recorder(Labeler(REVIEWS), store)
    tcp = TcpTracker(rec)
    tcp.report("s", peer(Direction.INBOUND, PRODUCTPAGE), 100, 100, end=False)
    tcp.report("s", peer(Direction.INBOUND), 40, 120, end=True)  # totals going down: no negative delta
    assert tcp_values(store) == {
        "connections_opened": 1,
        "connections_closed": 1,
        "sent_bytes": 100,
        "received_bytes": 120,
    }
    # One connection, one series per metric: the later report used the first report's peer.
    assert store.series_counts()[L.TCP_SENT.name] == 1


def test_tcp_tracker_sweep_forgets_stale_connections() -> None:
    store = standard_store()
    rec = Recorder(Labeler(REVIEWS), store)
    tcp = TcpTracker(rec, max_idle_generations=2)
    p = peer(Direction.INBOUND, PRODUCTPAGE)
    tcp.report("stale", p, 10, 10, end=False)
    tcp.report("live", p, 10, 10, end=False)
    assert tcp.sweep() == 0
    assert tcp.sweep() == 0
    tcp.report("live", p, 20, 20, end=False)  # seen again: stays
    assert tcp.sweep() == 1
    assert set(tcp.connections) == {"live"}
    assert len(tcp.connections) == 1
    assert tcp.sweep() == 0
    assert tcp.sweep() == 1
    assert tcp.connections == {}
    # A forgotten connection that reports again is a new one.
    tcp.report("stale", p, 15, 15, end=True)
    assert tcp_values(store)["connections_opened"] == 3


def test_peers_without_a_header_value_are_not_confused() -> None:
    """The peer-label cache is keyed by the raw header value; a Peer built without one (peer_key "")
    must still get its own workload's labels, not those of the first such peer."""
    labeler = Labeler(REVIEWS)
    a = labelled(labeler.http(HttpRecord(peer=Peer(Direction.INBOUND, workload=Workload(workload_name="a")))))
    b = labelled(labeler.http(HttpRecord(peer=Peer(Direction.INBOUND, workload=Workload(workload_name="b")))))
    none = labelled(labeler.http(HttpRecord(peer=Peer(Direction.INBOUND))))
    assert (a["source_workload"], b["source_workload"], none["source_workload"]) == ("a", "b", "unknown")


def test_series_of_both_directions_merge_when_an_override_removes_reporter() -> None:
    names = ("request_protocol", "response_code")  # as if every other label had been removed
    idx = [L.INDEX[n] for n in names]
    plan = MetricPlan(L.REQUESTS, names, project=lambda base, _r: tuple(base[i] for i in idx))
    store = MetricStore([plan])
    rec = Recorder(Labeler(REVIEWS), store)
    rec.http(HttpRecord(peer=peer(Direction.INBOUND), response_code=200), "access_log")
    rec.http(HttpRecord(peer=peer(Direction.OUTBOUND), response_code=200), "access_log")
    rec.http(HttpRecord(peer=peer(Direction.OUTBOUND), response_code=200), "access_log")
    text = store.render()
    lines = [line for line in text.splitlines() if line.startswith("istio_requests_total{")]
    assert lines == ['istio_requests_total{request_protocol="http",response_code="200"} 3']
    rc, out = promtool_check_metrics(text)
    assert rc == 0, out

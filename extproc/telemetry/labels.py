"""The standard metric table and the ordered label list, as Istio's stats filter emits them.

The 25 labels are in the order `IstioStatsFilter` pushes them, which is also the order
Istio's own Prometheus output shows. Metric families carry subsets of that list:
HTTP metrics all 25; gRPC message counters the first 20 (reporter and the peer labels);
TCP metrics those 20 plus `request_protocol`, `response_flags` and
`connection_security_policy`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple


class PeerLabels(NamedTuple):
    """The reporter and the 19 labels of the two workloads: what a peer decides, computed once
    per peer and cached."""

    reporter: str
    source_workload: str
    source_canonical_service: str
    source_canonical_revision: str
    source_workload_namespace: str
    source_principal: str
    source_app: str
    source_version: str
    source_cluster: str
    destination_workload: str
    destination_workload_namespace: str
    destination_principal: str
    destination_app: str
    destination_version: str
    destination_service: str
    destination_canonical_service: str
    destination_canonical_revision: str
    destination_service_name: str
    destination_service_namespace: str
    destination_cluster: str


class Labels(NamedTuple):
    """Every label of a request's series, named and in the order `IstioStatsFilter` pushes
    them (the peer's 20, then the request's 5)."""

    reporter: str
    source_workload: str
    source_canonical_service: str
    source_canonical_revision: str
    source_workload_namespace: str
    source_principal: str
    source_app: str
    source_version: str
    source_cluster: str
    destination_workload: str
    destination_workload_namespace: str
    destination_principal: str
    destination_app: str
    destination_version: str
    destination_service: str
    destination_canonical_service: str
    destination_canonical_revision: str
    destination_service_name: str
    destination_service_namespace: str
    destination_cluster: str
    request_protocol: str
    response_code: str
    grpc_response_status: str
    response_flags: str
    connection_security_policy: str


LABELS: tuple[str, ...] = Labels._fields
INDEX = {name: i for i, name in enumerate(LABELS)}
PEER_LABEL_COUNT = len(PeerLabels._fields)  # reporter + 19 source/destination labels

HTTP_LABELS: tuple[int, ...] = tuple(range(25))
GRPC_MESSAGE_LABELS: tuple[int, ...] = tuple(range(PEER_LABEL_COUNT))
TCP_LABELS: tuple[int, ...] = (
    *range(PEER_LABEL_COUNT),
    INDEX["request_protocol"],
    INDEX["response_flags"],
    INDEX["connection_security_policy"],
)

UNKNOWN = "unknown"
LATEST = "latest"

# Envoy's default histogram buckets (HistogramSettingsImpl::defaultBuckets), which Istio
# uses for every histogram, bytes included.
DEFAULT_BUCKETS: tuple[float, ...] = (
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


class Kind(enum.Enum):
    COUNTER = "counter"
    HISTOGRAM = "histogram"


class Family(enum.Enum):
    HTTP = "http"
    GRPC = "grpc"
    TCP = "tcp"


@dataclass(frozen=True, slots=True)
class MetricDef:
    name: str  # the Prometheus family name; counters get `_total` in their samples
    kind: Kind
    family: Family
    labels: tuple[int, ...]  # indexes into LABELS
    help: str
    telemetry_name: str  # the Telemetry API's metric selector (REQUEST_COUNT, ...)


METRICS: tuple[MetricDef, ...] = (
    MetricDef("istio_requests", Kind.COUNTER, Family.HTTP, HTTP_LABELS, "Requests", "REQUEST_COUNT"),
    MetricDef(
        "istio_request_duration_milliseconds",
        Kind.HISTOGRAM,
        Family.HTTP,
        HTTP_LABELS,
        "Request duration in milliseconds",
        "REQUEST_DURATION",
    ),
    MetricDef(
        "istio_request_bytes", Kind.HISTOGRAM, Family.HTTP, HTTP_LABELS, "Request size (wire bytes)", "REQUEST_SIZE"
    ),
    MetricDef(
        "istio_response_bytes",
        Kind.HISTOGRAM,
        Family.HTTP,
        HTTP_LABELS,
        "Response size (wire bytes)",
        "RESPONSE_SIZE",
    ),
    MetricDef(
        "istio_request_messages",
        Kind.COUNTER,
        Family.GRPC,
        GRPC_MESSAGE_LABELS,
        "gRPC request messages",
        "GRPC_REQUEST_MESSAGES",
    ),
    MetricDef(
        "istio_response_messages",
        Kind.COUNTER,
        Family.GRPC,
        GRPC_MESSAGE_LABELS,
        "gRPC response messages",
        "GRPC_RESPONSE_MESSAGES",
    ),
    MetricDef(
        "istio_tcp_sent_bytes", Kind.COUNTER, Family.TCP, TCP_LABELS, "Bytes sent on TCP connections", "TCP_SENT_BYTES"
    ),
    MetricDef(
        "istio_tcp_received_bytes",
        Kind.COUNTER,
        Family.TCP,
        TCP_LABELS,
        "Bytes received on TCP connections",
        "TCP_RECEIVED_BYTES",
    ),
    MetricDef(
        "istio_tcp_connections_opened",
        Kind.COUNTER,
        Family.TCP,
        TCP_LABELS,
        "TCP connections opened",
        "TCP_OPENED_CONNECTIONS",
    ),
    MetricDef(
        "istio_tcp_connections_closed",
        Kind.COUNTER,
        Family.TCP,
        TCP_LABELS,
        "TCP connections closed",
        "TCP_CLOSED_CONNECTIONS",
    ),
)
METRIC_BY_NAME = {m.name: m for m in METRICS}
(
    REQUESTS,
    REQUEST_DURATION,
    REQUEST_BYTES,
    RESPONSE_BYTES,
    REQUEST_MESSAGES,
    RESPONSE_MESSAGES,
    TCP_SENT,
    TCP_RECEIVED,
    TCP_OPENED,
    TCP_CLOSED,
) = METRICS

# Envoy's short response-flag codes in the order ResponseFlagUtils::toShortString joins
# them, keyed by the field of the access log's ResponseFlags message that carries each.
RESPONSE_FLAG_CODES: tuple[tuple[str, str], ...] = (
    ("failed_local_healthcheck", "LH"),
    ("no_healthy_upstream", "UH"),
    ("upstream_request_timeout", "UT"),
    ("local_reset", "LR"),
    ("upstream_remote_reset", "UR"),
    ("upstream_connection_failure", "UF"),
    ("upstream_connection_termination", "UC"),
    ("upstream_overflow", "UO"),
    ("no_route_found", "NR"),
    ("delay_injected", "DI"),
    ("fault_injected", "FI"),
    ("rate_limited", "RL"),
    ("unauthorized_details", "UAEX"),
    ("rate_limit_service_error", "RLSE"),
    ("downstream_connection_termination", "DC"),
    ("upstream_retry_limit_exceeded", "URX"),
    ("stream_idle_timeout", "SI"),
    ("invalid_envoy_request_headers", "IH"),
    ("downstream_protocol_error", "DPE"),
    ("upstream_max_stream_duration_reached", "UMSDR"),
    ("response_from_cache_filter", "RFCF"),
    ("no_filter_config_found", "NFCF"),
    ("duration_timeout", "DT"),
    ("upstream_protocol_error", "UPE"),
    ("no_cluster_found", "NC"),
    ("overload_manager", "OM"),
    ("dns_resolution_failure", "DF"),
    ("downstream_remote_reset", "DR"),
)

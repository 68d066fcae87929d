"""Central mode (`--central`): which sidecar's workload a Check or an access log stream is for.

* ext_authz: each sidecar's filter names its workload in the per-route or virtual-host
  `check_settings.context_extensions` (`ExtAuthzPerRoute`), with keys named after Mixer's
  destination attributes:

      destination.namespace          required
      destination.labels             k=v,k=v (parsed exactly as --labels)
      destination.workload.name      optional
      destination.service_account    optional

  The network ext_authz filter (TCP) has no context extensions: there the same keys come
  from the destination peer's labels, which Envoy fills from a struct of the bootstrap's
  node metadata named by the filter's `bootstrap_metadata_labels_key` (the HTTP filter
  can do the same). Context extensions win when they name a namespace.

* access log service: the Envoy node in the stream's first message (`identifier.node`),
  with the metadata keys Istio's injector sets: NAMESPACE (required), WORKLOAD_NAME,
  LABELS (a struct of strings), SERVICE_ACCOUNT, CLUSTER_ID.

Both are resolved once per distinct value and cached: a sidecar sends the same context
extensions on every Check, and a node only opens a stream now and then. A request whose
identity is missing or malformed is denied (fail closed); each distinct problem is logged
once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from extproc.lru import CacheCounters, LruCache
from extproc.snapshot.central import WorkloadKey, WorkloadSnapshots, workload_key
from extproc.snapshot.compiled import Snapshot
from extproc.snapshot.reload import SnapshotHolder
from extproc.telemetry.exchange import PeerExchange
from extproc.telemetry.peer import Workload
from extproc.telemetry.recorder import Recorder, TcpTracker, WorkloadSinks
from extproc.workload import LabelsError, node_id, parse_labels, spiffe_id

log = logging.getLogger("extproc.central")

NAMESPACE_KEY = "destination.namespace"
LABELS_KEY = "destination.labels"
WORKLOAD_KEY = "destination.workload.name"
SERVICE_ACCOUNT_KEY = "destination.service_account"
CONTEXT_KEYS = (NAMESPACE_KEY, LABELS_KEY, WORKLOAD_KEY, SERVICE_ACCOUNT_KEY)

# Istio's node metadata keys (pkg/model/context.go NodeMetadata).
NODE_NAMESPACE = "NAMESPACE"
NODE_WORKLOAD_NAME = "WORKLOAD_NAME"
NODE_LABELS = "LABELS"
NODE_SERVICE_ACCOUNT = "SERVICE_ACCOUNT"
NODE_CLUSTER_ID = "CLUSTER_ID"

# A Kubernetes namespace name (RFC 1123 label).
_NAMESPACE = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?\Z")
MAX_VALUE_CHARS = 4096  # longer context values are not a workload identity
RESOLVED_CACHE_SIZE = 4096


class IdentityError(ValueError):
    """Why a Check or a log stream names no usable workload. `kind` labels the counter."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _checked_namespace(value: str, where: str) -> str:
    if not value:
        raise IdentityError("workload_missing_namespace", f"{where} is missing")
    if not _NAMESPACE.match(value):
        raise IdentityError(
            "workload_bad_namespace", f"{where} {value[:100]!r} is not a namespace name (RFC 1123 label)"
        )
    return value


@dataclass(frozen=True, slots=True)
class ContextIdentity:
    """The workload a Check names in its context extensions."""

    namespace: str
    labels: Mapping[str, str]
    name: str = ""
    service_account: str = ""

    @property
    def key(self) -> WorkloadKey:
        return workload_key(self.namespace, self.labels)


def context_identity(extensions: Mapping[str, str]) -> ContextIdentity:
    """The `destination.*` context extensions as a workload; IdentityError if unusable."""
    values = {k: extensions.get(k, "") for k in CONTEXT_KEYS}
    for k, v in values.items():
        if len(v) > MAX_VALUE_CHARS:
            raise IdentityError("workload_bad_value", f"context extension {k} is longer than {MAX_VALUE_CHARS}")
    namespace = _checked_namespace(values[NAMESPACE_KEY].strip(), f"context extension {NAMESPACE_KEY}")
    try:
        labels = parse_labels(values[LABELS_KEY], LABELS_KEY)
    except LabelsError as e:
        raise IdentityError("workload_bad_labels", f"context extension {e}") from None
    return ContextIdentity(namespace, labels, values[WORKLOAD_KEY].strip(), values[SERVICE_ACCOUNT_KEY].strip())


@dataclass(frozen=True, slots=True)
class CentralWorkload:
    """One sidecar's workload, with what is derived from it once: the snapshot key and our
    side of the metadata exchange."""

    identity: ContextIdentity
    key: WorkloadKey
    exchange: PeerExchange


class ContextWorkloads:
    """Check → (the workload's snapshot, its metadata exchange), for central mode.

    Resolved context extensions are cached by their raw values, problems included, so a
    sidecar costs one parse however many Checks it sends and a misconfigured one is logged
    once, not per request. The snapshot comes from the holder's current generation, read
    once per Check.
    """

    def __init__(
        self,
        generation: Callable[[], WorkloadSnapshots],
        *,
        trust_domain: str = "cluster.local",
        cluster: str = "Kubernetes",
        size: int = RESOLVED_CACHE_SIZE,
    ) -> None:
        self.generation = generation
        self.trust_domain = trust_domain
        self.cluster = cluster
        self.size = size
        self.counters = CacheCounters("context_extensions")
        self._resolved: LruCache[tuple[str, ...], CentralWorkload | IdentityError] = LruCache(size, self.counters)

    def for_check(self, attributes: Any) -> tuple[Snapshot, PeerExchange] | IdentityError:
        """A CheckRequest's `attributes`: its context extensions, else its destination labels."""
        extensions = attributes.context_extensions
        if NAMESPACE_KEY not in extensions:
            labels = attributes.destination.labels
            if NAMESPACE_KEY in labels:
                return self.resolve(labels)
        return self.resolve(extensions)

    def resolve(self, extensions: Mapping[str, str]) -> tuple[Snapshot, PeerExchange] | IdentityError:
        raw = (
            extensions.get(NAMESPACE_KEY, ""),
            extensions.get(LABELS_KEY, ""),
            extensions.get(WORKLOAD_KEY, ""),
            extensions.get(SERVICE_ACCOUNT_KEY, ""),
        )
        found = self._resolved.lookup(raw)
        if found is None:
            found = self._workload(extensions)
            self._resolved.put(raw, found)
        if isinstance(found, IdentityError):
            return found
        return self.generation().get(found.key), found.exchange

    def _workload(self, extensions: Mapping[str, str]) -> CentralWorkload | IdentityError:
        try:
            ident = context_identity(extensions)
        except IdentityError as e:
            log.warning(
                "central mode: denying Checks whose ext_authz context extensions name no usable workload: %s "
                "(set %s, and optionally %s, in the sidecar's ExtAuthzPerRoute check_settings.context_extensions, "
                "or for TCP in the node metadata struct named by the filter's bootstrap_metadata_labels_key; "
                "logged once, counted in extproc_malformed_requests_total{kind=%r})",
                e.message,
                NAMESPACE_KEY,
                ", ".join(CONTEXT_KEYS[1:]),
                e.kind,
            )
            return e
        local = Workload.from_labels(
            ident.labels,
            workload_name=ident.name,
            namespace=ident.namespace,
            cluster=self.cluster,
            identity=spiffe_id(self.trust_domain, ident.namespace, ident.service_account),
        )
        return CentralWorkload(ident, ident.key, PeerExchange(local, node_id(ident.name, ident.namespace)))


def _text(s: struct_pb2.Struct, key: str) -> str:
    v = s.fields.get(key)
    return v.string_value if v is not None and v.WhichOneof("kind") == "string_value" else ""


def node_workload(node: base_pb2.Node, *, trust_domain: str = "cluster.local", cluster: str = "Kubernetes") -> Workload:
    """The local workload an Envoy node's metadata describes, as Istio's injector sets it.

    Labels give the app, version and canonical service/revision exactly as `--labels` do in
    a per-sidecar server; CLUSTER_ID falls back to `--cluster`. IdentityError without a
    usable NAMESPACE.
    """
    md = node.metadata
    where = f"node {node.id!r}" if node.id else "a node without id"
    namespace = _checked_namespace(_text(md, NODE_NAMESPACE).strip(), f"metadata {NODE_NAMESPACE} of {where}")
    labels: dict[str, str] = {}
    lv = md.fields.get(NODE_LABELS)
    if lv is not None and lv.WhichOneof("kind") == "struct_value":
        labels = {
            k: v.string_value for k, v in lv.struct_value.fields.items() if v.WhichOneof("kind") == "string_value"
        }
    return Workload.from_labels(
        labels,
        workload_name=_text(md, NODE_WORKLOAD_NAME),
        namespace=namespace,
        cluster=_text(md, NODE_CLUSTER_ID) or cluster,
        identity=spiffe_id(trust_domain, namespace, _text(md, NODE_SERVICE_ACCOUNT)),
    )


class NodeWorkloads:
    """An access log stream's node → the Recorder and TcpTracker of its workload (central mode)."""

    def __init__(
        self, sinks: WorkloadSinks, *, trust_domain: str = "cluster.local", cluster: str = "Kubernetes"
    ) -> None:
        self.sinks = sinks
        self.trust_domain = trust_domain
        self.cluster = cluster

    def for_node(self, node: base_pb2.Node) -> tuple[Recorder, TcpTracker] | IdentityError:
        try:
            local = node_workload(node, trust_domain=self.trust_domain, cluster=self.cluster)
        except IdentityError as e:
            return e
        return self.sinks.get(local)


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

    def collect(self) -> Iterator[Metric]:
        h = self.holder
        cached = len(h.workloads) if h.workloads is not None else 0
        yield GaugeMetricFamily(
            "extproc_workload_snapshots", "Per-workload snapshots cached (central mode)", value=cached
        )
        yield GaugeMetricFamily(
            "extproc_workload_snapshots_limit", "Most per-workload snapshots cached (central mode)", value=h.cache_size
        )
        yield CounterMetricFamily(
            "extproc_access_log_unidentified_entries",
            "Access log entries dropped in central mode because their stream's Envoy node named no workload",
            value=self.unidentified_entries(),
        )

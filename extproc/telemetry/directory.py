"""Peers and services the config directory lists: Istio's `WorkloadEntry` and `ServiceEntry`.

Istio's sidecars learn who is on the other side of a TCP connection from the ALPN metadata
exchange (`istio-peer-exchange`), which upstream Envoy's filters cannot do, and ambient's
workload discovery asks istiod by address. extproc has no control plane, so it reads the
same resources istiod reads for VMs and external services from its config directory, and
resolves a peer by its address, checked against its certificate:

* a `WorkloadEntry`, or an endpoint of a `ServiceEntry`, is a workload: its namespace, its
  labels (canonical service and revision, app, version), its name (the
  `istio.io/autoRegistrationGroup` annotation, else the `service.istio.io/workload-name`
  label, else the resource's name; an inline endpoint is `<ServiceEntry name>-<index>`, as
  istiod names them), its cluster (the `topology.istio.io/cluster` label, else the local
  one: the entries are in this workload's registry) and its principal
  (`spiffe://<trust domain>/ns/<namespace>/sa/<serviceAccount>`);
* a `ServiceEntry` host is a service named after the host in the ServiceEntry's namespace,
  as istiod writes it into the cluster metadata.

A peer is looked up only when the request or connection brought no exchanged metadata. With a
peer certificate, only an entry with that principal at that address is taken: an address
cannot make a peer someone its certificate says it is not. Without one, the address must
name exactly one entry.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from extproc.telemetry.peer import Workload
from extproc.telemetry.record import ServiceInfo
from extproc.workload import spiffe_id

AUTO_REGISTRATION_GROUP = "istio.io/autoRegistrationGroup"
WORKLOAD_NAME_LABEL = "service.istio.io/workload-name"
CLUSTER_LABEL = "topology.istio.io/cluster"


@dataclass(frozen=True, slots=True)
class Listed:
    """One workload the config lists at an address."""

    workload: Workload
    principal: str  # "" when the entry names no service account
    origin: str  # the resource, for /debug and messages


def workload_name(name: str, annotations: Mapping[str, str], labels: Mapping[str, str]) -> str:
    """The workload name istiod gives a WorkloadEntry (labels.WorkloadNameFromWorkloadEntry)."""
    return annotations.get(AUTO_REGISTRATION_GROUP) or labels.get(WORKLOAD_NAME_LABEL) or name


def _ip(address: str) -> str | None:
    """The address in the form Envoy logs it, or None for a hostname or a unix socket."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return None


@dataclass(frozen=True)
class PeerDirectory:
    by_address: Mapping[str, tuple[Listed, ...]] = field(default_factory=dict)
    services: Mapping[str, ServiceInfo] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.by_address) or bool(self.services)

    @staticmethod
    def build(workload_entries: Iterable[Any], service_entries: Iterable[Any], trust_domain: str) -> PeerDirectory:
        """From the loaded resources (`config.models.WorkloadEntry`/`ServiceEntry`)."""
        by_address: dict[str, list[Listed]] = {}
        services: dict[str, ServiceInfo] = {}

        def add(spec: Any, name: str, namespace: str, annotations: Mapping[str, str], origin: str) -> None:
            ip = _ip(spec.address or "")
            if ip is None:
                return
            labels = dict(spec.labels or {})
            wl = Workload.from_labels(
                labels,
                workload_name=workload_name(name, annotations, labels),
                namespace=namespace,
                cluster=labels.get(CLUSTER_LABEL, ""),
            )
            principal = spiffe_id(trust_domain, namespace, spec.service_account or "")
            by_address.setdefault(ip, []).append(Listed(wl, principal, origin))

        for we in workload_entries:
            md = we.metadata
            ns = md.namespace or ""
            add(we.spec, md.name, ns, md.annotations, f"WorkloadEntry {ns}/{md.name}")
        for se in service_entries:
            md = se.metadata
            ns = md.namespace or ""
            for i, ep in enumerate(se.spec.endpoints or ()):
                add(ep, f"{md.name}-{i}", ns, {}, f"ServiceEntry {ns}/{md.name} endpoint {i}")
            for host in se.spec.hosts:
                # The first ServiceEntry to declare a host names it (istiod keeps the oldest).
                services.setdefault(host, ServiceInfo(host, host, ns))
        return PeerDirectory({ip: tuple(v) for ip, v in by_address.items()}, services)

    def in_cluster(self, cluster: str) -> PeerDirectory:
        """The same directory with `cluster` for every entry that names none."""
        if not cluster:
            return self
        return PeerDirectory(
            {
                ip: tuple(
                    e
                    if e.workload.cluster
                    else dataclasses.replace(e, workload=dataclasses.replace(e.workload, cluster=cluster))
                    for e in entries
                )
                for ip, entries in self.by_address.items()
            },
            self.services,
        )

    def peer(self, ip: str, principal: str) -> Workload | None:
        """The workload at `ip` (as the access log writes addresses), checked against the
        peer's certificate principal ("" when there was no certificate)."""
        entries = self.by_address.get(ip)
        if not entries:
            return None
        if principal:
            for e in entries:
                if e.principal == principal:
                    return e.workload
            return None
        return entries[0].workload if len(entries) == 1 else None

    def service(self, host: str) -> ServiceInfo | None:
        return self.services.get(host)


EMPTY_DIRECTORY = PeerDirectory()

"""Central mode (`--central`): one server for many sidecars, one snapshot per workload.

Istio 1.0-1.4's Mixer served every sidecar of the mesh from one place; each Check named
the workload it was for. Here each Check names its workload too (the ext_authz context
extensions), and the server keeps one loaded configuration from which it builds, on first
use, the snapshot of each distinct workload: the policies and jwtRules that apply to it,
compiled once per configuration (`BuildMemo`) and shared between workloads.

Only the namespace and the labels decide which resources apply (Istio's ShouldAttachPolicy
and its Telemetry selection), so they alone key the cache; a workload's name and service
account change nothing in its snapshot.

A reload builds a new `WorkloadSnapshots` off the event loop and the holder swaps it in
with one assignment. A request reads the holder once and takes its snapshot from that
generation, so one request never mixes two configurations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

from extproc.lru import CacheCounters, LruCache
from extproc.snapshot import loader
from extproc.snapshot.compiled import (
    BuildMemo,
    Options,
    Snapshot,
    WorkloadIdentity,
    build_mesh_snapshot,
    build_snapshot,
)
from extproc.snapshot.loader import LoadedConfig

DEFAULT_CACHE_SIZE = 1024

WorkloadKey = tuple[str, frozenset[tuple[str, str]]]


def workload_key(namespace: str, labels: Mapping[str, str]) -> WorkloadKey:
    """What decides a workload's snapshot: its namespace and labels (label order never matters)."""
    return namespace, frozenset(labels.items())


def mesh_identity(
    root_namespace: str = "istio-system", trust_domain: str = "cluster.local", aliases: tuple[str, ...] = ()
) -> WorkloadIdentity:
    """The template every workload's identity is made from: the server-wide settings, and the
    root namespace without labels for the mesh-wide view."""
    return WorkloadIdentity(
        namespace=root_namespace,
        labels={},
        root_namespace=root_namespace,
        trust_domain=trust_domain,
        trust_domain_aliases=aliases,
    )


def snapshot_counters() -> CacheCounters:
    """Counters of the workload snapshot cache; they outlive reloads, as Prometheus counters must."""
    return CacheCounters("workload_snapshot")


class WorkloadSnapshots:
    """One configuration version, for every workload: a bounded LRU of per-workload snapshots.

    `mesh` is the mesh-wide view of the same configuration (every RequestAuthentication,
    every policy compiled, root-level Telemetry): it is what the server-wide parts use
    (JWKS fetching, metric plans, /debug) and it is never evaluated.
    """

    def __init__(
        self,
        loaded: LoadedConfig,
        template: WorkloadIdentity,
        options: Options,
        version: int,
        *,
        size: int = DEFAULT_CACHE_SIZE,
        stats: CacheCounters | None = None,
        warm: Iterable[WorkloadKey] = (),
    ) -> None:
        if size < 1:
            raise ValueError("the workload snapshot cache needs room for at least one workload")
        self.loaded = loaded
        self.template = template
        self.options = options
        self.version = version
        self.size = size
        self.stats = stats if stats is not None else snapshot_counters()
        self.memo = BuildMemo()
        # Compiles every policy and jwtRule: a resource that fails to compile fails the load.
        self.mesh = build_mesh_snapshot(loaded, template, options, version, self.memo)
        self._entries: LruCache[WorkloadKey, Snapshot] = LruCache(size, self.stats)
        # The workloads served before a reload are rebuilt here, off the event loop, so the
        # first requests after a reload do not each pay for a build.
        for key in list(warm)[-size:]:
            self._entries.put(key, self.build(key))

    def get(self, key: WorkloadKey) -> Snapshot:
        return self._entries.get_or_make(key, self.build)

    def build(self, key: WorkloadKey) -> Snapshot:
        """The snapshot of one workload, without caching it."""
        namespace, labels = key
        identity = dataclasses.replace(self.template, namespace=namespace, labels=dict(labels), name="")
        return build_snapshot(self.loaded, identity, self.options, self.version, self.memo)

    def keys(self) -> list[WorkloadKey]:
        """Cached workloads, least recently used first."""
        return self._entries.keys()

    def snapshots(self) -> list[Snapshot]:
        return self._entries.values()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries


def load_workloads(
    dirs: Sequence[str],
    template: WorkloadIdentity,
    options: Options,
    version: int,
    *,
    size: int = DEFAULT_CACHE_SIZE,
    stats: CacheCounters | None = None,
    warm: Iterable[WorkloadKey] = (),
) -> WorkloadSnapshots:
    """Load and compile once for every workload; raises ConfigError with every problem found."""
    return WorkloadSnapshots(loader.load(dirs), template, options, version, size=size, stats=stats, warm=warm)

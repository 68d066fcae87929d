"""Hold the current snapshot and replace it when the config directories change.

A change is loaded and compiled off the event loop's critical path, then swapped in
with one assignment. A change that fails to load leaves the last good snapshot in
place; the failure is logged and reported on /readyz until a later change fixes it.

In central mode (`--central`) a load yields a `WorkloadSnapshots` (per-workload snapshots
built on demand, see config/central.py) and `current` is its mesh-wide view; both are
swapped together, without an await between them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import watchfiles

from extproc.config import loader
from extproc.config.central import CacheStats, WorkloadKey, WorkloadSnapshots, load_workloads
from extproc.config.errors import ConfigError
from extproc.config.snapshot import Options, Snapshot, WorkloadIdentity, build_snapshot

log = logging.getLogger("extproc.config")


@dataclass(frozen=True, slots=True)
class ReloadStatus:
    ok: bool
    at: float
    version: int  # the snapshot version serving after this attempt
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


@dataclass
class ReloadCounters:
    success: int = 0
    failure: int = 0


def log_invalid_providers(snap: Snapshot) -> None:
    """Say loudly which extension providers cannot be used: their CUSTOM rules now deny."""
    for bad in snap.invalid_providers.values():
        log.error(
            "extension provider %r is invalid (%s): the CUSTOM rules naming it deny the requests they match, "
            "as istiod does; other policies are served",
            bad.name,
            "; ".join(bad.problems),
        )


def load_snapshot(dirs: Sequence[str], workload: WorkloadIdentity, options: Options, version: int) -> Snapshot:
    """Load and compile; raises ConfigError with every problem found."""
    return build_snapshot(loader.load(dirs), workload, options, version)


@dataclass
class SnapshotHolder:
    dirs: tuple[str, ...]
    workload: WorkloadIdentity
    options: Options
    current: Snapshot
    last: ReloadStatus
    counters: ReloadCounters = field(default_factory=ReloadCounters)
    # Called on the event loop after every swap, e.g. to start fetching a new jwksUri.
    on_swap: list[Callable[[Snapshot], None]] = field(default_factory=list)
    # Central mode: the per-workload snapshots of the loaded config. `current` is then their
    # mesh-wide view (every jwtRule, root-level Telemetry) and `workload` the template that
    # each workload's identity is made from; see extproc/config/central.py.
    workloads: WorkloadSnapshots | None = None
    cache_stats: CacheStats = field(default_factory=CacheStats)
    cache_size: int = 0

    @classmethod
    def initial(
        cls, dirs: Sequence[str], workload: WorkloadIdentity, options: Options, *, central_cache_size: int = 0
    ) -> SnapshotHolder:
        """The first load: errors propagate so the process exits non-zero.

        `central_cache_size` > 0 selects central mode, with that many workload snapshots kept.
        """
        stats = CacheStats()
        workloads = None
        if central_cache_size > 0:
            workloads = load_workloads(dirs, workload, options, 1, size=central_cache_size, stats=stats)
            snap = workloads.mesh
        else:
            snap = load_snapshot(dirs, workload, options, 1)
        warnings = tuple(w.render() for w in snap.warnings)
        for w in warnings:
            log.warning("%s", w)
        log_invalid_providers(snap)
        holder = cls(
            tuple(dirs),
            workload,
            options,
            snap,
            ReloadStatus(True, time.time(), 1, (), warnings),
            workloads=workloads,
            cache_stats=stats,
            cache_size=central_cache_size,
        )
        holder.counters.success += 1
        return holder

    @property
    def central(self) -> bool:
        return self.workloads is not None

    def get(self) -> Snapshot:
        return self.current

    def _load(self, version: int, warm: list[WorkloadKey]) -> tuple[Snapshot, WorkloadSnapshots | None]:
        """Runs in a worker thread: everything a reload builds, before anything is swapped."""
        if self.workloads is None:
            return load_snapshot(self.dirs, self.workload, self.options, version), None
        workloads = load_workloads(
            self.dirs, self.workload, self.options, version, size=self.cache_size, stats=self.cache_stats, warm=warm
        )
        return workloads.mesh, workloads

    async def reload(self, reason: str = "change") -> ReloadStatus:
        version = self.current.version + 1
        warm: list[WorkloadKey] = self.workloads.keys() if self.workloads is not None else []
        try:
            snap, workloads = await asyncio.to_thread(self._load, version, warm)
        except ConfigError as e:
            self.counters.failure += 1
            errors = tuple(i.render() for i in e.issues if not i.warning)
            log.error("config %s rejected, still serving snapshot %d:\n%s", reason, self.current.version, e)
            self.last = ReloadStatus(False, time.time(), self.current.version, errors)
            return self.last
        except Exception as e:  # never let a reload bug take the server down
            self.counters.failure += 1
            log.exception("config %s failed unexpectedly, still serving snapshot %d", reason, self.current.version)
            self.last = ReloadStatus(False, time.time(), self.current.version, (f"internal error: {e}",))
            return self.last
        # The atomic swap: no await between these two, so no request sees one without the other.
        self.workloads = workloads
        self.current = snap
        self.counters.success += 1
        for listener in self.on_swap:
            try:
                listener(snap)
            except Exception:  # a listener bug must not undo a good reload
                log.exception("snapshot listener failed")
        warnings = tuple(w.render() for w in snap.warnings)
        for w in warnings:
            log.warning("%s", w)
        log_invalid_providers(snap)
        if workloads is not None:
            log.info(
                "config %s loaded: snapshot %d, %d policies and %d jwtRules across the mesh (central mode); "
                "%d workload snapshots cached",
                reason,
                snap.version,
                len(snap.policies),
                len(snap.authn.providers),
                len(workloads),
            )
        else:
            log.info(
                "config %s loaded: snapshot %d, %d policies apply to this workload (%d ignored)",
                reason,
                snap.version,
                len(snap.policies),
                len(snap.ignored_policies),
            )
        self.last = ReloadStatus(True, time.time(), snap.version, (), warnings)
        return self.last

    async def watch(self, stop: asyncio.Event, debounce_ms: int = 200) -> None:
        """Reload on every batch of file-system changes until `stop` is set.

        If watching fails (a directory replaced or removed, inotify limits), the failure is
        logged and watching restarts, with a reload so no change is missed meanwhile.
        """
        while not stop.is_set():
            try:
                async for changes in watchfiles.awatch(
                    *self.dirs,
                    debounce=debounce_ms,
                    step=50,
                    stop_event=stop,
                    recursive=True,
                    ignore_permission_denied=True,
                ):
                    log.debug("config change: %s", sorted(p for _, p in changes)[:10])
                    await self.reload("change")
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("watching the config directories failed; retrying in 1s")
                try:
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
                except TimeoutError:
                    await self.reload("after watch failure")

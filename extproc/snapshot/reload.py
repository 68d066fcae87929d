"""Hold the current snapshot and replace it when the config directories change.

A change is loaded and compiled off the event loop's critical path, then swapped in
with one assignment. A change that fails to load leaves the last good snapshot in
place; the failure is logged and reported on /readyz until a later change fixes it.

A file written in place is believed only once it has stayed unchanged for `settle_s`, so
one caught mid-write (empty, invalid, or cut short) never drops what it held; until
then its previous content stays in force (see loader.FileMemory). The holder then reloads
by itself, so an edit, or a file emptied on purpose, takes effect without a further change. Warnings are
logged once per file content: a reload does not repeat those of files that did not change.

In central mode (`--central`) a load yields a `WorkloadSnapshots` (per-workload snapshots
built on demand, see snapshot/central.py) and `current` is its mesh-wide view; both are
swapped together, without an await between them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import watchfiles
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from extproc.config.errors import ConfigError, ConfigIssue
from extproc.lru import CacheCounters
from extproc.snapshot import loader
from extproc.snapshot.central import WorkloadKey, WorkloadSnapshots, snapshot_counters
from extproc.snapshot.compiled import Options, Snapshot, WorkloadIdentity, build_snapshot

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
class WarningLog:
    """Logs each warning once per content of the file it is about.

    A reload re-validates every file, so without this each reload repeated the warnings
    of every file that did not change (565 of 978 log lines over 106 reloads in a trial).
    A warning comes back when its file changes, and the memory is as large as the set of
    warnings currently in force.
    """

    logged: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (file, content digest) -> texts

    def log(self, warnings: Sequence[ConfigIssue], digests: dict[str, str]) -> int:
        fresh: dict[tuple[str, str], set[str]] = {}
        count = 0
        for w in warnings:
            key = (w.location.file, digests.get(w.location.file, ""))
            text = w.render()
            seen = fresh.setdefault(key, set())
            if text not in self.logged.get(key, ()) and text not in seen:
                log.warning("%s", text)
                count += 1
            seen.add(text)
        self.logged = fresh
        return count


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
    # each workload's identity is made from; see extproc/snapshot/central.py.
    workloads: WorkloadSnapshots | None = None
    cache_stats: CacheCounters = field(default_factory=snapshot_counters)
    cache_size: int = 0
    memory: loader.FileMemory = field(default_factory=loader.FileMemory)
    warning_log: WarningLog = field(default_factory=WarningLog)
    # Serialises reloads (a SIGHUP may arrive during a watched change): the file memory is
    # staged by one load at a time.
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _recheck: asyncio.TimerHandle | None = None
    _tasks: set[asyncio.Task[ReloadStatus]] = field(default_factory=set)

    @classmethod
    def initial(
        cls,
        dirs: Sequence[str],
        workload: WorkloadIdentity,
        options: Options,
        *,
        central_cache_size: int = 0,
        settle_s: float = 0.0,
    ) -> SnapshotHolder:
        """The first load: errors propagate so the process exits non-zero.

        `central_cache_size` > 0 selects central mode, with that many workload snapshots kept.
        `settle_s` > 0 believes a file written in place only once it has been unchanged that
        long (the server passes --config-settle); 0 believes every change at once.
        """
        stats = snapshot_counters()
        memory = loader.FileMemory(settle_s=settle_s)
        loaded = loader.load(dirs, memory)
        workloads = None
        if central_cache_size > 0:
            workloads = WorkloadSnapshots(loaded, workload, options, 1, size=central_cache_size, stats=stats)
            snap = workloads.mesh
        else:
            snap = build_snapshot(loaded, workload, options, 1)
        memory.commit()
        warning_log = WarningLog()
        warning_log.log(snap.warnings, memory.read_digests)
        warnings = tuple(w.render() for w in snap.warnings)
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
            memory=memory,
            warning_log=warning_log,
        )
        holder.counters.success += 1
        return holder

    @property
    def central(self) -> bool:
        return self.workloads is not None

    def get(self) -> Snapshot:
        return self.current

    def _load(
        self, version: int, warm: list[WorkloadKey]
    ) -> tuple[Snapshot | None, WorkloadSnapshots | None, loader.LoadedConfig]:
        """Runs in a worker thread: everything a reload builds, before anything is swapped.

        No snapshot when every change is still settling: what is in force stays, unbuilt.
        """
        loaded = loader.load(self.dirs, self.memory)
        if self.memory.held and self.memory.unchanged():
            return None, None, loaded
        if self.workloads is None:
            return build_snapshot(loaded, self.workload, self.options, version), None, loaded
        workloads = WorkloadSnapshots(
            loaded, self.workload, self.options, version, size=self.cache_size, stats=self.cache_stats, warm=warm
        )
        return workloads.mesh, workloads, loaded

    async def reload(self, reason: str = "change") -> ReloadStatus:
        async with self._lock:
            status = await self._reload(reason)
            if self.memory.held:
                self._schedule_recheck()
            return status

    def _schedule_recheck(self) -> None:
        """Reload once the held files may have settled, so an emptied file takes effect unprompted."""
        if self._recheck is not None:
            self._recheck.cancel()
        loop = asyncio.get_running_loop()

        def fire() -> None:
            task = loop.create_task(self.reload("settled file"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._recheck = loop.call_later(self.memory.settle_s + 0.05, fire)

    async def _reload(self, reason: str) -> ReloadStatus:
        version = self.current.version + 1
        warm: list[WorkloadKey] = self.workloads.keys() if self.workloads is not None else []
        try:
            snap, workloads, loaded = await asyncio.to_thread(self._load, version, warm)
        except ConfigError as e:
            self.memory.discard()
            self.counters.failure += 1
            errors = tuple(i.render() for i in e.issues if not i.warning)
            log.error("config %s rejected, still serving snapshot %d:\n%s", reason, self.current.version, e)
            self.last = ReloadStatus(False, time.time(), self.current.version, errors)
            return self.last
        except Exception as e:  # never let a reload bug take the server down
            self.memory.discard()
            self.counters.failure += 1
            log.exception("config %s failed unexpectedly, still serving snapshot %d", reason, self.current.version)
            self.last = ReloadStatus(False, time.time(), self.current.version, (f"internal error: {e}",))
            return self.last
        if loaded.held:
            log.info(
                "config %s: %d file(s) written in place wait until unchanged for %gs: %s",
                reason,
                len(loaded.held),
                self.memory.settle_s,
                ", ".join(loaded.held[:5]),
            )
        if snap is None:
            self.memory.discard()
            self.warning_log.log(loaded.warnings, self.memory.staged_digests)
            warnings = tuple(w.render() for w in loaded.warnings)
            self.last = ReloadStatus(True, time.time(), self.current.version, (), warnings)
            return self.last
        previous_invalid = self.current.invalid_providers
        # The atomic swap: no await between these two, so no request sees one without the other.
        self.workloads = workloads
        self.current = snap
        self.memory.commit()
        self.counters.success += 1
        for listener in self.on_swap:
            try:
                listener(snap)
            except Exception:  # a listener bug must not undo a good reload
                log.exception("snapshot listener failed")
        self.warning_log.log(snap.warnings, self.memory.read_digests)
        warnings = tuple(w.render() for w in snap.warnings)
        if snap.invalid_providers != previous_invalid:  # said again only when it changes
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


class SnapshotCollector(Collector):
    """The configuration as served: reloads, the snapshot's version, what applies."""

    def __init__(self, holder: SnapshotHolder) -> None:
        self.holder = holder

    def collect(self) -> Iterator[Metric]:
        holder = self.holder
        reloads = CounterMetricFamily("extproc_config_reloads", "Configuration loads", labels=["result"])
        reloads.add_metric(["success"], holder.counters.success)
        reloads.add_metric(["failure"], holder.counters.failure)
        yield reloads
        snap = holder.current
        yield GaugeMetricFamily(
            "extproc_config_snapshot_version", "Version of the serving snapshot", value=snap.version
        )
        yield GaugeMetricFamily(
            "extproc_config_last_reload_success", "1 if the last reload succeeded", value=int(holder.last.ok)
        )
        yield GaugeMetricFamily(
            "extproc_policies_applied", "AuthorizationPolicies applied to this workload", value=len(snap.policies)
        )
        yield GaugeMetricFamily(
            "extproc_jwt_rules_applied", "jwtRules applied to this workload", value=len(snap.authn.providers)
        )

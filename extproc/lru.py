"""One bounded cache for every place extproc remembers something it computed (parsed peer
certificates and peer metadata, central mode's workloads and snapshots, per-workload recorders,
JWTs), and one way of exporting what they count.

`CacheCounters` holds a cache's hits, misses and evictions under the name its metrics carry;
it outlives a cache rebuilt on reload. `LruCache` evicts the least recently used entry beyond
its size. `CacheCollector` renders every registered cache as `extproc_cache_lookups_total
{cache, result}` and `extproc_cache_evictions_total{cache}`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

K = TypeVar("K")
V = TypeVar("V")


@dataclass(slots=True)
class CacheCounters:
    """What one cache counts, named as its metrics label it (`cache="peer_metadata"`)."""

    name: str
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class LruCache(Generic[K, V]):
    """A map of at most `size` entries that forgets the least recently used one first."""

    __slots__ = ("_entries", "counters", "size")

    def __init__(self, size: int, counters: CacheCounters) -> None:
        self.size = size
        self.counters = counters
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get_or_make(self, key: K, make: Callable[[K], V]) -> V:
        """The entry of `key`, made by `make(key)` and kept on a miss (None is a value too)."""
        entries = self._entries
        try:
            value = entries[key]
        except KeyError:
            self.counters.misses += 1
            value = entries[key] = make(key)
            if len(entries) > self.size:
                entries.popitem(last=False)
                self.counters.evictions += 1
            return value
        self.counters.hits += 1
        entries.move_to_end(key)
        return value

    def lookup(self, key: K) -> V | None:
        """The entry of `key`, counted as a hit, or None counted as a miss (then `put` it)."""
        value = self._entries.get(key)
        if value is None:
            self.counters.misses += 1
            return None
        self.counters.hits += 1
        self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        entries = self._entries
        entries[key] = value
        entries.move_to_end(key)
        if len(entries) > self.size:
            entries.popitem(last=False)
            self.counters.evictions += 1

    def discard(self, key: K) -> None:
        self._entries.pop(key, None)

    def keys(self) -> list[K]:
        """Least recently used first."""
        return list(self._entries)

    def values(self) -> list[V]:
        return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries


class CacheCollector(Collector):
    """Every cache's counters, read at scrape time; `caches` lists the live ones."""

    def __init__(self, caches: Callable[[], Iterable[CacheCounters]]) -> None:
        self.caches = caches

    def collect(self) -> Iterator[Metric]:
        lookups = CounterMetricFamily("extproc_cache_lookups", "Cache lookups", labels=["cache", "result"])
        evictions = CounterMetricFamily(
            "extproc_cache_evictions", "Cache entries evicted to stay within bounds (LRU)", labels=["cache"]
        )
        for c in self.caches():
            lookups.add_metric([c.name, "hit"], c.hits)
            lookups.add_metric([c.name, "miss"], c.misses)
            evictions.add_metric([c.name], c.evictions)
        yield lookups
        yield evictions

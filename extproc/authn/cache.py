"""A bounded LRU of parsed tokens and their signature verdicts.

A repeat token costs a dict lookup instead of base64, JSON and a signature check. Verdicts
are stored per key-set version, so rotated keys are never judged by old results; time and
audience checks are not cached (they are cheap and depend on the clock and the provider).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from extproc.authn.status import Status
from extproc.authn.token import Jwt, parse
from extproc.lru import CacheCounters

MAX_CACHED_TOKEN_BYTES = 8192  # larger tokens are verified every time rather than pinned in memory


class _Entry:
    __slots__ = ("outputs", "parsed", "verdicts")

    def __init__(self, parsed: Jwt | Status) -> None:
        self.parsed = parsed
        self.verdicts: dict[int, Status] = {}
        self.outputs: dict[str, Any] = {}  # provider name -> headers and payload it produces


class TokenCache:
    def __init__(self, max_entries: int = 10_000, clock_skew_s: int = 60) -> None:
        self.max_entries = max_entries
        self.clock_skew_s = clock_skew_s
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # Hits and misses count verdicts reused or not (per token and key-set version); the
        # entries expire with their token, which a plain LRU cannot do, so they stay here.
        self.counters = CacheCounters("jwt_signature")

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, token: str, now: int) -> _Entry:
        e = self._entries.get(token)
        if e is not None:
            if not self._expired(e, now):
                self._entries.move_to_end(token)
                return e
            del self._entries[token]  # expired: it fails its time check from now on; forget it
        e = _Entry(parse(token))
        if self.max_entries > 0 and len(token) <= MAX_CACHED_TOKEN_BYTES and not self._expired(e, now):
            self._entries[token] = e
            if len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
                self.counters.evictions += 1
        return e

    def _expired(self, e: _Entry, now: int) -> bool:
        p = e.parsed
        return isinstance(p, Jwt) and bool(p.exp) and now > p.exp + self.clock_skew_s

    def parse(self, token: str, now: int) -> tuple[Jwt | Status, _Entry]:
        e = self._entry(token, now)
        return e.parsed, e

    def verdict(self, entry: _Entry, version: int) -> Status | None:
        v = entry.verdicts.get(version)
        if v is None:
            self.counters.misses += 1
        else:
            self.counters.hits += 1
        return v

    @staticmethod
    def record(entry: _Entry, version: int, status: Status) -> None:
        if len(entry.verdicts) >= 4:  # a handful of key-set versions is plenty; never grow unbounded
            entry.verdicts.clear()
        entry.verdicts[version] = status

    def clear(self) -> None:
        self._entries.clear()


class TokenCacheCollector(Collector):
    """How many tokens the cache holds (its lookups are in extproc_cache_lookups_total)."""

    def __init__(self, cache: TokenCache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("extproc_jwt_cache_entries", "Tokens held by the JWT cache", value=len(self.cache))

"""A bounded LRU of parsed tokens and their signature verdicts.

A repeat token costs a dict lookup instead of base64, JSON and a signature check. Verdicts
are stored per key-set version, so rotated keys are never judged by old results; time and
audience checks are not cached (they are cheap and depend on the clock and the provider).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from extproc.authn.status import Status
from extproc.authn.token import Jwt, parse

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
        self.hits = 0
        self.misses = 0
        self.evictions = 0

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
                self.evictions += 1
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
            self.misses += 1
        else:
            self.hits += 1
        return v

    @staticmethod
    def record(entry: _Entry, version: int, status: Status) -> None:
        if len(entry.verdicts) >= 4:  # a handful of key-set versions is plenty; never grow unbounded
            entry.verdicts.clear()
        entry.verdicts[version] = status

    def clear(self) -> None:
        self._entries.clear()

"""Verdicts remembered by the values of only what the snapshot's policies read.

Mixer's client kept a check cache keyed by the "referenced attributes" of each answer; this is
the same idea done in-process. A snapshot knows, once it is compiled, every attribute its
AuthorizationPolicies and RequestAuthentications can read (`KeyPlan`); the transport builds a
key from exactly those values of a request (plus the connection's addresses, principals and
SNI, the method, path and host, which every key holds because they decide whether a request is
well formed at all), and a request with the same key gets the same Verdict without running
the engines. So `/api/v1/products/7` with a token already seen costs a dict lookup, and a
header no policy mentions (x-request-id, user-agent) never splits the cache.

What a cached Verdict may never outlive, and how that is guaranteed:
* a snapshot change: the cache belongs to one snapshot (`for_snapshot`) and is dropped with it;
* a JWKS key change: each lookup compares the key registry's generation, and a change empties
  the cache;
* a token's expiry (or its `nbf`): each entry keeps the seconds during which the exp/nbf checks
  of the tokens the request carried keep their outcome, and is not used outside them.
Decisions that needed the network (a CUSTOM provider asked, keys fetched for the request) are
not cached. The cache is bounded (oldest entries go first) and its lookups are counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from extproc.attributes import HeaderLines
from extproc.authz.compiler import HEADER_READ, READS_JWT, READS_METADATA, READS_PEER, CompiledRule
from extproc.authz.engine import AuthzProgram
from extproc.lru import CacheCounters
from extproc.verdict import Verdict

if TYPE_CHECKING:
    from extproc.snapshot.compiled import Snapshot

DEFAULT_SIZE = 4096
# Headers every HTTP key holds: the matchers read the pseudo-headers from the header map.
ALWAYS_HEADERS = (":authority", ":method", ":path")
# What RequestAuthentication reads besides its token locations and output headers: the CORS
# preflight test and the WWW-Authenticate realm of a rejection.
AUTHN_HEADERS = (":scheme", "access-control-request-method", "origin", "x-envoy-original-path", "x-forwarded-proto")


@dataclass(frozen=True, slots=True)
class KeyPlan:
    """The request headers (lower-case names, sorted) and whether Envoy's filter metadata are
    part of a decision, beyond what every key holds."""

    headers: tuple[str, ...]
    metadata: bool


def _rules(program: AuthzProgram) -> list[CompiledRule]:
    out: list[CompiledRule] = [*program.custom.bad]
    for _, rules in program.custom.by_provider:
        out.extend(rules)
    for rs in (program.audit, program.deny, program.allow):
        out.extend(rs.enforced)
        out.extend(rs.shadow)
    return out


def reads_physical_peer(snap: Snapshot) -> bool:
    """Whether any HTTP rule reads the physical peer's address (ipBlocks, source.ip), which an
    ext_proc request carries only when Envoy is configured to send it. Computed once per
    snapshot."""
    got: bool | None = snap.memo.get("reads_physical_peer")
    if got is None:
        got = snap.memo["reads_physical_peer"] = any(READS_PEER in rule.reads for rule in _rules(snap.http))
    return got


def key_plan(snap: Snapshot) -> KeyPlan:
    """Everything the snapshot's HTTP decision can read, from its compiled rules and jwtRules."""
    reads: set[str] = set()
    for rule in _rules(snap.http):
        reads |= rule.reads
    headers = set(ALWAYS_HEADERS)
    headers.update(r[len(HEADER_READ) :] for r in reads if r.startswith(HEADER_READ))
    authn = snap.authn
    ex = authn.all_extractor
    if authn.enabled and ex is not None:
        headers.update(loc.header for loc in ex.headers)
        headers.update(ex.sanitize)  # removed when present: the verdict says so
        if ex.cookies:
            headers.add("cookie")
        headers.update(AUTHN_HEADERS)
    # Without a RequestAuthentication, request.auth.* comes from jwt_authn's filter metadata.
    metadata = READS_METADATA in reads or (READS_JWT in reads and not authn.enabled)
    return KeyPlan(tuple(sorted(headers)), metadata)


def repeated_key_part(plan: KeyPlan, lines: HeaderLines) -> tuple[object, ...]:
    """What a key adds for a request some of whose headers arrived as several entries: the
    entries of the plan's headers. The header matchers test entries one by one, so `x: a` +
    `x: b` must not share a key with one line `x: a,b` (both join to "a,b"). Only requests
    with repeated names pay for it; their keys are longer, so they never equal a plain one."""
    return (tuple([lines.get(name) for name in plan.headers]),)


@dataclass(slots=True)
class CacheStats(CacheCounters):
    """The lookups of every snapshot's cache, kept by the enforcer so they survive reloads."""

    name: str = "decision"
    # Decisions that could not be stored: they needed a CUSTOM provider or a key fetch, or the
    # request could not be described by a key (e.g. header names not in lower case).
    uncacheable: int = 0


@dataclass(slots=True)
class _Entry:
    verdict: Verdict
    jwt_outcome: str | None  # the RequestAuthentication outcome to count on each hit
    valid_from: int
    valid_until: int


@dataclass
class DecisionCache:
    """The verdicts of one snapshot, by key. Not thread-safe: the event loop owns it."""

    plan: KeyPlan
    size: int
    jwks_generation: int = 0
    _entries: dict[tuple[object, ...], _Entry] = field(default_factory=dict)

    @staticmethod
    def for_snapshot(snap: Snapshot, size: int) -> DecisionCache | None:
        """The snapshot's cache, made on first use and kept with the snapshot; None when off."""
        if size <= 0:
            return None
        cache: DecisionCache | None = snap.memo.get("decisions")
        if cache is None:
            cache = snap.memo["decisions"] = DecisionCache(key_plan(snap), size)
        return cache

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[object, ...], now: int, jwks_generation: int) -> _Entry | None:
        if jwks_generation != self.jwks_generation:
            self.clear()
            self.jwks_generation = jwks_generation
        e = self._entries.get(key)
        if e is None or not e.valid_from <= now <= e.valid_until:
            return None
        return e

    def put(
        self,
        key: tuple[object, ...],
        verdict: Verdict,
        jwt_outcome: str | None,
        valid_from: int,
        valid_until: int,
        jwks_generation: int,
    ) -> bool:
        """Remember `verdict`; True when the oldest entry had to go to make room."""
        if jwks_generation != self.jwks_generation:
            return False  # keys changed while this request was decided: its verdict may be stale
        entries = self._entries
        evicted = key not in entries and len(entries) >= self.size
        if evicted:
            # The oldest entry goes: a plain dict keeps insertion order, and a hit does not
            # reorder it (cheaper than an LRU; a hot key evicted is simply decided again).
            del entries[next(iter(entries))]
        entries[key] = _Entry(verdict, jwt_outcome, valid_from, valid_until)
        return evicted

    def clear(self) -> None:
        self._entries.clear()

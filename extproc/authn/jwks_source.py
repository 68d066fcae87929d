"""Fetching and refreshing remote key sets (jwksUri, or OpenID discovery from the issuer).

Istio's istiod fetches jwksUri every 20 minutes and, if it cannot, gives Envoy a key nobody
can sign with: tokens for that issuer fail (401) while requests without a token pass.
extproc does the fetching itself, next to the proxy, with the same outcome, plus:
  * a fetch failure keeps the last good keys;
  * the first requests wait for the initial fetch (up to the rule's `timeout`) instead of
    failing while it is in flight;
  * a token whose `kid` is not in the keys triggers a refetch, at most once per
    `kid_refresh_interval` per source, so a rotated key works at once and a flood of
    made-up kids costs one fetch per interval.
All fetching happens on the event loop with aiohttp; requests only read `state.keys`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from extproc.authn.keys import KeySet, parse_jwks
from extproc.authn.program import Provider, RemoteSource
from extproc.authn.status import JwksError

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("extproc.jwks")

MAX_JWKS_BYTES = 1024 * 1024
RETRY_MIN_S = 1.0
RETRY_MAX_S = 60.0


@dataclass
class SourceState:
    source: RemoteSource
    keys: KeySet | None = None
    digest: str = ""
    jwks_uri: str = ""  # resolved (after discovery)
    last_success: float | None = None  # wall clock
    last_attempt: float | None = None
    last_error: str = ""
    fetches: dict[str, int] = field(default_factory=lambda: {"success": 0, "failure": 0})
    kid_refreshes: int = 0
    last_kid_refresh: float = float("-inf")  # monotonic
    inflight: asyncio.Task[bool] | None = None
    loop_task: asyncio.Task[None] | None = None

    def describe(self) -> dict[str, Any]:
        now = time.time()
        return {
            "issuer": self.source.issuer,
            "jwksUri": self.source.jwks_uri or None,
            "resolvedJwksUri": self.jwks_uri or None,
            "keys": [{"kid": k.kid, "kty": k.kty, "alg": k.alg or None} for k in self.keys.keys] if self.keys else [],
            "haveKeys": self.keys is not None,
            "keyAgeSeconds": round(now - self.last_success, 3) if self.last_success else None,
            "lastAttemptAgoSeconds": round(now - self.last_attempt, 3) if self.last_attempt else None,
            "lastError": self.last_error or None,
            "fetches": dict(self.fetches),
            "kidRefreshes": self.kid_refreshes,
        }


def _client_error() -> type[Exception]:
    import aiohttp

    return aiohttp.ClientError


class JwksRegistry:
    def __init__(self, refresh_interval_s: float = 1200.0, kid_refresh_interval_s: float = 30.0) -> None:
        self.refresh_interval_s = refresh_interval_s
        self.kid_refresh_interval_s = kid_refresh_interval_s
        self._states: dict[str, SourceState] = {}
        self._session: aiohttp.ClientSession | None = None
        # Bumped whenever the keys any request may be verified with change (a fetch brought
        # new keys, a source was dropped): results computed with older keys are stale.
        self.generation = 0

    @property
    def states(self) -> dict[str, SourceState]:
        return self._states

    # --- lifecycle -------------------------------------------------------------------

    def sync(self, sources: Iterable[RemoteSource]) -> None:
        """Track exactly these sources: start fetching new ones, stop forgotten ones.
        Called with every new snapshot, on the event loop."""
        wanted = {s.key: s for s in sources}
        for key in list(self._states):
            if key not in wanted:
                self.generation += 1
                st = self._states.pop(key)
                for t in (st.loop_task, st.inflight):
                    if t is not None:
                        t.cancel()
        for key, src in wanted.items():
            existing = self._states.get(key)
            if existing is None:
                new = self._states[key] = SourceState(src)
                new.loop_task = asyncio.get_running_loop().create_task(self._loop(new), name=f"jwks {key}")
            else:
                existing.source = src  # a new timeout applies from the next fetch

    async def close(self) -> None:
        for st in self._states.values():
            for t in (st.loop_task, st.inflight):
                if t is not None:
                    t.cancel()
        self._states.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- request path ----------------------------------------------------------------

    def keys_for(self, provider: Provider) -> KeySet | None:
        if provider.inline_keys is not None:
            return provider.inline_keys
        if provider.remote is None:
            return None
        st = self._states.get(provider.remote.key)
        return st.keys if st is not None else None

    async def refresh(self, missing: Iterable[RemoteSource], unknown_kid: Iterable[RemoteSource]) -> bool:
        """Try to get keys a request needed; True if any source now has different keys."""
        waits: list[tuple[SourceState, int]] = []
        now = time.monotonic()
        for src, kid in [*((s, False) for s in missing), *((s, True) for s in unknown_kid)]:
            st = self._states.get(src.key)
            if st is None:
                continue
            before = st.keys.version if st.keys is not None else 0
            if st.inflight is None:
                if now - st.last_kid_refresh < self.kid_refresh_interval_s:
                    continue  # rate limited: decide with the keys we have
                st.last_kid_refresh = now
                if kid:
                    st.kid_refreshes += 1
                self._start_fetch(st)
            waits.append((st, before))
        changed = False
        for st, before in waits:
            task = st.inflight
            if task is not None:
                with contextlib.suppress(Exception):  # a timeout or failure: the fetch logs its own errors
                    await asyncio.wait_for(asyncio.shield(task), st.source.timeout_s)
            after = st.keys.version if st.keys is not None else 0
            changed |= after != before
        return changed

    # --- fetching --------------------------------------------------------------------

    def _start_fetch(self, st: SourceState) -> asyncio.Task[bool]:
        if st.inflight is None or st.inflight.done():
            st.inflight = asyncio.get_running_loop().create_task(self._fetch(st))
            st.inflight.add_done_callback(functools.partial(_clear_inflight, st))
        return st.inflight

    async def _loop(self, st: SourceState) -> None:
        backoff = RETRY_MIN_S
        while True:
            task = st.inflight or self._start_fetch(st)
            try:
                ok = await asyncio.shield(task)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the refresher die
                log.exception("JWKS refresh for %s failed unexpectedly", st.source.key)
                ok = False
            if ok:
                backoff = RETRY_MIN_S
                delay = self.refresh_interval_s
            else:
                delay = min(backoff, self.refresh_interval_s)
                backoff = min(backoff * 2, RETRY_MAX_S)
            await asyncio.sleep(delay)

    def _client(self) -> aiohttp.ClientSession:
        import aiohttp  # only servers with a remote key source pay for the HTTP client

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers={"Accept": "application/json"})
        return self._session

    async def _get(self, url: str, timeout_s: float) -> bytes:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with self._client().get(url, timeout=timeout, allow_redirects=True) as resp:
            if resp.status != 200:
                raise OSError(f"GET {url}: HTTP {resp.status}")
            body = await resp.content.read(MAX_JWKS_BYTES + 1)
            if len(body) > MAX_JWKS_BYTES:
                raise OSError(f"GET {url}: response larger than {MAX_JWKS_BYTES} bytes")
            return body

    async def _fetch(self, st: SourceState) -> bool:
        src = st.source
        st.last_attempt = time.time()
        try:
            uri = src.jwks_uri
            if not uri:
                uri = await self._discover(src)
            body = await self._get(uri, src.timeout_s)
            digest = hashlib.sha256(body).hexdigest()
            if digest != st.digest or st.keys is None:
                keys = parse_jwks(body)
                had = st.keys is not None
                st.keys, st.digest = keys, digest
                self.generation += 1
                log.info(
                    "%s keys for issuer %s from %s: %d key(s)",
                    "new" if had else "fetched",
                    src.issuer,
                    uri,
                    len(keys.keys),
                )
            st.jwks_uri = uri
            st.last_success = time.time()
            st.last_error = ""
            st.fetches["success"] += 1
            return True
        except asyncio.CancelledError:
            raise
        except (OSError, _client_error(), TimeoutError, JwksError, ValueError) as e:
            msg = str(e) or type(e).__name__
            if msg != st.last_error:
                log.warning(
                    "cannot fetch JWKS for issuer %s (%s): %s; %s",
                    src.issuer,
                    src.jwks_uri or "OpenID discovery",
                    msg,
                    "keeping the last good keys" if st.keys is not None else "tokens of this issuer are rejected",
                )
            st.last_error = msg
            st.fetches["failure"] += 1
            return False

    async def _discover(self, src: RemoteSource) -> str:
        """jwks_uri from the issuer's OpenID configuration, as Istio resolves a rule without one."""
        url = src.issuer.rstrip("/") + "/.well-known/openid-configuration"
        doc = json.loads(await self._get(url, src.timeout_s))
        uri = doc.get("jwks_uri") if isinstance(doc, dict) else None
        if not isinstance(uri, str) or not uri.startswith(("http://", "https://")):
            raise ValueError(f"{url} has no usable jwks_uri")
        return uri


def _clear_inflight(st: SourceState, _task: asyncio.Task[bool]) -> None:
    st.inflight = None


class JwksCollector(Collector):
    """Each key source's fetches, keys and freshness, by issuer and source."""

    def __init__(self, registry: JwksRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        fetches = CounterMetricFamily(
            "extproc_jwks_fetches", "JWKS fetches by key source and result", labels=["issuer", "source", "result"]
        )
        nkeys = GaugeMetricFamily("extproc_jwks_keys", "Keys currently held", labels=["issuer", "source"])
        age = GaugeMetricFamily(
            "extproc_jwks_last_success_timestamp_seconds",
            "Unix time of the last successful fetch (0 = never)",
            labels=["issuer", "source"],
        )
        kid = CounterMetricFamily(
            "extproc_jwks_kid_refetches", "Refetches triggered by an unknown kid", labels=["issuer", "source"]
        )
        for key, st in sorted(self.registry.states.items()):
            lbl = [st.source.issuer, key]
            for result, n in sorted(st.fetches.items()):
                fetches.add_metric([*lbl, result], n)
            nkeys.add_metric(lbl, len(st.keys.keys) if st.keys else 0)
            age.add_metric(lbl, st.last_success or 0)
            kid.add_metric(lbl, st.kid_refreshes)
        yield fetches
        yield nkeys
        yield age
        yield kid

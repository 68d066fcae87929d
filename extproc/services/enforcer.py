"""The enforcement pipeline every transport shares: decision cache, CUSTOM, JWT, policies.

A transport (ext_authz over gRPC, ext_proc) builds the request's Attributes and its cache
key, and asks `Enforcer.decide`; it gets a `Verdict` and renders it in its own message. The
pipeline itself is the pure stages of `extproc.decision.decide`; what lives here is what
those stages need from the world: the CUSTOM providers and the JWKS keys (network), the
token cache, the counters, and the decision cache.

A request whose key is cached costs a dict lookup (`cached`). Otherwise `decide` runs the
stages; it awaits nothing unless a CUSTOM provider must be asked or a key source must be
fetched, so the common path creates no task and no future.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString as _float_to_go_string

from extproc.attributes import Attributes
from extproc.authn.cache import TokenCache
from extproc.authn.jwks_source import JwksRegistry
from extproc.authn.verifier import FOREVER, AuthnResult, authenticate
from extproc.decision import decide as stages
from extproc.decision.cache import DEFAULT_SIZE, CacheStats, DecisionCache
from extproc.decision.decide import Changes
from extproc.services.custom import CustomDenied, ProviderPool
from extproc.snapshot.compiled import Snapshot
from extproc.verdict import Verdict

log = logging.getLogger("extproc.authz")

LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@dataclass
class AuthzStats:
    """Plain counters; the admin endpoint renders them. Never touched by a lock on the hot path."""

    checks: dict[str, int] = field(default_factory=lambda: {"http": 0, "tcp": 0})
    decisions: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (protocol, result, stage)
    malformed: dict[str, int] = field(default_factory=dict)
    # Requests that arrived without something Envoy must be configured to send (kind -> count),
    # whether or not they could still be decided; the log says once what to add.
    misconfigured: dict[str, int] = field(default_factory=dict)
    internal_errors: int = 0
    custom_calls: dict[tuple[str, str], int] = field(default_factory=dict)  # (provider, outcome)
    dry_run: dict[tuple[str, str], int] = field(default_factory=dict)  # (ALLOW|DENY, allowed|denied)
    audit_hits: int = 0
    latency_sum_s: float = 0.0
    # Check handling time: counts per LATENCY_BUCKETS_S bound (not cumulative), last = above all.
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    jwt: dict[str, int] = field(default_factory=dict)  # verification outcome -> count
    jwt_refetch_retries: int = 0
    cache: CacheStats = field(default_factory=CacheStats)

    def count(self, table: dict[Any, int], key: Any) -> None:
        table[key] = table.get(key, 0) + 1

    def decided(self, protocol: str, verdict: Verdict, jwt_outcome: str | None) -> None:
        """Everything one decision counts, cached or not."""
        self.checks[protocol] += 1
        memo = verdict.memo
        key = memo.get(protocol)
        if key is None:  # the counter key of a verdict never changes: made once
            key = memo[protocol] = (protocol, verdict.engine_result, verdict.stage.value)
        decisions = self.decisions
        decisions[key] = decisions.get(key, 0) + 1
        if jwt_outcome is not None:
            self.jwt[jwt_outcome] = self.jwt.get(jwt_outcome, 0) + 1
        if verdict.audit_policy_id is not None:
            self.audit_hits += 1
        for s in verdict.shadow:
            k = (s.action, "allowed" if s.allowed else "denied")
            self.dry_run[k] = self.dry_run.get(k, 0) + 1

    def observe(self, started: float) -> None:
        elapsed = time.perf_counter() - started
        self.latency_sum_s += elapsed
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS_S, elapsed)] += 1


def jwt_outcome(result: AuthnResult) -> str:
    """The extproc_jwt_verifications_total label of a RequestAuthentication result."""
    if result.cors_preflight:
        return "cors_preflight"
    if result.ok:
        return "verified" if result.verified else "no_token"
    return result.status.metric_name


class Enforcer:
    def __init__(
        self,
        providers: ProviderPool | None = None,
        jwks: JwksRegistry | None = None,
        token_cache: TokenCache | None = None,
        stats: AuthzStats | None = None,
        cache_size: int = DEFAULT_SIZE,
    ) -> None:
        self.providers = providers if providers is not None else ProviderPool()
        self.jwks = jwks if jwks is not None else JwksRegistry()
        self.token_cache = token_cache if token_cache is not None else TokenCache()
        self.stats = stats if stats is not None else AuthzStats()
        self.cache_size = cache_size

    def cache(self, snap: Snapshot) -> DecisionCache | None:
        return DecisionCache.for_snapshot(snap, self.cache_size)

    def cached(self, cache: DecisionCache, key: tuple[object, ...], now: int) -> Verdict | None:
        """The verdict of an HTTP request already decided with the same key, counted; or None."""
        e = cache.get(key, now, self.jwks.generation)
        if e is None:
            self.stats.cache.misses += 1
            return None
        self.stats.cache.hits += 1
        self.stats.decided("http", e.verdict, e.jwt_outcome)
        return e.verdict

    async def decide(
        self,
        snap: Snapshot,
        attrs: Attributes,
        *,
        now: int,
        cache: DecisionCache | None = None,
        key: tuple[object, ...] | None = None,
        custom_request: Callable[[], external_auth_pb2.CheckRequest] | None = None,
    ) -> Verdict:
        """Run the stages for a request the cache could not answer, and remember the verdict
        under `key` when it may be reused. `custom_request` builds what a CUSTOM gRPC provider is
        sent (the CheckRequest Envoy would have sent), only if one must be asked."""
        http = attrs.http is not None
        protocol = "http" if http else "tcp"
        generation = self.jwks.generation
        reusable = cache is not None and key is not None
        custom: Changes | None = None

        verdict: Verdict | None = None
        outcome: str | None = None  # the JWT stage's counter label
        valid = (0, FOREVER)  # the seconds in which the tokens' exp/nbf checks keep their outcome
        plan = stages.custom_stage(snap, attrs)
        if isinstance(plan, Verdict):  # a CUSTOM policy that cannot be enforced: deterministic
            verdict = plan
        else:
            for provider, rule_id in plan:
                reusable = False  # the provider's answer is its own business, asked each time
                assert custom_request is not None, "a CUSTOM provider needs the request to forward"
                result = await self.providers.check(snap, provider, custom_request(), attrs)
                self.stats.count(self.stats.custom_calls, (provider, result.kind))
                if isinstance(result, CustomDenied):
                    log.debug("CUSTOM provider %s denied (%s) after %s matched", provider, result.kind, rule_id)
                    verdict = stages.custom_denied(result.denial, result.reason, rule_id, snap.version, http=http)
                    break
                if result.changes is not None:
                    custom = result.changes if custom is None else custom.then(result.changes)
        if verdict is None:
            authn = None
            if http and snap.authn.enabled:
                authn, refetched = await self._authenticate(snap, attrs, now)
                reusable = reusable and not refetched
                outcome = jwt_outcome(authn)
                valid = (authn.valid_from, authn.valid_until)
            verdict = stages.decide(snap, attrs, authn, custom)
        if (
            reusable
            and cache is not None
            and key is not None
            and cache.put(key, verdict, outcome, valid[0], valid[1], generation)
        ):
            self.stats.cache.evictions += 1  # the oldest entry made room
        if not reusable and cache is not None:
            self.stats.cache.uncacheable += 1
        self.stats.decided(protocol, verdict, outcome)
        if log.isEnabledFor(logging.DEBUG):
            self._debug(protocol, attrs, verdict)
        return verdict

    async def _authenticate(self, snap: Snapshot, attrs: Attributes, now: int) -> tuple[AuthnResult, bool]:
        """The JWT stage; True with it when the keys had to be fetched for this request."""
        http = attrs.http
        assert http is not None

        def run() -> AuthnResult:
            return authenticate(
                snap.authn, http.method, http.headers, now, self.jwks.keys_for, self.token_cache, http.lines
            )

        result = run()
        if result.ok or not result.refresh_wanted:
            return result, False
        # Keys never fetched yet, or a kid we do not know (a rotation): refetch, rate-limited.
        if await self.jwks.refresh(result.missing_keys, result.unknown_kid):
            self.stats.jwt_refetch_retries += 1
            result = run()
        return result, True

    @staticmethod
    def _debug(protocol: str, attrs: Attributes, v: Verdict) -> None:
        log.debug(
            "%s %s %s from %s: %s by %s (%s)",
            protocol,
            attrs.http.method if attrs.http else "",
            attrs.http.path if attrs.http else f"{attrs.destination_ip}:{attrs.destination_port}",
            attrs.source_principal or attrs.source_ip,
            v.engine_result,
            v.stage.value,
            v.reason,
        )


# prometheus_client's rendering of a float as Prometheus writes it (untyped there).
_go_float: Callable[[float], str] = _float_to_go_string


class AuthzCollector(Collector):
    """The decisions AuthzStats counts, rendered at scrape time; requests only bump plain ints.
    `unnormalized_paths` gives (the --path-normalization mode, paths Envoy left unnormalized)."""

    def __init__(
        self,
        stats: AuthzStats,
        current: Callable[[], Snapshot],
        unnormalized_paths: Callable[[], tuple[str, int]] | None = None,
    ) -> None:
        self.stats = stats
        self.current = current
        self.unnormalized_paths = unnormalized_paths

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        checks = CounterMetricFamily("extproc_checks", "ext_authz Check calls received", labels=["protocol"])
        for proto, n in sorted(s.checks.items()):
            checks.add_metric([proto], n)
        yield checks
        dec = CounterMetricFamily(
            "extproc_authz_decisions",
            "Authorization decisions by outcome and deciding stage",
            labels=["protocol", "result", "stage"],
        )
        for (proto, result, stage), n in sorted(s.decisions.items()):
            dec.add_metric([proto, result, stage], n)
        yield dec
        bad = CounterMetricFamily("extproc_malformed_requests", "Check requests denied as malformed", labels=["kind"])
        for kind, n in sorted(s.malformed.items()):
            bad.add_metric([kind], n)
        yield bad
        if self.unnormalized_paths is not None:
            mode, n = self.unnormalized_paths()
            paths = CounterMetricFamily(
                "extproc_unnormalized_paths",
                "HTTP requests whose path Envoy should already have normalized (its normalization is weaker than "
                "--path-normalization); policies matched the normalized path",
                labels=["normalization"],
            )
            paths.add_metric([mode], n)
            yield paths
        misconfigured = CounterMetricFamily(
            "extproc_misconfigured_requests",
            "Requests that arrived without a setting the Envoy filter needs (see the README's settings tables)",
            labels=["kind"],
        )
        for kind, n in sorted(s.misconfigured.items()):
            misconfigured.add_metric([kind], n)
        yield misconfigured
        yield CounterMetricFamily(
            "extproc_internal_errors", "Checks denied because of an internal error", value=s.internal_errors
        )
        custom = CounterMetricFamily(
            "extproc_custom_calls", "Calls to CUSTOM providers", labels=["provider", "outcome"]
        )
        for (prov, outcome), n in sorted(s.custom_calls.items()):
            custom.add_metric([prov, outcome], n)
        yield custom
        dry = CounterMetricFamily("extproc_dry_run_results", "Dry-run policy evaluations", labels=["action", "result"])
        for (action, result), n in sorted(s.dry_run.items()):
            dry.add_metric([action, result], n)
        yield dry
        yield CounterMetricFamily("extproc_audit_matches", "Requests matched by an AUDIT policy", value=s.audit_hits)
        cum, buckets = 0, []
        for bound, n in zip(LATENCY_BUCKETS_S, s.latency_counts, strict=False):
            cum += n
            buckets.append((_go_float(bound), cum))
        buckets.append(("+Inf", cum + s.latency_counts[-1]))
        yield HistogramMetricFamily(
            "extproc_check_duration_seconds",
            "Time extproc took to answer ext_authz Check calls",
            buckets=buckets,
            sum_value=s.latency_sum_s,
        )
        decisions = self.current().memo.get("decisions")
        yield GaugeMetricFamily(
            "extproc_decision_cache_entries",
            "HTTP decisions the serving snapshot's cache holds",
            value=len(decisions) if decisions is not None else 0,
        )
        yield CounterMetricFamily(
            "extproc_decision_cache_evictions",
            "Decisions evicted from the decision cache to stay within --decision-cache-size",
            value=s.cache.evictions,
        )
        yield CounterMetricFamily(
            "extproc_decision_cache_uncacheable",
            "Decisions not cached: a CUSTOM provider was asked, keys were fetched, or the request had no usable key",
            value=s.cache.uncacheable,
        )
        jwt = CounterMetricFamily(
            "extproc_jwt_verifications",
            "RequestAuthentication outcomes: verified, no_token, cors_preflight, or the failure status",
            labels=["outcome"],
        )
        for outcome, n in sorted(s.jwt.items()):
            jwt.add_metric([outcome], n)
        yield jwt
        yield CounterMetricFamily(
            "extproc_jwt_rechecks",
            "Requests verified again after their key source was refetched (first fetch or unknown kid)",
            value=s.jwt_refetch_retries,
        )

"""Evaluate compiled policies in Istio's order and explain the outcome.

Istio puts one Envoy RBAC filter per action in the chain, after the CUSTOM
ext_authz filter: AUDIT (RBAC `LOG`), then DENY, then ALLOW. We evaluate the same
sequence, stopping where Envoy's chain would stop, so dry-run results and audit
hints are recorded exactly when Envoy would record them. Within an action, rules
are tried in Envoy's order (its policy map is sorted by name), so the reported
effective policy is the one Envoy's RBAC filter would report.

CUSTOM is split out because it needs I/O: `custom_providers()` says which external
authorizers must be consulted, the service calls them, and only then `evaluate()`
decides on DENY and ALLOW.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from extproc.attributes import Attributes
from extproc.authz.compiler import CompiledPolicy, CompiledRule
from extproc.config.models import Action

DENIED_BODY = "RBAC: access denied"


@dataclass(frozen=True, slots=True)
class RuleSet:
    """All rules of one action for one protocol, like one Envoy RBAC filter."""

    enforced: tuple[CompiledRule, ...] = ()
    shadow: tuple[CompiledRule, ...] = ()  # dry-run rules: evaluated, never enforced
    has_enforced: bool = False  # an enforced policy exists, even if all its rules were dropped
    has_shadow: bool = False

    @staticmethod
    def build(rules: Iterable[CompiledRule], policies: Iterable[CompiledPolicy]) -> RuleSet:
        rules = list(rules)
        policies = list(policies)
        enforced = tuple(sorted((r for r in rules if not r.policy.dry_run), key=lambda r: r.rule_id))
        shadow = tuple(sorted((r for r in rules if r.policy.dry_run), key=lambda r: r.rule_id))
        return RuleSet(
            enforced=enforced,
            shadow=shadow,
            has_enforced=any(not p.ref.dry_run for p in policies),
            has_shadow=any(p.ref.dry_run for p in policies),
        )


def first_match(rules: tuple[CompiledRule, ...], attrs: Attributes) -> CompiledRule | None:
    for r in rules:
        if r.matches(attrs):
            return r
    return None


@dataclass(frozen=True, slots=True)
class ShadowResult:
    """A dry-run evaluation, as Envoy's RBAC shadow engine reports it."""

    action: Action  # ALLOW or DENY
    allowed: bool
    policy_id: str | None

    @property
    def engine_result(self) -> str:
        return "allowed" if self.allowed else "denied"


@dataclass(frozen=True, slots=True)
class CustomRuleSet:
    """CUSTOM rules grouped by provider, in Envoy's filter order (provider name)."""

    by_provider: tuple[tuple[str, tuple[CompiledRule, ...]], ...] = ()
    # Rules that must deny because their provider cannot be used (unknown, invalid, or
    # several providers without multi-provider support): Istio's "-deny-due-to-bad-CUSTOM-action".
    bad: tuple[CompiledRule, ...] = ()
    bad_reason: str = ""


@dataclass(frozen=True, slots=True)
class AuthzProgram:
    """Everything needed to decide one protocol's requests."""

    custom: CustomRuleSet = field(default_factory=CustomRuleSet)
    audit: RuleSet = field(default_factory=RuleSet)
    deny: RuleSet = field(default_factory=RuleSet)
    allow: RuleSet = field(default_factory=RuleSet)

    @property
    def empty(self) -> bool:
        return not (
            self.custom.by_provider
            or self.custom.bad
            or self.audit.has_enforced
            or self.deny.has_enforced
            or self.deny.has_shadow
            or self.allow.has_enforced
            or self.allow.has_shadow
        )


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    # Which stage decided: "custom" (bad CUSTOM config), "deny", "allow", "no-match" (ALLOW
    # policies exist, none matched) or "no-policy" (no ALLOW policy applies).
    stage: str
    policy_id: str | None
    reason: str
    audit_policy_id: str | None = None
    shadow: tuple[ShadowResult, ...] = ()

    @property
    def engine_result(self) -> str:
        return "allowed" if self.allowed else "denied"


def custom_providers(program: AuthzProgram, attrs: Attributes) -> tuple[list[tuple[str, str]], CompiledRule | None]:
    """Providers whose CUSTOM rules match, as (provider, rule_id); or a rule that must deny."""
    bad = first_match(program.custom.bad, attrs)
    if bad is not None:
        return [], bad
    hits: list[tuple[str, str]] = []
    for provider, rules in program.custom.by_provider:
        hit = first_match(rules, attrs)
        if hit is not None:
            hits.append((provider, hit.rule_id))
    return hits, None


def bad_custom_decision(program: AuthzProgram, rule: CompiledRule) -> Decision:
    return Decision(
        allowed=False,
        stage="custom",
        policy_id=rule.rule_id + "-deny-due-to-bad-CUSTOM-action",
        reason=f"CUSTOM policy {rule.policy.namespace}/{rule.policy.name} cannot be enforced: "
        f"{program.custom.bad_reason}; Istio denies the requests it matches",
    )


def evaluate(program: AuthzProgram, attrs: Attributes) -> Decision:
    """AUDIT, then DENY, then ALLOW, stopping where Envoy's filter chain stops."""
    audit_hit = first_match(program.audit.enforced, attrs) if program.audit.has_enforced else None
    audit_id = audit_hit.rule_id if audit_hit else None
    shadow: list[ShadowResult] = []

    deny = program.deny
    if deny.has_shadow:
        hit = first_match(deny.shadow, attrs)
        shadow.append(ShadowResult(Action.DENY, hit is None, hit.rule_id if hit else None))
    if deny.has_enforced:
        hit = first_match(deny.enforced, attrs)
        if hit is not None:
            return Decision(
                False,
                "deny",
                hit.rule_id,
                f"DENY policy {hit.policy.namespace}/{hit.policy.name} rule {hit.index} matched",
                audit_id,
                tuple(shadow),
            )

    allow = program.allow
    if allow.has_shadow:
        hit = first_match(allow.shadow, attrs)
        shadow.append(ShadowResult(Action.ALLOW, hit is not None, hit.rule_id if hit else None))
    if not allow.has_enforced:
        return Decision(True, "no-policy", None, "no ALLOW policy applies to this workload", audit_id, tuple(shadow))
    hit = first_match(allow.enforced, attrs)
    if hit is not None:
        return Decision(
            True,
            "allow",
            hit.rule_id,
            f"ALLOW policy {hit.policy.namespace}/{hit.policy.name} rule {hit.index} matched",
            audit_id,
            tuple(shadow),
        )
    return Decision(False, "no-match", None, _no_match_reason(allow.enforced, attrs), audit_id, tuple(shadow))


def _no_match_reason(rules: tuple[CompiledRule, ...], attrs: Attributes, limit: int = 3) -> str:
    """Why no ALLOW rule matched; computed only on this deny path, never for allowed requests."""
    if not rules:
        return "no ALLOW rule applies to this protocol, so nothing is allowed"
    parts = [f"{r.rule_id}: {r.first_failure(attrs)}" for r in rules[:limit]]
    more = f"; and {len(rules) - limit} more rule(s)" if len(rules) > limit else ""
    return "no ALLOW policy matched: " + "; ".join(parts) + more


@dataclass(frozen=True, slots=True)
class RuleTrace:
    rule_id: str
    action: Action
    dry_run: bool
    matched: bool
    why_not: str | None
    origin: str


def trace(program: AuthzProgram, attrs: Attributes) -> list[RuleTrace]:
    """Every rule and whether it matched, for `extproc explain` and /debug/explain."""
    out: list[RuleTrace] = []

    def add(rules: Iterable[CompiledRule]) -> None:
        for r in rules:
            why = r.first_failure(attrs)
            out.append(RuleTrace(r.rule_id, r.policy.action, r.policy.dry_run, why is None, why, r.policy.origin))

    add(program.custom.bad)
    for _, rules in program.custom.by_provider:
        add(rules)
    add(program.audit.enforced)
    add(program.deny.shadow)
    add(program.deny.enforced)
    add(program.allow.shadow)
    add(program.allow.enforced)
    return out

"""Compile AuthorizationPolicies into predicates over Attributes, once per config change.

The structure follows Istio's model (pilot/pkg/security/authz/model): a policy is an
OR over its rules; a rule is AND(OR over `from`, OR over `to`, every `when`); inside a
source or operation every field is ANDed and the values of one field are ORed;
`notX` is NOT(OR(values)). Each (field, polarity) pair becomes one `Check` that keeps
the YAML path it came from, so a decision can say which condition failed.

Istio builds a separate configuration for TCP filter chains, where HTTP-only
attributes cannot be evaluated. For an ALLOW policy a rule that uses any of them is
dropped entirely (the allow set shrinks); for DENY, AUDIT and CUSTOM only the
offending condition is dropped (the deny set widens). We compile both programs up
front and the adapter picks one by the request's protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from extproc.attributes import Attributes
from extproc.authz import matchers as m
from extproc.config import validation as v
from extproc.config.models import Action, AuthorizationPolicy, Condition, Operation, Rule, Source

Test = Callable[[Attributes], bool]


# What a check reads beyond the connection's addresses, principals, SNI and the request's
# method, path and host (which every decision key holds): the values of these request
# headers, the verified JWT, Envoy's filter metadata. The decision cache keys on them.
READS_JWT = "jwt"
READS_METADATA = "metadata"
# The physical peer's address (ipBlocks, source.ip: Envoy RBAC's direct_remote_ip), which the
# ext_proc transport has only when Envoy is configured to send it (see processing_adapter).
READS_PEER = "peer"
HEADER_READ = "header:"


@dataclass(frozen=True, slots=True)
class Check:
    """One field of a rule with its values (or notValues) compiled."""

    field: str  # e.g. "from[0].source.principals" or "when[1](request.headers[x-user]).notValues"
    test: Test
    http_only: bool = False
    negated: bool = False
    reads: frozenset[str] = frozenset()

    def __call__(self, attrs: Attributes) -> bool:
        return self.test(attrs)


@dataclass(frozen=True, slots=True)
class PolicyRef:
    namespace: str
    name: str
    action: Action
    dry_run: bool
    provider: str | None  # CUSTOM only
    origin: str  # "file.yaml: document 2", for explanations


@dataclass(frozen=True, slots=True)
class CompiledRule:
    rule_id: str  # Istio's Envoy policy name: ns[<ns>]-policy[<name>]-rule[<i>]
    policy: PolicyRef
    index: int
    froms: tuple[tuple[Check, ...], ...]  # OR of ANDs; () means no `from` constraint
    tos: tuple[tuple[Check, ...], ...]
    whens: tuple[Check, ...]
    never: bool = False  # Istio's rbacPolicyMatchNever, for a policy without rules
    matches: Test = field(default=lambda a: False, compare=False, repr=False)

    @property
    def reads(self) -> frozenset[str]:
        """Everything any of this rule's checks reads (see `Check.reads`)."""
        out: set[str] = set()
        for group in (*self.froms, *self.tos, self.whens):
            for c in group:
                out |= c.reads
        return frozenset(out)

    def first_failure(self, attrs: Attributes) -> str | None:
        """None if the rule matches, else the first condition that did not hold."""
        if self.never:
            return "the policy has no rules, so it matches nothing"
        if self.froms and not any(all(c(attrs) for c in f) for f in self.froms):
            return _first_failing_group("from", self.froms, attrs)
        if self.tos and not any(all(c(attrs) for c in t) for t in self.tos):
            return _first_failing_group("to", self.tos, attrs)
        for c in self.whens:
            if not c(attrs):
                return f"{c.field} did not match"
        return None


def _first_failing_group(name: str, groups: tuple[tuple[Check, ...], ...], attrs: Attributes) -> str:
    reasons = []
    for g in groups:
        for c in g:
            if not c(attrs):
                reasons.append(f"{c.field} did not match")
                break
    if len(reasons) == 1:
        return reasons[0]
    return f"no `{name}` entry matched (" + "; ".join(reasons) + ")"


def _and(tests: Sequence[Test]) -> Test:
    if not tests:
        return lambda a: True
    if len(tests) == 1:
        return tests[0]
    if len(tests) == 2:
        t0, t1 = tests
        return lambda a: t0(a) and t1(a)
    ts = tuple(tests)
    return lambda a: all(t(a) for t in ts)


def _or(tests: Sequence[Test]) -> Test:
    if len(tests) == 1:
        return tests[0]
    ts = tuple(tests)
    return lambda a: any(t(a) for t in ts)


def _build_matcher(rule: CompiledRule) -> Test:
    if rule.never:
        return lambda a: False
    parts: list[Test] = []
    if rule.froms:
        parts.append(_or([_and([c.test for c in f]) for f in rule.froms]))
    if rule.tos:
        parts.append(_or([_and([c.test for c in t]) for t in rule.tos]))
    parts.extend(c.test for c in rule.whens)
    return _and(parts)


# --- trust domains -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrustDomainBundle:
    """The local trust domain followed by its aliases (trustdomain/bundle.go)."""

    domains: tuple[str, ...] = ("cluster.local",)

    def replace_aliases(self, principals: Sequence[str]) -> list[str]:
        out: list[str] = []
        for principal in principals:
            parts = principal.split("/")
            if len(parts) != 5 or parts[0] == "*":
                out.append(principal)
                continue
            td = parts[0]
            if _td_list_match(td, self.domains) or td == "cluster.local":
                expanded: list[str] = []
                for alias in self.domains:
                    new = principal if _suffix_match(alias, td) else "/".join([alias, *parts[1:]])
                    if new not in expanded:
                        expanded.append(new)
                out.extend(expanded)
            else:
                out.append(principal)
        return out

    def expand_aliases(self, values: Sequence[str]) -> list[str]:
        result: list[str] = []
        for value in values:
            result.extend(self.domains if value in self.domains else (value,))
        return list(dict.fromkeys(result))


def _prefix_match(a: str, pattern: str) -> bool:
    return pattern.endswith("*") and a.startswith(pattern[:-1])


def _suffix_match(a: str, pattern: str) -> bool:
    return pattern.startswith("*") and a.endswith(pattern[1:])


def _td_list_match(a: str, domains: Sequence[str]) -> bool:
    return any(
        a == s or s == "*" or _prefix_match(a, s) or _prefix_match(s, a) or _suffix_match(a, s) or _suffix_match(s, a)
        for s in domains
    )


# --- per-field compilation -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompileContext:
    policy_namespace: str
    trust_domains: TrustDomainBundle


def _principals_test(values: Sequence[str]) -> Test:
    preds = [m.istio_string(val, "spiffe://") for val in values]
    return lambda a: any(p(s) for s in a.source_principals for p in preds)


def _principal_regexes(preds: list[m.StrPredicate]) -> Test:
    return lambda a: any(p(s) for s in a.source_principals for p in preds)


def _header_test(name: str, values: Sequence[str], ignore_case: bool = False) -> Test:
    """Envoy's RBAC HeaderMatcher: a name Envoy holds as several entries matches when any one
    entry does (the joined value is never tested), so `notValues` holds only when no entry
    matches. Entries Envoy merged itself (inline headers, HTTP/2 cookies) are one entry."""
    preds = [m.istio_header_value(val, ignore_case) for val in values]

    def test(a: Attributes) -> bool:
        http = a.http
        if http is None:
            return False
        lines = http.lines
        if lines:  # rare: something arrived as more than one entry
            entries = lines.get(name)
            if entries is not None:
                return any(p(e) for e in entries for p in preds)
        h = http.headers.get(name)
        return any(p(h) for p in preds)

    return test


def _ip_test(values: Sequence[str], attr: str) -> Test:
    preds = [m.cidr_matcher(val) for val in values]
    if attr == "source_ip":
        return lambda a: any(p(a.source_ip) for p in preds)
    if attr == "remote_ip":
        return lambda a: any(p(a.remote_ip) for p in preds)
    return lambda a: any(p(a.destination_ip) for p in preds)


def _ports_test(values: Sequence[str]) -> Test:
    ports = frozenset(int(p) for p in values)
    return lambda a: a.destination_port in ports


def _paths_test(values: Sequence[str]) -> Test:
    preds = [m.path_template_matcher(val) if m.contains_path_template(val) else m.istio_string(val) for val in values]

    def test(a: Attributes) -> bool:
        http = a.http
        if http is None:
            return False
        p = http.url_path
        return any(pred(p) for pred in preds)

    return test


def _request_principals_test(values: Sequence[str]) -> Test:
    preds = [m.request_principal_matcher(val) for val in values]

    def test(a: Attributes) -> bool:
        payload = a.jwt_payload
        if payload is None:
            return False
        iss, sub = payload.get("iss"), payload.get("sub")
        return any(p(iss, sub) for p in preds)

    return test


SPACE_DELIMITED_CLAIMS = ("scope", "permission")


def _claim_test(path: Sequence[str], values: Sequence[str]) -> Test:
    match = m.string_or_list_matcher(values)
    path = tuple(path)
    # Istio always has jwt_authn split these top-level claims on spaces; do the same so the
    # result does not depend on how the user's Envoy normalises its metadata.
    split = len(path) == 1 and path[0] in SPACE_DELIMITED_CLAIMS

    def test(a: Attributes) -> bool:
        value = m.metadata_lookup(a.jwt_payload, path)
        if split and isinstance(value, str):
            value = value.split(" ") if " " in value else value
        return match(value)

    return test


def _envoy_filter_test(filter_name: str, key: str, values: Sequence[str]) -> Test:
    match = m.envoy_filter_value_matcher(values)

    def test(a: Attributes) -> bool:
        md = a.filter_metadata.get(filter_name)
        return match(md.get(key) if md is not None else None)

    return test


def _sni_test(values: Sequence[str]) -> Test:
    preds = [m.istio_string(val) for val in values]
    return lambda a: any(p(a.sni) for p in preds)


def _source_tests(ctx: CompileContext, kind: str, values: Sequence[str]) -> tuple[Test, bool]:
    """(test, http_only) for a source field / principal-side `when` key."""
    if kind == "principals":
        return _principals_test(ctx.trust_domains.replace_aliases(values)), False
    if kind == "namespaces":
        return _principal_regexes([m.namespace_matcher(val) for val in values]), False
    if kind == "serviceAccounts":
        return _principal_regexes([m.service_account_matcher(val, ctx.policy_namespace) for val in values]), False
    if kind == "trustDomains":
        return _principal_regexes(
            [m.trust_domain_matcher(val) for val in ctx.trust_domains.expand_aliases(values)]
        ), False
    if kind == "ipBlocks":
        return _ip_test(values, "source_ip"), False
    if kind == "remoteIpBlocks":
        return _ip_test(values, "remote_ip"), False
    if kind == "requestPrincipals":
        return _request_principals_test(values), True
    raise AssertionError(kind)


_SOURCE_FIELDS = (
    # (model attribute, positive alias, negative alias, kind)
    ("principals", "not_principals", "principals"),
    ("request_principals", "not_request_principals", "requestPrincipals"),
    ("namespaces", "not_namespaces", "namespaces"),
    ("service_accounts", "not_service_accounts", "serviceAccounts"),
    ("trust_domains", "not_trust_domains", "trustDomains"),
    ("ip_blocks", "not_ip_blocks", "ipBlocks"),
    ("remote_ip_blocks", "not_remote_ip_blocks", "remoteIpBlocks"),
)

_OPERATION_FIELDS = (
    ("hosts", "not_hosts", "hosts"),
    ("ports", "not_ports", "ports"),
    ("methods", "not_methods", "methods"),
    ("paths", "not_paths", "paths"),
)


def _negate(test: Test) -> Test:
    return lambda a: not test(a)


def _pair(
    field_base: str,
    alias_pos: str,
    alias_neg: str,
    values: Any,
    not_values: Any,
    build: Any,
    reads: frozenset[str] = frozenset(),
) -> list[Check]:
    """Checks for `values` and `notValues` of one field; `build(values) -> (test, http_only)`."""
    checks: list[Check] = []
    if values:
        test, http_only = build(values)
        checks.append(Check(f"{field_base}.{alias_pos}", test, http_only, reads=reads))
    if not_values:
        test, http_only = build(not_values)
        checks.append(Check(f"{field_base}.{alias_neg}", _negate(test), http_only, negated=True, reads=reads))
    return checks


def _header(name: str) -> frozenset[str]:
    return frozenset((HEADER_READ + name,))


_XFF = _header("x-forwarded-for")  # remote.ip is derived from it
_JWT = frozenset((READS_JWT,))
_PEER = frozenset((READS_PEER,))
_SOURCE_READS = {"ipBlocks": _PEER, "remoteIpBlocks": _XFF, "requestPrincipals": _JWT}
_OPERATION_READS = {"hosts": _header(":authority"), "methods": _header(":method"), "paths": _header(":path")}


def _condition_reads(key: str) -> frozenset[str]:
    if key == "remote.ip":
        return _XFF
    if key == "source.ip":
        return _PEER
    if key.startswith("request.auth."):
        return _JWT
    if key.startswith(v.HEADER_PREFIX):
        name = v.parse_bracket_name(key[len(v.HEADER_PREFIX) :])
        return _header(name.lower()) if name is not None else frozenset()
    if key.startswith(v.ENVOY_FILTER_PREFIX):
        return frozenset((READS_METADATA,))
    return frozenset()


def _source_checks(ctx: CompileContext, base: str, src: Source) -> list[Check]:
    checks: list[Check] = []
    for pos, neg, kind in _SOURCE_FIELDS:
        checks += _pair(
            base,
            kind,
            "not" + kind[0].upper() + kind[1:],
            getattr(src, pos),
            getattr(src, neg),
            lambda vals, kind=kind: _source_tests(ctx, kind, vals),
            _SOURCE_READS.get(kind, frozenset()),
        )
    return checks


def _operation_build(kind: str) -> Any:
    def build(values: Sequence[str]) -> tuple[Test, bool]:
        if kind == "hosts":
            return _header_test(":authority", values, ignore_case=True), True
        if kind == "methods":
            return _header_test(":method", values), True
        if kind == "paths":
            return _paths_test(values), True
        return _ports_test(values), False

    return build


def _operation_checks(base: str, op: Operation) -> list[Check]:
    checks: list[Check] = []
    for pos, neg, kind in _OPERATION_FIELDS:
        checks += _pair(
            base,
            kind,
            "not" + kind[0].upper() + kind[1:],
            getattr(op, pos),
            getattr(op, neg),
            _operation_build(kind),
            _OPERATION_READS.get(kind, frozenset()),
        )
    return checks


def _condition_build(ctx: CompileContext, key: str) -> Any:
    def build(values: Sequence[str]) -> tuple[Test, bool]:
        if key == "source.ip":
            return _ip_test(values, "source_ip"), False
        if key == "remote.ip":
            return _ip_test(values, "remote_ip"), False
        if key == "destination.ip":
            return _ip_test(values, "destination_ip"), False
        if key == "destination.port":
            return _ports_test(values), False
        if key == "connection.sni":
            return _sni_test(values), False
        if key == "source.namespace":
            return _source_tests(ctx, "namespaces", values)
        if key == "source.serviceAccount":
            return _source_tests(ctx, "serviceAccounts", values)
        if key == "source.trustDomain":
            return _source_tests(ctx, "trustDomains", values)
        if key == "source.principal":
            return _source_tests(ctx, "principals", values)
        if key == "request.auth.principal":
            return _request_principals_test(values), True
        if key == "request.auth.audiences":
            return _claim_test(("aud",), values), True
        if key == "request.auth.presenter":
            return _claim_test(("azp",), values), True
        if key.startswith(v.HEADER_PREFIX):
            name = v.parse_bracket_name(key[len(v.HEADER_PREFIX) :])
            assert name is not None
            return _header_test(name.lower(), values), True
        if key.startswith(v.CLAIMS_PREFIX):
            path = v.parse_claim_path(key[len(v.CLAIMS_PREFIX) :])
            assert path is not None
            return _claim_test(path, values), True
        if key.startswith(v.ENVOY_FILTER_PREFIX):
            parsed = v.parse_envoy_filter_key(key)
            assert parsed is not None
            return _envoy_filter_test(parsed[0], parsed[1], values), False
        raise AssertionError(f"unvalidated key {key}")

    return build


def _condition_checks(ctx: CompileContext, base: str, cond: Condition) -> list[Check]:
    return _pair(
        f"{base}({cond.key})",
        "values",
        "notValues",
        cond.values,
        cond.not_values,
        _condition_build(ctx, cond.key),
        _condition_reads(cond.key),
    )


# --- policies ----------------------------------------------------------------------


def rule_id(namespace: str, name: str, index: int) -> str:
    return f"ns[{namespace}]-policy[{name}]-rule[{index}]"


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    ref: PolicyRef
    http: tuple[CompiledRule, ...]
    tcp: tuple[CompiledRule, ...]


def _finish(rule: CompiledRule) -> CompiledRule:
    object.__setattr__(rule, "matches", _build_matcher(rule))
    return rule


def _compile_rule(
    ctx: CompileContext, ref: PolicyRef, index: int, rule: Rule
) -> tuple[CompiledRule, CompiledRule | None]:
    """The HTTP form of a rule and its TCP form (None when Istio drops the rule on TCP)."""
    rid = rule_id(ref.namespace, ref.name, index)
    froms = [
        _source_checks(ctx, f"from[{j}].source", f.source)
        for j, f in enumerate(rule.from_ or ())
        if f is not None and f.source is not None
    ]
    tos = [
        _operation_checks(f"to[{j}].operation", t.operation)
        for j, t in enumerate(rule.to or ())
        if t is not None and t.operation is not None
    ]
    whens: list[Check] = []
    for j, cond in enumerate(rule.when or ()):
        if cond is not None:
            whens += _condition_checks(ctx, f"when[{j}]", cond)

    http = _finish(CompiledRule(rid, ref, index, tuple(map(tuple, froms)), tuple(map(tuple, tos)), tuple(whens)))

    uses_http_only = any(c.http_only for group in (*froms, *tos, whens) for c in group)
    if ref.action == Action.ALLOW and uses_http_only:
        return http, None

    def keep(checks: list[Check]) -> tuple[Check, ...]:
        return tuple(c for c in checks if not c.http_only)

    tcp = _finish(
        CompiledRule(rid, ref, index, tuple(keep(f) for f in froms), tuple(keep(t) for t in tos), keep(whens))
    )
    return http, tcp


def compile_policy(policy: AuthorizationPolicy, origin: str, trust_domains: TrustDomainBundle) -> CompiledPolicy:
    namespace = policy.metadata.namespace or ""
    dry_run = v.parse_go_bool(policy.metadata.annotations.get(v.DRY_RUN_ANNOTATION, "false")) or False
    spec = policy.spec
    ref = PolicyRef(
        namespace=namespace,
        name=policy.metadata.name,
        action=spec.action,
        dry_run=dry_run,
        provider=spec.provider.name if spec.action == Action.CUSTOM and spec.provider else None,
        origin=origin,
    )
    ctx = CompileContext(namespace, trust_domains)
    if not spec.rules:
        never = _finish(CompiledRule(rule_id(namespace, ref.name, 0), ref, 0, (), (), (), never=True))
        return CompiledPolicy(ref, (never,), (never,))
    http: list[CompiledRule] = []
    tcp: list[CompiledRule] = []
    for i, rule in enumerate(spec.rules):
        if rule is None:
            continue
        h, t = _compile_rule(ctx, ref, i, rule)
        http.append(h)
        if t is not None:
            tcp.append(t)
    return CompiledPolicy(ref, tuple(http), tuple(tcp))

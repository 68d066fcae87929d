"""The compiled form of everything loaded, built once per change and swapped atomically.

A request reads `holder.current` once and uses that snapshot to the end, so a
reload in the middle of a request can never mix two configurations. Building a
snapshot is pure: the same files and workload always give the same snapshot.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from extproc.authn.keys import parse_jwks
from extproc.authn.program import DEFAULT_JWKS_TIMEOUT_S, AuthnProgram, RuleInput, compile_rules
from extproc.authz.compiler import CompiledPolicy, CompiledRule, TrustDomainBundle, compile_policy
from extproc.authz.engine import AuthzProgram, CustomRuleSet, RuleSet
from extproc.config.errors import ConfigIssue
from extproc.config.models import Action, RequestAuthentication
from extproc.config.providers import HttpProviderSettings, InvalidProvider, ProviderSettings, parse_duration
from extproc.snapshot.loader import LoadedConfig, LoadedPolicy
from extproc.telemetry.directory import PeerDirectory
from extproc.telemetry.overrides import TelemetryPlans, compile_telemetry

GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"


@dataclass(frozen=True, slots=True)
class WorkloadIdentity:
    """Who this extproc instance enforces for: the sidecar's workload."""

    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)
    name: str = ""
    root_namespace: str = "istio-system"
    trust_domain: str = "cluster.local"
    trust_domain_aliases: tuple[str, ...] = ()

    @property
    def trust_domains(self) -> TrustDomainBundle:
        return TrustDomainBundle((self.trust_domain, *self.trust_domain_aliases))


@dataclass(frozen=True, slots=True)
class Options:
    """Evaluation options that are not part of the policies themselves."""

    jwt_payload_key: str = "payload"  # jwt_authn `payload_in_metadata`
    xff_num_trusted_hops: int = 0
    # Istio's PILOT_ENABLE_MULTIPLE_CUSTOM_AUTHZ_PROVIDERS: without it a workload with CUSTOM
    # policies naming different providers denies what those policies match.
    multiple_custom_providers: bool = False


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    workload: WorkloadIdentity
    options: Options
    http: AuthzProgram
    tcp: AuthzProgram
    policies: tuple[CompiledPolicy, ...]  # applicable to this workload
    authn: AuthnProgram  # the applicable RequestAuthentications' jwtRules, compiled
    ignored_policies: tuple[tuple[str, str], ...]  # (namespace/name, why) for /debug
    providers: Mapping[str, ProviderSettings]
    files: tuple[str, ...]
    warnings: tuple[ConfigIssue, ...]
    loaded_at: float
    # Istio's standard metrics after the applicable Telemetry resources' spec.metrics.
    telemetry: TelemetryPlans = field(default_factory=TelemetryPlans.standard)
    # What the request path derives from this snapshot and keeps with it (the decision cache),
    # so it is dropped with the snapshot. Filled on first use, never by the build.
    memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # ext_authz providers with invalid settings, for /debug/config and the reload log.
    invalid_providers: Mapping[str, InvalidProvider] = field(default_factory=dict)
    # The WorkloadEntry and ServiceEntry resources, for the labels of peers that exchange no
    # metadata (telemetry/directory.py). Mesh-wide: any namespace's entries are peers.
    directory: PeerDirectory = field(default_factory=PeerDirectory)


def applies_to(lp: LoadedPolicy, workload: WorkloadIdentity) -> str | None:
    """None if the policy applies to the workload, else why not (Istio's ShouldAttachPolicy)."""
    p = lp.policy
    ns = p.metadata.namespace
    if ns not in (workload.root_namespace, workload.namespace):
        return (
            f"namespace {ns} is neither the workload's ({workload.namespace}) nor the root ({workload.root_namespace})"
        )
    if p.spec.target_ref is not None or p.spec.target_refs:
        return "uses targetRef(s), which a sidecar workload ignores"
    sel = p.spec.selector
    if sel is not None and sel.match_labels:
        for k, v in sel.match_labels.items():
            if workload.labels.get(k) != v:
                return f"selector {k}={v} does not match the workload labels"
    return None


def _program(
    policies: list[CompiledPolicy],
    protocol: str,
    providers: Mapping[str, ProviderSettings],
    options: Options,
    invalid: Mapping[str, InvalidProvider] | None = None,
) -> AuthzProgram:
    def rules_of(p: CompiledPolicy) -> tuple[CompiledRule, ...]:
        return p.http if protocol == "http" else p.tcp

    by_action: dict[Action, list[CompiledPolicy]] = {a: [] for a in Action}
    for p in policies:
        by_action[p.ref.action].append(p)

    def ruleset(action: Action) -> RuleSet:
        ps = by_action[action]
        return RuleSet.build((r for p in ps for r in rules_of(p)), ps)

    custom = CustomRuleSet()
    custom_policies = by_action[Action.CUSTOM]
    if custom_policies:
        names = sorted({p.ref.provider or "" for p in custom_policies})
        if len(names) > 1 and not options.multiple_custom_providers:
            bad = tuple(sorted((r for p in custom_policies for r in rules_of(p)), key=lambda r: r.rule_id))
            custom = CustomRuleSet(
                bad=bad,
                bad_reason=f"several CUSTOM providers ({', '.join(names)}) apply to one workload and "
                "multiple providers are not enabled",
            )
        else:
            groups: list[tuple[str, tuple[CompiledRule, ...]]] = []
            bad_rules: list[CompiledRule] = []
            reasons: list[str] = []
            for name in names:
                rules = tuple(
                    sorted(
                        (r for p in custom_policies if p.ref.provider == name for r in rules_of(p)),
                        key=lambda r: r.rule_id,
                    )
                )
                prov = providers.get(name)
                bad_provider = (invalid or {}).get(name)
                if bad_provider is not None:
                    # istiod's getExtAuthz fails before it looks at the protocol, so an invalid
                    # HTTP provider denies on TCP filter chains too.
                    bad_rules.extend(rules)
                    reasons.append(bad_provider.reason)
                elif prov is None:
                    bad_rules.extend(rules)
                    reasons.append(f"provider {name!r} is not defined in extensionProviders")
                elif protocol == "tcp" and isinstance(prov, HttpProviderSettings):
                    continue  # Istio ignores HTTP providers on TCP filter chains
                else:
                    groups.append((name, rules))
            custom = CustomRuleSet(tuple(groups), tuple(bad_rules), "; ".join(reasons))

    return AuthzProgram(
        custom=custom, audit=ruleset(Action.AUDIT), deny=ruleset(Action.DENY), allow=ruleset(Action.ALLOW)
    )


@dataclass
class BuildMemo:
    """Compiled resources of one LoadedConfig, shared by the snapshots built from it.

    Central mode builds one snapshot per workload from the same loaded config and trust
    domains; a policy or jwtRule compiles to the same thing for each of them, so it is
    compiled once. Keyed by the identity of the loaded resource: valid only while that
    LoadedConfig lives and only for one trust-domain bundle.
    """

    policies: dict[int, CompiledPolicy] = field(default_factory=dict)
    jwt_rules: dict[int, list[RuleInput]] = field(default_factory=dict)

    def policy(self, lp: LoadedPolicy, bundle: TrustDomainBundle) -> CompiledPolicy:
        compiled = self.policies.get(id(lp))
        if compiled is None:
            compiled = self.policies[id(lp)] = compile_policy(lp.policy, lp.origin, bundle)
        return compiled

    def rules(self, lp: LoadedPolicy, ident: str) -> list[RuleInput]:
        out = self.jwt_rules.get(id(lp))
        if out is None:
            out = self.jwt_rules[id(lp)] = jwt_rule_inputs(lp.policy, ident)
        return out


def build_snapshot(
    loaded: LoadedConfig,
    workload: WorkloadIdentity,
    options: Options,
    version: int,
    memo: BuildMemo | None = None,
) -> Snapshot:
    applicable: list[CompiledPolicy] = []
    ignored: list[tuple[str, str]] = []
    bundle = workload.trust_domains
    rules: list[RuleInput] = []
    for lp in loaded.request_authentications:
        why = applies_to(lp, workload)
        ident = f"{lp.policy.metadata.namespace}/{lp.policy.metadata.name}"
        if why is not None:
            ignored.append((f"RequestAuthentication {ident}", why))
            continue
        rules.extend(memo.rules(lp, ident) if memo is not None else jwt_rule_inputs(lp.policy, ident))
    for lp in loaded.policies:
        why = applies_to(lp, workload)
        ident = f"{lp.policy.metadata.namespace}/{lp.policy.metadata.name}"
        if why is not None:
            ignored.append((ident, why))
            continue
        applicable.append(memo.policy(lp, bundle) if memo is not None else compile_policy(lp.policy, lp.origin, bundle))
    return Snapshot(
        version=version,
        workload=workload,
        options=options,
        http=_program(applicable, "http", loaded.providers, options, loaded.invalid_providers),
        tcp=_program(applicable, "tcp", loaded.providers, options, loaded.invalid_providers),
        policies=tuple(applicable),
        authn=compile_rules(rules),
        ignored_policies=tuple(ignored),
        providers=dict(loaded.providers),
        files=tuple(loaded.files),
        warnings=tuple(loaded.warnings),
        loaded_at=time.time(),
        telemetry=compile_telemetry(loaded.telemetries, workload),
        invalid_providers=dict(loaded.invalid_providers),
        directory=directory_of(loaded, workload.trust_domain),
    )


def directory_of(loaded: LoadedConfig, trust_domain: str) -> PeerDirectory:
    return PeerDirectory.build(
        (lp.policy for lp in loaded.workload_entries), (lp.policy for lp in loaded.service_entries), trust_domain
    )


def build_mesh_snapshot(
    loaded: LoadedConfig, root: WorkloadIdentity, options: Options, version: int, memo: BuildMemo | None = None
) -> Snapshot:
    """What any workload of the mesh could use, for central mode's server-wide needs.

    Every RequestAuthentication's jwtRules (so the JWKS of every `jwksUri` is fetched, and
    /debug/jwks lists them all), every AuthorizationPolicy compiled (so a policy that does
    not compile fails the reload, not a request), and the metric plans of the root
    namespace's Telemetry resources (`root`: the root namespace, no labels).

    Its authorization programs deny everything: policies of different workloads must never
    be evaluated together, and central mode evaluates only per-workload snapshots, so a
    mistaken use of this one fails closed.
    """
    memo = memo if memo is not None else BuildMemo()
    bundle = root.trust_domains
    rules: list[RuleInput] = []
    for lp in loaded.request_authentications:
        rules.extend(memo.rules(lp, f"{lp.policy.metadata.namespace}/{lp.policy.metadata.name}"))
    policies = tuple(memo.policy(lp, bundle) for lp in loaded.policies)
    deny_all = AuthzProgram(allow=RuleSet(has_enforced=True))
    return Snapshot(
        version=version,
        workload=root,
        options=options,
        http=deny_all,
        tcp=deny_all,
        policies=policies,
        authn=compile_rules(rules),
        ignored_policies=(),
        providers=dict(loaded.providers),
        files=tuple(loaded.files),
        warnings=tuple(loaded.warnings),
        loaded_at=time.time(),
        telemetry=compile_telemetry(loaded.telemetries, root),
        invalid_providers=dict(loaded.invalid_providers),
        directory=directory_of(loaded, root.trust_domain),
    )


def jwt_rule_inputs(ra: RequestAuthentication, ident: str) -> list[RuleInput]:
    """The validated jwtRules of one RequestAuthentication, in the engine's terms."""
    out = []
    for rule in ra.spec.jwt_rules or ():
        if rule is None:
            continue
        out.append(
            RuleInput(
                origin=ident,
                issuer=rule.issuer,
                audiences=tuple(rule.audiences or ()),
                jwks_uri=rule.jwks_uri,
                inline_keys=parse_jwks(rule.jwks) if rule.jwks else None,
                from_headers=tuple((h.name, h.prefix) for h in rule.from_headers or () if h is not None),
                from_params=tuple(rule.from_params or ()),
                from_cookies=tuple(rule.from_cookies or ()),
                payload_header=rule.output_payload_to_header,
                forward=rule.forward_original_token,
                claim_headers=tuple((c.header, c.claim) for c in rule.output_claim_to_headers or () if c is not None),
                timeout_s=parse_duration(rule.timeout) if rule.timeout else DEFAULT_JWKS_TIMEOUT_S,
                space_delimited=tuple(rule.space_delimited_claims) if rule.space_delimited_claims is not None else None,
                required=rule.presence == "REQUIRED",
            )
        )
    return out

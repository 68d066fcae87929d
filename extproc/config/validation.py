"""Istio's semantic validation of the resources extproc reads, with the offending field named.

The rules follow istio/istio pkg/config/validation (ValidateAuthorizationPolicy,
ValidateRequestAuthentication, ValidateWorkloadEntry, ValidateServiceEntry),
pkg/config/validation/agent, pkg/config/security (ValidateAttribute and friends) and the
rules istio/api writes into the CRDs (OpenAPI limits and CEL `x-kubernetes-validations`),
which the API server enforces before the webhook sees a resource. Where Istio accepts a value that
its own generator later rejects at push time (a malformed `request.headers` key, for
example), we reject it here instead: a user should learn about it when the file is
loaded, not by a silently dropped rule.
"""

from __future__ import annotations

import ipaddress
import json
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from extproc.authn.keys import parse_jwks
from extproc.authn.status import JwksError
from extproc.config.models import (
    Action,
    AuthorizationPolicy,
    Condition,
    JwtRule,
    Location,
    Operation,
    PolicyTargetReference,
    RequestAuthentication,
    Resolution,
    ServiceEntry,
    Source,
    WorkloadEntry,
    WorkloadEntrySpec,
)
from extproc.config.providers import parse_duration

Path = tuple[str | int, ...]

MATCH_ONE_TEMPLATE = "{*}"
MATCH_ANY_TEMPLATE = "{**}"
_VALID_TEMPLATE_LITERAL = re.compile(r"^[a-zA-Z0-9\-._~%!$&'()+,;:@=]+$")
DRY_RUN_ANNOTATION = "istio.io/dry-run"


@dataclass(frozen=True, slots=True)
class Problem:
    path: Path
    message: str
    warning: bool = False


# --- `when` keys ----------------------------------------------------------------------

PRINCIPAL_KEYS = {
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.serviceAccount",
    "source.principal",
    "source.trustDomain",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
}
PERMISSION_KEYS = {"destination.ip", "destination.port", "connection.sni"}
HEADER_PREFIX = "request.headers"
CLAIMS_PREFIX = "request.auth.claims"
ENVOY_FILTER_PREFIX = "experimental.envoy.filters."


def parse_bracket_name(rest: str) -> str | None:
    """`[Name]` -> `Name`; None when the key is not of that form."""
    if len(rest) >= 3 and rest[0] == "[" and rest[-1] == "]" and "[" not in rest[1:-1] and "]" not in rest[1:-1]:
        return rest[1:-1]
    return None


def parse_claim_path(rest: str) -> list[str] | None:
    """`[a][b.c]` -> ["a", "b.c"]: nested claims, dots inside brackets are literal."""
    names: list[str] = []
    i = 0
    while i < len(rest):
        if rest[i] != "[":
            return None
        end = rest.find("]", i + 1)
        if end == -1 or "[" in rest[i + 1 : end] or end == i + 1:
            return None
        names.append(rest[i + 1 : end])
        i = end + 1
    return names or None


def parse_envoy_filter_key(key: str) -> tuple[str, str] | None:
    """`experimental.envoy.filters.a.b[c]` -> ("envoy.filters.a.b", "c")."""
    body = key[len("experimental.") :]
    open_ = body.find("[")
    if open_ <= len("envoy.filters.") or not body.endswith("]"):
        return None
    name = body[open_ + 1 : -1]
    if not name:
        return None
    return body[:open_], name


def when_key_problem(key: str) -> str | None:
    """None if `key` is a supported condition key, else why not."""
    if key in PRINCIPAL_KEYS or key in PERMISSION_KEYS:
        return None
    if key.startswith(HEADER_PREFIX):
        if parse_bracket_name(key[len(HEADER_PREFIX) :]) is None:
            return f"bad key ({key}): should have format request.headers[<name>]"
        return None
    if key.startswith(CLAIMS_PREFIX):
        if parse_claim_path(key[len(CLAIMS_PREFIX) :]) is None:
            return f"bad key ({key}): should have format request.auth.claims[<name>] or nested [<a>][<b>]"
        return None
    if key.startswith(ENVOY_FILTER_PREFIX):
        if parse_envoy_filter_key(key) is None:
            return f"bad key ({key}): should have format experimental.envoy.filters.<filter>[<key>]"
        return None
    if key == "destination.namespace":
        return f"attribute {key} is replaced by the metadata.namespace"
    if key.startswith("destination.labels"):
        return f"attribute {key} is replaced by the workload selector"
    if key in ("destination.name", "destination.user"):
        return f"deprecated attribute {key}: only supported in v1alpha1"
    return f"unknown attribute: {key}"


# --- value checks -------------------------------------------------------------------


def _empty_values(path: Path, values: list[str] | None) -> Iterable[Problem]:
    for i, v in enumerate(values or ()):
        if v == "":
            yield Problem((*path, i), "empty value not allowed")


def ip_problem(value: str) -> str | None:
    try:
        if "/" in value:
            ipaddress.ip_network(value, strict=False)
            # Go's netip.ParsePrefix rejects IPv4-mapped/zoned forms; ipaddress is close enough,
            # but it accepts a netmask (a.b.c.d/255.0.0.0) which Istio does not.
            prefix = value.split("/", 1)[1]
            if not prefix.isdigit():
                return f"bad CIDR range ({value})"
        else:
            ipaddress.ip_address(value)
    except ValueError:
        return f"bad CIDR range ({value})" if "/" in value else f"bad IP address ({value})"
    return None


_ASCII_DIGITS = re.compile(r"^[0-9]+$")


def port_problem(value: str) -> str | None:
    # Go's ParseUint: ASCII digits only (str.isdigit would let "²" through to int() and crash)
    if not _ASCII_DIGITS.match(value) or int(value) > 65535:
        return f"bad port ({value})"
    return None


def _ips(path: Path, values: list[str] | None) -> Iterable[Problem]:
    for i, v in enumerate(values or ()):
        if v != "" and (msg := ip_problem(v)):
            yield Problem((*path, i), msg)


def _ports(path: Path, values: list[str] | None) -> Iterable[Problem]:
    for i, v in enumerate(values or ()):
        if v != "" and (msg := port_problem(v)):
            yield Problem((*path, i), msg)


def _wildcards(path: Path, values: list[str] | None) -> Iterable[Problem]:
    for i, v in enumerate(values or ()):
        n = v.count("*")
        if n > 1:
            yield Problem((*path, i), f"at most one wildcard is allowed: {v!r}")
        elif n == 1 and v != "*" and not (v.startswith("*") or v.endswith("*")):
            yield Problem((*path, i), f"wildcard is only allowed at the start or end: {v!r}")


def _trust_domains(path: Path, values: list[str] | None) -> Iterable[Problem]:
    yield from _wildcards(path, values)
    for i, v in enumerate(values or ()):
        if "/" in v:
            yield Problem((*path, i), f"trust domain must not contain '/': {v!r}")


def _service_accounts(path: Path, values: list[str] | None) -> Iterable[Problem]:
    values = values or []
    if len(values) > 16:
        yield Problem(path, "may not have more than 16 values")
    for i, v in enumerate(values):
        p = (*path, i)
        if v == "":
            continue  # reported by _empty_values
        if "*" in v:
            yield Problem(p, "wildcard not allowed")
        elif v.count("/") > 1:
            yield Problem(p, f"expected format 'serviceAccount' or 'namespace/serviceAccount', found {v!r}")
        elif len(v) > 320:
            yield Problem(p, "value cannot exceed 320 characters")
        elif "/" in v:
            ns, sa = v.split("/", 1)
            if not ns:
                yield Problem(p, f"expected format 'namespace/serviceAccount', found empty namespace in {v!r}")
            elif not sa:
                yield Problem(p, f"expected format 'namespace/serviceAccount', found empty serviceAccount in {v!r}")


def _path_templates(path: Path, values: list[str] | None) -> Iterable[Problem]:
    for i, raw in enumerate(values or ()):
        has_template = MATCH_ONE_TEMPLATE in raw or MATCH_ANY_TEMPLATE in raw
        seen_any = False
        for glob in raw.strip("/").split("/"):
            if glob in (MATCH_ONE_TEMPLATE, MATCH_ANY_TEMPLATE):
                if seen_any:
                    yield Problem((*path, i), f"invalid or unsupported path {raw!r}: {{**}} is not the last operator")
                    break
                seen_any = glob == MATCH_ANY_TEMPLATE
                continue
            if "{" in glob or "}" in glob:
                yield Problem(
                    (*path, i),
                    f"invalid or unsupported path {raw!r}: contains '{{' or '}}' beyond a supported path template",
                )
                break
            if has_template and not _VALID_TEMPLATE_LITERAL.match(glob):
                yield Problem(
                    (*path, i), f"invalid or unsupported path {raw!r}: segment {glob!r} is not a valid literal"
                )
                break


def _condition_values(path: Path, key: str, values: list[str] | None) -> Iterable[Problem]:
    if not values:
        return
    yield from _empty_values(path, values)
    if key in ("source.ip", "remote.ip", "destination.ip"):
        yield from _ips(path, values)
    elif key == "destination.port":
        yield from _ports(path, values)
    elif key == "source.serviceAccount":
        yield from _service_accounts(path, values)
    elif key == "source.trustDomain":
        yield from _wildcards(path, values)


# --- the policy ---------------------------------------------------------------------


def _source(path: Path, rule_index: int, src: Source) -> Iterable[Problem]:
    has_sa = bool(src.service_accounts or src.not_service_accounts)
    if has_sa and (src.principals or src.not_principals or src.namespaces or src.not_namespaces):
        yield Problem(path, "cannot set serviceAccounts with namespaces or principals")
    if not any(getattr(src, f) for f in Source.model_fields):
        yield Problem(path, f"`from.source` must not be empty, found at rule {rule_index}")
    for field in (
        "principals",
        "not_principals",
        "request_principals",
        "not_request_principals",
        "namespaces",
        "not_namespaces",
        "ip_blocks",
        "not_ip_blocks",
        "remote_ip_blocks",
        "not_remote_ip_blocks",
        "service_accounts",
        "not_service_accounts",
        "trust_domains",
        "not_trust_domains",
    ):
        yield from _empty_values((*path, _alias(Source, field)), getattr(src, field))
    for field in ("ip_blocks", "not_ip_blocks", "remote_ip_blocks", "not_remote_ip_blocks"):
        yield from _ips((*path, _alias(Source, field)), getattr(src, field))
    yield from _service_accounts((*path, "serviceAccounts"), src.service_accounts)
    yield from _service_accounts((*path, "notServiceAccounts"), src.not_service_accounts)
    yield from _trust_domains((*path, "trustDomains"), src.trust_domains)
    yield from _trust_domains((*path, "notTrustDomains"), src.not_trust_domains)


def _operation(path: Path, rule_index: int, op: Operation) -> Iterable[Problem]:
    if not any(getattr(op, f) for f in Operation.model_fields):
        yield Problem(path, f"`to.operation` must not be empty, found at rule {rule_index}")
    for field in Operation.model_fields:
        yield from _empty_values((*path, _alias(Operation, field)), getattr(op, field))
    yield from _ports((*path, "ports"), op.ports)
    yield from _ports((*path, "notPorts"), op.not_ports)
    yield from _path_templates((*path, "paths"), op.paths)
    yield from _path_templates((*path, "notPaths"), op.not_paths)


def _condition(path: Path, cond: Condition) -> Iterable[Problem]:
    if cond.key == "":
        yield Problem((*path, "key"), "`key` must not be empty")
        return
    if (msg := when_key_problem(cond.key)) is not None:
        yield Problem((*path, "key"), msg)
        return
    if not cond.values and not cond.not_values:
        yield Problem(path, f"at least one of `values` or `notValues` must be set for key {cond.key}")
        return
    yield from _condition_values((*path, "values"), cond.key, cond.values)
    yield from _condition_values((*path, "notValues"), cond.key, cond.not_values)


_CUSTOM_FORBIDDEN_SOURCE = (
    "namespaces",
    "not_namespaces",
    "service_accounts",
    "not_service_accounts",
    "trust_domains",
    "not_trust_domains",
    "principals",
    "not_principals",
    "request_principals",
    "not_request_principals",
)
_CUSTOM_FORBIDDEN_KEYS = ("source.namespace", "source.serviceAccount", "source.trustDomain", "source.principal")


# --- metadata, selector and targetRef (shared by every kind Istio validates) ----------

# Annotations Istio's webhook refuses on any resource (pkg/config/constants): internal
# ones that would escalate privileges, and the one that makes the webhook reject on purpose.
REJECTED_ANNOTATIONS = {
    "internal.istio.io/webhook-always-reject": "annotation found, rejecting",
    "internal.istio.io/parent-namespace": "annotation found, this may not be set by users",
    "internal.istio.io/parents": "annotation found, this may not be set by users",
}


def metadata_problems(annotations: Mapping[str, str], action: Action | None) -> Iterable[Problem]:
    """Istio's validateMetadata, which wraps every validation function: the dry-run annotation
    is allowed only on an AuthorizationPolicy (`action` is None for any other kind), and then
    only with ALLOW or DENY and a Go boolean value."""
    ap: Path = ("metadata", "annotations")
    dry_run = annotations.get(DRY_RUN_ANNOTATION)
    if dry_run is not None:
        if action is None:
            yield Problem((*ap, DRY_RUN_ANNOTATION), f"unsupported annotation {DRY_RUN_ANNOTATION}, please remove it")
        elif action not in (Action.ALLOW, Action.DENY):
            yield Problem(
                (*ap, DRY_RUN_ANNOTATION),
                f"the annotation {DRY_RUN_ANNOTATION} only supports action ALLOW/DENY, found {action}",
            )
        elif parse_go_bool(dry_run) is None:
            yield Problem((*ap, DRY_RUN_ANNOTATION), f"invalid value ({dry_run}): not a boolean")
    for name, why in REJECTED_ANNOTATIONS.items():
        if name in annotations:
            yield Problem((*ap, name), why)


# The kinds a targetRef may name (Istio's allowedTargetRefs), by (canonical group, kind);
# an empty group is the core group.
ALLOWED_TARGET_KINDS = frozenset(
    {
        ("core", "Service"),
        ("networking.istio.io", "ServiceEntry"),
        ("gateway.networking.k8s.io", "Gateway"),
        ("gateway.networking.k8s.io", "GatewayClass"),
    }
)
_GROUP = re.compile(r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_KIND = re.compile(r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$")


def target_ref_problems(path: Path, ref: PolicyTargetReference) -> Iterable[Problem]:
    """The CRD's rules for a PolicyTargetReference plus Istio's validatePolicyTargetReference."""
    if len(ref.group) > 253 or not _GROUP.match(ref.group):
        yield Problem((*path, "group"), f"invalid group {ref.group!r}: must be a DNS subdomain of at most 253 chars")
    if not ref.kind or len(ref.kind) > 63 or not _KIND.match(ref.kind):
        yield Problem((*path, "kind"), f"invalid kind {ref.kind!r}: must match [a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?")
    if not ref.name:
        yield Problem((*path, "name"), "targetRef name must be set")
    elif len(ref.name) > 253:
        yield Problem((*path, "name"), "must be at most 253 characters")
    if ref.namespace:
        yield Problem(
            (*path, "namespace"), "targetRef namespace must not be set; cross namespace referencing is not supported"
        )
    if (ref.group or "core", ref.kind) not in ALLOWED_TARGET_KINDS:
        allowed = ", ".join(f"{g}/{k}" for g, k in sorted(ALLOWED_TARGET_KINDS))
        yield Problem(path, f"targetRef must be to one of {allowed} but was {ref.group}/{ref.kind}")


def target_ref_ignored(spec: Any, problems: list[Problem]) -> Iterable[Problem]:
    """The warning for a valid targetRef: Istio accepts it, but it selects Gateways and
    waypoints, so the resource applies to no sidecar workload, which is what extproc serves."""
    if (spec.target_ref is not None or spec.target_refs is not None) and not any(not p.warning for p in problems):
        yield Problem(
            ("spec", "targetRef" if spec.target_ref is not None else "targetRefs"),
            "ignored: targetRef(s) select Gateways and waypoints, never a sidecar workload, "
            "so extproc applies this resource to no workload",
            warning=True,
        )


def selector_problems(spec: Any) -> Iterable[Problem]:
    """Istio's validateOneOfSelectorType, validateWorkloadSelector and the targetRef checks,
    with the CRD's limits on labels; shared by every kind that has a selector."""
    set_count = sum(1 for x in (spec.selector, spec.target_ref, spec.target_refs) if x is not None)
    if set_count > 1:
        yield Problem(("spec",), "only one of targetRefs or workloadSelector can be set")
    if spec.selector is not None:
        labels = spec.selector.match_labels or {}
        if len(labels) > 4096:
            yield Problem(("spec", "selector", "matchLabels"), "may not have more than 4096 labels")
        for k, v in labels.items():
            if k == "":
                yield Problem(("spec", "selector", "matchLabels"), f"empty key is not supported in selector: {k}={v}")
            if "*" in k or "*" in v:
                yield Problem(("spec", "selector", "matchLabels", k), f"wildcard is not supported in selector: {k}={v}")
            if len(v) > 63:
                yield Problem(("spec", "selector", "matchLabels", k), "label value may not exceed 63 characters")
        if not labels:
            yield Problem(("spec", "selector"), "workload selector specified without labels", warning=True)
    if spec.target_ref is not None:
        yield from target_ref_problems(("spec", "targetRef"), spec.target_ref)
    for i, ref in enumerate(spec.target_refs or ()):
        yield from target_ref_problems(("spec", "targetRefs", i), ref)


def validate_authorization_policy(policy: AuthorizationPolicy) -> list[Problem]:
    spec = policy.spec
    problems: list[Problem] = []
    add = problems.append

    problems.extend(metadata_problems(policy.metadata.annotations, spec.action))
    problems.extend(selector_problems(spec))
    problems.extend(target_ref_ignored(spec, problems))

    rules = spec.rules
    if spec.action == Action.CUSTOM:
        if not rules:
            add(
                Problem(
                    ("spec", "rules"),
                    "CUSTOM action without `rules` is meaningless as it will never be triggered, "
                    "add an empty rule `{}` if you want it be triggered for every request",
                )
            )
        elif spec.provider is None or not spec.provider.name:
            add(Problem(("spec", "provider", "name"), "`provider.name` must not be empty"))
        for i, rule in enumerate(rules or ()):
            if rule is None:
                continue
            for j, frm in enumerate(rule.from_ or ()):
                if frm is None or frm.source is None:
                    continue
                for field in _CUSTOM_FORBIDDEN_SOURCE:
                    if getattr(frm.source, field):
                        add(
                            Problem(
                                ("spec", "rules", i, "from", j, "source", _alias(Source, field)),
                                "is currently not supported with CUSTOM action",
                            )
                        )
            for j, cond in enumerate(rule.when or ()):
                if cond is None:
                    continue
                if cond.key in _CUSTOM_FORBIDDEN_KEYS or cond.key.startswith("request.auth."):
                    add(
                        Problem(
                            ("spec", "rules", i, "when", j, "key"),
                            f"{cond.key} is currently not supported with CUSTOM action",
                        )
                    )
    if spec.provider is not None and spec.action != Action.CUSTOM:
        add(Problem(("spec", "provider"), f"`provider` must not be with non CUSTOM action, found {spec.action}"))
    if spec.action == Action.DENY and not rules:
        add(
            Problem(
                ("spec", "rules"),
                "DENY action without `rules` is meaningless as it will never be triggered, "
                "add an empty rule `{}` if you want it be triggered for every request",
            )
        )

    for i, rule in enumerate(rules or ()):
        rp: Path = ("spec", "rules", i)
        if rule is None:
            add(Problem(rp, f"`rule` must not be nil, found at rule {i}"))
            continue
        if rule.from_ is not None and len(rule.from_) == 0:
            add(Problem((*rp, "from"), f"`from` must not be empty, found at rule {i}"))
        tcp_in_from = tcp_in_to = from_exist = to_exist = False
        for j, frm in enumerate(rule.from_ or ()):
            fp: Path = (*rp, "from", j)
            if frm is None:
                add(Problem(fp, f"`from` must not be nil, found at rule {i}"))
                continue
            if frm.source is None:
                add(Problem((*fp, "source"), f"`from.source` must not be nil, found at rule {i}"))
                continue
            from_exist = True
            problems.extend(_source((*fp, "source"), i, frm.source))
            s = frm.source
            if any(
                x is not None
                for x in (
                    s.principals,
                    s.not_principals,
                    s.ip_blocks,
                    s.not_ip_blocks,
                    s.namespaces,
                    s.not_namespaces,
                    s.remote_ip_blocks,
                    s.not_remote_ip_blocks,
                    s.service_accounts,
                    s.not_service_accounts,
                )
            ):
                tcp_in_from = True
        if rule.to is not None and len(rule.to) == 0:
            add(Problem((*rp, "to"), f"`to` must not be empty, found at rule {i}"))
        for j, to in enumerate(rule.to or ()):
            tp: Path = (*rp, "to", j)
            if to is None:
                add(Problem(tp, f"`to` must not be nil, found at rule {i}"))
                continue
            if to.operation is None:
                add(Problem((*tp, "operation"), f"`to.operation` must not be nil, found at rule {i}"))
                continue
            to_exist = True
            problems.extend(_operation((*tp, "operation"), i, to.operation))
            if to.operation.ports is not None or to.operation.not_ports is not None:
                tcp_in_to = True
        for j, cond in enumerate(rule.when or ()):
            wp: Path = (*rp, "when", j)
            if cond is None:
                add(Problem(wp, "when field cannot be nil"))
                continue
            problems.extend(_condition(wp, cond))
        if spec.action == Action.DENY and (
            (from_exist and not to_exist and not tcp_in_from) or (to_exist and not tcp_in_to)
        ):
            add(
                Problem(
                    rp,
                    "configured AuthorizationPolicy will deny all traffic to TCP ports under its scope due to "
                    "the use of only HTTP attributes in a DENY rule; it is recommended to explicitly specify the port",
                    warning=True,
                )
            )
    return problems


def parse_go_bool(value: str) -> bool | None:
    """strconv.ParseBool, which Istio uses for the dry-run annotation."""
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None


def _alias(model: type, field: str) -> str:
    info = model.model_fields[field]  # type: ignore[attr-defined]
    return info.alias or field


# --- RequestAuthentication (Istio's ValidateRequestAuthentication plus the CRD's rules) ---

_STRICT_HEADER_NAME = re.compile(r"^[-_A-Za-z0-9]+$")
JWT_PRESENCE = ("OPTIONAL", "REQUIRED")


def _jwks_uri_problem(uri: str) -> str | None:
    if len(uri) > 2048:
        return "must be at most 2048 characters"
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme not in ("http", "https"):
        return f"URI scheme {parsed.scheme!r} is not supported: url must have scheme http:// or https://"
    try:
        parsed.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        return f"invalid port: {e}"
    return None


def _duration_problem(text: str) -> str | None:
    try:
        seconds = parse_duration(text)
    except ValueError as e:
        return str(e)
    ms = seconds * 1000
    if ms < 1:
        return "duration must be greater than 1ms"
    if abs(ms - round(ms)) > 1e-6:
        return "only durations to ms precision are supported"
    return None


def _jwt_rule(path: Path, rule: JwtRule) -> Iterable[Problem]:
    given = rule.model_fields_set
    if "issuer" in given and not rule.issuer:
        yield Problem((*path, "issuer"), "issuer must be a non-empty string when set")
    if "jwks_uri" in given and not rule.jwks_uri:
        yield Problem((*path, "jwksUri"), "jwksUri must be a non-empty string when set")
    if not rule.issuer and not rule.jwks_uri:
        # Istio's validateJwtRule: a rule needs at least one of them. With only a jwksUri,
        # tokens of any issuer are verified against its keys (Envoy checks no `iss`).
        yield Problem(path, "issuer or jwksUri must be non-empty string")
    if rule.presence is not None and rule.presence not in JWT_PRESENCE:
        yield Problem((*path, "presence"), f"unsupported value {rule.presence!r}: one of {', '.join(JWT_PRESENCE)}")
    for i, aud in enumerate(rule.audiences or ()):
        if not aud:
            yield Problem((*path, "audiences", i), "audience must be non-empty string")
    if "jwks" in given and "jwks_uri" in given:
        yield Problem(path, "only one of jwks or jwksUri can be set")
    if rule.jwks_uri and (msg := _jwks_uri_problem(rule.jwks_uri)) is not None:
        yield Problem((*path, "jwksUri"), msg)
    elif rule.jwks_uri and not rule.jwks and not urllib.parse.urlsplit(rule.jwks_uri).hostname:
        yield Problem(
            (*path, "jwksUri"),
            "has no host: no keys can be fetched, so every token for this rule will be rejected (as in Istio)",
            warning=True,
        )
    if rule.jwks:
        try:
            parse_jwks(rule.jwks)
        except JwksError as e:
            yield Problem((*path, "jwks"), f"jwks parse error: {e}")
        else:
            if _has_private_material(rule.jwks):
                yield Problem(
                    (*path, "jwks"),
                    "jwks contains private key material; only public keys are used for verification",
                    warning=True,
                )
    for i, loc in enumerate(rule.from_headers or ()):
        if loc is None:
            yield Problem((*path, "fromHeaders", i), "location header name must be non-null")
        elif not loc.name:
            yield Problem((*path, "fromHeaders", i, "name"), "location header name must be non-empty string")
    for i, q in enumerate(rule.from_params or ()):
        if not q:
            yield Problem((*path, "fromParams", i), "location query must be non-empty string")
    for i, c in enumerate(rule.from_cookies or ()):
        if not c:
            yield Problem((*path, "fromCookies", i), "cookie name must be non-empty string")
    seen_headers: set[str] = set()
    for i, ch in enumerate(rule.output_claim_to_headers or ()):
        here = (*path, "outputClaimToHeaders", i)
        if ch is None:
            yield Problem(here, "outputClaimToHeaders must not be null")
            continue
        if not ch.claim or not ch.header:
            yield Problem(here, "outputClaimToHeaders header and claim value must be non-empty string")
            continue
        if not _STRICT_HEADER_NAME.match(ch.header):
            yield Problem((*here, "header"), f"header name {ch.header} is not a valid header name")
        elif ch.header.lower() in seen_headers:
            yield Problem((*here, "header"), f"header {ch.header} is already used by another claim", warning=True)
        seen_headers.add(ch.header.lower())
    if rule.output_payload_to_header and not _STRICT_HEADER_NAME.match(rule.output_payload_to_header):
        yield Problem(
            (*path, "outputPayloadToHeader"), f"header name {rule.output_payload_to_header} is not a valid header name"
        )
    if rule.timeout is not None and (msg := _duration_problem(rule.timeout)) is not None:
        yield Problem((*path, "timeout"), msg)
    for i, c in enumerate(rule.space_delimited_claims or ()):
        if not c:
            yield Problem((*path, "spaceDelimitedClaims", i), "claim name must be non-empty string")


def _has_private_material(jwks_text: str) -> bool:
    try:
        doc = json.loads(jwks_text)
    except ValueError:
        return False
    keys = doc.get("keys") if isinstance(doc, dict) else None
    return any(
        isinstance(k, dict) and (k.get("kty") == "oct" or any(f in k for f in ("d", "p", "q", "dp", "dq", "qi")))
        for k in keys or ()
    )


def validate_request_authentication(ra: RequestAuthentication) -> list[Problem]:
    problems = list(metadata_problems(ra.metadata.annotations, None))
    problems.extend(selector_problems(ra.spec))
    problems.extend(target_ref_ignored(ra.spec, problems))
    for i, rule in enumerate(ra.spec.jwt_rules or ()):
        if rule is None:
            # The CRD: "spec.jwtRules[i] in body must be of type object".
            problems.append(Problem(("spec", "jwtRules", i), "a jwtRule must be an object, not null"))
        else:
            problems.extend(_jwt_rule(("spec", "jwtRules", i), rule))
    return problems


# --- WorkloadEntry and ServiceEntry --------------------------------------------------
#
# istio/istio pkg/config/validation/validation.go (ValidateWorkloadEntry, validateWorkloadEntry,
# ValidateServiceEntry, validateExportTo, ValidateAlphaWorkloadSelector, ValidatePortName,
# ValidateProtocol, ValidateUnixAddress), pkg/config/validation/agent/validation.go (ValidateFQDN,
# ValidateWildcardDomain, ValidatePartialWildCard, ValidateIPSubnet, ValidatePort),
# pkg/config/labels/instance.go, pkg/config/protocol/instance.go and
# pkg/config/visibility/visibility.go; with the CRD's limits and CEL rules from istio/api
# networking/v1alpha3/workload_entry.proto and service_entry.proto.

UNIX_ADDRESS_PREFIX = "unix://"
UINT32_MAX = 2**32 - 1
_DNS1123_LABEL_FMT = r"[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?"
_DNS1123_LABEL = re.compile(_DNS1123_LABEL_FMT)
_WILDCARD_DNS1123_LABEL = re.compile(rf"\*|(?:\*|\*-)?{_DNS1123_LABEL_FMT}")
_QUALIFIED_NAME_FMT = r"(?:[A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_LABEL_KEY = re.compile(rf"(?:({_DNS1123_LABEL_FMT}(?:\.{_DNS1123_LABEL_FMT})*)/)?({_QUALIFIED_NAME_FMT})")
_LABEL_VALUE = re.compile(rf"(?:{_QUALIFIED_NAME_FMT})?")
_GO_INT = re.compile(r"[+-]?[0-9]+")
_PREFIX_BITS = re.compile(r"0|[1-9][0-9]*")

# Istio's protocol.Parse: case-insensitive; "" (sniffed) is allowed separately.
_PROTOCOL_NAMES = (
    "TCP",
    "UDP",
    "GRPC",
    "GRPC-Web",
    "HTTP",
    "HTTP_PROXY",
    "HTTP2",
    "HTTPS",
    "TLS",
    "Mongo",
    "Redis",
    "MySQL",
)
PROTOCOLS = {p.lower(): p for p in _PROTOCOL_NAMES}
_TCP_PROTOCOLS = {"TCP", "HTTPS", "TLS", "Mongo", "Redis", "MySQL"}
_HTTP_PROTOCOLS = {"HTTP", "HTTP2", "HTTP_PROXY", "GRPC", "GRPC-Web"}
_TLS_PROTOCOLS = {"HTTPS", "TLS"}
_DYNAMIC_DNS_PROTOCOLS = {"HTTP", "TLS", "GRPC", "HTTP2"}

AUTOALLOCATE_LABEL = "networking.istio.io/enable-autoallocate-ip"
USE_WAYPOINT_LABEL = "istio.io/use-waypoint"


def is_dns1123_label(value: str) -> bool:
    return len(value) <= 63 and _DNS1123_LABEL.fullmatch(value) is not None


def is_ip_address(value: str) -> bool:
    """Go's netip.ParseAddr: IPv4 (no leading zeros) or IPv6, optionally with a zone."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _go_atoi_ok(value: str) -> bool:
    return _GO_INT.fullmatch(value) is not None and -(2**63) <= int(value) < 2**63


def _dns1123_labels_problem(domain: str) -> str | None:
    parts = domain.split(".")
    if _go_atoi_ok(parts[-1]):
        return f"domain name {domain!r} invalid (top level domain {parts[-1]!r} cannot be all-numeric)"
    for i, label in enumerate(parts):
        if i == len(parts) - 1 and label == "":
            return None  # a trailing dot, as in `istio.io.`
        if not is_dns1123_label(label):
            return f"domain name {domain!r} invalid (label {label!r} invalid)"
    return None


def _dns1123_preconditions(name: str) -> str | None:
    if len(name) > 255:
        return f"domain name {name!r} too long (max 255)"
    if not name:
        return "empty domain name not allowed"
    return None


def fqdn_problem(name: str) -> str | None:
    """Istio's agent.ValidateFQDN: DNS-1123 labels, no wildcard, a TLD that is not all digits."""
    return _dns1123_preconditions(name) or _dns1123_labels_problem(name)


def wildcard_domain_problem(domain: str) -> str | None:
    """Istio's agent.ValidateWildcardDomain: an FQDN whose first label may be `*`, `*x` or `*-x`."""
    if msg := _dns1123_preconditions(domain):
        return msg
    first, dot, rest = domain.partition(".")
    if len(first) > 63 or not _WILDCARD_DNS1123_LABEL.fullmatch(first):
        return f"domain name {domain!r} invalid (label {first!r} invalid)"
    return _dns1123_labels_problem(rest) if dot else None


def ip_subnet_problem(value: str) -> str | None:
    """Istio's agent.ValidateIPSubnet: an IP, or a CIDR block as Go's netip.ParsePrefix reads it."""
    if value.count("/") == 1:
        addr, bits = value.split("/")
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            ip = None
        if ip is None or "%" in addr or not _PREFIX_BITS.fullmatch(bits) or int(bits) > ip.max_prefixlen:
            return f"{value} is not a valid CIDR block"
        return None
    if not is_ip_address(value):
        return f"{value} is not a valid IP"
    return None


def unix_address_problem(path: str) -> str | None:
    """Istio's ValidateUnixAddress, on what follows `unix://`."""
    if not path:
        return "unix address must not be empty"
    if path.startswith("@"):
        return None  # an abstract socket
    if not path.startswith("/") or path.endswith("/"):
        return f"{path} is not an absolute path to a file"
    return None


def port_number_problem(port: int) -> str | None:
    if 1 <= port <= 65535:
        return None
    return f"port number {port} must be in the range 1..65535"


def port_name_problem(name: str) -> str | None:
    """Istio's ValidatePortName (a DNS-1123 label) and the CRD's rule, which wants fewer than 63 characters."""
    if not is_dns1123_label(name):
        return f"invalid port name {name!r}: must be a DNS-1123 label (letters, digits and '-')"
    if len(name) >= 63:
        return f"invalid port name {name!r}: must be shorter than 63 characters"
    return None


def parse_protocol(value: str) -> str | None:
    return PROTOCOLS.get(value.lower())


def label_problems(path: Path, labels: Mapping[str, str] | None) -> Iterable[Problem]:
    """Istio's labels.Instance.Validate: Kubernetes label keys, values of the label alphabet."""
    for key, value in (labels or {}).items():
        m = _LABEL_KEY.fullmatch(key)
        if m is None:
            yield Problem(
                (*path, key),
                f"invalid label key {key!r}: must be a name of letters, digits, '-', '_' and '.', "
                "starting and ending with a letter or digit, with an optional DNS prefix and '/'",
            )
        elif m.group(1) is not None and len(m.group(1)) > 253:
            yield Problem((*path, key), f"invalid label key {key!r}: the DNS prefix is longer than 253 characters")
        elif len(m.group(2)) > 63:
            yield Problem((*path, key), f"invalid label key {key!r}: the name is longer than 63 characters")
        if not _LABEL_VALUE.fullmatch(value):
            yield Problem(
                (*path, key),
                f"invalid label value {value!r}: letters, digits, '-', '_' and '.', "
                "starting and ending with a letter or digit",
            )


def _too_long(path: Path, value: str, limit: int) -> Iterable[Problem]:
    if len(value) > limit:
        yield Problem(path, f"must be at most {limit} characters, got {len(value)}")


def _entry_problems(
    prefix: Path, we: WorkloadEntrySpec, resolution: Resolution | None, service_ports: set[str] | None
) -> Iterable[Problem]:
    """A WorkloadEntry's spec, or one of a ServiceEntry's endpoints.

    `resolution` is None for a WorkloadEntry of its own: its address may be an IP, a hostname
    or a unix socket, as Istio cannot tell how a ServiceEntry selecting it will resolve. For
    an endpoint, STATIC wants an IP or a unix socket and DNS an IP or a hostname; with NONE
    or DYNAMIC_DNS an endpoint is an error of the ServiceEntry and only the CRD's rules apply.
    `service_ports` (an endpoint's) holds the names of the ServiceEntry's ports.
    """
    addr_path = (*prefix, "address")
    addr = we.address
    static_like = resolution in (None, Resolution.STATIC)
    dns_like = resolution in (Resolution.DNS, Resolution.DNS_ROUND_ROBIN)

    # The CRD's limits.
    yield from _too_long(addr_path, addr, 256)
    yield from _too_long((*prefix, "network"), we.network, 2048)
    yield from _too_long((*prefix, "locality"), we.locality, 2048)
    yield from _too_long((*prefix, "serviceAccount"), we.service_account, 253)
    if not 0 <= we.weight <= UINT32_MAX:
        yield Problem((*prefix, "weight"), f"must be between 0 and {UINT32_MAX}, got {we.weight}")
    if we.ports is not None and len(we.ports) > 128:
        yield Problem((*prefix, "ports"), "may not have more than 128 ports")
    if we.labels is not None and len(we.labels) > 256:
        yield Problem((*prefix, "labels"), "may not have more than 256 labels")

    # The address. Empty is allowed only with a network (reached through its gateway).
    if not addr:
        if not we.network:
            yield Problem(addr_path, "address is required (it may be left empty only when `network` is set)")
        elif dns_like:
            yield Problem(addr_path, f"endpoint address is required for resolution {resolution}")
        elif static_like:
            yield Problem(addr_path, f"address is unset with network {we.network!r}", warning=True)
    elif addr.startswith(UNIX_ADDRESS_PREFIX):
        if msg := unix_address_problem(addr[len(UNIX_ADDRESS_PREFIX) :]):
            yield Problem(addr_path, msg)
        if we.ports is not None:
            yield Problem((*prefix, "ports"), f"unix endpoint {addr} must not include ports")
        if dns_like:
            yield Problem(
                addr_path,
                f"endpoint address {addr!r} is a unix socket: resolution {resolution} needs an IP or a hostname",
            )
        elif resolution == Resolution.STATIC and service_ports is not None and len(service_ports) != 1:
            yield Problem(addr_path, "exactly 1 service port required for unix endpoints")
    elif not is_ip_address(addr):
        if resolution == Resolution.STATIC:
            yield Problem(addr_path, f"endpoint address {addr!r} is not a valid IP address (resolution STATIC)")
        elif (resolution is None or dns_like) and (msg := fqdn_problem(addr)):
            yield Problem(addr_path, f"endpoint address {addr!r} is not a valid FQDN or an IP address: {msg}")

    for name, port in (we.ports or {}).items():
        pp = (*prefix, "ports", name)
        if (msg := port_name_problem(name)) is not None:
            yield Problem(pp, msg)
        if (msg := port_number_problem(port)) is not None:
            yield Problem(pp, msg)
        if (static_like or dns_like) and service_ports is not None and name not in service_ports:
            yield Problem(pp, f"endpoint port {name!r} is not defined by the service entry's ports")
    if static_like or dns_like:
        yield from label_problems((*prefix, "labels"), we.labels)


def validate_workload_entry(we: WorkloadEntry) -> list[Problem]:
    problems = list(metadata_problems(we.metadata.annotations, None))
    problems.extend(_entry_problems(("spec",), we.spec, None, None))
    return problems


def export_to_problems(path: Path, namespace: str, export_to: list[str] | None) -> Iterable[Problem]:
    """Istio's validateExportTo for a ServiceEntry, where `~` (no one) is allowed."""
    seen: dict[str, str] = {}  # "." counts as the namespace -> the entry that named it
    for i, entry in enumerate(export_to or ()):
        key = namespace if entry == "." else entry
        if key in seen:
            if seen[key] != entry:
                yield Problem((*path, i), f"duplicate entries in exportTo: . and current namespace {namespace}")
            else:
                yield Problem((*path, i), f"duplicate entries in exportTo for entry {entry}")
        elif key in ("*", "~") or is_dns1123_label(key):
            seen[key] = entry
        else:
            yield Problem((*path, i), f"invalid entry {entry!r}: only ., *, ~ or a namespace (a DNS-1123 label)")
    if "*" in seen and len(export_to or ()) > 1:
        yield Problem(path, "cannot have both public (*) and non-public exportTo values for a resource")
    if "~" in seen and len(export_to or ()) > 1:
        yield Problem(path, "cannot export service entry to no one (~) and someone")


def _workload_selector_problems(se: ServiceEntry) -> Iterable[Problem]:
    ws = se.spec.workload_selector
    if ws is None:
        return
    lp: Path = ("spec", "workloadSelector", "labels")
    labels = ws.labels or {}
    if len(labels) > 256:
        yield Problem(lp, "may not have more than 256 labels")
    for k, v in labels.items():
        if k == "":
            yield Problem(lp, f"empty key is not supported in selector: {k}={v}")
        if "*" in k or "*" in v:
            yield Problem((*lp, k), f"wildcard is not supported in selector: {k}={v}")
        if len(v) > 63:
            yield Problem((*lp, k), "label value may not exceed 63 characters")
    if not labels:
        yield Problem(
            ("spec", "workloadSelector"),
            "workload selector specified without labels, will be applied to all services in namespace",
            warning=True,
        )


def validate_service_entry(se: ServiceEntry) -> list[Problem]:
    spec = se.spec
    res = spec.resolution
    labels = se.metadata.labels
    problems = list(metadata_problems(se.metadata.annotations, None))
    add = problems.append
    problems.extend(_workload_selector_problems(se))
    if spec.workload_selector is not None and spec.endpoints is not None:
        add(Problem(("spec",), "only one of workloadSelector or endpoints can be set"))

    # hosts
    if not spec.hosts:
        add(Problem(("spec", "hosts"), "service entry must have at least one host"))
    elif len(spec.hosts) > 256:
        add(Problem(("spec", "hosts"), "may not have more than 256 hosts"))
    for i, host in enumerate(spec.hosts):
        hp: Path = ("spec", "hosts", i)
        if host == "*":
            add(Problem(hp, "invalid host *: a ServiceEntry host cannot be the full wildcard"))
            continue
        if (msg := wildcard_domain_problem(host)) is not None:
            add(Problem(hp, msg))
        elif res != Resolution.DYNAMIC_DNS and "*" in host and not host.startswith("*."):
            add(Problem(hp, f"partial wildcard {host!r} not allowed", warning=True))

    # addresses
    addresses = spec.addresses or []
    if len(addresses) > 256:
        add(Problem(("spec", "addresses"), "may not have more than 256 addresses"))
    for i, address in enumerate(addresses):
        ap: Path = ("spec", "addresses", i)
        if len(address) > 64:
            add(Problem(ap, f"must be at most 64 characters, got {len(address)}"))
        elif (msg := ip_subnet_problem(address)) is not None:
            add(Problem(ap, msg))
    if any("/" in a for a in addresses) and res not in (Resolution.NONE, Resolution.STATIC):
        add(
            Problem(
                ("spec", "addresses"), f"CIDR addresses are allowed only for NONE/STATIC resolution types, not {res}"
            )
        )

    # ports; Istio allocates an address itself unless resolution is NONE or the label opts out
    # (PILOT_ENABLE_IP_AUTOALLOCATE, on by default, is assumed).
    auto_allocation = res != Resolution.NONE and labels.get(AUTOALLOCATE_LABEL, "").lower() != "false" and not addresses
    ports = spec.ports or []
    if len(ports) > 256:
        add(Problem(("spec", "ports"), "may not have more than 256 ports"))
    names: set[str] = set()
    numbers: set[int] = set()
    for i, port in enumerate(ports):
        pp: Path = ("spec", "ports", i)
        if "name" not in port.model_fields_set:
            add(Problem((*pp, "name"), "required field is missing"))
        elif port.name in names:
            add(Problem((*pp, "name"), f"service entry port name {port.name!r} already defined"))
        elif (msg := port_name_problem(port.name)) is not None:
            add(Problem((*pp, "name"), msg))
        names.add(port.name)
        if (msg := port_number_problem(port.number)) is not None:
            add(Problem((*pp, "number"), msg))
        elif port.number in numbers:
            add(Problem((*pp, "number"), f"service entry port {port.number} already defined"))
        numbers.add(port.number)
        if ("target_port" in port.model_fields_set or port.target_port != 0) and (
            msg := port_number_problem(port.target_port)
        ) is not None:
            add(Problem((*pp, "targetPort"), msg))
        if port.protocol and parse_protocol(port.protocol) is None:
            add(
                Problem(
                    (*pp, "protocol"),
                    f"unsupported protocol: {port.protocol} (one of {', '.join(_PROTOCOL_NAMES)}, "
                    "any case, or empty to detect it)",
                )
            )
        if not addresses and not auto_allocation and port.protocol in ("", "TCP"):
            add(
                Problem(
                    (*pp, "protocol"),
                    "addresses are required for ports serving TCP (or unset) protocol "
                    "when IP Autoallocation is not enabled",
                    warning=True,
                )
            )

    # endpoints, by resolution
    endpoints = spec.endpoints
    if endpoints is not None and len(endpoints) > 4096:
        add(Problem(("spec", "endpoints"), "may not have more than 4096 endpoints"))
    if res == Resolution.NONE:
        if endpoints is not None:
            add(Problem(("spec", "endpoints"), "no endpoints should be provided for resolution type NONE"))
        if spec.workload_selector is not None:
            add(
                Problem(
                    ("spec", "workloadSelector"),
                    "workloadSelector should not be set when resolution mode is NONE",
                    warning=True,
                )
            )
    elif res in (Resolution.DNS, Resolution.DNS_ROUND_ROBIN):
        if not endpoints:
            for i, host in enumerate(spec.hosts):
                if host != "*" and (msg := fqdn_problem(host)) is not None:
                    add(
                        Problem(
                            ("spec", "hosts", i),
                            f"must be a fully qualified domain name (no wildcard) when resolution is {res} "
                            f"and no endpoints are given: {msg}",
                        )
                    )
                    break
        if res == Resolution.DNS_ROUND_ROBIN and endpoints is not None and len(endpoints) > 1:
            add(Problem(("spec", "endpoints"), f"there must only be 0 or 1 endpoint for resolution mode {res}"))
        if addresses and len(spec.hosts) > 1:
            for i, port in enumerate(ports):
                if parse_protocol(port.protocol) in _TCP_PROTOCOLS:
                    add(
                        Problem(
                            ("spec", "ports", i),
                            "service entry can not have more than one host specified "
                            "simultaneously with address and tcp port",
                            warning=True,
                        )
                    )
                    break
    elif res == Resolution.DYNAMIC_DNS:
        for i, host in enumerate(spec.hosts):
            if not host.startswith("*"):
                add(Problem(("spec", "hosts", i), f"host must be wildcarded for resolution mode {res}"))
        if addresses:
            add(Problem(("spec", "addresses"), f"addresses cannot be set for resolution type {res}"))
        if endpoints:
            add(Problem(("spec", "endpoints"), f"endpoints cannot be set for resolution type {res}"))
        for i, port in enumerate(ports):
            if parse_protocol(port.protocol) not in _DYNAMIC_DNS_PROTOCOLS:
                add(
                    Problem(
                        ("spec", "ports", i, "protocol"),
                        f"only HTTP, TLS, GRPC, and HTTP2 protocols are supported for resolution type {res}",
                    )
                )
        waypoint = labels.get(USE_WAYPOINT_LABEL, "")
        if spec.location == Location.MESH_INTERNAL and waypoint and waypoint.lower() != "none":
            add(
                Problem(
                    ("spec", "location"),
                    f"location MESH_INTERNAL with resolution type {res} is not supported when using waypoints",
                )
            )
    for i, ep in enumerate(endpoints or ()):
        problems.extend(_entry_problems(("spec", "endpoints", i), ep, res, names))

    # Several hosts on one port can be told apart only by HTTP's Host or TLS's SNI.
    if res != Resolution.NONE and len(spec.hosts) > 1:
        for i, port in enumerate(ports):
            proto = parse_protocol(port.protocol)
            if proto not in _HTTP_PROTOCOLS and proto not in _TLS_PROTOCOLS:
                add(
                    Problem(
                        ("spec", "ports", i, "protocol"),
                        "multiple hosts provided with non-HTTP, non-TLS ports: with several hosts every port "
                        "must be HTTP, HTTP2, GRPC, HTTPS or TLS, unless resolution is NONE",
                    )
                )
                break

    problems.extend(export_to_problems(("spec", "exportTo"), se.metadata.namespace or "", spec.export_to))
    return problems

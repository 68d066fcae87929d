"""Istio's semantic validation of AuthorizationPolicy and RequestAuthentication, with the offending field named.

The rules follow istio/istio pkg/config/validation (ValidateAuthorizationPolicy) and
pkg/config/security (ValidateAttribute and friends). Where Istio accepts a value that
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
    Operation,
    PolicyTargetReference,
    RequestAuthentication,
    Source,
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

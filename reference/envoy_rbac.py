"""Translate AuthorizationPolicies into Envoy RBAC filters, exactly as istiod does.

This module is the *reference side* of the differential tests: the same policies are
run through Envoy's own RBAC filter (configured from here) and through extproc's engine
(`compiler.py`), and the decisions are compared. It is also what a benchmark's "native
Envoy" mode loads. For that comparison to mean anything this code must not share logic
with our engine, so it is written from Istio's generator code path and mirrors its
structure rather than ours:

* ``pilot/pkg/security/authz/model/model.go`` (`New`, `MigrateTrustDomain`, `Generate`,
  `checkError`) -> `_new_model`, `_migrate_trust_domain`, `_generate`, `_RuleEntry`;
* ``model/generator.go``, ``permission.go``, ``principal.go``, ``util.go`` and
  ``matcher/*.go`` -> the ``_gen_*`` functions and the small matcher helpers;
* ``builder/builder.go`` (`build`, `buildHTTP`, `buildTCP`, `policyName`,
  ``rbacPolicyMatchNever``, dry-run handling) -> `rbac_filters`, `_build_action`;
* ``security/trustdomain/bundle.go`` and ``util.go`` -> `_TrustDomainBundle`.

Public API
----------
``rbac_filters(policies, *, for_tcp, trust_domain="cluster.local", trust_domain_aliases=(),
jwt_filter="envoy.filters.http.jwt_authn", jwt_payload_key="payload") -> list[dict]``
    The RBAC filter entries for the ALLOW/DENY/AUDIT policies given, in Istio's order
    (AUDIT, then DENY, then ALLOW; one filter per action that has at least one policy).
    The caller has already chosen the policies that apply to the workload; CUSTOM
    policies are ignored. Each entry is ``{"name": ..., "typed_config": {"@type": ...}}``
    in Envoy v3 proto-JSON form with snake_case field names, ready to be placed in an
    HCM ``http_filters`` list (``for_tcp=False``) or a listener filter chain's
    ``filters`` list (``for_tcp=True``, before ``tcp_proxy``).

Options mirror what istiod derives from its mesh config: ``trust_domain`` and
``trust_domain_aliases`` form the trust-domain bundle (local domain first), and
``jwt_filter`` / ``jwt_payload_key`` name the dynamic-metadata namespace and key that
jwt_authn writes the JWT payload to (Istio's ``filters.EnvoyJwtFilterName`` and
``filters.EnvoyJwtFilterPayload``). Principals use ``authenticated.principal_name``,
which is what istiod generates for sidecars (``useAuthenticated`` = true).

Output conventions, matching protobuf's JSON mapping so the dicts compare equal to
istiod's output after normalisation: fields at their proto3 default are omitted
(``ignore_case`` false, empty stat prefixes), except that each RBAC config always
carries its ``action`` explicitly (Envoy treats an absent action as ALLOW, so this is
equivalent and easier to read). ``policies`` is emitted sorted by name.

Quirks of istiod that are reproduced on purpose, so the output equals what a real mesh
would push to Envoy:

* ``shadow_rules_stat_prefix`` is "istio_dry_run_allow_" even on filters without shadow
  rules and on the AUDIT filter (Go's ``GetAction()`` on a nil config is ALLOW); a
  dry-run AUDIT policy gets no shadow stat prefix at all.
* A ``when`` condition on ``source.principal`` is shared by every ``from`` entry of the
  rule, and the trust-domain migration rewrites it once per entry, so with aliases and
  several ``from`` entries its values are duplicated.
* A rule with an unknown ``when`` key is dropped whatever the action (even DENY).
* An invalid value (bad IP, port, header key) drops the whole rule in ALLOW but only that
  value in DENY/AUDIT, the same split as HTTP-only attributes on TCP.

A null entry in ``rules`` is skipped (its index is still used in later names); a null
entry in ``from``/``to``/``when`` is treated as the empty message protobuf would decode.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from extproc.config.models import Action, AuthorizationPolicy, Condition, From, Rule, To

__all__ = [
    "DRY_RUN_ANNOTATION",
    "HTTP_RBAC_FILTER",
    "HTTP_RBAC_TYPE",
    "NETWORK_RBAC_FILTER",
    "NETWORK_RBAC_TYPE",
    "URI_TEMPLATE_TYPE",
    "rbac_filters",
]

Json = dict[str, Any]

HTTP_RBAC_FILTER = "envoy.filters.http.rbac"
NETWORK_RBAC_FILTER = "envoy.filters.network.rbac"
HTTP_RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
NETWORK_RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
URI_TEMPLATE_TYPE = "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig"
DRY_RUN_ANNOTATION = "istio.io/dry-run"

TCP_STAT_PREFIX = "tcp."
SHADOW_ALLOW_STAT_PREFIX = "istio_dry_run_allow_"
SHADOW_DENY_STAT_PREFIX = "istio_dry_run_deny_"

_SPIFFE_PREFIX = "spiffe://"
_DEFAULT_CLUSTER_LOCAL = "cluster.local"

# Attribute keys of `when` conditions (model.go constants).
_ATTR_REQUEST_HEADER = "request.headers"
_ATTR_SRC_IP = "source.ip"
_ATTR_REMOTE_IP = "remote.ip"
_ATTR_SRC_NAMESPACE = "source.namespace"
_ATTR_SRC_SERVICE_ACCOUNT = "source.serviceAccount"
_ATTR_SRC_TRUST_DOMAIN = "source.trustDomain"
_ATTR_SRC_PRINCIPAL = "source.principal"
_ATTR_REQUEST_PRINCIPAL = "request.auth.principal"
_ATTR_REQUEST_AUDIENCES = "request.auth.audiences"
_ATTR_REQUEST_PRESENTER = "request.auth.presenter"
_ATTR_REQUEST_CLAIMS = "request.auth.claims"
_ATTR_DEST_IP = "destination.ip"
_ATTR_DEST_PORT = "destination.port"
_ATTR_CONN_SNI = "connection.sni"
_ATTR_ENVOY_FILTER = "experimental.envoy.filters."

# Internal keys for operation fields, used only in error messages (model.go).
_METHOD_HEADER = ":method"
_PATH_MATCHER = "path-matcher"
_HOST_HEADER = ":authority"

# Envoy RBAC actions for the Istio actions this module handles (builder.go `build`).
_RBAC_ACTION = {Action.AUDIT: "LOG", Action.DENY: "DENY", Action.ALLOW: "ALLOW"}


class _GenError(Exception):
    """A generator could not translate a value: an HTTP-only attribute on a TCP chain, a
    malformed IP, port or key. `_RuleEntry` decides per action whether this drops the
    whole rule (ALLOW) or only the offending value/condition (DENY, AUDIT)."""


# --------------------------------------------------------------------------------------
# Matchers (matcher/string.go, header.go, metadata.go, template.go)
# --------------------------------------------------------------------------------------

# Go's regexp.QuoteMeta escapes exactly these bytes. Python's re.escape escapes more
# ('-', '#', '&', '~', whitespace), which would make the regex strings differ from istiod's.
_GO_REGEX_SPECIAL = frozenset("\\.+*?()|[]{}^$")


def _quote_meta(s: str) -> str:
    return "".join("\\" + c if c in _GO_REGEX_SPECIAL else c for c in s)


def _sm_exact(value: str, ignore_case: bool = False) -> Json:
    return {"exact": value, "ignore_case": True} if ignore_case else {"exact": value}


def _sm_prefix(value: str, ignore_case: bool = False) -> Json:
    return {"prefix": value, "ignore_case": True} if ignore_case else {"prefix": value}


def _sm_suffix(value: str, ignore_case: bool = False) -> Json:
    return {"suffix": value, "ignore_case": True} if ignore_case else {"suffix": value}


def _sm_regex(regex: str) -> Json:
    return {"safe_regex": {"regex": regex}}


def _string_matcher_with_prefix(value: str, prefix: str) -> Json:
    """Istio's wildcard convention: `*` alone means non-empty (regex .+, the prefix is not
    applied), `*x` suffix, `x*` prefix, otherwise exact; `prefix` is prepended to the
    literal part (the `spiffe://` of principals)."""
    if value == "*":
        return _sm_regex(".+")
    if value.startswith("*"):
        if prefix == "":
            return _sm_suffix(value[1:])
        return _sm_regex(prefix + ".*" + _quote_meta(value[1:]))
    if value.endswith("*"):
        return _sm_prefix(prefix + value[:-1])
    return _sm_exact(prefix + value)


def _string_matcher(value: str) -> Json:
    return _string_matcher_with_prefix(value, "")


def _or_value_matcher(matchers: list[Json]) -> Json:
    # A single matcher is used as-is: Envoy's OrMatcher needs at least two.
    if len(matchers) == 1:
        return matchers[0]
    return {"or_match": {"value_matchers": matchers}}


def _string_or_value_matcher(values: Sequence[str]) -> Json:
    return _or_value_matcher([{"string_match": _string_matcher(v)} for v in values])


def _header_matcher(name: str, value: str, ignore_case: bool = False) -> Json:
    """`*` must become present_match: Envoy rejects an empty prefix/suffix."""
    if value == "*":
        return {"name": name, "present_match": True}
    if value.startswith("*"):
        return {"name": name, "string_match": _sm_suffix(value[1:], ignore_case)}
    if value.endswith("*"):
        return {"name": name, "string_match": _sm_prefix(value[:-1], ignore_case)}
    return {"name": name, "string_match": _sm_exact(value, ignore_case)}


_PATH_TEMPLATE_RE = re.compile(r"\{\*\*\}|\{\*\}")


def _contains_path_template(value: str) -> bool:
    return "{*}" in value or "{**}" in value


def _sanitize_path_template(path: str) -> str:
    # One left-to-right pass like Go's strings.NewReplacer ({**} -> **, {*} -> *), so a
    # replacement never creates a new template.
    return _PATH_TEMPLATE_RE.sub(lambda m: "**" if m.group(0) == "{**}" else "*", path)


def _metadata_value_matcher(filter_name: str, keys: Sequence[str], value: Json) -> Json:
    return {"filter": filter_name, "path": [{"key": k} for k in keys], "value": value}


def _metadata_list_or_value_matcher(filter_name: str, keys: Sequence[str], value: Json) -> Json:
    """Istio's "extended JWT" form: match a string claim itself OR any element of a list
    claim (MetadataListValueMatcher with useExtendedJwt=true)."""
    list_match = {"list_match": {"one_of": value}}
    return _metadata_value_matcher(filter_name, keys, {"or_match": {"value_matchers": [list_match, value]}})


# --------------------------------------------------------------------------------------
# Small value parsers (networking/util, model/util.go)
# --------------------------------------------------------------------------------------


def _format_addr(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Go's netip.Addr.String(): IPv4-mapped IPv6 keeps the dotted quad, which Python 3.11
    would print as hex."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return "::ffff:" + str(addr.ipv4_mapped)
    return str(addr)


def _parse_addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError as e:
        raise _GenError(f"invalid IP address {text!r}") from e


def _cidr_range(value: str) -> Json:
    """util.AddrStrToCidrRange: a bare IP becomes /32 or /128; a CIDR keeps its host bits
    (netip.ParsePrefix does not mask), so "10.1.2.3/16" stays "10.1.2.3"."""
    if value == "":
        raise _GenError("empty address")
    if "/" in value:
        addr_text, _, bits_text = value.rpartition("/")
        if "%" in addr_text:
            raise _GenError(f"invalid prefix {value!r}: IPv6 zones cannot be present in a prefix")
        addr = _parse_addr(addr_text)
        # netip.ParsePrefix: decimal, no sign, no leading zeros, at most the address length.
        if not re.fullmatch(r"0|[1-9][0-9]*", bits_text, flags=re.ASCII) or int(bits_text) > addr.max_prefixlen:
            raise _GenError(f"invalid prefix {value!r}: bad bits after slash")
        return {"address_prefix": _format_addr(addr), "prefix_len": int(bits_text)}
    addr_text, has_zone, zone = value.partition("%")
    if has_zone and (not zone or ":" not in addr_text):
        raise _GenError(f"invalid IP address {value!r}")  # netip.ParseAddr: IPv6-only, non-empty zone
    addr = _parse_addr(addr_text)  # netip.PrefixFrom then drops the zone
    return {"address_prefix": _format_addr(addr), "prefix_len": addr.max_prefixlen}


def _convert_to_port(value: str) -> int:
    # strconv.ParseUint(v, 10, 32): ASCII digits only (leading zeros allowed), then <= 65535.
    if not re.fullmatch(r"[0-9]+", value, flags=re.ASCII) or int(value) > 65535:
        raise _GenError(f"invalid port {value}")
    return int(value)


def _extract_name_in_brackets(s: str) -> str:
    if not s.startswith("[") or not s.endswith("]"):
        raise _GenError(f"expecting format [<NAME>], but found {s}")
    return s.removeprefix("[").removesuffix("]")


def _extract_name_in_nested_brackets(s: str) -> list[str]:
    """`[a][b]` -> ["a", "b"]; anything not a clean sequence of `[..]` falls back to the
    single-bracket form, so `[a.b]` is one claim named "a.b" and an empty suffix gives no
    path below the payload at all (as in Istio)."""

    def find_end_bracket(begin: int) -> int:
        if begin >= len(s) or s[begin] != "[":
            return -1
        for i in range(begin + 1, len(s)):
            if s[i] == "[":
                return -1
            if s[i] == "]":
                return i
        return -1

    claims: list[str] = []
    begin = 0
    while begin < len(s):
        end = find_end_bracket(begin)
        if end == -1:
            return [_extract_name_in_brackets(s)]
        claims.append(s[begin + 1 : end])
        begin = end + 1
    return claims


def _parse_go_bool(value: str) -> bool | None:
    """strconv.ParseBool, which istiod uses for the dry-run annotation."""
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None


# --------------------------------------------------------------------------------------
# RBAC permission / principal constructors (permission.go, principal.go)
# --------------------------------------------------------------------------------------


def _perm_any() -> Json:
    return {"any": True}


def _perm_and(rules: list[Json]) -> Json:
    return {"and_rules": {"rules": rules}}


def _perm_or(rules: list[Json]) -> Json:
    return {"or_rules": {"rules": rules}}


def _perm_not(rule: Json) -> Json:
    return {"not_rule": rule}


def _princ_any() -> Json:
    return {"any": True}


def _princ_and(ids: list[Json]) -> Json:
    return {"and_ids": {"ids": ids}}


def _princ_or(ids: list[Json]) -> Json:
    return {"or_ids": {"ids": ids}}


def _princ_not(ident: Json) -> Json:
    return {"not_id": ident}


def _princ_authenticated(name: Json) -> Json:
    return {"authenticated": {"principal_name": name}}


# --------------------------------------------------------------------------------------
# Generators (generator.go). Simple generators translate one value; extended generators
# translate the whole value list at once (JWT and metadata attributes).
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Ctx:
    policy_namespace: str
    jwt_filter: str
    jwt_payload_key: str


ValueGen = Callable[[str, str, bool, _Ctx], Json]  # (key, value, for_tcp, ctx) -> rule
ListGen = Callable[[str, Sequence[str], bool, _Ctx], Json]  # (key, values, for_tcp, ctx) -> rule


def _http_only(key: str, for_tcp: bool) -> None:
    if for_tcp:
        raise _GenError(f"{key!r} is HTTP only")


# permission side


def _gen_dest_ip(_key: str, value: str, _tcp: bool, _ctx: _Ctx) -> Json:
    return {"destination_ip": _cidr_range(value)}


def _gen_dest_port(_key: str, value: str, _tcp: bool, _ctx: _Ctx) -> Json:
    return {"destination_port": _convert_to_port(value)}


def _gen_conn_sni(_key: str, value: str, _tcp: bool, _ctx: _Ctx) -> Json:
    return {"requested_server_name": _string_matcher(value)}


def _gen_envoy_filter(key: str, values: Sequence[str], _tcp: bool, _ctx: _Ctx) -> Json:
    """`experimental.envoy.filters.a.b[c]` -> metadata of filter `envoy.filters.a.b`, key
    `c`; a value written `[v]` matches v as an element of a list. Works on TCP too."""
    parts = key.removeprefix("experimental.").removesuffix("]").split("[", 1)
    if len(parts) != 2:
        raise _GenError(f"invalid key: {key}")
    matchers: list[Json] = []
    for value in values:
        if value.startswith("[") and value.endswith("]"):
            inner = {"string_match": _string_matcher(value.strip("[]"))}
            matchers.append({"list_match": {"one_of": inner}})
        else:
            matchers.append({"string_match": _string_matcher(value)})
    return {"metadata": _metadata_value_matcher(parts[0], [parts[1]], _or_value_matcher(matchers))}


def _gen_host(key: str, value: str, for_tcp: bool, _ctx: _Ctx) -> Json:
    _http_only(key, for_tcp)
    return {"header": _header_matcher(_HOST_HEADER, value, ignore_case=True)}


def _gen_path(key: str, value: str, for_tcp: bool, _ctx: _Ctx) -> Json:
    _http_only(key, for_tcp)
    if _contains_path_template(value):
        return {
            "uri_template": {
                "name": "uri-template",
                "typed_config": {"@type": URI_TEMPLATE_TYPE, "path_template": _sanitize_path_template(value)},
            }
        }
    return {"url_path": {"path": _string_matcher(value)}}


def _gen_method(key: str, value: str, for_tcp: bool, _ctx: _Ctx) -> Json:
    _http_only(key, for_tcp)
    return {"header": _header_matcher(_METHOD_HEADER, value)}


# principal side


def _gen_src_ip(_key: str, value: str, _tcp: bool, _ctx: _Ctx) -> Json:
    return {"direct_remote_ip": _cidr_range(value)}


def _gen_remote_ip(_key: str, value: str, _tcp: bool, _ctx: _Ctx) -> Json:
    return {"remote_ip": _cidr_range(value)}


def _gen_src_namespace(_key: str, value: str, _tcp: bool, _ctx: _Ctx) -> Json:
    # Every `*` is a glob, wherever it is (unlike the other fields).
    regex_ns = ".*".join(_quote_meta(part) for part in value.split("*"))
    return _princ_authenticated(_sm_regex(f".*/ns/{regex_ns}/.*"))


def _service_account_regex(default_namespace: str, value: str) -> str:
    ns, sep, sa = value.partition("/")
    if not sep:
        ns, sa = default_namespace, value
    return f"spiffe://.+/ns/{_quote_meta(ns)}/(.+/|)sa/{_quote_meta(sa)}(/.+)?"


def _gen_src_service_account(_key: str, value: str, _tcp: bool, ctx: _Ctx) -> Json:
    return _princ_authenticated(_sm_regex(_service_account_regex(ctx.policy_namespace, value)))


def _gen_src_trust_domain(_key: str, value: str, _tcp: bool, _ctx: _Ctx) -> Json:
    if value == "*":
        m = _sm_prefix(_SPIFFE_PREFIX)
    elif "*" not in value:
        m = _sm_prefix(f"{_SPIFFE_PREFIX}{value}/")
    else:
        # Only the first `*` is a wildcard (within one trust-domain label run); later ones
        # are quoted literally.
        head, tail = value.split("*", 1)
        m = _sm_regex(f"spiffe://{_quote_meta(head)}[^/]*{_quote_meta(tail)}/.*")
    return _princ_authenticated(m)


def _gen_src_principal(_key: str, value: str, _tcp: bool, _ctx: _Ctx) -> Json:
    return _princ_authenticated(_string_matcher_with_prefix(value, _SPIFFE_PREFIX))


def _jwt_claim_string(ctx: _Ctx, claim: str, m: Json) -> Json:
    return {"metadata": _metadata_value_matcher(ctx.jwt_filter, [ctx.jwt_payload_key, claim], {"string_match": m})}


def _gen_request_principal(key: str, values: Sequence[str], for_tcp: bool, ctx: _Ctx) -> Json:
    """`iss/sub`, split at the LAST `/` (issuers are URLs), matched as two separate
    metadata matchers on the JWT payload. A value without `/` is an issuer whose subject
    must be empty, unless it carries a wildcard."""
    _http_only(key, for_tcp)
    match_any = _sm_regex(".+")
    alternatives: list[Json] = []
    for value in values:
        idx = value.rfind("/")
        found = idx >= 0
        iss, sub = (value[:idx], value[idx + 1 :]) if found else (value, "")
        if value == "*":
            m_iss, m_sub = match_any, match_any
        elif value.startswith("*"):
            if found:
                m_iss = match_any if iss == "*" else _sm_suffix(iss[1:])
                m_sub = _sm_exact(sub)
            else:
                m_iss, m_sub = match_any, _sm_suffix(value[1:])
        elif value.endswith("*"):
            if found:
                m_iss = _sm_exact(iss)
                m_sub = match_any if sub == "*" else _sm_prefix(sub[:-1])
            else:
                m_iss, m_sub = _sm_prefix(value[:-1]), match_any
        else:
            m_iss, m_sub = _sm_exact(iss), _sm_exact(sub)
        alternatives.append(_princ_and([_jwt_claim_string(ctx, "iss", m_iss), _jwt_claim_string(ctx, "sub", m_sub)]))
    if len(alternatives) == 1:
        return alternatives[0]
    return _princ_or(alternatives)


def _jwt_claim_list(ctx: _Ctx, claims: Sequence[str], values: Sequence[str]) -> Json:
    keys = [ctx.jwt_payload_key, *claims]
    return {"metadata": _metadata_list_or_value_matcher(ctx.jwt_filter, keys, _string_or_value_matcher(values))}


def _gen_request_audiences(key: str, values: Sequence[str], for_tcp: bool, ctx: _Ctx) -> Json:
    _http_only(key, for_tcp)
    return _jwt_claim_list(ctx, ["aud"], values)


def _gen_request_presenter(key: str, values: Sequence[str], for_tcp: bool, ctx: _Ctx) -> Json:
    _http_only(key, for_tcp)
    return _jwt_claim_list(ctx, ["azp"], values)


def _gen_request_claims(key: str, values: Sequence[str], for_tcp: bool, ctx: _Ctx) -> Json:
    _http_only(key, for_tcp)
    claims = _extract_name_in_nested_brackets(key.removeprefix(_ATTR_REQUEST_CLAIMS))
    return _jwt_claim_list(ctx, claims, values)


def _gen_request_header(key: str, value: str, for_tcp: bool, _ctx: _Ctx) -> Json:
    _http_only(key, for_tcp)
    name = _extract_name_in_brackets(key.removeprefix(_ATTR_REQUEST_HEADER))
    return {"header": _header_matcher(name, value)}


# --------------------------------------------------------------------------------------
# The model of one rule (model.go)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Gen:
    """A generator: `one` translates a single value (the entry ORs them), `many` the whole
    value list at once (Istio's extendedGenerator: JWT and metadata attributes)."""

    one: ValueGen | None = None
    many: ListGen | None = None


@dataclass(slots=True, eq=False)
class _RuleEntry:
    """One attribute of a rule with its values and notValues. Entries coming from `when`
    are shared (the same object) by every `from`/`to` alternative, as in Istio."""

    key: str
    values: list[str]
    not_values: list[str]
    gen: _Gen

    def build(self, for_tcp: bool, action: str, ctx: _Ctx, permission: bool) -> list[Json]:
        """The AND terms this entry contributes: OR(values) and NOT(OR(notValues)), as
        permissions or as principals.

        An error propagates for ALLOW (the caller drops the whole rule: the allow set
        shrinks) and is swallowed for DENY/LOG (only the offending value, or the whole
        list for extended generators, disappears: the deny set widens). This is
        model.go's checkError."""
        or_of, not_of = (_perm_or, _perm_not) if permission else (_princ_or, _princ_not)
        out: list[Json] = []
        for values, positive in ((self.values, True), (self.not_values, False)):
            if not values:
                continue
            term = self._translate(values, for_tcp, action, ctx, or_of)
            if term is not None:
                out.append(term if positive else not_of(term))
        return out

    def _translate(
        self, values: list[str], for_tcp: bool, action: str, ctx: _Ctx, or_of: Callable[[list[Json]], Json]
    ) -> Json | None:
        if self.gen.many is not None:
            try:
                return self.gen.many(self.key, values, for_tcp, ctx)
            except _GenError:
                if action == "ALLOW":
                    raise
                return None
        if self.gen.one is None:  # pragma: no cover - every _Gen has one of the two
            raise AssertionError(f"entry {self.key} has no generator")
        alternatives: list[Json] = []
        for value in values:
            try:
                alternatives.append(self.gen.one(self.key, value, for_tcp, ctx))
            except _GenError:
                if action == "ALLOW":
                    raise
        return or_of(alternatives) if alternatives else None


@dataclass(slots=True)
class _RuleList:
    entries: list[_RuleEntry] = field(default_factory=list)

    def copy(self) -> _RuleList:
        # Shallow: the entries themselves stay shared, like Go's slice of *rule.
        return _RuleList(list(self.entries))

    def insert_front(self, gen: _Gen, key: str, values: list[str] | None, not_values: list[str] | None) -> None:
        if values or not_values:
            self.entries.insert(0, _RuleEntry(key, list(values or ()), list(not_values or ()), gen))

    def append_last(self, gen: _Gen, key: str, values: list[str] | None, not_values: list[str] | None) -> None:
        if values or not_values:
            self.entries.append(_RuleEntry(key, list(values or ()), list(not_values or ()), gen))


@dataclass(slots=True)
class _Model:
    permissions: list[_RuleList]
    principals: list[_RuleList]


_DEST_IP = _Gen(one=_gen_dest_ip)
_DEST_PORT = _Gen(one=_gen_dest_port)
_CONN_SNI = _Gen(one=_gen_conn_sni)
_ENVOY_FILTER = _Gen(many=_gen_envoy_filter)
_HOST = _Gen(one=_gen_host)
_PATH = _Gen(one=_gen_path)
_METHOD = _Gen(one=_gen_method)
_SRC_IP = _Gen(one=_gen_src_ip)
_REMOTE_IP = _Gen(one=_gen_remote_ip)
_SRC_NAMESPACE = _Gen(one=_gen_src_namespace)
_SRC_TRUST_DOMAIN = _Gen(one=_gen_src_trust_domain)
_SRC_SERVICE_ACCOUNT = _Gen(one=_gen_src_service_account)
_SRC_PRINCIPAL = _Gen(one=_gen_src_principal)
_REQUEST_PRINCIPAL = _Gen(many=_gen_request_principal)
_REQUEST_AUDIENCES = _Gen(many=_gen_request_audiences)
_REQUEST_PRESENTER = _Gen(many=_gen_request_presenter)
_REQUEST_HEADER = _Gen(one=_gen_request_header)
_REQUEST_CLAIMS = _Gen(many=_gen_request_claims)

# `when` keys matched by exact name, on the permission side and on the principal side.
_WHEN_PERMISSION = {_ATTR_DEST_IP: _DEST_IP, _ATTR_DEST_PORT: _DEST_PORT, _ATTR_CONN_SNI: _CONN_SNI}
_WHEN_PRINCIPAL = {
    _ATTR_SRC_IP: _SRC_IP,
    _ATTR_REMOTE_IP: _REMOTE_IP,
    _ATTR_SRC_NAMESPACE: _SRC_NAMESPACE,
    _ATTR_SRC_TRUST_DOMAIN: _SRC_TRUST_DOMAIN,
    _ATTR_SRC_SERVICE_ACCOUNT: _SRC_SERVICE_ACCOUNT,
    _ATTR_SRC_PRINCIPAL: _SRC_PRINCIPAL,
    _ATTR_REQUEST_PRINCIPAL: _REQUEST_PRINCIPAL,
    _ATTR_REQUEST_AUDIENCES: _REQUEST_AUDIENCES,
    _ATTR_REQUEST_PRESENTER: _REQUEST_PRESENTER,
}


def _new_model(rule: Rule) -> _Model:
    """model.go `New`. `when` conditions go to the permission or principal side by key and
    are appended after the fields of each `from`/`to`; those fields are inserted at the
    front in reverse, so the final order is principals, requestPrincipals,
    serviceAccounts, trustDomains, namespaces, remoteIpBlocks, ipBlocks, whens (and
    hosts, methods, paths, ports, whens on the permission side).

    A null entry in `from`/`to`/`when` is treated as the empty message protobuf decoding
    would produce (an empty condition has the unknown key "")."""
    base_perm = _RuleList()
    base_princ = _RuleList()
    for cond in rule.when or ():
        cond = cond or Condition()
        k = cond.key
        # Same precedence as Istio's switch: exact names and prefixes in this order.
        if k in _WHEN_PERMISSION:
            base_perm.append_last(_WHEN_PERMISSION[k], k, cond.values, cond.not_values)
        elif k.startswith(_ATTR_ENVOY_FILTER):
            base_perm.append_last(_ENVOY_FILTER, k, cond.values, cond.not_values)
        elif k in _WHEN_PRINCIPAL:
            base_princ.append_last(_WHEN_PRINCIPAL[k], k, cond.values, cond.not_values)
        elif k.startswith(_ATTR_REQUEST_HEADER):
            base_princ.append_last(_REQUEST_HEADER, k, cond.values, cond.not_values)
        elif k.startswith(_ATTR_REQUEST_CLAIMS):
            base_princ.append_last(_REQUEST_CLAIMS, k, cond.values, cond.not_values)
        else:
            raise _GenError(f"unknown attribute {k}")

    principals: list[_RuleList] = []
    for frm in rule.from_ or ():
        merged = base_princ.copy()
        s = (frm or From()).source
        if s is not None:
            merged.insert_front(_SRC_IP, _ATTR_SRC_IP, s.ip_blocks, s.not_ip_blocks)
            merged.insert_front(_REMOTE_IP, _ATTR_REMOTE_IP, s.remote_ip_blocks, s.not_remote_ip_blocks)
            merged.insert_front(_SRC_NAMESPACE, _ATTR_SRC_NAMESPACE, s.namespaces, s.not_namespaces)
            merged.insert_front(_SRC_TRUST_DOMAIN, _ATTR_SRC_TRUST_DOMAIN, s.trust_domains, s.not_trust_domains)
            merged.insert_front(
                _SRC_SERVICE_ACCOUNT, _ATTR_SRC_SERVICE_ACCOUNT, s.service_accounts, s.not_service_accounts
            )
            merged.insert_front(
                _REQUEST_PRINCIPAL, _ATTR_REQUEST_PRINCIPAL, s.request_principals, s.not_request_principals
            )
            merged.insert_front(_SRC_PRINCIPAL, _ATTR_SRC_PRINCIPAL, s.principals, s.not_principals)
        principals.append(merged)
    if not rule.from_:
        principals.append(base_princ)

    permissions: list[_RuleList] = []
    for to in rule.to or ():
        merged = base_perm.copy()
        o = (to or To()).operation
        if o is not None:
            merged.insert_front(_DEST_PORT, _ATTR_DEST_PORT, o.ports, o.not_ports)
            merged.insert_front(_PATH, _PATH_MATCHER, o.paths, o.not_paths)
            merged.insert_front(_METHOD, _METHOD_HEADER, o.methods, o.not_methods)
            merged.insert_front(_HOST, _HOST_HEADER, o.hosts, o.not_hosts)
        permissions.append(merged)
    if not rule.to:
        permissions.append(base_perm)

    return _Model(permissions=permissions, principals=principals)


def _migrate_trust_domain(model: _Model, bundle: _TrustDomainBundle) -> None:
    """model.go `MigrateTrustDomain`, in place. Shared `when` entries are visited (and
    rewritten) once per `from` alternative, exactly like Istio."""
    for rl in model.principals:
        for entry in rl.entries:
            if entry.key == _ATTR_SRC_PRINCIPAL:
                if entry.values:
                    entry.values = bundle.replace_trust_domain_aliases(entry.values)
                if entry.not_values:
                    entry.not_values = bundle.replace_trust_domain_aliases(entry.not_values)
            elif entry.key == _ATTR_SRC_TRUST_DOMAIN:
                if entry.values:
                    entry.values = bundle.expand_trust_domain_aliases(entry.values)
                if entry.not_values:
                    entry.not_values = bundle.expand_trust_domain_aliases(entry.not_values)


def _generate(model: _Model, for_tcp: bool, action: str, ctx: _Ctx) -> Json:
    """model.go `Generate`: permissions = OR over `to` (each an AND, `any` when empty),
    principals = OR over `from`. Raises _GenError when an ALLOW rule must be dropped."""
    permissions: list[Json] = []
    for rl in model.permissions:
        terms: list[Json] = []
        for entry in rl.entries:
            terms.extend(entry.build(for_tcp, action, ctx, permission=True))
        permissions.append(_perm_and(terms or [_perm_any()]))
    principals: list[Json] = []
    for rl in model.principals:
        ids: list[Json] = []
        for entry in rl.entries:
            ids.extend(entry.build(for_tcp, action, ctx, permission=False))
        principals.append(_princ_and(ids or [_princ_any()]))
    return {"permissions": permissions, "principals": principals}


# --------------------------------------------------------------------------------------
# Trust domain bundle (security/trustdomain)
# --------------------------------------------------------------------------------------


# Written from pilot/pkg/security/trustdomain/{bundle,util}.go, step for step, apart from the
# engine's own bundle (extproc/authz/compiler.py): the two are meant to agree only through the
# differential tests.


def _has_wildcard_suffix(pattern: str) -> bool:
    return pattern.endswith("*")


def _prefix_match(a: str, pattern: str) -> bool:
    """util.go prefixMatch: `pattern` ends in `*` and `a` starts with the rest."""
    if not _has_wildcard_suffix(pattern):
        return False
    return a.startswith(pattern.removesuffix("*"))


def _suffix_match(a: str, pattern: str) -> bool:
    """util.go suffixMatch: `pattern` starts with `*` and `a` ends with the rest."""
    if not pattern.startswith("*"):
        return False
    return a.endswith(pattern.removeprefix("*"))


def _td_string_match(a: str, domains: Sequence[str]) -> bool:
    """util.go stringMatch: exact, `*`, or a prefix or suffix wildcard on either side."""
    for s in domains:
        if a == s or s == "*":
            return True
        if _prefix_match(a, s) or _prefix_match(s, a) or _suffix_match(a, s) or _suffix_match(s, a):
            return True
    return False


def _spiffe_parts(principal: str) -> list[str] | None:
    """`<td>/ns/<ns>/sa/<sa>` split in its five parts; None for any other shape."""
    parts = principal.split("/")
    return parts if len(parts) == 5 else None


def _is_trust_domain_enforced(principal: str) -> bool:
    """bundle.go isTrustDomainBeingEnforced: SPIFFE-shaped and not `*` as the trust domain."""
    parts = _spiffe_parts(principal)
    return parts is not None and parts[0] != "*"


def _replace_trust_domain_in_principal(trust_domain: str, principal: str) -> str | None:
    parts = _spiffe_parts(principal)
    return None if parts is None else trust_domain + "/" + "/".join(parts[1:])


@dataclass(frozen=True, slots=True)
class _TrustDomainBundle:
    """bundle.go Bundle: the local trust domain first, then its aliases."""

    trust_domains: tuple[str, ...]

    def replace_trust_domain_aliases(self, principals: Sequence[str]) -> list[str]:
        """ReplaceTrustDomainAliases: a principal whose trust domain is in the bundle (or is
        "cluster.local", which stands for the local domain) becomes one principal per domain;
        any other principal is kept as written."""
        including_aliases: list[str] = []
        for principal in principals:
            if not _is_trust_domain_enforced(principal):
                including_aliases.append(principal)
                continue
            parts = _spiffe_parts(principal)
            assert parts is not None  # enforced implies SPIFFE-shaped
            from_principal = parts[0]
            if _td_string_match(from_principal, self.trust_domains) or from_principal == _DEFAULT_CLUSTER_LOCAL:
                including_aliases.extend(self._replace_trust_domains(principal, from_principal))
            else:
                including_aliases.append(principal)
        return including_aliases

    def _replace_trust_domains(self, principal: str, from_principal: str) -> list[str]:
        """replaceTrustDomains: a `*`-prefixed trust domain that matches a domain stays as
        written for it; otherwise the domain replaces it. No principal twice."""
        for_aliases: list[str] = []
        for td in self.trust_domains:
            new = principal if _suffix_match(td, from_principal) else _replace_trust_domain_in_principal(td, principal)
            if new is None:
                continue
            if new not in for_aliases:
                for_aliases.append(new)
        return for_aliases

    def expand_trust_domain_aliases(self, values: Sequence[str]) -> list[str]:
        """ExpandTrustDomainAliases: a value naming any domain of the bundle stands for all."""
        result: list[str] = []
        for v in values:
            if v in self.trust_domains:
                result.extend(self.trust_domains)
            else:
                result.append(v)
        unique: list[str] = []  # slices.FilterDuplicates: the first of each, in order
        for x in result:
            if x not in unique:
                unique.append(x)
        return unique


# --------------------------------------------------------------------------------------
# Builder (builder/builder.go)
# --------------------------------------------------------------------------------------


def _match_never() -> Json:
    """rbacPolicyMatchNever: what a policy without rules becomes (ALLOW: allow nothing).
    A fresh dict each time so callers may mutate the output."""
    return {"permissions": [_perm_not(_perm_any())], "principals": [_princ_not(_princ_any())]}


def _policy_name(namespace: str, name: str, index: int) -> str:
    return f"ns[{namespace}]-policy[{name}]-rule[{index}]"


def _is_dry_run(policy: AuthorizationPolicy) -> bool:
    value = policy.metadata.annotations.get(DRY_RUN_ANNOTATION)
    # An unparsable value is an error in istiod's log and counts as false.
    return bool(value is not None and _parse_go_bool(value))


@dataclass(slots=True)
class _Built:
    rules: Json | None
    shadow_rules: Json | None


def _build_action(
    policies: Sequence[AuthorizationPolicy],
    action: str,
    for_tcp: bool,
    bundle: _TrustDomainBundle,
    jwt_filter: str,
    jwt_payload_key: str,
) -> _Built:
    enforce: dict[str, Json] = {}
    shadow: dict[str, Json] = {}
    has_enforce = has_shadow = False
    for policy in policies:
        if _is_dry_run(policy):
            target, has_shadow = shadow, True
        else:
            target, has_enforce = enforce, True
        namespace = policy.metadata.namespace or ""
        ctx = _Ctx(policy_namespace=namespace, jwt_filter=jwt_filter, jwt_payload_key=jwt_payload_key)
        rules = policy.spec.rules or []
        for i, rule in enumerate(rules):
            if rule is None:
                continue  # istiod: "skipped nil rule"
            try:
                model = _new_model(rule)
            except _GenError:
                continue  # istiod: "skipped invalid rule" (whatever the action)
            _migrate_trust_domain(model, bundle)
            try:
                generated = _generate(model, for_tcp, action, ctx)
            except _GenError:
                continue  # only ALLOW gets here: the whole rule is dropped
            target[_policy_name(namespace, policy.metadata.name, i)] = generated
        if not rules:
            target[_policy_name(namespace, policy.metadata.name, 0)] = _match_never()

    def config(policies_by_name: dict[str, Json]) -> Json:
        return {"action": action, "policies": {k: policies_by_name[k] for k in sorted(policies_by_name)}}

    return _Built(
        rules=config(enforce) if has_enforce else None,
        shadow_rules=config(shadow) if has_shadow else None,
    )


def _shadow_stat_prefix(shadow_rules: Json | None) -> str:
    # Go's GetAction() on a nil RBAC is ALLOW, hence the allow prefix without shadow rules;
    # LOG (AUDIT) has no prefix.
    action = shadow_rules["action"] if shadow_rules is not None else "ALLOW"
    return {"ALLOW": SHADOW_ALLOW_STAT_PREFIX, "DENY": SHADOW_DENY_STAT_PREFIX}.get(action, "")


def _filter(built: _Built, for_tcp: bool) -> Json:
    typed: Json = {"@type": NETWORK_RBAC_TYPE if for_tcp else HTTP_RBAC_TYPE}
    if built.rules is not None:
        typed["rules"] = built.rules
    if for_tcp:
        typed["stat_prefix"] = TCP_STAT_PREFIX
    if built.shadow_rules is not None:
        typed["shadow_rules"] = built.shadow_rules
    prefix = _shadow_stat_prefix(built.shadow_rules)
    if prefix:
        typed["shadow_rules_stat_prefix"] = prefix
    return {"name": NETWORK_RBAC_FILTER if for_tcp else HTTP_RBAC_FILTER, "typed_config": typed}


def rbac_filters(
    policies: Sequence[AuthorizationPolicy],
    *,
    for_tcp: bool,
    trust_domain: str = _DEFAULT_CLUSTER_LOCAL,
    trust_domain_aliases: Sequence[str] = (),
    jwt_filter: str = "envoy.filters.http.jwt_authn",
    jwt_payload_key: str = "payload",
) -> list[Json]:
    """Envoy filter entries ({"name": "envoy.filters.http.rbac" or "envoy.filters.network.rbac",
    "typed_config": {"@type": ..., ...}}) for the ALLOW/DENY/AUDIT policies given (the caller has
    already chosen the policies that apply to the workload), in Istio's filter order.

    One filter per action that has policies, AUDIT (Envoy `LOG`) first, then DENY, then
    ALLOW; dry-run policies go to the filter's `shadow_rules`. CUSTOM policies are skipped.
    With `for_tcp` the network filter is produced and HTTP-only attributes are handled as
    istiod does on TCP chains (an ALLOW rule using one is dropped; in DENY/AUDIT only that
    condition is dropped).
    """
    bundle = _TrustDomainBundle((trust_domain, *trust_domain_aliases))
    by_action: Mapping[Action, list[AuthorizationPolicy]] = {
        action: [p for p in policies if p.spec.action == action] for action in (Action.AUDIT, Action.DENY, Action.ALLOW)
    }
    filters: list[Json] = []
    for action, group in by_action.items():
        if not group:
            continue
        built = _build_action(group, _RBAC_ACTION[action], for_tcp, bundle, jwt_filter, jwt_payload_key)
        filters.append(_filter(built, for_tcp))
    return filters

"""Value matchers with exactly the semantics of the Envoy matchers Istio generates.

Istio turns each AuthorizationPolicy value into an Envoy StringMatcher, HeaderMatcher,
CidrRange, MetadataMatcher or uri_template (istio/istio pilot/pkg/security/authz/
matcher and model/generator.go). We compile the same value into a Python predicate
with the same outcome, including Envoy's details:

* `*` becomes the RE2 regex `.+`, which needs a non-empty value without a newline
  (RE2's `.` does not match `\\n`), while a header `*` is a presence match;
* `ignore_case` in Envoy folds ASCII only;
* a list-valued JWT claim matches when any string element matches (ListMatcher
  one_of), and numbers and booleans never match a string matcher.

All regexes here are built from `re.escape`d policy literals, never from text a
request controls.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

StrPredicate = Callable[[str], bool]

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(s: str) -> str:
    return s.translate(_ASCII_LOWER)


def non_empty_single_line(s: str) -> bool:
    """RE2 full match of `.+`."""
    return bool(s) and "\n" not in s


def exact(v: str, ignore_case: bool = False) -> StrPredicate:
    if ignore_case:
        lv = ascii_lower(v)
        return lambda s: ascii_lower(s) == lv
    return v.__eq__


def prefix(v: str, ignore_case: bool = False) -> StrPredicate:
    if ignore_case:
        lv = ascii_lower(v)
        return lambda s: ascii_lower(s).startswith(lv)
    return lambda s: s.startswith(v)


def suffix(v: str, ignore_case: bool = False) -> StrPredicate:
    if ignore_case:
        lv = ascii_lower(v)
        return lambda s: ascii_lower(s).endswith(lv)
    return lambda s: s.endswith(v)


def regex(pattern: str) -> StrPredicate:
    """A full-match regex; Python's `.` excludes `\\n` exactly as RE2's default does."""
    compiled = re.compile(pattern)
    return lambda s: compiled.fullmatch(s) is not None


def istio_string(value: str, with_prefix: str = "") -> StrPredicate:
    """Istio's StringMatcherWithPrefix(value, prefix) (matcher/string.go)."""
    if value == "*":
        return non_empty_single_line
    if value.startswith("*"):
        if not with_prefix:
            return suffix(value[1:])
        return regex(re.escape(with_prefix) + ".*" + re.escape(value[1:]))
    if value.endswith("*"):
        return prefix(with_prefix + value[:-1])
    return exact(with_prefix + value)


def istio_header_value(value: str, ignore_case: bool = False) -> Callable[[str | None], bool]:
    """Istio's HeaderMatcher / HostMatcher: `*` is a presence match, not `.+`."""
    if value == "*":
        return lambda s: s is not None
    if value.startswith("*"):
        m = suffix(value[1:], ignore_case)
    elif value.endswith("*"):
        m = prefix(value[:-1], ignore_case)
    else:
        m = exact(value, ignore_case)
    return lambda s: s is not None and m(s)


def namespace_matcher(value: str) -> StrPredicate:
    """source.namespace: regex `.*/ns/<ns>/.*` where every `*` in the value is a glob."""
    ns = ".*".join(re.escape(part) for part in value.split("*"))
    return regex(f".*/ns/{ns}/.*")


def service_account_matcher(value: str, policy_namespace: str) -> StrPredicate:
    ns, sep, sa = value.partition("/")
    if not sep:
        ns, sa = policy_namespace, value
    return regex(f"spiffe://.+/ns/{re.escape(ns)}/(.+/|)sa/{re.escape(sa)}(/.+)?")


def trust_domain_matcher(value: str) -> StrPredicate:
    if value == "*":
        return prefix("spiffe://")
    if "*" not in value:
        return prefix(f"spiffe://{value}/")
    before, _, after = value.partition("*")
    return regex(f"spiffe://{re.escape(before)}[^/]*{re.escape(after)}/.*")


# --- request principals: iss and sub, split at the last "/" ----------------------------


def request_principal_matcher(value: str) -> Callable[[Any, Any], bool]:
    """Returns f(iss, sub) for one `requestPrincipals` value (model/generator.go)."""
    idx = value.rfind("/")
    found = idx >= 0
    iss, sub = (value[:idx], value[idx + 1 :]) if found else (value, "")
    match_iss: StrPredicate
    match_sub: StrPredicate
    if value == "*":
        match_iss = match_sub = non_empty_single_line
    elif value.startswith("*"):
        if found:
            match_iss = non_empty_single_line if iss == "*" else suffix(iss[1:])
            match_sub = exact(sub)
        else:
            match_iss = non_empty_single_line
            match_sub = suffix(value[1:])
    elif value.endswith("*"):
        if found:
            match_iss = exact(iss)
            match_sub = non_empty_single_line if sub == "*" else prefix(sub[:-1])
        else:
            match_iss = prefix(value[:-1])
            match_sub = non_empty_single_line
    else:
        match_iss, match_sub = exact(iss), exact(sub)

    def matches(iss_value: Any, sub_value: Any) -> bool:
        return (
            isinstance(iss_value, str) and isinstance(sub_value, str) and match_iss(iss_value) and match_sub(sub_value)
        )

    return matches


# --- metadata values (JWT claims, filter metadata) ----------------------------------


def metadata_lookup(root: Mapping[str, Any] | None, path: Sequence[str]) -> Any:
    """Envoy's Metadata::metadataValue: walk struct fields; anything else ends the walk."""
    value: Any = root
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
        if value is None:
            return None
    return value


def string_or_list_matcher(values: Sequence[str]) -> Callable[[Any], bool]:
    """OrMatch[ListMatch(one_of: OR(values)), OR(values)] over a metadata value."""
    preds = [istio_string(v) for v in values]

    def any_pred(s: str) -> bool:
        return any(p(s) for p in preds)

    def matches(value: Any) -> bool:
        if isinstance(value, str):
            return any_pred(value)
        if isinstance(value, list):
            return any(isinstance(e, str) and any_pred(e) for e in value)
        return False

    return matches


def envoy_filter_value_matcher(values: Sequence[str]) -> Callable[[Any], bool]:
    """experimental.envoy.filters.*: `[v]` is a list match, anything else a string match."""
    checks: list[Callable[[Any], bool]] = []

    def in_list(m: Callable[[str], bool]) -> Callable[[Any], bool]:
        return lambda x: isinstance(x, list) and any(isinstance(e, str) and m(e) for e in x)

    def string(m: Callable[[str], bool]) -> Callable[[Any], bool]:
        return lambda x: isinstance(x, str) and m(x)

    for v in values:
        if v.startswith("[") and v.endswith("]"):
            checks.append(in_list(istio_string(v.strip("[]"))))
        else:
            checks.append(string(istio_string(v)))
    return lambda x: any(c(x) for c in checks)


# --- addresses and ports -----------------------------------------------------------


def cidr_matcher(value: str) -> Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address | None], bool]:
    """A single IP is a /32 or /128; host bits are masked as Envoy's CidrRange does."""
    network = ipaddress.ip_network(value, strict=False)
    version = network.version
    net = int(network.network_address)
    mask = int(network.netmask)

    def matches(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        return ip is not None and ip.version == version and (int(ip) & mask) == net

    return matches


# --- paths ---------------------------------------------------------------------------

_PCHAR = r"a-zA-Z0-9\-._~%!$&'()+,;:@="
_PATH_GLOB = f"[{_PCHAR}]+"
_TEXT_GLOB = f"[{_PCHAR}/]*"


def contains_path_template(value: str) -> bool:
    return "{*}" in value or "{**}" in value


def path_template_matcher(value: str) -> StrPredicate:
    """Envoy's uri_template match of Istio's `{*}` / `{**}` paths (query and fragment stripped
    by the caller). `{*}` is one non-empty segment, `{**}` any run of characters and slashes."""
    template = value.replace("{**}", "**").replace("{*}", "*")
    segments = template[1:].split("/") if template.startswith("/") else template.split("/")
    parts: list[str] = []
    for seg in segments:
        if seg == "**":
            parts.append(_TEXT_GLOB)
        elif seg == "*":
            parts.append(_PATH_GLOB)
        else:
            parts.append(re.escape(seg))
    return regex("/" + "/".join(parts))

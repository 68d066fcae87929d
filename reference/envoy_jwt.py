"""Translate RequestAuthentications into Envoy's jwt_authn filter, as istiod does.

This is the reference side of the JWT differential tests and what the benchmark's
``native`` mode loads: the same resources extproc enforces, run through Envoy's own
jwt_authn filter instead. It follows istiod's ``convertToEnvoyJwtConfig``
(``pilot/pkg/security/authn/policy_applier.go``):

* one provider per jwtRule, rules sorted by issuer, each writing its payload to the
  ``payload`` metadata key (what the RBAC translation in ``reference/envoy_rbac.py`` reads);
* ``permission`` and ``scope`` are always space-delimited claims;
* a request with no token passes (``allow_missing``); an invalid token is rejected
  with 401 by jwt_authn itself. With several rules the requirement is "any provider,
  or all of them allowing missing", so one good token is enough;
* a rule with ``presence: REQUIRED`` loses its ``allow_missing``, and once any rule
  is REQUIRED the requirement is ``requires_all`` over every rule's own requirement
  (no "any provider" shortcut).

Only inline ``jwks`` is translated: istiod fetches ``jwksUri`` itself and inlines the
keys, which a static bootstrap cannot do, so a rule without ``jwks`` is an error here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

FILTER_NAME = "envoy.filters.http.jwt_authn"
PAYLOAD_KEY = "payload"
_TYPE = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"


def _provider(rule: Mapping[str, Any]) -> dict[str, Any]:
    if not rule.get("jwks"):
        raise ValueError(f"jwtRule for issuer {rule.get('issuer')!r} has no inline jwks (jwksUri is not translated)")
    p: dict[str, Any] = {
        "issuer": rule.get("issuer", ""),
        "payload_in_metadata": PAYLOAD_KEY,
        "normalize_payload_in_metadata": {
            "space_delimited_claims": sorted({*(rule.get("spaceDelimitedClaims") or []), "permission", "scope"})
        },
        "local_jwks": {"inline_string": rule["jwks"]},
    }
    if rule.get("audiences"):
        p["audiences"] = list(rule["audiences"])
    if rule.get("forwardOriginalToken"):
        p["forward"] = True
    if rule.get("outputPayloadToHeader"):
        p["forward_payload_header"] = rule["outputPayloadToHeader"]
    if rule.get("outputClaimToHeaders"):
        claims = rule["outputClaimToHeaders"]
        p["claim_to_headers"] = [{"header_name": c["header"], "claim_name": c["claim"]} for c in claims]
    if rule.get("fromHeaders"):
        p["from_headers"] = [{"name": h["name"], "value_prefix": h.get("prefix", "")} for h in rule["fromHeaders"]]
    if rule.get("fromParams"):
        p["from_params"] = list(rule["fromParams"])
    if rule.get("fromCookies"):
        p["from_cookies"] = list(rule["fromCookies"])
    return p


def jwt_authn_filter(request_authentications: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The HCM ``http_filters`` entry for these RequestAuthentication documents (dicts as in YAML)."""
    rules = [r for ra in request_authentications for r in (ra["spec"].get("jwtRules") or [])]
    rules = sorted(rules, key=lambda r: r.get("issuer", ""))  # stable, like Go's slices.SortBy
    providers: dict[str, Any] = {}
    inner_and: list[dict[str, Any]] = []
    outer_or: list[dict[str, Any]] = []
    any_required = False
    for i, rule in enumerate(rules):
        name = f"origins-{i}"
        providers[name] = _provider(rule)
        if rule.get("presence") == "REQUIRED":
            any_required = True
            inner_and.append({"provider_name": name})
        else:
            inner_and.append({"requires_any": {"requirements": [{"provider_name": name}, {"allow_missing": {}}]}})
        outer_or.append({"provider_name": name})
    if len(inner_and) == 1:
        requires = inner_and[0]
    elif any_required:
        requires = {"requires_all": {"requirements": inner_and}}
    else:
        requires = {"requires_any": {"requirements": [*outer_or, {"requires_all": {"requirements": inner_and}}]}}
    return {
        "name": FILTER_NAME,
        "typed_config": {
            "@type": _TYPE,
            "providers": providers,
            "rules": [{"match": {"prefix": "/"}, "requires": requires}],
            "bypass_cors_preflight": True,
        },
    }

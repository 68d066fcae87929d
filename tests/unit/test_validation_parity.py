"""Validation parity with Istio: a table of resources generated from Istio's validation
rules, each with the decision Istio takes, run through the code path of `extproc validate`
(`loader.load` over a config directory).

Istio decides in two places and both count, in this order:
  * the CRD schema the API server applies (istio/istio manifests/charts/base/files/
    crd-all.gen.yaml, from istio/api's protos): types, enums, min/max lengths, patterns,
    and its CEL rules (`x-kubernetes-validations`);
  * the validating webhook (istio/istio pkg/config/validation: ValidateAuthorizationPolicy,
    ValidateRequestAuthentication, ValidateTelemetry and validateMetadata around them, with
    pkg/config/security's value checks).

Each row names the rule it exercises, and the table is generated per rule: per field and per
kind of bad value, per resource kind where a rule is shared (metadata, selector, targetRef).
Expectations:
  * `accept`: Istio accepts; extproc loads it without a warning;
  * `warn`:   Istio accepts; extproc loads it with a warning naming the field, because it
              does not act on it (or acts differently, e.g. a sanitised label name);
  * `reject`: Istio refuses; extproc refuses the document, naming the field.
A few rows are documented deviations (`deviation` says why): extproc refuses what Istio's
webhook lets through but Envoy or istiod's generator would then refuse or silently drop.

`issue14=True` marks the twenty disagreements found when Istio's own tables were first run
through `extproc validate` (issue 14).
"""

from __future__ import annotations

import copy
import json
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config.errors import ConfigError
from extproc.snapshot import loader

ACCEPT, WARN, REJECT = "accept", "warn", "reject"

Doc = dict[str, Any]


@dataclass(frozen=True)
class Case:
    rule: str  # the Istio rule exercised, in words
    doc: Doc
    expect: str  # what extproc must do: accept, warn or reject
    field: str = ""  # the field the warning or error names (a prefix of the dotted path)
    istio: str = ""  # Istio's decision when it differs from extproc's (a deviation)
    deviation: str = ""  # why extproc deviates
    issue14: bool = False

    @property
    def istio_decision(self) -> str:
        return self.istio or (REJECT if self.expect == REJECT else ACCEPT)

    @property
    def id(self) -> str:
        return f"{self.doc['kind']}: {self.rule}"


# --- documents -------------------------------------------------------------------------------------


def resource(kind: str, spec: Doc, annotations: dict[str, str] | None = None, namespace: str = "foo") -> Doc:
    api = {"Telemetry": "telemetry.istio.io/v1"}.get(kind, "security.istio.io/v1")
    md: Doc = {"name": "r", "namespace": namespace}
    if annotations:
        md["annotations"] = annotations
    return {"apiVersion": api, "kind": kind, "metadata": md, "spec": spec}


JWKS = json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
                             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0", "kid": "k"}]})  # fmt: skip
PRIVATE_JWKS = json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "s"}]})

# A valid spec per kind, which loads without a warning; rules replace or add parts of it.
BASE: dict[str, Doc] = {
    "AuthorizationPolicy": {"rules": [{"to": [{"operation": {"methods": ["GET"], "ports": ["8080"]}}]}]},
    "RequestAuthentication": {"jwtRules": [{"issuer": "https://issuer.example", "jwks": JWKS}]},
    "Telemetry": {"metrics": [{"overrides": [{"tagOverrides": {"request_host": {"value": "request.host"}}}]}]},
}
KINDS = tuple(BASE)


def with_spec(kind: str, **changes: Any) -> Doc:
    spec = copy.deepcopy(BASE[kind])
    for k, v in changes.items():
        if v is _DROP:
            spec.pop(k, None)
        else:
            spec[k] = v
    return resource(kind, spec)


_DROP: Any = object()


def ap(**spec: Any) -> Doc:
    return with_spec("AuthorizationPolicy", **spec)


def ap_rule(rule: Doc, **spec: Any) -> Doc:
    return ap(rules=[rule], **spec)


def ra_rule(**fields: Any) -> Doc:
    rule: Doc = {"issuer": "https://issuer.example", "jwks": JWKS}
    for k, v in fields.items():
        if v is _DROP:
            rule.pop(k, None)
        else:
            rule[k] = v
    return with_spec("RequestAuthentication", jwtRules=[rule])


def tel(**spec: Any) -> Doc:
    return with_spec("Telemetry", **spec)


def tel_override(override: Doc) -> Doc:
    return tel(metrics=[{"overrides": [override]}])


def tag(name: str, override: Doc) -> Doc:
    return tel_override({"tagOverrides": {name: override}})


# --- rules shared by every kind: metadata, selector, targetRef ------------------------------------


def metadata_cases() -> Iterator[Case]:
    dry = "istio.io/dry-run"
    field = f"metadata.annotations.{dry}"
    for value in ("true", "false", "1", "0", "t", "F", "TRUE", "False"):
        for action in ("ALLOW", "DENY"):
            doc = ap(action=action)
            doc["metadata"]["annotations"] = {dry: value}
            yield Case(f"dry-run {value!r} on {action}", doc, ACCEPT)
    for value in ("yes", "", "on", "2"):
        doc = ap()
        doc["metadata"]["annotations"] = {dry: value}
        yield Case(f"dry-run {value!r} is not a Go bool", doc, REJECT, field)
    for action in ("AUDIT", "CUSTOM"):
        doc = ap(action=action, provider={"name": "ext"}) if action == "CUSTOM" else ap(action=action)
        doc["metadata"]["annotations"] = {dry: "true"}
        yield Case(f"dry-run on {action}", doc, REJECT, field)
    for kind in ("RequestAuthentication", "Telemetry"):
        doc = with_spec(kind)
        doc["metadata"]["annotations"] = {dry: "true"}
        yield Case(
            "dry-run only on an AuthorizationPolicy", doc, REJECT, field, issue14=kind == "RequestAuthentication"
        )
    for name in (
        "internal.istio.io/webhook-always-reject",
        "internal.istio.io/parent-namespace",
        "internal.istio.io/parents",
    ):
        for kind in KINDS:
            doc = with_spec(kind)
            doc["metadata"]["annotations"] = {name: "x"}
            yield Case(f"annotation {name} is refused", doc, REJECT, f"metadata.annotations.{name}")
    for kind in KINDS:
        doc = with_spec(kind)
        doc["metadata"]["annotations"] = {"example.com/owner": "team-a"}
        yield Case("other annotations are fine", doc, ACCEPT)


def selector_cases() -> Iterator[Case]:
    for kind in KINDS:
        yield Case("selector with labels", with_spec(kind, selector={"matchLabels": {"app": "web"}}), ACCEPT)
        yield Case("selector without labels warns", with_spec(kind, selector={}), WARN, "spec.selector")
        yield Case(
            "selector with empty matchLabels warns",
            with_spec(kind, selector={"matchLabels": {}}),
            WARN,
            "spec.selector",
        )
        bad = {"empty key": {"": "x"}, "wildcard key": {"a*": "x"}, "wildcard value": {"app": "we*b"}}
        bad["value over 63 chars"] = {"app": "v" * 64}
        for what, labels in bad.items():
            yield Case(
                f"selector {what}",
                with_spec(kind, selector={"matchLabels": labels}),
                REJECT,
                "spec.selector.matchLabels",
            )
        yield Case("label value of 63 chars", with_spec(kind, selector={"matchLabels": {"app": "v" * 63}}), ACCEPT)


VALID_TARGETS = [
    ("", "Service"),
    ("core", "Service"),
    ("networking.istio.io", "ServiceEntry"),
    ("gateway.networking.k8s.io", "Gateway"),
    ("gateway.networking.k8s.io", "GatewayClass"),
]
WRONG_TARGETS = [  # well-formed, but not a kind Istio lets a policy target
    ("apps", "Service", "wrong group"),
    ("gateway.networking.k8s.io", "Service", "wrong group"),
    ("", "Gateway", "wrong group"),
    ("networking.istio.io", "Gateway", "wrong group"),
    ("", "Deployment", "wrong kind"),
    ("gateway.networking.k8s.io", "HTTPRoute", "wrong kind"),
    ("networking.istio.io", "ServiceEntries", "wrong kind"),
]
MALFORMED_TARGETS = [  # the CRD's patterns and lengths
    ({"group": "__", "kind": "Service", "name": "s"}, "group"),
    ({"group": "Gateway.Networking.k8s.io", "kind": "Gateway", "name": "s"}, "group"),
    ({"group": "a" * 254, "kind": "Service", "name": "s"}, "group"),
    ({"group": "", "kind": "Serv_ice", "name": "s"}, "kind"),
    ({"group": "", "kind": "1Service", "name": "s"}, "kind"),
    ({"group": "", "kind": "S" * 64, "name": "s"}, "kind"),
    ({"group": "", "kind": "", "name": "s"}, "kind"),
    ({"group": "", "kind": "Service", "name": ""}, "name"),
    ({"group": "", "kind": "Service", "name": "n" * 254}, "name"),
    ({"group": "", "kind": "Service"}, "name"),
    ({"group": "", "name": "s"}, "kind"),
]


def target_ref_cases() -> Iterator[Case]:
    for kind in KINDS:
        for form in ("targetRef", "targetRefs"):

            def doc(ref: Doc, form: str = form, kind: str = kind) -> Doc:
                return with_spec(kind, **{form: ref if form == "targetRef" else [ref]})

            finding = kind != "Telemetry"  # issue 14: wrong refs were accepted on the security kinds
            where = f"spec.{form}" + ("" if form == "targetRef" else "[0]")
            for group, k in VALID_TARGETS:
                yield Case(
                    f"{form} to {group or '(no group)'}/{k}",
                    doc({"group": group, "kind": k, "name": "x"}),
                    WARN,
                    f"spec.{form}",
                    issue14=kind == "Telemetry" and (group, k) == ("", "Service") and form == "targetRef",
                )
            for group, k, what in WRONG_TARGETS:
                yield Case(
                    f"{form} {what} {group}/{k}",
                    doc({"group": group, "kind": k, "name": "x"}),
                    REJECT,
                    where,
                    issue14=finding and (group, k) in (("apps", "Service"), ("", "Deployment")),
                )
            for ns in ("other", "foo"):
                yield Case(
                    f"{form} with namespace {ns} (cross-namespace refs are not supported)",
                    doc({"group": "", "kind": "Service", "name": "x", "namespace": ns}),
                    REJECT,
                    f"{where}.namespace",
                    issue14=finding and ns == "other",
                )
            for ref, fld in MALFORMED_TARGETS:
                yield Case(f"{form} malformed {fld} {ref}", doc(ref), REJECT, where)
        svc = {"group": "", "kind": "Service", "name": "x"}
        yield Case(
            "selector and targetRef together",
            with_spec(kind, selector={"matchLabels": {"a": "b"}}, targetRef=svc),
            REJECT,
            "spec",
        )
        yield Case(
            "targetRef and targetRefs together", with_spec(kind, targetRef=svc, targetRefs=[svc]), REJECT, "spec"
        )
        yield Case("16 targetRefs", with_spec(kind, targetRefs=[svc] * 16), WARN, "spec.targetRefs")
        yield Case("17 targetRefs", with_spec(kind, targetRefs=[svc] * 17), REJECT, "spec.targetRefs")


# --- AuthorizationPolicy ------------------------------------------------------------------------------

SOURCE_FIELDS = [
    "principals",
    "notPrincipals",
    "requestPrincipals",
    "notRequestPrincipals",
    "namespaces",
    "notNamespaces",
    "serviceAccounts",
    "notServiceAccounts",
    "ipBlocks",
    "notIpBlocks",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
    "trustDomains",
    "notTrustDomains",
]
OPERATION_FIELDS = ["hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths"]
GOOD_SOURCE_VALUE = {
    "serviceAccounts": "ns/sa",
    "notServiceAccounts": "sa",
    "ipBlocks": "10.0.0.0/8",
    "notIpBlocks": "1.2.3.4",
    "remoteIpBlocks": "2001:db8::/32",
    "notRemoteIpBlocks": "::1",
    "trustDomains": "td.local",
    "notTrustDomains": "*.local",
}
GOOD_OPERATION_VALUE = {"ports": "8080", "notPorts": "0"}
HTTP_ONLY_WHEN = {
    "request.auth.principal": "iss/sub",
    "request.auth.audiences": "aud",
    "request.auth.presenter": "azp",
    "request.auth.claims[groups]": "admin",
    "request.auth.claims[a][b.c]": "x",
    "request.headers[x-user]": "alice",
}
TCP_WHEN = {
    "source.ip": "10.0.0.1",
    "remote.ip": "10.0.0.0/8",
    "source.namespace": "ns",
    "source.serviceAccount": "ns/sa",
    "source.principal": "cluster.local/ns/a/sa/b",
    "source.trustDomain": "cluster.local",
    "destination.ip": "10.0.0.2",
    "destination.port": "8080",
    "connection.sni": "example.com",
    "experimental.envoy.filters.network.mysql_proxy[db.table]": "[update]",
}


def src(**fields: Any) -> Doc:
    return {"from": [{"source": fields}]}


def op(**fields: Any) -> Doc:
    return {"to": [{"operation": fields}]}


def authorization_policy_cases() -> Iterator[Case]:
    # action, rules and provider
    yield Case("ALLOW without rules (denies everything)", ap(rules=_DROP), ACCEPT)
    yield Case("AUDIT without rules", ap(action="AUDIT", rules=_DROP), ACCEPT)
    yield Case("DENY without rules", ap(action="DENY", rules=_DROP), REJECT, "spec.rules")
    yield Case("DENY with rules: []", ap(action="DENY", rules=[]), REJECT, "spec.rules")
    yield Case("DENY with an empty rule (no HTTP attribute: no warning)", ap(action="DENY", rules=[{}]), ACCEPT)
    yield Case("unknown action", ap(action="REJECT"), REJECT, "spec.action")
    yield Case("lower-case action", ap(action="allow"), REJECT, "spec.action")
    yield Case("CUSTOM with provider", ap(action="CUSTOM", provider={"name": "ext"}), ACCEPT)
    yield Case("CUSTOM without rules", ap(action="CUSTOM", provider={"name": "ext"}, rules=_DROP), REJECT, "spec.rules")
    yield Case("CUSTOM without provider", ap(action="CUSTOM"), REJECT, "spec.provider")
    yield Case("CUSTOM with empty provider name", ap(action="CUSTOM", provider={"name": ""}), REJECT, "spec.provider")
    for action in ("ALLOW", "DENY", "AUDIT"):
        yield Case(f"provider with {action}", ap(action=action, provider={"name": "ext"}), REJECT, "spec.provider")
    for f in SOURCE_FIELDS[:6] + ["serviceAccounts", "notServiceAccounts", "trustDomains", "notTrustDomains"]:
        if f in ("ipBlocks",):
            continue
        value = GOOD_SOURCE_VALUE.get(f, "v")
        yield Case(
            f"CUSTOM rule with from.source.{f}",
            ap_rule(src(**{f: [value]}), action="CUSTOM", provider={"name": "ext"}),
            REJECT,
            f"spec.rules[0].from[0].source.{f}",
        )
    for key in ("source.namespace", "source.serviceAccount", "source.trustDomain", "source.principal", *HTTP_ONLY_WHEN):
        if key.startswith("request.headers"):
            continue
        yield Case(
            f"CUSTOM rule with when {key}",
            ap_rule({"when": [{"key": key, "values": ["x"]}]}, action="CUSTOM", provider={"name": "ext"}),
            REJECT,
            "spec.rules[0].when[0]",
        )
    yield Case(
        "CUSTOM rule with ipBlocks and headers",
        ap_rule(
            {**src(ipBlocks=["10.0.0.0/8"]), "when": [{"key": "request.headers[x]", "values": ["y"]}]},
            action="CUSTOM",
            provider={"name": "ext"},
        ),
        ACCEPT,
    )
    # rule structure
    yield Case("a null rule", ap(rules=[None]), REJECT, "spec.rules[0]")
    yield Case("an empty rule", ap(rules=[{}]), ACCEPT)
    yield Case("from: []", ap_rule({"from": []}), REJECT, "spec.rules[0].from")
    yield Case("from: [null]", ap_rule({"from": [None]}), REJECT, "spec.rules[0].from[0]")
    yield Case("from without source", ap_rule({"from": [{}]}), REJECT, "spec.rules[0].from[0].source")
    yield Case("empty source", ap_rule(src()), REJECT, "spec.rules[0].from[0].source")
    yield Case("to: []", ap_rule({"to": []}), REJECT, "spec.rules[0].to")
    yield Case("to: [null]", ap_rule({"to": [None]}), REJECT, "spec.rules[0].to[0]")
    yield Case("to without operation", ap_rule({"to": [{}]}), REJECT, "spec.rules[0].to[0].operation")
    yield Case("empty operation", ap_rule(op()), REJECT, "spec.rules[0].to[0].operation")
    yield Case("when: [null]", ap_rule({"when": [None]}), REJECT, "spec.rules[0].when[0]")
    yield Case("unknown field in a rule", ap_rule({"form": []}), REJECT, "spec.rules[0].form")
    yield Case("513 rules", ap(rules=[{}] * 513), REJECT, "spec.rules")
    # every source and operation field: a good value loads, an empty value is refused
    for f in SOURCE_FIELDS:
        yield Case(f"from.source.{f} with a value", ap_rule(src(**{f: [GOOD_SOURCE_VALUE.get(f, "v*")]})), ACCEPT)
        yield Case(f"from.source.{f} with ''", ap_rule(src(**{f: [""]})), REJECT, f"spec.rules[0].from[0].source.{f}")
        yield Case(f"from.source.{f} not a list", ap_rule(src(**{f: "v"})), REJECT, f"spec.rules[0].from[0].source.{f}")
    for f in OPERATION_FIELDS:
        yield Case(f"to.operation.{f} with a value", ap_rule(op(**{f: [GOOD_OPERATION_VALUE.get(f, "v")]})), ACCEPT)
        yield Case(f"to.operation.{f} with ''", ap_rule(op(**{f: [""]})), REJECT, f"spec.rules[0].to[0].operation.{f}")
    # serviceAccounts cannot be combined with principals or namespaces
    for other in ("principals", "notPrincipals", "namespaces", "notNamespaces"):
        for sa in ("serviceAccounts", "notServiceAccounts"):
            yield Case(
                f"{sa} with {other}", ap_rule(src(**{sa: ["ns/sa"], other: ["x"]})), REJECT, "spec.rules[0].from[0]"
            )
    yield Case(
        "serviceAccounts with requestPrincipals", ap_rule(src(serviceAccounts=["sa"], requestPrincipals=["*"])), ACCEPT
    )
    for sa in ("a/b/c", "*", "ns/*", "ns/", "/sa", "s" * 321):
        yield Case(
            f"serviceAccounts value {sa[:20]!r}",
            ap_rule(src(serviceAccounts=[sa])),
            REJECT,
            "spec.rules[0].from[0].source.serviceAccounts",
        )
    yield Case("16 serviceAccounts", ap_rule(src(serviceAccounts=[f"sa{i}" for i in range(16)])), ACCEPT)
    yield Case(
        "17 serviceAccounts",
        ap_rule(src(serviceAccounts=[f"sa{i}" for i in range(17)])),
        REJECT,
        "spec.rules[0].from[0].source.serviceAccounts",
    )
    for f in ("trustDomains", "notTrustDomains"):
        for td in ("*", "td*", "*.local"):
            yield Case(f"{f} {td!r}", ap_rule(src(**{f: [td]})), ACCEPT)
        for td in ("a*b", "**", "*a*", "a/b"):
            yield Case(f"{f} {td!r}", ap_rule(src(**{f: [td]})), REJECT, f"spec.rules[0].from[0].source.{f}")
    for f in ("ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks"):
        for ip in ("1.2.3.4", "10.0.0.0/8", "10.1.2.3/8", "::1", "2001:db8::/32", "0.0.0.0/0"):
            yield Case(f"{f} {ip}", ap_rule(src(**{f: [ip]})), ACCEPT)
        for ip in ("1.2.3.4/33", "300.0.0.1", "a.b.c.d", "1.2.3.4/abc", "1.2.3", "10.0.0.0/255.0.0.0", "::1/129"):
            yield Case(f"{f} {ip}", ap_rule(src(**{f: [ip]})), REJECT, f"spec.rules[0].from[0].source.{f}")
    for f in ("ports", "notPorts"):
        for port in ("1", "80", "65535"):
            yield Case(f"{f} {port}", ap_rule(op(**{f: [port]})), ACCEPT)
        for port in ("65536", "-1", "http", "8080-8090", " 80", "\u00b2"):
            yield Case(f"{f} {port!r}", ap_rule(op(**{f: [port]})), REJECT, f"spec.rules[0].to[0].operation.{f}")
    for f in ("paths", "notPaths"):
        for path in ("/a/{*}/b", "/{**}", "/a/{**}", "/a/{*}/{*}/c", "*", "/prefix*", "/api/v1.0/{*}"):
            yield Case(f"{f} {path}", ap_rule(op(**{f: [path]})), ACCEPT)
        for path in ("/a/{**}/b/{*}", "/{**}/{**}", "/a/x{*}", "/a/{x}", "/a/b c/{*}", "/a/{*}}"):
            yield Case(f"{f} {path}", ap_rule(op(**{f: [path]})), REJECT, f"spec.rules[0].to[0].operation.{f}")
    # `when`: every key Istio supports loads; others are refused
    for key, value in {**HTTP_ONLY_WHEN, **TCP_WHEN}.items():
        yield Case(f"when {key}", ap_rule({"when": [{"key": key, "values": [value]}]}), ACCEPT)
        yield Case(f"when {key} (notValues)", ap_rule({"when": [{"key": key, "notValues": [value]}]}), ACCEPT)
        yield Case(f"when {key} without values", ap_rule({"when": [{"key": key}]}), REJECT, "spec.rules[0].when[0]")
        yield Case(
            f"when {key} with ''", ap_rule({"when": [{"key": key, "values": [""]}]}), REJECT, "spec.rules[0].when[0]"
        )
    bad_keys = [
        "destination.namespace",
        "destination.labels[app]",
        "destination.name",
        "destination.user",
        "source.labels[app]",
        "request.method",
        "request.headers",
        "request.headers[]",
        "request.auth.claims",
        "request.auth.claims[]",
        "experimental.envoy.filters.a",
        "",
    ]
    for key in bad_keys:
        yield Case(
            f"when key {key!r}", ap_rule({"when": [{"key": key, "values": ["x"]}]}), REJECT, "spec.rules[0].when[0]"
        )
    yield Case("when without key", ap_rule({"when": [{"values": ["x"]}]}), REJECT, "spec.rules[0].when[0]")
    bad_values = {
        "source.ip": "300.1.1.1",
        "remote.ip": "1.2.3.4/40",
        "destination.ip": "nope",
        "destination.port": "99999",
        "source.serviceAccount": "a/b/c",
        "source.trustDomain": "a*b",
    }
    for key, value in bad_values.items():
        for side in ("values", "notValues"):
            yield Case(
                f"when {key} {side} {value}",
                ap_rule({"when": [{"key": key, side: [value]}]}),
                REJECT,
                f"spec.rules[0].when[0].{side}",
            )
    # DENY rules using only HTTP attributes deny all TCP traffic: Istio warns
    http_only = [op(methods=["GET"]), op(paths=["/a"]), src(requestPrincipals=["*"])]
    for rule in http_only:
        yield Case(f"DENY with HTTP-only {rule}", ap_rule(rule, action="DENY"), WARN, "spec.rules[0]")
    for rule in (op(ports=["80"]), op(methods=["GET"], ports=["80"]), src(ipBlocks=["10.0.0.0/8"])):
        yield Case(f"DENY with TCP attributes {rule}", ap_rule(rule, action="DENY"), ACCEPT)
    # documented deviations: Istio's webhook accepts a key istiod's generator then cannot use
    for key in ("request.headers[a][b]", "request.headersX[a]", "experimental.envoy.filters.[a]"):
        yield Case(
            f"when key {key!r}",
            ap_rule({"when": [{"key": key, "values": ["x"]}]}),
            REJECT,
            "spec.rules[0].when[0].key",
            istio=ACCEPT,
            deviation="istiod's generator cannot build a matcher from it and drops the rule (ALLOW) or the "
            "condition (DENY) at push time; extproc refuses it when the file is loaded",
        )


# --- RequestAuthentication -------------------------------------------------------------------------


def request_authentication_cases() -> Iterator[Case]:
    ra = "RequestAuthentication"
    yield Case("jwtRules: [null]", with_spec(ra, jwtRules=[None]), REJECT, "spec.jwtRules[0]", issue14=True)
    yield Case("jwtRules: []", with_spec(ra, jwtRules=[]), ACCEPT)
    yield Case("no jwtRules", with_spec(ra, jwtRules=_DROP), ACCEPT)
    # issuer, jwksUri and jwks: each absent, empty or set
    for issuer in (_DROP, "", "https://issuer.example"):
        for uri in (_DROP, "", "https://keys.example/jwks.json"):
            for jwks in (_DROP, JWKS):
                doc = ra_rule(issuer=issuer, jwksUri=uri, jwks=jwks)
                name = f"issuer {_show(issuer)}, jwksUri {_show(uri)}, jwks {_show(jwks, 'set')}"
                if issuer == "" or uri == "":
                    yield Case(name, doc, REJECT, "spec.jwtRules[0]")  # the CRD: minLength 1 when set
                elif uri is not _DROP and jwks is not _DROP:
                    yield Case(name, doc, REJECT, "spec.jwtRules[0]")  # only one of jwks or jwksUri
                elif issuer is _DROP and uri is _DROP:
                    yield Case(name, doc, REJECT, "spec.jwtRules[0]")  # issuer or jwksUri must be set
                else:
                    yield Case(name, doc, ACCEPT, issue14=issuer is _DROP and jwks is _DROP)
    yield Case("jwks_uri spelling with jwks", ra_rule(jwks_uri="https://k.example/j"), REJECT, "spec.jwtRules[0]")
    yield Case("jwks_uri spelling", ra_rule(jwks=_DROP, jwks_uri="https://k.example/j"), ACCEPT)
    for uri in ("http://k.example/j", "https://k.example:8443/j", "HTTPS://k.example/j"):
        yield Case(f"jwksUri {uri}", ra_rule(jwks=_DROP, jwksUri=uri), ACCEPT)
    for uri in ("ftp://k.example/j", "hTPp\\\\blah", "//k.example/j", "k.example/j", "https://k.example:port/j"):
        yield Case(f"jwksUri {uri}", ra_rule(jwks=_DROP, jwksUri=uri), REJECT, "spec.jwtRules[0].jwksUri")
    yield Case("jwksUri of 2049 chars", ra_rule(jwks=_DROP, jwksUri="https://k/" + "a" * 2039), REJECT, "spec.jwtRules")
    yield Case(
        "jwksUri without a host",
        ra_rule(jwks=_DROP, jwksUri="https:///j"),
        WARN,
        "spec.jwtRules[0].jwksUri",
    )
    for jwks in ("nope", '{"keys": 3}', "{}"):
        yield Case(f"jwks {jwks}", ra_rule(jwks=jwks), REJECT, "spec.jwtRules[0].jwks")
    yield Case("jwks with private key material", ra_rule(jwks=PRIVATE_JWKS), WARN, "spec.jwtRules[0].jwks")
    # list fields: an empty string is refused
    for f in ("audiences", "fromParams", "fromCookies", "spaceDelimitedClaims"):
        yield Case(f"{f}: ['x']", ra_rule(**{f: ["x"]}), ACCEPT)
        yield Case(f"{f}: ['']", ra_rule(**{f: [""]}), REJECT, f"spec.jwtRules[0].{f}[0]")
    yield Case("64 spaceDelimitedClaims", ra_rule(spaceDelimitedClaims=[f"c{i}" for i in range(64)]), ACCEPT)
    yield Case(
        "65 spaceDelimitedClaims",
        ra_rule(spaceDelimitedClaims=[f"c{i}" for i in range(65)]),
        REJECT,
        "spec.jwtRules[0].spaceDelimitedClaims",
    )
    yield Case(
        "spaceDelimitedClaims with a dotted name", ra_rule(spaceDelimitedClaims=["provider.login.scope"]), ACCEPT
    )
    headers = {
        "fromHeaders name and prefix": ([{"name": "x-jwt", "prefix": "Bearer "}], ACCEPT),
        "fromHeaders without prefix": ([{"name": "x-jwt"}], ACCEPT),
        "fromHeaders without name": ([{"prefix": "Bearer "}], REJECT),
        "fromHeaders with empty name": ([{"name": ""}], REJECT),
        "fromHeaders: [null]": ([None], REJECT),
    }
    for what, (value, expect) in headers.items():
        yield Case(what, ra_rule(fromHeaders=value), expect, "" if expect == ACCEPT else "spec.jwtRules[0].fromHeaders")
    claims = {
        "outputClaimToHeaders ok": ([{"header": "x-sub", "claim": "sub"}], ACCEPT),
        "outputClaimToHeaders nested claim": ([{"header": "x_team", "claim": "org.team"}], ACCEPT),
        "outputClaimToHeaders: [null]": ([None], REJECT),
        "outputClaimToHeaders empty claim": ([{"header": "x", "claim": ""}], REJECT),
        "outputClaimToHeaders empty header": ([{"header": "", "claim": "sub"}], REJECT),
        "outputClaimToHeaders no header": ([{"claim": "sub"}], REJECT),
        "outputClaimToHeaders header ':authority'": ([{"header": ":authority", "claim": "sub"}], REJECT),
        "outputClaimToHeaders header 'x y'": ([{"header": "x y", "claim": "sub"}], REJECT),
    }
    for what, (value, expect) in claims.items():
        yield Case(
            what, ra_rule(outputClaimToHeaders=value), expect, "" if expect == ACCEPT else "spec.jwtRules[0].output"
        )
    for timeout, expect in (("5s", ACCEPT), ("1ms", ACCEPT), ("1.5s", ACCEPT), ("0s", REJECT), ("500us", REJECT)):
        yield Case(f"timeout {timeout}", ra_rule(timeout=timeout), expect, "spec.jwtRules[0].timeout")
    for timeout in ("1500us", "apple", "-1s", "5"):
        yield Case(f"timeout {timeout}", ra_rule(timeout=timeout), REJECT, "spec.jwtRules[0].timeout")
    for presence in ("OPTIONAL", "REQUIRED"):
        yield Case(f"presence {presence}", ra_rule(presence=presence), ACCEPT, issue14=presence == "REQUIRED")
    for presence in ("MANDATORY", "required", ""):
        yield Case(f"presence {presence!r}", ra_rule(presence=presence), REJECT, "spec.jwtRules[0].presence")
    yield Case("forwardOriginalToken 'yes'", ra_rule(forwardOriginalToken="yes"), REJECT, "spec.jwtRules[0].forward")
    yield Case("forwardOriginalToken true", ra_rule(forwardOriginalToken=True), ACCEPT)
    yield Case("outputPayloadToHeader ok", ra_rule(outputPayloadToHeader="x-jwt-payload"), ACCEPT)
    yield Case("unknown field in a rule", ra_rule(issuers=["x"]), REJECT, "spec.jwtRules[0].issuers")
    yield Case(
        "outputPayloadToHeader ':path'",
        ra_rule(outputPayloadToHeader=":path"),
        REJECT,
        "spec.jwtRules[0].outputPayloadToHeader",
        istio=ACCEPT,
        deviation="Istio's webhook does not check it, but Envoy refuses the jwt_authn config (its "
        "forward_payload_header must be a valid header name), so the workload's listener update fails",
    )


def _show(v: Any, set_name: str = "") -> str:
    return "absent" if v is _DROP else (set_name or repr(v)) if v else "''"


# --- Telemetry ---------------------------------------------------------------------------------------

METRICS = [
    "ALL_METRICS",
    "REQUEST_COUNT",
    "REQUEST_DURATION",
    "REQUEST_SIZE",
    "RESPONSE_SIZE",
    "TCP_OPENED_CONNECTIONS",
    "TCP_CLOSED_CONNECTIONS",
    "TCP_SENT_BYTES",
    "TCP_RECEIVED_BYTES",
    "GRPC_REQUEST_MESSAGES",
    "GRPC_RESPONSE_MESSAGES",
]
GOOD_FILTERS = [
    "true",
    "response.code >= 400",
    "response.code >= 400 || xds.cluster_name == 'x'",
    "request.headers['x-debug'] == 'on' && !(response.flags in ['UF', 'NR'])",
    "has(request.headers.foo) ? 1u : 2.5e3",
    "size(request.path) > 10 && request.path.startsWith('/api')",
    "[1, 2, 3].exists(x, x > 2)",
    "{'a': 1}['a'] == 1",
    "unknown_attribute.anything",
    "r'raw\\d' + b'bytes' == '''x'''",
    "-1 < 0 ? a.b.c : .d.e",
    "x.y.Z{f: 1}",
    "// a comment\ntrue",
]
BAD_FILTERS = [
    "",
    "response.code >=",
    "response.code >= 400 &&",
    "(((",
    "foo(",
    "a.b.",
    "'unterminated",
    "'bad \\q escape'",
    "if",
    "has(a)",
    "[1].all(1, true)",
    "a ? b",
    "1 = 1",
    "a[?0]",
    "18446744073709551616u",
    "x $ y",
]


def telemetry_cases() -> Iterator[Case]:
    # metrics: providers, reportingInterval, overrides
    yield Case("metrics provider prometheus", tel(metrics=[{"providers": [{"name": "prometheus"}]}]), ACCEPT)
    yield Case(
        "metrics provider not served",
        tel(metrics=[{"providers": [{"name": "stackdriver"}]}]),
        WARN,
        "spec.metrics[0].providers[0].name",
    )
    for what, providers in (("empty name", [{"name": ""}]), ("no name", [{}]), ("null", [None])):
        yield Case(f"metrics provider {what}", tel(metrics=[{"providers": providers}]), REJECT, "spec.metrics[0]")
    yield Case("metrics: [null]", tel(metrics=[None]), REJECT, "spec.metrics[0]")
    yield Case("overrides: [null]", tel(metrics=[{"overrides": [None]}]), REJECT, "spec.metrics[0].overrides[0]")
    yield Case("reportingInterval 5s", tel(metrics=[{"reportingInterval": "5s"}]), WARN, "spec.metrics[0].reporting")
    for interval in ("0s", "500us", "apple"):
        yield Case(
            f"reportingInterval {interval}",
            tel(metrics=[{"reportingInterval": interval}]),
            REJECT,
            "spec.metrics[0].reportingInterval",
        )
    for metric in METRICS:
        yield Case(f"match metric {metric}", tel_override({"match": {"metric": metric}, "disabled": False}), ACCEPT)
    yield Case("match metric unknown", tel_override({"match": {"metric": "REQUESTS"}}), REJECT, "spec.metrics[0]")
    for mode in ("CLIENT", "SERVER", "CLIENT_AND_SERVER"):
        yield Case(f"match mode {mode}", tel_override({"match": {"mode": mode}, "disabled": True}), ACCEPT)
    yield Case("match mode unknown", tel_override({"match": {"mode": "BOTH"}}), REJECT, "spec.metrics[0]")
    yield Case(
        "customMetric",
        tel_override({"match": {"customMetric": "my_metric"}, "disabled": True}),
        WARN,
        "spec.metrics[0].overrides[0].match.customMetric",
        issue14=True,
    )
    yield Case("customMetric ''", tel_override({"match": {"customMetric": ""}}), REJECT, "spec.metrics[0]")
    yield Case(
        "metric and customMetric",
        tel_override({"match": {"metric": "REQUEST_COUNT", "customMetric": "x"}}),
        REJECT,
        "spec.metrics[0].overrides[0].match",
    )
    yield Case("disabled 'yes'", tel_override({"disabled": "yes"}), REJECT, "spec.metrics[0].overrides[0].disabled")
    # tag overrides: operation x value, as the CRD's CEL rules and validateTelemetryMetrics decide
    for operation in (_DROP, "UPSERT", "REMOVE", "DELETE"):
        for value in (_DROP, "", "request.host"):
            override: Doc = {}
            if operation is not _DROP:
                override["operation"] = operation
            if value is not _DROP:
                override["value"] = value
            name = f"tag override operation {_show(operation)}, value {_show(value)}"
            if operation == "DELETE":
                yield Case(name, tag("request_host", override), REJECT, "spec.metrics[0]")
            elif operation == "REMOVE":
                ok = value is _DROP
                yield Case(
                    name,
                    tag("request_host", override),
                    ACCEPT if ok else REJECT,
                    "" if ok else "spec.metrics[0].overrides[0].tagOverrides.request_host",
                    issue14=value == "request.host",
                )
            else:
                ok = bool(value) and value is not _DROP
                yield Case(
                    name,
                    tag("request_host", override),
                    ACCEPT if ok else REJECT,
                    "" if ok else "spec.metrics[0].overrides[0].tagOverrides.request_host",
                )
    yield Case("tag override null", tag("x", None), REJECT, "spec.metrics[0].overrides[0].tagOverrides.x")  # type: ignore[arg-type]
    # tag names: Istio checks none (an empty one is a warning); Prometheus needs [a-zA-Z_][a-zA-Z0-9_]*
    for name in ("my_tag", "_x", "Tag2"):
        yield Case(f"tag name {name!r}", tag(name, {"value": "'v'"}), ACCEPT)
    for name in ("my-tag", "1st", "a.b", "ünï"):
        yield Case(
            f"tag name {name!r}",
            tag(name, {"value": "'v'"}),
            WARN,
            f"spec.metrics[0].overrides[0].tagOverrides.{name}",
            issue14=name == "my-tag",
        )
    yield Case("tag name ''", tag("", {"value": "'v'"}), WARN, "spec.metrics[0].overrides[0].tagOverrides")
    for name in ("le", "__name__", "istio_requests_total"):
        yield Case(
            f"tag name {name!r}",
            tag(name, {"value": "'v'"}),
            REJECT,
            f"spec.metrics[0].overrides[0].tagOverrides.{name}",
            istio=ACCEPT,
            deviation="Istio does not check tag names, but this one breaks the exposition extproc serves "
            "(a second `le` on a histogram, a reserved name, or a label named like a metric series)",
        )
    # tag values: Istio does not check them; the proxy reports what it cannot evaluate as `unknown`
    for value in ("request.host", "'literal'", "response.code >= 500 ? 'error' : 'ok'", "request.headers['x-user']"):
        yield Case(f"tag value {value!r}", tag("t", {"value": value}), ACCEPT)
    for value in ("add", "request.size()", "((", "request.hots", "1.5"):
        yield Case(
            f"tag value {value!r}",
            tag("t", {"value": value}),
            WARN,
            "spec.metrics[0].overrides[0].tagOverrides.t.value",
            issue14=value == "add",
        )
    # tracing: validated, then ignored (extproc's tracing has its own settings)
    for pct in (0, 54.54, 100, 100.0):
        yield Case(
            f"randomSamplingPercentage {pct}", tel(tracing=[{"randomSamplingPercentage": pct}]), WARN, "spec.tracing"
        )
    for pct in (-1, -0.5, 100.5, 101):
        yield Case(
            f"randomSamplingPercentage {pct}",
            tel(tracing=[{"randomSamplingPercentage": pct}]),
            REJECT,
            "spec.tracing[0].randomSamplingPercentage",
            issue14=pct == 101,
        )
    yield Case(
        "randomSamplingPercentage '50'", tel(tracing=[{"randomSamplingPercentage": "50"}]), REJECT, "spec.tracing"
    )
    yield Case("two tracing entries", tel(tracing=[{}, {}]), WARN, "spec.tracing")
    yield Case("tracing: [null]", tel(tracing=[None]), REJECT, "spec.tracing[0]")
    yield Case("tracing provider ''", tel(tracing=[{"providers": [{"name": ""}]}]), REJECT, "spec.tracing[0].providers")
    yield Case(
        "tracing two providers", tel(tracing=[{"providers": [{"name": "a"}, {"name": "b"}]}]), WARN, "spec.tracing"
    )
    yield Case(
        "tracing match mode bad", tel(tracing=[{"match": {"mode": "ALL"}}]), REJECT, "spec.tracing[0].match.mode"
    )
    tags = {
        "literal": ({"literal": {"value": "v"}}, WARN),
        "header": ({"header": {"name": "x-h", "defaultValue": "d"}}, WARN),
        "environment": ({"environment": {"name": "POD"}}, WARN),
        "formatter": ({"formatter": {"value": "%REQ(:PATH)%"}}, WARN),
        "no type": ({}, WARN),
        "empty literal": ({"literal": {"value": ""}}, REJECT),
        "empty header name": ({"header": {"name": ""}}, REJECT),
        "empty environment name": ({"environment": {"name": ""}}, REJECT),
        "empty formatter": ({"formatter": {"value": ""}}, REJECT),
        "literal and header": ({"literal": {"value": "v"}, "header": {"name": "h"}}, REJECT),
        "null": (None, REJECT),
    }
    for what, (custom, expect) in tags.items():
        yield Case(
            f"custom tag {what}",
            tel(tracing=[{"customTags": {"t": custom}}]),
            expect,
            "spec.tracing" if expect == WARN else "spec.tracing[0].customTags.t",
        )
    yield Case(
        "custom tag with empty name",
        tel(tracing=[{"customTags": {"": {"literal": {"value": "v"}}}}]),
        REJECT,
        "spec.tracing[0]",
    )
    for flag in (
        "disableSpanReporting",
        "useRequestIdForTraceSampling",
        "enableIstioTags",
        "disableContextPropagation",
    ):
        yield Case(f"tracing {flag}", tel(tracing=[{flag: True}]), WARN, "spec.tracing")
        yield Case(f"tracing {flag} 'yes'", tel(tracing=[{flag: "yes"}]), REJECT, f"spec.tracing[0].{flag}")
    # access logging: validated (the filter must parse as CEL), then ignored (Envoy writes the logs)
    for expr in GOOD_FILTERS:
        yield Case(
            f"access log filter {expr!r}",
            tel(accessLogging=[{"filter": {"expression": expr}}]),
            WARN,
            "spec.accessLogging",
        )
    for expr in BAD_FILTERS:
        yield Case(
            f"access log filter {expr!r}",
            tel(accessLogging=[{"filter": {"expression": expr}}]),
            REJECT,
            "spec.accessLogging[0].filter.expression",
            issue14=expr == "response.code >=",
        )
    yield Case("access log filter {}", tel(accessLogging=[{"filter": {}}]), REJECT, "spec.accessLogging[0].filter")
    yield Case("access log disabled", tel(accessLogging=[{"disabled": True}]), WARN, "spec.accessLogging")
    yield Case("accessLogging: [null]", tel(accessLogging=[None]), REJECT, "spec.accessLogging[0]")
    yield Case(
        "access log provider ''",
        tel(accessLogging=[{"providers": [{"name": ""}]}]),
        REJECT,
        "spec.accessLogging[0].providers",
    )
    yield Case(
        "access log mode bad", tel(accessLogging=[{"match": {"mode": "X"}}]), REJECT, "spec.accessLogging[0].match"
    )


GENERATORS: list[Callable[[], Iterator[Case]]] = [
    metadata_cases,
    selector_cases,
    target_ref_cases,
    authorization_policy_cases,
    request_authentication_cases,
    telemetry_cases,
]
CASES = [c for gen in GENERATORS for c in gen()]


# --- running a case as `extproc validate` does ----------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    decision: str  # accept, warn or reject
    fields: tuple[str, ...]  # the fields of the errors (reject) or warnings (warn)
    text: str


def run(case: Case, tmp_path: Path) -> Outcome:
    d = tmp_path / "cfg"
    d.mkdir(exist_ok=True)
    for f in d.iterdir():
        f.unlink()
    (d / "r.yaml").write_text(yaml.safe_dump(case.doc, sort_keys=False, allow_unicode=True))
    try:
        loaded = loader.load([d])
    except ConfigError as e:
        errors = [i for i in e.issues if not i.warning]
        return Outcome(REJECT, tuple(i.field for i in errors), "\n".join(i.render() for i in errors))
    if loaded.warnings:
        return Outcome(WARN, tuple(i.field for i in loaded.warnings), "\n".join(i.render() for i in loaded.warnings))
    return Outcome(ACCEPT, (), "")


def agrees_with_istio(case: Case, outcome: Outcome) -> bool:
    if outcome.decision not in (ACCEPT, WARN, REJECT):
        return False
    return (outcome.decision == REJECT) == (case.istio_decision == REJECT)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_extproc_decides_as_istio(case: Case, tmp_path: Path) -> None:
    out = run(case, tmp_path)
    assert out.decision == case.expect, f"{case.rule}: want {case.expect}, got {out.decision}\n{out.text}"
    if case.field and out.decision != ACCEPT:
        assert any(f.startswith(case.field) for f in out.fields), f"no issue names {case.field}:\n{out.text}"
    if out.decision != ACCEPT:
        # every issue names the file, the document and the resource
        for line in out.text.splitlines():
            assert "r.yaml: document 1 (" in line and f"{case.doc['kind']} foo/r" in line, line


def test_the_table_covers_every_finding_of_issue_14() -> None:
    findings = [c for c in CASES if c.issue14]
    accepted_by_istio = [c for c in findings if c.istio_decision == ACCEPT]
    assert (len(findings) - len(accepted_by_istio), len(accepted_by_istio)) >= (14, 6)


def test_deviations_are_few_and_explained() -> None:
    deviations = [c for c in CASES if c.istio_decision != (REJECT if c.expect == REJECT else ACCEPT)]
    assert all(c.deviation for c in deviations)
    assert len(deviations) <= len(CASES) // 50


def test_the_validate_command_reports_a_warning_with_file_document_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from extproc.cli import main

    d = tmp_path / "cfg"
    d.mkdir()
    docs = [
        tel_override({"match": {"customMetric": "my_metric"}}),
        ra_rule(jwks=_DROP, issuer=_DROP, jwksUri="https://k/j"),
    ]
    (d / "t.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    assert main(["validate", "--config-dir", str(d)]) == 0
    err = capsys.readouterr().err
    assert f"{d}/t.yaml: document 1 (Telemetry foo/r), line " in err
    assert ": warning: spec.metrics[0].overrides[0].match.customMetric: ignored: " in err
    (d / "t.yaml").write_text(yaml.safe_dump(ra_rule(presence="MANDATORY"), sort_keys=False))
    assert main(["validate", "--config-dir", str(d)]) == 1
    assert "spec.jwtRules[0].presence: unsupported value 'MANDATORY'" in capsys.readouterr().err


if __name__ == "__main__":  # figures for the report: python -m tests.unit.test_validation_parity
    import tempfile

    def run_or_crash(case: Case, tmp: Path) -> Outcome:
        try:
            return run(case, tmp)
        except Exception as e:  # an older extproc may crash on a value; that agrees with nothing
            return Outcome(f"crash ({type(e).__name__})", (), str(e))

    with tempfile.TemporaryDirectory() as tmp:
        results = [(c, run_or_crash(c, Path(tmp))) for c in CASES]
    agree = sum(agrees_with_istio(c, o) for c, o in results)
    exact = sum(o.decision == c.expect for c, o in results)
    findings = [(c, o) for c, o in results if c.issue14]
    print(f"cases: {len(CASES)}; agree with Istio (accept/reject): {agree}; as expected (accept/warn/reject): {exact}")
    print(f"issue 14 findings: {len(findings)}, agreeing: {sum(agrees_with_istio(c, o) for c, o in findings)}")
    for c, o in results:
        if not agrees_with_istio(c, o):
            print(textwrap.shorten(f"  differs: {c.id}: Istio {c.istio_decision}, extproc {o.decision}", 160))

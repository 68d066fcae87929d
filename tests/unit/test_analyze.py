"""`extproc analyze`: each analyzer on the situations of Istio's analyzer tests (istio/istio
`pkg/config/analysis/analyzers`, authz and telemetry), written as our own cases, and the CLI's
output formats and exit status (istioctl's 79)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from extproc import analyze
from extproc.cli import main
from extproc.snapshot import loader

AP = "security.istio.io/v1"


def _write(tmp: Path, text: str) -> Path:
    d = tmp / "cfg"
    d.mkdir(exist_ok=True)
    (d / "config.yaml").write_text(textwrap.dedent(text))
    return d


def _run(tmp: Path, text: str, *workloads: str) -> list[analyze.Message]:
    d = _write(tmp, text)
    return analyze.Analysis(loader.load([d]), [analyze.parse_workload(w) for w in workloads]).run()


def _codes(messages: list[analyze.Message]) -> list[tuple[str, str]]:
    return [(m.code, m.origin) for m in messages]


SELECTORS = f"""\
apiVersion: {AP}
kind: AuthorizationPolicy
metadata: {{name: matches, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: cart}}}}
  rules: [{{}}]
---
apiVersion: {AP}
kind: AuthorizationPolicy
metadata: {{name: no-such-app, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: payments}}}}
  rules: [{{}}]
---
apiVersion: {AP}
kind: AuthorizationPolicy
metadata: {{name: empty-namespace, namespace: quiet}}
spec: {{rules: [{{}}]}}
---
apiVersion: {AP}
kind: AuthorizationPolicy
metadata: {{name: mesh-selector, namespace: istio-system}}
spec:
  selector: {{matchLabels: {{app: cart}}}}
  rules: [{{}}]
---
apiVersion: {AP}
kind: AuthorizationPolicy
metadata: {{name: mesh-nothing, namespace: istio-system}}
spec:
  selector: {{matchLabels: {{app: nothing}}}}
  rules: [{{}}]
---
apiVersion: {AP}
kind: RequestAuthentication
metadata: {{name: ra-nothing, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: nothing}}}}
  jwtRules: [{{issuer: https://issuer.example}}]
"""


def test_selectors_that_match_no_workload(tmp_path: Path) -> None:
    got = _run(tmp_path, SELECTORS, "shop:app=cart,version=v1")
    assert sorted(_codes(got)) == [
        ("IST0127", "AuthorizationPolicy istio-system/mesh-nothing"),
        ("IST0127", "AuthorizationPolicy quiet/empty-namespace"),
        ("IST0127", "AuthorizationPolicy shop/no-such-app"),
        ("IST0127", "RequestAuthentication shop/ra-nothing"),
    ]
    m = next(m for m in got if m.origin.endswith("no-such-app"))
    assert m.level is analyze.Level.WARNING
    assert m.message == "No matching workloads for this resource with the following labels: app=payments"
    assert m.reference.endswith("config.yaml:12")  # the selector of the second document


def test_without_known_workloads_the_matching_analyzers_stay_quiet(tmp_path: Path) -> None:
    assert _run(tmp_path, SELECTORS) == []


def test_workload_entries_are_known_workloads(tmp_path: Path) -> None:
    text = SELECTORS + textwrap.dedent(
        """\
        ---
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata: {name: payments-vm, namespace: shop}
        spec: {address: 10.0.0.5, labels: {app: payments}}
        """
    )
    got = _codes(_run(tmp_path, text, "shop:app=cart"))
    assert ("IST0127", "AuthorizationPolicy shop/no-such-app") not in got


def test_namespaces_nothing_uses(tmp_path: Path) -> None:
    text = f"""\
    apiVersion: {AP}
    kind: AuthorizationPolicy
    metadata: {{name: from-namespaces, namespace: shop}}
    spec:
      rules:
      - from:
        - source:
            namespaces: ["shop", "bazz", "prod-*", "*-staging", "*"]
            notNamespaces: ["nowhere"]
            principals: ["cluster.local/ns/ghost/sa/x", "cluster.local/ns/shop/sa/cart", "*"]
    """
    got = _run(tmp_path, text, "shop:app=cart", "prod-eu:app=x")
    assert sorted((m.code, m.message) for m in got) == [
        (
            "EXT0001",
            'The principal "cluster.local/ns/ghost/sa/x" names namespace "ghost", which no workload or resource '
            "uses: the rule cannot match a peer from there",
        ),
        ("IST0101", 'Referenced namespace not found: "*-staging"'),
        ("IST0101", 'Referenced namespace not found: "bazz"'),
        ("IST0101", 'Referenced namespace not found: "nowhere"'),
    ]
    assert [m.code for m in got][:3] == ["IST0101"] * 3  # errors first
    refs = {m.message.split('"')[1]: m.reference for m in got}
    assert refs["bazz"].endswith("config.yaml:8") and refs["nowhere"].endswith("config.yaml:9")  # the entries' lines


def test_a_custom_action_needs_a_defined_provider(tmp_path: Path) -> None:
    text = f"""\
    apiVersion: {AP}
    kind: AuthorizationPolicy
    metadata: {{name: ext, namespace: shop}}
    spec:
      action: CUSTOM
      provider: {{name: opa}}
      rules: [{{to: [{{operation: {{paths: ["/admin"]}}}}]}}]
    """
    [m] = _run(tmp_path, text)
    assert (m.code, m.level, m.message) == (
        "IST0101",
        analyze.Level.ERROR,
        'Referenced extension provider not found: "opa"',
    )


REQUEST_PRINCIPALS = f"""\
apiVersion: {AP}
kind: RequestAuthentication
metadata: {{name: jwt, namespace: shop}}
spec:
  jwtRules: [{{issuer: https://issuer.example}}]
---
apiVersion: {AP}
kind: AuthorizationPolicy
metadata: {{name: principals, namespace: shop}}
spec:
  rules:
  - from:
    - source:
        requestPrincipals:
        - https://issuer.example/alice
        - https://issuer.example/*
        - "*"
        - "*/alice"
        - https://other.example/alice
        - https://issuer*
        - https://elsewhere*
---
apiVersion: {AP}
kind: AuthorizationPolicy
metadata: {{name: other-namespace, namespace: billing}}
spec:
  rules: [{{from: [{{source: {{requestPrincipals: [https://issuer.example/alice]}}}}]}}]
"""


def test_request_principals_no_request_authentication_accepts(tmp_path: Path) -> None:
    got = _run(tmp_path, REQUEST_PRINCIPALS)
    assert sorted((m.code, m.origin, m.message.split('"')[1]) for m in got) == [
        ("EXT0002", "AuthorizationPolicy billing/other-namespace", "https://issuer.example/alice"),
        ("EXT0002", "AuthorizationPolicy shop/principals", "https://elsewhere*"),
        ("EXT0002", "AuthorizationPolicy shop/principals", "https://other.example/alice"),
    ]


def test_a_root_namespace_request_authentication_applies_everywhere(tmp_path: Path) -> None:
    text = REQUEST_PRINCIPALS.replace(
        "metadata: {name: jwt, namespace: shop}", "metadata: {name: jwt, namespace: istio-system}"
    )
    got = _run(tmp_path, text)
    assert sorted(m.message.split('"')[1] for m in got) == ["https://elsewhere*", "https://other.example/alice"]


def test_deny_rules_broadened_on_tcp(tmp_path: Path) -> None:
    text = f"""\
    apiVersion: {AP}
    kind: AuthorizationPolicy
    metadata: {{name: deny, namespace: shop}}
    spec:
      action: DENY
      rules:
      - to: [{{operation: {{methods: ["DELETE"]}}}}]
      - to: [{{operation: {{methods: ["DELETE"], ports: ["8080"]}}}}]
      - from: [{{source: {{requestPrincipals: ["*"]}}}}]
      - when: [{{key: "request.headers[x-user]", values: ["bob"]}}]
      - from: [{{source: {{namespaces: ["shop"]}}}}]
    ---
    apiVersion: {AP}
    kind: AuthorizationPolicy
    metadata: {{name: allow, namespace: shop}}
    spec:
      rules: [{{to: [{{operation: {{methods: ["GET"]}}}}]}}]
    """
    got = sorted((m for m in _run(tmp_path, text) if m.code == "EXT0003"), key=lambda m: m.message)
    assert [m.message.split(" uses ")[0] for m in got] == ["DENY rule 0", "DENY rule 2", "DENY rule 3"]
    assert "(methods)" in got[0].message and "(request.headers[x-user])" in got[2].message


TELEMETRIES = """\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: a, namespace: shop}
spec: {metrics: [{providers: [{name: prometheus}]}]}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: b, namespace: shop}
spec: {metrics: [{providers: [{name: prometheus}]}]}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: cart-1, namespace: shop}
spec: {selector: {matchLabels: {app: cart}}, metrics: [{providers: [{name: prometheus}]}]}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: cart-2, namespace: shop}
spec: {selector: {matchLabels: {version: v1}}, metrics: [{providers: [{name: prometheus}]}]}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: root, namespace: istio-system}
spec: {metrics: [{providers: [{name: prometheus}]}]}
"""


def test_telemetries_istio_would_pick_between(tmp_path: Path) -> None:
    got = _run(tmp_path, TELEMETRIES, "shop:app=cart,version=v1")
    assert sorted(_codes(got)) == [
        ("IST0159", "Telemetry shop/cart-1"),
        ("IST0159", "Telemetry shop/cart-2"),
        ("IST0160", "Telemetry shop/a"),
        ("IST0160", "Telemetry shop/b"),
    ]
    m = next(m for m in got if m.code == "IST0160")
    assert (
        m.message
        == 'The Telemetries [a b] in namespace "shop" have no workload selector, which can lead to undefined behavior.'
    )
    assert all(m.level is analyze.Level.ERROR for m in got)


def test_cli_formats_and_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _write(tmp_path, TELEMETRIES + "---\n" + textwrap.dedent(SELECTORS))
    assert main(["analyze", str(d), "--workload", "shop:app=cart,version=v1"]) == analyze.EXIT_FOUND_ISSUES
    text = capsys.readouterr().out.splitlines()
    assert text[0].startswith("Error [IST0159] (Telemetry shop/cart-1 ") or text[0].startswith("Error [IST0160]")
    assert all(not line.startswith("Warning") for line in text[:4])  # errors first
    assert any(line.startswith("Warning [IST0127] (AuthorizationPolicy shop/no-such-app ") for line in text)
    assert main(["analyze", str(d), "-o", "json", "--workload", "shop:app=cart,version=v1"]) == 79
    doc = json.loads(capsys.readouterr().out)
    assert set(doc[0]) == {"code", "level", "origin", "reference", "message", "documentationUrl"}
    assert (
        doc[0]["documentationUrl"]
        == f"https://istio.io/latest/docs/reference/config/analysis/{doc[0]['code'].lower()}/"
    )
    assert not any("documentationUrl" in d for d in doc if d["code"].startswith("EXT"))
    assert main(["analyze", str(d), "-o", "yaml", "--workload", "shop:app=cart,version=v1"]) == 79
    assert yaml.safe_load(capsys.readouterr().out) == doc

    warnings_only = _write(tmp_path / "w", SELECTORS) if (tmp_path / "w").mkdir() is None else None
    assert warnings_only is not None
    assert main(["analyze", str(warnings_only), "--workload", "shop:app=cart"]) == 0  # warnings pass by default
    capsys.readouterr()
    assert main(["analyze", str(warnings_only), "--workload", "shop:app=cart", "--failure-threshold", "Warning"]) == 79
    capsys.readouterr()
    assert main(["analyze", str(warnings_only), "--workload", ":app=x"]) == 2
    assert "expected NAMESPACE" in capsys.readouterr().err


def test_clean_config_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", str(Path(__file__).resolve().parents[2] / "examples" / "policies")]) == 0
    assert "No validation issues found" in capsys.readouterr().out


def test_rules_shadowed_by_an_earlier_rule(tmp_path: Path) -> None:
    text = f"""\
    apiVersion: {AP}
    kind: AuthorizationPolicy
    metadata: {{name: allow, namespace: shop}}
    spec:
      rules:
      - to: [{{operation: {{methods: ["GET", "HEAD"]}}}}]
      - to: [{{operation: {{methods: ["GET"], paths: ["/api/*"]}}}}]
      - to: [{{operation: {{methods: ["POST"]}}}}]
      - from: [{{source: {{namespaces: ["shop"]}}}}]
        to: [{{operation: {{methods: ["POST"], notPaths: ["/admin"]}}}}]
      - to: [{{operation: {{methods: ["GET", "HEAD"]}}}}]
      - to: [{{operation: {{methods: ["PUT"]}}}}]
        when: [{{key: "request.auth.claims[group]", values: ["admin"]}}]
      - to: [{{operation: {{methods: ["PUT"]}}}}]
    ---
    apiVersion: {AP}
    kind: AuthorizationPolicy
    metadata: {{name: everything-first, namespace: shop}}
    spec:
      action: DENY
      rules:
      - {{}}
      - to: [{{operation: {{paths: ["/x"]}}}}]
    """
    got = sorted((m.origin, m.message.split(":")[0], m.level) for m in _run(tmp_path, text) if m.code == "EXT0004")
    assert got == [
        ("AuthorizationPolicy shop/allow", "Rule 1 is shadowed by rule 0", analyze.Level.WARNING),
        ("AuthorizationPolicy shop/allow", "Rule 3 is shadowed by rule 2", analyze.Level.WARNING),
        ("AuthorizationPolicy shop/allow", "Rule 4 is shadowed by rule 0", analyze.Level.INFO),  # identical
        ("AuthorizationPolicy shop/everything-first", "Rule 1 is shadowed by rule 0", analyze.Level.WARNING),
    ]
    # Rule 6 (PUT, any claims) is not shadowed by rule 5 (PUT with a claim): the other way round.


# --- the situations of Istio's testdata, one test per analyzer, in our own resources ---------

TM = "telemetry.istio.io/v1"
NE = "networking.istio.io/v1"

# Workloads by WorkloadEntry (Istio's testdata uses Pods): `web` in shop and in other, `db`
# in shop, `ratings` with two labels in shop.
ENTRIES = f"""\
apiVersion: {NE}
kind: WorkloadEntry
metadata: {{name: web-1, namespace: shop}}
spec: {{address: 10.0.0.1, labels: {{app: web}}}}
---
apiVersion: {NE}
kind: WorkloadEntry
metadata: {{name: web-other, namespace: other}}
spec: {{address: 10.0.0.2, labels: {{app: web}}}}
---
apiVersion: {NE}
kind: WorkloadEntry
metadata: {{name: db-1, namespace: shop}}
spec: {{address: 10.0.0.3, labels: {{app: db}}}}
---
apiVersion: {NE}
kind: WorkloadEntry
metadata: {{name: ratings-1, namespace: shop}}
spec: {{address: 10.0.0.4, labels: {{app: ratings, tier: back}}}}
"""


def _telemetry(name: str, ns: str, labels: dict[str, str] | None = None, extra: str = "") -> str:
    selector = f"  selector: {{matchLabels: {json.dumps(labels)}}}\n" if labels else ""
    return (
        f"apiVersion: {TM}\nkind: Telemetry\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{selector}"
        f"  metrics: [{{providers: [{{name: prometheus}}]}}]\n{extra}"
    )


def test_telemetry_selectors_as_istios_selector_analyzer(tmp_path: Path) -> None:
    """Istio's telemetry-selector testdata: a selector matching a workload of its namespace
    (nothing to say), one matching nothing, one matching only in another namespace (both
    IST0101), two identical selectors and two overlapping ones on one workload (IST0159)."""
    docs = [
        ENTRIES,
        _telemetry("maps-correctly", "shop", {"app": "web"}),
        _telemetry("maps-to-nonexistent", "shop", {"app": "bogus"}),
        _telemetry("maps-to-different-ns", "other", {"app": "db"}),
        _telemetry("dupe-1", "shop", {"app": "db"}),
        _telemetry("dupe-2", "shop", {"app": "db"}),
        _telemetry("overlap-1", "shop", {"app": "ratings"}),
        _telemetry("overlap-2", "shop", {"tier": "back", "app": "ratings"}),
    ]
    got = _run(tmp_path, "---\n".join(docs))
    assert sorted(_codes(got)) == [
        ("IST0101", "Telemetry other/maps-to-different-ns"),
        ("IST0101", "Telemetry shop/maps-to-nonexistent"),
        ("IST0159", "Telemetry shop/dupe-1"),
        ("IST0159", "Telemetry shop/dupe-2"),
        ("IST0159", "Telemetry shop/overlap-1"),
        ("IST0159", "Telemetry shop/overlap-2"),
    ]
    by = {m.origin: m for m in got}
    assert by["Telemetry shop/maps-to-nonexistent"].message == 'Referenced selector not found: "app=bogus"'
    assert by["Telemetry shop/maps-to-nonexistent"].level is analyze.Level.ERROR
    assert by["Telemetry shop/dupe-1"].message == (
        'The Telemetries [dupe-1 dupe-2] in namespace "shop" select the same workload pod "db-1", '
        "which can lead to undefined behavior."
    )
    # file:line points at the selector's label, as Istio's ErrorLine does
    text = (tmp_path / "cfg" / "config.yaml").read_text().splitlines()
    line = int(by["Telemetry shop/maps-to-nonexistent"].reference.rsplit(":", 1)[1])
    assert "bogus" in text[line - 1]


def test_telemetries_without_selectors_as_istios_default_selector_analyzer(tmp_path: Path) -> None:
    """Istio's telemetry-default-selector testdata: one selector-less Telemetry per namespace is
    fine, two in one namespace are both reported; the root namespace counts like any other."""
    docs = [
        ENTRIES,
        _telemetry("only-one", "other"),
        _telemetry("has-conflict-1", "shop"),
        _telemetry("has-conflict-2", "shop"),
        _telemetry("mesh", "istio-system"),
        _telemetry("with-selector", "shop", {"app": "web"}),
    ]
    assert sorted(_codes(_run(tmp_path, "---\n".join(docs)))) == [
        ("IST0160", "Telemetry shop/has-conflict-1"),
        ("IST0160", "Telemetry shop/has-conflict-2"),
    ]


def test_access_logging_without_provider_as_istios_provider_analyzer(tmp_path: Path) -> None:
    """Istio's telemetry-invalid-provider and telemetry-disable-provider testdata: an
    accessLogging entry with no provider is reported once per Telemetry (IST0157, the mesh has no
    default access-log provider); one with a provider, or disabled, is not. This runs with no
    workloads known: it asks nothing of the cluster."""
    invalid = _telemetry(
        "mesh-default",
        "istio-system",
        extra="  accessLogging:\n  - providers: [{name: envoy}]\n  - filter: {expression: 'response.code >= 400'}\n",
    )
    disabled = _telemetry("quiet", "foo", extra="  accessLogging:\n  - disabled: true\n")
    fine = _telemetry("logs", "bar", extra="  accessLogging:\n  - providers: [{name: envoy}]\n")
    got = _run(tmp_path, "---\n".join([invalid, disabled, fine]))
    assert _codes(got) == [("IST0157", "Telemetry istio-system/mesh-default")]
    assert got[0].level is analyze.Level.WARNING
    assert (
        got[0].message == 'The Telemetry mesh-default in namespace "istio-system" with empty providers will be ignored.'
    )


def test_authorization_policies_as_istios_authz_analyzer(tmp_path: Path) -> None:
    """Istio's authorizationpolicies testdata: a mesh-wide policy is fine when its selector
    matches anywhere and reported when it matches nowhere; a namespace-wide policy in a namespace
    without workloads and a selector without a workload are reported (IST0127); each source
    namespace pattern matching no namespace is reported, in namespaces and notNamespaces alike
    (IST0101), and patterns that match are not."""
    policy = "apiVersion: {ap}\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}"

    def ap(name: str, ns: str, body: str) -> str:
        return policy.format(ap=AP, name=name, ns=ns, body=textwrap.indent(textwrap.dedent(body), "  "))

    docs = [
        ENTRIES,
        ap("meshwide-web", "istio-system", "selector: {matchLabels: {app: web}}\nrules: [{}]\n"),
        ap("meshwide-nothing", "istio-system", "selector: {matchLabels: {app: web, version: v9}}\nrules: [{}]\n"),
        ap("empty-namespace-wide", "empty", "rules: [{from: [{source: {namespaces: [shop]}}]}]\n"),
        ap("namespace-wide", "shop", "rules: [{from: [{source: {namespaces: [shop]}}]}]\n"),
        ap("nopods", "shop", "selector: {matchLabels: {app: web, version: v9}}\nrules: [{}]\n"),
        ap(
            "bogus-ns",
            "shop",
            """\
            selector: {matchLabels: {app: web}}
            rules:
            - from:
              - source: {namespaces: [shop, "sh*", "*-bogus", "bogus-*"]}
            """,
        ),
        ap(
            "bogus-not-ns",
            "shop",
            """\
            selector: {matchLabels: {app: web}}
            rules:
            - from:
              - source: {notNamespaces: ["*op", "*-bogus", "bogus-*"]}
            """,
        ),
    ]
    got = _run(tmp_path, "---\n".join(docs))
    assert sorted(_codes(got)) == [
        ("IST0101", "AuthorizationPolicy shop/bogus-not-ns"),
        ("IST0101", "AuthorizationPolicy shop/bogus-not-ns"),
        ("IST0101", "AuthorizationPolicy shop/bogus-ns"),
        ("IST0101", "AuthorizationPolicy shop/bogus-ns"),
        ("IST0127", "AuthorizationPolicy empty/empty-namespace-wide"),
        ("IST0127", "AuthorizationPolicy istio-system/meshwide-nothing"),
        ("IST0127", "AuthorizationPolicy shop/nopods"),
    ]

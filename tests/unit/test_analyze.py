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
from extproc.config import loader

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

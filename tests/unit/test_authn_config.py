"""RequestAuthentication loading: Istio's validation rules with the file, document, line and
field named; which resources apply to a workload; how jwtRules become providers."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from extproc.config.errors import ConfigError
from extproc.snapshot import loader
from extproc.snapshot.compiled import Options, WorkloadIdentity, build_snapshot

HEAD = "apiVersion: security.istio.io/v1beta1\nkind: RequestAuthentication\nmetadata: {name: ra, namespace: foo}\n"
JWKS = json.dumps({"keys": [json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()))]})


def load_spec(tmp_path: Path, spec: str) -> loader.LoadedConfig:
    d = tmp_path / "cfg"
    d.mkdir(exist_ok=True)
    (d / "ra.yaml").write_text(HEAD + "spec:\n" + textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ") + "\n")
    return loader.load([d])


def errors(tmp_path: Path, spec: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_spec(tmp_path, spec)
    return [i.render() for i in e.value.issues if not i.warning]


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        (
            "jwtRules:\n- issuer: ''\n  jwksUri: https://h/k",
            "spec.jwtRules[0].issuer",
            "issuer must be a non-empty string",
        ),
        ("jwtRules:\n- issuer: a\n  audiences: ['']", "spec.jwtRules[0].audiences[0]", "audience must be non-empty"),
        ("jwtRules:\n- issuer: a\n  jwksUri: ftp://h/k", "spec.jwtRules[0].jwksUri", "scheme 'ftp' is not supported"),
        ("jwtRules:\n- issuer: a\n  jwks: '{\"keys\": 3}'", "spec.jwtRules[0].jwks", "[keys] in Jwks is not an array"),
        ("jwtRules:\n- issuer: a\n  jwks: 'nope'", "spec.jwtRules[0].jwks", "Jwks is an invalid JSON"),
        ("jwtRules:\n- issuer: a\n  fromHeaders: [{prefix: x}]", "spec.jwtRules[0].fromHeaders[0].name", "non-empty"),
        ("jwtRules:\n- issuer: a\n  fromParams: ['']", "spec.jwtRules[0].fromParams[0]", "non-empty"),
        ("jwtRules:\n- issuer: a\n  fromCookies: ['']", "spec.jwtRules[0].fromCookies[0]", "non-empty"),
        (
            "jwtRules:\n- issuer: a\n  outputClaimToHeaders: [{header: 'x:y', claim: sub}]",
            "spec.jwtRules[0].outputClaimToHeaders[0].header",
            "not a valid header name",
        ),
        (
            "jwtRules:\n- issuer: a\n  outputClaimToHeaders: [{header: x, claim: ''}]",
            "spec.jwtRules[0].outputClaimToHeaders[0]",
            "must be non-empty",
        ),
        ("jwtRules:\n- issuer: a\n  timeout: 1500us", "spec.jwtRules[0].timeout", "ms precision"),
        ("jwtRules:\n- issuer: a\n  timeout: 0s", "spec.jwtRules[0].timeout", "greater than 1ms"),
        ("jwtRules:\n- issuer: a\n  timeout: soon", "spec.jwtRules[0].timeout", "invalid duration"),
        ("jwtRules:\n- issuer: a\n  forwardOriginalToken: 'yes'", "spec.jwtRules[0].forwardOriginalToken", "bool"),
        (
            'jwtRules:\n- issuer: a\n  jwks_uri: https://h/k\n  jwks: \'{"keys": [{"kty": "oct", "k": "AQAB"}]}\'',
            "spec.jwtRules[0]",
            "only one of jwks",
        ),
        ("selector: {matchLabels: {app: '*'}}", "spec.selector.matchLabels.app", "wildcard is not supported"),
        ("jwtRules:\n- issuer: a\n  unknownField: 1", "spec.jwtRules[0].unknownField", "unknown field"),
    ],
)
def test_invalid_rule_is_rejected_with_its_field(tmp_path: Path, spec: str, field: str, message: str) -> None:
    errs = errors(tmp_path, spec)
    assert len(errs) == 1, errs
    assert "ra.yaml: document 1 (RequestAuthentication foo/ra), line " in errs[0]
    assert f"{field}: " in errs[0]
    assert message in errs[0]


def test_private_key_material_in_inline_jwks_is_a_warning_not_an_error(tmp_path: Path) -> None:
    priv = json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1())))
    loaded = load_spec(tmp_path, f"jwtRules:\n- issuer: a\n  jwks: '{json.dumps({'keys': [priv]})}'")
    assert any("private key material" in w.render() for w in loaded.warnings)
    assert len(loaded.request_authentications) == 1


def test_duplicate_request_authentication_is_rejected_but_same_name_policy_is_fine(tmp_path: Path) -> None:
    d = tmp_path / "cfg"
    d.mkdir()
    doc = HEAD + f"spec:\n  jwtRules:\n  - issuer: a\n    jwks: '{JWKS}'\n"
    ap = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ra, namespace: foo}\n"
    (d / "a.yaml").write_text(doc + "---\n" + ap)
    loaded = loader.load([d])
    assert len(loaded.request_authentications) == 1 and len(loaded.policies) == 1
    (d / "b.yaml").write_text(doc)
    with pytest.raises(ConfigError) as e:
        loader.load([d])
    assert "duplicate RequestAuthentication" in str(e.value)


def test_rules_of_all_applicable_resources_combine_sorted_by_issuer(tmp_path: Path) -> None:
    d = tmp_path / "cfg"
    d.mkdir()
    docs = []
    for name, ns, issuer, selector in [
        ("root", "istio-system", "https://z.example", ""),
        ("mine", "foo", "https://a.example", "  selector: {matchLabels: {app: web}}\n"),
        ("other-app", "foo", "https://b.example", "  selector: {matchLabels: {app: db}}\n"),
        ("other-ns", "bar", "https://c.example", ""),
    ]:
        docs.append(
            f"apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\n"
            f"spec:\n{selector}  jwtRules:\n  - issuer: {issuer}\n    jwks: '{JWKS}'\n"
        )
    (d / "all.yaml").write_text("---\n".join(docs))
    snap = build_snapshot(loader.load([d]), WorkloadIdentity("foo", {"app": "web"}), Options(), 1)
    assert [(p.name, p.issuer, p.origin) for p in snap.authn.providers] == [
        ("origins-0", "https://a.example", "foo/mine"),
        ("origins-1", "https://z.example", "istio-system/root"),
    ]
    ignored = dict(snap.ignored_policies)
    assert "does not match" in ignored["RequestAuthentication foo/other-app"]
    assert "neither" in ignored["RequestAuthentication bar/other-ns"]


def test_jwks_uri_rule_becomes_a_remote_source_with_its_timeout(tmp_path: Path) -> None:
    loaded = load_spec(
        tmp_path, "jwtRules:\n- issuer: https://a.example\n  jwksUri: https://a.example/k\n  timeout: 2s"
    )
    snap = build_snapshot(loaded, WorkloadIdentity("foo"), Options(), 1)
    (src,) = snap.authn.remote_sources
    assert (src.issuer, src.jwks_uri, src.timeout_s) == ("https://a.example", "https://a.example/k", 2.0)
    loaded = load_spec(tmp_path, "jwtRules:\n- issuer: https://b.example")
    (src,) = build_snapshot(loaded, WorkloadIdentity("foo"), Options(), 1).authn.remote_sources
    assert src.jwks_uri == "" and src.key == "oidc:https://b.example"

"""Loading and validation: every error names the file, the document, the field and the line,
and a change with any error is rejected as a whole."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from extproc.config.errors import ConfigError
from extproc.snapshot import loader

HEAD = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: foo}\n"


def write(d: Path, name: str, text: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_text(textwrap.dedent(text))
    return p


def errors_of(d: Path) -> list[str]:
    with pytest.raises(ConfigError) as e:
        loader.load([d])
    return [i.render() for i in e.value.issues if not i.warning]


def one_error(tmp_path: Path, spec: str) -> str:
    write(
        tmp_path / "cfg", "p.yaml", HEAD + "spec:\n" + textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ") + "\n"
    )
    errs = errors_of(tmp_path / "cfg")
    assert len(errs) == 1, errs
    return errs[0]


def test_unknown_field_names_file_document_line_and_field(tmp_path: Path) -> None:
    write(
        tmp_path,
        "policies.yaml",
        HEAD
        + "spec: {rules: [{}]}\n---\n"
        + HEAD.replace("name: p", "name: q")
        + "spec:\n  rules:\n  - to:\n    - operation:\n        method: [GET]\n",
    )
    [err] = errors_of(tmp_path)
    assert err.startswith(f"{tmp_path}/policies.yaml: document 2 (AuthorizationPolicy foo/q), line 13: error: ")
    assert "spec.rules[0].to[0].operation.method: unknown field" in err


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ("rules: [{to: [{operation: {ports: [80]}}]}]", "spec.rules[0].to[0].operation.ports[0]", "must be a string"),
        (
            "rules: [{to: [{operation: {ports: ['99999']}}]}]",
            "spec.rules[0].to[0].operation.ports[0]",
            "bad port (99999)",
        ),
        (
            "rules: [{from: [{source: {ipBlocks: ['10.0.0.0/33']}}]}]",
            "spec.rules[0].from[0].source.ipBlocks[0]",
            "bad CIDR",
        ),
        (
            "rules: [{from: [{source: {ipBlocks: ['not-an-ip']}}]}]",
            "spec.rules[0].from[0].source.ipBlocks[0]",
            "bad IP",
        ),
        (
            "rules: [{when: [{key: 'destination.labels[app]', values: [x]}]}]",
            "spec.rules[0].when[0].key",
            "workload selector",
        ),
        ("rules: [{when: [{key: request.foo, values: [x]}]}]", "spec.rules[0].when[0].key", "unknown attribute"),
        ("rules: [{when: [{key: 'request.headers[]', values: [x]}]}]", "spec.rules[0].when[0].key", "bad key"),
        ("rules: [{when: [{key: 'request.auth.claims[a]b', values: [x]}]}]", "spec.rules[0].when[0].key", "bad key"),
        ("rules: [{when: [{key: source.ip}]}]", "spec.rules[0].when[0]", "at least one of `values` or `notValues`"),
        ("rules: [{when: [{key: destination.port, values: ['http']}]}]", "spec.rules[0].when[0].values[0]", "bad port"),
        ("action: DENY", "spec.rules", "DENY action without `rules`"),
        ("action: CUSTOM\nprovider: {name: x}", "spec.rules", "CUSTOM action without `rules`"),
        ("action: CUSTOM\nrules: [{}]", "spec.provider.name", "`provider.name` must not be empty"),
        (
            "action: CUSTOM\nprovider: {name: x}\nrules: [{from: [{source: {principals: ['a']}}]}]",
            "spec.rules[0].from[0].source.principals",
            "not supported with CUSTOM",
        ),
        (
            "action: CUSTOM\nprovider: {name: x}\nrules: [{when: [{key: 'request.auth.claims[a]', values: [b]}]}]",
            "spec.rules[0].when[0].key",
            "not supported with CUSTOM",
        ),
        ("provider: {name: x}\nrules: [{}]", "spec.provider", "must not be with non CUSTOM action"),
        ("action: ALLOWED", "spec.action", "must be one of ALLOW, DENY, AUDIT, CUSTOM"),
        (
            "rules: [{from: [{source: {principals: ['a'], serviceAccounts: ['b']}}]}]",
            "spec.rules[0].from[0].source",
            "cannot set serviceAccounts with namespaces or principals",
        ),
        ("rules: [{from: [{source: {serviceAccounts: ['a/b/c']}}]}]", "serviceAccounts[0]", "expected format"),
        ("rules: [{from: [{source: {serviceAccounts: ['a*']}}]}]", "serviceAccounts[0]", "wildcard not allowed"),
        ("rules: [{from: []}]", "spec.rules[0].from", "`from` must not be empty"),
        ("rules: [{from: [{source: {}}]}]", "spec.rules[0].from[0].source", "must not be empty"),
        ("rules: [{from: [{}]}]", "spec.rules[0].from[0].source", "must not be nil"),
        ("rules: [{to: [{operation: {}}]}]", "spec.rules[0].to[0].operation", "must not be empty"),
        ("rules: [{to: [{operation: {paths: ['']}}]}]", "spec.rules[0].to[0].operation.paths[0]", "empty value"),
        ("rules: [{from: [{source: {trustDomains: ['a*b']}}]}]", "trustDomains[0]", "only allowed at the start or end"),
        ("rules: [{from: [{source: {trustDomains: ['a/b']}}]}]", "trustDomains[0]", "must not contain '/'"),
        ("rules: [{to: [{operation: {paths: ['/a/{**}/b/{*}']}}]}]", "paths[0]", "{**} is not the last operator"),
        ("rules: [{to: [{operation: {paths: ['/a/x{*}']}}]}]", "paths[0]", "beyond a supported path template"),
        ("rules: [{to: [{operation: {paths: ['/a/b c/{*}']}}]}]", "paths[0]", "not a valid literal"),
        ("selector: {matchLabels: {app: 'a*'}}\nrules: [{}]", "spec.selector.matchLabels.app", "wildcard"),
        (
            "selector: {matchLabels: {app: a}}\ntargetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: g}]\nrules: [{}]",
            "spec",
            "only one of targetRefs or workloadSelector",
        ),
        ("rules: [null]", "spec.rules[0]", "`rule` must not be nil"),
    ],
)
def test_invalid_policies(tmp_path: Path, spec: str, field: str, message: str) -> None:
    err = one_error(tmp_path, spec)
    assert f"{field}: " in err or f"{field}[" in err or f".{field}" in err, err
    assert message in err, err


def test_dry_run_annotation_rules(tmp_path: Path) -> None:
    d = tmp_path / "cfg"
    write(
        d,
        "a.yaml",
        HEAD.replace("namespace: foo}", "namespace: foo, annotations: {istio.io/dry-run: 'yes'}}")
        + "spec: {rules: [{}]}\n",
    )
    [err] = errors_of(d)
    assert "metadata.annotations.istio.io/dry-run: invalid value (yes)" in err
    write(
        d,
        "a.yaml",
        HEAD.replace("namespace: foo}", "namespace: foo, annotations: {istio.io/dry-run: 'true'}}")
        + "spec: {action: AUDIT, rules: [{}]}\n",
    )
    [err] = errors_of(d)
    assert "only supports action ALLOW/DENY" in err


def test_every_error_is_reported_and_nothing_half_applies(tmp_path: Path) -> None:
    write(tmp_path, "a-good.yaml", HEAD + "spec: {rules: [{}]}\n")
    write(
        tmp_path,
        "b-bad.yaml",
        HEAD.replace("name: p", "name: q")
        + "spec: {action: DENY}\n---\n"
        + HEAD.replace("name: p", "name: r")
        + "spec: {rules: [{to: [{operation: {ports: ['x']}}]}]}\n",
    )
    errs = errors_of(tmp_path)
    assert len(errs) == 2
    assert "b-bad.yaml: document 1 (AuthorizationPolicy foo/q)" in errs[0]
    assert "b-bad.yaml: document 2 (AuthorizationPolicy foo/r)" in errs[1]


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    write(tmp_path, "p.yaml", HEAD + "spec:\n  rules: [{}\n")
    [err] = errors_of(tmp_path)
    assert "p.yaml: document 1" in err and "invalid YAML" in err and "line" in err


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, "p.yaml", HEAD + "spec:\n  action: ALLOW\n  action: DENY\n")
    [err] = errors_of(tmp_path)
    assert "duplicate key 'action'" in err and "line 6" in err


def test_duplicate_policy_names(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", HEAD + "spec: {rules: [{}]}\n")
    write(tmp_path, "b.yaml", HEAD + "spec: {rules: [{}]}\n")
    [err] = errors_of(tmp_path)
    assert "b.yaml" in err and "duplicate AuthorizationPolicy, first defined in" in err and "a.yaml" in err


def test_namespace_is_required(tmp_path: Path) -> None:
    write(
        tmp_path,
        "p.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {}\n",
    )
    [err] = errors_of(tmp_path)
    assert "metadata.namespace: required" in err


def test_unsupported_api_version(tmp_path: Path) -> None:
    write(tmp_path, "p.yaml", HEAD.replace("security.istio.io/v1", "security.istio.io/v1alpha1") + "spec: {}\n")
    [err] = errors_of(tmp_path)
    assert "apiVersion: unsupported version security.istio.io/v1alpha1" in err


def test_both_api_versions_multi_docs_lists_and_other_kinds(tmp_path: Path) -> None:
    write(
        tmp_path,
        "all.yaml",
        """
        apiVersion: security.istio.io/v1beta1
        kind: AuthorizationPolicy
        metadata: {name: beta, namespace: foo}
        spec: {rules: [{}]}
        ---
        # an empty document is skipped
        ---
        apiVersion: v1
        kind: List
        items:
        - apiVersion: security.istio.io/v1
          kind: AuthorizationPolicy
          metadata: {name: listed, namespace: foo}
          spec: {}
        - apiVersion: apps/v1
          kind: Deployment
          metadata: {name: app}
        """,
    )
    write(tmp_path / "sub", "x.yml", HEAD + "spec: {}\n")
    write(tmp_path / ".hidden", "y.yaml", "this: is: not: loaded")
    loaded = loader.load([tmp_path])
    assert sorted(p.policy.metadata.name for p in loaded.policies) == ["beta", "listed", "p"]
    assert any("apps/v1 Deployment is not used by extproc" in w.render() for w in loaded.warnings)


def test_warnings_do_not_block(tmp_path: Path) -> None:
    write(tmp_path, "p.yaml", HEAD + "spec:\n  action: DENY\n  rules: [{to: [{operation: {methods: [GET]}}]}]\n")
    loaded = loader.load([tmp_path])
    assert len(loaded.policies) == 1
    assert any("will deny all traffic to TCP ports" in w.render() for w in loaded.warnings)


def test_missing_config_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        loader.load([tmp_path / "nope"])


# --- extension providers ------------------------------------------------------------------

MESH_HEAD = "apiVersion: extproc.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec:\n  extensionProviders:\n"


def test_mesh_config_providers(tmp_path: Path) -> None:
    write(
        tmp_path,
        "mesh.yaml",
        MESH_HEAD
        + "  - {name: g, envoyExtAuthzGrpc: {service: a.b, port: 9000, timeout: 0.5s, statusOnError: '503', failOpen: true}}\n"
        + "  - {name: h, envoyExtAuthzHttp: {service: a.b, port: 8000, pathPrefix: /check, headersToUpstreamOnAllow: [x-*]}}\n"
        + "  - {name: z, zipkin: {service: z, port: 9411}}\n",
    )
    loaded = loader.load([tmp_path])
    g, h = loaded.providers["g"], loaded.providers["h"]
    assert (g.target, g.timeout_s, g.status_on_error, g.fail_open) == ("a.b:9000", 0.5, 503, True)
    assert h.base_url == "http://a.b:8000" and h.path_prefix == "/check" and h.timeout_s == 600.0
    assert "z" not in loaded.providers


def test_istio_configmap_providers(tmp_path: Path) -> None:
    write(
        tmp_path,
        "istio.yaml",
        """
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: istio, namespace: istio-system}
        data:
          mesh: |-
            accessLogFile: /dev/stdout
            extensionProviders:
            - name: opa
              envoyExtAuthzGrpc:
                service: opa.opa.svc.cluster.local
                port: 9191
        """,
    )
    assert loader.load([tmp_path]).providers["opa"].target == "opa.opa.svc.cluster.local:9191"


@pytest.mark.parametrize(
    ("provider", "message"),
    [
        ("{name: g, envoyExtAuthzGrpc: {service: a, port: 1, timeout: soon}}", "invalid duration"),
        ("{name: g, envoyExtAuthzGrpc: {service: a, port: 1, unknown: 2}}", "unknown field"),
    ],
)
def test_providers_that_do_not_parse_reject_the_load(tmp_path: Path, provider: str, message: str) -> None:
    """What istiod could not even unmarshal into a MeshConfig (a bad Duration, an unknown field)."""
    write(tmp_path, "mesh.yaml", MESH_HEAD + f"  - {provider}\n")
    [err] = errors_of(tmp_path)
    assert message in err and "spec.extensionProviders[0]" in err, err


def test_two_mesh_configs(tmp_path: Path) -> None:
    p = "  - {name: g, envoyExtAuthzGrpc: {service: a, port: 1}}\n"
    write(tmp_path, "mesh.yaml", MESH_HEAD + p + "---\n" + MESH_HEAD + p)
    [err] = errors_of(tmp_path)
    assert "a second mesh config" in err


def test_a_control_character_is_an_invalid_yaml_error_naming_the_line(tmp_path: Path) -> None:
    """PyYAML reports it as a ReaderError, which is not a MarkedYAMLError: found by fuzzing."""
    write(tmp_path / "cfg", "p.yaml", HEAD + "spec:\n  action: \x08DENY\n")
    assert errors_of(tmp_path / "cfg") == [
        f"{tmp_path / 'cfg' / 'p.yaml'}: document 1, line 5: error: invalid YAML: "
        "unacceptable character #x0008: control characters are not allowed"
    ]

"""Tests of the Istio -> Envoy RBAC translation used as the reference side of differential tests.

The expectations are written by hand from Istio's documented semantics and generator code
(pilot/pkg/security/authz), not from our engine, so the two stay independent. The last test
hands a rich translated policy set to a real Envoy in `--mode validate`, which catches field
names, enum values and proto constraints (e.g. empty prefixes) that dict comparisons cannot.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from extproc.config.models import AuthorizationPolicy
from reference.envoy_rbac import (
    HTTP_RBAC_FILTER,
    HTTP_RBAC_TYPE,
    NETWORK_RBAC_FILTER,
    NETWORK_RBAC_TYPE,
    URI_TEMPLATE_TYPE,
    rbac_filters,
)

Json = dict[str, Any]
JWT = "envoy.filters.http.jwt_authn"


def ap(name: str, spec: Json, *, namespace: str = "foo", dry_run: str | None = None) -> AuthorizationPolicy:
    metadata: Json = {"name": name, "namespace": namespace}
    if dry_run is not None:
        metadata["annotations"] = {"istio.io/dry-run": dry_run}
    return AuthorizationPolicy.model_validate(
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": metadata, "spec": spec}
    )


def only_filter(policies: list[AuthorizationPolicy], **kw: Any) -> Json:
    filters = rbac_filters(policies, for_tcp=kw.pop("for_tcp", False), **kw)
    assert len(filters) == 1
    return filters[0]["typed_config"]


def policy_of(typed: Json, name: str | None = None) -> Json:
    """The named Envoy policy of the enforced rules, or the only one."""
    policies = typed["rules"]["policies"]
    if name is None:
        assert len(policies) == 1, list(policies)
        [name] = policies
    return policies[name]


def single_principal_terms(policies: list[AuthorizationPolicy], **kw: Any) -> list[Json]:
    """The AND terms of the only `from` of the only rule."""
    pol = policy_of(only_filter(policies, **kw))
    assert len(pol["principals"]) == 1
    return pol["principals"][0]["and_ids"]["ids"]


def single_permission_terms(policies: list[AuthorizationPolicy], **kw: Any) -> list[Json]:
    pol = policy_of(only_filter(policies, **kw))
    assert len(pol["permissions"]) == 1
    return pol["permissions"][0]["and_rules"]["rules"]


def authn(matcher: Json) -> Json:
    return {"authenticated": {"principal_name": matcher}}


def jwt_claim(claim: str, matcher: Json, filt: str = JWT, key: str = "payload") -> Json:
    return {"metadata": {"filter": filt, "path": [{"key": key}, {"key": claim}], "value": {"string_match": matcher}}}


def iss_sub(iss: Json, sub: Json) -> Json:
    return {"and_ids": {"ids": [jwt_claim("iss", iss), jwt_claim("sub", sub)]}}


ANY_RE = {"safe_regex": {"regex": ".+"}}


# --- request principals -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "iss", "sub"),
    [
        # Split at the LAST "/": issuers are URLs.
        ("https://accounts.example.com/team/alice", {"exact": "https://accounts.example.com/team"}, {"exact": "alice"}),
        # No "/": the whole value is the issuer and the subject must be the empty string.
        ("issuer-only", {"exact": "issuer-only"}, {"exact": ""}),
        ("*", ANY_RE, ANY_RE),
        ("*suffix", ANY_RE, {"suffix": "suffix"}),
        ("prefix*", {"prefix": "prefix"}, ANY_RE),
        ("https://iss.example.com/*", {"exact": "https://iss.example.com"}, ANY_RE),
        ("https://iss.example.com/sub*", {"exact": "https://iss.example.com"}, {"prefix": "sub"}),
        ("*.example.com/sub", {"suffix": ".example.com"}, {"exact": "sub"}),
        ("*/sub", ANY_RE, {"exact": "sub"}),
    ],
)
def test_request_principal_is_split_into_iss_and_sub(value: str, iss: Json, sub: Json) -> None:
    terms = single_principal_terms([ap("p", {"rules": [{"from": [{"source": {"requestPrincipals": [value]}}]}]})])
    # A single value is not wrapped in or_ids (extended generator).
    assert terms == [iss_sub(iss, sub)]


def test_request_principals_several_values_or_and_negation() -> None:
    terms = single_principal_terms(
        [
            ap(
                "p",
                {
                    "rules": [
                        {"from": [{"source": {"requestPrincipals": ["a/b", "c/d"], "notRequestPrincipals": ["*"]}}]}
                    ]
                },
            )
        ]
    )
    assert terms == [
        {"or_ids": {"ids": [iss_sub({"exact": "a"}, {"exact": "b"}), iss_sub({"exact": "c"}, {"exact": "d"})]}},
        {"not_id": iss_sub(ANY_RE, ANY_RE)},
    ]


def test_jwt_filter_and_payload_key_are_configurable() -> None:
    terms = single_principal_terms(
        [ap("p", {"rules": [{"when": [{"key": "request.auth.principal", "values": ["i/s"]}]}]})],
        jwt_filter="my.jwt",
        jwt_payload_key="claims",
    )
    assert terms == [
        {
            "and_ids": {
                "ids": [
                    jwt_claim("iss", {"exact": "i"}, "my.jwt", "claims"),
                    jwt_claim("sub", {"exact": "s"}, "my.jwt", "claims"),
                ]
            }
        }
    ]


def test_claims_audiences_presenter_match_string_or_list_element() -> None:
    terms = single_principal_terms(
        [
            ap(
                "p",
                {
                    "rules": [
                        {
                            "when": [
                                {"key": "request.auth.claims[groups]", "values": ["admin"]},
                                {"key": "request.auth.claims[nested][a.b]", "values": ["x*", "*y"]},
                                {"key": "request.auth.audiences", "notValues": ["aud1"]},
                                {"key": "request.auth.presenter", "values": ["*"]},
                            ]
                        }
                    ]
                },
            )
        ]
    )

    def either(keys: list[str], value: Json) -> Json:
        return {
            "metadata": {
                "filter": JWT,
                "path": [{"key": k} for k in ["payload", *keys]],
                "value": {"or_match": {"value_matchers": [{"list_match": {"one_of": value}}, value]}},
            }
        }

    admin = {"string_match": {"exact": "admin"}}
    nested = {"or_match": {"value_matchers": [{"string_match": {"prefix": "x"}}, {"string_match": {"suffix": "y"}}]}}
    assert terms == [
        either(["groups"], admin),
        # Dots inside brackets are literal: "a.b" is one key.
        either(["nested", "a.b"], nested),
        {"not_id": either(["aud"], {"string_match": {"exact": "aud1"}})},
        either(["azp"], {"string_match": ANY_RE}),
    ]


# --- peer identity ------------------------------------------------------------------------


def test_principals_wildcards_and_spiffe_prefix() -> None:
    terms = single_principal_terms(
        [ap("p", {"rules": [{"from": [{"source": {"principals": ["*", "*-sfx.x", "pfx*", "td/ns/a/sa/b"]}}]}]})]
    )
    assert terms == [
        {
            "or_ids": {
                "ids": [
                    authn(ANY_RE),  # no spiffe:// for the bare wildcard
                    # Go's QuoteMeta: '.' is escaped, '-' is not.
                    authn({"safe_regex": {"regex": r"spiffe://.*-sfx\.x"}}),
                    authn({"prefix": "spiffe://pfx"}),
                    authn({"exact": "spiffe://td/ns/a/sa/b"}),
                ]
            }
        }
    ]


def test_namespaces_glob_anywhere() -> None:
    terms = single_principal_terms(
        [ap("p", {"rules": [{"from": [{"source": {"namespaces": ["team-*-prod", "a.b", "*"]}}]}]})]
    )
    assert terms == [
        {
            "or_ids": {
                "ids": [
                    authn({"safe_regex": {"regex": ".*/ns/team-.*-prod/.*"}}),
                    authn({"safe_regex": {"regex": r".*/ns/a\.b/.*"}}),
                    authn({"safe_regex": {"regex": ".*/ns/.*/.*"}}),
                ]
            }
        }
    ]


def test_service_accounts_default_to_policy_namespace() -> None:
    terms = single_principal_terms(
        [ap("p", {"rules": [{"from": [{"source": {"serviceAccounts": ["sa1", "other/sa.2"]}}]}]}, namespace="bar")]
    )
    assert terms == [
        {
            "or_ids": {
                "ids": [
                    authn({"safe_regex": {"regex": "spiffe://.+/ns/bar/(.+/|)sa/sa1(/.+)?"}}),
                    authn({"safe_regex": {"regex": r"spiffe://.+/ns/other/(.+/|)sa/sa\.2(/.+)?"}}),
                ]
            }
        }
    ]


def test_trust_domains_field_and_key() -> None:
    terms = single_principal_terms(
        [
            ap(
                "p",
                {
                    "rules": [
                        {
                            "from": [{"source": {"trustDomains": ["*", "td.io"], "notTrustDomains": ["bad*x*"]}}],
                        }
                    ]
                },
            )
        ]
    )
    assert terms == [
        {"or_ids": {"ids": [authn({"prefix": "spiffe://"}), authn({"prefix": "spiffe://td.io/"})]}},
        # Only the first '*' is a wildcard; the second is quoted.
        {"not_id": {"or_ids": {"ids": [authn({"safe_regex": {"regex": r"spiffe://bad[^/]*x\*/.*"}})]}}},
    ]


def test_trust_domain_aliases_rewrite_principals_and_expand_trust_domains() -> None:
    policy = ap(
        "p",
        {
            "rules": [
                {
                    "from": [
                        {
                            "source": {
                                "principals": [
                                    "cluster.local/ns/foo/sa/a",  # always means "the local domain"
                                    "old/ns/foo/sa/b",  # an alias
                                    "other/ns/foo/sa/c",  # unrelated: kept
                                    "*/ns/foo/sa/d",  # trust domain not enforced: kept
                                    "*ld/ns/foo/sa/e",  # suffix wildcard: kept where it matches
                                    "not-spiffe",  # not 5 segments: kept
                                ],
                                "trustDomains": ["old"],
                            }
                        }
                    ]
                }
            ]
        },
    )
    terms = single_principal_terms([policy], trust_domain="new", trust_domain_aliases=["old"])
    assert terms == [
        {
            "or_ids": {
                "ids": [
                    authn({"exact": "spiffe://new/ns/foo/sa/a"}),
                    authn({"exact": "spiffe://old/ns/foo/sa/a"}),
                    authn({"exact": "spiffe://new/ns/foo/sa/b"}),
                    authn({"exact": "spiffe://old/ns/foo/sa/b"}),
                    authn({"exact": "spiffe://other/ns/foo/sa/c"}),
                    authn({"safe_regex": {"regex": "spiffe://.*/ns/foo/sa/d"}}),
                    authn({"exact": "spiffe://new/ns/foo/sa/e"}),
                    authn({"safe_regex": {"regex": "spiffe://.*ld/ns/foo/sa/e"}}),
                    authn({"exact": "spiffe://not-spiffe"}),
                ]
            }
        },
        {"or_ids": {"ids": [authn({"prefix": "spiffe://new/"}), authn({"prefix": "spiffe://old/"})]}},
    ]


def test_shared_when_principal_is_migrated_once_per_from() -> None:
    """Istio rewrites the shared `when` entry once per `from`; the values get duplicated."""
    policy = ap(
        "p",
        {
            "rules": [
                {
                    "from": [{"source": {"ipBlocks": ["1.1.1.1"]}}, {"source": {"ipBlocks": ["2.2.2.2"]}}],
                    "when": [{"key": "source.principal", "values": ["cluster.local/ns/a/sa/b"]}],
                }
            ]
        },
    )
    pol = policy_of(only_filter([policy], trust_domain="td1", trust_domain_aliases=["cluster.local"]))
    expected = [authn({"exact": "spiffe://td1/ns/a/sa/b"}), authn({"exact": "spiffe://cluster.local/ns/a/sa/b"})]
    for principal in pol["principals"]:
        assert principal["and_ids"]["ids"][1] == {"or_ids": {"ids": expected * 2}}


def test_ip_blocks_keep_host_bits_and_single_ips_get_full_length() -> None:
    terms = single_principal_terms(
        [
            ap(
                "p",
                {
                    "rules": [
                        {
                            "from": [{"source": {"ipBlocks": ["10.1.2.3/16", "2001:db8::1"]}}],
                            "when": [{"key": "remote.ip", "notValues": ["::ffff:10.0.0.1"]}],
                        }
                    ]
                },
            )
        ]
    )
    assert terms == [
        {
            "or_ids": {
                "ids": [
                    {"direct_remote_ip": {"address_prefix": "10.1.2.3", "prefix_len": 16}},
                    {"direct_remote_ip": {"address_prefix": "2001:db8::1", "prefix_len": 128}},
                ]
            }
        },
        {"not_id": {"or_ids": {"ids": [{"remote_ip": {"address_prefix": "::ffff:10.0.0.1", "prefix_len": 128}}]}}},
    ]


# --- operations ---------------------------------------------------------------------------


def test_operation_fields_order_and_matchers() -> None:
    terms = single_permission_terms(
        [
            ap(
                "p",
                {
                    "rules": [
                        {
                            "to": [
                                {
                                    "operation": {
                                        "ports": ["080"],
                                        "paths": ["/a", "*", "/b/*", "/x/{*}/y/{**}"],
                                        "methods": ["GET", "*"],
                                        "notHosts": ["Example.COM", "*.example.org", "*"],
                                    }
                                }
                            ],
                            "when": [
                                {"key": "connection.sni", "values": ["*.sni.io"]},
                                {"key": "destination.ip", "values": ["10.0.0.0/8"]},
                            ],
                        }
                    ]
                },
            )
        ]
    )
    host = ":authority"
    assert terms == [
        # hosts first, case-insensitive, `*` is a presence match
        {
            "not_rule": {
                "or_rules": {
                    "rules": [
                        {"header": {"name": host, "string_match": {"exact": "Example.COM", "ignore_case": True}}},
                        {"header": {"name": host, "string_match": {"suffix": ".example.org", "ignore_case": True}}},
                        {"header": {"name": host, "present_match": True}},
                    ]
                }
            }
        },
        # methods: case-sensitive header matcher
        {
            "or_rules": {
                "rules": [
                    {"header": {"name": ":method", "string_match": {"exact": "GET"}}},
                    {"header": {"name": ":method", "present_match": True}},
                ]
            }
        },
        {
            "or_rules": {
                "rules": [
                    {"url_path": {"path": {"exact": "/a"}}},
                    {"url_path": {"path": ANY_RE}},
                    {"url_path": {"path": {"prefix": "/b/"}}},
                    {
                        "uri_template": {
                            "name": "uri-template",
                            "typed_config": {"@type": URI_TEMPLATE_TYPE, "path_template": "/x/*/y/**"},
                        }
                    },
                ]
            }
        },
        {"or_rules": {"rules": [{"destination_port": 80}]}},
        # `when` conditions come after the operation fields, in order
        {"or_rules": {"rules": [{"requested_server_name": {"suffix": ".sni.io"}}]}},
        {"or_rules": {"rules": [{"destination_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}}]}},
    ]


def test_request_headers_are_principals_and_envoy_filter_metadata_is_a_permission() -> None:
    pol = policy_of(
        only_filter(
            [
                ap(
                    "p",
                    {
                        "rules": [
                            {
                                "when": [
                                    {"key": "request.headers[X-Token]", "values": ["*", "a*"], "notValues": ["*b"]},
                                    {"key": "experimental.envoy.filters.net.f[k]", "values": ["v", "[l*]"]},
                                ]
                            }
                        ]
                    },
                )
            ]
        )
    )
    assert pol["principals"] == [
        {
            "and_ids": {
                "ids": [
                    {
                        "or_ids": {
                            "ids": [
                                {"header": {"name": "X-Token", "present_match": True}},
                                {"header": {"name": "X-Token", "string_match": {"prefix": "a"}}},
                            ]
                        }
                    },
                    {"not_id": {"or_ids": {"ids": [{"header": {"name": "X-Token", "string_match": {"suffix": "b"}}}]}}},
                ]
            }
        }
    ]
    assert pol["permissions"] == [
        {
            "and_rules": {
                "rules": [
                    {
                        "metadata": {
                            "filter": "envoy.filters.net.f",
                            "path": [{"key": "k"}],
                            "value": {
                                "or_match": {
                                    "value_matchers": [
                                        {"string_match": {"exact": "v"}},
                                        {"list_match": {"one_of": {"string_match": {"prefix": "l"}}}},
                                    ]
                                }
                            },
                        }
                    }
                ]
            }
        }
    ]


# --- rule shapes, naming, order -----------------------------------------------------------


def test_empty_rule_matches_everything_and_no_rules_matches_nothing() -> None:
    typed = only_filter([ap("p", {"rules": [{}]}), ap("q", {}), ap("r", {"rules": []})])
    pols = typed["rules"]["policies"]
    assert pols["ns[foo]-policy[p]-rule[0]"] == {
        "permissions": [{"and_rules": {"rules": [{"any": True}]}}],
        "principals": [{"and_ids": {"ids": [{"any": True}]}}],
    }
    never = {"permissions": [{"not_rule": {"any": True}}], "principals": [{"not_id": {"any": True}}]}
    assert pols["ns[foo]-policy[q]-rule[0]"] == never
    assert pols["ns[foo]-policy[r]-rule[0]"] == never


def test_policy_names_sorted_and_null_rules_keep_their_index() -> None:
    typed = only_filter(
        [
            ap("b", {"rules": [None, {"to": [{"operation": {"ports": ["1"]}}]}]}, namespace="z"),
            ap("a", {"rules": [{}]}, namespace="y"),
        ]
    )
    assert list(typed["rules"]["policies"]) == ["ns[y]-policy[a]-rule[0]", "ns[z]-policy[b]-rule[1]"]


def test_filter_order_audit_deny_allow_and_custom_skipped() -> None:
    policies = [
        ap("allow", {"rules": [{}]}),
        ap("custom", {"action": "CUSTOM", "provider": {"name": "x"}, "rules": [{}]}),
        ap("deny", {"action": "DENY", "rules": [{}]}),
        ap("audit", {"action": "AUDIT", "rules": [{}]}),
    ]
    filters = rbac_filters(policies, for_tcp=False)
    assert [f["name"] for f in filters] == [HTTP_RBAC_FILTER] * 3
    assert [f["typed_config"]["@type"] for f in filters] == [HTTP_RBAC_TYPE] * 3
    assert [f["typed_config"]["rules"]["action"] for f in filters] == ["LOG", "DENY", "ALLOW"]
    assert [list(f["typed_config"]["rules"]["policies"]) for f in filters] == [
        ["ns[foo]-policy[audit]-rule[0]"],
        ["ns[foo]-policy[deny]-rule[0]"],
        ["ns[foo]-policy[allow]-rule[0]"],
    ]
    # Istio sets the allow shadow prefix even without shadow rules (Go's nil GetAction() is ALLOW).
    assert all(f["typed_config"]["shadow_rules_stat_prefix"] == "istio_dry_run_allow_" for f in filters)
    assert rbac_filters([policies[1]], for_tcp=False) == []


def test_dry_run_policies_become_shadow_rules() -> None:
    filters = rbac_filters(
        [
            ap("dry-allow", {"rules": [{}]}, dry_run="true"),
            ap("real-allow", {"rules": [{}]}, dry_run="false"),
            ap("dry-deny", {"action": "DENY", "rules": [{}]}, dry_run="1"),
            ap("dry-audit", {"action": "AUDIT", "rules": [{}]}, dry_run="True"),
            ap("bad-annotation", {"action": "AUDIT", "rules": [{}]}, dry_run="yes"),  # unparsable: enforced
        ],
        for_tcp=False,
    )
    audit, deny, allow = (f["typed_config"] for f in filters)
    assert list(audit["rules"]["policies"]) == ["ns[foo]-policy[bad-annotation]-rule[0]"]
    assert list(audit["shadow_rules"]["policies"]) == ["ns[foo]-policy[dry-audit]-rule[0]"]
    assert "shadow_rules_stat_prefix" not in audit  # LOG shadow rules have no prefix
    assert "rules" not in deny
    assert deny["shadow_rules"]["action"] == "DENY"
    assert deny["shadow_rules_stat_prefix"] == "istio_dry_run_deny_"
    assert list(allow["rules"]["policies"]) == ["ns[foo]-policy[real-allow]-rule[0]"]
    assert list(allow["shadow_rules"]["policies"]) == ["ns[foo]-policy[dry-allow]-rule[0]"]
    assert allow["shadow_rules_stat_prefix"] == "istio_dry_run_allow_"


# --- TCP ----------------------------------------------------------------------------------

HTTP_AND_TCP_RULES: list[Json] = [
    # rule 0: only HTTP attributes
    {"to": [{"operation": {"methods": ["GET"]}}]},
    # rule 1: TCP source + HTTP source attribute
    {"from": [{"source": {"namespaces": ["ns1"], "requestPrincipals": ["i/s"]}}]},
    # rule 2: TCP only
    {"to": [{"operation": {"ports": ["80"]}}], "when": [{"key": "experimental.envoy.filters.f[k]", "values": ["v"]}]},
    # rule 3: an HTTP-only `when` in notValues
    {"to": [{"operation": {"ports": ["81"]}}], "when": [{"key": "request.headers[x]", "notValues": ["y"]}]},
]


def test_tcp_allow_drops_rules_using_http_attributes() -> None:
    filters = rbac_filters([ap("p", {"rules": HTTP_AND_TCP_RULES})], for_tcp=True)
    assert len(filters) == 1
    assert filters[0]["name"] == NETWORK_RBAC_FILTER
    typed = filters[0]["typed_config"]
    assert typed["@type"] == NETWORK_RBAC_TYPE
    assert typed["stat_prefix"] == "tcp."
    # Only rule 2 survives; metadata conditions are not HTTP-only.
    assert list(typed["rules"]["policies"]) == ["ns[foo]-policy[p]-rule[2]"]
    # A policy with nothing but HTTP rules becomes an ALLOW with no policies: deny all TCP.
    only_http = rbac_filters([ap("p", {"rules": [HTTP_AND_TCP_RULES[0]]})], for_tcp=True)
    assert only_http[0]["typed_config"]["rules"] == {"action": "ALLOW", "policies": {}}


def test_tcp_deny_drops_only_the_http_conditions() -> None:
    typed = only_filter([ap("p", {"action": "DENY", "rules": HTTP_AND_TCP_RULES})], for_tcp=True)
    pols = typed["rules"]["policies"]
    any_perm = [{"and_rules": {"rules": [{"any": True}]}}]
    any_princ = [{"and_ids": {"ids": [{"any": True}]}}]
    # rule 0: the method condition is gone: deny every connection
    assert pols["ns[foo]-policy[p]-rule[0]"] == {"permissions": any_perm, "principals": any_princ}
    # rule 1: only the namespace remains
    assert pols["ns[foo]-policy[p]-rule[1]"]["principals"] == [
        {"and_ids": {"ids": [{"or_ids": {"ids": [authn({"safe_regex": {"regex": ".*/ns/ns1/.*"}})]}}]}}
    ]
    # rule 3: the NOT(header) is dropped too, the port remains
    assert pols["ns[foo]-policy[p]-rule[3]"] == {
        "permissions": [{"and_rules": {"rules": [{"or_rules": {"rules": [{"destination_port": 81}]}}]}}],
        "principals": any_princ,
    }


def test_invalid_values_drop_the_allow_rule_but_only_the_value_in_deny() -> None:
    rules = [{"to": [{"operation": {"ports": ["80", "99999"]}}]}, {"from": [{"source": {"ipBlocks": ["nope"]}}]}]
    allow = only_filter([ap("p", {"rules": rules})])
    assert allow["rules"]["policies"] == {}
    deny = only_filter([ap("p", {"action": "DENY", "rules": rules})])["rules"]["policies"]
    assert deny["ns[foo]-policy[p]-rule[0]"]["permissions"] == [
        {"and_rules": {"rules": [{"or_rules": {"rules": [{"destination_port": 80}]}}]}}
    ]
    assert deny["ns[foo]-policy[p]-rule[1]"]["principals"] == [{"and_ids": {"ids": [{"any": True}]}}]


def test_unknown_when_key_drops_the_rule_for_every_action() -> None:
    rules = [{"when": [{"key": "destination.labels[app]", "values": ["x"]}]}, {}]
    for action in ("ALLOW", "DENY"):
        typed = only_filter([ap("p", {"action": action, "rules": rules})])
        assert list(typed["rules"]["policies"]) == ["ns[foo]-policy[p]-rule[1]"]


# --- a real Envoy accepts the output ------------------------------------------------------

RICH_POLICIES = [
    ap(
        "full",
        {
            "rules": [
                {
                    "from": [
                        {
                            "source": {
                                "principals": ["*", "*-sfx", "pfx-*", "cluster.local/ns/a/sa/b"],
                                "notPrincipals": ["bad"],
                                "requestPrincipals": ["*", "*x", "x*", "iss/*", "*iss/sub", "https://i.io/a/b"],
                                "notRequestPrincipals": ["nope/nope"],
                                "namespaces": ["ns", "ns-*", "*"],
                                "notNamespaces": ["kube-*"],
                                "serviceAccounts": ["sa", "ns/sa"],
                                "ipBlocks": ["10.0.0.1", "10.1.0.0/16", "2001:db8::/32"],
                                "notRemoteIpBlocks": ["192.168.0.0/16"],
                                "trustDomains": ["*", "td.io", "td-*"],
                            }
                        },
                        {"source": {"notServiceAccounts": ["x/y"], "notTrustDomains": ["old"]}},
                    ],
                    "to": [
                        {
                            "operation": {
                                "hosts": ["a.com", "*.b.com", "c.*", "*"],
                                "notHosts": ["evil.com"],
                                "methods": ["GET", "POST"],
                                "notMethods": ["*"],
                                "paths": ["/exact", "/pfx/*", "*.html", "*", "/t/{*}/x", "/u/{**}"],
                                "notPaths": ["/admin/*"],
                                "ports": ["80", "8080"],
                                "notPorts": ["9090"],
                            }
                        },
                        {},
                    ],
                    "when": [
                        {"key": "request.headers[X-A]", "values": ["a", "a*", "*a", "*"], "notValues": ["b"]},
                        {"key": "source.ip", "values": ["10.0.0.0/8"]},
                        {"key": "remote.ip", "notValues": ["1.2.3.4"]},
                        {"key": "source.namespace", "values": ["n*"]},
                        {"key": "source.serviceAccount", "values": ["n/s"]},
                        {"key": "source.principal", "values": ["cluster.local/ns/n/sa/s", "*"]},
                        {"key": "source.trustDomain", "values": ["cluster.local"]},
                        {"key": "request.auth.principal", "values": ["i/s"], "notValues": ["*"]},
                        {"key": "request.auth.audiences", "values": ["aud", "aud2*"]},
                        {"key": "request.auth.presenter", "values": ["azp"]},
                        {"key": "request.auth.claims[groups]", "values": ["g1", "g*"]},
                        {"key": "request.auth.claims[a][b.c]", "notValues": ["*"]},
                        {"key": "destination.ip", "values": ["10.0.0.2", "fd00::/8"]},
                        {"key": "destination.port", "notValues": ["22"]},
                        {"key": "connection.sni", "values": ["*.svc", "host"]},
                        {"key": "experimental.envoy.filters.f.g[k]", "values": ["v", "[l]", "*"]},
                    ],
                },
                {},
            ]
        },
    ),
    ap("deny", {"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["DELETE"], "ports": ["1"]}}]}]}),
    ap("audit", {"action": "AUDIT", "rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]}),
    ap("dry", {"rules": [{"to": [{"operation": {"paths": ["/dry"]}}]}]}, dry_run="true"),
    ap("dry-deny", {"action": "DENY", "rules": [{}]}, dry_run="true"),
    ap("none", {}),
]


HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def _bootstrap(http_filters: list[Json], network_filters: list[Json]) -> Json:
    def address() -> Json:
        return {"socket_address": {"address": "127.0.0.1", "port_value": 0}}

    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": "http",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}],
                }
            ]
        },
        "http_filters": [
            *http_filters,
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    tcp_proxy = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "tcp",
        "cluster": "backend",
    }
    endpoint = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9}}}}
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "http",
                    "address": address(),
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                },
                {
                    "name": "tcp",
                    "address": address(),
                    "filter_chains": [
                        {
                            "filters": [
                                *network_filters,
                                {"name": "envoy.filters.network.tcp_proxy", "typed_config": tcp_proxy},
                            ]
                        }
                    ],
                },
            ],
            "clusters": [
                {
                    "name": "backend",
                    "type": "STATIC",
                    "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [endpoint]}]},
                }
            ],
        }
    }


def test_envoy_accepts_generated_filters(tmp_path: Path, envoy_binary: Path) -> None:
    envoy = envoy_binary
    kw: Json = {"trust_domain": "cluster.local", "trust_domain_aliases": ["old-td"]}
    http = rbac_filters(RICH_POLICIES, for_tcp=False, **kw)
    tcp = rbac_filters(RICH_POLICIES, for_tcp=True, **kw)
    assert [f["typed_config"]["rules"]["action"] for f in http] == ["LOG", "DENY", "ALLOW"]
    assert len(tcp) == 3
    config = tmp_path / "bootstrap.json"
    config.write_text(json.dumps(_bootstrap(http, tcp)))
    result = subprocess.run(
        [str(envoy), "--mode", "validate", "-c", str(config), "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr

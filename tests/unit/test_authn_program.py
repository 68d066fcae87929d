"""extproc.authn.program: Istio's translation of jwtRules into jwt_authn providers and the
requirement tree (pilot/pkg/security/authn/policy_applier.go), and Envoy's extractor layout."""

from __future__ import annotations

import pytest

from extproc.authn.program import (
    AuthnProgram,
    HeaderLocation,
    IssuerSet,
    RemoteSource,
    RequireAll,
    RequireAny,
    RequireProvider,
    compile_rules,
    space_delimited_claims,
)
from tests.unit.authn_helpers import ISS, ISS_B, ISS_C, default_keyset, rule


def test_no_rules_compile_to_a_disabled_program() -> None:
    program = compile_rules([])
    assert program == AuthnProgram()
    assert not program.enabled
    assert program.providers == ()
    assert program.remote_sources == ()


def test_providers_are_sorted_by_issuer_and_named_origins_i() -> None:
    program = compile_rules([rule(ISS_C, origin="ns/c"), rule(ISS, origin="ns/a"), rule(ISS_B, origin="ns/b")])
    assert [(p.name, p.issuer, p.origin) for p in program.providers] == [
        ("origins-0", ISS, "ns/a"),
        ("origins-1", ISS_B, "ns/b"),
        ("origins-2", ISS_C, "ns/c"),
    ]
    assert program.enabled


def test_rules_with_the_same_issuer_keep_their_order() -> None:
    program = compile_rules([rule(ISS, origin="ns/first"), rule(ISS, origin="ns/second"), rule(ISS, origin="ns/third")])
    assert [(p.name, p.origin) for p in program.providers] == [
        ("origins-0", "ns/first"),
        ("origins-1", "ns/second"),
        ("origins-2", "ns/third"),
    ]


def test_policies_are_the_sorted_distinct_origins() -> None:
    program = compile_rules([rule(ISS, origin="ns/z"), rule(ISS_B, origin="ns/a"), rule(ISS_C, origin="ns/z")])
    assert program.policies == ("ns/a", "ns/z")


def test_one_rule_requires_its_provider_or_a_missing_token() -> None:
    program = compile_rules([rule()])
    (p0,) = program.providers
    assert program.root == RequireAny((RequireProvider(p0),), allow_missing=True)


def test_several_rules_require_any_provider_or_all_of_provider_or_missing() -> None:
    program = compile_rules([rule(ISS_B), rule(ISS)])
    p0, p1 = program.providers
    assert program.root == RequireAny(
        (
            RequireProvider(p0),
            RequireProvider(p1),
            RequireAll(
                (
                    RequireAny((RequireProvider(p0),), allow_missing=True),
                    RequireAny((RequireProvider(p1),), allow_missing=True),
                )
            ),
        )
    )
    assert isinstance(program.root, RequireAny)
    assert not program.root.allow_missing
    assert not program.root.allow_missing_or_failed


def test_default_locations_are_bearer_authorization_then_access_token_param() -> None:
    (p,) = compile_rules([rule()]).providers
    assert p.extractor.headers == (HeaderLocation("authorization", "Bearer ", IssuerSet(frozenset({ISS}))),)
    assert p.extractor.params == (("access_token", IssuerSet(frozenset({ISS}))),)
    assert p.extractor.cookies == ()


@pytest.mark.parametrize(
    ("kw", "headers", "params", "cookies"),
    [
        ({"from_headers": (("X-Token", "Token "),)}, [("x-token", "Token ")], [], []),
        ({"from_params": ("tok",)}, [], ["tok"], []),
        ({"from_cookies": ("session",)}, [], [], ["session"]),
        (
            {"from_headers": (("X-B", ""), ("x-a", "P ")), "from_params": ("b", "a"), "from_cookies": ("z", "y")},
            [("x-a", "P "), ("x-b", "")],
            ["a", "b"],
            ["y", "z"],
        ),
    ],
)
def test_any_custom_location_replaces_the_defaults(
    kw: dict[str, object], headers: list[tuple[str, str]], params: list[str], cookies: list[str]
) -> None:
    (p,) = compile_rules([rule(**kw)]).providers
    assert [(h.header, h.prefix) for h in p.extractor.headers] == headers
    assert [name for name, _ in p.extractor.params] == params
    assert [name for name, _ in p.extractor.cookies] == cookies


def test_header_locations_are_ordered_by_name_then_prefix_like_a_std_map() -> None:
    (p,) = compile_rules(
        [rule(from_headers=(("authorization", "Bearer "), ("authorization", ""), ("auth", "Z")))]
    ).providers
    assert [(h.header, h.prefix) for h in p.extractor.headers] == [
        ("auth", "Z"),
        ("authorization", ""),
        ("authorization", "Bearer "),
    ]


def test_all_extractor_merges_issuers_that_share_a_location() -> None:
    program = compile_rules([rule(ISS), rule(ISS_B), rule(ISS_C, from_params=("tok",))])
    ex = program.all_extractor
    assert ex is not None
    assert ex.headers == (HeaderLocation("authorization", "Bearer ", IssuerSet(frozenset({ISS, ISS_B}))),)
    assert dict(ex.params) == {
        "access_token": IssuerSet(frozenset({ISS, ISS_B})),
        "tok": IssuerSet(frozenset({ISS_C})),
    }
    # Each provider's own extractor only knows its own issuer.
    assert [p.extractor.headers[0].issuers.issuers for p in program.providers[:2]] == [
        frozenset({ISS}),
        frozenset({ISS_B}),
    ]


def test_empty_issuer_allows_every_issuer_at_its_locations() -> None:
    (p,) = compile_rules([rule("")]).providers
    issuers = p.extractor.headers[0].issuers
    assert issuers.allow_all
    assert issuers.allows("anyone")
    assert not IssuerSet(frozenset({ISS})).allows(ISS_B)
    assert IssuerSet(frozenset({ISS})).allows(ISS)


def test_output_headers_are_lower_cased_and_sanitized() -> None:
    (p,) = compile_rules(
        [rule(payload_header="X-Jwt-Payload", claim_headers=(("X-Sub", "sub"), ("x-Nested", "a.B")))]
    ).providers
    assert p.payload_header == "x-jwt-payload"
    assert p.claim_headers == (("x-sub", "sub"), ("x-nested", "a.B"))
    assert p.extractor.sanitize == ("x-jwt-payload", "x-sub", "x-nested")


def test_rule_without_outputs_sanitizes_nothing() -> None:
    (p,) = compile_rules([rule()]).providers
    assert p.extractor.sanitize == ()
    assert p.payload_header == ""
    assert p.claim_headers == ()


def test_forward_and_audiences_are_per_provider() -> None:
    program = compile_rules([rule(ISS, forward=True, audiences=("api",)), rule(ISS_B)])
    p0, p1 = program.providers
    assert p0.forward and not p1.forward
    assert not p0.audiences.allows(("web",))
    assert p0.audiences.allows(("https://api/",))
    assert p1.audiences.allows(("web",))


def test_inline_keys_mean_no_remote_source() -> None:
    (p,) = compile_rules([rule()]).providers
    assert p.inline_keys is default_keyset()
    assert p.remote is None
    assert compile_rules([rule()]).remote_sources == ()


def test_rules_without_inline_keys_fetch_from_jwks_uri_or_discovery() -> None:
    program = compile_rules(
        [
            rule(ISS, keys=None, jwks_uri="https://issuer.example.com/jwks", timeout_s=2.5),
            rule(ISS_B, keys=None),
        ]
    )
    p0, p1 = program.providers
    assert p0.remote == RemoteSource(ISS, "https://issuer.example.com/jwks", 2.5)
    assert p0.remote.key == "https://issuer.example.com/jwks"
    assert p1.remote == RemoteSource(ISS_B, "", 5.0)
    assert p1.remote.key == f"oidc:{ISS_B}"
    assert program.remote_sources == (p0.remote, p1.remote)


def test_remote_sources_are_deduplicated_by_key() -> None:
    uri = "https://keys.example.com/jwks"
    program = compile_rules(
        [rule(ISS, keys=None, jwks_uri=uri), rule(ISS_B, keys=None, jwks_uri=uri), rule(ISS_C, keys=None)]
    )
    assert [s.key for s in program.remote_sources] == [uri, f"oidc:{ISS_C}"]


def test_space_delimited_claims_default_to_scope_and_permission() -> None:
    assert space_delimited_claims(None) == ("permission", "scope")
    assert space_delimited_claims(()) == ("permission", "scope")
    assert space_delimited_claims(("roles", "scope", "groups")) == ("groups", "permission", "roles", "scope")
    (p,) = compile_rules([rule(space_delimited=("roles",))]).providers
    assert p.space_delimited == ("permission", "roles", "scope")

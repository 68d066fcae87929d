"""RequestAuthentication compiled for one workload: providers, token locations and the
requirement tree Istio generates for Envoy's jwt_authn filter.

Istio (pilot/pkg/security/authn/policy_applier.go) concatenates the jwtRules of every
applicable RequestAuthentication, sorts them by issuer and names the providers
`origins-<i>`. One rule gives `requires_any{P0, allow_missing}`; N rules give
`requires_any{P0..PN-1, requires_all{any{P0, allow_missing} .. any{PN-1, allow_missing}}}`.
A rule with `presence: REQUIRED` (istio/istio#60823) loses its `allow_missing`: once any
rule is REQUIRED the root is `requires_all` over every rule, a REQUIRED one as the bare
provider and an OPTIONAL one as `any{Pi, allow_missing}`, with no outer "any provider"
shortcut, so an optional token alone cannot stand in for a required one (and one REQUIRED
rule on its own is just its provider: no token is 401 "Jwt is missing").
The tree is kept as data so the verifier can walk it exactly as Envoy does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from extproc.authn.keys import KeySet
from extproc.authn.token import AudienceCheck

BEARER_PREFIX = "Bearer "
ACCESS_TOKEN_PARAM = "access_token"
DEFAULT_SPACE_DELIMITED = ("permission", "scope")
DEFAULT_JWKS_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class IssuerSet:
    """Issuers that configured one token location; an empty issuer allows any."""

    issuers: frozenset[str]
    allow_all: bool = False

    def allows(self, iss: str) -> bool:
        return self.allow_all or iss in self.issuers


@dataclass(frozen=True, slots=True)
class RemoteSource:
    """Where a provider's keys come from when they are not inline: a jwksUri, or (with no URI)
    the issuer's OpenID discovery document."""

    issuer: str
    jwks_uri: str  # "" = discover from {issuer}/.well-known/openid-configuration
    timeout_s: float = DEFAULT_JWKS_TIMEOUT_S

    @property
    def key(self) -> str:
        return self.jwks_uri or f"oidc:{self.issuer}"


@dataclass(frozen=True, slots=True)
class Provider:
    name: str  # origins-<i>
    issuer: str
    audiences: AudienceCheck
    forward: bool
    payload_header: str  # lower-case, "" = none
    claim_headers: tuple[tuple[str, str], ...]  # (lower-case header, claim path)
    space_delimited: tuple[str, ...]
    inline_keys: KeySet | None
    remote: RemoteSource | None
    extractor: Extractor
    origin: str  # namespace/name of the RequestAuthentication, for explanations
    # What shapes a verified token's outputs: the token cache keys them by this, since
    # after a reload `origins-0` may be another rule writing other headers.
    outputs_key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = repr((self.payload_header, self.claim_headers, self.space_delimited))
        object.__setattr__(self, "outputs_key", key)


@dataclass(frozen=True, slots=True)
class HeaderLocation:
    header: str  # lower-case
    prefix: str
    issuers: IssuerSet


@dataclass(frozen=True, slots=True)
class Extractor:
    """Envoy's ExtractorImpl: header locations (ordered by header+prefix), then query
    parameters, then cookies (each ordered by name), plus headers to sanitize first."""

    headers: tuple[HeaderLocation, ...]
    params: tuple[tuple[str, IssuerSet], ...]
    cookies: tuple[tuple[str, IssuerSet], ...]
    sanitize: tuple[str, ...]

    @classmethod
    def for_rules(cls, rules: Sequence[_RuleLocations]) -> Extractor:
        headers: dict[str, tuple[str, str, set[str], list[bool]]] = {}
        params: dict[str, tuple[set[str], list[bool]]] = {}
        cookies: dict[str, tuple[set[str], list[bool]]] = {}
        sanitize: list[str] = []

        def note(issuers: set[str], allow_all: list[bool], iss: str) -> None:
            if iss:
                issuers.add(iss)
            else:
                allow_all[0] = True

        for r in rules:
            hdrs = list(r.headers)
            prms = list(r.params)
            cks = list(r.cookies)
            if not hdrs and not prms and not cks:
                hdrs = [("authorization", BEARER_PREFIX)]
                prms = [ACCESS_TOKEN_PARAM]
            for name, prefix in hdrs:
                h = headers.setdefault(name + prefix, (name, prefix, set(), [False]))
                note(h[2], h[3], r.issuer)
            for p in prms:
                e = params.setdefault(p, (set(), [False]))
                note(e[0], e[1], r.issuer)
            for c in cks:
                e = cookies.setdefault(c, (set(), [False]))
                note(e[0], e[1], r.issuer)
            sanitize.extend(r.sanitize)
        return cls(
            headers=tuple(
                HeaderLocation(n, p, IssuerSet(frozenset(i), a[0])) for _, (n, p, i, a) in sorted(headers.items())
            ),
            params=tuple((k, IssuerSet(frozenset(i), a[0])) for k, (i, a) in sorted(params.items())),
            cookies=tuple((k, IssuerSet(frozenset(i), a[0])) for k, (i, a) in sorted(cookies.items())),
            sanitize=tuple(sanitize),
        )


@dataclass(frozen=True, slots=True)
class _RuleLocations:
    issuer: str
    headers: tuple[tuple[str, str], ...]
    params: tuple[str, ...]
    cookies: tuple[str, ...]
    sanitize: tuple[str, ...]


# --- requirement tree (Envoy JwtRequirement) -------------------------------------------


@dataclass(frozen=True, slots=True)
class RequireProvider:
    provider: Provider


@dataclass(frozen=True, slots=True)
class RequireAny:
    children: tuple[Requirement, ...]
    allow_missing: bool = False
    allow_missing_or_failed: bool = False


@dataclass(frozen=True, slots=True)
class RequireAll:
    children: tuple[Requirement, ...]


Requirement = RequireProvider | RequireAny | RequireAll


@dataclass(frozen=True, slots=True)
class AuthnProgram:
    providers: tuple[Provider, ...] = ()
    root: Requirement | None = None
    all_extractor: Extractor | None = None  # every provider's locations, for explanations
    policies: tuple[str, ...] = ()  # namespace/name of the applied RequestAuthentications

    @property
    def enabled(self) -> bool:
        return self.root is not None

    @property
    def remote_sources(self) -> tuple[RemoteSource, ...]:
        seen: dict[str, RemoteSource] = {}
        for p in self.providers:
            if p.remote is not None:
                seen.setdefault(p.remote.key, p.remote)
        return tuple(seen.values())


@dataclass(frozen=True, slots=True)
class RuleInput:
    """One jwtRule with its origin, as the compiler needs it (decoupled from pydantic)."""

    origin: str
    issuer: str
    audiences: tuple[str, ...] = ()
    jwks_uri: str = ""
    inline_keys: KeySet | None = None
    from_headers: tuple[tuple[str, str], ...] = ()
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    payload_header: str = ""
    forward: bool = False
    claim_headers: tuple[tuple[str, str], ...] = ()
    timeout_s: float = DEFAULT_JWKS_TIMEOUT_S
    space_delimited: tuple[str, ...] | None = None
    required: bool = False  # presence: REQUIRED
    extra: Mapping[str, Any] = field(default_factory=dict)


def space_delimited_claims(user: tuple[str, ...] | None) -> tuple[str, ...]:
    """Istio's buildSpaceDelimitedClaims: the user's claims plus scope and permission, sorted."""
    if user is None:
        return DEFAULT_SPACE_DELIMITED
    return tuple(sorted({*user, *DEFAULT_SPACE_DELIMITED}))


def compile_rules(rules: Sequence[RuleInput]) -> AuthnProgram:
    if not rules:
        return AuthnProgram()
    ordered = sorted(rules, key=lambda r: r.issuer)  # Go's slices.SortBy is stable too
    locs = [
        _RuleLocations(
            issuer=r.issuer,
            headers=tuple((h.lower(), p) for h, p in r.from_headers),
            params=r.from_params,
            cookies=r.from_cookies,
            sanitize=tuple(x for x in (r.payload_header.lower(), *(h.lower() for h, _ in r.claim_headers)) if x),
        )
        for r in ordered
    ]
    providers = tuple(
        Provider(
            name=f"origins-{i}",
            issuer=r.issuer,
            audiences=AudienceCheck(r.audiences),
            forward=r.forward,
            payload_header=r.payload_header.lower(),
            claim_headers=tuple((h.lower(), c) for h, c in r.claim_headers),
            space_delimited=space_delimited_claims(r.space_delimited),
            inline_keys=r.inline_keys,
            remote=None if r.inline_keys is not None else RemoteSource(r.issuer, r.jwks_uri, r.timeout_s),
            extractor=Extractor.for_rules([loc]),
            origin=r.origin,
        )
        for i, (r, loc) in enumerate(zip(ordered, locs, strict=True))
    )
    required = [r.required for r in ordered]
    root: Requirement
    if any(required):
        per_rule = tuple(
            RequireProvider(p) if req else RequireAny((RequireProvider(p),), allow_missing=True)
            for p, req in zip(providers, required, strict=True)
        )
        root = per_rule[0] if len(per_rule) == 1 else RequireAll(per_rule)
    elif len(providers) == 1:
        root = RequireAny((RequireProvider(providers[0]),), allow_missing=True)
    else:
        inner = tuple(RequireAny((RequireProvider(p),), allow_missing=True) for p in providers)
        root = RequireAny((*(RequireProvider(p) for p in providers), RequireAll(inner)))
    return AuthnProgram(
        providers=providers,
        root=root,
        all_extractor=Extractor.for_rules(locs),
        policies=tuple(sorted({r.origin for r in rules})),
    )

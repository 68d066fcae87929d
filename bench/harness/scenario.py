"""The workload every mode is measured with: policies, 50 signed tokens, the request mix.

One workload, ``bench/productpage`` (labels app=productpage, version=v1), protected by one
RequestAuthentication and ``--policies`` AuthorizationPolicies that all apply to it, so
their count is what the engines pay for. The policies are the kind a platform team writes:

* a mesh-wide DENY of admin and debug paths (root namespace);
* DENYs of methods, of blocked address ranges and of blocked end users (JWT claim);
* per-caller ALLOWs by service account, by JWT group claim and by tenant header, which do
  not match the benchmark's requests, so every ALLOW before the last one is evaluated;
* last, the ALLOW that admits the load: any principal of the issuer whose token grants
  ``products.read`` may GET product pages.

The load is the issue's "50 RS256 tokens, 90 % allowed / 10 % denied": 50 tokens with distinct
subjects (45 shoppers and 5 blocked users), and a fixed list of 100 requests (path + token)
that every load-generator connection walks in turn. One request in ten is denied with 403,
placed every tenth, so any stretch of the list holds its share of denials to within one:
half are the blocked users' tokens on product pages (the DENY on the ``sub`` claim), half are
shoppers asking for order paths that no ALLOW matches. Every token is valid, so the load
has no 401. The list is deterministic, so the share of 403s a run must see is known exactly.

HTTP/2 (h2load) sends the same headers with every request: there every request carries the
first shopper's token and the tenth URIs are the order paths, which keeps the 10 % of denials
but not the 50 tokens.

The probes send one request of each kind the policies decide differently, so a mode that
does not enforce them is seen at once.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

NAMESPACE = "bench"
ROOT_NAMESPACE = "istio-system"
LABELS = {"app": "productpage", "version": "v1"}
WORKLOAD = "productpage-v1"
SERVICE_ACCOUNT = "productpage"
ISSUER = "https://issuer.bench.example"
AUDIENCE = "productpage.bench.svc.cluster.local"

# The 50 token subjects: shoppers the ALLOW admits, then end users the DENY on `sub` blocks.
SHOPPERS = tuple(f"shopper-{i:02d}" for i in range(45))
BLOCKED_USERS = ("mallory", "trudy", "eve", "oscar", "chuck")
SUBJECTS = SHOPPERS + BLOCKED_USERS
PRODUCT_PATHS = tuple(f"/api/v1/products/{i}" for i in range(100))
UNMATCHED_PREFIX = "/api/v1/orders/"  # no ALLOW names it: a 403 wherever the policies are enforced
MIX_LENGTH = 100
DENIED_EVERY = 10  # one request in ten is denied: the issue's 90 % allowed / 10 % denied

ALLOWED = "allowed"
BLOCKED_USER = "blocked user"
NO_ALLOW = "no ALLOW matches"


@dataclass(frozen=True)
class Probe:
    name: str
    path: str
    headers: dict[str, str]
    expect: int  # with the policies enforced; without them every probe gets 200


@dataclass(frozen=True)
class LoadRequest:
    """One entry of the load list: a GET of `path` with the bearer token `tokens[token]`."""

    path: str
    token: int
    kind: str  # ALLOWED, BLOCKED_USER or NO_ALLOW
    expect: int  # with the policies enforced; without them every request gets 200


@dataclass
class Scenario:
    policies: int
    documents: list[dict[str, Any]]
    tokens: list[str]  # one per subject of SUBJECTS, in that order
    load: list[LoadRequest]  # the HTTP/1.1 list: path and token vary per request
    load_h2: list[LoadRequest]  # the HTTP/2 list: one token, only the path varies
    probes: list[Probe] = field(default_factory=list)

    @property
    def token(self) -> str:
        """The first shopper's token: the allowed probe's, and every HTTP/2 request's."""
        return self.tokens[0]

    def headers(self, request: LoadRequest) -> dict[str, str]:
        return {"authorization": f"Bearer {self.tokens[request.token]}"}

    def load_requests(self, protocol: str) -> list[LoadRequest]:
        """The list each connection walks: per-request tokens with HTTP/1.1 (wrk), one token with HTTP/2."""
        return self.load_h2 if protocol == "http2" else self.load

    @property
    def denied_share(self) -> float:
        """Share of the load list answered 403 where the policies are enforced (the same for both lists)."""
        return denied_share(self.load)

    def mix(self) -> dict[str, Any]:
        """What results.json records about the load list."""
        return {
            "tokens": len({r.token for r in self.load}),
            "requests_per_cycle": len(self.load),
            "denied_share": self.denied_share,
            "kinds": dict(Counter(r.kind for r in self.load)),
            "http2": {
                "tokens": len({r.token for r in self.load_h2}),
                "denied_share": denied_share(self.load_h2),
                "kinds": dict(Counter(r.kind for r in self.load_h2)),
            },
        }

    def authorization_policies(self) -> list[dict[str, Any]]:
        return [d for d in self.documents if d["kind"] == "AuthorizationPolicy"]

    def request_authentications(self) -> list[dict[str, Any]]:
        return [d for d in self.documents if d["kind"] == "RequestAuthentication"]

    def write(self, directory: Path) -> Path:
        """The policy folder extproc serves (one file, several YAML documents)."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "policies.yaml"
        path.write_text(yaml.safe_dump_all(self.documents, sort_keys=False))
        return path


def denied_share(requests: list[LoadRequest]) -> float:
    return sum(r.expect == 403 for r in requests) / len(requests) if requests else 0.0


def _doc(kind: str, name: str, spec: dict[str, Any], namespace: str = NAMESPACE) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


_SELECTOR = {"matchLabels": {"app": LABELS["app"]}}


def _fixed_denies() -> list[dict[str, Any]]:
    return [
        _doc(
            "AuthorizationPolicy",
            "deny-admin",
            {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin", "/admin/*", "/debug/*"]}}]}]},
            namespace=ROOT_NAMESPACE,
        ),
        _doc(
            "AuthorizationPolicy",
            "deny-methods",
            {"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["TRACE", "CONNECT"]}}]}]},
        ),
        _doc(
            "AuthorizationPolicy",
            "deny-blocked-ranges",
            {
                "selector": _SELECTOR,
                "action": "DENY",
                "rules": [{"from": [{"source": {"remoteIpBlocks": ["203.0.113.0/24", "198.51.100.0/24"]}}]}],
            },
        ),
        _doc(
            "AuthorizationPolicy",
            "deny-blocked-users",
            {
                "selector": _SELECTOR,
                "action": "DENY",
                "rules": [{"when": [{"key": "request.auth.claims[sub]", "values": list(BLOCKED_USERS)}]}],
            },
        ),
    ]


def _allow_variant(i: int) -> dict[str, Any]:
    """ALLOWs for other callers: none matches a benchmark request."""
    kind = i % 3
    if kind == 0:
        spec = {
            "selector": _SELECTOR,
            "rules": [
                {
                    "from": [{"source": {"principals": [f"cluster.local/ns/{NAMESPACE}/sa/caller-{i}"]}}],
                    "to": [{"operation": {"methods": ["GET", "POST"], "paths": [f"/api/v1/caller{i}/*"]}}],
                }
            ],
        }
        return _doc("AuthorizationPolicy", f"allow-caller-{i:02d}", spec)
    if kind == 1:
        spec = {
            "selector": _SELECTOR,
            "rules": [
                {
                    "from": [{"source": {"requestPrincipals": [f"{ISSUER}/*"]}}],
                    "to": [{"operation": {"paths": [f"/api/v1/teams/team-{i}/*"]}}],
                    "when": [{"key": "request.auth.claims[groups]", "values": [f"team-{i}"]}],
                }
            ],
        }
        return _doc("AuthorizationPolicy", f"allow-team-{i:02d}", spec)
    spec = {
        "selector": _SELECTOR,
        "rules": [
            {
                "to": [{"operation": {"methods": ["GET"], "paths": [f"/api/v1/tenants/{i}/*"]}}],
                "when": [{"key": "request.headers[x-tenant]", "values": [f"tenant-{i}"]}],
            }
        ],
    }
    return _doc("AuthorizationPolicy", f"allow-tenant-{i:02d}", spec)


def _load_allow() -> dict[str, Any]:
    """Any principal of the issuer with `products.read` may read products: all 50 subjects pass it.

    The blocked users pass it too, so it is the DENY on `sub`, evaluated first, that stops them.
    """
    spec = {
        "selector": _SELECTOR,
        "rules": [
            {
                "from": [{"source": {"requestPrincipals": [f"{ISSUER}/*"]}}],
                "to": [{"operation": {"methods": ["GET", "HEAD"], "paths": ["/api/v1/products/*"]}}],
                "when": [{"key": "request.auth.claims[scope]", "values": ["products.read"]}],
            }
        ],
    }
    return _doc("AuthorizationPolicy", "zz-allow-product-readers", spec)


class _Keys:
    def __init__(self) -> None:
        self.kid = "bench-1"
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> str:
        jwk = json.loads(RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": self.kid, "alg": "RS256", "use": "sig"})
        return json.dumps({"keys": [jwk]})

    def token(self, subject: str, lifetime_s: int = 24 * 3600) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + lifetime_s,
            "scope": "products.read reviews.read",
            "groups": ["shoppers"],
        }
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})


def load_mix(blocked_users_denied: bool) -> list[LoadRequest]:
    """The HTTP/1.1 load list: 100 requests, every tenth denied, every one of the 50 tokens used.

    Allowed: the 45 shoppers twice each, on product pages. Denied (positions 9, 19, ... 99):
    each blocked user once on a product page, and five shoppers on order paths no ALLOW
    matches. Without the DENY on `sub` (``--policies`` below 5) the blocked users ask for
    order paths instead, so the list keeps its 10 % of denials and its 50 tokens.
    """
    out: list[LoadRequest] = []
    allowed = 0
    for position in range(MIX_LENGTH):
        if position % DENIED_EVERY != DENIED_EVERY - 1:
            out.append(LoadRequest(PRODUCT_PATHS[position], allowed % len(SHOPPERS), ALLOWED, 200))
            allowed += 1
            continue
        denial = position // DENIED_EVERY
        unmatched = f"{UNMATCHED_PREFIX}{denial}"
        if denial % 2 == 0:
            token = len(SHOPPERS) + denial // 2
            if blocked_users_denied:
                out.append(LoadRequest(PRODUCT_PATHS[position], token, BLOCKED_USER, 403))
            else:
                out.append(LoadRequest(unmatched, token, NO_ALLOW, 403))
        else:
            out.append(LoadRequest(unmatched, (denial * 7) % len(SHOPPERS), NO_ALLOW, 403))
    return out


def load_mix_h2() -> list[LoadRequest]:
    """The HTTP/2 list: h2load sends one set of headers, so the first shopper's token throughout,
    and the same positions denied by paths no ALLOW matches."""
    out = []
    for position in range(MIX_LENGTH):
        if position % DENIED_EVERY == DENIED_EVERY - 1:
            out.append(LoadRequest(f"{UNMATCHED_PREFIX}{position // DENIED_EVERY}", 0, NO_ALLOW, 403))
        else:
            out.append(LoadRequest(PRODUCT_PATHS[position], 0, ALLOWED, 200))
    return out


def build(policies: int) -> Scenario:
    """The scenario with ``policies`` AuthorizationPolicies (at least 1) and one RequestAuthentication."""
    if policies < 1:
        raise ValueError("--policies must be at least 1: the load needs the ALLOW that admits it")
    keys = _Keys()
    ra = _doc(
        "RequestAuthentication",
        "productpage-jwt",
        {"selector": _SELECTOR, "jwtRules": [{"issuer": ISSUER, "jwks": keys.jwks(), "audiences": [AUDIENCE]}]},
    )
    denies = _fixed_denies()[: max(0, policies - 1)]
    allows = [_allow_variant(i) for i in range(policies - 1 - len(denies))]
    documents = [ra, *denies, *allows, _load_allow()]
    tokens = [keys.token(subject) for subject in SUBJECTS]
    names = {d["metadata"]["name"] for d in denies}
    token = tokens[0]
    auth = {"authorization": f"Bearer {token}"}
    head, payload, signature = token.split(".")
    forged = f"{head}.{payload}.{signature[:-4]}{'AAAA' if not signature.endswith('AAAA') else 'BBBB'}"
    probes = [
        Probe("allowed", PRODUCT_PATHS[1], auth, 200),
        Probe("no token", PRODUCT_PATHS[1], {}, 403),
        Probe("bad signature", PRODUCT_PATHS[1], {"authorization": f"Bearer {forged}"}, 401),
        Probe(NO_ALLOW, f"{UNMATCHED_PREFIX}1", auth, 403),
    ]
    if "deny-admin" in names:
        probes.append(Probe("mesh-wide DENY", "/admin/stats", auth, 403))
    if "deny-blocked-users" in names:
        blocked = tokens[SUBJECTS.index(BLOCKED_USERS[0])]
        probes.append(Probe(BLOCKED_USER, PRODUCT_PATHS[1], {"authorization": f"Bearer {blocked}"}, 403))
    load = load_mix(blocked_users_denied="deny-blocked-users" in names)
    return Scenario(policies, documents, tokens, load, load_mix_h2(), probes)

"""The workload every mode is measured with: policies, a signed token, the requests.

One workload, ``bench/productpage`` (labels app=productpage, version=v1), protected by one
RequestAuthentication and ``--policies`` AuthorizationPolicies that all apply to it, so
their count is what the engines pay for. The mix is the kind a platform team writes:

* a mesh-wide DENY of admin and debug paths (root namespace);
* DENYs of methods, of blocked address ranges and of blocked end users (JWT claim);
* per-caller ALLOWs by service account, by JWT group claim and by tenant header, which do
  not match the benchmark's requests, so every ALLOW before the last one is evaluated;
* last, the ALLOW that admits the load: the token's principal may GET product pages.

Every load request carries the same RS256 token (a client reuses its token) and asks for
one of 100 product paths in turn. The probes send one request of each kind the policies
decide differently, so a mode that does not enforce them is seen at once.
"""

from __future__ import annotations

import json
import time
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
SUBJECT = "bench-client"
AUDIENCE = "productpage.bench.svc.cluster.local"
LOAD_PATHS = tuple(f"/api/v1/products/{i}" for i in range(100))


@dataclass(frozen=True)
class Probe:
    name: str
    path: str
    headers: dict[str, str]
    expect: int  # with the policies enforced; without them every probe gets 200


@dataclass
class Scenario:
    policies: int
    documents: list[dict[str, Any]]
    token: str
    probes: list[Probe] = field(default_factory=list)

    @property
    def load_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

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
                "rules": [{"when": [{"key": "request.auth.claims[sub]", "values": ["mallory", "trudy"]}]}],
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
    spec = {
        "selector": _SELECTOR,
        "rules": [
            {
                "from": [{"source": {"requestPrincipals": [f"{ISSUER}/{SUBJECT}"]}}],
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
    token = keys.token(SUBJECT)
    auth = {"authorization": f"Bearer {token}"}
    head, payload, signature = token.split(".")
    forged = f"{head}.{payload}.{signature[:-4]}{'AAAA' if not signature.endswith('AAAA') else 'BBBB'}"
    probes = [
        Probe("allowed", LOAD_PATHS[1], auth, 200),
        Probe("no token", LOAD_PATHS[1], {}, 403),
        Probe("bad signature", LOAD_PATHS[1], {"authorization": f"Bearer {forged}"}, 401),
        Probe("no ALLOW matches", "/api/v1/orders/1", auth, 403),
    ]
    names = {d["metadata"]["name"] for d in denies}
    if "deny-admin" in names:
        probes.append(Probe("mesh-wide DENY", "/admin/stats", auth, 403))
    if "deny-blocked-users" in names:
        probes.append(Probe("blocked user", LOAD_PATHS[1], {"authorization": f"Bearer {keys.token('mallory')}"}, 403))
    return Scenario(policies, documents, token, probes)

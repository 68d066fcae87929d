"""Make the docker-compose stack's demo credential: a fresh ES256 key, its public key set
(deploy/jwt/jwks.json, served by the stack's sample upstream) and one long-lived token for the
load generator (deploy/jwt/demo.jwt, also written into docker-compose.yml). The private key is
never written anywhere: no one can sign another token for this key set, and running this again
replaces both files.

    .venv/bin/python scripts/dev/make_compose_jwt.py

The claims fit examples/policies/20-jwt.yaml: issuer https://demo.extproc.io, audience httpbin.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

REPO = Path(__file__).resolve().parents[2]
KID = "compose-demo"
ISSUER = "https://demo.extproc.io"
EXPIRES = datetime(2036, 1, 1, tzinfo=UTC)


def main() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": KID, "alg": "ES256", "use": "sig"})
    claims = {
        "iss": ISSUER,
        "sub": "fortio",
        "aud": "httpbin",
        "iat": int(datetime.now(UTC).timestamp()),
        "exp": int(EXPIRES.timestamp()),
    }
    token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": KID})
    out = REPO / "deploy" / "jwt"
    out.mkdir(parents=True, exist_ok=True)
    (out / "jwks.json").write_text(json.dumps({"keys": [jwk]}, indent=2) + "\n")
    (out / "demo.jwt").write_text(token + "\n")
    compose = REPO / "docker-compose.yml"
    text, n = re.subn(r"Bearer [A-Za-z0-9_\-.]+", f"Bearer {token}", compose.read_text())
    if n != 1:
        raise SystemExit(f"docker-compose.yml: expected one 'Bearer <token>', found {n}")
    compose.write_text(text)


if __name__ == "__main__":
    main()

"""Micro-benchmark of JWT verification in-process (no Envoy, no gRPC), per algorithm:

  * first:  a token never seen before: parse, checks and signature verification
            (the cache is bypassed, so every call pays the full price);
  * cached: the same token again: a cache hit, time and audience checks redone,
            no base64, no JSON, no signature;
  * signature only: the cryptography call alone, for reference.

Each figure is the whole `authenticate()` call of one request with a one-rule
RequestAuthentication (Authorization: Bearer, one claim copied to a header).

    .venv/bin/python -m bench.jwt_micro [--repeat 5] [--number 2000]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import timeit

import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from extproc.authn.cache import TokenCache
from extproc.authn.keys import parse_jwks
from extproc.authn.program import RuleInput, compile_rules
from extproc.authn.token import parse
from extproc.authn.verifier import authenticate

ISSUER = "https://issuer.example"


def setup(alg: str) -> tuple[object, str, object]:
    if alg.startswith(("RS", "PS")):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = "k1"
    keys = parse_jwks(json.dumps({"keys": [jwk]}))
    program = compile_rules(
        [RuleInput(origin="bench/ra", issuer=ISSUER, inline_keys=keys, claim_headers=(("x-sub", "sub"),))]
    )
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": "alice", "aud": "svc", "exp": now + 3600, "scope": "read write"}
    token = pyjwt.encode(claims, key, algorithm=alg, headers={"kid": "k1"})
    return program, token, keys


def best_us(fn: object, number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6  # type: ignore[arg-type]


def measure(alg: str, number: int, repeat: int) -> tuple[float, float, float, float]:
    program, token, keys = setup(alg)
    now = int(time.time())
    headers = {":path": "/api", ":method": "GET", ":authority": "svc", "authorization": f"Bearer {token}"}

    def lookup(prov: object) -> object:
        return keys

    def first() -> None:
        r = authenticate(program, "GET", headers, now, lookup, None)  # type: ignore[arg-type]
        assert r.ok and r.verified

    cache = TokenCache()

    def cached() -> None:
        r = authenticate(program, "GET", headers, now, lookup, cache)  # type: ignore[arg-type]
        assert r.ok and r.verified

    parsed = parse(token)

    def signature() -> None:
        keys.verify(parsed)  # type: ignore[attr-defined,arg-type]

    first_us = best_us(first, max(number // 10, 50), repeat)
    cached()  # warm
    cached_us = best_us(cached, number, repeat)
    sig_us = best_us(signature, max(number // 10, 50), repeat)
    return first_us, cached_us, sig_us, cache.counters.hits / max(cache.counters.hits + cache.counters.misses, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--number", type=int, default=2000)
    args = p.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}; best of {args.repeat} x {args.number}")
    print(f"  {'alg':6} {'first (µs)':>12} {'cached (µs)':>12} {'signature only (µs)':>20} {'cache hit ratio':>16}")
    for alg in ("RS256", "ES256"):
        first_us, cached_us, sig_us, ratio = measure(alg, args.number, args.repeat)
        print(f"  {alg:6} {first_us:12.1f} {cached_us:12.1f} {sig_us:20.1f} {ratio:16.4f}")


if __name__ == "__main__":
    main()

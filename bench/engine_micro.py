"""Micro-benchmark of the in-process authorization path (no Envoy, no gRPC):

  * compile: load and compile N AuthorizationPolicies into a snapshot;
  * adapt:   CheckRequest protobuf -> Attributes;
  * decide:  engine evaluation for allowed and denied HTTP requests and a TCP connection.

It shows where the Python time of one ext_authz Check goes; end-to-end costs against
the baselines belong to the harness in bench/ (the benchmark issue).

    .venv/bin/python -m bench.engine_micro [--policies 20] [--repeat 5]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import textwrap
import timeit
from pathlib import Path

from envoy.service.auth.v3 import external_auth_pb2

from extproc.authz import engine
from extproc.config import loader
from extproc.config.snapshot import Options, WorkloadIdentity, build_snapshot
from extproc.services.check_adapter import CheckAdapter


def policy_set(n: int) -> str:
    """A realistic mix: per-path ALLOW rules by service account, JWT conditions, a mesh DENY."""
    docs = [
        textwrap.dedent(
            """
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: mesh-deny, namespace: istio-system}
            spec:
              action: DENY
              rules:
              - to: [{operation: {paths: ["/admin*"], ports: ["8000"]}}]
              - from: [{source: {remoteIpBlocks: ["203.0.113.0/24"]}}]
            """
        )
    ]
    for i in range(n - 1):
        docs.append(
            textwrap.dedent(
                f"""
                apiVersion: security.istio.io/v1
                kind: AuthorizationPolicy
                metadata: {{name: svc-{i}, namespace: shop}}
                spec:
                  selector: {{matchLabels: {{app: cart}}}}
                  rules:
                  - from: [{{source: {{principals: ["cluster.local/ns/shop/sa/client-{i}"]}}}}]
                    to: [{{operation: {{methods: ["GET", "POST"], paths: ["/api/v1/svc{i}/*"]}}}}]
                  - from: [{{source: {{requestPrincipals: ["https://issuer.example.com/*"]}}}}]
                    to: [{{operation: {{paths: ["/api/v1/items/{{*}}"]}}}}]
                    when:
                    - key: request.auth.claims[scope]
                      values: ["items.read.{i}"]
                """
            )
        )
    return "---".join(docs)


def check_request(path: str, principal: str) -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    a.source.address.socket_address.address = "10.1.2.3"
    a.source.address.socket_address.port_value = 40000
    a.source.principal = principal
    a.destination.address.socket_address.address = "10.1.2.4"
    a.destination.address.socket_address.port_value = 8000
    h = a.request.http
    h.method, h.path, h.host, h.protocol = "GET", path, "cart.shop.svc.cluster.local", "HTTP/1.1"
    for k, v in {
        ":authority": "cart.shop.svc.cluster.local",
        ":method": "GET",
        ":path": path,
        "user-agent": "bench/1.0",
        "x-request-id": "5d0c5b8e-1b2c-4b8e-9a71-1c2d3e4f5a6b",
        "x-forwarded-proto": "http",
        "accept": "*/*",
    }.items():
        h.headers[k] = v
    jwt = a.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"]
    jwt.update({"payload": {"iss": "https://issuer.example.com/realm", "sub": "alice", "scope": "items.read.3 x"}})
    return req


def per_call_us(fn, number: int, repeat: int) -> float:  # type: ignore[no-untyped-def]
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", type=int, default=20)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "p.yaml").write_text(policy_set(args.policies))
        workload = WorkloadIdentity("shop", {"app": "cart"})

        def compile_once() -> None:
            build_snapshot(loader.load([d]), workload, Options(), 1)

        compile_ms = per_call_us(compile_once, 5, args.repeat) / 1000
        snap = build_snapshot(loader.load([d]), workload, Options(), 1)

    adapter = CheckAdapter()
    last = args.policies - 2
    allowed_req = check_request(f"/api/v1/svc{last}/orders?id=7", f"spiffe://cluster.local/ns/shop/sa/client-{last}")
    denied_req = check_request("/api/v1/nothing", "spiffe://cluster.local/ns/shop/sa/stranger")
    allowed_attrs = adapter.attributes(allowed_req)
    denied_attrs = adapter.attributes(denied_req)
    tcp_attrs = adapter.attributes(
        external_auth_pb2.CheckRequest(
            attributes=allowed_req.attributes.__class__(
                source=allowed_req.attributes.source, destination=allowed_req.attributes.destination
            )
        )
    )
    assert engine.evaluate(snap.http, allowed_attrs).allowed
    assert not engine.evaluate(snap.http, denied_attrs).allowed

    n = 20000
    rows = [
        ("adapt CheckRequest -> Attributes", per_call_us(lambda: adapter.attributes(allowed_req), n, args.repeat)),
        (
            "decide: allowed (last ALLOW rule matches)",
            per_call_us(lambda: engine.evaluate(snap.http, allowed_attrs), n, args.repeat),
        ),
        (
            "decide: denied (no rule matches, with reason)",
            per_call_us(lambda: engine.evaluate(snap.http, denied_attrs), n, args.repeat),
        ),
        ("decide: TCP connection", per_call_us(lambda: engine.evaluate(snap.tcp, tcp_attrs), n, args.repeat)),
    ]
    rules = len(snap.http.allow.enforced) + len(snap.http.deny.enforced)
    print(f"python {platform.python_version()} on {platform.machine()}, {args.policies} policies ({rules} HTTP rules)")
    print(f"  {'compile (load + validate + compile)':48} {compile_ms:9.2f} ms")
    for label, us in rows:
        print(f"  {label:48} {us:9.2f} µs")


if __name__ == "__main__":
    main()

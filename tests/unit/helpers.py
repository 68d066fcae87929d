"""Build snapshots from YAML text and requests from keyword arguments, for engine tests."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from extproc.attributes import Attributes, HttpRequest, parse_ip, remote_ip_from_xff
from extproc.authz import engine
from extproc.snapshot import loader
from extproc.snapshot.compiled import Options, Snapshot, WorkloadIdentity, build_snapshot


def snapshot_from_yaml(
    tmp_path: Path,
    text: str,
    *,
    namespace: str = "foo",
    labels: dict[str, str] | None = None,
    trust_domain: str = "cluster.local",
    aliases: tuple[str, ...] = (),
    options: Options | None = None,
) -> Snapshot:
    d = tmp_path / "cfg"
    d.mkdir(exist_ok=True)
    for f in d.iterdir():
        f.unlink()
    (d / "p.yaml").write_text(textwrap.dedent(text))
    loaded = loader.load([d])
    workload = WorkloadIdentity(
        namespace,
        labels if labels is not None else {"app": "httpbin"},
        trust_domain=trust_domain,
        trust_domain_aliases=aliases,
    )
    return build_snapshot(loaded, workload, options or Options(), 1)


def http_request(
    path: str = "/",
    method: str = "GET",
    host: str = "httpbin.foo",
    headers: dict[str, str] | None = None,
    principal: str | None = None,
    principals: tuple[str, ...] | None = None,
    source_ip: str = "10.0.0.1",
    destination_ip: str = "10.0.0.2",
    destination_port: int = 8000,
    jwt: dict[str, Any] | None = None,
    sni: str = "",
    metadata: dict[str, Any] | None = None,
    xff_hops: int = 0,
) -> Attributes:
    h = {k.lower(): v for k, v in (headers or {}).items()}
    h.setdefault(":method", method)
    h.setdefault(":path", path)
    h.setdefault(":authority", host)
    src = parse_ip(source_ip)
    if principals is None:
        principals = (principal,) if principal else ()
    return Attributes(
        source_ip=src,
        remote_ip=remote_ip_from_xff(h.get("x-forwarded-for"), src, xff_hops),
        destination_ip=parse_ip(destination_ip),
        destination_port=destination_port,
        source_principals=principals,
        sni=sni,
        http=HttpRequest(method=method, path=path, host=host, headers=h),
        jwt_payload=jwt,
        filter_metadata=metadata or {},
    )


def tcp_connection(
    principal: str | None = None,
    source_ip: str = "10.0.0.1",
    destination_ip: str = "10.0.0.2",
    destination_port: int = 8000,
    sni: str = "",
    metadata: dict[str, Any] | None = None,
) -> Attributes:
    src = parse_ip(source_ip)
    return Attributes(
        source_ip=src,
        remote_ip=src,
        destination_ip=parse_ip(destination_ip),
        destination_port=destination_port,
        source_principals=(principal,) if principal else (),
        sni=sni,
        filter_metadata=metadata or {},
    )


def decide(snap: Snapshot, attrs: Attributes) -> engine.Decision:
    program = snap.http if attrs.is_http else snap.tcp
    _, bad = engine.custom_providers(program, attrs)
    if bad is not None:
        return engine.bad_custom_decision(program, bad)
    return engine.evaluate(program, attrs)


def allowed(snap: Snapshot, attrs: Attributes) -> bool:
    return decide(snap, attrs).allowed


def policy(name: str, spec: str, namespace: str = "foo", annotations: str = "") -> str:
    """One AuthorizationPolicy document; `spec` is YAML indented under `spec:`."""
    md = f"metadata:\n  name: {name}\n  namespace: {namespace}\n"
    if annotations:
        md += f"  annotations: {annotations}\n"
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    return f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n{md}spec:\n{body}\n---\n"

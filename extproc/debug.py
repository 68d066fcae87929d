"""Describe a request in plain JSON and turn it into Attributes, for `extproc explain`
and the admin `/debug/explain` endpoint.

    {"method": "GET", "path": "/admin", "host": "api.example.com",
     "headers": {"x-user": "alice"}, "source_ip": "10.0.0.7",
     "source_principal": "spiffe://cluster.local/ns/foo/sa/bar",
     "destination_ip": "10.0.0.9", "destination_port": 8080, "sni": "",
     "jwt": {"iss": "https://issuer", "sub": "alice", "scope": "read write"},
     "metadata": {"envoy.filters.http.my_filter": {"key": "value"}}}

Without `method` and `path` the request is a TCP connection.
"""

from __future__ import annotations

from typing import Any

from extproc.attributes import Attributes, HttpRequest, parse_ip, remote_ip_from_xff


def attributes_from_description(desc: Any, xff_num_trusted_hops: int = 0) -> Attributes:
    if not isinstance(desc, dict):
        raise ValueError("the request description must be a JSON object")
    unknown = set(desc) - {
        "method",
        "path",
        "host",
        "headers",
        "source_ip",
        "source_principal",
        "source_principals",
        "destination_ip",
        "destination_port",
        "sni",
        "jwt",
        "metadata",
    }
    if unknown:
        raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")
    headers = {str(k).lower(): str(v) for k, v in (desc.get("headers") or {}).items()}
    http = None
    if desc.get("method") or desc.get("path"):
        method = str(desc.get("method") or "GET")
        path = str(desc.get("path") or "/")
        host = str(desc.get("host") or headers.get(":authority") or headers.get("host") or "")
        headers.pop("host", None)
        headers.setdefault(":method", method)
        headers.setdefault(":path", path)
        if host:
            headers.setdefault(":authority", host)
        http = HttpRequest(method=method, path=path, host=host, headers=headers)
    source_ip = parse_ip(str(desc.get("source_ip") or ""))
    if desc.get("source_ip") and source_ip is None:
        raise ValueError(f"source_ip is not an IP address: {desc['source_ip']!r}")
    destination_ip = parse_ip(str(desc.get("destination_ip") or ""))
    principals = desc.get("source_principals")
    if principals is None:
        principals = [desc["source_principal"]] if desc.get("source_principal") else []
    jwt = desc.get("jwt")
    if jwt is not None and not isinstance(jwt, dict):
        raise ValueError("jwt must be an object of claims")
    metadata = desc.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError("metadata must be an object keyed by filter name")
    return Attributes(
        source_ip=source_ip,
        remote_ip=remote_ip_from_xff(headers.get("x-forwarded-for"), source_ip, xff_num_trusted_hops)
        if http
        else source_ip,
        destination_ip=destination_ip,
        destination_port=int(desc.get("destination_port") or 0),
        source_principals=tuple(str(p) for p in principals),
        sni=str(desc.get("sni") or ""),
        http=http,
        jwt_payload=jwt,
        filter_metadata=metadata,
    )

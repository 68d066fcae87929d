"""CheckRequest -> Attributes, with inputs shaped like what Envoy 1.40 sends."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from urllib.parse import quote

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2

from extproc.services.check_adapter import CheckAdapter, MalformedRequest
from tests.fixtures.pki import TestCA


def base_request() -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    a.source.address.socket_address.address = "10.0.0.7"
    a.source.address.socket_address.port_value = 51000
    a.destination.address.socket_address.address = "10.0.0.9"
    a.destination.address.socket_address.port_value = 8080
    return req


def http_request(**headers: str) -> external_auth_pb2.CheckRequest:
    req = base_request()
    h = req.attributes.request.http
    h.method, h.path, h.host, h.scheme, h.protocol = "GET", "/p?q=1", "svc:8080", "http", "HTTP/1.1"
    for k, v in {":authority": "svc:8080", ":method": "GET", ":path": "/p?q=1", **headers}.items():
        h.headers[k] = v
    return req


def test_tcp_connection_attributes() -> None:
    req = base_request()
    req.attributes.source.principal = "spiffe://cluster.local/ns/foo/sa/sleep"
    req.attributes.tls_session.sni = "api.example.com"
    a = CheckAdapter().attributes(req)
    assert not a.is_http
    assert a.source_ip == ipaddress.ip_address("10.0.0.7") == a.remote_ip
    assert (a.destination_ip, a.destination_port) == (ipaddress.ip_address("10.0.0.9"), 8080)
    assert a.source_principals == ("spiffe://cluster.local/ns/foo/sa/sleep",)
    assert a.sni == "api.example.com"


def test_http_attributes_and_remote_ip() -> None:
    a = CheckAdapter().attributes(http_request(**{"x-forwarded-for": "1.1.1.1, 2.2.2.2", "X-Custom": "v"}))
    assert a.http is not None
    assert (a.http.method, a.http.path, a.http.url_path, a.http.host) == ("GET", "/p?q=1", "/p", "svc:8080")
    assert a.http.headers["x-custom"] == "v"
    assert a.remote_ip == ipaddress.ip_address("2.2.2.2")
    assert CheckAdapter(xff_num_trusted_hops=1).attributes(
        http_request(**{"x-forwarded-for": "1.1.1.1, 2.2.2.2"})
    ).remote_ip == (ipaddress.ip_address("1.1.1.1"))


def test_raw_header_map_is_joined_like_envoy_joins_headers() -> None:
    req = http_request()
    hm = req.attributes.request.http.header_map
    for k, v in ((":method", b"GET"), (":path", b"/x"), ("x-multi", b"a"), ("x-multi", b"b")):
        hm.headers.append(base_pb2.HeaderValue(key=k, raw_value=v))
    a = CheckAdapter().attributes(req)
    assert a.http is not None and a.http.headers["x-multi"] == "a,b"


def test_jwt_payload_and_filter_metadata() -> None:
    req = http_request()
    md = req.attributes.metadata_context.filter_metadata
    md["envoy.filters.http.jwt_authn"].update({"payload": {"iss": "i", "sub": "s", "aud": ["a", "b"], "n": 3}})
    md["envoy.filters.http.other"].update({"k": "v"})
    a = CheckAdapter().attributes(req)
    assert a.jwt_payload == {"iss": "i", "sub": "s", "aud": ["a", "b"], "n": 3.0}
    assert a.filter_metadata["envoy.filters.http.other"] == {"k": "v"}
    assert CheckAdapter(jwt_payload_key="verified").attributes(req).jwt_payload is None


def test_every_san_of_the_peer_certificate(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    cert = ca.issue(
        "multi", uri_sans=("spiffe://td/ns/a/sa/x", "spiffe://td/ns/b/sa/y"), dns_sans=("m.example",), common_name="m"
    )
    req = http_request()
    req.attributes.source.principal = "spiffe://td/ns/a/sa/x"
    req.attributes.source.certificate = quote(cert.cert_path.read_text())  # Envoy URL-encodes the PEM
    adapter = CheckAdapter()
    a = adapter.attributes(req)
    assert a.source_principals == ("spiffe://td/ns/a/sa/x", "spiffe://td/ns/b/sa/y", "m.example", "CN=m")
    adapter.attributes(req)
    assert (adapter.cert_cache.counters.hits, adapter.cert_cache.counters.misses) == (1, 1)


@pytest.mark.parametrize(
    ("mutate", "kind"),
    [
        (lambda r: r.attributes.ClearField("source"), "missing-address"),
        (lambda r: setattr(r.attributes.destination.address.socket_address, "address", "x"), "bad-address"),
        (lambda r: setattr(r.attributes.request.http, "method", ""), "missing-method"),
        (lambda r: r.attributes.request.http.headers.__setitem__("x-big", "v" * 100_000), "headers-too-large"),
        (lambda r: setattr(r.attributes.source, "certificate", "garbage"), "bad-peer-certificate"),
    ],
)
def test_malformed_requests(mutate, kind: str) -> None:  # type: ignore[no-untyped-def]
    req = http_request()
    req.attributes.request.http.headers.pop(":method")
    mutate(req)
    with pytest.raises(MalformedRequest) as e:
        CheckAdapter().attributes(req)
    assert e.value.kind == kind

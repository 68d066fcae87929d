"""Fuzzing the edges that read what Envoy or a user sends: the CheckRequest, ext_proc and
access-log adapters and the config loader.

Two properties: nothing crashes (an adapter raises at most the documented
`MalformedRequest`, a service never counts an internal error, a loader raises at most
`ConfigError`), and no input, however odd, is allowed when a DENY covers it: a path under
/admin, an `x-block: yes` header, a source in 192.0.2.0/24.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from extproc.config.errors import ConfigError
from extproc.services import processing_adapter as pa
from extproc.services.accesslog import AccessLogService
from extproc.services.authz import AuthorizationService
from extproc.services.check_adapter import CheckAdapter, MalformedRequest
from extproc.services.enforcer import Enforcer
from extproc.services.processor import ExternalProcessorService
from extproc.snapshot import loader
from extproc.snapshot.compiled import Options, Snapshot, WorkloadIdentity, build_snapshot
from extproc.telemetry.peer import Workload
from extproc.telemetry.record import Direction
from extproc.telemetry.recorder import Telemetry
from tests.unit.helpers import allowed, http_request

DENIES = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: foo}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-header, namespace: foo}
spec:
  action: DENY
  rules: [{when: [{key: "request.headers[x-block]", values: ["yes"]}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-net, namespace: foo}
spec:
  action: DENY
  rules: [{from: [{source: {ipBlocks: ["192.0.2.0/24"]}}]}]
"""
BLOCKED_NET = ipaddress.ip_network("192.0.2.0/24")
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def snap(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    d = tmp_path_factory.mktemp("fuzz-cfg")
    (d / "deny.yaml").write_text(DENIES)
    return build_snapshot(loader.load([d]), WorkloadIdentity("foo", {"app": "web"}), Options(), 1)


# --- strategies ---------------------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
header_names = st.one_of(
    st.sampled_from(["x-block", "x-forwarded-for", "content-type", ":authority", "x-envoy-peer-metadata", "cookie"]),
    st.from_regex(r"[a-zA-Z0-9:_-]{1,16}", fullmatch=True),
    text,
)
paths = st.one_of(st.builds(lambda s: "/admin" + s, text), text, st.sampled_from(["/", "/public", "/Admin", "//admin"]))
addresses = st.one_of(
    st.builds(lambda n: f"192.0.2.{n}", st.integers(0, 255)),
    st.ip_addresses().map(str),
    st.sampled_from(["", "localhost", "::ffff:192.0.2.7", "999.1.1.1", "10.0.0.1%eth0"]),
    text,
)
ports = st.integers(0, 2**32 - 1)


def covered(path: str, headers: dict[str, str], source: str) -> bool:
    try:
        in_net = ipaddress.ip_address(source) in BLOCKED_NET
    except ValueError:
        in_net = False
    return path.startswith("/admin") or headers.get("x-block") == "yes" or in_net


@st.composite
def check_requests(draw: st.DrawFn) -> tuple[external_auth_pb2.CheckRequest, bool]:
    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    source = draw(addresses)
    a.source.address.socket_address.address = source
    a.source.address.socket_address.port_value = draw(ports)
    a.destination.address.socket_address.address = draw(addresses)
    a.destination.address.socket_address.port_value = draw(ports)
    a.source.principal = draw(st.one_of(st.just(""), st.just("spiffe://cluster.local/ns/foo/sa/a"), text))
    if draw(st.booleans()):
        a.source.certificate = draw(text)
    a.tls_session.sni = draw(text)
    a.context_extensions.update(draw(st.dictionaries(text, text, max_size=3)))
    if draw(st.integers(0, 9)) == 0:
        return req, covered("", {}, source)  # a network (TCP) check
    h = a.request.http
    path = draw(paths)
    h.path, h.method, h.host = path, draw(st.one_of(st.sampled_from(["GET", "POST", ""]), text)), draw(text)
    h.scheme, h.protocol, h.id = draw(text), draw(text), draw(text)
    headers = draw(st.dictionaries(header_names, text, max_size=8))
    headers.update({":path": path, ":method": h.method or "GET"})
    if draw(st.booleans()):
        headers["x-block"] = draw(st.sampled_from(["yes", "no", "YES", "yes,no"]))
    if draw(st.booleans()):  # as ext_authz sends it with encode_raw_headers
        for k, v in headers.items():
            h.header_map.headers.append(base_pb2.HeaderValue(key=k, raw_value=v.encode()))
        if draw(st.booleans()):
            h.header_map.headers.append(base_pb2.HeaderValue(key=draw(text), raw_value=draw(st.binary(max_size=20))))
    else:
        h.headers.update(headers)
    if draw(st.booleans()):
        md = struct_pb2.Struct()
        md.update({"payload": {"sub": draw(text), "n": draw(st.integers(-(2**31), 2**31))}})
        a.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].CopyFrom(md)
    return req, covered(path, {k.lower(): v for k, v in headers.items()}, source)


@st.composite
def processing_requests(draw: st.DrawFn) -> tuple[list[ep.ProcessingRequest], bool, bool]:
    first = ep.ProcessingRequest()
    entries: list[tuple[str, bytes]] = []
    path = draw(st.one_of(paths.map(lambda p: p.encode()), st.binary(max_size=20)))
    entries.append((":path", path))
    entries += draw(st.lists(st.tuples(header_names, st.binary(max_size=20)), max_size=6))
    if draw(st.booleans()):
        entries.append(("x-block", b"yes"))
    entries += [(":method", b"GET"), (":authority", b"svc")]
    for k, v in draw(st.permutations(entries)):
        first.request_headers.headers.headers.append(base_pb2.HeaderValue(key=k, raw_value=v))
    first.request_headers.end_of_stream = draw(st.booleans())
    source = draw(addresses)
    attrs = {
        "source.address": f"{source}:{draw(ports)}" if draw(st.booleans()) else source,
        "destination.address": f"{draw(addresses)}:{draw(ports)}",
        "connection.uri_san_peer_certificate": draw(text),
        "request.protocol": draw(text),
    }
    if draw(st.booleans()):
        attrs[pa.PEER_ADDRESS_ATTRIBUTE] = attrs["source.address"]
    s = struct_pb2.Struct()
    s.update(attrs)
    first.attributes[pa.EXT_PROC_ATTRIBUTES].CopyFrom(s)
    observe = draw(st.integers(0, 9)) == 0
    first.observability_mode = observe
    rest = []
    for kind in draw(st.lists(st.sampled_from(["response_headers", "request_body", "response_trailers"]), max_size=3)):
        m = ep.ProcessingRequest()
        if kind == "response_headers":
            m.response_headers.headers.headers.append(base_pb2.HeaderValue(key=":status", raw_value=draw(st.binary())))
        elif kind == "request_body":
            m.request_body.body = draw(st.binary(max_size=10))
        else:
            m.response_trailers.trailers.headers.append(base_pb2.HeaderValue(key="grpc-status", raw_value=b"0"))
        m.observability_mode = observe  # Envoy marks every message of an observability stream
        rest.append(m)
    single_path = sum(1 for k, _ in entries if k == ":path") == 1
    x_block = [v for k, v in entries if k == "x-block"]
    is_covered = path.startswith(b"/admin") or (x_block == [b"yes"]) or covered("", {}, source)
    return [first, *rest], is_covered and single_path, observe


# --- ext_authz ------------------------------------------------------------------------------


@FUZZ
@given(check_requests(), st.booleans())
def test_a_check_request_never_crashes_and_no_covered_request_is_allowed(
    snap: Snapshot, case: tuple[external_auth_pb2.CheckRequest, bool], sized: bool
) -> None:
    req, is_covered = case
    with contextlib.suppress(MalformedRequest):
        CheckAdapter().attributes(req)
    svc = AuthorizationService(lambda: snap, CheckAdapter(), Enforcer())
    size = req.ByteSize() if sized else None
    for _ in range(2):  # the second time from the decision cache
        out = asyncio.run(svc._rpc((req, size), None))  # type: ignore[arg-type]
        resp = external_auth_pb2.CheckResponse.FromString(out)
        assert not (is_covered and resp.status.code == 0), req
    assert svc.stats.internal_errors == 0


# --- ext_proc -------------------------------------------------------------------------------


def _process(svc: ExternalProcessorService, msgs: list[ep.ProcessingRequest]) -> list[ep.ProcessingResponse]:
    async def run() -> list[bytes]:
        async def stream():  # type: ignore[no-untyped-def]
            for m in msgs:
                yield m

        return [r async for r in svc.Process(stream(), None)]  # type: ignore[arg-type]

    return [ep.ProcessingResponse.FromString(b) for b in asyncio.run(run())]


@FUZZ
@given(processing_requests())
def test_an_ext_proc_stream_never_crashes_and_no_covered_request_is_allowed(
    snap: Snapshot, case: tuple[list[ep.ProcessingRequest], bool, bool]
) -> None:
    msgs, is_covered, observe = case
    t = Telemetry.create(Workload(workload_name="web", namespace="foo"))
    svc = ExternalProcessorService(t.recorder, t.peers, None, enforcer=Enforcer(), snapshot=lambda: snap)
    replies = _process(svc, msgs)
    assert svc.bad_streams == 0
    if observe:
        assert not replies  # nothing is applied in observability mode, nothing is sent
        return
    assert replies
    first = replies[0].WhichOneof("response")
    assert first in ("request_headers", "immediate_response")
    if is_covered:
        assert first == "immediate_response" and replies[0].immediate_response.status.code == 403


# --- access log -----------------------------------------------------------------------------


@st.composite
def http_entries(draw: st.DrawFn) -> accesslog_pb2.HTTPAccessLogEntry:
    if draw(st.integers(0, 3)) == 0:  # raw bytes that happen to parse
        raw = draw(st.binary(max_size=200))
        try:
            return accesslog_pb2.HTTPAccessLogEntry.FromString(raw)
        except DecodeError:
            assume(False)
    e = accesslog_pb2.HTTPAccessLogEntry()
    c = e.common_properties
    c.access_log_type = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]))
    c.downstream_remote_address.socket_address.address = draw(addresses)
    c.downstream_remote_address.socket_address.port_value = draw(ports)
    c.upstream_remote_address.socket_address.address = draw(addresses)
    c.downstream_local_address.pipe.path = draw(text)
    c.tls_properties.peer_certificate_properties.subject_alt_name.add(uri=draw(text))
    c.time_to_last_downstream_tx_byte.FromNanoseconds(draw(st.integers(0, 10**12)))
    c.response_flags.upstream_request_timeout = draw(st.booleans())
    md = struct_pb2.Struct()
    md.update({"x": draw(text), "n": draw(st.floats(allow_nan=True, allow_infinity=True))})
    c.metadata.filter_metadata[draw(st.sampled_from(["envoy.filters.http.ext_authz", "istio", "x"]))].CopyFrom(md)
    c.filter_state_objects[draw(text)].value = draw(st.binary(max_size=20))
    e.request.request_method = draw(st.integers(0, 10))
    e.request.path = draw(paths)
    e.request.authority = draw(text)
    e.request.request_headers.update(draw(st.dictionaries(header_names, text, max_size=4)))
    e.request.request_headers_bytes = draw(st.integers(0, 2**63))
    e.response.response_code.value = draw(st.integers(0, 2**32 - 1))
    e.response.response_headers.update(draw(st.dictionaries(header_names, text, max_size=3)))
    e.response.response_trailers.update(draw(st.dictionaries(st.just("grpc-status"), text, max_size=1)))
    e.response.response_body_bytes = draw(st.integers(0, 2**63))
    return e


@st.composite
def tcp_entries(draw: st.DrawFn) -> accesslog_pb2.TCPAccessLogEntry:
    e = accesslog_pb2.TCPAccessLogEntry()
    c = e.common_properties
    c.access_log_type = draw(st.integers(0, 10))
    c.intermediate_log_entry = draw(st.booleans())
    c.downstream_remote_address.socket_address.address = draw(addresses)
    c.upstream_cluster = draw(text)
    c.stream_id = draw(text)
    e.connection_properties.received_bytes = draw(st.integers(0, 2**64 - 1))
    e.connection_properties.sent_bytes = draw(st.integers(0, 2**64 - 1))
    return e


@FUZZ
@given(st.lists(st.one_of(http_entries(), tcp_entries()), min_size=1, max_size=6), st.sampled_from(list(Direction)))
def test_access_log_entries_never_raise(entries: list[Any], direction: Direction) -> None:
    t = Telemetry.create(Workload(workload_name="web", namespace="foo"))
    svc = AccessLogService(t.recorder, t.tcp, t.peers, direction)
    for e in entries:
        if isinstance(e, accesslog_pb2.HTTPAccessLogEntry):
            svc.http_entry(e, direction)
        else:
            svc.tcp_entry(e, direction)
    t.tick()
    assert svc.bad_entries == 0


# --- loader ---------------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), text)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)),
    max_leaves=12,
)
spec_keys = ["action", "rules", "selector", "targetRef", "targetRefs", "provider", "jwtRules", "metrics"]


@st.composite
def documents(draw: st.DrawFn) -> str:
    kind = draw(
        st.sampled_from(
            ["AuthorizationPolicy", "RequestAuthentication", "Telemetry", "MeshConfig", "ConfigMap", "List", "X"]
        )
    )
    api = draw(
        st.sampled_from(
            ["security.istio.io/v1", "security.istio.io/v1beta1", "telemetry.istio.io/v1", "extproc.io/v1alpha1", "v1"]
        )
    )
    doc: dict[str, Any] = {"apiVersion": api, "kind": kind}
    if draw(st.booleans()):
        doc["metadata"] = {"name": draw(st.sampled_from(["deny-admin", "p", "istio"])), "namespace": "foo"}
    doc["spec"] = draw(st.dictionaries(st.sampled_from(spec_keys), values, max_size=4))
    if kind == "ConfigMap":
        doc["data"] = {"mesh": draw(text)}
    if kind == "List":
        doc["items"] = draw(st.lists(values, max_size=2))
    return yaml.safe_dump(doc)


files = st.one_of(
    st.lists(documents(), max_size=3).map("---\n".join),
    text,
    st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files)
def test_the_loader_raises_only_config_errors_and_no_other_file_undoes_a_deny(tmp_path: Path, other: str) -> None:
    d = tmp_path / "cfg"
    d.mkdir(exist_ok=True)
    (d / "a-deny.yaml").write_text(textwrap.dedent(DENIES))
    (d / "b-other.yaml").write_text(other, encoding="utf-8", errors="surrogatepass")
    try:
        loaded = loader.load([d])
        snap = build_snapshot(loaded, WorkloadIdentity("foo", {"app": "web"}), Options(), 1)
    except ConfigError:
        return  # rejected as a whole: the last good snapshot keeps serving
    assert not allowed(snap, http_request("/admin/x"))
    assert not allowed(snap, http_request("/x", headers={"x-block": "yes"}))
    assert not allowed(snap, http_request("/x", source_ip="192.0.2.9"))

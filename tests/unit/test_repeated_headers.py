"""A header name sent on several lines, matched as Envoy's RBAC matches it.

Envoy 1.40's RBAC header matcher tests every entry of a name on its own: the condition holds
when any entry matches, and the entries joined with "," are never tested (so `notValues`
holds only when no entry matches). `ENVOY_OBSERVED` is what a real Envoy 1.40 answered, one
RBAC filter per condition as istiod generates it, for requests sent over HTTP/1.1 and HTTP/2
with the lines below; the same requests must get the same answers here, through every
transport that delivers the lines apart (ext_proc; ext_authz with `encode_raw_headers`).
ext_authz's string map has them joined by Envoy, so there a repeated name is one value.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from pathlib import Path

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2
from google.rpc import code_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.attributes import NO_LINES, Attributes
from extproc.decision.cache import key_plan
from extproc.services import processing_adapter as pa
from extproc.services.authz import AuthorizationService
from extproc.services.check_adapter import CheckAdapter, http_headers
from extproc.services.enforcer import Enforcer
from extproc.services.headers import decode_header_map
from extproc.services.processor import ExternalProcessorService
from extproc.telemetry.peer import Workload
from extproc.telemetry.recorder import Telemetry
from tests.unit.helpers import decide, snapshot_from_yaml

Lines = tuple[str, ...]

# The arrangements sent to Envoy, as the x-abc lines of one request.
ARRANGEMENTS: tuple[Lines, ...] = (
    ("abc1",),
    ("abc1", "other"),
    ("other", "abc1"),
    ("other",),
    ("abc1,other",),  # one line holding a comma
    ("abc1", "abc1"),
    ("other", "other"),
    ("",),
    ("", "abc1"),
)

# condition (values, notValues) -> Envoy's answer for each arrangement above (True = allowed).
ENVOY_OBSERVED: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[bool, ...]] = {
    (("abc1",), ()): (True, True, True, False, False, True, False, False, True),
    (("abc1,other",), ()): (False, False, False, False, True, False, False, False, False),
    (("abc*",), ()): (True, True, True, False, True, True, False, False, True),
    (("*bc1",), ()): (True, True, True, False, False, True, False, False, True),
    (("*her",), ()): (False, True, True, True, True, False, True, False, False),
    (("*",), ()): (True,) * 9,
    ((), ("abc1",)): (False, False, False, True, True, False, True, True, False),
    ((), ("*",)): (False,) * 9,
    (("abc1", "other"), ()): (True, True, True, True, False, True, True, False, True),
}


def policy(values: Sequence[str], not_values: Sequence[str], name: str = "X-Abc") -> str:
    cond = f'key: "request.headers[{name}]"'
    if values:
        cond += f", values: {list(values)!r}"
    if not_values:
        cond += f", notValues: {list(not_values)!r}"
    return f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: p, namespace: foo}}
spec:
  rules:
  - when: [{{{cond}}}]
"""


def header_map(lines: Sequence[tuple[str, str]]) -> base_pb2.HeaderMap:
    hm = base_pb2.HeaderMap()
    for k, v in ((":method", "GET"), (":path", "/"), (":authority", "httpbin.foo"), *lines):
        hm.headers.append(base_pb2.HeaderValue(key=k, raw_value=v.encode()))
    return hm


ADDRESSES = {"source.address": "10.0.0.1:40000", "destination.address": "10.0.0.2:8000"}


def via_ext_proc(lines: Sequence[tuple[str, str]]) -> Attributes:
    """What the ext_proc adapter builds from Envoy's entries (one per line, as Envoy sends them)."""
    headers, repeated = decode_header_map(header_map(lines))
    msg = ep.ProcessingRequest()
    return pa.attributes(CheckAdapter(), headers, ADDRESSES, msg, repeated)


def raw_check_request(lines: Sequence[tuple[str, str]]) -> external_auth_pb2.CheckRequest:
    """A CheckRequest from ext_authz with `encode_raw_headers`: every entry in `header_map`."""
    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    a.source.address.socket_address.address, a.source.address.socket_address.port_value = "10.0.0.1", 40000
    a.destination.address.socket_address.address, a.destination.address.socket_address.port_value = "10.0.0.2", 8000
    h = a.request.http
    h.method, h.path, h.host = "GET", "/", "httpbin.foo"
    h.header_map.CopyFrom(header_map(lines))
    return req


def map_check_request(lines: Sequence[tuple[str, str]]) -> external_auth_pb2.CheckRequest:
    """The same request from ext_authz without raw encoding: Envoy joins repeated names with ","."""
    req = raw_check_request(())
    h = req.attributes.request.http
    h.ClearField("header_map")
    h.headers.update({":method": "GET", ":path": "/", ":authority": "httpbin.foo"})
    for k, v in lines:
        h.headers[k] = f"{h.headers[k]},{v}" if k in h.headers else v
    return req


def x_abc(lines: Lines) -> list[tuple[str, str]]:
    return [("x-abc", v) for v in lines]


# --- decoding ----------------------------------------------------------------------------------


def test_entries_of_repeated_names_are_kept_apart_and_joined() -> None:
    headers, lines = decode_header_map(
        header_map([("X-Abc", "abc1"), ("cookie", "a=1"), ("x-abc", "other"), ("x-abc", ""), ("cookie", "b=2")])
    )
    assert headers["x-abc"] == "abc1,other," and headers["cookie"] == "a=1,b=2"
    assert lines == {"x-abc": ("abc1", "other", ""), "cookie": ("a=1", "b=2")}


def test_without_repeated_names_nothing_is_allocated_for_lines() -> None:
    headers, lines = decode_header_map(header_map([("x-abc", "abc1"), ("x-def", "abc1")]))
    assert lines is NO_LINES and headers["x-abc"] == "abc1"
    assert via_ext_proc([("x-abc", "abc1")]).http.lines is NO_LINES  # type: ignore[union-attr]


# --- matching: what Envoy answered ------------------------------------------------------------


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[tuple[str, ...], tuple[str, ...]], object]:
    out: dict[tuple[tuple[str, ...], tuple[str, ...]], object] = {}
    for i, cond in enumerate(ENVOY_OBSERVED):
        out[cond] = snapshot_from_yaml(tmp_path_factory.mktemp(f"c{i}"), policy(*cond))
    return out


@pytest.mark.parametrize("transport", ["ext_proc", "ext_authz raw"])
@pytest.mark.parametrize("cond", list(ENVOY_OBSERVED), ids=str)
def test_repeated_lines_are_decided_as_envoy_rbac_decided_them(snapshots, cond, transport: str) -> None:  # type: ignore[no-untyped-def]
    snap = snapshots[cond]
    got = []
    for arrangement in ARRANGEMENTS:
        lines = x_abc(arrangement)
        attrs = via_ext_proc(lines) if transport == "ext_proc" else CheckAdapter().attributes(raw_check_request(lines))
        got.append(decide(snap, attrs).allowed)
    assert tuple(got) == ENVOY_OBSERVED[cond]


def test_the_string_map_has_the_lines_joined_so_a_line_cannot_match_alone(tmp_path: Path) -> None:
    """ext_authz without encode_raw_headers: `abc1` + `other` arrive as "abc1,other", the same as
    one line holding a comma. Envoy's RBAC allows the first under `values: [abc1]`; extproc
    cannot, and decides it as the one line (the README says to turn raw encoding on)."""
    snap = snapshot_from_yaml(tmp_path, policy(["abc1"], []))
    two_lines = CheckAdapter().attributes(map_check_request(x_abc(("abc1", "other"))))
    assert two_lines.http is not None and two_lines.http.lines is NO_LINES
    assert two_lines.http.headers["x-abc"] == "abc1,other"
    assert not decide(snap, two_lines).allowed


# --- matching: generated over every condition kind and arrangement ------------------------------

VALUE_KINDS = ("abc1", "abc*", "*bc1", "*her", "*", "a", "", "abc1,other")
LINE_VALUES = ("abc1", "other", "abc", "", "abc1,other", "xabc1")


def single(snap: object, line: str | None) -> bool:
    lines = [] if line is None else [("x-abc", line)]
    return decide(snap, via_ext_proc(lines)).allowed  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def kind_snapshots(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], object]:
    out: dict[tuple[str, bool], object] = {}
    for i, (value, negated) in enumerate(itertools.product([v for v in VALUE_KINDS if v], [False, True])):
        cond = ((), (value,)) if negated else ((value,), ())
        out[(value, negated)] = snapshot_from_yaml(tmp_path_factory.mktemp(f"k{i}"), policy(*cond))
    return out


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from([v for v in VALUE_KINDS if v]),
    negated=st.booleans(),
    lines=st.lists(st.sampled_from(LINE_VALUES), min_size=2, max_size=4),
)
def test_a_repeated_name_matches_when_any_line_alone_would(
    kind_snapshots: dict[tuple[str, bool], object], kind: str, negated: bool, lines: list[str]
) -> None:
    """`values` on several lines = OR of each line alone; `notValues` = AND of each line alone
    (NOT of any line matching); in every transport that keeps the lines apart."""
    snap = kind_snapshots[(kind, negated)]
    alone = [single(snap, v) for v in lines]
    expected = all(alone) if negated else any(alone)
    entries = x_abc(tuple(lines))
    assert decide(snap, via_ext_proc(entries)).allowed == expected  # type: ignore[arg-type]
    assert decide(snap, CheckAdapter().attributes(raw_check_request(entries))).allowed == expected  # type: ignore[arg-type]


def test_hosts_and_other_header_conditions_use_the_same_matcher(tmp_path: Path) -> None:
    """`hosts` reads :authority with the same matcher; Envoy keeps it one entry (two Host lines
    become one joined value in its header map), and then one entry is matched."""
    text = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules:
  - to: [{operation: {hosts: ["httpbin.foo"]}}]
    when: [{key: "request.headers[x-tier]", values: ["gold"]}]
"""
    snap = snapshot_from_yaml(tmp_path, text)
    assert decide(snap, via_ext_proc([("x-tier", "silver"), ("x-tier", "gold")])).allowed
    assert not decide(snap, via_ext_proc([("x-tier", "silver,gold")])).allowed


# --- the decision cache -----------------------------------------------------------------------

DENY_EVIL = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: foo}
spec:
  action: DENY
  rules:
  - when: [{key: "request.headers[x-tenant]", values: ["evil"]}]
"""


def processing_message(lines: Sequence[tuple[str, str]]) -> ep.ProcessingRequest:
    msg = ep.ProcessingRequest()
    msg.request_headers.headers.CopyFrom(header_map(lines))
    s = struct_pb2.Struct()
    s.update(ADDRESSES)
    msg.attributes[pa.EXT_PROC_ATTRIBUTES].CopyFrom(s)
    return msg


def process(svc: ExternalProcessorService, msg: ep.ProcessingRequest) -> ep.ProcessingResponse:
    async def run() -> bytes:
        async def one():  # type: ignore[no-untyped-def]
            yield msg

        out = [r async for r in svc.Process(one(), None)]  # type: ignore[arg-type]
        return out[0]

    return ep.ProcessingResponse.FromString(asyncio.run(run()))


def test_the_cache_keeps_two_lines_apart_from_one_line_with_a_comma(tmp_path: Path) -> None:
    snap = snapshot_from_yaml(tmp_path, DENY_EVIL)
    assert "x-tenant" in key_plan(snap).headers
    one_line, two_lines = [("x-tenant", "good,evil")], [("x-tenant", "good"), ("x-tenant", "evil")]

    t = Telemetry.create(Workload(workload_name="httpbin", namespace="foo"))
    proc = ExternalProcessorService(t.recorder, t.peers, None, enforcer=Enforcer(cache_size=64), snapshot=lambda: snap)
    assert not process(proc, processing_message(one_line)).HasField("immediate_response")
    assert process(proc, processing_message(two_lines)).immediate_response.status.code == 403
    assert process(proc, processing_message(two_lines)).immediate_response.status.code == 403
    assert proc.enforcer is not None and proc.enforcer.stats.cache.hits == 1

    svc = AuthorizationService(lambda: snap, CheckAdapter(), Enforcer(cache_size=64))

    def check(req: external_auth_pb2.CheckRequest) -> int:
        return external_auth_pb2.CheckResponse.FromString(asyncio.run(svc.Check(req, None))).status.code  # type: ignore[arg-type]

    assert check(raw_check_request(one_line)) == code_pb2.OK
    assert check(raw_check_request(two_lines)) == code_pb2.PERMISSION_DENIED
    assert check(raw_check_request(two_lines)) == code_pb2.PERMISSION_DENIED
    assert svc.stats.cache.hits == 1


def test_http_headers_reports_lines_only_for_the_raw_shape() -> None:
    raw = raw_check_request([("x-a", "1"), ("x-a", "2")]).attributes.request.http
    assert http_headers(raw) == (
        {":method": "GET", ":path": "/", ":authority": "httpbin.foo", "x-a": "1,2"},
        {"x-a": ("1", "2")},
    )
    joined = map_check_request([("x-a", "1"), ("x-a", "2")]).attributes.request.http
    headers, lines = http_headers(joined)
    assert headers["x-a"] == "1,2" and lines is NO_LINES

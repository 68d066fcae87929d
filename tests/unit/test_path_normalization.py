"""Path normalization: the canonicalizer's rules on known cases (each checked against Envoy 1.40;
tests/e2e/test_path_normalization.py checks thousands more through a real Envoy), and the
services calling it: policies match the normalized path in ext_authz and ext_proc, whether
the decision comes from the engines or the cache, a path Envoy would reject is denied, and a
path Envoy should have normalized is counted and logged once."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from google.rpc import code_pb2

from extproc.path_normalization import Mode, normalize
from extproc.services.authz import AuthorizationService
from extproc.services.check_adapter import CheckAdapter
from extproc.services.enforcer import Enforcer
from extproc.snapshot.compiled import Snapshot
from tests.fixtures.path_spellings import ADMIN_SPELLINGS
from tests.unit.helpers import snapshot_from_yaml
from tests.unit.test_decision_cache import Clock, check, check_request, process, processing_request, processor

B, M, D = Mode.BASE, Mode.MERGE_SLASHES, Mode.DECODE_AND_MERGE_SLASHES

# (raw path, mode, what Envoy's filters see; None: Envoy answers 400)
CASES = [
    ("/ok/../admin", B, "/admin"),
    ("/a/b/c/..", B, "/a/b/"),
    ("/a/./b/../../../../c", B, "/c"),
    ("/ok/%2e%2E/admin", B, "/admin"),
    ("/ok/.%2e/admin", B, "/admin"),
    ("/a%2eb", B, "/a.b"),
    ("/ok\\..\\admin", B, "/admin"),
    ("/%61dmin", B, "/admin"),
    ("/%41dmin", B, "/Admin"),
    ("/a%7eb%2D", B, "/a~b-"),
    ("/a%2fb%3Cc", B, "/a%2fb%3Cc"),  # other escapes kept as written
    ('/a<b>{c}|^`"', B, "/a%3Cb%3E%7Bc%7D%7C%5E%60%22"),
    ("/%zz/%/%4", B, "/%zz/%/%4"),
    ("/%%30%30", B, "/%2500"),  # a nested escape cannot become %00
    ("/%2%35", B, "/%2525"),
    ("/admin%00", B, None),
    ("/ok/..;x=1/admin", B, "/admin"),
    ("/ok/.;/admin", B, "/ok/admin"),
    ("/x/%2e%2e;/admin", B, "/x/..;/admin"),  # the ";" rule wants literal dots
    ("/a\\..;x", B, "/a/..;x"),  # ...right after a literal "/"
    ("/ok/..?next=/../x", B, "/?next=/../x"),  # the query is never touched
    ("//admin", B, "//admin"),
    ("//admin", M, "/admin"),
    ("/a//..//b", M, "/a/b"),
    ("///", M, "//"),
    ("/ok/..%2fadmin", M, "/ok/..%2fadmin"),
    ("/ok/..%2fadmin", D, "/admin"),
    ("/ok%5c..%5Cadmin", D, "/admin"),
    ("/admin%2F", D, "/admin/"),
    ("/ñ", B, "/%C3%B1"),
    ("*", B, "*"),
]


@pytest.mark.parametrize(("path", "mode", "want"), CASES)
def test_normalize_does_what_envoy_does(path: str, mode: Mode, want: str | None) -> None:
    assert normalize(path, mode) == want


@pytest.mark.parametrize("path", ADMIN_SPELLINGS)
def test_mode_none_changes_nothing(path: str) -> None:
    assert normalize(path, Mode.NONE) == path


def test_a_path_without_special_characters_is_returned_as_it_is() -> None:
    path = "/api/v1/items/42?x=1"
    assert normalize(path, Mode.DECODE_AND_MERGE_SLASHES) is path


POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: foo}
spec:
  action: DENY
  rules:
  - to:
    - operation: {paths: ["/admin*"]}
"""


@pytest.fixture
def snap(tmp_path: Path) -> Snapshot:
    return snapshot_from_yaml(tmp_path, POLICY)


def service(snap: Snapshot, mode: Mode, cache_size: int = 4096) -> AuthorizationService:
    adapter = CheckAdapter(path_normalization=mode)
    return AuthorizationService(lambda: snap, adapter, Enforcer(cache_size=cache_size), clock=Clock())


def denied_by_policy(path: str, mode: Mode) -> bool:
    n = normalize(path, mode)
    return n is None or n.split("?")[0].startswith("/admin")


@pytest.mark.parametrize("mode", [Mode.BASE, Mode.MERGE_SLASHES, Mode.DECODE_AND_MERGE_SLASHES])
@pytest.mark.parametrize("cache_size", [0, 4096])
def test_ext_authz_matches_policies_on_the_normalized_path(snap: Snapshot, mode: Mode, cache_size: int) -> None:
    svc = service(snap, mode, cache_size)
    for _ in range(2):  # the second round comes from the cache when there is one
        for path in ADMIN_SPELLINGS:
            got = check(svc, check_request(path=path, token=None))
            assert (got.status.code != code_pb2.OK) == denied_by_policy(path, mode), path
    assert svc.stats.malformed == {"invalid-path": 4}  # the two NUL spellings, twice


def test_without_normalization_the_raw_path_is_matched(snap: Snapshot) -> None:
    svc = service(snap, Mode.NONE)
    assert check(svc, check_request(path="/ok/../admin", token=None)).status.code == code_pb2.OK
    assert svc.adapter.unnormalized_paths == 0


@pytest.mark.parametrize("mode", [Mode.BASE, Mode.DECODE_AND_MERGE_SLASHES])
def test_ext_proc_matches_policies_on_the_normalized_path(snap: Snapshot, mode: Mode) -> None:
    svc = processor(snap, Clock(), 4096)
    svc.adapter = CheckAdapter(path_normalization=mode)
    for path in ADMIN_SPELLINGS:
        reply = process(svc, processing_request(check_request(path=path, token=None)))
        assert reply.HasField("immediate_response") == denied_by_policy(path, mode), path


def test_a_path_envoy_should_have_normalized_is_counted_and_logged_once(
    snap: Snapshot, caplog: pytest.LogCaptureFixture
) -> None:
    svc = service(snap, Mode.BASE)
    with caplog.at_level(logging.WARNING, logger="extproc.services.check_adapter"):
        for path in ("/ok/../admin", "/public", "/%61dmin", "/ok/../admin", "/admin"):
            check(svc, check_request(path=path, token=None))
    assert svc.adapter.unnormalized_paths == 3  # cached or not, every such request counts
    warnings = [r for r in caplog.records if "--path-normalization" in r.getMessage()]
    assert len(warnings) == 1 and "'/ok/../admin'" in warnings[0].getMessage()

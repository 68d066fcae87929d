"""reference/ is the other side of the differential tests: it may read the input vocabulary
(extproc.config: the resource models), never the engines that it is compared with, and the
shipped package never imports it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ALLOWED = ("extproc.config.models",)


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [f"{node.module}.{a.name}" if node.module == "extproc" else node.module for a in node.names]
    return out


@pytest.mark.parametrize("path", sorted((REPO / "reference").glob("*.py")), ids=lambda p: p.name)
def test_the_reference_imports_no_engine(path: Path) -> None:
    ours = [m for m in _imports(path) if m == "extproc" or m.startswith("extproc.")]
    assert all(m in ALLOWED for m in ours), [m for m in ours if m not in ALLOWED]


def test_the_shipped_package_never_imports_the_reference() -> None:
    for path in (REPO / "extproc").rglob("*.py"):
        assert not any(m == "reference" or m.startswith("reference.") for m in _imports(path)), path


# (bundle, principals, expected): the situations of istio/istio's trustdomain bundle tests.
BUNDLE_CASES = [
    (("cluster.local",), ["cluster.local/ns/foo/sa/bar"], ["cluster.local/ns/foo/sa/bar"]),
    (("cluster.local",), ["*", "*/ns/foo/sa/bar"], ["*", "*/ns/foo/sa/bar"]),
    (("td2", "td1"), ["td1/ns/foo/sa/bar"], ["td2/ns/foo/sa/bar", "td1/ns/foo/sa/bar"]),
    (
        ("td1", "cluster.local"),
        ["cluster.local/ns/a/sa/b", "*sa/zzz"],
        ["td1/ns/a/sa/b", "cluster.local/ns/a/sa/b", "*sa/zzz"],
    ),
    (
        ("td2", "foo-td1", "cluster.local"),
        ["*-td1/ns/foo/sa/bar"],
        ["td2/ns/foo/sa/bar", "*-td1/ns/foo/sa/bar", "cluster.local/ns/foo/sa/bar"],
    ),
    (("td1", "td2"), ["some-td/ns/foo/sa/bar"], ["some-td/ns/foo/sa/bar"]),
    (
        ("td1", "td2", "some-td"),
        ["some-td/ns/foo/sa/bar"],
        ["td1/ns/foo/sa/bar", "td2/ns/foo/sa/bar", "some-td/ns/foo/sa/bar"],
    ),
    (("new-td", "td2", "td3"), ["/ns/some-ns/sa/some-sa"], ["/ns/some-ns/sa/some-sa"]),
    (("new-td", "old-td"), ["*-td/ns/some-ns/sa/some-sa"], ["*-td/ns/some-ns/sa/some-sa"]),
]


@pytest.mark.parametrize(("domains", "principals", "expected"), BUNDLE_CASES)
def test_the_two_trust_domain_bundles_agree_with_istio(
    domains: tuple[str, ...], principals: list[str], expected: list[str]
) -> None:
    """The reference bundle and the engine's are written apart; both give Istio's answers."""
    from extproc.authz.compiler import TrustDomainBundle
    from reference.envoy_rbac import _TrustDomainBundle

    assert _TrustDomainBundle(domains).replace_trust_domain_aliases(principals) == expected
    assert TrustDomainBundle(domains).replace_aliases(principals) == expected
    values = [*domains[-1:], "x", *domains[:1]]
    assert TrustDomainBundle(domains).expand_aliases(values) == _TrustDomainBundle(domains).expand_trust_domain_aliases(
        values
    )

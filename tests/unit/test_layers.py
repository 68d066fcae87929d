"""The layers of extproc, lowest first: a module imports only from its own layer or below,
function-level and TYPE_CHECKING imports included. A newcomer finds a change's place by its
layer, and an import that runs back up (an engine reaching into the assembly, a transport into
process wiring) fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "extproc"

# Each layer may use the ones before it. Within a layer, modules may use each other.
LAYERS: list[tuple[str, set[str]]] = [
    ("primitives", {"attributes", "verdict", "path_normalization", "workload", "lru"}),
    ("authn", {"authn"}),  # JWT primitives: the vocabulary validates inline JWKS with them
    ("vocabulary", {"config"}),
    ("engines", {"authz", "telemetry", "tracing"}),
    ("assembly", {"snapshot"}),
    ("decision", {"decision"}),
    ("transports", {"services", "debug"}),
    ("process", {"server"}),
    ("tools", {"analyze", "envoy_config", "demo", "sample_upstream", "cli", "__main__"}),
]
RANK = {part: i for i, (_, parts) in enumerate(LAYERS) for part in parts}


def _part(module: str) -> str | None:
    """The top-level part of extproc a dotted module name belongs to."""
    bits = module.split(".")
    if bits[0] != "extproc":
        return None
    return bits[1] if len(bits) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "extproc":  # from extproc import x: x is the part, or the root's own name
                found += [(node.lineno, f"extproc.{a.name}" if a.name in RANK else "extproc") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_part_of_the_package_has_a_layer() -> None:
    parts = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in MODULES}
    assert parts <= set(RANK), f"give these a layer in LAYERS: {sorted(parts - set(RANK))}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_runs_up_a_layer(path: Path) -> None:
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    upward = []
    for line, module in _imports(path):
        part = _part(module)
        if part is None or part == "__init__" or part == own:
            continue
        if RANK[part] > RANK[own]:
            upward.append(f"line {line}: {module} ({LAYERS[RANK[part]][0]} is above {LAYERS[RANK[own]][0]})")
    assert not upward, upward


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The walk finds imports inside functions and TYPE_CHECKING blocks."""
    f = tmp_path / "m.py"
    f.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from extproc.snapshot.compiled import Snapshot\n"
        "def f():\n    from extproc import server\n"
    )
    assert [m for _, m in _imports(f)] == ["typing", "extproc.snapshot.compiled", "extproc.server"]


PACKAGES = sorted(p.parent for p in PACKAGE.glob("*/__init__.py"))


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_each_package_shows_its_face(package: Path) -> None:
    """Each subpackage's docstring names its layer and every module in it, so its public
    surface reads in one place."""
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    assert "Layer: " in doc, package.name
    modules = sorted(p.name for p in package.glob("*.py") if p.name != "__init__.py")
    assert all(f"`{m}`" in doc for m in modules), [m for m in modules if f"`{m}`" not in doc]

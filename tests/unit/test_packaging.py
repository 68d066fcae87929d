"""pyproject.toml declares compatible ranges, so that `pip install extproc` fits next to other
software; constraints.txt pins the exact versions tested, which scripts/setup and the
Dockerfile install. The two must agree."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]


def _declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs.extend(Requirement(r) for r in extra)
    return reqs


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep, f"constraints.txt pins exact versions only: {line!r}"
        key = canonicalize_name(name)
        assert key not in pins, f"{name} pinned twice"
        pins[key] = Version(version)
    return pins


def test_the_package_declares_ranges_not_pins() -> None:
    for req in _declared():
        assert req.specifier, f"{req.name} needs a compatible range"
        assert not any(s.operator in ("==", "===") for s in req.specifier), (
            f"{req}: an exact pin belongs in constraints.txt"
        )
        assert any(s.operator == "<" for s in req.specifier) or req.name == "cryptography", (
            f"{req}: an upper bound keeps a breaking major release out"
        )


def test_every_declared_dependency_is_pinned_within_its_range() -> None:
    pins = _pins()
    for req in _declared():
        key = canonicalize_name(req.name)
        assert key in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[key], prereleases=True), (
            f"{req.name}=={pins[key]} is outside {req.specifier}"
        )


def test_setup_and_the_image_install_with_the_constraints() -> None:
    setup = (REPO / "scripts" / "setup").read_text()
    assert "-c constraints.txt -e '.[test,bench]'" in setup
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "constraints.txt" in dockerfile and "-c constraints.txt" in dockerfile

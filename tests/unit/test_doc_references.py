"""Comments, docstrings and docs cite only files that exist: a path into the repository
(`extproc/...`, `tests/...`, `envoy/...` and the other top-level folders) written in any
tracked source or document names a tracked file, so a move or a rename cannot leave a
pointer to nowhere."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("extproc", "tests", "bench", "scripts", "envoy", "deploy", "examples", "reference", ".ci")
PATH = re.compile(
    r"(?<![\w/.-])((?:" + "|".join(re.escape(f) for f in FOLDERS) + r")/[\w./-]*\w\.(?:py|yaml|yml|md|json|txt|toml))"
)


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def test_every_cited_repository_path_exists() -> None:
    tracked = _tracked()
    assert tracked, "run from a git checkout"
    present = set(tracked)
    missing: list[str] = []
    for name in tracked:
        if not name.endswith((".py", ".md", ".yaml", ".yml", ".toml")) or name.startswith("bench/runs/"):
            continue
        text = (REPO / name).read_text(errors="replace")
        for m in PATH.finditer(text):
            cited = m.group(1)
            relative = str((Path(name).parent / cited).as_posix())
            if cited not in present and relative not in present and not (REPO / cited).is_dir():
                missing.append(f"{name}: {cited}")
    assert not missing, missing


def test_the_check_sees_a_stale_path() -> None:
    stale = "extproc/config/" + "snapshot.py"  # split, so this file cites no stale path itself
    assert PATH.findall(f"see {stale} and `tests/unit/test_layers.py`.") == [
        stale,
        "tests/unit/test_layers.py",
    ]


def test_architecture_names_modules_that_exist() -> None:
    """ARCHITECTURE.md names modules relative to extproc/ (`services/enforcer.py`), or by file
    name inside the package just named (`loader.py` of `snapshot/`)."""
    text = (REPO / "ARCHITECTURE.md").read_text()
    names = set(re.findall(r"`([\w/]+(?:\.py|/))`", text))
    assert len(names) > 30
    missing = [
        n
        for n in names
        if not (REPO / "extproc" / n).exists()
        and not (REPO / n).exists()
        and not ("/" not in n and any((REPO / "extproc").rglob(n)))
    ]
    assert not missing, missing

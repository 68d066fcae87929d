"""Configuration errors that point at the exact place a user has to fix.

Every error carries the file, the document within the file (1-based, as `---`
separates them), the resource it belongs to when known, the dotted field path and
the line. Loading collects all errors of a change before rejecting it, so a user
fixes a broken directory in one pass rather than one error per restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError

    from extproc.config.yamlsource import Document


@dataclass(frozen=True, slots=True)
class Location:
    file: str
    document: int  # 1-based index of the YAML document in the file
    line: int | None = None  # 1-based
    resource: str | None = None  # e.g. "AuthorizationPolicy foo/deny-all"

    def render(self) -> str:
        where = f"{self.file}: document {self.document}"
        if self.resource:
            where += f" ({self.resource})"
        if self.line is not None:
            where += f", line {self.line}"
        return where


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    location: Location
    field: str  # dotted path such as "spec.rules[0].to[0].operation.ports[1]"; "" for the document
    message: str
    warning: bool = False

    def render(self) -> str:
        kind = "warning" if self.warning else "error"
        target = f"{self.field}: " if self.field else ""
        return f"{self.location.render()}: {kind}: {target}{self.message}"


@dataclass
class ConfigError(Exception):
    """A set of errors that made a configuration change be rejected as a whole."""

    issues: list[ConfigIssue] = field(default_factory=list)

    def __str__(self) -> str:
        errors = [i for i in self.issues if not i.warning]
        head = f"configuration rejected: {len(errors)} error(s)"
        return "\n".join([head, *("  " + i.render() for i in errors)])


def format_path(parts: tuple[str | int, ...] | list[str | int]) -> str:
    """Render ("spec", "rules", 0, "from") as spec.rules[0].from."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + p
    return out


def pydantic_issues(
    err: ValidationError, doc: Document, file: str, resource: str | None, prefix: tuple[str | int, ...] = ()
) -> list[ConfigIssue]:
    """A model's validation errors as located issues, in the words a YAML author needs
    (`unknown field`, `must be a string ... (quote the value in YAML)`); `prefix` is where the
    validated object sits in the document."""
    issues = []
    for e in err.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if isinstance(p, int | str))
        msg = e["msg"]
        typ = e["type"]
        if typ == "extra_forbidden":
            msg = "unknown field"
        elif typ == "missing":
            msg = "required field is missing"
        elif typ == "string_type":
            got = type(e.get("input")).__name__
            msg = f"must be a string, got {got}"
            if got in ("int", "float", "bool"):
                msg += " (quote the value in YAML)"
        elif typ == "int_type":
            got = type(e.get("input")).__name__
            msg = f"must be an integer, got {got}"
            if got == "str":
                msg += f" {e.get('input')!r} (remove the quotes in YAML)"
        elif typ.startswith("value_error"):
            msg = msg.removeprefix("Value error, ")
        issues.append(
            ConfigIssue(Location(file, doc.index, doc.line_of(loc), resource), format_path((*prefix, *loc)), msg)
        )
    return issues

"""Configuration errors that point at the exact place a user has to fix.

Every error carries the file, the document within the file (1-based, as `---`
separates them), the resource it belongs to when known, the dotted field path and
the line. Loading collects all errors of a change before rejecting it, so a user
fixes a broken directory in one pass rather than one error per restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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

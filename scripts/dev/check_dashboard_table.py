#!/usr/bin/env python3
"""Check tests/fixtures/istio_dashboards.py against Istio's own dashboards (developer tool, not CI).

Reads the mesh, service and workload dashboards from an istio/istio checkout (a work tree, or a
bare git directory plus a revision), pulls every selector out of every panel target's `expr`,
and checks that the selectors over Istio's ten standard metrics match the table one to one:
metric, reporter, label matchers, group-by labels, rate, quantile, role in the target and
`or vector(c)` fallback. It also checks the template variables (which series and label fill
them) and the list of excluded panels. Prints every mismatch; exits 1 if there is any.

    .venv/bin/python scripts/dev/check_dashboard_table.py ~/src/istio
    .venv/bin/python scripts/dev/check_dashboard_table.py --git-dir /path/to/istio.git --rev HEAD
    .venv/bin/python scripts/dev/check_dashboard_table.py ~/src/istio --dump   # what was extracted

Jsonnet: at the table's commit the mesh dashboard is written in jsonnet (istio-mesh.libsonnet,
lib/queries.libsonnet) but its generated output, istio-mesh-dashboard.gen.json, is committed
next to it, so this script reads that JSON and needs no jsonnet tool. If a revision lacks the
generated file the script says so and cannot check that dashboard (rendering the libsonnet needs
`jsonnet` plus the vendored grafonnet library that `jb install` fetches).

The expression reader is deliberately small: it understands the shapes these dashboards use
(`sum [by (..)] (rate|irate(<selector>[..])) [by (..)]`, `histogram_quantile(q, ..)`, `a / b`,
`a + b`, `(a / 1000) or b`, `.. or [on ()] vector(c)`, `round(..)`, `label_join(..)`) and
reports anything it cannot place rather than guessing.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.fixtures.istio_dashboards import (  # noqa: E402
    DASHBOARD_FILES,
    EXCLUDED,
    LEGACY_METRICS,
    PANEL_QUERIES,
    STANDARD_SERIES,
    VARIABLES,
    Matcher,
    reporter_values,
)

SELECTOR = re.compile(r"\b(istio_[a-z_]+)\b\s*(\{[^}]*\})?")
MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
BY_AFTER = re.compile(r"\s*by\s*\(([^)]*)\)")
SUM_BY_BEFORE = re.compile(r"\bsum\s+by\s*\(([^)]*)\)\s*$")
SUM_BEFORE = re.compile(r"\bsum\s*$")
QUANTILE_BEFORE = re.compile(r"histogram_quantile\s*\(\s*([0-9.]+)\s*,\s*$")
VECTOR = re.compile(r"\bor\s+(?:on\s*\(\s*\)\s*)?vector\(\s*([0-9.]+)\s*\)")


@dataclass(frozen=True)
class Found:
    """One selector as read from a dashboard target."""

    dashboard: str
    row: str
    panel: str
    ref: str
    part: int
    metric: str
    matchers: tuple[Matcher, ...]
    by: tuple[str, ...]
    rate: bool
    quantile: float | None
    role: str
    fallback: float | None
    legacy: bool


class Unreadable(Exception):
    pass


def parse_matchers(body: str | None) -> tuple[Matcher, ...]:
    if not body:
        return ()
    inner = body.strip()[1:-1]
    out: list[Matcher] = []
    pos = 0
    while pos < len(inner):
        m = MATCHER.match(inner, pos)
        if m is None:
            if inner[pos:].strip(" ,"):
                raise Unreadable(f"cannot read matchers {body!r}")
            break
        out.append((m.group(1), m.group(2), m.group(3)))
        pos = m.end()
    return tuple(out)


def open_parens(expr: str, pos: int) -> list[int]:
    """Positions of the parentheses still open at `pos`, innermost first."""
    stack: list[int] = []
    in_str = False
    for i, ch in enumerate(expr[:pos]):
        if ch == '"':
            in_str = not in_str
        elif in_str:
            continue
        elif ch == "(":
            stack.append(i)
        elif ch == ")":
            stack.pop()
    return stack[::-1]


def close_of(expr: str, open_pos: int) -> int:
    depth = 0
    in_str = False
    for i in range(open_pos, len(expr)):
        ch = expr[i]
        if ch == '"':
            in_str = not in_str
        elif in_str:
            continue
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i
    raise Unreadable(f"unbalanced parentheses in {expr!r}")


@dataclass
class _Sel:
    metric: str
    matchers: tuple[Matcher, ...]
    by: tuple[str, ...]
    rate: bool
    quantile: float | None
    start: int  # start of the enclosing sum (or of the selector when not aggregated)
    end: int  # end of the enclosing sum, its `by (..)` included


def read_selectors(expr: str) -> list[_Sel]:
    """Every istio_* selector of `expr` with the `sum` that aggregates it; anything else is Unreadable."""
    sels: list[_Sel] = []
    for m in SELECTOR.finditer(expr):
        rate = bool(re.match(r"\s*\[", expr[m.end() :]))
        if rate and not re.search(r"\b(?:rate|irate|increase)\s*\(\s*$", expr[: m.start()]):
            raise Unreadable(f"range selector outside rate/irate/increase in {expr!r}")
        for op in open_parens(expr, m.start()):
            before = expr[:op]
            sb = SUM_BY_BEFORE.search(before) or SUM_BEFORE.search(before)
            if sb is None:
                continue
            start, end = sb.start(), close_of(expr, op) + 1
            by_text = sb.group(1) if sb.re is SUM_BY_BEFORE else None
            if by_text is None and (ba := BY_AFTER.match(expr, end)) is not None:
                by_text, end = ba.group(1), ba.end()
            by = tuple(x.strip() for x in (by_text or "").split(",") if x.strip())
            q = QUANTILE_BEFORE.search(expr[:start])
            quantile = float(q.group(1)) if q is not None else None
            sels.append(_Sel(m.group(1), parse_matchers(m.group(2)), by, rate, quantile, start, end))
            break
        else:
            raise Unreadable(f"{m.group(1)} is not under a sum in {expr!r}")
    return sels


def read_target(expr: str) -> list[tuple[_Sel, str, float | None, bool]]:
    """(selector, role, fallback, legacy) for every istio_* selector of one target."""
    sels = read_selectors(expr)
    out: list[tuple[_Sel, str, float | None, bool]] = []
    std = [s for s in sels if s.metric not in LEGACY_METRICS]
    for s in sels:
        if s.metric in LEGACY_METRICS:
            # Accepted only as the `or` alternative of a standard selector with the same shape.
            twins = [
                t
                for t in std
                if t.end <= s.start
                and " or " in expr[t.end : s.start]
                and t.matchers == s.matchers
                and t.by == s.by
                and t.quantile == s.quantile
                and LEGACY_METRICS[s.metric] == t.metric
            ]
            if not twins:
                raise Unreadable(f"{s.metric} is not the `or` alternative of a standard selector in {expr!r}")
            out.append((s, "legacy", None, True))
    for i, s in enumerate(std):
        nxt = std[i + 1].start if i + 1 < len(std) else len(expr)
        legacy_starts = [x.start for x in sels if x.metric in LEGACY_METRICS and x.start > s.end]
        gap_end = min([nxt, *legacy_starts])
        gap = expr[s.end : gap_end]
        fb = VECTOR.search(gap)
        fallback = float(fb.group(1)) if fb is not None else None
        if len(std) == 1:
            role = "value"
        elif len(std) == 2:
            between = expr[std[0].end : std[1].start]
            if "/" in between:
                role = "numerator" if i == 0 else "denominator"
            elif "+" in between:
                role = "term"
            else:
                raise Unreadable(f"cannot tell how the two selectors combine in {expr!r}")
        else:
            raise Unreadable(f"more than two standard selectors in {expr!r}")
        out.append((s, role, fallback, False))
    order = {id(s): n for n, s in enumerate(sels)}
    out.sort(key=lambda t: order[id(t[0])])
    return out


def load(args: argparse.Namespace, rel: str) -> dict[str, Any] | None:
    if args.git_dir:
        r = subprocess.run(
            ["git", "-C", args.git_dir, "show", f"{args.rev}:{rel}"], capture_output=True, text=True, check=False
        )
        if r.returncode != 0:
            return None
        return json.loads(r.stdout)
    path = Path(args.checkout) / rel
    if not path.exists():
        return None
    return json.loads(path.read_text())


def revision(args: argparse.Namespace) -> str:
    where = ["-C", args.git_dir] if args.git_dir else ["-C", args.checkout]
    r = subprocess.run(["git", *where, "rev-parse", args.rev], capture_output=True, text=True, check=False)
    return r.stdout.strip() if r.returncode == 0 else "?"


def walk(panels: list[dict[str, Any]], row: str = "") -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for p in panels:
        if p.get("type") == "row":
            row = p.get("title") or ""
            out.extend(walk(p.get("panels") or [], row))  # collapsed rows keep their panels inside
            continue
        out.append((row, p))
    return out


def extract(
    dashboard: str, data: dict[str, Any], problems: list[str]
) -> tuple[list[Found], dict[tuple[str, str], tuple[str, ...]]]:
    """Every istio_* selector of the dashboard, and the panels with none over the standard metrics."""
    found: list[Found] = []
    others: dict[tuple[str, str], tuple[str, ...]] = {}
    for row, p in walk(data.get("panels") or []):
        title = p.get("title") or ""
        exprs = [(t.get("refId") or str(i), t.get("expr")) for i, t in enumerate(p.get("targets") or [])]
        exprs = [(r, e) for r, e in exprs if e]
        if not exprs:
            continue
        std_here = False
        for ref, expr in exprs:
            try:
                parts = read_target(expr)
            except Unreadable as e:
                problems.append(f"{dashboard}/{row}/{title}/{ref}: {e}")
                continue
            stray = [n for n in series_names(expr) if n not in STANDARD_SERIES and n not in LEGACY_METRICS]
            if stray and any(s.metric in STANDARD_SERIES for s, *_ in parts):
                problems.append(f"{dashboard}/{row}/{title}/{ref}: reads {stray} beside standard metrics")
            part = 0
            for sel, role, fallback, legacy in parts:
                if sel.metric not in STANDARD_SERIES and not legacy:
                    continue
                std_here = True
                found.append(
                    Found(
                        dashboard,
                        row,
                        title,
                        ref,
                        -1 if legacy else part,
                        sel.metric,
                        sel.matchers,
                        sel.by,
                        sel.rate,
                        sel.quantile,
                        role,
                        fallback,
                        legacy,
                    )
                )
                if not legacy:
                    part += 1
        if not std_here:
            others[(row, title)] = series_names(" ".join(e for _, e in exprs))
    return found, others


KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "or", "and", "unless", "bool"})


def series_names(expr: str) -> tuple[str, ...]:
    """The metric names an expression reads (identifiers that are not functions or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    names = re.findall(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", text)
    return tuple(sorted({n for n in names if n not in KEYWORDS}))


def norm(matchers: tuple[Matcher, ...]) -> tuple[Matcher, ...]:
    return tuple(sorted(matchers))


def check_queries(found: list[Found], problems: list[str]) -> None:
    expected: Counter[tuple[Any, ...]] = Counter()
    for f in found:
        if f.legacy:
            continue
        for rep in reporter_values(f.matchers):
            expected[
                (
                    f.dashboard,
                    f.row,
                    f.panel,
                    f.ref,
                    f.part,
                    rep,
                    f.metric,
                    norm(f.matchers),
                    frozenset(f.by),
                    f.rate,
                    f.quantile,
                    f.role,
                    f.fallback,
                )
            ] += 1
    table: Counter[tuple[Any, ...]] = Counter()
    for q in PANEL_QUERIES:
        table[
            (
                q.dashboard,
                q.row,
                q.panel,
                q.ref,
                q.part,
                q.reporter,
                q.metric,
                norm(q.matchers),
                frozenset(q.by),
                q.rate,
                q.quantile,
                q.role,
                q.fallback,
            )
        ] += 1
    for key, n in sorted(table.items(), key=repr):
        if n > 1:
            problems.append(f"table entry listed {n} times: {key}")
    missing = expected - table
    extra = table - expected
    for key in sorted(missing, key=repr):
        problems.append(f"dashboard query with no table entry: {describe(key)}")
    for key in sorted(extra, key=repr):
        problems.append(f"table entry with no dashboard query: {describe(key)}")


def describe(key: tuple[Any, ...]) -> str:
    d, row, panel, ref, part, rep, metric, matchers, by, rate, quantile, role, fb = key
    ms = ", ".join(f"{a}{o}{v!r}" for a, o, v in matchers)
    return (
        f"{d} / {row} / {panel!r} ref={ref} part={part} reporter={rep} {metric}{{{ms}}} by={sorted(by)} "
        f"rate={rate} q={quantile} role={role} fallback={fb}"
    )


def check_variables(dashboard: str, data: dict[str, Any], problems: list[str]) -> None:
    table = {v.name: v for v in VARIABLES if v.dashboard == dashboard}
    seen: set[str] = set()
    for v in (data.get("templating") or {}).get("list") or []:
        name = v.get("name")
        seen.add(name)
        mine = table.get(name)
        if mine is None:
            problems.append(f"{dashboard}: variable ${name} is not in the table")
            continue
        if mine.kind != v.get("type"):
            problems.append(f"{dashboard}: ${name} kind {mine.kind} != {v.get('type')}")
        if v.get("type") == "custom":
            opts = tuple(x.strip() for x in str(v.get("query") or "").split(",") if x.strip())
            if opts != mine.options:
                problems.append(f"{dashboard}: ${name} options {mine.options} != {opts}")
        if v.get("type") == "query":
            q = v.get("query")
            text = q.get("query") if isinstance(q, dict) else str(q or "")
            got = set()
            try:
                for s in read_selectors(text):
                    if len(s.by) != 1:
                        raise Unreadable(f"variable query groups by {s.by}")
                    got.add((s.metric, s.by[0], norm(s.matchers)))
            except Unreadable as e:
                problems.append(f"{dashboard}: ${name}: {e}")
                continue
            want = {(s.metric, s.label, norm(s.filters)) for s in mine.sources}
            if got != want:
                problems.append(f"{dashboard}: ${name} sources differ: dashboard {sorted(got)} table {sorted(want)}")
        if bool(v.get("multi")) != mine.multi or bool(v.get("includeAll")) != mine.include_all:
            problems.append(f"{dashboard}: ${name} multi/includeAll differ")
    for name in sorted(set(table) - seen):
        problems.append(f"{dashboard}: table variable ${name} is not in the dashboard")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkout", nargs="?", help="an istio/istio work tree")
    ap.add_argument("--git-dir", help="a (bare) istio/istio git directory instead of a work tree")
    ap.add_argument("--rev", default="HEAD", help="revision to read with --git-dir (default HEAD)")
    ap.add_argument("--dump", action="store_true", help="print every selector extracted")
    args = ap.parse_args()
    if not args.checkout and not args.git_dir:
        ap.error("give an istio checkout or --git-dir")

    print(f"istio revision {revision(args)}")
    problems: list[str] = []
    found: list[Found] = []
    for dashboard, rel in DASHBOARD_FILES.items():
        data = load(args, rel)
        if data is None:
            problems.append(f"{dashboard}: {rel} not found at this revision (generated from jsonnet? see --help)")
            continue
        got, others = extract(dashboard, data, problems)
        found.extend(got)
        check_variables(dashboard, data, problems)
        excluded = {(e.row, e.panel): e.metrics for e in EXCLUDED if e.dashboard == dashboard}
        for key, metrics in sorted(others.items()):
            if key not in excluded:
                problems.append(f"{dashboard}: panel {key} queries no standard metric {metrics} and is not in EXCLUDED")
            elif excluded[key] != metrics:
                problems.append(
                    f"{dashboard}: EXCLUDED panel {key} lists {excluded[key]}, the dashboard reads {metrics}"
                )
        for key in sorted(set(excluded) - set(others)):
            problems.append(f"{dashboard}: EXCLUDED panel {key} is not a panel without standard-metric queries")
        std = [f for f in got if not f.legacy]
        panels = {(f.row, f.panel) for f in std}
        targets = {(f.row, f.panel, f.ref) for f in std}
        print(
            f"{dashboard:9} {rel}: {len(panels)} panels, {len(targets)} targets, {len(std)} standard selectors, "
            f"{len(got) - len(std)} legacy alternatives skipped, {len(others)} panels excluded"
        )
    if args.dump:
        for f in found:
            print(f)
    check_queries(found, problems)
    print(f"table: {len(PANEL_QUERIES)} entries")
    for p in problems:
        print("MISMATCH", p)
    if problems:
        print(f"{len(problems)} mismatches")
        return 1
    print("table agrees with the dashboards")
    return 0


if __name__ == "__main__":
    sys.exit(main())

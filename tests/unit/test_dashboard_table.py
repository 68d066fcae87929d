"""The table of what Istio's mesh, service and workload dashboards query (tests/fixtures/istio_dashboards.py)
and its PromQL renderer. The table's agreement with Istio's JSON is checked by scripts/dev/check_dashboard_table.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml

from extproc.telemetry.labels import LABELS, METRICS, Kind
from tests.fixtures import istio_dashboards as d
from tests.fixtures.istio_dashboards import ALL, PanelQuery, Variable

# (panels, targets, entries) per dashboard at the table's Istio commit; entries count each
# `reporter=~"$qrep"` selector twice.
EXPECTED_COUNTS = {"mesh": (6, 11, 13), "service": (22, 76, 124), "workload": (19, 71, 122)}

SAMPLE_LABELS = {
    m.name + ("_total" if m.kind is Kind.COUNTER else suffix): frozenset(LABELS[i] for i in m.labels)
    for m in METRICS
    for suffix in (("",) if m.kind is Kind.COUNTER else ("_bucket", "_sum", "_count"))
}


def test_the_standard_metrics_are_extprocs() -> None:
    assert set(d.STANDARD_SERIES) == set(SAMPLE_LABELS)
    assert len(d.STANDARD_METRICS) == 10


def test_source_is_pinned() -> None:
    assert re.fullmatch(r"[0-9a-f]{40}", d.ISTIO_COMMIT)
    assert d.ISTIO_COMMIT in (d.__doc__ or "")
    assert set(d.DASHBOARD_FILES) == set(d.DASHBOARDS) == {"mesh", "service", "workload"}
    for path in d.DASHBOARD_FILES.values():
        assert path.startswith(d.DASHBOARD_DIR + "/") and path.endswith(".json")
        assert path.rsplit("/", 1)[1] in (d.__doc__ or "")


@pytest.mark.parametrize("dashboard", d.DASHBOARDS)
def test_dashboards_are_all_there_with_their_counts(dashboard: str) -> None:
    counts = (len(d.panels(dashboard)), len(d.targets(dashboard)), len(d.queries(dashboard)))
    assert counts == EXPECTED_COUNTS[dashboard]


def test_entries_are_unique() -> None:
    keys = Counter((q.dashboard, q.row, q.panel, q.ref, q.part, q.reporter) for q in d.PANEL_QUERIES)
    assert [k for k, n in keys.items() if n > 1] == []
    assert len(set(d.PANEL_QUERIES)) == len(d.PANEL_QUERIES)


@pytest.mark.parametrize("q", d.PANEL_QUERIES, ids=lambda q: f"{q.dashboard}:{q.panel}:{q.ref}:{q.part}:{q.reporter}")
def test_entry_is_well_formed(q: PanelQuery) -> None:
    assert q.dashboard in d.DASHBOARDS and q.row and q.panel and q.ref
    assert q.metric in d.STANDARD_SERIES
    assert q.role in d.ROLES
    assert q.rate  # every panel query of these dashboards is a per-second rate
    for label, op, value in q.matchers:
        assert label in LABELS and op in d.OPS and value
        if op in ("=~", "!~") and not d.VAR_REF.search(value):
            re.compile(value)
    assert len({m[0] for m in q.matchers if m[1] in ("=", "=~")}) == len([m for m in q.matchers if m[1] in ("=", "=~")])
    # A histogram is read as buckets for a quantile, a counter as itself.
    if q.metric.endswith("_bucket"):
        assert q.quantile is not None and 0 < q.quantile < 1 and "le" in q.by
    else:
        assert q.quantile is None and "le" not in q.by
    assert len(set(q.by)) == len(q.by)
    # Every label it filters or groups on is one Istio (and extproc) puts on that metric.
    assert q.labels <= SAMPLE_LABELS[q.metric], q.labels - SAMPLE_LABELS[q.metric]


def test_reporter_agrees_with_the_matchers() -> None:
    for q in d.PANEL_QUERIES:
        assert q.reporter in d.reporter_values(q.matchers)
        assert q.reporter in d.SIDECAR_REPORTERS  # no panel query leaves the reporter open


def test_reporter_variable_is_expanded_into_both_values() -> None:
    groups: defaultdict[tuple[str, str, str, str, int], set[str | None]] = defaultdict(set)
    for q in d.PANEL_QUERIES:
        groups[(q.dashboard, q.row, q.panel, q.ref, q.part)].add(q.reporter)
        if q.reporter_var is not None:
            assert (("reporter", "=~", f"${q.reporter_var}")) in q.matchers
            assert q.reporter_var in d.variables(q.dashboard)
            assert d.variables(q.dashboard)[q.reporter_var].options == d.SIDECAR_REPORTERS
    for key, reporters in groups.items():
        entries = [q for q in d.PANEL_QUERIES if (q.dashboard, q.row, q.panel, q.ref, q.part) == key]
        if entries[0].reporter_var is not None:
            assert reporters == {"source", "destination"}, key
        else:
            assert len(reporters) == 1 == len(entries), key
    assert {q.dashboard for q in d.PANEL_QUERIES if q.reporter_var} == {"service", "workload"}


def test_mesh_reads_client_side_only() -> None:
    assert {q.reporter for q in d.queries("mesh")} == {"source"}


def test_reporter_values() -> None:
    assert d.reporter_values([]) == (None,)
    assert d.reporter_values([("reporter", "=~", "source|waypoint")]) == ("source",)
    assert d.reporter_values([("reporter", "=~", "$qrep")]) == ("source", "destination")
    assert d.reporter_values([("reporter", "=", "destination")]) == ("destination",)
    assert d.reporter_values([("reporter", "!=", "source")]) == ("destination",)
    with pytest.raises(ValueError):
        d.reporter_values([("reporter", "=", "waypoint")])


def test_targets_are_numbered_parts_that_combine() -> None:
    parts: defaultdict[tuple[str, str, str, str, str | None], list[PanelQuery]] = defaultdict(list)
    for q in d.PANEL_QUERIES:
        parts[(q.dashboard, q.row, q.panel, q.ref, q.reporter)].append(q)
    for key, qs in parts.items():
        assert [q.part for q in qs] == list(range(len(qs))), key
        roles = [q.role for q in qs]
        assert roles in (["value"], ["numerator", "denominator"], ["term", "term"]), key
        if roles[0] == "numerator":
            num, den = qs
            # The numerator narrows the denominator to non-5xx responses, on the same grouping.
            assert num.metric == den.metric == "istio_requests_total" and num.by == den.by
            extra = set(num.matchers) - set(den.matchers)
            assert set(den.matchers) < set(num.matchers) and {m[:2] for m in extra} == {("response_code", "!~")}
            assert num.fallback is None
        assert d.target_parts(*key) == tuple(qs)


def test_fallbacks() -> None:
    with_fallback = {(q.dashboard, q.panel, q.role, q.fallback) for q in d.PANEL_QUERIES if q.fallback is not None}
    assert with_fallback == {
        ("mesh", "4xxs", "value", 0.0),
        ("mesh", "5xxs", "value", 0.0),
        ("service", "Client Success Rate (non-5xx responses)", "denominator", 1.0),
        ("service", "Server Success Rate (non-5xx responses)", "denominator", 1.0),
    }


def test_target_has_data() -> None:
    volume = d.target_parts("service", "General", "Client Request Volume", "A", "destination")
    assert d.target_has_data(volume, lambda q: True) and not d.target_has_data(volume, lambda q: False)
    rate = d.target_parts("service", "General", "Server Success Rate (non-5xx responses)", "A", "destination")
    assert d.target_has_data(rate, lambda q: q.role == "numerator")  # the denominator falls back to 1
    assert not d.target_has_data(rate, lambda q: q.role == "denominator")
    tcp = d.target_parts("workload", "General", "TCP Server Traffic", "A", "source")
    assert not d.target_has_data(tcp, lambda q: q.metric == "istio_tcp_sent_bytes_total")  # `a + b` needs both
    assert d.target_has_data(d.target_parts("mesh", "Global Traffic", "5xxs", "0", "source"), lambda q: False)
    with pytest.raises(ValueError):
        d.target_has_data((), lambda q: True)


def test_entries_no_sidecar_fills() -> None:
    never = [q for q in d.PANEL_QUERIES if d.never_filled_by_sidecars(q)]
    assert Counter(q.dashboard for q in never) == {"service": 17, "workload": 33}
    assert all(q.reporter == "source" for q in never)
    # Each is the mTLS half of a panel whose other half can have data.
    for q in never:
        others = [
            o for o in d.queries(q.dashboard) if (o.row, o.panel) == (q.row, q.panel) and o.reporter == q.reporter
        ]
        assert any(("connection_security_policy", "!=", "mutual_tls") in o.matchers for o in others)


# --- variables ------------------------------------------------------------------------------


def test_every_variable_a_query_uses_is_defined() -> None:
    for q in d.PANEL_QUERIES:
        defined = d.variables(q.dashboard)
        assert set(q.variables) <= set(defined), (q.dashboard, q.panel, set(q.variables) - set(defined))


@pytest.mark.parametrize("v", d.VARIABLES, ids=lambda v: f"{v.dashboard}:{v.name}")
def test_variable_is_well_formed(v: Variable) -> None:
    assert v.dashboard in d.DASHBOARDS and v.kind in ("query", "custom", "datasource") and v.expects
    names = list(d.variables(v.dashboard))
    if v.kind == "query":
        assert v.sources and not v.options and v.example is not None
        assert v.metric == v.sources[0].metric and v.label == v.sources[0].label and v.filters == v.sources[0].filters
        for s in v.sources:
            assert s.metric in d.STANDARD_SERIES and s.label in SAMPLE_LABELS[s.metric]
            for label, op, value in s.filters:
                assert label in SAMPLE_LABELS[s.metric] and op in d.OPS
                # Grafana resolves variables in order: a query only refers to earlier ones.
                for ref in d.VAR_REF.findall(value):
                    assert names.index(ref) < names.index(v.name), (v.name, ref)
    elif v.kind == "custom":
        assert v.options and not v.sources and v.default in v.options
    else:
        assert v.metric is None and v.label is None and v.filters == ()
    if v.include_all:
        assert v.multi and v.example == ALL


def test_variables_are_filled_from_the_expected_labels() -> None:
    def labels(dashboard: str, name: str) -> set[str]:
        return {s.label for s in d.variables(dashboard)[name].sources}

    assert labels("service", "service") == {"destination_service"}
    assert labels("service", "srcns") == {"source_workload_namespace"}
    assert labels("service", "srcwl") == {"source_workload"}
    assert labels("service", "dstns") == {"destination_workload_namespace"}
    assert labels("service", "dstwl") == {"destination_workload"}
    assert labels("workload", "namespace") == {"destination_workload_namespace"}
    assert labels("workload", "workload") == {"destination_workload", "source_workload"}
    assert labels("workload", "dstsvc") == {"destination_service"}
    assert d.variables("service")["service"].example == "httpbin.foo.svc.cluster.local"
    assert not d.variables("service")["service"].multi  # matched with `=`, one FQDN
    assert set(d.variables("mesh")) == {"datasource"}


def test_example_values_cover_every_query() -> None:
    for dashboard in d.DASHBOARDS:
        values = d.example_values(dashboard)
        for q in d.queries(dashboard):
            assert set(q.variables) <= set(values)


# --- rendering ------------------------------------------------------------------------------

RENDERED = re.compile(
    r"sum(?: by \((?P<by>[a-z_]+(?:, [a-z_]+)*)\) )?\(increase\((?P<metric>[a-z_]+)\{(?P<body>.*)\}\[(?P<window>\w+)\]\)\)"
)


def balanced(text: str) -> bool:
    depth = {"(": 0, "{": 0, "[": 0}
    close = {")": "(", "}": "{", "]": "["}
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in depth:
            depth[ch] += 1
        elif ch in close:
            depth[close[ch]] -= 1
            if depth[close[ch]] < 0:
                return False
    return not in_str and all(n == 0 for n in depth.values())


@pytest.mark.parametrize("dashboard", d.DASHBOARDS)
def test_render_substitutes_every_variable(dashboard: str) -> None:
    for q, text in d.iter_rendered(dashboard, window="2m"):
        assert "$" not in text and balanced(text), text
        m = RENDERED.fullmatch(text)
        assert m is not None, text
        assert m.group("metric") == q.metric and m.group("window") == "2m"
        assert tuple((m.group("by") or "").split(", ")) == (q.by or ("",))
        pairs = re.findall(r'([a-z_]+)(=~|!~|!=|=)"((?:[^"\\]|\\.)*)"(?:,|$)', m.group("body"))
        assert [(label, op) for label, op, _ in pairs] == [(label, op) for label, op, _ in q.matchers]
        reporter = "source|waypoint" if q.dashboard == "mesh" else q.reporter
        assert ("reporter", "=~" if q.reporter_var or q.dashboard == "mesh" else "=", reporter) in pairs


def test_render_shapes() -> None:
    vals = {"service": "httpbin.foo.svc.cluster.local", "qrep": "destination", "srcwl": ALL, "srcns": "(foo|bar)"}
    client_rate = d.target_parts(
        "service", "Client Workloads", "Incoming Success Rate (non-5xx responses) By Source", "A", "source"
    )
    assert d.render(client_rate[0], vals, window="1m") == (
        "sum by (source_workload, source_workload_namespace) (increase(istio_requests_total{"
        'reporter=~"source",destination_service="httpbin.foo.svc.cluster.local",source_workload=~".*",'
        'source_workload_namespace=~"(foo|bar)",connection_security_policy="mutual_tls",response_code!~"5.*"}[1m]))'
    )
    (volume,) = d.target_parts("mesh", "Global Traffic", "Traffic Volume", "0", "source")
    assert d.render(volume, {}) == 'sum(increase(istio_requests_total{reporter=~"source|waypoint"}[5m]))'


def test_render_uses_the_entrys_reporter_and_needs_every_variable() -> None:
    q = next(q for q in d.queries("workload") if q.reporter_var == "qrep" and q.reporter == "source")
    text = d.render(q, {**d.example_values("workload"), "qrep": "destination"})
    assert 'reporter=~"source"' in text and "destination" not in text.split("{")[1].split(",")[0]
    values = d.example_values("workload")
    del values["workload"]
    with pytest.raises(KeyError, match=r"\$workload"):
        d.render(q, values)


def test_render_escapes_values() -> None:
    q = next(q for q in d.queries("service") if "service" in q.variables)
    text = d.render(q, {**d.example_values("service"), "service": 'a"b\\c'})
    assert 'destination_service="a\\"b\\\\c"' in text and balanced(text)


def test_render_variable() -> None:
    v = d.variables("workload")["workload"]
    assert d.render_variable(v, {"namespace": "foo"}) == (
        'group by (destination_workload) (istio_requests_total{destination_workload_namespace=~"foo"})',
        'group by (source_workload) (istio_requests_total{source_workload_namespace=~"foo"})',
        'group by (destination_workload) (istio_tcp_sent_bytes_total{destination_workload_namespace=~"foo"})',
        'group by (source_workload) (istio_tcp_sent_bytes_total{source_workload_namespace=~"foo"})',
    )
    assert d.render_variable(d.variables("service")["service"], {}) == (
        "group by (destination_service) (istio_requests_total)",
        "group by (destination_service) (istio_tcp_sent_bytes_total)",
    )
    for dashboard in d.DASHBOARDS:
        for var in d.variables(dashboard).values():
            for text in d.render_variable(var, d.example_values(dashboard)):
                assert "$" not in text and balanced(text)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is not installed")
def test_promtool_parses_every_rendering(tmp_path: Path) -> None:
    """promtool has no offline `promql parse` in Debian's 2.42, but `check rules` parses each expr."""
    exprs = [text for dashboard in d.DASHBOARDS for _, text in d.iter_rendered(dashboard)]
    exprs += [
        text
        for dashboard in d.DASHBOARDS
        for v in d.variables(dashboard).values()
        for text in d.render_variable(v, d.example_values(dashboard))
    ]
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    r = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(rules)} rules found" in r.stdout + r.stderr


# --- what the dashboards leave out ----------------------------------------------------------


def test_excluded_panels() -> None:
    assert [(e.dashboard, e.panel, e.metrics) for e in d.EXCLUDED] == [
        ("mesh", "Istio Component Versions", ("istio_build",))
    ]
    for e in d.EXCLUDED:
        assert e.reason and (e.row, e.panel) not in d.panels(e.dashboard)
        assert not set(e.metrics) & d.STANDARD_SERIES


def test_metrics_the_dashboards_never_read() -> None:
    read = {q.metric for q in d.PANEL_QUERIES} | {s.metric for v in d.VARIABLES for s in v.sources}
    assert read == {
        "istio_requests_total",
        "istio_request_duration_milliseconds_bucket",
        "istio_request_bytes_bucket",
        "istio_response_bytes_bucket",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
    }
    assert set(d.LEGACY_METRICS.values()) <= read

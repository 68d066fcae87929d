# ruff: noqa: RUF001
# The report under test is typeset: multiplication signs for ratios.
"""bench/report.py: ratios, mesh CPU, summary, warnings and the files it writes, from synthetic results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[2]


def run(
    kind: str,
    achieved: float,
    p90: float | None,
    *,
    offered: float | None = None,
    p50: float | None = None,
    cpu: dict[str, float | list[float]] | None = None,
    rss: dict[str, float] | None = None,
    errors: int = 0,
    non_2xx: int = 0,
    denied: int = 0,
) -> dict[str, Any]:
    """One run; cpu maps role → CPU-s per 1000 requests, a list meaning several processes of that role."""
    requests = int(achieved * 10)
    processes = []
    for role, values in (cpu or {"envoy": 0.1, "upstream": 0.05, "loadgen": 0.07}).items():
        for i, value in enumerate(values if isinstance(values, list) else [values]):
            processes.append(
                {
                    "name": f"{role}-{i}",
                    "role": role,
                    "cpu_s": value * requests / 1000,
                    "cpu_s_per_1000": value,
                    "peak_rss_mib": (rss or {}).get(role, 30.0),
                }
            )
    status = {"200": requests - non_2xx - denied}
    if non_2xx:
        status["503"] = non_2xx
    if denied:
        status["403"] = denied
    return {
        "kind": kind,
        "offered_rps": offered,
        "duration_s": 10.0,
        "requests": requests,
        "achieved_rps": achieved,
        "status": status,
        "errors": errors,
        "latency_ms": {
            "mean": p90 and p90 * 0.6,
            "p50": p50 if p50 is not None else (p90 and p90 * 0.5),
            "p90": p90,
            "p99": p90 and p90 * 2,
            "p99.9": p90 and p90 * 4,
            "max": p90 and p90 * 8,
        },
        "processes": processes,
    }


def mode(
    name: str,
    saturation: float | None,
    fixed: dict[float, tuple[float, float | None]] | None = None,
    *,
    cpu: dict[str, float | list[float]] | None = None,
    probes: list[tuple[str, int, int | None]] = (),
    error: str | None = None,
    share: float | None = None,
    idle: dict[str, float] | None = None,
) -> dict[str, Any]:
    """A mode with a saturation run and fixed runs {offered: (achieved, p90)}."""
    runs = []
    if saturation is not None:
        runs.append(run("saturation", saturation, None, cpu=cpu))
    for offered, (achieved, p90) in (fixed or {}).items():
        runs.append(run("fixed", achieved, p90, offered=offered, cpu=cpu))
    out: dict[str, Any] = {
        "mode": name,
        "title": f"{name} title",
        "description": f"What {name} is.",
        "probes": [{"name": n, "path": f"/{n}", "expect": e, "got": g} for n, e, g in probes],
        "runs": [] if error else runs,
    }
    if error:
        out["error"] = error
    if share is not None:
        out["expected_denied_share"] = share
    if idle is not None:
        out["processes"] = [
            {"name": f"{role}-0", "role": role, "argv": role, "idle_rss_mib": mib} for role, mib in idle.items()
        ]
    return out


def results(*modes: dict[str, Any], rates: tuple[float, ...] = (500, 1000, 2000)) -> dict[str, Any]:
    return {
        "schema": "extproc-bench/1",
        "run": {
            "started": "2026-11-21T10:00:00+00:00",
            "finished": "2026-11-21T10:13:32+00:00",
            "duration_s": 812.4,
            "command": "python -m bench --rates 500,1000,2000",
            "quick": False,
        },
        "machine": {
            "cpus": 2,
            "cpu_model": "AMD EPYC 7B13",
            "mem_gib": 23.4,
            "kernel": "6.18.44",
            "python": "3.11.7",
            "envoy": "1.40.0",
            "load_generator": "wrk 4.1.0",
        },
        "scenario": {
            "protocol": "http1",
            "connections": 16,
            "payload_bytes": 1024,
            "policies": 20,
            "rates": list(rates),
            "duration_s": 20.0,
            "warmup_s": 3.0,
            "saturation_duration_s": 15.0,
            "envoy_workers": 2,
            "mixer": {"rtt_ms": 0.5, "sidecars": 2, "check_cache_hit_percent": 0.0, "report_batching": False},
            "denied_share": 0.1,
            "mix": {
                "tokens": 50,
                "requests_per_cycle": 100,
                "denied_share": 0.1,
                "kinds": {"allowed": 90, "blocked user": 5, "no ALLOW matches": 5},
                "http2": {"tokens": 1, "denied_share": 0.1, "kinds": {"allowed": 90, "no ALLOW matches": 10}},
            },
        },
        "modes": list(modes),
    }


MESH = {"envoy": 0.2, "extproc": 0.5, "upstream": 0.05, "loadgen": 0.07}
MIXER_CPU = {"envoy": [0.2, 0.25], "central": 0.6, "hop": 0.15, "upstream": 0.05, "loadgen": 0.07}


def full_results() -> dict[str, Any]:
    loads = (500, 1000, 2000)
    return results(
        mode(
            "none",
            6000,
            dict(zip(loads, [(500, 1.5), (1000, 2.0), (2000, 3.0)], strict=True)),
            cpu={"envoy": 0.1, "upstream": 0.05, "loadgen": 0.07},
            probes=[("valid token", 200, 200), ("no token", 401, 200)],
        ),
        mode(
            "noop",
            3000,
            dict(zip(loads, [(500, 2.5), (1000, 3.0), (1990, 5.0)], strict=True)),
            cpu={"envoy": 0.2, "extproc": 0.3, "upstream": 0.05, "loadgen": 0.07},
            probes=[("valid token", 200, 200)],
        ),
        mode(
            "authz+als",
            2000,
            dict(zip(loads, [(500, 3.0), (1000, 3.75), (1530, 12.0)], strict=True)),
            cpu=MESH,
            probes=[("valid token", 200, 200), ("no token", 401, 401)],
        ),
        mode("mixer", 0, error="central server did not become ready in 10 s", probes=[("valid token", 200, 503)]),
    )


def section(markdown: str, heading: str) -> str:
    """The text of one `## ` section (up to the next `## `)."""
    start = markdown.index(f"## {heading}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end != -1 else None]


def table_rows(text: str) -> dict[str, list[str]]:
    """Table rows of a chunk of Markdown, by their first cell."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| mode"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


# ----------------------------------------------------------------------------- ratios and formats


def test_ratio_is_none_for_missing_value_missing_baseline_or_zero_baseline() -> None:
    assert report.ratio(3.0, 2.0) == pytest.approx(1.5)
    assert report.ratio(None, 2.0) is None
    assert report.ratio(3.0, None) is None
    assert report.ratio(3.0, 0) is None
    assert report.fmt_ratio(report.ratio(3.0, 0)) == "—"
    assert report.fmt_ratio(1.3749) == "1.37×"
    assert report.fmt_ratio(12.34) == "12.3×"


def test_ratios_divide_by_the_baseline_run_of_the_same_kind_and_load() -> None:
    res = full_results()
    sat = report.ratios(res, "achieved_rps", kind="saturation")
    assert sat == {"none": pytest.approx(1.0), "noop": pytest.approx(0.5), "authz+als": pytest.approx(1 / 3)}
    p90 = report.ratios(res, "p90", kind="fixed", offered=1000, baseline="noop")
    assert p90["authz+als"] == pytest.approx(3.75 / 3.0)
    assert p90["none"] == pytest.approx(2.0 / 3.0)
    # No `native` mode in this run: every ratio against it is missing.
    assert set(report.ratios(res, "p90", kind="fixed", offered=1000, baseline="native").values()) == {None}


def test_ratio_against_a_zero_baseline_prints_a_dash() -> None:
    res = results(mode("none", 0), mode("noop", 3000))
    rows = table_rows(section(report.render_markdown(res), "Throughput at saturation"))
    assert rows["noop"][1] == "—"  # the "x none" column
    assert rows["noop"][2] == "1.00×"  # the "x noop" column


def test_number_formats() -> None:
    assert report.fmt_ms(1.234) == "1.23"
    assert report.fmt_ms(12.34) == "12.3"
    assert report.fmt_ms(1600.0) == "1\u202f600"
    assert report.fmt_ms(None) == "—"
    assert report.fmt_rate(6082.3) == "6\u202f082"
    assert report.fmt_duration(812.4) == "13 min 32 s"
    assert report.fmt_duration(3900) == "1 h 05 min"
    assert report.fmt_duration(45) == "45 s"
    assert report.fmt_duration(3.0) == "3 s"
    assert report.fmt_bytes(1024) == "1 KiB"


# ----------------------------------------------------------------------------- CPU


def test_mesh_cpu_sums_every_sidecar_and_leaves_out_upstream_and_loadgen() -> None:
    mixer = run("fixed", 1000, 4.0, offered=1000, cpu=MIXER_CPU)
    assert report.mesh_cpu(mixer) == pytest.approx(0.2 + 0.25 + 0.6 + 0.15)
    assert report.role_sums(mixer)["envoy"] == pytest.approx(0.45)
    assert report.mesh_cpu(run("fixed", 1000, 4.0, offered=1000, cpu={"upstream": 0.1, "loadgen": 0.2})) is None


def test_cpu_table_shows_mesh_total_ratio_and_info_columns() -> None:
    res = results(
        mode("none", 6000, {1000: (1000, 2.0)}, cpu={"envoy": 0.1, "upstream": 0.05, "loadgen": 0.07}),
        mode("mixer", 1000, {1000: (1000, 6.0)}, cpu=MIXER_CPU),
    )
    text = section(report.render_markdown(res), "CPU per 1000 requests")
    assert (
        "| mode | mesh CPU-s / 1000 req | × none | × noop | × floor | envoy | central | hop | upstream (info) | loadgen (info) |"
        in text
    )
    assert table_rows(text)["mixer"][:7] == ["1.20", "12.0×", "—", "—", "0.450", "0.600", "0.150"]


# ----------------------------------------------------------------------------- summary


def test_summary_states_the_p90_deltas_at_the_middle_load() -> None:
    text = report.summary(full_results())
    # Middle load 1000: none 2.0, noop 3.0, authz+als 3.75 ms at p90.
    assert "At 1\u202f000 req/s offered, Envoy alone (`none`) had a p90 latency of 2.00 ms." in text
    assert "`noop` added 1.00 ms (1.50×)" in text
    assert "`authz+als` added 1.75 ms (1.88×)" in text
    assert "An empty Python hop alone accounts for 1.00 ms with ext_authz over gRPC (`noop`) of that." in text
    assert "`authz+als` / `noop` is 1.25× at p90 (added 0.75 ms), 1.40× in mesh CPU" in text
    # Mesh CPU at 1000: none 0.1, authz+als 0.7.
    assert (
        "0.100 CPU-s per 1000 requests (= vCPU per 1000 req/s) with Envoy alone; `noop` 0.500 (5.00×) and `authz+als` 0.700 (7.00×)"
        in text
    )
    assert (
        "At saturation Envoy alone served 6\u202f000 req/s; relative to it, `noop` 0.50× and `authz+als` 0.33×" in text
    )
    assert "The `mixer` mode failed" in text


def floor_results() -> dict[str, Any]:
    """Every mode with a floor and both floors, at one load; extproc and authz+als deny 10 %."""
    return results(
        mode("none", 6000, {1000: (1000, 2.0)}, cpu={"envoy": 0.1}, share=0.0),
        mode("noop", 3000, {1000: (1000, 3.0)}, cpu={"envoy": 0.2, "extproc": 0.3}, share=0.0),
        mode("noop-extproc", 2500, {1000: (1000, 3.5)}, cpu={"envoy": 0.25, "extproc": 0.35}, share=0.0),
        mode("authz+als", 2000, {1000: (1000, 3.75)}, cpu=MESH, share=0.1),
        mode("extproc", 1500, {1000: (1000, 4.2)}, cpu={"envoy": 0.25, "extproc": 0.65}, share=0.1),
        mode("mixer", 1200, {1000: (1000, 6.0)}, cpu=MIXER_CPU, share=0.1),
        rates=(1000,),
    )


def test_floor_column_reads_each_mode_against_the_empty_server_of_its_transport() -> None:
    res = floor_results()
    markdown = report.render_markdown(res)
    sat = table_rows(section(markdown, "Throughput at saturation"))
    assert "| mode | req/s | × none | × noop | × floor | 403 | errors / unexpected |" in markdown
    assert sat["authz+als"][3] == "0.67× noop"
    assert sat["extproc"][3] == "0.60× noop-extproc"
    assert sat["mixer"][3] == "0.40× noop"
    for baseline in ("none", "noop", "noop-extproc"):
        assert sat[baseline][3] == "—"
    latency = table_rows(section(markdown, "Latency at fixed offered load"))
    assert latency["extproc"][-2] == "1.20× noop-extproc"  # p90 4.2 / 3.5
    assert latency["authz+als"][-2] == "1.25× noop"
    cpu = table_rows(section(markdown, "CPU per 1000 requests"))
    assert cpu["extproc"][:4] == ["0.900", "9.00×", "1.80×", "1.50× noop-extproc"]  # 0.9 / 0.6
    assert report.floor_ratio(res, "achieved_rps", "native") == (None, None)
    # Without its floor in the run, a mode's floor ratio is missing, not read against another floor.
    no_floor = results(mode("noop", 3000), mode("extproc", 1500))
    assert table_rows(section(report.render_markdown(no_floor), "Throughput at saturation"))["extproc"][3] == "—"


def test_summary_reads_each_mode_against_its_floor() -> None:
    text = report.summary(floor_results())
    assert (
        "An empty Python hop alone accounts for 1.00 ms with ext_authz over gRPC (`noop`) and 1.50 ms with "
        "ext_proc (`noop-extproc`) of that." in text
    )
    assert "Each mode against its floor, the empty server of its transport: `authz+als` / `noop` is " in text
    assert (
        "; `extproc` / `noop-extproc` is 1.20× at p90 (added 0.70 ms), 1.50× in mesh CPU and 0.60× in "
        "saturation throughput;" in text
    )
    assert "`mixer` / `noop` is 2.00× at p90 (added 3.00 ms)" in text


def test_expected_403s_are_shown_as_a_share_and_are_not_failures() -> None:
    res = floor_results()
    res["modes"][4]["runs"][0] = run("saturation", 1500, None, denied=1500, non_2xx=3)  # extproc: 10 % denied
    res["modes"][2]["runs"][0] = run("saturation", 2500, None, denied=25)  # noop-extproc must not deny
    markdown = report.render_markdown(res)
    sat = table_rows(section(markdown, "Throughput at saturation"))
    assert sat["extproc"][-2:] == ["10.0 %", "0 / 3 (0.0 %)"]
    assert sat["noop-extproc"][-2:] == ["0.1 %", "0 / 25 (0.1 %)"]
    assert sat["none"][-2:] == ["0.0 %", "0 / 0"]
    assert "`noop-extproc` (25)" in report.summary(res) and "`extproc` (3)" in report.summary(res)


def test_run_section_shows_the_request_mix_and_the_expected_share() -> None:
    run_section = section(report.render_markdown(full_results()), "Run")
    assert (
        "- **Load mix:** 50 RS256 tokens, a list of 100 requests each connection cycles through; expected 403 "
        "share 10.0 % in the modes that enforce the policies (5 × blocked user, 5 × no ALLOW matches per cycle), "
        "none elsewhere" in run_section
    )
    assert "`mixer`: " not in run_section
    cached = full_results()
    cached["scenario"]["mixer"]["check_cache_hit_percent"] = 50
    assert "(`mixer`: 5.0 %, as its check-cache model lets the 50 % of requests that skip the Check through)" in (
        section(report.render_markdown(cached), "Run")
    )
    h2 = full_results()
    h2["scenario"]["protocol"] = "http2"
    line = section(report.render_markdown(h2), "Run")
    assert "1 RS256 token, " in line and "(10 × no ALLOW matches per cycle)" in line
    assert "h2load sends one token with every request" in line


def test_memory_per_mode_shows_idle_and_peak_by_role() -> None:
    res = floor_results()
    res["modes"][5] = mode(
        "extproc",
        1500,
        {1000: (1000, 4.2)},
        cpu={"envoy": 0.25, "extproc": 0.65},
        idle={"envoy": 20.0, "extproc": 52.5},
    )
    rows = table_rows(section(report.render_markdown(res), "Memory per mode (RSS, MiB)"))
    # idle / peak; the helper's runs peak at 30 MiB per process.
    assert rows["extproc"][:3] == ["72.5 / 60.0", "20.0 / 30.0", "52.5 / 30.0"]
    assert rows["none"][0] == "— / 30.0"
    assert report.idle_rss(res["modes"][5]) == {"envoy": 20.0, "extproc": 52.5}


MEMORY = {
    "series_target": 10000,
    "argv": "python -m extproc serve ...",
    "idle_rss_mib": 55.0,
    "series": 10000,
    "series_gauge": 10000,
    "series_counted": 10000,
    "peers": 2500,
    "series_per_peer": 4.0,
    "series_rss_mib": 70.0,
    "scraped_rss_mib": 150.0,
    "scrape_bytes": 144_855_864,
    "peak_rss_mib": 400.0,
    "wall_s": 3.0,
}


def test_memory_step_has_its_own_section() -> None:
    res = full_results()
    res["memory"] = MEMORY
    text = section(report.render_markdown(res), "extproc memory: idle and with metric series")
    rows = table_rows(text)
    assert rows["idle, ready, before any request"] == ["55.0", "57.7"]  # MiB, and MB as the issue counts
    assert rows["holding 10 000 series, before a scrape"] == ["70.0", "73.4"]
    assert rows["after one /metrics scrape (138 MiB of text)"][0] == "150"
    assert "from 2 500 distinct client workloads (4.0 series each)" in text
    res["memory"] = {"series_target": 10000, "error": "ProcessFailed: extproc exited"}
    assert "**Failed:** ProcessFailed: extproc exited" in report.render_markdown(res)
    assert "## extproc memory" not in report.render_markdown(full_results())


def test_every_mode_has_its_own_colour() -> None:
    res = floor_results()
    colours = report.mode_colours(res)
    assert colours["noop-extproc"] == report.MODE_COLOURS["noop-extproc"]
    assert len(set(report.MODE_COLOURS.values())) == len(report.MODE_COLOURS)
    assert not set(report.SPARE_COLOURS) & set(report.MODE_COLOURS.values())


def test_summary_without_none_baseline_lists_absolute_p90() -> None:
    res = results(mode("noop", 3000, {500: (500, 2.5)}), mode("authz+als", 2000, {500: (500, 3.0)}))
    text = report.summary(res)
    assert "`noop` 2.50 ms and `authz+als` 3.00 ms (no `none` baseline" in text
    assert "Over that" not in text


def test_summary_says_when_a_mode_was_faster_than_envoy_alone() -> None:
    res = results(mode("none", 6000, {1000: (1000, 2.0)}), mode("native", 5900, {1000: (1000, 1.9)}))
    assert "`native` came in 0.10 ms under (0.95×)" in report.summary(res)


# ----------------------------------------------------------------------------- shortfall


def test_shortfall_warning_only_below_95_percent_of_offered() -> None:
    markdown = report.render_markdown(full_results())
    at_2000 = table_rows(markdown[markdown.index("### 2\u202f000 req/s offered — latency") :].split("\n\n")[1])
    assert at_2000["authz+als"][0] == "⚠ 1\u202f530/2\u202f000"
    assert at_2000["noop"][0] == "1\u202f990"  # 99.5 %: kept up
    assert "⚠ achieved/offered" in markdown
    assert "`authz+als` at 2\u202f000 req/s" in report.summary(full_results())
    assert report.shortfall(run("fixed", 1900, 1.0, offered=2000)) is False  # exactly 95 %
    assert report.shortfall(run("fixed", 1899, 1.0, offered=2000)) is True

    kept_up = results(mode("none", 6000, {2000: (1990, 3.0)}))
    assert "⚠" not in section(report.render_markdown(kept_up), "Latency at fixed offered load")


# ----------------------------------------------------------------------------- failed modes and probes


def test_failed_mode_is_listed_with_its_error_and_left_out_of_the_tables() -> None:
    markdown = report.render_markdown(full_results())
    assert "**Failed:** central server did not become ready in 10 s" in section(markdown, "Run")
    for heading in ("Throughput at saturation", "Latency at fixed offered load", "CPU per 1000 requests"):
        rows = table_rows(section(markdown, heading))
        assert "authz+als" in rows
        assert "mixer" not in rows
    assert "mixer" not in report.ratios(full_results(), "achieved_rps")


def test_probes_mark_expected_answers_and_wrong_ones() -> None:
    rows = table_rows(section(report.render_markdown(full_results()), "Probes"))
    assert rows["none"] == ["✓ 200", "✗ 200 (expected 401)"]
    assert rows["noop"] == ["✓ 200", "—"]
    assert rows["authz+als"] == ["✓ 200", "✓ 401"]
    assert rows["mixer (failed)"] == ["✗ 503 (expected 200)", "—"]


def test_errors_and_non_2xx_are_counted_in_the_throughput_table() -> None:
    none = mode("none", 6000)
    none["runs"][0] = run("saturation", 6000, None, errors=3, non_2xx=57)
    rows = table_rows(section(report.render_markdown(results(none)), "Throughput at saturation"))
    assert rows["none"][-1] == "3 / 57 (0.1 %)"


# ----------------------------------------------------------------------------- files


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 10_000, f"{path}: {len(data)} bytes"


def test_write_report_writes_markdown_and_three_charts(tmp_path: Path) -> None:
    written = report.write_report(full_results(), tmp_path)
    assert {p.name for p in written} == {"report.md", "throughput.png", "latency.png", "cpu.png"}
    for path in written:
        assert path.parent == tmp_path
        if path.suffix == ".png":
            assert_png(path)
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    for chart in ("throughput.png", "latency.png", "cpu.png"):
        assert f"]({chart})" in markdown


def test_without_fixed_runs_only_the_throughput_chart_is_written(tmp_path: Path) -> None:
    res = results(mode("none", 6000), mode("noop", 3000), rates=())
    written = report.write_report(res, tmp_path)
    assert sorted(p.name for p in written) == ["report.md", "throughput.png"]
    assert not (tmp_path / "latency.png").exists()
    assert not (tmp_path / "cpu.png").exists()
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "latency.png" not in markdown
    assert "No fixed-rate runs in this results file." in markdown


def test_main_rerenders_from_results_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "results.json").write_text(json.dumps(full_results()))
    assert report.main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert str(tmp_path / "report.md") in printed
    assert "`authz+als` added 1.75 ms" in (tmp_path / "report.md").read_text(encoding="utf-8")
    assert_png(tmp_path / "latency.png")


def test_main_refuses_a_missing_file_or_another_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main([str(tmp_path)]) == 2
    assert "results.json" in capsys.readouterr().err
    (tmp_path / "results.json").write_text(json.dumps({"schema": "other/9"}))
    assert report.main([str(tmp_path)]) == 2
    assert "schema is 'other/9'" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()


def test_importing_the_report_does_not_import_matplotlib() -> None:
    code = "import sys, bench.report; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

# ruff: noqa: RUF001
# The report is typeset: multiplication signs for ratios, en dashes for ranges, thin spaces in numbers.
"""Turn a benchmark results document (results.json, schema extproc-bench/1) into report.md and PNG charts.

The report is built for someone who knows Istio's performance pages: every number is put
next to the same number for the `none` baseline (Envoy alone: what the whole mesh layer
costs), for `noop` (Envoy's ext_authz calling an empty Python gRPC server), and for the
mode's own floor: the empty server of the same transport (`noop` for `authz+als` and
`mixer`, `noop-http` for `authz-http`, `noop-extproc` for `extproc`), so what a mode adds over
its floor is extproc's own work. All are taken from the same run, the same run kind and the same offered load. Absolute
numbers from a shared two-core machine move between runs; the ratios within one run hold.

Everything except the chart drawing is a pure function of the results dict, so the tests
need no matplotlib and importing this module stays cheap (matplotlib is imported inside the
chart functions, Agg backend only).

    .venv/bin/python -m bench.report bench/results/<dir>     # re-render report.md and charts
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SCHEMA = "extproc-bench/1"
REPORT_NAME = "report.md"
THROUGHPUT_CHART = "throughput.png"
LATENCY_CHART = "latency.png"
CPU_CHART = "cpu.png"

# Processes on the request path that the mesh adds or changes; their sum is the mesh cost.
MESH_ROLES = ("envoy", "extproc", "central", "hop")
# The same in every mode: listed for scale, never in the mesh total.
INFO_ROLES = ("upstream", "loadgen")
PERCENTILES = ("p50", "p90", "p99", "p99.9")
# Below this share of the offered rate a mode did not keep up and its latency is its own queue.
KEEP_UP_SHARE = 0.95
DASH = "—"
# Narrow no-break space: thin digit grouping that never wraps inside a number.
THIN = "\u202f"

# One colour per mode in every chart and every run (Okabe-Ito, readable by colour-blind readers).
MODE_COLOURS = {
    "none": "#7f7f7f",
    "native": "#009E73",
    "noop": "#56B4E9",
    "noop-http": "#999933",
    "noop-extproc": "#CC79A7",
    "authz+als": "#0072B2",
    "authz-http": "#117733",
    "extproc": "#E69F00",
    "mixer": "#D55E00",
}
SPARE_COLOURS = ("#F0E442", "#000000", "#8c564b", "#17becf", "#bcbd22")
# Each mode that calls Python, and the empty server of its transport: the floor it is read against.
FLOORS = {"authz+als": "noop", "mixer": "noop", "authz-http": "noop-http", "extproc": "noop-extproc"}
ROLE_COLOURS = {"envoy": "#8da0cb", "extproc": "#fc8d62", "central": "#e78ac3", "hop": "#a6d854"}

Results = Mapping[str, Any]
Mode = Mapping[str, Any]
Run = Mapping[str, Any]


# ---------------------------------------------------------------------------------------------
# Reading the document


def usable_modes(results: Results) -> list[Mode]:
    """Modes that ran, in run order. A mode with "error" is reported as failed and skipped."""
    return [m for m in results.get("modes") or () if not m.get("error")]


def failed_modes(results: Results) -> list[Mode]:
    return [m for m in results.get("modes") or () if m.get("error")]


def mode_by_name(results: Results, name: str) -> Mode | None:
    return next((m for m in usable_modes(results) if m.get("mode") == name), None)


def find_run(mode: Mode | None, kind: str, offered: float | None = None) -> Run | None:
    if mode is None:
        return None
    for run in mode.get("runs") or ():
        if run.get("kind") != kind:
            continue
        if kind == "saturation" or offered is None or _same_rate(run.get("offered_rps"), offered):
            return run
    return None


def _same_rate(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-9)


def fixed_loads(results: Results) -> list[float]:
    """The offered rates that at least one usable mode ran at, lowest first."""
    seen: set[float] = set()
    for mode in usable_modes(results):
        for run in mode.get("runs") or ():
            if run.get("kind") == "fixed" and run.get("offered_rps") is not None:
                seen.add(float(run["offered_rps"]))
    return sorted(seen)


def middle_load(loads: Sequence[float]) -> float | None:
    """The load the summary talks about: the middle one (the lower middle of an even count)."""
    return loads[(len(loads) - 1) // 2] if loads else None


def role_sums(run: Run | None, field: str = "cpu_s_per_1000") -> dict[str, float]:
    """Sum of `field` over the run's processes, per role (mixer's N sidecars add up under envoy)."""
    sums: dict[str, float] = {}
    if run is None:
        return sums
    for proc in run.get("processes") or ():
        value = proc.get(field)
        if value is None and field == "cpu_s_per_1000":
            value = _cpu_per_1000_from_total(proc, run)
        if value is None:
            continue
        role = proc.get("role") or "unknown"
        sums[role] = sums.get(role, 0.0) + float(value)
    return sums


def _cpu_per_1000_from_total(proc: Mapping[str, Any], run: Run) -> float | None:
    cpu_s, requests = proc.get("cpu_s"), run.get("requests")
    if cpu_s is None or not requests:
        return None
    return float(cpu_s) / float(requests) * 1000.0


def mesh_cpu(run: Run | None) -> float | None:
    """CPU seconds per 1000 requests spent by the mesh (envoy + extproc + central + hop).

    Upstream and load generator are the same in every mode and stay out of it."""
    sums = role_sums(run)
    parts = [sums[role] for role in MESH_ROLES if role in sums]
    return sum(parts) if parts else None


def peak_rss(mode: Mode) -> dict[str, float]:
    """Per role, the highest over the mode's runs of the summed peak RSS (MiB) of that role's processes."""
    peaks: dict[str, float] = {}
    for run in mode.get("runs") or ():
        for role, mib in role_sums(run, "peak_rss_mib").items():
            peaks[role] = max(peaks.get(role, 0.0), mib)
    return peaks


def metric(run: Run | None, name: str) -> float | None:
    """One number of a run: "achieved_rps", "mesh_cpu", or a latency key ("p50", "p90", "p99.9", "mean", "max")."""
    if run is None:
        return None
    if name == "mesh_cpu":
        return mesh_cpu(run)
    value = run.get(name) if name == "achieved_rps" else (run.get("latency_ms") or {}).get(name)
    return None if value is None else float(value)


def ratio(value: float | None, baseline: float | None) -> float | None:
    """value / baseline, or None when either is missing or the baseline is zero."""
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline


def ratios(
    results: Results,
    name: str,
    *,
    kind: str = "saturation",
    offered: float | None = None,
    baseline: str = "none",
) -> dict[str, float | None]:
    """For each usable mode, its `name` metric divided by the baseline mode's, same run kind and load."""
    base = metric(find_run(mode_by_name(results, baseline), kind, offered), name)
    return {m["mode"]: ratio(metric(find_run(m, kind, offered), name), base) for m in usable_modes(results)}


def floor_of(mode: str) -> str | None:
    """The baseline a mode's own cost is read against: the empty Python server of its transport."""
    return FLOORS.get(mode)


def floor_ratio(
    results: Results, name: str, mode: str, *, kind: str = "saturation", offered: float | None = None
) -> tuple[str | None, float | None]:
    """(the mode's floor, its `name` metric divided by the floor's); (None, None) for a mode without one."""
    floor = floor_of(mode)
    if floor is None:
        return None, None
    value = metric(find_run(mode_by_name(results, mode), kind, offered), name)
    return floor, ratio(value, metric(find_run(mode_by_name(results, floor), kind, offered), name))


def expected_denied_share(mode: Mode) -> float:
    """Share of the load this mode had to answer 403 (recorded by the runner; 0 in older results)."""
    return float(mode.get("expected_denied_share") or 0.0)


def denied_share(run: Run | None) -> float | None:
    """Share of a run's answers that were 403."""
    if run is None:
        return None
    status = run.get("status") or {}
    answered = sum(int(n) for n in status.values())
    return int(status.get("403", 0)) / answered if answered else None


def shortfall(run: Run | None) -> bool:
    """A fixed-rate run whose achieved rate fell more than 5 % short of the offered rate."""
    if run is None or run.get("kind") != "fixed":
        return False
    offered, achieved = run.get("offered_rps"), run.get("achieved_rps")
    if not offered or achieved is None:
        return False
    return float(achieved) < KEEP_UP_SHARE * float(offered)


def failures(run: Run | None, mode: Mode | None = None) -> tuple[int, int]:
    """(transport errors, unexpected answers) of a run: answers that were not 2xx, except the 403s of the
    request mix in a mode that enforces the policies (it is expected to deny them)."""
    if run is None:
        return 0, 0
    denials_expected = mode is not None and expected_denied_share(mode) > 0
    unexpected = sum(
        int(n)
        for code, n in (run.get("status") or {}).items()
        if not str(code).startswith("2") and not (denials_expected and str(code) == "403")
    )
    return int(run.get("errors") or 0), unexpected


# ---------------------------------------------------------------------------------------------
# Formatting


def fmt_ms(value: float | None) -> str:
    """Milliseconds: 2 decimals below 10, 1 decimal up to 1000, whole and grouped above."""
    if value is None:
        return DASH
    if abs(value) < 9.995:
        return f"{value:.2f}"
    return f"{value:.1f}" if abs(value) < 999.95 else fmt_int(value)


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return DASH
    return f"{value:.2f}×" if value < 9.995 else f"{value:.1f}×"


def fmt_int(value: float | None, sep: str = THIN) -> str:
    """Integer with thin-space digit grouping: 12 345."""
    if value is None:
        return DASH
    return f"{round(value):,}".replace(",", sep)


def fmt_rate(value: float | None, sep: str = THIN) -> str:
    """A request rate: integers above 100 req/s, one decimal below (quick runs)."""
    if value is None:
        return DASH
    return fmt_int(value, sep) if value >= 100 or float(value).is_integer() else f"{value:.1f}"


def fmt_cpu(value: float | None) -> str:
    """CPU seconds per 1000 requests: three significant figures for the usual range."""
    if value is None:
        return DASH
    for limit, digits in ((1, 3), (10, 2), (100, 1)):
        if abs(value) < limit:
            return f"{value:.{digits}f}"
    return f"{value:.0f}"


def fmt_mib(value: float | None) -> str:
    if value is None:
        return DASH
    return f"{value:.1f}" if value < 99.95 else fmt_int(value)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return DASH
    if n < 1024:
        return f"{n:g} B"
    kib = n / 1024
    return f"{kib:g} KiB" if kib < 1024 else f"{kib / 1024:g} MiB"


def fmt_duration(seconds: float | None) -> str:
    """Human duration: "45 s", "13 min 32 s", "1 h 05 min"."""
    if seconds is None:
        return DASH
    if seconds < 10:
        return f"{seconds:.1f}".removesuffix(".0") + " s"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def fmt_share(value: float | None) -> str:
    return DASH if value is None else f"{value * 100:.1f} %"


def fmt_floor(floor: str | None, value: float | None) -> str:
    """A ratio to the mode's floor, followed by the floor's name, so a column can mix floors."""
    if floor is None or value is None:
        return DASH
    return f"{fmt_ratio(value)} {floor}"


def fmt_failures(run: Run | None, mode: Mode | None = None) -> str:
    if run is None:
        return DASH
    errors, non_2xx = failures(run, mode)
    text = f"{fmt_int(errors)} / {fmt_int(non_2xx)}"
    requests = run.get("requests") or 0
    if (errors or non_2xx) and requests:
        text += f" ({(errors + non_2xx) / (requests + errors) * 100:.1f} %)"
    return text


def fmt_achieved(run: Run | None) -> str:
    if run is None:
        return DASH
    achieved = metric(run, "achieved_rps")
    if shortfall(run):
        return f"⚠ {fmt_rate(achieved)}/{fmt_rate(run.get('offered_rps'))}"
    return fmt_rate(achieved)


def fmt_protocol(protocol: str | None) -> str:
    return {"http1": "HTTP/1.1", "http2": "HTTP/2"}.get(protocol or "", protocol or DASH)


def fmt_date(iso: str | None) -> str:
    if not iso:
        return DASH
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if when.tzinfo is not None:
        when = when.astimezone(UTC)
        return when.strftime("%Y-%m-%d %H:%M UTC")
    return when.strftime("%Y-%m-%d %H:%M")


def _delta_phrase(delta: float) -> str:
    return f"added {fmt_ms(delta)} ms" if delta >= 0 else f"came in {fmt_ms(-delta)} ms under"


def _code(name: str) -> str:
    return f"`{name}`"


def _join(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1) -> list[str]:
    """A Markdown table; the first `left` columns are text, the rest numbers (right-aligned)."""
    lines = ["| " + " | ".join(cell.replace("|", "\\|") for cell in header) + " |"]
    lines.append("|" + "|".join(":---" if i < left else "---:" for i in range(len(header))) + "|")
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |" for cells in rows]
    return lines


# ---------------------------------------------------------------------------------------------
# Summary paragraph


def summary(results: Results) -> str:
    """The opening paragraph: what each mode adds over Envoy alone, computed from this run."""
    modes = usable_modes(results)
    if not modes:
        return "No mode produced measurements in this run." + _failed_sentence(results)
    parts: list[str] = []
    load = middle_load(fixed_loads(results))
    if load is not None:
        parts.append(_latency_sentence(results, load))
        parts += filter(None, [_hop_sentence(results, load), _cpu_sentence(results, load)])
        parts += filter(None, [_floor_sentence(results, load)])
    parts += filter(None, [_saturation_sentence(results), _shortfall_sentence(results), _errors_sentence(results)])
    return " ".join(parts) + _failed_sentence(results)


def _latency_sentence(results: Results, load: float) -> str:
    base_run = find_run(mode_by_name(results, "none"), "fixed", load)
    base = metric(base_run, "p90")
    others = [m for m in usable_modes(results) if m["mode"] != "none"]
    at = f"At {fmt_rate(load)} req/s offered"
    if base is None:
        listed = [f"{_code(m['mode'])} {fmt_ms(metric(find_run(m, 'fixed', load), 'p90'))} ms" for m in others]
        return f"{at} the p90 latency was: {_join(listed)} (no `none` baseline in this run to measure against)."
    items = []
    for m in others:
        run = find_run(m, "fixed", load)
        p90 = metric(run, "p90")
        if p90 is None:
            items.append(f"{_code(m['mode'])} has no p90 at this load")
            continue
        item = f"{_code(m['mode'])} {_delta_phrase(p90 - base)} ({fmt_ratio(ratio(p90, base))})"
        if shortfall(run):
            item += f" but could not keep up ({fmt_rate(metric(run, 'achieved_rps'))} req/s achieved)"
        items.append(item)
    head = f"{at}, Envoy alone (`none`) had a p90 latency of {fmt_ms(base)} ms."
    return f"{head} Over that, at p90, {_join(items)}." if items else head


def _hop_sentence(results: Results, load: float) -> str | None:
    """What the bare Python hop of each transport adds to Envoy alone, at p90."""
    none_p90 = metric(find_run(mode_by_name(results, "none"), "fixed", load), "p90")
    if none_p90 is None:
        return None
    hops = []
    for floor, transport in (
        ("noop", "ext_authz over gRPC"),
        ("noop-http", "ext_authz over HTTP"),
        ("noop-extproc", "ext_proc"),
    ):
        p90 = metric(find_run(mode_by_name(results, floor), "fixed", load), "p90")
        if p90 is not None:
            hops.append(f"{fmt_ms(p90 - none_p90)} ms with {transport} ({_code(floor)})")
    if not hops:
        return None
    return f"An empty Python hop alone accounts for {_join(hops)} of that."


def _floor_sentence(results: Results, load: float) -> str | None:
    """Each mode against its own floor: extproc's own work, the part optimisation in Python can shrink."""
    items = []
    for m in usable_modes(results):
        floor = floor_of(m["mode"])
        if floor is None or mode_by_name(results, floor) is None:
            continue
        bits = []
        p90 = metric(find_run(m, "fixed", load), "p90")
        floor_p90 = metric(find_run(mode_by_name(results, floor), "fixed", load), "p90")
        if p90 is not None and floor_p90 is not None:
            bits.append(f"{fmt_ratio(ratio(p90, floor_p90))} at p90 ({_delta_phrase(p90 - floor_p90)})")
        _, cpu = floor_ratio(results, "mesh_cpu", m["mode"], kind="fixed", offered=load)
        if cpu is not None:
            bits.append(f"{fmt_ratio(cpu)} in mesh CPU")
        _, rps = floor_ratio(results, "achieved_rps", m["mode"])
        if rps is not None:
            bits.append(f"{fmt_ratio(rps)} in saturation throughput")
        if bits:
            items.append(f"{_code(m['mode'])} / {_code(floor)} is {_join(bits)}")
    if not items:
        return None
    return f"Each mode against its floor, the empty server of its transport: {'; '.join(items)}."


def _cpu_sentence(results: Results, load: float) -> str | None:
    base = metric(find_run(mode_by_name(results, "none"), "fixed", load), "mesh_cpu")
    if base is None:
        return None
    items = []
    for m in usable_modes(results):
        if m["mode"] == "none":
            continue
        cpu = metric(find_run(m, "fixed", load), "mesh_cpu")
        if cpu is not None:
            items.append(f"{_code(m['mode'])} {fmt_cpu(cpu)} ({fmt_ratio(ratio(cpu, base))})")
    text = (
        f"At that load the mesh layer used {fmt_cpu(base)} CPU-s per 1000 requests (= vCPU per 1000 req/s) "
        "with Envoy alone"
    )
    return text + (f"; {_join(items)}." if items else ".")


def _saturation_sentence(results: Results) -> str | None:
    base = metric(find_run(mode_by_name(results, "none"), "saturation"), "achieved_rps")
    items = []
    for m in usable_modes(results):
        rps = metric(find_run(m, "saturation"), "achieved_rps")
        if rps is None or m["mode"] == "none":
            continue
        shown = fmt_ratio(ratio(rps, base)) if base else f"{fmt_rate(rps)} req/s"
        items.append(f"{_code(m['mode'])} {shown}")
    if base is None and not items:
        return None
    if base is None:
        return f"At saturation: {_join(items)}."
    head = f"At saturation Envoy alone served {fmt_rate(base)} req/s"
    return head + (f"; relative to it, {_join(items)}." if items else ".")


def _shortfall_sentence(results: Results) -> str | None:
    short = []
    for m in usable_modes(results):
        loads = [run.get("offered_rps") for run in m.get("runs") or () if shortfall(run)]
        if loads:
            short.append(f"{_code(m['mode'])} at {_join([fmt_rate(x) for x in loads])} req/s")
    if not short:
        return None
    return f"Could not keep up with the offered rate (more than 5 % short, ⚠ in the tables): {_join(short)}."


def _errors_sentence(results: Results) -> str | None:
    bad = []
    for m in usable_modes(results):
        total = sum(sum(failures(run, m)) for run in m.get("runs") or ())
        if total:
            bad.append(f"{_code(m['mode'])} ({fmt_int(total)})")
    return f"Requests that failed or got an answer the request mix does not call for: {_join(bad)}." if bad else None


def _failed_sentence(results: Results) -> str:
    failed = [_code(m.get("mode", "?")) for m in failed_modes(results)]
    if not failed:
        return ""
    verb = "mode" if len(failed) == 1 else "modes"
    return f" The {_join(failed)} {verb} failed and {'is' if len(failed) == 1 else 'are'} not in the tables."


# ---------------------------------------------------------------------------------------------
# Markdown


def render_markdown(results: Results, charts: Sequence[str] = ()) -> str:
    """The whole report. `charts` are the chart file names written next to it (linked, not checked)."""
    chart_names = list(charts)
    lines: list[str] = [f"# {_title(results)}", "", summary(results), ""]
    lines += _run_section(results)
    lines += _throughput_section(results, _take(chart_names, THROUGHPUT_CHART))
    lines += _latency_section(results, _take(chart_names, LATENCY_CHART))
    lines += _cpu_section(results, _take(chart_names, CPU_CHART))
    lines += _rss_section(results)
    lines += _memory_section(results)
    lines += _probes_section(results)
    lines += _how_to_read(results)
    if chart_names:
        lines += ["## Other charts", ""] + [f"![{name}]({name})" for name in chart_names] + [""]
    return "\n".join(lines).rstrip() + "\n"


def _take(names: list[str], name: str) -> str | None:
    if name in names:
        names.remove(name)
        return name
    return None


def _title(results: Results) -> str:
    scenario = results.get("scenario") or {}
    date = (results.get("run") or {}).get("started") or ""
    loads = fixed_loads(results)
    bits = [fmt_protocol(scenario.get("protocol"))] if scenario.get("protocol") else []
    if loads:
        span = fmt_rate(loads[0]) if len(loads) == 1 else f"{fmt_rate(loads[0])}–{fmt_rate(loads[-1])}"
        bits.append(f"{span} req/s")
    title = "extproc benchmark"
    if date[:10]:
        title += f", {date[:10]}"
    return title + (f" ({', '.join(bits)})" if bits else "")


def _run_section(results: Results) -> list[str]:
    run = results.get("run") or {}
    scenario = results.get("scenario") or {}
    lines = ["## Run", ""]
    if run.get("quick"):
        lines += ["> **Quick run**: short measurement windows; the numbers show the shape, not the values.", ""]
    duration = run.get("duration_s")
    if duration is None:
        duration = _seconds_between(run.get("started"), run.get("finished"))
    lines += [
        f"- **Date:** {fmt_date(run.get('started'))}",
        f"- **Duration:** {fmt_duration(duration)}",
        f"- **Command:** {_code(run['command']) if run.get('command') else DASH}",
        f"- **Machine:** {_machine_line(results.get('machine') or {})}",
        f"- **Scenario:** {_scenario_line(scenario)}",
    ]
    mix = _mix_line(scenario)
    if mix:
        lines.append(f"- **Load mix:** {mix}")
    mixer = _mixer_line(scenario.get("mixer"))
    if mixer:
        lines.append(f"- **Mixer baseline:** {mixer}")
    lines += ["", "### Modes", ""]
    for m in results.get("modes") or ():
        name = m.get("mode", "?")
        title = m.get("title") or name
        text = f"- **{_code(name)}** — {title}"
        if m.get("description"):
            text += f": {_one_line(m['description'])}"
        if m.get("error"):
            text += f"\n  **Failed:** {_one_line(m['error'])} — left out of the tables and charts."
        lines.append(text)
    if not results.get("modes"):
        lines.append("- (no modes in this results file)")
    return [*lines, ""]


def _one_line(text: str) -> str:
    """Free text from the results (descriptions, error messages) folded so it stays inside its list item."""
    return " ".join(str(text).split())


def _seconds_between(start: str | None, end: str | None) -> float | None:
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _machine_line(machine: Mapping[str, Any]) -> str:
    bits = []
    if machine.get("cpus") is not None:
        cpu = f"{machine['cpus']} CPUs"
        bits.append(cpu + (f" ({machine['cpu_model']})" if machine.get("cpu_model") else ""))
    if machine.get("mem_gib") is not None:
        bits.append(f"{machine['mem_gib']:g} GiB RAM")
    for key, label in (("kernel", "Linux"), ("python", "Python"), ("envoy", "Envoy")):
        if machine.get(key):
            bits.append(f"{label} {machine[key]}")
    if machine.get("load_generator"):
        bits.append(f"load from {machine['load_generator']}")
    return ", ".join(bits) or DASH


def _scenario_line(s: Mapping[str, Any]) -> str:
    bits = []
    if s.get("protocol"):
        bits.append(fmt_protocol(s["protocol"]))
    if s.get("connections") is not None:
        bits.append(f"{s['connections']} connections")
    if s.get("payload_bytes") is not None:
        bits.append(f"{fmt_bytes(s['payload_bytes'])} payload")
    if s.get("policies") is not None:
        bits.append(f"{s['policies']} policies")
    if s.get("envoy_workers") is not None:
        bits.append(f"{s['envoy_workers']} Envoy workers")
    line = ", ".join(bits)
    rates = s.get("rates") or []
    if rates:
        each = f"fixed loads {', '.join(fmt_rate(r) for r in rates)} req/s"
        if s.get("duration_s") is not None:
            each += f" for {fmt_duration(s['duration_s'])} each"
        if s.get("warmup_s"):
            each += f" after {fmt_duration(s['warmup_s'])} warm-up"
        line += f"; {each}"
    if s.get("saturation_duration_s") is not None:
        line += f"; saturation for {fmt_duration(s['saturation_duration_s'])}"
    return line or DASH


def _mix_line(s: Mapping[str, Any]) -> str:
    """The request list the load cycles through, and the share of 403s the enforcing modes must answer."""
    mix = s.get("mix") or {}
    share = s.get("denied_share")
    if share is None and not mix:
        return ""
    bits = []
    http2 = s.get("protocol") == "http2"
    shown = mix.get("http2") if http2 and mix.get("http2") else mix
    if shown.get("tokens") is not None:
        bits.append(f"{shown['tokens']} RS256 token{'s' if shown['tokens'] != 1 else ''}")
    if mix.get("requests_per_cycle"):
        bits.append(f"a list of {mix['requests_per_cycle']} requests each connection cycles through")
    kinds = shown.get("kinds") or {}
    denied = [f"{n} × {kind}" for kind, n in kinds.items() if kind != "allowed"]
    line = ", ".join(bits)
    if share is not None:
        line += ("; " if line else "") + f"expected 403 share {fmt_share(share)} in the modes that enforce the policies"
        if denied:
            line += f" ({', '.join(denied)} per cycle)"
        line += ", none elsewhere"
        hit = (s.get("mixer") or {}).get("check_cache_hit_percent") or 0
        if hit:
            line += (
                f" (`mixer`: {fmt_share(share * (1 - hit / 100))}, as its check-cache model lets the "
                f"{hit:g} % of requests that skip the Check through)"
            )
    if http2:
        line += " (HTTP/2: h2load sends one token with every request; the denials are paths no ALLOW matches)"
    return line


def _mixer_line(mixer: Mapping[str, Any] | None) -> str:
    if not mixer:
        return ""
    bits = []
    if mixer.get("rtt_ms") is not None:
        bits.append(f"{mixer['rtt_ms']:g} ms injected round trip to the central server")
    if mixer.get("sidecars") is not None:
        bits.append(f"{mixer['sidecars']} sidecars")
    if mixer.get("check_cache_hit_percent") is not None:
        bits.append(f"{mixer['check_cache_hit_percent']:g} % check-cache hits")
    if mixer.get("report_batching") is not None:
        bits.append("report batching " + ("on" if mixer["report_batching"] else "off (one Report per request)"))
    return ", ".join(bits)


def _chart(name: str | None, alt: str) -> list[str]:
    return [f"![{alt}]({name})", ""] if name else []


def _ratio_cells(results: Results, name: str, kind: str, offered: float | None, mode: str) -> list[str]:
    """The cells of one mode against none, noop and its own floor."""
    cells = [
        fmt_ratio(ratios(results, name, kind=kind, offered=offered, baseline=base).get(mode))
        for base in ("none", "noop")
    ]
    return [*cells, fmt_floor(*floor_ratio(results, name, mode, kind=kind, offered=offered))]


def _throughput_section(results: Results, chart: str | None) -> list[str]:
    lines = ["## Throughput at saturation", ""]
    modes = [m for m in usable_modes(results) if find_run(m, "saturation")]
    if not modes:
        return [*lines, "No saturation runs in this results file.", ""]
    conns = (results.get("scenario") or {}).get("connections")
    lines += [
        "Closed loop: "
        + (f"{conns} connections" if conns else "each connection")
        + " send the next request as soon as the previous answer arrives.",
        "",
    ]
    rows = []
    for m in modes:
        run = find_run(m, "saturation")
        rows.append(
            [
                m["mode"],
                fmt_rate(metric(run, "achieved_rps")),
                *_ratio_cells(results, "achieved_rps", "saturation", None, m["mode"]),
                fmt_share(denied_share(run)),
                fmt_failures(run, m),
            ]
        )
    lines += _table(["mode", "req/s", "× none", "× noop", "× floor", "403", "errors / unexpected"], rows)
    return [*lines, "", *_chart(chart, "Saturation throughput per mode, req/s, with the ratio to none")]


def _latency_section(results: Results, chart: str | None) -> list[str]:
    lines = ["## Latency at fixed offered load", ""]
    loads = fixed_loads(results)
    if not loads:
        return [*lines, "No fixed-rate runs in this results file.", ""]
    lines += [*_chart(chart, "Latency percentiles per mode at each offered load, ms")]
    any_short = False
    for load in loads:
        lines += [f"### {fmt_rate(load)} req/s offered — latency in ms", ""]
        rows = []
        for m in usable_modes(results):
            run = find_run(m, "fixed", load)
            any_short = any_short or shortfall(run)
            latency = [fmt_ms(metric(run, p)) for p in PERCENTILES]
            rows.append(
                [
                    m["mode"],
                    fmt_achieved(run),
                    *latency,
                    *_ratio_cells(results, "p90", "fixed", load, m["mode"]),
                    fmt_failures(run, m),
                ]
            )
        header = [
            "mode",
            "achieved req/s",
            *PERCENTILES,
            "p90 × none",
            "p90 × noop",
            "p90 × floor",
            "errors / unexpected",
        ]
        lines += [*_table(header, rows), ""]
    if any_short:
        lines += [
            "⚠ achieved/offered: the mode fell more than 5 % short of the offered rate, so it could not keep "
            "up; its latency is mostly its own queue and its ratios are not like-for-like.",
            "",
        ]
    return lines


def _cpu_section(results: Results, chart: str | None) -> list[str]:
    lines = ["## CPU per 1000 requests", ""]
    loads = fixed_loads(results)
    if not loads:
        return [*lines, "No fixed-rate runs in this results file.", ""]
    lines += [
        "CPU seconds per 1000 requests, which is also vCPU per 1000 req/s (the unit of Istio's pages). "
        "Mesh = " + " + ".join(MESH_ROLES) + "; upstream and loadgen are the same in every mode and shown for "
        "scale only.",
        "",
        *_chart(chart, "Mesh CPU seconds per 1000 requests by role, per mode, at each offered load"),
    ]
    for load in loads:
        runs = [(m, find_run(m, "fixed", load)) for m in usable_modes(results)]
        sums = {m["mode"]: role_sums(run) for m, run in runs}
        mesh_roles = [r for r in MESH_ROLES if any(r in s for s in sums.values())]
        info_roles = [r for r in INFO_ROLES if any(r in s for s in sums.values())]
        rows = []
        for m, run in runs:
            s = sums[m["mode"]]
            rows.append(
                [
                    m["mode"],
                    fmt_cpu(mesh_cpu(run)),
                    *_ratio_cells(results, "mesh_cpu", "fixed", load, m["mode"]),
                    *[fmt_cpu(s.get(r)) for r in mesh_roles],
                    *[fmt_cpu(s.get(r)) for r in info_roles],
                ]
            )
        header = [
            "mode",
            "mesh CPU-s / 1000 req",
            "× none",
            "× noop",
            "× floor",
            *mesh_roles,
            *[f"{r} (info)" for r in info_roles],
        ]
        lines += [f"### {fmt_rate(load)} req/s offered", "", *_table(header, rows), ""]
    return lines


def idle_rss(mode: Mode) -> dict[str, float]:
    """Per role, the summed resident set of the mode's processes once ready, before any request."""
    sums: dict[str, float] = {}
    for proc in mode.get("processes") or ():
        if proc.get("idle_rss_mib") is not None:
            role = proc.get("role") or "unknown"
            sums[role] = sums.get(role, 0.0) + float(proc["idle_rss_mib"])
    return sums


def _idle_peak(idle: float | None, peak: float | None) -> str:
    return f"{fmt_mib(idle)} / {fmt_mib(peak)}"


def _rss_section(results: Results) -> list[str]:
    lines = ["## Memory per mode (RSS, MiB)", ""]
    peaks = {m["mode"]: peak_rss(m) for m in usable_modes(results)}
    idles = {m["mode"]: idle_rss(m) for m in usable_modes(results)}
    if not any(peaks.values()) and not any(idles.values()):
        return [*lines, "No memory measurements in this results file.", ""]
    roles = [r for r in (*MESH_ROLES, *INFO_ROLES) if any(r in p for p in (*peaks.values(), *idles.values()))]
    rows = []
    for mode in peaks:
        p, i = peaks[mode], idles[mode]
        mesh_peak = [p[r] for r in MESH_ROLES if r in p]
        mesh_idle = [i[r] for r in MESH_ROLES if r in i]
        rows.append(
            [
                mode,
                _idle_peak(sum(mesh_idle) if mesh_idle else None, sum(mesh_peak) if mesh_peak else None),
                *[_idle_peak(i.get(r), p.get(r)) for r in roles],
            ]
        )
    lines += _table(["mode", "mesh idle / peak", *[f"{r} idle / peak" for r in roles]], rows)
    lines += [
        "",
        "Idle: VmRSS once every process of the mode was ready, before the first request (the upstream is shared "
        "by all modes and has no idle figure). Peak: VmHWM, the highest over the mode's runs. A role with several "
        "processes (mixer's sidecars) shows their sum.",
        "",
    ]
    return lines


def _memory_section(results: Results) -> list[str]:
    """The memory step: `extproc serve` alone, idle and holding the issue's number of series."""
    mem = results.get("memory")
    if not mem:
        return []
    lines = ["## extproc memory: idle and with metric series", ""]
    if mem.get("error"):
        return [*lines, f"**Failed:** {_one_line(mem['error'])}", ""]
    target = mem.get("series_target")
    series = mem.get("series")
    rows = [
        ["idle, ready, before any request", fmt_mib(mem.get("idle_rss_mib")), _mb(mem.get("idle_rss_mib"))],
        [
            f"holding {fmt_int(series)} series, before a scrape",
            fmt_mib(mem.get("series_rss_mib")),
            _mb(mem.get("series_rss_mib")),
        ],
        [
            f"after one /metrics scrape ({_scrape_size(mem.get('scrape_bytes'))})",
            fmt_mib(mem.get("scraped_rss_mib")),
            _mb(mem.get("scraped_rss_mib")),
        ],
        ["peak (VmHWM)", fmt_mib(mem.get("peak_rss_mib")), _mb(mem.get("peak_rss_mib"))],
    ]
    lines += _table(["`extproc serve`, default flags", "RSS MiB", "RSS MB"], rows)
    lines += [
        "",
        f"Series: {fmt_int(series)} of {fmt_int(target)} asked for, as extproc counts them "
        f"(`extproc_telemetry_series`: {fmt_int(mem.get('series_gauge'))}; label sets of the `istio_*` families "
        f"on /metrics: {fmt_int(mem.get('series_counted'))}), made by access-log entries from "
        f"{fmt_int(mem.get('peers'))} distinct client workloads ({mem.get('series_per_peer', DASH)} series each) "
        "streamed over gRPC. A histogram counts once here; Prometheus stores each of its buckets as a series.",
        "",
    ]
    return lines


def _scrape_size(n: float | None) -> str:
    """The /metrics body, whose rendering is what raises the resident set after a scrape."""
    return "size unknown" if n is None else f"{fmt_mib(n / 2**20)} MiB of text"


def _mb(mib: float | None) -> str:
    """MiB as decimal megabytes, the unit the issue's limits are given in."""
    return DASH if mib is None else fmt_mib(mib * 1.048576)


def _probes_section(results: Results) -> list[str]:
    """Probe answers, failed modes included: a wrong answer is often why a mode failed."""
    lines = ["## Probes", ""]
    modes = [m for m in results.get("modes") or () if m.get("probes")]
    if not modes:
        return [*lines, "No probes in this results file.", ""]
    names: list[str] = []
    paths: dict[str, str] = {}
    for m in modes:
        for probe in m["probes"]:
            name = probe.get("name") or probe.get("path") or "?"
            if name not in names:
                names.append(name)
                paths[name] = probe.get("path") or ""
    rows = []
    for m in modes:
        by_name = {(p.get("name") or p.get("path") or "?"): p for p in m["probes"]}
        label = m.get("mode", "?") + (" (failed)" if m.get("error") else "")
        rows.append([label, *[_probe_cell(by_name.get(n)) for n in names]])
    lines += _table(["mode", *names], rows, left=len(names) + 1)
    described = [f"{n}: `{paths[n]}`" for n in names if paths[n]]
    if described:
        lines += ["", "Paths: " + "; ".join(described) + ". ✓ answered as expected, ✗ did not (expected in brackets)."]
    return [*lines, ""]


def _probe_cell(probe: Mapping[str, Any] | None) -> str:
    if probe is None:
        return DASH
    expect, got = probe.get("expect"), probe.get("got")
    if got is not None and got == expect:
        return f"✓ {got}"
    return f"✗ {got if got is not None else 'no answer'} (expected {expect})"


def _how_to_read(results: Results) -> list[str]:
    scenario = results.get("scenario") or {}
    cpus = (results.get("machine") or {}).get("cpus")
    shared = f"the {cpus} CPUs of one" if cpus else "one"
    samples = ""
    loads = fixed_loads(results)
    if loads and scenario.get("duration_s"):
        n = loads[0] * float(scenario["duration_s"])
        samples = (
            f" At {fmt_rate(loads[0])} req/s for {fmt_duration(scenario['duration_s'])}, a run has about "
            f"{fmt_int(n)} requests, so p99.9 rests on its {fmt_int(max(1, n / 1000))} slowest."
        )
    return [
        "## How to read this",
        "",
        "- **× none** divides by the `none` mode (Envoy alone, no policy, no telemetry) at the same run kind and "
        "load: it is what the whole mesh layer costs, every proxy, hop and policy server together.",
        "- **× noop** divides by `noop` (Envoy's ext_authz calling a Python gRPC server that answers OK at once): "
        "the floor of a Python ext_authz hop.",
        "- **× floor** divides by the mode's own floor, named in the cell: the empty Python server of the same "
        "transport, `noop` for `authz+als` and `mixer`, `noop-http` (envoy/authz-http.yaml as shipped, access "
        "log included, in front of extproc's HTTP check listener answering 200 at once and an access log "
        "service dropping every entry) for `authz-http`, `noop-extproc` (Envoy's ext_proc "
        "filter as shipped, "
        "each stream answered with empty replies and ended after the last message) for `extproc`. What a mode "
        "adds over its floor is extproc's own work (JWT, policy, telemetry, tracing), the part that optimisation "
        "in Python can shrink.",
        "- **403s are expected.** The load cycles through a list in which one request in ten is denied (blocked "
        "users' tokens, paths no ALLOW matches): the modes that enforce the policies answer those with a local "
        "403 that never reaches the upstream, the others let everything through. *403* is the share a run got; "
        "*unexpected* counts every other non-2xx answer.",
        f"- **Only ratios within one run hold.** Envoy, extproc, the upstream and the load generator all share "
        f"{shared} shared, noisy machine; absolute numbers move between runs by more than the differences "
        "of interest, and are not comparable with Istio's published figures, measured on dedicated nodes.",
        "- **Saturation vs fixed rate.** Saturation is closed loop: a fixed number of connections each send the "
        "next request when the previous answer arrives, so req/s is the most the whole machine sustains and its "
        "latency is queueing, not reported. Fixed-rate runs offer a steady rate and report client-side latency "
        "percentiles; they are meaningful only while the mode keeps up (⚠ marks achieved below 95 % of offered)."
        + samples,
        "- **CPU** is utime + stime from `/proc/<pid>/stat` of each process over the measurement window (warm-up "
        "excluded), divided by the requests completed in it, × 1000. CPU-s per 1000 requests equals vCPU per "
        "1000 req/s, the unit of Istio's performance pages. Mesh CPU sums envoy (every sidecar), extproc, "
        "central and hop; upstream and loadgen are shown for scale only.",
        "- **Memory**: idle is each process's resident set once ready and before any request, peak its high-water "
        "mark; per role they are summed. The extproc memory step runs `extproc serve` alone with its defaults, "
        "idle and then holding the asked-for number of metric series.",
        "- **`mixer`** reproduces Istio 1.0–1.4 Mixer: a synchronous Check to one central server through an extra "
        "Envoy hop with injected delay, plus a Report per request, with the settings in *Mixer baseline* above.",
        "",
    ]


# ---------------------------------------------------------------------------------------------
# Charts (matplotlib, Agg, imported only here)


def mode_colours(results: Results) -> dict[str, str]:
    """The same colour for a mode in every chart: fixed for the known modes, spare ones in order otherwise."""
    colours: dict[str, str] = {}
    spare = iter(SPARE_COLOURS * 4)
    for m in results.get("modes") or ():
        name = m.get("mode", "?")
        colours[name] = MODE_COLOURS.get(name) or next(spare)
    return colours


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_RC = {"font.size": 11, "axes.titlesize": 12, "axes.spines.top": False, "axes.spines.right": False}


def _grid(plt: Any, n: int) -> tuple[Any, list[Any]]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(12, 7 if rows == 1 else 4.2 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def throughput_chart(results: Results, path: Path) -> Path | None:
    """Bars of saturation req/s per mode, each labelled with its ratio to `none`."""
    points = [(m["mode"], metric(find_run(m, "saturation"), "achieved_rps")) for m in usable_modes(results)]
    points = [(mode, rps) for mode, rps in points if rps is not None]
    if not points:
        return None
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    colours = mode_colours(results)
    to_none = ratios(results, "achieved_rps", kind="saturation")
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(12, 7))
        names = [mode for mode, _ in points]
        values = [rps for _, rps in points]
        bars = ax.bar(names, values, color=[colours[n] for n in names], edgecolor="black", linewidth=0.5)
        top = max(values)
        for bar, name, value in zip(bars, names, values, strict=True):
            label = f"{fmt_int(value, ' ')} req/s"
            if to_none.get(name) is not None:
                label += f"\n{fmt_ratio(to_none[name])} none"
            floor, to_floor = floor_ratio(results, "achieved_rps", name)
            if to_floor is not None:
                label += f"\n{fmt_floor(floor, to_floor)}"
            ax.annotate(
                label,
                (bar.get_x() + bar.get_width() / 2, value),
                xytext=(0, 4),
                textcoords="offset points",
                ha="center",
                va="bottom",
            )
        ax.set_ylim(0, top * 1.2 or 1)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_int(v, " ")))
        ax.set_ylabel("requests per second")
        conns = (results.get("scenario") or {}).get("connections")
        extra = f", {conns} connections" if conns else ""
        ax.set_title(
            f"Throughput at saturation (req/s, closed loop{extra}); labels: ratio to Envoy alone and to the floor"
        )
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return path


def latency_chart(results: Results, path: Path) -> Path | None:
    """Per offered load, p50..p99.9 of each mode as lines on a log axis (dashed: could not keep up)."""
    loads = fixed_loads(results)
    panels = []
    for load in loads:
        lines = []
        for m in usable_modes(results):
            run = find_run(m, "fixed", load)
            values = [metric(run, p) for p in PERCENTILES]
            if any(v is not None and v > 0 for v in values):
                lines.append((m["mode"], values, shortfall(run)))
        if lines:
            panels.append((load, lines))
    if not panels:
        return None
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    colours = mode_colours(results)
    with plt.rc_context(_RC):
        fig, axes = _grid(plt, len(panels))
        handles: dict[str, Any] = {}
        for ax, (load, lines) in zip(axes, panels, strict=True):
            xs = list(range(len(PERCENTILES)))
            for mode, values, short in lines:
                pts = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None and v > 0]
                (line,) = ax.plot(
                    [x for x, _ in pts],
                    [v for _, v in pts],
                    marker="o",
                    linewidth=2,
                    linestyle="--" if short else "-",
                    color=colours[mode],
                    label=mode,
                )
                handles.setdefault(mode, line)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(xs, PERCENTILES)
            ax.set_title(f"{fmt_int(load, ' ')} req/s offered")
            ax.set_ylabel("latency (ms, log scale)")
            ax.grid(axis="y", which="both", alpha=0.3)
            short_modes = [mode for mode, _, short in lines if short]
            if short_modes:
                ax.text(
                    0.02, 0.98, "dashed: could not keep up\n(" + ", ".join(short_modes) + ")",
                    transform=ax.transAxes, va="top", fontsize=9,
                )  # fmt: skip
        fig.suptitle("Client-side latency percentiles per mode at fixed offered load (ms)")
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 6), frameon=False)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return path


def cpu_chart(results: Results, path: Path) -> Path | None:
    """Per offered load, stacked mesh CPU-s per 1000 requests by role for each mode."""
    panels = []
    for load in fixed_loads(results):
        bars = []
        for m in usable_modes(results):
            sums = role_sums(find_run(m, "fixed", load))
            if any(r in sums for r in MESH_ROLES):
                bars.append((m["mode"], sums))
        if bars:
            panels.append((load, bars))
    if not panels:
        return None
    plt = _pyplot()
    colours = mode_colours(results)
    with plt.rc_context(_RC):
        fig, axes = _grid(plt, len(panels))
        used_roles: dict[str, Any] = {}
        for ax, (load, bars) in zip(axes, panels, strict=True):
            names = [mode for mode, _ in bars]
            bottoms = [0.0] * len(bars)
            for role in MESH_ROLES:
                heights = [sums.get(role, 0.0) for _, sums in bars]
                if not any(heights):
                    continue
                container = ax.bar(names, heights, bottom=bottoms, color=ROLE_COLOURS[role], edgecolor="white")
                used_roles.setdefault(role, container)
                bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
            to_none = ratios(results, "mesh_cpu", kind="fixed", offered=load)
            for i, (name, total) in enumerate(zip(names, bottoms, strict=True)):
                label = fmt_cpu(total) + (f"\n{fmt_ratio(to_none[name])}" if to_none.get(name) is not None else "")
                ax.annotate(label, (i, total), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=9)
            ax.set_ylim(0, max(bottoms) * 1.25 or 1)
            ax.set_title(f"{fmt_int(load, ' ')} req/s offered")
            ax.set_ylabel("CPU-s per 1000 requests")
            ax.tick_params(axis="x", labelrotation=30)
            for tick in ax.get_xticklabels():
                tick.set_color(colours.get(tick.get_text(), "black"))
                tick.set_fontweight("bold")
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle("Mesh CPU per 1000 requests by role (= vCPU per 1000 req/s); label: total and ratio to none")
        fig.legend(used_roles.values(), used_roles.keys(), loc="lower center", ncol=len(used_roles), frameon=False)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return path


def write_charts(results: Results, out_dir: Path) -> list[Path]:
    """Draw the charts that have data; a chart with nothing to show is not written."""
    written = []
    for name, draw in ((THROUGHPUT_CHART, throughput_chart), (LATENCY_CHART, latency_chart), (CPU_CHART, cpu_chart)):
        path = draw(results, out_dir / name)
        if path is not None:
            written.append(path)
    return written


def write_report(results: Results, out_dir: Path) -> list[Path]:
    """Write the charts and report.md into out_dir; return the paths written (charts first)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    charts = write_charts(results, out_dir)
    report = out_dir / REPORT_NAME
    report.write_text(render_markdown(results, [p.name for p in charts]), encoding="utf-8")
    return [*charts, report]


def load_results(path: Path) -> dict[str, Any]:
    """Read results.json (or the results.json inside a directory), checking the schema."""
    file = path / "results.json" if path.is_dir() else path
    results = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(results, dict):
        raise ValueError(f"{file}: not a results document (expected a JSON object)")
    schema = results.get("schema")
    if schema != SCHEMA:
        raise ValueError(f"{file}: schema is {schema!r}, this report reads {SCHEMA!r}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.report", description="Re-render report.md and charts from a results.json."
    )
    parser.add_argument("results", type=Path, help="a results directory (holding results.json) or the file itself")
    parser.add_argument("--out", type=Path, help="where to write the report (default: next to results.json)")
    args = parser.parse_args(argv)
    try:
        results = load_results(args.results)
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        print(f"bench.report: {exc}", file=sys.stderr)
        return 2
    out_dir = args.out or (args.results if args.results.is_dir() else args.results.parent)
    for path in write_report(results, out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark harness's smoke run: `python -m bench --quick`, every mode and the memory step, real processes.

Asserts only that each mode was set up as described and served its traffic with the
right status codes (the request mix's 403s where policies are enforced, only 200
elsewhere), and that the memory figures exist: never a timing or a size, since the
machine running the tests is shared.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness import runner

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--mixer-check-cache", "50", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    dirs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(dirs) == 1, f"one results folder expected; stderr:\n{proc.stderr}"
    return proc, dirs[0]


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_quick_run_succeeds_and_writes_the_report(quick_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, run_dir = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (run_dir / "report.md").read_text()
    for mode in runner.MODES:
        assert f"`{mode}`" in report
    for chart in ("latency.png", "cpu.png", "throughput.png"):
        assert (run_dir / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "\u00d7 floor" in report and "## extproc memory: idle and with metric series" in report


def test_every_mode_served_its_load_with_the_mix_statuses(
    quick_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    """Enforcing modes deny the mix's 10 % with 403 (problems() checks the share), the others answer only 200."""
    results = _results(quick_run[1])
    assert [m["mode"] for m in results["modes"]] == list(runner.MODES)
    assert runner.problems(results) == []
    assert results["scenario"]["denied_share"] == 0.1 and results["scenario"]["mix"]["tokens"] == 50
    for m in results["modes"]:
        kinds = [r["kind"] for r in m["runs"]]
        assert kinds == ["fixed", "saturation"], m["mode"]
        enforcing = m["mode"] in ("native", "authz+als", "authz-http", "extproc", "mixer")
        assert (m["expected_denied_share"] > 0) == enforcing, m["mode"]
        for r in m["runs"]:
            assert r["requests"] > 0 and r["errors"] == 0, (m["mode"], r)
            assert set(r["status"]) == ({"200", "403"} if enforcing else {"200"}), (m["mode"], r)


def test_modes_that_enforce_deny_and_the_others_do_not(
    quick_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    """The probes show the policies are really applied in native, authz+als, authz-http, extproc and mixer."""
    by_mode = {m["mode"]: {p["name"]: p["got"] for p in m["probes"]} for m in _results(quick_run[1])["modes"]}
    for mode in ("native", "authz+als", "authz-http", "extproc", "mixer"):
        got = by_mode[mode]
        assert (got["allowed"], got["no token"], got["bad signature"], got["no ALLOW matches"]) == (200, 403, 401, 403)
        assert got["mesh-wide DENY"] == 403 and got["blocked user"] == 403
    for mode in ("none", "noop", "noop-http", "noop-extproc"):
        assert set(by_mode[mode].values()) == {200}
    assert by_mode["mixer"]["allowed via sidecar-2"] == 200


def test_each_mode_runs_the_processes_it_describes(quick_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    results = _results(quick_run[1])
    roles = {
        m["mode"]: sorted(p["role"] for p in m["runs"][0]["processes"] if p["role"] not in ("upstream", "loadgen"))
        for m in results["modes"]
    }
    assert roles == {
        "none": ["envoy"],
        "native": ["envoy"],
        "noop": ["envoy", "extproc"],
        "noop-http": ["envoy", "extproc"],
        "noop-extproc": ["envoy", "extproc"],
        "authz+als": ["envoy", "extproc"],
        "authz-http": ["envoy", "extproc"],
        "extproc": ["envoy", "extproc"],
        "mixer": ["central", "envoy", "envoy", "hop"],
    }
    mixer = next(m for m in results["modes"] if m["mode"] == "mixer")
    central = next(p for p in mixer["processes"] if p["role"] == "central")
    assert "--central" in central["argv"]
    noop_extproc = next(m for m in results["modes"] if m["mode"] == "noop-extproc")
    assert any("bench.harness.noop_extproc" in p["argv"] for p in noop_extproc["processes"])
    noop_http = next(m for m in results["modes"] if m["mode"] == "noop-http")
    assert any("bench.harness.noop_http_authz" in p["argv"] for p in noop_http["processes"])
    authz_http = next(m for m in results["modes"] if m["mode"] == "authz-http")
    assert any("--http-listen" in p["argv"] for p in authz_http["processes"])
    for m in results["modes"]:
        for p in m["processes"]:
            assert p["idle_rss_mib"] > 0, (m["mode"], p)
        for r in m["runs"]:
            for p in r["processes"]:
                if p["role"] in ("envoy", "extproc", "central", "hop"):
                    assert p["cpu_s"] > 0 and p["peak_rss_mib"] > 0, (m["mode"], p)
    assert results["scenario"]["mixer"]["delay_injection"] == [{"ms": 1, "percent_of_streams": 50.0}]


def test_memory_step_made_the_series_and_read_the_resident_set(
    quick_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    memory = _results(quick_run[1])["memory"]
    assert "error" not in memory, memory
    assert memory["series_target"] == 10_000 and memory["series"] >= 10_000
    assert memory["series_counted"] >= 10_000  # the istio_* families on /metrics agree with extproc's gauge
    assert " -m extproc serve " in memory["argv"] and "--metrics-max-series" not in memory["argv"]
    for figure in ("idle_rss_mib", "series_rss_mib", "scraped_rss_mib", "peak_rss_mib"):
        assert memory[figure] > 0, figure

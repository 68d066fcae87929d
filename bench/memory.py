"""The memory step alone: the resident set of `extproc serve`, idle and holding metric series.

    .venv/bin/python -m bench.memory                    # idle, then 10 000 series
    .venv/bin/python -m bench.memory --series 50000 --json

It starts `extproc serve` with its default flags for the benchmark's workload and policies
(bench/harness/scenario.py), reads VmRSS once it is ready, streams access-log entries from
distinct client workloads over gRPC until extproc holds the series asked for, confirms the
count on /metrics, and reads VmRSS again (before and after that scrape). `python -m bench`
runs the same step after its modes and puts it in its report. Nothing is asserted about the
figures; the exit status is 1 only when the step could not run or make its series.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import runner
from bench.harness import scenario as sc


def _line(label: str, mib: float, extra: str = "") -> str:
    """One figure in MiB and in decimal MB, the unit the issue's limits are given in."""
    return f"  {label:<28}{mib:7.1f} MiB  ({mib * 1.048576:.1f} MB){extra}"


def _print(mem: dict[str, Any]) -> None:
    if mem.get("error"):
        print(f"memory step failed: {mem['error']}")
        return
    print(f"extproc serve: {mem['argv']}")
    print(_line("idle:", mem["idle_rss_mib"]))
    print(_line(f"holding {mem['series']} series:", mem["series_rss_mib"], f"  from {mem['peers']} peers"))
    scrape = f"  the scrape was {mem['scrape_bytes'] / 1e6:.1f} MB"
    print(_line("after one /metrics scrape:", mem["scraped_rss_mib"], scrape))
    print(_line("peak (VmHWM):", mem["peak_rss_mib"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--series", type=int, default=10_000, help="metric series to create (default 10000)")
    p.add_argument("--policies", type=int, default=20, help="AuthorizationPolicies loaded (default 20)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON, as results.json keeps them")
    p.add_argument("--logs", type=Path, help="keep extproc's log and the policies here (default: a temporary folder)")
    ns = p.parse_args(argv)
    if ns.series < 1 or ns.policies < 1:
        p.error("--series and --policies must be at least 1")
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        logs = ns.logs or Path(tmp)
        policy_dir = logs / "policies"
        sc.build(ns.policies).write(policy_dir)
        mem = runner.memory_step(policy_dir, logs / "memory", ns.series)
    if ns.json:
        print(json.dumps(mem, indent=2))
    else:
        _print(mem)
    trouble = runner.problems({"modes": [], "memory": mem})
    for t in trouble:
        print(f"problem: {t}", file=sys.stderr)
    return 1 if trouble else 0


if __name__ == "__main__":
    sys.exit(main())

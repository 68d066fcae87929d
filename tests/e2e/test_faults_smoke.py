"""The fault script's restart scenario as a smoke test (about 20 s): extproc SIGKILLed under a
fixed-rate load through a real Envoy, restarted 2 s later.

Asserts what must hold on any machine: no request a DENY covers reached the application, every
answer was the policies' or Envoy's documented failure mode (403 for ext_authz), extproc
served again, and its counters restarted with a new process_start_time_seconds, which is how
Prometheus tells a restarted process from a counter going backwards. The time to serve again
is bounded loosely here (the machine is shared); bench/faults.py reports the measured figure.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import faults

pytestmark = pytest.mark.e2e


def test_sigkill_under_load_fails_closed_and_serves_again(tmp_path: Path) -> None:
    r = faults.scenario_restart(tmp_path, "authz+als", 100.0)
    assert r["misjudged"] == 0 and r["failed"] == 0, r
    assert r["while_down"] and set(r["while_down"]) <= {"deny:403", "other:403"}, r
    assert r["first_200_after_restart_s"] is not None and r["first_200_after_restart_s"] < 5, r
    assert r["wrong_answers_after_first_200"] == 0, r
    assert r["start_time_after"] > r["start_time_before"], r
    assert r["checks_total_when_ready_again"] < r["checks_total_before_kill"], r

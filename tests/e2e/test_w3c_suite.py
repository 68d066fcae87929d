"""The official W3C Trace Context test suite against extproc, in both deployment modes.

    suite harness --> [Envoy: inbound] --> test service --> [Envoy: outbound] --> harness callback
                       extproc (inbound)                     extproc (outbound)

Opt-in: set W3C_TRACE_CONTEXT_SUITE to the `test` folder of a w3c/trace-context checkout (the
suite is not vendored: it is the W3C's, and it needs its harness on port 7777). It runs with
SPEC_LEVEL=2 and STRICT_LEVEL=2, every test the suite has.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import envoy_config as ec
from tests.fixtures import mesh
from tests.fixtures.procs import Proc, free_port, wait_until
from tests.fixtures.stack import ExtprocProcess, tcp_roundtrip

pytestmark = pytest.mark.e2e

SUITE = os.environ.get("W3C_TRACE_CONTEXT_SUITE", "")
HARNESS_PORT = 7777  # fixed by the suite's test.py


@pytest.mark.skipif(not SUITE, reason="W3C_TRACE_CONTEXT_SUITE (w3c/trace-context's test/ folder) is not set")
@pytest.mark.parametrize("mode", ["authz", "extproc"])
def test_the_w3c_trace_context_suite_passes_at_level_2(mode: str, tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    app_port, in_port, out_port = free_port(), free_port(), free_port()
    app = Proc(
        "w3c-service",
        [sys.executable, "-m", "tests.fixtures.w3c_service", str(app_port), str(out_port)],
        tmp_path / "service.log",
    )
    sidecars = [
        ExtprocProcess([tmp_path / "policies"], tmp_path, name=f"extproc-{d}", extra_args=["--direction", d])
        for d in ("inbound", "outbound")
    ]
    envoys: list[ec.EnvoyProcess] = []
    try:
        wait_until(lambda: tcp_roundtrip(app_port, b"GET / HTTP/1.0\r\n\r\n", timeout=1.0) is not None, 20, "service")
        for x, (direction, port, target) in zip(
            sidecars, (("inbound", in_port, app_port), ("outbound", out_port, HARNESS_PORT)), strict=True
        ):
            x.wait_ready()
            if mode == "extproc":
                filters = ec.ext_proc_chain(direction=direction, failure_mode_allow=direction == "outbound")
            else:
                filters = [mesh.ext_authz(direction)]
            admin = free_port()
            clusters = [
                ec.cluster("upstream", "127.0.0.1", target),
                ec.cluster("extproc", "127.0.0.1", x.grpc_port, http2=True),
            ]
            listener = ec.HttpListener(direction, port, filters)
            envoys.append(
                ec.EnvoyProcess(ec.bootstrap(admin, [listener], clusters), tmp_path / direction, admin, direction)
            )
            envoys[-1].wait_ready()
        run = subprocess.run(
            [sys.executable, "test.py", f"http://127.0.0.1:{in_port}/test"],
            cwd=SUITE,
            env={**os.environ, "SPEC_LEVEL": "2", "STRICT_LEVEL": "2"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-6000:]
        assert "skipped" not in run.stderr
    finally:
        for e in envoys:
            e.stop()
        for x in sidecars:
            x.stop()
        app.terminate()

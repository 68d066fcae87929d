"""The official W3C Trace Context test suite against extproc, in both deployment modes.

    suite harness --> [Envoy: inbound] --> test service --> [Envoy: outbound] --> harness callback
                       extproc (inbound)                     extproc (outbound)

A conformance run, not part of the test suite: the suite is the W3C's and is not vendored,
and its harness needs port 7777. Check out w3c/trace-context and point this at its `test/`
folder; it runs every test the suite has with SPEC_LEVEL=2 and STRICT_LEVEL=2, in both modes,
and exits non-zero if any fails:

    .venv/bin/python -m tests.conformance.w3c_trace_context PATH/TO/trace-context/test [--mode authz|extproc]

The rules themselves are covered by the test suite's own cases (tests/unit/test_tracing_context.py
and tests/e2e/test_tracing_e2e.py), which need no checkout.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.fixtures import envoy_config as ec
from tests.fixtures import mesh
from tests.fixtures.procs import Proc, free_port, wait_until
from tests.fixtures.stack import ExtprocProcess, tcp_roundtrip

HARNESS_PORT = 7777  # fixed by the suite's test.py


def run_suite(suite: str, mode: str, tmp_path: Path) -> int:
    """Run the suite through one mode's sidecars; the suite's exit status."""
    (tmp_path / "policies").mkdir()
    app_port, in_port, out_port = free_port(), free_port(), free_port()
    app = Proc(
        "w3c-service",
        [sys.executable, "-m", "tests.conformance.w3c_service", str(app_port), str(out_port)],
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
            cwd=suite,
            env={**os.environ, "SPEC_LEVEL": "2", "STRICT_LEVEL": "2"},
            timeout=300,
        )
        return run.returncode
    finally:
        for e in envoys:
            e.stop()
        for x in sidecars:
            x.stop()
        app.terminate()


def main() -> None:
    p = argparse.ArgumentParser(description="Run the W3C Trace Context suite against extproc at Level 2.")
    p.add_argument("suite", help="the test/ folder of a w3c/trace-context checkout")
    p.add_argument("--mode", choices=["authz", "extproc"], action="append", help="default: both")
    args = p.parse_args()
    failed = []
    for mode in args.mode or ["authz", "extproc"]:
        print(f"== mode {mode}", flush=True)
        with tempfile.TemporaryDirectory() as d:
            if run_suite(args.suite, mode, Path(d)) != 0:
                failed.append(mode)
    if failed:
        sys.exit(f"the suite failed in: {', '.join(failed)}")


if __name__ == "__main__":
    main()

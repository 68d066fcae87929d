"""The Prometheus fixture against the real Prometheus server and promtool from scripts/setup."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.fixtures.procs import free_port
from tests.fixtures.prometheus import PrometheusServer, promtool_check_metrics

pytestmark = pytest.mark.e2e

EXPOSITION = """\
# HELP demo_requests_total Requests served.
# TYPE demo_requests_total counter
demo_requests_total{code="200"} 7
"""


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/metrics":
            self.send_error(404)
            return
        body = EXPOSITION.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def exporter() -> Iterator[str]:
    """A static /metrics endpoint; yields its "host:port"."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_prometheus_scrapes_the_exporter(tmp_path: Path, exporter: str) -> None:
    with PrometheusServer(tmp_path, {"demo": exporter}) as prom:
        prom.wait_scraped("demo")
        assert prom.targets_up() == {"demo": "up"}
        assert prom.wait_for_value("sum(demo_requests_total)", 7) == 7.0
        result = prom.query("demo_requests_total")
        assert len(result) == 1
        assert result[0]["metric"] == {
            "__name__": "demo_requests_total",
            "code": "200",
            "instance": exporter,
            "job": "demo",
        }
        assert prom.scalar('up{job="demo"}') == 1.0
        assert prom.scalar("demo_missing_total") is None
        assert prom.scalar("1 + 2") == 3.0
        with pytest.raises(RuntimeError, match="bad_data"):
            prom.query("sum(")
        with pytest.raises(AssertionError, match="did not reach 8"):
            prom.wait_for_value("sum(demo_requests_total)", 8, timeout=1)
    assert not prom.proc.alive()


def test_prometheus_reports_a_down_target(tmp_path: Path) -> None:
    with PrometheusServer(tmp_path, {"nothing": f"127.0.0.1:{free_port()}"}) as prom:
        # Targets are discovered about 5s after /-/ready; until then there are none at all.
        assert prom.wait_for_value('up{job="nothing"}', 0) == 0.0
        assert prom.targets_up() == {"nothing": "down"}
        with pytest.raises(AssertionError, match="successful scrape of job 'nothing'"):
            prom.wait_scraped("nothing", timeout=2)


def test_promtool_accepts_a_clean_exposition() -> None:
    assert promtool_check_metrics(EXPOSITION) == (0, "")


def test_promtool_reports_lint_problems() -> None:
    code, out = promtool_check_metrics("# TYPE foo counter\nfoo 1\n")
    assert code == 3
    assert out.splitlines() == ['foo counter metrics should have "_total" suffix', "foo no help text"]

    code, out = promtool_check_metrics("demo_requests_total 7\n")
    assert code == 3
    assert out.splitlines() == ["demo_requests_total no help text"]


def test_promtool_reports_parse_errors() -> None:
    code, out = promtool_check_metrics("garbage{ 1\n")
    assert code == 1
    assert "error while linting: text format parsing error in line 1" in out

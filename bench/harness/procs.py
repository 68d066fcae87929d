"""Child processes of a benchmark run, and what each one cost, read from /proc.

CPU is ``utime + stime`` of the process (all its threads) from ``/proc/<pid>/stat``;
peak memory is ``VmHWM`` from ``/proc/<pid>/status``, the resident high-water mark since
the process started, and the resident set at one moment (idle, once a server is ready and
before any request) is ``VmRSS`` from the same file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name is in parentheses and may contain spaces: split after it.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14 and 15)


def _status_mib(pid: int, field: str) -> float:
    """A memory line of /proc/<pid>/status (kB there), in MiB; 0 when the kernel does not report it."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def peak_rss_mib(pid: int) -> float:
    return _status_mib(pid, "VmHWM")


def rss_mib(pid: int) -> float:
    return _status_mib(pid, "VmRSS")


class ProcessFailed(RuntimeError):
    pass


@dataclass
class Usage:
    name: str
    role: str
    cpu_s: float
    peak_rss_mib: float


class Process:
    """One child: started with its output in a log file, stopped with SIGTERM then SIGKILL."""

    def __init__(self, name: str, role: str, argv: Sequence[str], log_dir: Path, cwd: Path | None = None) -> None:
        self.name = name
        self.role = role
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd, start_new_session=True
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise ProcessFailed(f"{self.name} exited (code {code}); last log lines:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_mib(self) -> float:
        return rss_mib(self.pid)

    def usage_since(self, cpu_before: float) -> Usage:
        return Usage(self.name, self.role, self.cpu_seconds() - cpu_before, peak_rss_mib(self.pid))

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def wait_until(what: str, ready: Callable[[], bool], procs: Sequence[Process], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            p.check_alive()
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise ProcessFailed(f"{what} not ready after {timeout:.0f}s")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def listening(address: int | str) -> bool:
    """Whether something accepts connections on a port of 127.0.0.1 or on "unix:PATH"."""
    if isinstance(address, int):
        return tcp_open(address)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(0.5)
        return s.connect_ex(address.removeprefix("unix:")) == 0


def tcp_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0

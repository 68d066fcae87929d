"""py-spy profiles of the Python servers while a mode is under load.

`python -m bench --profile` records every Python server of a mode (extproc, the central
server, the empty baselines) with py-spy during the saturation run, and writes next to the
mode's logs:

* ``profile-<process>.txt``: the functions with the most samples, by own time (the frame
  that was running) and by inclusive time (anywhere on the stack), with their share of all
  samples; this is what a closing note quotes;
* ``profile-<process>.collapsed``: every sampled stack in the collapsed format (one line per
  stack and its count), which https://www.speedscope.app and flamegraph.pl read.

Python-only sampling is non-blocking (py-spy does not pause the process per sample), so the
profiled run's throughput stays close to an unprofiled one; `--profile=native` pauses the
process for each sample, as unwinding C frames needs. Either way the figures of a profiled
run are marked as such in results.json and are not the ones to quote for speed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

RATE_HZ = 250


def available() -> str | None:
    """The py-spy executable (installed with the `bench` extra next to this Python), or None."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


@dataclass
class Recording:
    name: str
    raw: Path
    proc: subprocess.Popen[bytes]

    def finish(self, timeout_s: float) -> Path | None:
        """Wait for py-spy, then write the summary; its path, or None when py-spy failed."""
        try:
            ok = self.proc.wait(timeout_s) == 0
        except subprocess.TimeoutExpired:
            self.proc.kill()
            ok = False
        if not ok or not self.raw.exists():
            return None
        out = self.raw.with_name(f"profile-{self.name}.txt")
        out.write_text(summarize(self.raw.read_text()))
        return out


def record(exe: str, pid: int, name: str, workdir: Path, duration_s: float, native: bool = False) -> Recording:
    """Start py-spy on `pid` for `duration_s`, writing collapsed stacks."""
    raw = workdir / f"profile-{name}.collapsed"
    base = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(duration_s))), "--rate", str(RATE_HZ)]
    # py-spy can unwind C frames only while the process is paused for each sample.
    base += ["--native"] if native else ["--nonblocking"]
    log = open(workdir / f"profile-{name}.log", "wb")  # noqa: SIM115 - handed to the child, closed with it
    proc = subprocess.Popen([*base, "--format", "raw", "--output", str(raw)], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return Recording(name, raw, proc)


def _frame_name(frame: str) -> str:
    """`handler (extproc/services/authz.py:123)` -> `handler (extproc/services/authz.py)`: lines merged."""
    if frame.endswith(")") and "(" in frame:
        head, _, where = frame[:-1].rpartition("(")
        path, sep, line = where.rpartition(":")
        if sep and line.isdigit():
            return f"{head}({path})"
    return frame


def summarize(collapsed: str, top: int = 30) -> str:
    """Own and inclusive sample counts per function from py-spy's collapsed (`raw`) output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame_name(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    if not total:
        return "no samples\n"
    lines = [f"{total} samples", "", f"top {top} by own samples (the function that was running):"]
    lines += [f"  {100.0 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["", f"top {top} by inclusive samples (anywhere on the stack):"]
    lines += [f"  {100.0 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"

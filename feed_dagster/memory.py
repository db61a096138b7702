"""Memory of this process: current and peak resident set size, and a step's own peak.

Linux keeps a high-water mark of each process's RSS (VmHWM in /proc/self/status), and lets
a process restart it at the current RSS (writing 5 to /proc/self/clear_refs): a step that
runs in a long-lived process can so report its own peak rather than the process's
lifetime peak.

A child process reports its own peak (see models.train's two-tower process): the kernel's
`RUSAGE_CHILDREN` maximum is no measure of it, since a child started by fork and exec
inherits its parent's high-water mark at the fork (a child that never passed 30 MiB
reports a 3 GiB parent's peak).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024


def _status_mib(key: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_mib() -> float:
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """This process's peak RSS since it started or since the last `reset_peak_rss`."""
    return _status_mib("VmHWM")


def reset_peak_rss() -> None:
    """Restart this process's RSS high-water mark at its current RSS (Linux; else a no-op)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


@dataclass
class StepMemory:
    """Peak RSS and wall time of a block: `with StepMemory() as m: ...`, or
    `m = StepMemory().start()` ... `m.stop()`; then `m.metadata()`."""

    started: float = field(default=0.0, init=False)
    seconds: float = field(default=0.0, init=False)
    peak_mib: float = field(default=0.0, init=False)

    def start(self) -> StepMemory:
        reset_peak_rss()
        self.started = time.perf_counter()
        return self

    def stop(self) -> StepMemory:
        self.seconds = time.perf_counter() - self.started
        self.peak_mib = peak_rss_mib()
        return self

    def __enter__(self) -> StepMemory:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def metadata(self) -> dict[str, float]:
        return {
            "peak_rss_mib": round(self.peak_mib, 1),
            "step_seconds": round(self.seconds, 2),
        }

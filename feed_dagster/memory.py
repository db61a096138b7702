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

import contextlib
import ctypes
import time
from collections.abc import Iterator
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


# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks from this size up get mappings of their own, which free() returns to the system.
SMALL_HEAP_BLOCK = 128 * 1024
# glibc's own highest mmap threshold (64-bit), and its trim threshold there: where a
# process that has freed a large block ends up.
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )


@contextlib.contextmanager
def small_heap() -> Iterator[bool]:
    """Within the block, malloc gives freed blocks from 128 KiB up back to the system;
    yields whether it applied (glibc: True).

    glibc raises its mmap threshold to the size of each mapped block freed, up to 32 MiB:
    after the first large temporaries, numpy and scipy arrays of up to 32 MiB come from the
    heap, whose freed pieces the process keeps. Repeated fits then climb: trained_models'
    preparation at 100k users went 5.45, 5.68, 5.93, 6.17 GiB over three classic-peer fits,
    of which one is held at a time, and 5.30, 5.43, 5.37, 5.26 GiB in this block
    (docs/SCALING.md).

    For numpy work on large arrays only: training in such a block ran 2.3x slower (every
    mid-sized tensor a fresh mapping). After it, the thresholds are glibc's highest, where
    they would have risen to."""
    applied = _mallopt(SMALL_HEAP_BLOCK, SMALL_HEAP_BLOCK)
    try:
        yield applied
    finally:
        if applied:
            _mallopt(_MMAP_THRESHOLD_MAX, 2 * _MMAP_THRESHOLD_MAX)


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

"""The worker processes of `feed-dagster run`: which tasks share a process, and the
allocator setting each worker starts with."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from feed_dagster.cli import build
from feed_dagster.progress import PlainProgress


def worker_pid(label: str, which: str, key: str | None, log_level: str, root: Path) -> str:
    """A task that reports the process it ran in."""
    return str(os.getpid())


@pytest.mark.parametrize(("tasks_per_process", "processes"), [(1, 4), (None, 2)])
def test_shard_tasks_share_the_workers_when_allowed(tmp_path, tasks_per_process, processes):
    tasks = [(f"user_feeds shard {k}", "shard", str(k)) for k in range(4)]
    pids = build._in_worker_processes(
        "WARNING",
        PlainProgress(),
        tmp_path,
        tasks,
        workers=2,
        tasks_per_process=tasks_per_process,
        run_task=worker_pid,
    )
    assert len(pids) == 4 and str(os.getpid()) not in pids
    assert len(set(pids)) == processes


def test_large_blocks_go_back_to_the_system_when_freed():
    """After a large array is freed, glibc's default threshold keeps the next arrays of
    8 MiB on its heap, and freeing them leaves their pages with the process;
    map_large_blocks maps them on their own, so they go back when freed."""
    if not Path("/proc/self/status").exists():
        pytest.skip("reads RSS from /proc")
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        from feed_dagster.memory import map_large_blocks, rss_mib
        if sys.argv[1] == "mapped":
            map_large_blocks()
        big = np.ones(16 << 20, np.uint8)  # freed: glibc's threshold rises to 16 MiB
        del big
        before = rss_mib()
        blocks = [np.ones(8 << 20, np.uint8) for _ in range(32)]  # 256 MiB
        del blocks[:-1]  # keep the last, so the heap cannot shrink from its top
        print(rss_mib() - before)
        """
    )

    def kept_mib(mode: str) -> float:
        out = subprocess.run(
            [sys.executable, "-c", code, mode], capture_output=True, text=True, check=True
        )
        return float(out.stdout.strip())

    assert kept_mib("default") > 200
    assert kept_mib("mapped") < 32

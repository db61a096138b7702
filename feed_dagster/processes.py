"""Worker processes that do not outlive the process that started them.

`feed-dagster run` builds its phases and shards in pools of spawned processes, and the
models step trains the two-tower in one. A pool shuts its workers down when its owner
exits normally or raises; a SIGKILL (the kernel's out-of-memory killer, a CI timeout, `kill
-9`) gives the owner no such chance, and its workers would go on computing, holding
gigabytes and the warehouse's write lock, for a build nobody waits for.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when its parent ends (Linux; elsewhere a no-op).

    Meant as a pool's `initializer`, with the pool owner's pid: a parent that died before
    the call (this process then belongs to another) ends this one at once.

    The kernel's notion of parent is the thread that started this process. Pools start
    workers from their owner's thread or their manager thread, both of which outlive
    every worker they started."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:
        os._exit(1)

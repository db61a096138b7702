"""small_heap: freed arrays go back to the system within the block, and only there."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A child that frees a 16 MiB array (glibc then raises its mmap threshold past 8 MiB), then
# makes 48 arrays of 8 MiB and frees all but the last, outside any small_heap block, inside
# one, or after one: its RSS growth in MiB on stdout.
CHURN = """
import contextlib
import sys

import numpy as np

from feed_dagster.memory import rss_mib, small_heap


def churn():
    big = np.ones(2**21)
    del big
    before = rss_mib()
    arrays = [np.ones(2**20) for _ in range(48)]
    del arrays[:-1]
    return round(rss_mib() - before)


where = sys.argv[1]
if where == "after":
    with small_heap():
        pass
with small_heap() if where == "inside" else contextlib.nullcontext() as applied:
    assert applied in (True, None)
    print(churn())
"""


def _growth_mib(where: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHURN, where], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_arrays_leave_the_process_within_a_small_heap_block_only():
    # Outside, the 47 freed arrays stay in the heap below the last one (the climb that
    # trained_models' preparation showed); inside, each had a mapping of its own; after,
    # mid-sized blocks come from the heap again, as training needs for its speed.
    assert _growth_mib("outside") > 256
    assert _growth_mib("inside") < 32
    assert _growth_mib("after") > 256

"""Pool workers end when the process that started them is killed (feed_dagster.processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")

# A pool owner as feed-dagster run's: a spawned worker that records its pid and then
# works for a minute. With `die_with_parent` as the pool's initializer unless told not to.
OWNER = """
import os, sys, time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from feed_dagster.processes import die_with_parent

def work(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)

if __name__ == "__main__":
    kwargs = {}
    if sys.argv[2] == "guarded":
        kwargs = {"initializer": die_with_parent, "initargs": (os.getpid(),)}
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), **kwargs) as pool:
        pool.submit(work, sys.argv[1]).result()
"""


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def worker_after_owner_killed(tmp_path: Path, mode: str) -> int:
    """Start an owner, wait for its worker, SIGKILL the owner; the worker's pid."""
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    pid_file = tmp_path / f"worker-{mode}.pid"
    owner = subprocess.Popen([sys.executable, str(script), str(pid_file), mode])
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()):
            assert owner.poll() is None, "the pool owner ended before its worker started"
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        assert alive(worker)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    return worker


def test_a_worker_ends_when_its_pool_owner_is_killed(tmp_path: Path) -> None:
    worker = worker_after_owner_killed(tmp_path, "guarded")
    deadline = time.monotonic() + 10
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(worker), "the worker outlived its killed pool owner"


def test_without_it_the_worker_outlives_its_owner(tmp_path: Path) -> None:
    """What the guard prevents: the same pool without it leaves its worker running."""
    worker = worker_after_owner_killed(tmp_path, "plain")
    try:
        time.sleep(1.0)
        assert alive(worker)
    finally:
        os.kill(worker, signal.SIGKILL)


@pytest.mark.parametrize(("parent", "code"), [("1", 1), ("os.getppid()", 0)])
def test_a_worker_whose_owner_is_already_gone_exits_at_once(parent: str, code: int) -> None:
    """This test process is the child's parent: pid 1 stands for an owner that is gone, and
    the child then exits before it does anything else."""
    program = "import os; from feed_dagster.processes import die_with_parent; "
    program += f"die_with_parent({parent}); print('ran')"
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert done.returncode == code
    assert ("ran" in done.stdout) == (code == 0)

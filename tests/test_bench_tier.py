"""bench/bench_tier.py: it finds the run's phases in the CLI's own lines, sums the RSS of a
whole process tree, and kills the tree past its limit."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_tier import PHASE_START, TreeSampler, tree_memory_mib  # noqa: E402

from feed_dagster.progress import PlainProgress

# A child that starts a grandchild holding `mib` MiB, then waits for it.
HOLDER = """
import subprocess, sys, time
if sys.argv[1] == "child":
    grandchild = subprocess.Popen([sys.executable, __file__, "grandchild", sys.argv[2]])
    grandchild.wait()
else:
    block = bytearray(int(sys.argv[2]) * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1  # touched: resident, not just reserved
    print("held", flush=True)
    time.sleep(60)
"""


def phases_of(lines: list[str]) -> list[str]:
    found = []
    for line in lines:
        match = PHASE_START.match(line.rstrip())
        if match:
            found.append(match["phase"] or match["shards"])
    return found


def test_the_phases_are_read_from_the_lines_feed_dagster_run_prints() -> None:
    out = io.StringIO()
    progress = PlainProgress(out=out, heartbeat=0)
    progress.phase_started("sources", "generate or load the world, check its tables")
    progress.step_message("sources", "source_tables", "loading source synthetic:m (seed 0)")
    progress.phase_finished("sources", "- sources: built users, articles in 3.0s")
    progress.phase_started("models and vectors", "training takes a few minutes")
    progress.shards_started(16, 2)
    progress.shard_finished("user_feeds shard 0", "- user_feeds shard 0: built user_feeds", 1, 16)
    progress.phase_started("publish")
    progress.close()
    lines = out.getvalue().splitlines()
    assert phases_of(lines) == ["sources", "models and vectors", "user_feeds", "publish"]


def start_holder(tmp_path: Path, mib: int) -> subprocess.Popen[str]:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    child = subprocess.Popen(
        [sys.executable, str(script), "child", str(mib)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "held"
    return child


def test_the_tree_rss_counts_the_grandchildren(tmp_path: Path) -> None:
    child = start_holder(tmp_path, 300)
    try:
        own = float(Path(f"/proc/{child.pid}/status").read_text().split("VmRSS:")[1].split()[0])
        assert own / 1024 < 100  # the child itself holds little
        pss, rss = tree_memory_mib(child.pid)
        assert pss > 300 and rss > 300
    finally:
        child.kill()
        subprocess.run(["pkill", "-KILL", "-s", str(child.pid)], check=False)
        child.wait()


# A parent and a child mapping the same file and reading every page of it.
SHARER = """
import mmap, os, sys, time
with open(sys.argv[1], "rb") as f:
    pages = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
total = sum(pages[i] for i in range(0, len(pages), 4096))  # resident, shared
if len(sys.argv) == 2:
    r, w = os.pipe()
    os.set_inheritable(w, True)
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, __file__, sys.argv[1], "child", str(w)])
    os.close(w)
    if os.read(r, 1) != b"x":
        sys.exit("the child did not map the file")
    print("shared", flush=True)
else:
    os.write(int(sys.argv[3]), b"x")
time.sleep(60)
"""


def test_pages_two_processes_map_count_once_in_the_tree_pss(tmp_path: Path) -> None:
    data = tmp_path / "shared.bin"
    data.write_bytes(b"\1" * (200 * 1024 * 1024))
    script = tmp_path / "sharer.py"
    script.write_text(SHARER)
    parent = subprocess.Popen(
        [sys.executable, str(script), str(data)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "shared"
        pss, rss = tree_memory_mib(parent.pid)
        assert rss > 400  # the 200 MiB once in each process's RSS
        assert 200 <= pss < 300  # once in the tree's
    finally:
        subprocess.run(["pkill", "-KILL", "-s", str(parent.pid)], check=False)
        parent.wait()
        data.unlink()


def test_the_sampler_kills_the_whole_tree_past_its_limit(tmp_path: Path) -> None:
    child = start_holder(tmp_path, 300)
    sampler = TreeSampler(child.pid, interval=0.1, limit_mib=200)
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert sampler.killed_at_mib is not None and sampler.killed_at_mib > 200
    assert child.wait(timeout=10) != 0
    deadline = time.monotonic() + 10
    while (
        time.monotonic() < deadline
        and subprocess.run(["pgrep", "-s", str(child.pid)], capture_output=True).stdout.strip()
    ):
        time.sleep(0.1)
    assert not subprocess.run(["pgrep", "-s", str(child.pid)], capture_output=True).stdout.strip()
    assert sampler.peak_mib > 200 and sampler.phase_peaks["start"] == sampler.peak_mib

"""The whole `feed-dagster run` at a world tier, from an empty data root: wall time and peak
memory of the whole process tree, per phase and per step, against the tier's targets.

    .venv/bin/python bench/bench_tier.py --tier m          # ~1 h on 2 cores
    .venv/bin/python bench/bench_tier.py --tier tiny --no-write
    .venv/bin/python bench/bench_tier.py --tier l --no-write --stop-after-shards 4

The run is the README's `feed-dagster run` in a child process (FEED_DAGSTER_SOURCE=
synthetic:<tier>, a fresh FEED_DAGSTER_DATA and DAGSTER_HOME). Every second the memory of
the child and all its descendants is summed from /proc: the tree's peak is the issue's
measure, since the run's phases, shard workers and the two-tower's trainer are processes
of their own. What is summed is each process's PSS (proportional set size), which splits
a page that several processes map between them, so the tree counts it once. The shards of
a refresh map the same stored inputs and peers (metrics.fit_store): summed RSS counts
those pages once per shard (two `l` shards held 15.96 GiB between them and summed 22.5
GiB of RSS). Summed RSS is reported beside it. Sampling misses spikes shorter than the
interval; each step also reports its own process's high-water mark (`peak_rss_mib`
metadata), read back from the run's Dagster instance with the steps' start and end
times. `--limit-gib` kills the tree past a limit (of summed PSS) rather than letting the
kernel pick a victim on a shared machine.

Writes the section `tier-<tier>` of docs/SCALING.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import machine, markdown_table, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCALING = ROOT / "docs" / "SCALING.md"
# (peak GiB of the tree's summed PSS, minutes) each tier must stay within (docs/SCALING.md).
TARGETS = {"m": (8.0, 30.0), "l": (20.0, 180.0)}
# `feed-dagster run` starts each phase with "- <phase> (...) ..." or "- user_feeds: ...".
PHASE_START = re.compile(r"^- (?P<phase>[^:(]+?)(?: \(.*\))? \.\.\.$|^- (?P<shards>user_feeds): ")
# ... and counts its shards as they end.
SHARDS_DONE = re.compile(r"^\s+(?P<done>\d+)/\d+ shards done$")


def tree_memory_mib(root_pid: int) -> tuple[float, float]:
    """(summed PSS, summed RSS) in MiB of `root_pid` and every descendant, from /proc (RSS
    for both where a process's smaps_rollup cannot be read)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields follow the last ")".
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    pss = rss = 0.0
    todo = [root_pid]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        own = _memory_kib(pid)
        if own is not None:
            pss += own[0] / 1024
            rss += own[1] / 1024
    return pss, rss


def _memory_kib(pid: int) -> tuple[int, int] | None:
    """(PSS, RSS) of one process in KiB; None when it has ended."""
    try:
        fields = dict(
            line.split()[:2]
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
        )
        return int(fields["Pss:"]), int(fields["Rss:"])
    except (OSError, KeyError, ValueError):
        pass
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                kib = int(line.split()[1])
                return kib, kib
    except OSError:
        pass
    return None  # ended between the scan and the read


@dataclass
class TreeSampler:
    """Samples the tree's memory every `interval` s, keeping the peak per phase: summed PSS
    (`peak_mib`, what `limit_mib` applies to) and summed RSS (`peak_rss_mib`)."""

    pid: int
    interval: float
    limit_mib: float | None
    phase: str = "start"
    peak_mib: float = 0.0
    peak_rss_mib: float = 0.0
    phase_peaks: dict[str, float] = field(default_factory=dict)
    killed_at_mib: float | None = None

    def run(self) -> None:
        while True:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            mib, rss = tree_memory_mib(self.pid)
            self.peak_mib = max(self.peak_mib, mib)
            self.peak_rss_mib = max(self.peak_rss_mib, rss)
            self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0.0), mib)
            if self.limit_mib is not None and mib > self.limit_mib:
                self.killed_at_mib = mib
                os.killpg(self.pid, signal.SIGKILL)
                return
            time.sleep(self.interval)


@dataclass
class StepFigures:
    step: str
    runs: int
    seconds: list[float]
    peak_mib: float | None


def step_figures(home: Path) -> list[StepFigures]:
    """Each step of the run's Dagster runs (shards pooled into one row): how many ran, their
    wall times and the highest `peak_rss_mib` their materialisations reported."""
    os.environ["DAGSTER_HOME"] = str(home)
    import dagster as dg

    instance = dg.DagsterInstance.get()
    seconds: dict[str, list[float]] = {}
    peaks: dict[str, float] = {}
    order: list[str] = []
    for run in reversed(instance.get_runs()):  # oldest first
        for stat in instance.get_run_step_stats(run.run_id):
            if stat.start_time is None or stat.end_time is None:
                continue
            if stat.step_key not in seconds:
                order.append(stat.step_key)
            seconds.setdefault(stat.step_key, []).append(stat.end_time - stat.start_time)
        records = instance.get_records_for_run(
            run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
        ).records
        for record in records:
            entry = record.event_log_entry
            meta = entry.asset_materialization.metadata if entry.asset_materialization else {}
            peak = meta.get("peak_rss_mib")
            if peak is not None and entry.step_key:
                peaks[entry.step_key] = max(peaks.get(entry.step_key, 0.0), float(peak.value))
    return [StepFigures(k, len(seconds[k]), seconds[k], peaks.get(k)) for k in order]


def gib(mib: float | None) -> str:
    return "" if mib is None else f"{mib / 1024:.2f} GiB"


def minutes(s: float) -> str:
    return f"{s:,.0f} s ({s / 60:.1f} min)"


def report(
    tier: str,
    wall: float,
    sampler: TreeSampler,
    phase_seconds: dict[str, float],
    steps: list[StepFigures],
    commit: str,
    load: tuple[float, float],
    ok: bool,
    stopped_after: int | None = None,
) -> str:
    target = TARGETS.get(tier)
    lines = [
        f"`bench/bench_tier.py --tier {tier}` at `{commit}` ({machine()}; load average "
        f"{load[0]:.1f} before, {load[1]:.1f} after): `FEED_DAGSTER_SOURCE=synthetic:{tier} "
        f"feed-dagster run` from an empty data root, the process tree's memory summed every "
        f"{sampler.interval:g} s (PSS: a page mapped by several processes counted once; "
        f"summed RSS, which counts it in each, peaked at {gib(sampler.peak_rss_mib)}).",
        "",
    ]
    verdict = "finished" if ok else "FAILED"
    if stopped_after is not None:
        shards = "shard" if stopped_after == 1 else "shards"
        verdict = f"stopped after {stopped_after} {shards} (--stop-after-shards): not the whole run"
        target = None
    if sampler.killed_at_mib is not None:
        verdict = f"killed at {gib(sampler.killed_at_mib)} (over --limit-gib)"
    head = f"**The run: {minutes(wall)}, peak {gib(sampler.peak_mib)} (tree), {verdict}.**"
    if target is not None:
        fits = sampler.peak_mib / 1024 <= target[0]
        fast = wall / 60 <= target[1]
        head += (
            f" Targets {target[0]:g} GiB / {target[1]:g} min: memory "
            f"{'met' if fits else 'not met'}, time {'met' if fast else 'not met'}."
        )
    lines += [head, ""]
    lines.append(
        markdown_table(
            ["phase", "wall time", "peak PSS (tree)"],
            [
                [p, minutes(phase_seconds.get(p, 0.0)), gib(sampler.phase_peaks.get(p))]
                for p in phase_seconds
            ],
        )
    )
    lines.append("")
    rows = []
    for s in steps:
        if s.runs > 1:
            t = (
                f"{s.runs} runs: median {statistics.median(s.seconds):,.0f} s, "
                f"{min(s.seconds):,.0f}-{max(s.seconds):,.0f} s"
            )
        else:
            t = f"{s.seconds[0]:,.1f} s"
        rows.append([s.step, t, gib(s.peak_mib)])
    lines.append(markdown_table(["step", "wall time", "peak RSS (the step's process)"], rows))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", default="m", help="tiny, demo, m or l")
    parser.add_argument("--interval", type=float, default=1.0, help="memory sampling, seconds")
    parser.add_argument("--limit-gib", type=float, default=None, help="kill the run past this")
    parser.add_argument("--keep", type=Path, default=None, help="data root to keep (default: temp)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--stop-after-shards",
        type=int,
        default=None,
        help="stop the run once this many shards are done (0: as the shards start); for "
        "tiers whose whole run outlasts a sitting, the steps before the shards measured "
        "in one run",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix=f"bench-tier-{args.tier}-") as tmp:
        data = args.keep or Path(tmp) / "data"
        if data.exists() and any(data.iterdir()):
            raise SystemExit(f"{data} is not empty: the run must start from an empty data root")
        home = Path(tmp) / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        env = {
            **os.environ,
            "FEED_DAGSTER_SOURCE": f"synthetic:{args.tier}",
            "FEED_DAGSTER_DATA": str(data),
            "DAGSTER_HOME": str(home),
            "PYTHONUNBUFFERED": "1",
        }
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-m", "feed_dagster.cli", "run"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # one process group: --limit-gib kills all of it
        )
        limit = args.limit_gib * 1024 if args.limit_gib else None
        sampler = TreeSampler(child.pid, args.interval, limit)
        thread = threading.Thread(target=sampler.run, daemon=True)
        thread.start()
        phase_seconds: dict[str, float] = {}
        phase_t0 = t0
        stopped = False
        try:
            assert child.stdout is not None
            for line in child.stdout:
                print(f"[{time.perf_counter() - t0:7.0f}s] {line}", end="", flush=True)
                match = PHASE_START.match(line.rstrip())
                if match:
                    now = time.perf_counter()
                    phase_seconds[sampler.phase] = now - phase_t0
                    sampler.phase = match["phase"] or match["shards"]
                    phase_t0 = now
                if args.stop_after_shards is not None and sampler.phase == "user_feeds":
                    done = SHARDS_DONE.match(line.rstrip())
                    if (done and int(done["done"]) >= args.stop_after_shards) or (
                        match and args.stop_after_shards == 0
                    ):
                        stopped = True
                        os.killpg(child.pid, signal.SIGKILL)
                        break
            code = child.wait()
        except KeyboardInterrupt:
            os.killpg(child.pid, signal.SIGKILL)
            raise
        wall = time.perf_counter() - t0
        phase_seconds[sampler.phase] = time.perf_counter() - phase_t0
        phase_seconds.pop("start", None)
        thread.join()
        body = report(
            args.tier,
            wall,
            sampler,
            phase_seconds,
            step_figures(home),
            commit,
            (load_before, os.getloadavg()[0]),
            code == 0,
            args.stop_after_shards if stopped else None,
        )
        print("\n" + body)
        if not args.no_write:
            write_section(f"tier-{args.tier}", body, doc=SCALING)
        if code != 0 and not stopped:
            raise SystemExit(f"feed-dagster run exited with {code}")


if __name__ == "__main__":
    main()

"""Start-up of a run's step processes: Dagster's default (each step's process spawned, so it
imports torch, polars and the project again) against the project's default (each forked
from a server that imported them once per run), measured in the same run.

    .venv/bin/python bench/bench_step_startup.py               # 3 runs of each, interleaved
    .venv/bin/python bench/bench_step_startup.py --repeats 1 --no-write

Each run is `dagster asset materialize` of the tiny world's upstream steps (the source, its
checks, follow_graph, article_embeddings, impressions_evaluation: five steps, two of them
side by side) in a fresh DAGSTER_HOME and data folder, with FEED_DAGSTER_EXECUTOR=spawn or
multiprocess. A step's start-up is the time from the executor's STEP_WORKER_STARTING event
to the step process's STEP_WORKER_STARTED, read from the run's event log. The first step
of a preloaded run also waits for the server's imports. Writes the "step-startup" section
of docs/BENCHMARKS.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, markdown_table, write_section  # noqa: E402

from feed_dagster.assets.raw import RAW_TABLES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The source's tables (one step) and the three steps that read only them.
SELECTION = ",".join([*RAW_TABLES, "follow_graph", "article_embeddings", "impressions_evaluation"])
VARIANTS = {
    "spawn": "spawned step processes (Dagster's default)",
    "multiprocess": "forked from a preloaded server (the project's default)",
}


def one_run(executor: str, scratch: Path) -> tuple[float, list[float]]:
    """(wall seconds of the run's command, start-up seconds of each step)."""
    home, data = scratch / "home", scratch / "data"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "FEED_DAGSTER_DATA": str(data),
        "FEED_DAGSTER_SOURCE": "synthetic:tiny",
        "FEED_DAGSTER_EXECUTOR": executor,
    }
    command = [sys.executable, "-m", "dagster", "asset", "materialize"]
    command += ["-m", "feed_dagster.definitions", "--select", SELECTION]
    t = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"{executor} run failed:\n{done.stderr[-3000:]}")
    return wall, step_startups(home)


def step_startups(home: Path) -> list[float]:
    """Seconds from STEP_WORKER_STARTING to STEP_WORKER_STARTED of each step of the run."""
    with dg.DagsterInstance.from_config(str(home)) as instance:
        (run,) = instance.get_runs()
        starting: dict[str, float] = {}
        out = []
        for entry in instance.all_logs(run.run_id):
            event = entry.dagster_event
            if event is None or entry.step_key is None:
                continue
            if event.event_type_value == "STEP_WORKER_STARTING":
                starting[entry.step_key] = entry.timestamp
            elif event.event_type_value == "STEP_WORKER_STARTED":
                out.append(entry.timestamp - starting[entry.step_key])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    load_start = os.getloadavg()[0]
    walls: dict[str, list[float]] = {k: [] for k in VARIANTS}
    firsts: dict[str, list[float]] = {k: [] for k in VARIANTS}
    others: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for r in range(args.repeats):
        # Alternate which goes first, so load drift falls on both alike.
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for executor in order:
            with tempfile.TemporaryDirectory(prefix="bench-step-startup-") as scratch:
                wall, startups = one_run(executor, Path(scratch))
            walls[executor].append(wall)
            firsts[executor].append(startups[0])
            others[executor].extend(startups[1:])
            print(
                f"{executor} run {r + 1}/{args.repeats}: {wall:.1f} s, step start-up "
                + ", ".join(f"{s:.1f}" for s in startups)
                + " s",
                flush=True,
            )
    load_end = os.getloadavg()[0]
    rows = [
        [
            VARIANTS[k],
            f"{statistics.median(walls[k]):.1f} s ({', '.join(f'{w:.1f}' for w in walls[k])})",
            f"{statistics.median(firsts[k]):.1f} s",
            f"{statistics.median(others[k]):.2f} s (n={len(others[k])})",
        ]
        for k in VARIANTS
    ]
    spawn, fork = (statistics.median(others[k]) for k in VARIANTS)
    wall_ratio = statistics.median(walls["spawn"]) / statistics.median(walls["multiprocess"])
    command = " ".join([".venv/bin/python", "bench/bench_step_startup.py", *sys.argv[1:]])
    body = "\n".join(
        [
            "## Step start-up in a run (`bench/bench_step_startup.py`)",
            "",
            f"Command: `{command}`",
            "",
            "`dagster asset materialize` of the tiny world's upstream steps (source, checks, "
            "follow_graph, article_embeddings, impressions_evaluation) in a fresh instance "
            f"and data folder, {args.repeats} runs of each executor, interleaved. Step "
            "start-up: STEP_WORKER_STARTING to STEP_WORKER_STARTED in the run's event log. "
            f"Machine: {machine()}, load average {load_start:.1f} at start, {load_end:.1f} "
            "at the end.",
            "",
            markdown_table(
                [
                    "step processes",
                    "run (median)",
                    "first step's start-up",
                    "later steps' start-up (median)",
                ],
                rows,
            ),
            "",
            f"A later step starts **{spawn / fork:.0f}x** faster forked than spawned; the run "
            f"takes **{wall_ratio:.2f}x** less time. The first step of a preloaded run "
            "waits for the server's imports, which a spawned step pays every time.",
        ]
    )
    print(body)
    if not args.no_write:
        write_section("step-startup", body)


if __name__ == "__main__":
    main()

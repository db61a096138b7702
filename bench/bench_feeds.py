"""Feed precompute throughput: the whole candidate pipeline for every user of a world.

    .venv/bin/python bench/bench_feeds.py                 # demo world, fallback models
    .venv/bin/python bench/bench_feeds.py --scorer my.module:make_scorer

--scorer / --retriever take a built-in name or `module:callable`; the callable gets the
World and returns a Scorer / Retriever, so a learned ranker can be benchmarked the same way.
Writes the "feeds" section of docs/BENCHMARKS.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, markdown_table, peak_rss_mb, write_section  # noqa: E402

from feed_dagster.data.schema import World  # noqa: E402
from feed_dagster.pipeline import (  # noqa: E402
    PopularityRetriever,
    TopicAffinityScorer,
    run_pipeline,
)
from feed_dagster.world import generate_world, world_config  # noqa: E402

SCORERS: dict[str, Callable[[World], object]] = {"topic-affinity": TopicAffinityScorer.from_tables}
RETRIEVERS: dict[str, Callable[[World], object]] = {"popularity": PopularityRetriever.from_tables}


def load(spec: str, builtins: dict[str, Callable[[World], object]]) -> Callable[[World], object]:
    """A built-in factory by name, or `module:callable` taking the World."""
    if spec in builtins:
        return builtins[spec]
    module, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"unknown {spec!r}: use one of {sorted(builtins)} or module:callable")
    target: object = importlib.import_module(module)
    for part in attr.split("."):
        target = getattr(target, part)
    return target  # type: ignore[return-value]


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scale", default="demo")
    ap.add_argument("--scorer", default="topic-affinity")
    ap.add_argument("--retriever", default="popularity")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=0, help="users per run (0: all at once)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    t0 = time.perf_counter()
    world = generate_world(world_config(args.scale))
    gen_s = time.perf_counter() - t0
    retriever = load(args.retriever, RETRIEVERS)(world)
    scorer = load(args.scorer, SCORERS)(world)
    users = world.users["user_id"].to_numpy()
    batch = args.batch_size or len(users)
    batches = [users[i : i + batch] for i in range(0, len(users), batch)]
    rss_before = current_rss_mb()

    totals: list[float] = []
    stage_samples: dict[str, list[float]] = {}
    rows: dict[str, int] = {}
    last_stats: dict = {}
    for repeat in range(args.repeats):
        per_stage: dict[str, float] = {}
        t = time.perf_counter()
        feed_rows = 0
        for part in batches:
            feeds, stats = run_pipeline(world, part, world.now, retriever, scorer)  # type: ignore[arg-type]
            feed_rows += feeds.height
            for name, sec in stats["seconds"].items():
                per_stage[name] = per_stage.get(name, 0.0) + sec
                if repeat == 0:
                    rows[name] = rows.get(name, 0) + stats["rows"][name]
            last_stats = stats
        totals.append(time.perf_counter() - t)
        for name, sec in per_stage.items():
            stage_samples.setdefault(name, []).append(sec)
    total = statistics.median(totals)
    n = len(users)
    peak = peak_rss_mb()

    stage_rows = []
    for name, samples in stage_samples.items():
        sec = statistics.median(samples)
        stage_rows.append(
            [
                f"`{name}`",
                f"{rows[name]:,}",
                f"{sec * 1000:,.0f}",
                f"{sec / total:.0%}",
                f"{n / sec:,.0f}" if sec > 0 else "-",
            ]
        )
    summary = [
        ["world", f"{args.scale}: {n:,} users, {world.articles.height:,} posts"],
        ["retriever / scorer", f"{last_stats['retriever']} / {last_stats['scorer']}"],
        ["batch size", f"{batch:,} users ({len(batches)} run(s) per repeat)"],
        [f"end to end (median of {args.repeats})", f"{total:.2f} s"],
        ["throughput", f"**{n / total:,.0f} users/s**"],
        ["feed rows", f"{feed_rows:,}"],
        ["peak RSS", f"{peak:,.0f} MiB (world + models loaded: {rss_before:,.0f} MiB)"],
        ["world generation", f"{gen_s:.2f} s (not included)"],
        ["machine", f"{machine()}, load average {os.getloadavg()[0]:.1f} at the end"],
    ]
    body = "\n".join(
        [
            "## Feed precompute (`bench/bench_feeds.py`)",
            "",
            f"Command: `{' '.join(['.venv/bin/python', 'bench/bench_feeds.py', *sys.argv[1:]])}`",
            "",
            markdown_table(["", ""], summary),
            "",
            "Per stage (rows out of the stage; time is the median over repeats, summed "
            "over batches):",
            "",
            markdown_table(["stage", "rows", "ms", "share", "users/s"], stage_rows),
            "",
            "The fallback retriever and scorer are table-only stand-ins; pass "
            "`--scorer module:callable` to time a learned ranker through the same pipeline.",
        ]
    )
    print(body)
    if not args.no_write:
        write_section("feeds", body)


if __name__ == "__main__":
    main()

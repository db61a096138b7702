"""Synthetic world generation at a scale (default `m`): wall time, peak memory, table sizes,
and the follow graph's in-degree distribution against SNAP's Wiki-Vote.

    .venv/bin/python bench/bench_world.py [--scale m] [--repeats 1] [--warehouse]

With `--warehouse` the world is written as `source_tables` writes it: streamed into a
DuckDB warehouse in a temporary folder, its largest tables chunk by chunk, never whole in
memory (the only way `l`, 1M users, fits). Without, it is generated whole in memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import machine, markdown_table, peak_rss_mb, write_section  # noqa: E402

from feed_dagster.data.world_tables import write_world  # noqa: E402
from feed_dagster.graph.stats import (  # noqa: E402
    account_stats,
    degree_summary,
    in_degrees,
    read_edge_list,
)
from feed_dagster.world import generate_world, stream_world, world_config  # noqa: E402

WIKI_VOTE = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "wiki_vote" / "wiki-vote.txt.gz"
)


def _into_warehouse(cfg, say) -> tuple[object, dict[str, int], int]:
    """(the world's head, each table's rows, the warehouse file's bytes): the world
    streamed into a DuckDB file that is deleted after."""
    with tempfile.TemporaryDirectory(prefix="bench-world-") as tmp:
        path = Path(tmp) / "warehouse.duckdb"
        stream = stream_world(cfg, progress=say)
        rows = write_world(path, stream, "bench")
        rows.pop("world_info")
        return stream.head, rows, path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", default="m")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--warehouse", action="store_true", help="stream into a DuckDB file, as source_tables"
    )
    args = parser.parse_args()
    cfg = world_config(args.scale)
    t_start = time.perf_counter()

    def say(message: str) -> None:
        print(f"  {time.perf_counter() - t_start:7.1f}s {message}", flush=True)

    times = []
    world = None
    file_bytes = 0
    for _ in range(args.repeats):
        world = None  # free the previous world before timing the next
        t0 = time.perf_counter()
        if args.warehouse:
            world, sizes, file_bytes = _into_warehouse(cfg, say)
        else:
            world = generate_world(cfg, progress=say)
            sizes = {name: df.height for name, df in world.tables().items()}
        times.append(time.perf_counter() - t0)
    peak = peak_rss_mb()
    mode = "streamed into a DuckDB warehouse" if args.warehouse else "generated whole in memory"
    print(
        f"scale {args.scale} ({mode}): median {statistics.median(times):.1f}s over {times}, "
        f"peak RSS {peak:,.0f} MiB"
    )
    for name, n in sizes.items():
        print(f"  {name:<18} {n:>14,}")

    synth = degree_summary(account_stats(world.users, world.follows)["followers"].to_numpy())
    src, dst = read_edge_list(str(WIKI_VOTE))
    real = degree_summary(in_degrees(src, dst))
    keys = [
        "nodes",
        "mean",
        "median",
        "max",
        "max_over_mean",
        "zero_share",
        "top1pct_share",
        "gini",
        "tail_alpha",
        "tail_xmin",
    ]

    def fmt(v: float) -> str:
        return f"{v:,.3f}" if isinstance(v, float) else f"{v:,}"

    deg_table = markdown_table(
        ["in-degree statistic", f"synthetic `{args.scale}`", "Wiki-Vote (SNAP)"],
        [[k, fmt(synth[k]), fmt(real[k])] for k in keys],
    )
    print(deg_table)
    flag = " --warehouse" if args.warehouse else ""
    written = f" The warehouse file: {file_bytes / 2**30:.1f} GiB." if args.warehouse else ""
    body = "\n".join(
        [
            f"## Synthetic world generation (`bench/bench_world.py --scale {args.scale}{flag}`)",
            "",
            f"Machine: {machine()}. The world {mode}. Median of {args.repeats} run(s): "
            f"**{statistics.median(times):.1f} s**, peak RSS **{peak / 1024:.2f} GiB**." + written,
            "",
            markdown_table(["table", "rows"], [[k, f"{v:,}"] for k, v in sizes.items()]),
            "",
            "Follower (in-degree) distribution against the real Wiki-Vote graph. tail_alpha is "
            "the discrete power-law MLE above tail_xmin (the 90th percentile of positive "
            "degrees).",
            "",
            deg_table,
        ]
    )
    write_section(f"world-{args.scale}{'-warehouse' if args.warehouse else ''}", body)


if __name__ == "__main__":
    main()

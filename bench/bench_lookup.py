"""Serving lookups: `get_feed` latency against a serving file of 1M users x 35 rows.

    .venv/bin/python bench/bench_lookup.py            # builds data/bench/lookup/ once
    .venv/bin/python bench/bench_lookup.py --rebuild

The feed rows are generated directly with DuckDB (deterministic hashes, no pipeline run),
written as one Parquet shard and published with the real `publish_feeds`, so the publish
time at this size is measured too. Then it times random-user lookups: `get_feed`
(opens the file per call), `FeedReader` (one connection held open), the bare open + close
of a connection, to show what the per-call open costs, and `FeedReader.page` (the HTTP
service's read) from the generation's lookup file and, for comparison, by a DuckDB query.
Writes the "lookup" section of docs/BENCHMARKS.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import duckdb
import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, markdown_table, peak_rss_mb, write_section  # noqa: E402

from feed_dagster.data.schema import ACTIONS  # noqa: E402
from feed_dagster.serving import FeedReader, connect, get_feed, publish_feeds  # noqa: E402
from feed_dagster.serving.lookup import add_lookup_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def generate_shard(path: Path, n_users: int, per_user: int, n_articles: int) -> None:
    """One Parquet file of n_users x per_user feed rows in the published feed schema."""
    probs = ",\n".join(
        f"((hash(user_id, position, {i}) % 100000) / 100000.0)::FLOAT AS p_{a}"
        for i, a in enumerate(ACTIONS)
    )
    con = duckdb.connect(config={"memory_limit": "4GB"})
    con.execute(
        f"""
        COPY (
            WITH rows AS (
                SELECT u.range AS user_id, p.range::INTEGER AS position,
                       (hash(u.range, p.range) % {n_articles})::BIGINT AS article_id
                FROM range({n_users}) u, range(1, {per_user + 1}) p
            )
            SELECT user_id, position, article_id,
                   (article_id % {max(1, n_users // 10)})::BIGINT AS author_id,
                   (1.0 / position)::DOUBLE AS score,
                   CASE WHEN hash(user_id, position) % 3 = 0 THEN 'in_network'
                        ELSE 'out_of_network' END AS source,
                   {probs},
                   ((hash(user_id, position, 99) % 6000) / 100.0)::FLOAT AS dwell_seconds,
                   CASE WHEN hash(user_id, position) % 3 = 0
                        THEN 'you follow @user' || (article_id % {max(1, n_users // 10)})
                        ELSE 'matches your interest in topic ' || (article_id % 20) END
                        AS reason
            FROM rows
        ) TO '{path}' (FORMAT parquet)
        """
    )
    con.close()


def articles_frame(n_articles: int, n_users: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    ids = np.arange(n_articles, dtype=np.int64)
    articles = pl.DataFrame(
        {
            "article_id": ids,
            "author_id": ids % max(1, n_users // 10),
            "published_at": pl.Series([datetime(2026, 1, 7)] * n_articles),
            "topic_name": pl.Series(ids % 20).cast(pl.String).str.replace(r"^", "topic "),
            "title": pl.Series(ids).cast(pl.String).str.replace(r"^", "Post number "),
        }
    )
    handles = np.arange(max(1, n_users // 10))
    users = pl.DataFrame({"user_id": handles, "handle": [f"user{i}" for i in handles]})
    return articles, users


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    ms = np.array(samples) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), float(ms.mean())


def timed(fn, calls: int, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--per-user", type=int, default=35)
    ap.add_argument("--articles", type=int, default=200_000)
    ap.add_argument("--calls", type=int, default=3_000)
    ap.add_argument("--dir", type=Path, default=ROOT / "data" / "bench" / "lookup")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    args.dir.mkdir(parents=True, exist_ok=True)
    shard = args.dir / f"feeds-{args.users}x{args.per_user}.parquet"
    serving = args.dir / f"feeds-{args.users}x{args.per_user}.duckdb"
    note_file = serving.with_suffix(".publish.txt")
    publish_note = "reused an existing file (pass --rebuild to time the publish)"
    if note_file.exists():
        publish_note = note_file.read_text().strip() + " (when the file was built)"
    built = args.rebuild or not serving.exists()
    if built:
        t = time.perf_counter()
        generate_shard(shard, args.users, args.per_user, args.articles)
        gen_s = time.perf_counter() - t
        articles, users = articles_frame(args.articles, args.users)
        result = publish_feeds(
            shard,
            serving,
            model_version="bench",
            vector_table_version="bench",
            generated_at=datetime(2026, 1, 7),
            articles=articles,
            users=users,
        )
        shard.unlink()
        publish_note = (
            f"{result.seconds:.1f} s for {result.rows:,} rows ({result.users:,} users); "
            f"rows generated in {gen_s:.1f} s"
        )
        note_file.write_text(publish_note)
    lookup_file = add_lookup_file(serving)  # a file built before lookup files gets one
    size_mb = serving.stat().st_size / 2**20
    rss_note = " (the publish: DuckDB memory_limit 4GB)" if built else " (lookups only)"

    rng = np.random.default_rng(0)
    ids = iter(rng.integers(0, args.users, size=10 * args.calls + 1000).tolist())

    def per_call() -> None:
        feed = get_feed(next(ids), serving)
        assert feed.height == args.per_user

    reader = FeedReader(serving)

    def held() -> None:
        feed = reader.get_feed(next(ids))
        assert feed.height == args.per_user

    def open_close() -> None:
        connect(serving).close()

    fast = FeedReader(serving)
    slow = FeedReader(serving, use_lookup=False)
    assert fast.read_path.startswith("lookup file"), fast.read_path

    def page_lookup() -> None:
        assert len(fast.page(next(ids)).rows) == min(35, args.per_user)

    def page_query() -> None:
        assert len(slow.page(next(ids)).rows) == min(35, args.per_user)

    samples = {
        "`get_feed` (opens the file per call)": timed(per_call, max(200, args.calls // 5)),
        "`FeedReader.get_feed` (one held connection)": timed(held, args.calls),
        "open + close only (no query)": timed(open_close, max(200, args.calls // 5)),
        "`FeedReader.page` from the lookup file": timed(page_lookup, args.calls),
        "`FeedReader.page` by a DuckDB query": timed(page_query, args.calls),
    }
    reader.close()
    fast.close()
    slow.close()

    rows = []
    for name, s in samples.items():
        p50, p99, mean = percentiles(s)
        rows.append([name, f"{len(s):,}", f"{p50:.2f}", f"{p99:.2f}", f"{mean:.2f}"])
    p50_open = statistics.median(samples["open + close only (no query)"]) * 1000
    p50_call = statistics.median(samples["`get_feed` (opens the file per call)"]) * 1000
    _, p99_held, _ = percentiles(samples["`FeedReader.get_feed` (one held connection)"])
    body = "\n".join(
        [
            "## Feed lookup (`bench/bench_lookup.py`)",
            "",
            f"Command: `{' '.join(['.venv/bin/python', 'bench/bench_lookup.py', *sys.argv[1:]])}`",
            "",
            f"Serving file: {args.users:,} users x {args.per_user} rows, "
            f"{size_mb:,.0f} MiB; publish: {publish_note}. Random users, latency in ms "
            "(each lookup returns the user's full feed joined with titles, as a polars frame):",
            "",
            markdown_table(["lookup", "calls", "p50", "p99", "mean"], rows),
            "",
            f"Opening the read-only connection costs {p50_open:.1f} ms of the "
            f"{p50_call:.1f} ms p50 of `get_feed`, so the per-call open dominates; a service "
            f"should hold a `FeedReader` (p99 {p99_held:.2f} ms here, target < 10 ms), "
            "which reopens by itself when a publish swaps the file's inode. A page for "
            "the HTTP service comes from the generation's lookup file "
            f"({lookup_file.stat().st_size / 2**20:,.0f} MiB, memory-mapped; "
            "serving/lookup.py): a binary search and a slice instead of a scan of the "
            "user's row group.",
            "",
            f"Peak RSS {peak_rss_mb():,.0f} MiB{rss_note}; "
            f"{machine()}; load average {os.getloadavg()[0]:.1f} at the end (the machine "
            "is shared, so p99 carries other processes' scheduling noise).",
        ]
    )
    print(body)
    if not args.no_write:
        write_section("lookup", body)


if __name__ == "__main__":
    main()

"""bench/bench_revisions.py: its feed digest is the golden test's, and its report fails on
feeds that differ between revisions."""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_revisions import Revision, feed_digest, parse_args, section  # noqa: E402
from test_pipeline_golden import feed_digest as golden_digest  # noqa: E402

from feed_dagster.data.schema import FEED_SCHEMA


def small_feeds() -> pl.DataFrame:
    rows = [
        {c: None for c in FEED_SCHEMA}
        | {"user_id": u, "position": p, "article_id": 10 * u + p, "author_id": 1}
        | {"score": 1.0 / p, "source": "in_network", "dwell_seconds": 3.0}
        | {c: 0.1 * p for c in FEED_SCHEMA if c.startswith("p_")}
        for u in (2, 1)
        for p in (2, 1, 3)
    ]
    return pl.DataFrame(rows, schema=FEED_SCHEMA)


def test_the_digest_is_the_golden_tests_and_blind_to_row_order() -> None:
    feeds = small_feeds()
    assert feed_digest(feeds) == golden_digest(feeds)
    assert feed_digest(feeds.reverse()) == feed_digest(feeds)
    moved = feeds.with_columns(score=pl.col("score") + 1e-3)
    assert feed_digest(moved) != feed_digest(feeds)


def run(seconds: float, digest: str) -> dict:
    return {
        "users": 300,
        "seconds": seconds,
        "cpu_seconds": 2 * seconds,
        "peak_rss_mib": 300.0,
        "peak_rss_before_build_mib": 120.0,
        "feed_rows": 10_500,
        "digest": digest,
        "world_digest": "w" * 64,
    }


def test_the_report_fails_on_feeds_that_differ() -> None:
    args = parse_args(["--scales", "tiny", "--repeats", "2"])
    assert (args.baseline, args.batch_size, args.no_write) == ("d103819", 512, False)

    def revisions(current_digest: str) -> dict:
        base = Revision("baseline", Path("b"), [run(1.0, "a" * 64), run(1.2, "a" * 64)])
        cur = Revision("current", Path("c"), [run(0.5, "a" * 64), run(0.6, current_digest)])
        return {"tiny": {"baseline": base, "current": cur}}

    body, same = section(["tiny"], revisions("a" * 64), args, (1.0, 1.0))
    assert same
    assert "current / baseline users/s **2.000** from the medians" in body
    body, same = section(["tiny"], revisions("b" * 64), args, (1.0, 1.0))
    assert not same and "**DIFFER**" in body

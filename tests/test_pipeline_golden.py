"""Feeds of the tiny world pinned by a content hash: a refactor of the pipeline's plumbing
must give the very same feeds (posts, order, sources and scores) for the same seed.

The hashes were recorded on the pipeline as it was before its stages became typed
classes. A change that is meant to alter feeds updates them, and says why in its commit.
"""

from __future__ import annotations

import hashlib

import polars as pl
import pytest

from feed_dagster.feeds.build import build_feeds
from feed_dagster.pipeline import (
    ACTION_COLUMNS,
    PopularityRetriever,
    TopicAffinityScorer,
    run_pipeline,
)

# sha256 of feed_digest_frame(...) written as CSV.
TINY_FEEDS = "13edfa05f40702a2ef1ba63f14d8a5df90c008ef55f378fc0daeaf8ca006c4d2"
TINY_FEEDS_AFTER_SERVED = "c25025d4c5a5fb456cee0111d8fdc689a51d11f6597a5cc82822d6f5bfb72b02"
TINY_FEEDS_AUTHORLESS = "96e28e91fd235aa99e6359a611043b1dcbfd9d6d521c6a5ee0b02512e00a882e"
# Batches smaller than the world, so per-batch results are concatenated and summed.
BATCH_SIZE = 100


def feed_digest(feeds: pl.DataFrame) -> str:
    """sha256 over user_id, position, article_id, source and the scores rounded to 1e-6,
    sorted by user and position: equal for equal feeds whatever the row order, and blind
    to float noise below the sixth decimal."""
    scores = ["score", *ACTION_COLUMNS, "dwell_seconds"]
    frame = feeds.select(
        "user_id",
        "position",
        "article_id",
        "source",
        *[pl.col(c).cast(pl.Float64).round(6) for c in scores],
    ).sort("user_id", "position")
    return hashlib.sha256(frame.write_csv().encode()).hexdigest()


@pytest.fixture(scope="module")
def fallbacks(tiny_world):
    w = tiny_world
    return PopularityRetriever.from_tables(w), TopicAffinityScorer.from_tables(w)


@pytest.fixture(scope="module")
def feeds(tiny_world, fallbacks) -> pl.DataFrame:
    w = tiny_world
    users = w.users["user_id"].to_numpy()
    return build_feeds(w.tables(), users, w.now, *fallbacks, batch_size=BATCH_SIZE)[0]


def test_same_seed_same_feeds(feeds) -> None:
    assert feeds.height == 10_500
    assert feed_digest(feeds) == TINY_FEEDS


def test_same_feeds_after_a_publish(tiny_world, fallbacks, feeds) -> None:
    w = tiny_world
    served = feeds.select("user_id", "article_id")
    users = w.users["user_id"].to_numpy()
    nxt = run_pipeline(w, users, w.now, *fallbacks, served=served)[0]
    assert feed_digest(nxt) == TINY_FEEDS_AFTER_SERVED


def test_same_feeds_for_an_authorless_source(tiny_world) -> None:
    w = tiny_world
    tables = dict(w.tables())
    tables["articles"] = w.articles.with_columns(author_id=pl.lit(None, dtype=pl.Int64))
    users = w.users["user_id"].to_numpy()
    retriever = PopularityRetriever.from_tables(tables)
    scorer = TopicAffinityScorer.from_tables(tables)
    got = build_feeds(tables, users, w.now, retriever, scorer, batch_size=BATCH_SIZE)[0]
    assert feed_digest(got) == TINY_FEEDS_AUTHORLESS

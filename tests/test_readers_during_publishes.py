"""Reader processes look feeds up while publishes swap the serving file underneath them."""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_readers import (  # noqa: E402
    GEN_STRIDE,
    generation_frame,
    page_generation,
    readers_during_publishes,
    response_generation,
)

from feed_dagster.serving.read import Page


def test_the_generation_check_catches_mixed_or_short_responses() -> None:
    feed = generation_frame(2, 5).filter(pl.col("user_id") == 3)
    feed = feed.with_columns(model_version=pl.lit("gen-2"))
    assert response_generation(feed, 3) == 2
    mixed = feed.with_columns(
        article_id=pl.when(pl.col("position") == 7)
        .then(pl.col("article_id") - GEN_STRIDE)
        .otherwise(pl.col("article_id"))
    )
    assert response_generation(mixed, 3) is None
    assert response_generation(feed.head(34), 3) is None
    assert response_generation(feed, 4) is None


def test_the_page_check_catches_mixed_or_short_pages() -> None:
    rows = [(p, 2 * GEN_STRIDE + 300 + p) for p in range(1, 36)]
    meta = {"model_version": "gen-2"}
    assert page_generation(Page(meta, rows, False, True), 3) == 2
    assert page_generation(Page({"model_version": "gen-1"}, rows, False, True), 3) is None
    assert page_generation(Page(meta, rows[:34], False, True), 3) is None
    mixed = [*rows[:6], (7, GEN_STRIDE + 307), *rows[7:]]
    assert page_generation(Page(meta, mixed, False, True), 3) is None


@pytest.mark.slow
def test_four_readers_see_whole_generations_through_three_publishes(tmp_path) -> None:
    r = readers_during_publishes(tmp_path, readers=4, lookups=10_000, publishes=3)
    print(
        f"readers during publishes: {r['lookups']:,} lookups, {r['errors']} errors, "
        f"{r['mixed_or_incomplete']} mixed, generations seen {r['generations_seen']}"
    )
    assert r["lookups"] >= 10_000
    assert r["errors"] == 0, r["first_error"]
    assert r["mixed_or_incomplete"] == 0
    # Readers followed the publishes: the last generation reached every reader, and the
    # lookups span more than one generation.
    assert all(3 in gens for gens in r["generations_per_reader"])
    assert len(r["generations_seen"]) >= 2
    assert set(r["generations_seen"]) <= {0, 1, 2, 3}
    assert "lookup" in r["read_paths"], r["read_paths"]  # pages came from lookup files

"""The stage kinds, the spec and its loop, the typed stats and the metadata tables."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest

from feed_dagster.feeds.build import build_feeds
from feed_dagster.feeds.report import feed_preview_markdown, stage_timings_markdown
from feed_dagster.pipeline import (
    DEFAULT_SPEC,
    FEED_SCHEMA,
    Batch,
    CandidateHydrator,
    Filter,
    PipelineSpec,
    PipelineStats,
    PopularityRetriever,
    TopicAffinityScorer,
    run_pipeline,
)
from feed_dagster.pipeline.spec import FunctionFilter

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def fallbacks(tiny_world):
    return PopularityRetriever.from_tables(tiny_world), TopicAffinityScorer.from_tables(tiny_world)


@pytest.fixture(scope="module")
def users(tiny_world):
    return tiny_world.users["user_id"].to_numpy()[:60]


def readme_example() -> str:
    """The python block of the README's "Adding a filter" section."""
    section = README.read_text().split("## Adding a filter", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section holds one python example"
    return blocks[0]


def test_readme_filter_example_runs_as_written(tiny_world, fallbacks, users) -> None:
    namespace: dict[str, object] = {}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    spec = namespace["spec"]
    assert isinstance(spec, PipelineSpec) and spec.filters[:-1] == DEFAULT_SPEC.filters
    w = tiny_world
    plain, before = run_pipeline(w, users, w.now, *fallbacks)
    feeds, stats = run_pipeline(w, users, w.now, *fallbacks, spec=spec)
    assert stats.removed["short_posts"] > 0
    rows = list(stats.rows)
    # Listed after the built-in filters, it runs after them and before the scorers.
    last = f"filter.{DEFAULT_SPEC.filters[-1].name}"
    assert rows.index("filter.short_posts") == rows.index(last) + 1
    assert stats.rows["filter.short_posts"] == before.rows[last] - stats.removed["short_posts"]
    words = feeds.join(w.articles, on="article_id")["text"].str.count_matches(r"\w+")
    assert (words >= 10).all() and feeds.height > 0
    assert plain.join(w.articles, on="article_id")["text"].str.count_matches(r"\w+").min() < 10


class Nothing(Filter):
    """Would drop every candidate, but is switched off."""

    name = "nothing"

    def enabled(self, batch: Batch) -> bool:
        return False

    def run(self, candidates: pl.DataFrame, batch: Batch) -> pl.DataFrame:
        return candidates.clear()


def test_disabled_stage_is_skipped_and_not_timed(tiny_world, fallbacks, users) -> None:
    w = tiny_world
    plain, _ = run_pipeline(w, users, w.now, *fallbacks)
    feeds, stats = run_pipeline(
        w, users, w.now, *fallbacks, spec=DEFAULT_SPEC.with_filters(Nothing())
    )
    assert feeds.equals(plain)
    assert "filter.nothing" not in stats.seconds and "nothing" not in stats.removed


class LosesRows(CandidateHydrator):
    name = "loses_rows"

    def run(self, candidates: pl.DataFrame, batch: Batch) -> pl.DataFrame:
        return candidates.head(1)


def test_a_stage_breaking_its_kind_contract_is_named(tiny_world, fallbacks, users) -> None:
    w = tiny_world
    spec = replace(DEFAULT_SPEC, hydrators=(*DEFAULT_SPEC.hydrators, LosesRows()))
    with pytest.raises(ValueError, match="hydrator.loses_rows: a hydrator must keep every row"):
        run_pipeline(w, users, w.now, *fallbacks, spec=spec)


def test_stage_names_are_unique_per_kind() -> None:
    twice = FunctionFilter("duplicates", DEFAULT_SPEC.filters[0].fn)
    with pytest.raises(ValueError, match="filter.duplicates"):
        DEFAULT_SPEC.with_filters(twice)


def test_stats_sum_over_batches(tiny_world, fallbacks, users) -> None:
    w = tiny_world
    whole, one = run_pipeline(w, users, w.now, *fallbacks)
    parts, summed = build_feeds(w.tables(), users, w.now, *fallbacks, batch_size=25)
    assert parts.equals(whole)
    assert isinstance(summed, PipelineStats)
    assert (summed.users, summed.feed_rows, summed.in_network_rows) == (
        one.users,
        one.feed_rows,
        one.in_network_rows,
    )
    assert summed.active_users == one.active_users
    assert summed.rows == one.rows and summed.removed == one.removed
    assert list(summed.seconds) == list(one.seconds)
    assert (summed.retriever, summed.scorer) == ("popularity", "topic_affinity")
    assert summed.candidate_window_hours == 48


def test_stats_add_counts_and_stage_dicts_keeping_the_runs_identity() -> None:
    a = PipelineStats("r", "s", 48.0, users=2, feed_rows=70, rows={"x": 5}, seconds={"x": 1.0})
    b = PipelineStats("r", "s", 48.0, users=3, feed_rows=35, rows={"x": 1, "y": 2})
    b.seconds.update(x=0.5, y=0.25)
    b.removed["f"] = 4
    total = a + b
    assert (total.users, total.feed_rows) == (5, 105)
    assert total.rows == {"x": 6, "y": 2} and total.seconds == {"x": 1.5, "y": 0.25}
    assert total.removed == {"f": 4} and total.total_seconds == 1.75
    assert (total.retriever, total.scorer, total.candidate_window_hours) == ("r", "s", 48.0)
    assert a.users == 2 and a.rows == {"x": 5}  # operands unchanged
    empty = PipelineStats("r", "s", None)
    assert (empty + empty).in_network_share == 0.0


def _feed(**extra) -> pl.DataFrame:
    rows = {
        "user_id": [7, 7, 3],
        "position": [2, 1, 1],
        "article_id": [11, 10, 12],
        "author_id": [1, None, 2],
        "score": [0.5, 0.75, 0.1],
        "source": ["out_of_network", "in_network", "in_network"],
        "reason": ["popular | now", "you follow news", "you follow @b"],
        **extra,
    }
    return pl.DataFrame(rows).with_columns(
        [pl.lit(0.0).alias(c) for c in FEED_SCHEMA if c not in rows]
    )


def test_feed_preview_table() -> None:
    articles = pl.DataFrame({"article_id": [10, 11, 12], "title": ["First\nline", "x" * 100, "c"]})
    users = pl.DataFrame({"user_id": [1, 2], "handle": ["ann", "bob"]})
    md = feed_preview_markdown(_feed(), articles, users, user_id=7)
    lines = md.splitlines()
    assert lines[0] == "Feed of user 7:"
    assert lines[2] == "| position | post | author | source | score | reason |"
    assert lines[4] == "| 1 | #10 First line | - | in_network | 0.7500 | you follow news |"
    assert lines[5].startswith("| 2 | #11 xxx") and "…" in lines[5]
    assert lines[5].endswith("| @ann | out_of_network | 0.5000 | popular \\| now |")
    assert len(lines) == 6
    # No user named: the lowest user id, so reruns show the same user.
    assert feed_preview_markdown(_feed(), articles, users).startswith("Feed of user 3:")
    assert feed_preview_markdown(_feed(), articles, users, user_id=7, limit=1).count("\n| ") == 3
    assert feed_preview_markdown(_feed().clear(), articles, users) == "No feed rows."


def test_stage_timings_table() -> None:
    stats = PipelineStats(rows={"source.a": 1200, "filter.f": 1000}, removed={"f": 200})
    stats.seconds.update({"source.a": 0.75, "filter.f": 0.25})
    lines = stage_timings_markdown(stats).splitlines()
    assert lines[0] == "| stage | rows out | removed | seconds | share |"
    assert lines[2] == "| source.a | 1,200 |  | 0.750 | 75.0% |"
    assert lines[3] == "| filter.f | 1,000 | 200 | 0.250 | 25.0% |"
    assert lines[4] == "| **total** |  |  | 1.000 | 100.0% |"

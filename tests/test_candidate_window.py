"""The candidate window: from world_info to the sources, the age filter and the feed build,
its override in the launchpad, and the clear failure when it misses every post."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import dagster as dg
import polars as pl
import pytest
from dagster_helpers import materialize

import feed_dagster.pipeline.candidate_sources as sources_mod
from feed_dagster.data.schema import FEED_SCHEMA
from feed_dagster.data.world_tables import save_parquet_world, world_info
from feed_dagster.errors import NoCandidatesError
from feed_dagster.feeds.build import build_feeds
from feed_dagster.pipeline import PopularityRetriever, TopicAffinityScorer
from feed_dagster.pipeline.config import FilterConfig, SourceConfig, resolve_window
from feed_dagster.pipeline.query import hydrate_query

H48 = timedelta(hours=48)


class SpyRetriever:
    """The popularity fallback, remembering the window it was asked for."""

    def __init__(self, inner: PopularityRetriever) -> None:
        self.inner, self.name, self.after = inner, "spy", "never called"

    def retrieve(self, user_ids, now, k, *, published_after, **kwargs):
        self.after = published_after
        return self.inner.retrieve(user_ids, now, k, published_after=published_after, **kwargs)


def _tables(world, window):
    return {
        "world_info": world_info(replace(world, candidate_window=window), "t"),
        **world.tables(),
    }


def _feeds(world, window, n_users=40):
    users = world.users["user_id"].to_numpy()[:n_users]
    spy = SpyRetriever(PopularityRetriever.from_tables(world))
    feeds, stats = build_feeds(
        _tables(world, window), users, world.now, spy, TopicAffinityScorer.from_tables(world)
    )
    published = feeds.join(world.articles, on="article_id")["published_at"]
    return spy, published, stats


def test_world_info_window_reaches_sources_and_filter(tiny_world) -> None:
    w = tiny_world
    spy, published, stats = _feeds(w, H48)
    assert spy.after == w.now - H48
    assert (published > w.now - H48).all() and stats.candidate_window_hours == 48

    spy, published, stats = _feeds(w, None)
    assert spy.after is None and stats.candidate_window_hours is None
    assert (published <= w.now).all()
    assert (published <= w.now - H48).any()  # old posts are candidates and survive the filter

    spy, published, _ = _feeds(w, timedelta(hours=6))
    assert spy.after == w.now - timedelta(hours=6)
    assert (published > w.now - timedelta(hours=6)).all()


def test_old_post_is_a_candidate_without_limit_only(tiny_world) -> None:
    w = tiny_world
    follows = w.follows.head(200)
    user = follows["follower_id"][0]
    authors = follows.filter(pl.col("follower_id") == user)["followee_id"]
    old = w.articles.filter(
        pl.col("author_id").is_in(authors.implode())
        & (pl.col("kind") == "original")
        & (pl.col("published_at") < w.now - H48)
    )["article_id"]
    assert old.len() > 0
    q = hydrate_query(w.tables(), [user], w.now)
    windowed = sources_mod.in_network_source(q, w.articles, SourceConfig())
    unlimited = sources_mod.in_network_source(q, w.articles, SourceConfig(max_age=None))
    assert not set(old) & set(windowed["article_id"])
    assert set(old) & set(unlimited["article_id"])

    from feed_dagster.pipeline.filters import drop_too_old
    from feed_dagster.pipeline.hydrators import hydrate_core_data

    cands = hydrate_core_data(unlimited, w.articles)
    kept_48 = drop_too_old(cands, q, FilterConfig()).kept
    kept_all = drop_too_old(cands, q, FilterConfig(max_age=None)).kept
    assert not set(old) & set(kept_48["article_id"])
    assert kept_all.height == cands.height


@pytest.mark.parametrize(
    "cfg",
    [
        SourceConfig(),
        SourceConfig(max_age=None),
        SourceConfig(max_age=None, per_author_originals=2, per_author_replies=1, in_network_max=9),
    ],
)
def test_author_precap_changes_no_in_network_list(tiny_world, cfg, monkeypatch) -> None:
    w = tiny_world
    q = hydrate_query(w.tables(), w.users["user_id"].to_numpy()[:120], w.now)
    capped = sources_mod.in_network_source(q, w.articles, cfg)
    monkeypatch.setattr(sources_mod, "newest_per_author", lambda posts, articles, cfg: posts)
    assert capped.equals(sources_mod.in_network_source(q, w.articles, cfg))
    assert capped.height > 0


def test_window_override_is_checked() -> None:
    assert resolve_window(H48) == H48
    assert resolve_window(None) is None
    assert resolve_window(H48, hours=6) == timedelta(hours=6)
    assert resolve_window(H48, no_limit=True) is None
    for bad in (0, -3, float("nan")):
        with pytest.raises(ValueError, match="candidate_window_hours: expected a positive"):
            resolve_window(H48, hours=bad)
    with pytest.raises(ValueError, match="set one of them"):
        resolve_window(H48, hours=6, no_limit=True)
    with pytest.raises(ValueError, match="expected a positive window"):
        SourceConfig(max_age=timedelta(0))


def _aged(world, days: int = 30):
    """The world with every post published `days` earlier: all older than 48 h at now."""
    return replace(
        world, articles=world.articles.with_columns(pl.col("published_at") - timedelta(days=days))
    )


def test_build_fails_clearly_when_every_post_is_older_than_the_window(tiny_world) -> None:
    w = _aged(tiny_world)
    with pytest.raises(NoCandidatesError) as err:
        _feeds(w, H48)
    msg = str(err.value)
    lo, hi = w.articles["published_at"].min(), w.articles["published_at"].max()
    assert "candidate window 48 h" in msg and f"now {w.now}" in msg
    assert f"published between {lo} and {hi}" in msg and "0 of them inside" in msg
    assert err.value.without_candidates * 2 > err.value.active_users > 0
    # Without an age limit the same world has candidates again.
    _, published, _ = _feeds(w, None)
    assert published.len() > 0


def _failure(result) -> str:
    from feed_dagster.jobs.outcomes import error_text

    return "\n".join(
        error_text(e.step_failure_data.error) for e in result.get_step_failure_events()
    )


def test_assets_write_no_shard_and_publish_no_empty_feeds(
    data_dir, tiny_world, tmp_path, monkeypatch
) -> None:
    from feed_dagster.assets.feeds import user_shards
    from feed_dagster.resources.storage import StorageResource

    _shard_path = StorageResource().shard_path

    save_parquet_world(_aged(tiny_world), tmp_path / "aged")
    monkeypatch.setenv("FEED_DAGSTER_SOURCE", f"parquet:{tmp_path / 'aged'}")
    assert materialize(dg.AssetSelection.groups("raw", "social_graph")).success

    result = materialize(dg.AssetSelection.assets("user_feeds"), "0")
    assert not result.success
    assert "candidate window 48 h" in _failure(result)
    assert not _shard_path("0").exists()

    bad = {"ops": {"user_feeds": {"config": {"candidate_window_hours": -1.0}}}}
    result = materialize(dg.AssetSelection.assets("user_feeds"), "0", run_config=bad)
    assert not result.success and "candidate_window_hours" in _failure(result)

    # Shards that hold no rows (e.g. written by an older version) are never published.
    for key in user_shards.get_partition_keys():
        _shard_path(key).parent.mkdir(parents=True, exist_ok=True)
        pl.DataFrame(schema=FEED_SCHEMA).write_parquet(_shard_path(key))
        _shard_path(key).with_name(f"shard-{key}.versions.json").write_text(
            '{"model_version": "m", "vector_table_version": "v"}'
        )
    live = data_dir / "serving" / "feeds.duckdb"
    live.parent.mkdir(parents=True, exist_ok=True)
    live.write_bytes(b"previous generation")
    result = materialize(dg.AssetSelection.assets("published_feeds"))
    assert not result.success
    assert "0 feed rows" in _failure(result) and "stays as it was" in _failure(result)
    assert live.read_bytes() == b"previous generation"


def test_no_limit_in_the_launchpad_gives_old_posts(data_dir, tiny_world, tmp_path, monkeypatch):
    from feed_dagster.resources.storage import StorageResource

    _shard_path = StorageResource().shard_path

    aged = _aged(tiny_world)
    save_parquet_world(aged, tmp_path / "aged")
    monkeypatch.setenv("FEED_DAGSTER_SOURCE", f"parquet:{tmp_path / 'aged'}")
    assert materialize(dg.AssetSelection.groups("raw", "social_graph")).success
    cfg = {"ops": {"user_feeds": {"config": {"no_candidate_window": True}}}}
    assert materialize(dg.AssetSelection.assets("user_feeds"), "0", run_config=cfg).success
    feeds = pl.read_parquet(_shard_path("0"))
    assert feeds.height > 0
    published = feeds.join(aged.articles, on="article_id")["published_at"]
    assert (published < aged.now - H48).all()

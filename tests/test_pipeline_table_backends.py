"""Table-only fallbacks: the popularity retriever and the topic-affinity scorer."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import polars as pl

from feed_dagster.data.schema import ACTION_COLUMNS
from feed_dagster.pipeline.protocols import Retriever, Scorer
from feed_dagster.pipeline.query import hydrate_query
from feed_dagster.pipeline.table_backends import (
    PopularityRetriever,
    TopicAffinityScorer,
    positive_engagements,
)


def test_popularity_retriever_window_k_exclusions_determinism(tiny_world) -> None:
    w = tiny_world
    r = PopularityRetriever.from_tables(w)
    assert isinstance(r, Retriever)
    users = np.arange(20)
    after = w.now - timedelta(hours=48)
    exclude = pl.DataFrame({"user_id": [0, 0], "article_id": [2999, 2998]})
    authors = pl.DataFrame({"user_id": [1], "author_id": [w.articles["author_id"][2999]]})
    got = r.retrieve(
        users, w.now, 100, published_after=after, exclude=exclude, exclude_authors=authors
    )
    again = r.retrieve(
        users, w.now, 100, published_after=after, exclude=exclude, exclude_authors=authors
    )
    assert got.equals(again)
    assert got.group_by("user_id").len()["len"].to_list() == [100] * 20
    posts = got.join(w.articles, on="article_id")
    assert posts["published_at"].min() > after and posts["published_at"].max() <= w.now
    assert not {2998, 2999} & set(got.filter(pl.col("user_id") == 0)["article_id"].to_list())
    user1 = posts.filter(pl.col("user_id") == 1)
    assert authors["author_id"][0] not in user1["author_id"].to_list()


def test_popularity_retriever_follows_topic_interest(tiny_world) -> None:
    w = tiny_world
    pos = positive_engagements(w.engagements, w.now).join(w.articles, on="article_id")
    # The user with the most history, and the topic they engage with most.
    user = pos.group_by("user_id").len().sort("len", "user_id", descending=True)["user_id"][0]
    top_topic = pos.filter(pl.col("user_id") == user)["topic"].mode().sort()[0]
    r = PopularityRetriever.from_tables(w)
    got = r.retrieve(np.array([user]), w.now, 30, published_after=w.now - timedelta(hours=48)).join(
        w.articles, on="article_id"
    )
    recent = w.articles.filter(pl.col("published_at") > w.now - timedelta(hours=48))
    base_share = (recent["topic"] == top_topic).mean()
    assert (got["topic"] == top_topic).mean() > 2 * base_share


def test_topic_affinity_scorer_probabilities(tiny_world) -> None:
    w = tiny_world
    s = TopicAffinityScorer.from_tables(w)
    assert isinstance(s, Scorer)
    users = np.arange(30)
    q = hydrate_query(w, users, w.now)
    recent = w.articles.filter(pl.col("published_at") > w.now - timedelta(hours=48)).head(200)
    c = (
        pl.DataFrame({"user_id": users})
        .join(recent.select("article_id", "author_id", "published_at", "topic"), how="cross")
        .with_columns(in_network=pl.lit(False))
    )
    out = s.score(c, q)
    assert out.select("user_id", "article_id").equals(c.select("user_id", "article_id"))
    for col in ACTION_COLUMNS:
        assert out[col].min() >= 0 and out[col].max() <= 1, col
    assert (out["dwell_seconds"] >= 0).all()
    assert out.equals(s.score(c, q))
    # In-network rows score higher on positive actions, and the same on negative ones.
    boosted = s.score(c.with_columns(in_network=pl.lit(True)), q)
    assert (boosted["p_favorite"] >= out["p_favorite"]).all()
    assert boosted["p_report"].equals(out["p_report"])


def test_popularity_top_k_takes_the_lowest_indices_among_ties() -> None:
    """Which of the posts tied at the k-th place are retrieved must not depend on the
    machine (np.argpartition's choice does): the lowest indices, the rest by score."""
    from feed_dagster.pipeline.table_backends import _top_k_lowest_index_on_ties

    scores = np.array([[1.0, 3.0, 3.0, 3.0, 0.0, -np.inf], [5.0] * 6, [0, 1, 2, 3, 4, 5.0]])
    assert _top_k_lowest_index_on_ties(scores, 2).tolist() == [[1, 2], [0, 1], [4, 5]]
    assert _top_k_lowest_index_on_ties(scores, 5).tolist() == [
        [0, 1, 2, 3, 4],
        [0, 1, 2, 3, 4],
        [1, 2, 3, 4, 5],
    ]
    rounded = np.round(np.random.default_rng(0).random((40, 300)), 1)  # many ties
    stable = np.sort(np.argsort(-rounded, axis=1, kind="stable")[:, :17], axis=1)
    np.testing.assert_array_equal(_top_k_lowest_index_on_ties(rounded, 17), stable)

"""Candidate sources: in-network (window, caps, reply eligibility, topics) and retrieval."""

from __future__ import annotations

import gc
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from feed_dagster.data.schema import conform
from feed_dagster.errors import DataValidationError
from feed_dagster.pipeline import candidate_sources
from feed_dagster.pipeline.candidate_sources import in_network_source, out_of_network_source
from feed_dagster.pipeline.config import SourceConfig
from feed_dagster.pipeline.query import Query, hydrate_query

NOW = datetime(2026, 1, 3)
H = timedelta(hours=1)

# (article_id, author_id, kind, parent_id, conversation_id, hours before now, topic)
POSTS = [
    (100, 10, "original", None, 100, 1.0, 1),
    (101, 10, "original", None, 101, 50.0, 1),  # too old
    (102, 10, "original", None, 102, -1.0, 1),  # in the future
    (103, 11, "reply", 100, 100, 4.0, 1),  # answers an original: eligible
    (104, 12, "original", None, 104, 2.0, 2),  # unfollowed author
    (105, 12, "reply", 104, 104, 1.5, 2),  # unfollowed author
    (106, 11, "reply", 105, 104, 1.2, 2),  # deep in an unfollowed author's thread: not
    (107, 11, "original", None, 107, 3.0, 3),
    (108, 10, "reply", 103, 100, 0.8, 1),  # deep in a followed author's thread: eligible
    (109, None, "original", None, 109, 5.0, 5),  # authorless, followed topic
    (110, None, "original", None, 110, 5.0, 6),  # authorless, unfollowed topic
    (111, 11, "repost", 104, 104, 0.5, 2),
]


def tables() -> dict[str, pl.DataFrame]:
    a, au, k, par, conv, hours, topic = zip(*POSTS, strict=True)
    articles = conform(
        "articles",
        pl.DataFrame(
            {
                "article_id": a,
                "author_id": au,
                "kind": k,
                "parent_id": par,
                "conversation_id": conv,
                "published_at": [NOW - h * H for h in hours],
                "topic": topic,
            }
        ),
    )
    follows = conform("follows", pl.DataFrame({"follower_id": [1, 1], "followee_id": [10, 11]}))
    topic_follows = conform("topic_follows", pl.DataFrame({"user_id": [1], "topic": [5]}))
    return {"articles": articles, "follows": follows, "topic_follows": topic_follows}


def query() -> Query:
    return hydrate_query(tables(), [1], NOW)


def test_in_network_window_eligibility_topics_newest_first() -> None:
    out = in_network_source(query(), tables()["articles"], SourceConfig())
    assert out["article_id"].to_list() == [111, 108, 100, 107, 103, 109]
    assert out["source_rank"].to_list() == [1, 2, 3, 4, 5, 6]
    assert out["in_network"].all()
    assert out["retrieval_score"].is_null().all()


def test_in_network_per_author_caps_and_max() -> None:
    cfg = SourceConfig(per_author_originals=1, per_author_replies=1)
    out = in_network_source(query(), tables()["articles"], cfg)
    # Author 11: newest secondary (111) of {111, 103}, newest original (107); author 10:
    # original 100 and reply 108; authorless posts are not capped.
    assert out["article_id"].to_list() == [111, 108, 100, 107, 109]
    top2 = in_network_source(query(), tables()["articles"], SourceConfig(in_network_max=2))
    assert top2["article_id"].to_list() == [111, 108]


def test_the_capped_recent_posts_are_made_once_per_frame_time_and_config(monkeypatch) -> None:
    """Every batch of a feed run passes the same articles frame: the user-independent part
    of the in-network source is kept for it, and made again for another time, config or
    frame."""
    made = []
    real = candidate_sources.newest_per_author

    def counted(*args):
        made.append(1)
        return real(*args)

    monkeypatch.setattr(candidate_sources, "newest_per_author", counted)
    articles = tables()["articles"]
    first = in_network_source(query(), articles, SourceConfig())
    assert in_network_source(query(), articles, SourceConfig()).equals(first)
    assert len(made) == 1
    # Another config or time is made anew, and gives what it gives without the cache.
    capped = SourceConfig(per_author_originals=1, per_author_replies=1)
    assert in_network_source(query(), articles, capped)["article_id"].to_list() == [
        111,
        108,
        100,
        107,
        109,
    ]
    later = hydrate_query(tables(), [1], NOW + 4 * H)
    assert in_network_source(later, articles, SourceConfig())["article_id"].to_list() == [
        102,
        111,
        108,
        100,
        107,
        103,
        109,
    ]
    assert len(made) == 3
    # Another frame with the same rows is made anew; a frame's entry goes with it.
    other = tables()["articles"]
    assert in_network_source(query(), other, SourceConfig()).equals(first)
    assert len(made) == 4
    held = len(candidate_sources._CAPPED)
    del other
    gc.collect()
    assert len(candidate_sources._CAPPED) == held - 1


class StubRetriever:
    name = "stub"

    def __init__(self, frame: pl.DataFrame) -> None:
        self.frame = frame
        self.calls: list[dict] = []

    def retrieve(self, user_ids, now, k, *, published_after, exclude=None, exclude_authors=None):
        self.calls.append(
            {
                "user_ids": np.asarray(user_ids).tolist(),
                "k": k,
                "published_after": published_after,
                "exclude": exclude,
                "exclude_authors": exclude_authors,
            }
        )
        return self.frame


def test_out_of_network_drops_in_network_followed_and_foreign_rows() -> None:
    q = query()
    arts = tables()["articles"]
    in_net = in_network_source(q, arts, SourceConfig())
    got = pl.DataFrame(
        {
            "user_id": [1, 1, 1, 1, 1, 99],
            "article_id": [100, 104, 107, 110, 104, 104],
            "retrieval_score": [9.0, 1.0, 8.0, 2.0, 0.5, 5.0],
        }
    )
    stub = StubRetriever(got)
    out = out_of_network_source(q, stub, SourceConfig(out_of_network_max=5), in_net, arts)
    # 100 is in-network, 107 by a followed author, user 99 not in the batch, 104 repeated.
    assert out.select("article_id", "source_rank").rows() == [(110, 1), (104, 2)]
    assert not out["in_network"].any()
    call = stub.calls[0]
    assert call["user_ids"] == [1] and call["k"] == 5
    assert call["published_after"] == NOW - timedelta(hours=48)
    assert set(in_net["article_id"]) <= set(call["exclude"]["article_id"])
    assert call["exclude_authors"].rows() == [(1, 10), (1, 11)]

    capped = out_of_network_source(
        q, StubRetriever(got), SourceConfig(out_of_network_max=1), in_net, arts
    )
    assert capped["article_id"].to_list() == [110]


def test_out_of_network_rejects_malformed_retriever_output() -> None:
    q = query()
    bad = StubRetriever(pl.DataFrame({"user_id": [1], "article_id": [104]}))
    with pytest.raises(DataValidationError, match="retrieval_score"):
        out_of_network_source(q, bad, SourceConfig(), q.seen, tables()["articles"])

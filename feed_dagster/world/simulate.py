"""The next hours of activity after a world's `now`, as incoming batch frames.

Used by `feed-dagster simulate` so anyone can watch the incoming-batch sensor at work: new
original posts by the accounts that already post, in their usual topics, and engagements by
active users on new posts of the topics they engage with most.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl

from feed_dagster.data.schema import conform
from feed_dagster.world.vocabulary import COMMON, TOPICS

TOPIC_NAMES = tuple(TOPICS)


def _text(topics: np.ndarray, rng: np.random.Generator) -> list[str]:
    words = []
    for t in topics.tolist():
        vocab = TOPICS[TOPIC_NAMES[t % len(TOPIC_NAMES)]]
        n = int(rng.integers(8, 15))
        pick_topic = rng.random(n) < 0.7
        words.append(
            " ".join(
                vocab[int(rng.integers(len(vocab)))]
                if p
                else COMMON[int(rng.integers(len(COMMON)))]
                for p in pick_topic
            )
        )
    return words


def simulate_activity(
    articles: pl.DataFrame,
    engagements: pl.DataFrame,
    now: datetime,
    hours: float = 1.0,
    seed: int = 0,
    posts_per_hour: int | None = None,
    engagements_per_post: float = 3.0,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """New (articles, engagements) frames for the `hours` after `now`, canonical schema."""
    rng = np.random.default_rng(seed)
    span_h = max(1.0, (now - articles["published_at"].min()).total_seconds() / 3600)
    n_posts = posts_per_hour or max(1, int(articles.height / span_h))
    n_posts = max(1, int(n_posts * hours))
    authors = (
        articles.filter(pl.col("author_id").is_not_null())
        .group_by("author_id")
        .agg(pl.len().alias("n"), pl.col("topic").mode().first().alias("topic"))
        .sort("author_id")
    )
    if authors.is_empty():
        raise ValueError("simulate needs a source with authors (the synthetic world)")
    weights = authors["n"].to_numpy().astype(np.float64)
    pick = rng.choice(authors.height, size=n_posts, p=weights / weights.sum())
    topics = authors["topic"].to_numpy()[pick]
    seconds = np.sort(rng.integers(1, int(hours * 3600), size=n_posts))
    first_id = int(articles["article_id"].max()) + 1
    ids = np.arange(first_id, first_id + n_posts, dtype=np.int64)
    text = _text(topics, rng)
    new_posts = conform(
        "articles",
        pl.DataFrame(
            {
                "article_id": ids,
                "author_id": authors["author_id"].to_numpy()[pick],
                "published_at": [now + timedelta(seconds=int(s)) for s in seconds],
                "kind": "original",
                "conversation_id": ids,
                "topic": topics,
                "topic_name": [TOPIC_NAMES[t % len(TOPIC_NAMES)] for t in topics.tolist()],
                "title": [" ".join(t.split()[:5]).capitalize() for t in text],
                "text": text,
            }
        ),
    )
    # Engagers: users weighted by past activity, each on a new post of their favourite topic.
    fav = (
        engagements.join(articles.select("article_id", "topic"), on="article_id")
        .group_by("user_id")
        .agg(pl.len().alias("n"), pl.col("topic").mode().first().alias("topic"))
        .sort("user_id")
    )
    n_eng = int(n_posts * engagements_per_post)
    if fav.is_empty() or n_eng == 0:
        return new_posts, conform("engagements", pl.DataFrame({"user_id": []}))
    w = fav["n"].to_numpy().astype(np.float64)
    who = rng.choice(fav.height, size=n_eng, p=w / w.sum())
    want = fav["topic"].to_numpy()[who]
    by_topic = {t: np.flatnonzero(topics == t) for t in np.unique(topics)}
    post_idx = np.array(
        [
            rng.choice(by_topic[t]) if t in by_topic else int(rng.integers(n_posts))
            for t in want.tolist()
        ]
    )
    delay = rng.integers(30, 1800, size=n_eng)
    at = np.minimum(seconds[post_idx] + delay, int(hours * 3600))
    eng = conform(
        "engagements",
        pl.DataFrame(
            {
                "user_id": fav["user_id"].to_numpy()[who],
                "article_id": ids[post_idx],
                "engaged_at": [now + timedelta(seconds=int(s)) for s in at],
                "click": np.ones(n_eng, dtype=bool),
                "favorite": rng.random(n_eng) < 0.4,
                "dwell_seconds": rng.lognormal(3.0, 0.6, size=n_eng).astype(np.float32),
            }
        ),
    ).unique(["user_id", "article_id", "engaged_at"], maintain_order=True)
    return new_posts, eng

"""Synthetic EBNeRD folders with the exact official layout, and articles files for real ids.

The synthetic folder follows the official time frame, scaled down: every split has
`HISTORY_DAYS` of reading history followed by `BEHAVIOR_DAYS` of logged impressions, and the
next split starts one behaviour window later (train impressions on days 14-21, validation
on days 21-28, test on days 28-35). Each split's history ends strictly before its first
impression and, as in the real data, includes the clicks of earlier splits' impressions.

Clicks come from a hidden choice model, so that rankers have something to learn. A user
picks one article of a slate (sometimes two) with probability proportional to
exp(utility):

    utility = PREF_WEIGHT * log(user's share for the article's category)
            + POP_WEIGHT  * article appeal (standard normal)
            + DWELL_WEIGHT * article depth (standard normal, also sets its read times)
            - age of the article in hours / RECENCY_HOURS

Category taste is personal and visible only through a user's history, so a learned ranker
can beat popularity and recency; appeal shows up in recent click counts and age is
public, so popularity and recency baselines land above random.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from feed_dagster.atomic import atomic_path
from feed_dagster.ebnerd.layout import (
    ARTICLES_FILE,
    ARTICLES_SCHEMA,
    BEHAVIORS_FILE,
    BEHAVIORS_SCHEMA,
    HISTORY_FILE,
    HISTORY_SCHEMA,
    TEST_BEHAVIORS_SCHEMA,
)
from feed_dagster.sorted_search import unique
from feed_dagster.world.vocabulary import COMMON, TOPICS

HISTORY_DAYS = 14
BEHAVIOR_DAYS = 7
POOL_HOURS = 72  # a slate shows articles published in the last three days
PREF_WEIGHT = 1.0
POP_WEIGHT = 1.0
DWELL_WEIGHT = 0.6
RECENCY_HOURS = 24.0
READS_PER_USER_DAY = 2.0
READ_SLATE = 20  # candidates a history read is chosen from (that slate is not logged)
SECOND_CLICK_PROB = 0.05
CATEGORY_BASE_ID = 100

_US_PER_HOUR = 3_600_000_000
_US_PER_DAY = 24 * _US_PER_HOUR
_CATEGORIES: tuple[str, ...] = tuple(TOPICS)


# --------------------------------------------------------------------------------------
# articles


def _articles_frame(
    rng: np.random.Generator,
    article_ids: np.ndarray,
    categories: np.ndarray,
    published: np.ndarray,
) -> pl.DataFrame:
    """An articles frame for the given ids, category indices and publish times (int64 us)."""
    n = len(article_ids)
    words = np.array([w for c in _CATEGORIES for w in TOPICS[c]] + list(COMMON), dtype=object)
    offsets = np.cumsum([0] + [len(TOPICS[c]) for c in _CATEGORIES])
    n_common = len(COMMON)

    def text(n_words: int) -> list[str]:
        # Mostly words of the article's category plus common glue words, so text encoders
        # can recover the category from the text.
        topical = rng.random((n, n_words)) < 0.7
        lo, hi = offsets[categories], offsets[categories + 1]
        topic_idx = lo[:, None] + (rng.random((n, n_words)) * (hi - lo)[:, None]).astype(int)
        common_idx = offsets[-1] + rng.integers(0, n_common, (n, n_words))
        idx = np.where(topical, topic_idx, common_idx)
        return [" ".join(row) for row in words[idx]]

    cat_str = np.array(_CATEGORIES, dtype=object)[categories]
    has_image = rng.random(n) < 0.8
    n_images = rng.integers(1, 4, n)
    image_ids = [
        [int(x) for x in rng.integers(1_000_000, 9_999_999, k)] if h else None
        for h, k in zip(has_image, n_images, strict=True)
    ]
    n_topics = rng.integers(0, 3, n)
    topics = [[f"{c}-{j}" for j in range(k)] for c, k in zip(cat_str, n_topics, strict=True)]
    entity = np.array(["PER", "ORG", "LOC", "MISC", "EVENT", "PROD"], dtype=object)
    entity_groups = [list(entity[rng.integers(0, 6, 2)]) for _ in range(n)]
    sentiment = rng.random(n).astype(np.float32)
    label = np.where(
        sentiment > 0.66, "Positive", np.where(sentiment > 0.33, "Neutral", "Negative")
    )
    modified = published + rng.integers(0, 6 * _US_PER_HOUR, n)
    return pl.DataFrame(
        {
            "article_id": article_ids.astype(np.int32),
            "title": text(6),
            "subtitle": text(12),
            "last_modified_time": modified.astype("datetime64[us]"),
            "premium": rng.random(n) < 0.2,
            "body": text(40),
            "published_time": published.astype("datetime64[us]"),
            "image_ids": image_ids,
            "article_type": ["article_default"] * n,
            "url": [
                f"https://news.example/{c}/{a}" for c, a in zip(cat_str, article_ids, strict=True)
            ],
            "ner_clusters": [t.split()[:2] for t in text(3)],
            "entity_groups": entity_groups,
            "topics": topics,
            "category": (CATEGORY_BASE_ID + categories).astype(np.int16),
            "subcategory": [[int(CATEGORY_BASE_ID * 10 + c)] for c in categories],
            "category_str": list(cat_str),
            "total_inviews": np.zeros(n, dtype=np.int32),
            "total_pageviews": np.zeros(n, dtype=np.int32),
            "total_read_time": np.zeros(n, dtype=np.float32),
            "sentiment_score": sentiment,
            "sentiment_label": list(label),
        },
        schema_overrides={"image_ids": pl.List(pl.Int64), "topics": pl.List(pl.String)},
    )


def _write(df: pl.DataFrame, schema: pa.Schema, path: Path) -> None:
    """Write a frame with exactly the given Arrow schema (column order and types)."""
    table = df.select(schema.names).to_arrow().cast(schema)
    with atomic_path(path) as tmp:  # never leave a half-written file where a reader looks
        # Non-compliant nested names ("item", not "element") are what the real files carry.
        pq.write_table(table, tmp, use_compliant_nested_type=False)


def write_articles_for_ids(
    article_ids: Iterable[int],
    out_path: str | Path,
    seed: int = 0,
    first_seen: Mapping[int, datetime] | pl.DataFrame | None = None,
) -> Path:
    """Write a schema-exact `articles.parquet` holding one made-up article per id.

    `first_seen` (a mapping, or a frame with article_id and first_seen columns) gives the
    earliest time each article is seen in the logs; its published_time is then set 10 min
    to 6 h before that, so no article is shown before it exists. Ids without a first
    sighting are published at a random time in the week before the earliest one given.
    """
    rng = np.random.default_rng(seed)
    ids = unique(np.fromiter((int(a) for a in article_ids), dtype=np.int64))
    if isinstance(first_seen, pl.DataFrame):
        seen = first_seen.select(
            pl.col("article_id").cast(pl.Int64), pl.col("first_seen").cast(pl.Datetime("us"))
        )
    elif first_seen is not None:
        seen = pl.DataFrame(
            {"article_id": list(first_seen.keys()), "first_seen": list(first_seen.values())},
            schema={"article_id": pl.Int64, "first_seen": pl.Datetime("us")},
        )
    else:
        seen = pl.DataFrame(schema={"article_id": pl.Int64, "first_seen": pl.Datetime("us")})
    first = (
        pl.DataFrame({"article_id": ids})
        .join(seen, on="article_id", how="left")["first_seen"]
        .to_numpy()
        .astype("datetime64[us]")
    )
    unseen = np.isnat(first)
    anchor = first[~unseen].min() if (~unseen).any() else np.datetime64("2023-01-01", "us")
    week = rng.integers(0, 7 * _US_PER_DAY, len(ids)).astype("timedelta64[us]")
    first = np.where(unseen, anchor - week, first)
    lead = rng.integers(10 * 60_000_000, 6 * _US_PER_HOUR, len(ids)).astype("timedelta64[us]")
    # whole seconds, as in EBNeRD
    published = (first - lead).astype("datetime64[s]").astype("datetime64[us]").astype(np.int64)
    categories = rng.integers(0, len(_CATEGORIES), len(ids))
    frame = _articles_frame(rng, ids, categories, published)
    out = Path(out_path)
    _write(frame, ARTICLES_SCHEMA, out)
    return out


def article_first_seen(behaviors: pl.DataFrame, history: pl.DataFrame) -> pl.DataFrame:
    """Earliest time each article id appears in behaviours (inview, clicked, page) or history.

    Returns article_id, first_seen; feed it to write_articles_for_ids.
    """
    parts = [
        behaviors.select(
            pl.col(c).alias("article_id"), pl.col("impression_time").alias("t")
        ).explode("article_id")
        for c in ("article_ids_inview", "article_ids_clicked")
        if c in behaviors.columns
    ]
    if "article_id" in behaviors.columns:
        parts.append(behaviors.select("article_id", pl.col("impression_time").alias("t")))
    parts.append(
        history.select(
            pl.col("article_id_fixed").alias("article_id"),
            pl.col("impression_time_fixed").alias("t"),
        ).explode("article_id", "t")
    )
    return (
        pl.concat([p.with_columns(pl.col("article_id").cast(pl.Int64)) for p in parts])
        .drop_nulls("article_id")
        .group_by("article_id")
        .agg(pl.col("t").min().alias("first_seen"))
        .sort("article_id")
    )


# --------------------------------------------------------------------------------------
# the hidden choice model


class _Model:
    def __init__(self, rng: np.random.Generator, n_users: int, n_articles: int, end_us: int):
        self.rng = rng
        n_cat = len(_CATEGORIES)
        cat_weights = 1.0 / np.arange(1, n_cat + 1) ** 0.7
        self.category = rng.choice(n_cat, n_articles, p=cat_weights / cat_weights.sum())
        self.appeal = rng.standard_normal(n_articles)
        self.depth = rng.standard_normal(n_articles)
        # A few days of articles before the first history read, so the first slates are full.
        start = -3 * _US_PER_DAY
        self.published = np.sort(rng.integers(start, end_us, n_articles)) // 1_000_000 * 1_000_000
        taste = rng.dirichlet(np.full(n_cat, 0.3), n_users)
        self.log_taste = np.log(np.maximum(taste, 1e-3))

    def slates(self, t: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each time, k distinct articles published in the POOL_HOURS before it.

        Returns (slate index, article index) pairs grouped by slate, in random order within
        a slate. The pool reaches further back when the window holds fewer than k articles.
        """
        hi = np.searchsorted(self.published, t, side="left")  # published strictly before t
        k = np.minimum(k, hi)
        lo = np.searchsorted(self.published, t - POOL_HOURS * _US_PER_HOUR, side="left")
        lo = np.maximum(0, np.minimum(lo, hi - k))
        size = hi - lo
        slate = np.repeat(np.arange(len(t)), size)
        starts = np.cumsum(size) - size
        article = lo[slate] + np.arange(size.sum()) - np.repeat(starts, size)
        order = np.lexsort((self.rng.random(len(slate)), slate))
        slate, article = slate[order], article[order]
        rank = np.arange(len(slate)) - np.repeat(starts, size)
        keep = rank < k[slate]
        return slate[keep], article[keep]

    def choose(
        self, slate: np.ndarray, article: np.ndarray, user: np.ndarray, t: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Gumbel-max choice per slate; returns (first choice mask, second choice mask)."""
        age_h = (t[slate] - self.published[article]) / _US_PER_HOUR
        utility = (
            PREF_WEIGHT * self.log_taste[user[slate], self.category[article]]
            + POP_WEIGHT * self.appeal[article]
            + DWELL_WEIGHT * self.depth[article]
            - age_h / RECENCY_HOURS
        )
        noisy = utility + self.rng.gumbel(size=len(slate))
        order = np.lexsort((-noisy, slate))
        first_in_slate = np.r_[True, slate[order][1:] != slate[order][:-1]]
        rank = np.arange(len(order)) - np.maximum.accumulate(
            np.where(first_in_slate, np.arange(len(order)), 0)
        )
        rank_of = np.empty(len(order), dtype=np.int64)
        rank_of[order] = rank
        return rank_of == 0, rank_of == 1

    def dwell(self, article: np.ndarray) -> np.ndarray:
        seconds = np.exp(
            3.0 + 0.6 * self.depth[article] + 0.8 * self.rng.standard_normal(len(article))
        )
        return np.round(seconds).astype(np.float32)


def _whole_seconds(us: np.ndarray) -> np.ndarray:
    return us // 1_000_000 * 1_000_000


def _with_nulls(values: np.ndarray, p_null: float, rng: np.random.Generator) -> pl.Series:
    """A series of `values` with about `p_null` of them replaced by nulls."""
    return pl.Series(values).scatter(np.flatnonzero(rng.random(len(values)) < p_null), None)


def write_synthetic_ebnerd(
    out_dir: str | Path,
    users: int = 200,
    articles: int = 1500,
    impressions_per_user: int = 10,
    seed: int = 0,
    with_test: bool = False,
    start: datetime = datetime(2023, 5, 1),
) -> Path:
    """Write a synthetic EBNeRD folder in the official layout and return its path.

    `impressions_per_user` impressions per user and split, at random times in the split's
    behaviour window, each with an inview list of 5-100 articles and one click (a second
    with probability SECOND_CLICK_PROB). `with_test` adds an unlabelled `test/` split.
    """
    if users < 2 or articles < 50 or impressions_per_user < 1:
        raise ValueError("need at least 2 users, 50 articles and 1 impression per user")
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    splits = ["train", "validation"] + (["test"] if with_test else [])
    beh_start = np.array(
        [(HISTORY_DAYS + i * BEHAVIOR_DAYS) * _US_PER_DAY for i in range(len(splits))]
    )
    end_us = int(beh_start[-1]) + BEHAVIOR_DAYS * _US_PER_DAY
    model = _Model(rng, users, articles, end_us)
    article_ids = np.arange(articles, dtype=np.int64) + 3_000_000
    user_ids = rng.choice(np.arange(10_000, 10_000 + 100 * users), users, replace=False)
    origin = np.datetime64(start, "us")

    def when(us: np.ndarray) -> np.ndarray:
        return origin + us.astype("timedelta64[us]")

    # Background reads (the choices from unlogged slates), up to the last split's start.
    n_reads = rng.poisson(READS_PER_USER_DAY * beh_start[-1] / _US_PER_DAY, users)
    read_user = np.repeat(np.arange(users), n_reads)
    read_t = _whole_seconds(rng.integers(0, beh_start[-1], len(read_user)))
    slate, art = model.slates(read_t, np.full(len(read_t), READ_SLATE))
    chosen, _ = model.choose(slate, art, read_user, read_t)
    reads_user, reads_art, reads_t = read_user[slate[chosen]], art[chosen], read_t[slate[chosen]]

    # Logged impressions of every split, in time order.
    n_imp = users * impressions_per_user * len(splits)
    imp_user = np.tile(np.repeat(np.arange(users), impressions_per_user), len(splits))
    imp_split = np.repeat(np.arange(len(splits)), users * impressions_per_user)
    imp_t = _whole_seconds(
        beh_start[imp_split] + rng.integers(0, BEHAVIOR_DAYS * _US_PER_DAY, n_imp)
    )
    order = np.lexsort((imp_user, imp_t))
    imp_user, imp_split, imp_t = imp_user[order], imp_split[order], imp_t[order]
    k = np.clip(np.round(np.exp(rng.normal(np.log(12), 0.7, n_imp))), 5, 100).astype(np.int64)
    slate, art = model.slates(imp_t, k)
    first, second = model.choose(slate, art, imp_user, imp_t)
    clicked = first | (second & (rng.random(n_imp)[slate] < SECOND_CLICK_PROB))
    per_slate = (
        pl.DataFrame({"slate": slate, "article": article_ids[art], "clicked": clicked})
        .group_by("slate", maintain_order=True)
        .agg(
            pl.col("article").alias("article_ids_inview"),
            pl.col("article").filter(pl.col("clicked")).alias("article_ids_clicked"),
        )
    )

    # A history read per background read and per logged click (at the impression time,
    # with the clicked page's read time), as the official histories hold both.
    n_clicks = int(clicked.sum())
    click_dwell = model.dwell(art[clicked])
    reads = pl.DataFrame(
        {
            "user_id": user_ids[np.r_[reads_user, imp_user[slate[clicked]]]],
            "article_id": article_ids[np.r_[reads_art, art[clicked]]],
            "t": when(np.r_[reads_t, imp_t[slate[clicked]]]),
            "read_time": np.r_[model.dwell(reads_art), click_dwell],
            "scroll": _with_nulls(
                np.round(rng.uniform(10, 100, len(reads_art) + n_clicks)).astype(np.float32),
                0.15,
                rng,
            ),
        }
    )

    on_page = rng.random(n_imp) < 0.4
    n_before = np.maximum(np.searchsorted(model.published, imp_t), 1)
    page_idx = (rng.random(n_imp) * n_before).astype(np.int64)
    page = article_ids[page_idx]
    # As in EBNeRD, read_time is the time spent on the page the slate was shown on (the
    # article page, or the front page) and next_read_time the time on the clicked article.
    page_time = np.where(
        on_page, model.dwell(page_idx), np.round(np.exp(rng.normal(2.0, 1.0, n_imp)))
    ).astype(np.float32)
    next_time = np.full(n_imp, np.nan, dtype=np.float32)
    next_time[slate[first]] = click_dwell[first[clicked]]
    behaviors = pl.DataFrame(
        {
            "slate": np.arange(n_imp),
            "impression_id": (np.arange(n_imp) * 7 + 11).astype(np.uint32),
            "article_id": pl.Series(page).scatter(np.flatnonzero(~on_page), None),
            "impression_time": when(imp_t),
            "read_time": page_time,
            "scroll_percentage": _with_nulls(
                np.round(rng.uniform(0, 100, n_imp)).astype(np.float32), 0.3, rng
            ),
            "device_type": rng.integers(1, 4, n_imp).astype(np.int8),
            "user_id": user_ids[imp_user],
            "session_id": rng.integers(1, 1_000_000, users)[imp_user] + np.arange(n_imp) // 3,
            "next_read_time": _with_nulls(next_time, 0.05, rng),
            "next_scroll_percentage": _with_nulls(
                np.round(rng.uniform(0, 100, n_imp)).astype(np.float32), 0.2, rng
            ),
            "is_beyond_accuracy": rng.random(n_imp) < 0.1,
            "split": np.array(splits)[imp_split],
        }
    )
    profile = pl.DataFrame(
        {
            "user_id": user_ids,
            "is_sso_user": rng.random(users) < 0.8,
            "gender": _with_nulls(rng.integers(0, 2, users).astype(np.int8), 0.5, rng),
            "postcode": _with_nulls(rng.integers(0, 5, users).astype(np.int8), 0.6, rng),
            "age": _with_nulls((rng.integers(2, 9, users) * 10).astype(np.int8), 0.5, rng),
            "is_subscriber": rng.random(users) < 0.3,
        }
    )
    behaviors = behaviors.join(per_slate, on="slate", how="left").join(
        profile, on="user_id", how="left"
    )

    # The whole-period totals EBNeRD ships with its articles (future information, kept so
    # the loader's leakage guard has something real to guard against).
    totals = (
        behaviors.select(pl.col("article_ids_inview").alias("article_id"))
        .explode("article_id")
        .group_by("article_id")
        .agg(pl.len().alias("total_inviews"))
        .join(
            reads.group_by("article_id").agg(
                pl.len().alias("total_pageviews"),
                pl.col("read_time").sum().alias("total_read_time"),
            ),
            on="article_id",
            how="full",
            coalesce=True,
        )
    )
    arts = _articles_frame(rng, article_ids, model.category, model.published).with_columns(
        published_time=pl.Series(when(model.published)),
        last_modified_time=pl.Series(
            when(model.published + rng.integers(0, 6 * _US_PER_HOUR, articles))
        ),
    )
    arts = arts.drop("total_inviews", "total_pageviews", "total_read_time").join(
        totals.with_columns(pl.col("article_id").cast(pl.Int32)), on="article_id", how="left"
    )
    _write(arts, ARTICLES_SCHEMA, out / ARTICLES_FILE)

    for i, split in enumerate(splits):
        s_start = when(beh_start[i : i + 1])[0]
        h_start = when(beh_start[i : i + 1] - HISTORY_DAYS * _US_PER_DAY)[0]
        hist = (
            reads.filter((pl.col("t") >= h_start) & (pl.col("t") < s_start))
            .sort("user_id", "t", "article_id")
            .group_by("user_id", maintain_order=True)
            .agg(
                pl.col("t").alias("impression_time_fixed"),
                pl.col("scroll").alias("scroll_percentage_fixed"),
                pl.col("article_id").alias("article_id_fixed"),
                pl.col("read_time").alias("read_time_fixed"),
            )
        )
        _write(hist, HISTORY_SCHEMA, out / split / HISTORY_FILE)
        beh = behaviors.filter(pl.col("split") == split).drop("split", "slate")
        schema = TEST_BEHAVIORS_SCHEMA if split == "test" else BEHAVIORS_SCHEMA
        _write(beh, schema, out / split / BEHAVIORS_FILE)
    return out

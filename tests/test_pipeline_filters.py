"""Candidate hydration and every pre-scoring filter, each on hand-made candidates."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from types import SimpleNamespace

import polars as pl
import pytest

from feed_dagster.data.schema import conform
from feed_dagster.pipeline.config import FilterConfig
from feed_dagster.pipeline.filters import (
    PRE_SCORING_FILTERS,
    dedupe_reposts,
    drop_blocked_muted_authors,
    drop_deleted_posts,
    drop_duplicates,
    drop_missing_core_data,
    drop_muted_keywords,
    drop_out_of_network_replies_reposts,
    drop_own_posts,
    drop_previously_seen,
    drop_previously_served,
    drop_too_old,
    keep_out_of_network_budget,
)
from feed_dagster.pipeline.hydrators import (
    hydrate_author_handles,
    hydrate_core_data,
    post_fields,
)
from feed_dagster.pipeline.query import Query, hydrate_query, normalise_text

NOW = datetime(2026, 1, 3)
H = timedelta(hours=1)
CFG = FilterConfig()

# (article_id, author_id, kind, parent_id, hours before now, text)
POSTS = [
    (200, 20, "original", None, 1, "Great match today"),
    (201, 1, "original", None, 1, "my own post"),
    (202, 21, "repost", 201, 1, "my own post"),
    (203, 22, "reply", 200, 1, "agreed"),
    (204, 23, "repost", 200, 1, "Great match today"),
    (205, 24, "original", None, 1, "The WORLD  cup, final!"),
    (206, 25, "original", None, 1, "worldwide cupcakes"),
    (207, 26, "original", None, 1, "from a blocked account"),
    (208, 27, "original", None, 1, "from a muted account"),
    (209, 28, "original", None, 1, "from an account that blocked me"),
    (210, 29, "original", None, 1, "seen already"),
    (211, 29, "original", None, 1, "served last time"),
    (213, 30, "original", None, 49, "too old"),
    (214, 31, "repost", 207, 1, "from a blocked account"),
    (215, 32, "repost", 210, 1, "seen already"),
]
# (article_id, in_network) candidates of user 1, in pipeline order; 212 is unknown and
# 200 comes twice.
CANDIDATES = [
    (200, True),
    (204, True),
    (201, False),
    (202, False),
    (203, False),
    (205, False),
    (206, False),
    (207, False),
    (208, False),
    (209, False),
    (210, False),
    (211, False),
    (212, False),
    (213, False),
    (214, True),
    (215, True),
    (200, False),
]


def tables() -> dict[str, pl.DataFrame]:
    a, au, k, par, hours, text = zip(*POSTS, strict=True)
    articles = conform(
        "articles",
        pl.DataFrame(
            {
                "article_id": a,
                "author_id": au,
                "kind": k,
                "parent_id": par,
                "conversation_id": a,
                "published_at": [NOW - h * H for h in hours],
                "title": [t.split()[0] for t in text],
                "text": text,
            }
        ),
    )
    return {
        "articles": articles,
        "users": conform("users", pl.DataFrame({"user_id": [20, 21], "handle": ["ann", "bob"]})),
        "blocks": conform("blocks", pl.DataFrame({"user_id": [1, 28], "blocked_id": [26, 1]})),
        "mutes": conform("mutes", pl.DataFrame({"user_id": [1], "muted_id": [27]})),
        "muted_keywords": conform(
            "muted_keywords", pl.DataFrame({"user_id": [1, 1], "keyword": ["World Cup", "world"]})
        ),
        "impressions": conform(
            "impressions",
            pl.DataFrame({"user_id": [1], "article_id": [210], "shown_at": [NOW - 2 * H]}),
        ),
    }


def query() -> Query:
    served = pl.DataFrame({"user_id": [1], "article_id": [211]})
    return hydrate_query(tables(), [1], NOW, served=served)


def candidates() -> pl.DataFrame:
    ids, in_net = zip(*CANDIDATES, strict=True)
    rows = pl.DataFrame(
        {
            "user_id": [1] * len(ids),
            "article_id": ids,
            "in_network": in_net,
            "source_rank": list(range(1, len(ids) + 1)),
        }
    )
    return hydrate_core_data(rows, tables()["articles"])


def removed_ids(fn) -> list[int]:
    c = candidates()
    kept, removed = fn(c, query(), CFG)
    assert removed == c.height - kept.height
    # Filters keep the order of the rows they keep.
    assert kept["source_rank"].is_sorted()
    gone = c.join(kept, on=["user_id", "source_rank"], how="anti")
    return gone["article_id"].to_list()


def test_hydrate_core_data_and_originals() -> None:
    c = candidates()
    assert c.height == len(CANDIDATES)
    assert c["source_rank"].to_list() == list(range(1, len(CANDIDATES) + 1))
    row = c.filter(pl.col("article_id") == 204).row(0, named=True)
    assert (row["author_id"], row["kind"], row["original_id"], row["original_author_id"]) == (
        23,
        "repost",
        200,
        20,
    )
    own = c.filter(pl.col("article_id") == 205).row(0, named=True)
    assert (own["original_id"], own["original_author_id"]) == (205, 24)
    unknown = c.filter(pl.col("article_id") == 212).row(0, named=True)
    assert unknown["kind"] is None and unknown["published_at"] is None


def test_hydrate_author_handles() -> None:
    out = hydrate_author_handles(candidates().head(4), tables()["users"])
    assert out["author_handle"].to_list() == ["ann", None, None, "bob"]


def test_drop_duplicates_keeps_first() -> None:
    assert removed_ids(drop_duplicates) == [200]
    c = candidates()
    kept, _ = drop_duplicates(c, query(), CFG)
    assert kept.filter(pl.col("article_id") == 200)["in_network"].to_list() == [True]


def test_drop_missing_core_data() -> None:
    assert removed_ids(drop_missing_core_data) == [212]


def test_drop_too_old() -> None:
    # The unknown post has no publish time either: it is no longer fresh.
    assert removed_ids(drop_too_old) == [212, 213]


def test_drop_own_posts_and_reposts_of_them() -> None:
    assert removed_ids(drop_own_posts) == [201, 202]


def test_drop_out_of_network_replies_reposts() -> None:
    # 204 (repost) and 214/215 are in-network, so they stay.
    assert removed_ids(drop_out_of_network_replies_reposts) == [202, 203]


def test_dedupe_reposts_repost_and_original_count_once() -> None:
    # 204 reposts 200, 202 reposts 201, 214 reposts 207, 215 reposts 210: each original
    # came first, so the reposts go; the second 200 row is the same original again.
    assert removed_ids(dedupe_reposts) == [204, 202, 214, 215, 200]


def test_drop_previously_seen_including_reposts() -> None:
    assert removed_ids(drop_previously_seen) == [210, 215]


def test_drop_previously_served() -> None:
    assert removed_ids(drop_previously_served) == [211]


def test_drop_muted_keywords_whole_words_case_insensitive() -> None:
    # "World Cup" / "world" match "The WORLD  cup, final!" but not "worldwide cupcakes".
    assert removed_ids(drop_muted_keywords) == [205]


def test_drop_deleted_posts() -> None:
    assert removed_ids(drop_deleted_posts) == []  # no tombstones: nothing goes
    deleted = conform("deleted_posts", pl.DataFrame({"article_id": [200, 207]}))
    q = hydrate_query({**tables(), "deleted_posts": deleted}, [1], NOW)
    c = candidates()
    kept, removed = drop_deleted_posts(c, q, CFG)
    # 200 (twice) and 207 are deleted; 204 and 214 repost them and show their content.
    gone = c.join(kept, on=["user_id", "source_rank"], how="anti")["article_id"].to_list()
    assert gone == [200, 204, 207, 214, 200]
    assert removed == 5 and kept["source_rank"].is_sorted()


def test_drop_blocked_muted_authors() -> None:
    # 207 blocked, 208 muted, 209's author blocked the user, 214 reposts a blocked author.
    assert removed_ids(drop_blocked_muted_authors) == [207, 208, 209, 214]
    kept, _ = drop_blocked_muted_authors(candidates(), query(), FilterConfig(drop_blocked_by=False))
    assert 209 in kept["article_id"].to_list()


def test_filter_chain_reports_every_removal() -> None:
    c = candidates()
    q = query()
    total = 0
    for _name, fn in PRE_SCORING_FILTERS:
        c, removed = fn(c, q, CFG)
        total += removed
    assert c["article_id"].to_list() == [200, 206]
    assert total == len(CANDIDATES) - 2


def test_core_data_of_the_candidates_posts_equals_the_whole_catalogs() -> None:
    """Fields are built for the candidates' posts only, their reposted parents still found
    among every post: the same rows as joining the fields of every post."""
    articles = tables()["articles"]
    rows = pl.DataFrame(
        {
            "user_id": [1, 1, 2, 2, 2],
            "article_id": [*articles["article_id"].to_list()[-3:], 10**9, 202],
        }
    )
    want = rows.join(post_fields(articles), on="article_id", how="left", maintain_order="left")
    got = hydrate_core_data(rows, articles)
    assert got.equals(want)
    assert got["original_id"].null_count() == 1  # the unknown post


def test_drop_muted_keywords_each_users_own_phrases_overlapping() -> None:
    # One pass finds every keyword a post holds, overlapping ones too, and each user loses
    # only the posts with their own keywords, as whole words or phrases.
    kw = pl.DataFrame({"user_id": [1, 1, 2], "keyword": ["New York", "york", "york city"]})
    q = SimpleNamespace(
        muted_keywords=kw.select("user_id", normalise_text(pl.col("keyword")).alias("keyword"))
    )
    posts = {
        300: ("New York City", "marathon day"),  # user 1 twice, user 2 once
        301: ("Yorkshire pudding", None),  # "york" is not a word here
        302: ("Meet the new yorker", "york"),  # user 1 ("york" in the text), not user 2
        303: (None, "new  YORK, city!"),  # punctuation and case are not words
    }
    c = pl.DataFrame(
        [
            {"user_id": u, "article_id": a, "title": t, "text": x}
            for u in (1, 2, 3)
            for a, (t, x) in posts.items()
        ]
    )
    kept, removed = drop_muted_keywords(c, q, CFG)
    gone = c.join(kept, on=["user_id", "article_id"], how="anti")
    assert sorted(gone.select("user_id", "article_id").rows()) == [
        (1, 300),
        (1, 302),
        (1, 303),
        (2, 300),
        (2, 303),
    ]
    assert removed == 5 and kept.filter(pl.col("user_id") == 3).height == 4


def test_normalise_text_is_the_words_joined_by_single_spaces_and_padded() -> None:
    # The lower-cased \w+ words joined by single spaces, padded: what extracting the words
    # and joining them gives, for punctuation at either end, runs of it, tabs, underscores,
    # non-ASCII letters and digits, text without a word, empty text and null.
    texts = [
        "New York",
        "  --New  YORK, city!!",
        "tab\tand\nnewline",
        "snake_case & co.",
        "Zürich über-alles ÉTÉ 2024",
        "...?!",
        "",
        None,
        "a",
    ]
    frame = pl.DataFrame({"t": texts}, schema={"t": pl.String})
    got = frame.select(normalise_text(pl.col("t")).alias("t"))["t"]
    words = [re.findall(r"\w+", (t or "").lower()) for t in texts]
    assert got.to_list() == [" " + " ".join(w) + " " for w in words]
    assert got[1] == " new york city " and got[5] == "  " and got[7] == "  "


def budget_candidates(in_network: dict[int, int], out_of_network: int) -> pl.DataFrame:
    """Candidates in pipeline order: per user, `in_network[user]` in-network rows, then
    `out_of_network` out-of-network rows with article ids 1000 + source rank."""
    rows = []
    for user, n_in in in_network.items():
        rows += [(user, 100 + i, True, i + 1) for i in range(n_in)]
        rows += [(user, 1000 + r, False, r) for r in range(1, out_of_network + 1)]
    return pl.DataFrame(
        rows, schema=["user_id", "article_id", "in_network", "source_rank"], orient="row"
    )


def test_out_of_network_budget_cuts_only_users_whose_in_network_posts_fill_the_selection() -> None:
    # User 1 has 3 in-network candidates (the selection's top 3 full), user 2 has 2, user 3 4.
    c = budget_candidates({1: 3, 2: 2, 3: 4}, out_of_network=6)
    kept, removed = keep_out_of_network_budget(c, budget=2, top_k=3)
    out = kept.filter(~pl.col("in_network"))
    per_user = {u: g["source_rank"].to_list() for (u,), g in out.group_by("user_id")}
    # The best two by source rank for users 1 and 3; all six for user 2.
    assert per_user == {1: [1, 2], 2: [1, 2, 3, 4, 5, 6], 3: [1, 2]}
    assert kept.filter(pl.col("in_network")).height == 9
    assert removed == 8 and kept.height == c.height - 8
    # Order is kept: later filters and scorers read the rows in pipeline order.
    assert kept.equals(c.join(kept, on=c.columns, how="semi", maintain_order="left"))
    # No budget keeps every row; a zero budget drops every out-of-network row of users 1 and 3.
    assert keep_out_of_network_budget(c, None, 3).kept.equals(c)
    zero = keep_out_of_network_budget(c, 0, 3).kept
    assert zero.filter(~pl.col("in_network"))["user_id"].unique().to_list() == [2]


def test_users_short_of_the_selection_keep_their_best_short_budget() -> None:
    # User 1's in-network candidates fill the top 3, user 2's (2) fall short, user 3 has none.
    c = budget_candidates({1: 3, 2: 2, 3: 0}, out_of_network=6)
    kept = keep_out_of_network_budget(c, budget=2, top_k=3, short_budget=4).kept
    out = kept.filter(~pl.col("in_network"))
    per_user = {u: g["source_rank"].to_list() for (u,), g in out.group_by("user_id")}
    assert per_user == {1: [1, 2], 2: [1, 2, 3, 4], 3: [1, 2, 3, 4]}
    assert kept.filter(pl.col("in_network")).height == 5
    # Either budget alone: the other group keeps everything.
    only_short = keep_out_of_network_budget(c, None, 3, short_budget=1).kept
    assert only_short.filter(~pl.col("in_network") & (pl.col("user_id") == 1)).height == 6
    assert only_short.filter(~pl.col("in_network") & (pl.col("user_id") == 3)).height == 1
    assert keep_out_of_network_budget(c, 2, 3).kept.filter(pl.col("user_id") == 3).height == 6
    with pytest.raises(ValueError, match="out_of_network_scored_short"):
        FilterConfig(out_of_network_scored_short=-1)


def test_out_of_network_budget_rejects_a_negative_budget() -> None:
    with pytest.raises(ValueError, match="out_of_network_scored"):
        FilterConfig(out_of_network_scored=-1)

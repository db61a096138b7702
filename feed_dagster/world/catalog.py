"""A catalogue-shaped synthetic world (films, products, courses), generated from a seed.

Where the social world (generate.py) rewards freshness and follows, here the collaborative
signal dominates:
- items were published months to years before the logged period and never expire, so
  recency says nothing (World.candidate_window is None);
- true affinity = taste (dot product of user and item latent vectors) + item popularity
  (heavy-tailed); genre, title and text are only weakly tied to the latent vectors;
- every user has a long organic history (clicks outside any logged slate, favorites for a
  strong like) sampled without repetition from their softmax over items, spread over the
  window; then a few logged slates, mostly in the last days, mixing popular and random items
  the user has not engaged with, clicked with the true probability
  sigmoid(bias + user bias + affinity - position bias * position).
The last `heldout_share` of the slates (by time) is the held-out period, with the true
click/favorite probabilities in impression_truth.

No author accounts: author_id is null, because in the canonical schema an author is a user
(handles, follows, the viewer's-own-post filter) and a studio or brand is not one. Without
authors there is no follow graph, so follows, topic_follows, blocks, mutes and
muted_keywords are empty.

Everything is vectorised numpy; the only Python loops run over user chunks and over items
for their strings.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from feed_dagster.data.schema import ACTIONS, TABLE_SCHEMAS, World, conform
from feed_dagster.sorted_search import unique

DAY = 86_400
GENRES: tuple[str, ...] = (
    "drama",
    "comedy",
    "thriller",
    "documentary",
    "romance",
    "scifi",
    "animation",
    "horror",
    "crime",
    "family",
    "adventure",
    "history",
)
# Title and description filler that says nothing about taste: drawn independently of the
# latent vectors, so only the occasional genre word links text to preferences.
GENERIC_WORDS: tuple[str, ...] = (
    "the", "last", "night", "house", "river", "story", "secret", "return", "blue", "city",
    "little", "long", "road", "home", "summer", "winter", "light", "edge", "world", "great",
    "first", "young", "old", "silent", "golden", "north", "island", "heart", "time", "garden",
    "letter", "game", "stone", "fire", "glass", "journey", "season", "shadow", "morning",
    "promise", "complete", "edition", "collection", "guide", "classic", "deluxe", "original",
    "volume", "part", "series", "new", "essential", "special", "best", "inside", "beyond",
)  # fmt: skip


@dataclass(frozen=True)
class CatalogConfig:
    n_users: int
    n_items: int
    # Organic (outside any logged slate) engagements per user, on average.
    mean_history: float
    seed: int = 0
    dim: int = 24
    # Logged period; items are published up to catalog_years before it opens.
    days: float = 90.0
    catalog_years: float = 3.0
    # Standard deviations of the taste term (user . item) and of log-popularity: taste is
    # the larger, so knowing who the user is beats knowing what is popular.
    taste_scale: float = 2.0
    popularity_sigma: float = 1.0
    # How much of an item's latent vector its genre explains (share of variance = this^2).
    genre_weight: float = 0.3
    # Chance that the genre word appears in a title / a description.
    genre_in_title: float = 0.15
    genre_in_text: float = 0.3
    # Logged slates per user (uniform in [min, max]), their size, and the share of slots
    # filled from popular items (the rest uniformly at random).
    slates_min: int = 2
    slates_max: int = 6
    slate_size: int = 10
    popular_share: float = 0.5
    # Slate times: now minus an exponential age with this mean, so most are recent.
    slate_age_days: float = 5.0
    heldout_share: float = 0.2
    # Click logit = click_bias + user bias + affinity - position_bias * position.
    click_bias: float = -3.0
    user_bias_sigma: float = 0.3
    position_bias: float = 0.08
    # P(favorite | engaged) = sigmoid(taste - favorite_threshold).
    favorite_threshold: float = 4.5
    window_start: datetime = datetime(2026, 1, 1)

    def __post_init__(self) -> None:
        if self.n_users < 20 or self.n_items < 20:
            raise ValueError("a catalog needs at least 20 users and 20 items")
        if not 0 < self.heldout_share < 1:
            raise ValueError("heldout_share must be in (0, 1)")
        if not 1 <= self.slates_min <= self.slates_max:
            raise ValueError("need 1 <= slates_min <= slates_max")
        if self.slate_size < 2:
            raise ValueError("slate_size must be at least 2")
        if not 0 < self.mean_history < self.n_items / 4:
            raise ValueError("mean_history must be in (0, n_items / 4)")


CATALOG_SCALES: dict[str, CatalogConfig] = {
    "catalog": CatalogConfig(n_users=2_000, n_items=2_000, mean_history=40),
    "catalog-tiny": CatalogConfig(n_users=200, n_items=300, mean_history=25),
}


def catalog_config(scale: str = "catalog", **overrides: object) -> CatalogConfig:
    """The named catalog scale's configuration with any field overridden (None ignored)."""
    if scale not in CATALOG_SCALES:
        expected = sorted(CATALOG_SCALES)
        raise ValueError(f"unknown catalog scale {scale!r}; expected one of {expected}")
    unknown = set(overrides) - set(CatalogConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown catalog settings {sorted(unknown)}")
    return replace(CATALOG_SCALES[scale], **{k: v for k, v in overrides.items() if v is not None})


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _sample_weighted(weights: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k indices drawn with replacement with probability proportional to weights."""
    cum = np.cumsum(weights, dtype=np.float64)
    return np.searchsorted(cum, rng.random(k) * cum[-1], side="right").clip(0, len(cum) - 1)


def _rank_within(group: np.ndarray) -> np.ndarray:
    """0-based position of each row inside its run of equal (sorted) group values."""
    starts = np.r_[0, np.flatnonzero(np.diff(group)) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(group)]))
    return (np.arange(len(group)) - run_start).astype(np.int32)


def generate_catalog(cfg: CatalogConfig) -> World:
    """Every canonical table of a catalog world. Same config and seed give identical tables."""
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(6)]
    rng_items, rng_users, rng_text, rng_history, rng_slates, rng_clicks = rngs
    span = int(cfg.days * DAY)
    start_us = int((cfg.window_start - datetime(1970, 1, 1)) / timedelta(microseconds=1))

    def ts(seconds: np.ndarray) -> pl.Series:
        return pl.Series(start_us + seconds.astype(np.int64) * 1_000_000).cast(pl.Datetime("us"))

    items = _items(cfg, rng_items)
    users = _users(cfg, rng_users)
    title, text = _texts(cfg, items["genre"], rng_text)
    history = _organic_history(cfg, users, items, span, rng_history)
    slates = _slates(cfg, users, items, history, span, rng_slates, rng_clicks)
    heldout_from = slates["heldout_from"]

    organic = pl.DataFrame(
        {
            "user_id": history["user"],
            "article_id": history["item"],
            "impression_id": pl.Series([None] * len(history["user"]), dtype=pl.Int64),
            "engaged_at": ts(history["time"]),
            "click": np.ones(len(history["user"]), dtype=bool),
            "favorite": history["favorite"],
            "dwell_seconds": history["dwell"],
        }
    )
    c = slates["clicked"]
    from_slates = pl.DataFrame(
        {
            "user_id": slates["user"][c],
            "article_id": slates["item"][c],
            "impression_id": slates["sid"][c],
            "engaged_at": ts(slates["engaged"][c]),
            "click": np.ones(int(c.sum()), dtype=bool),
            "favorite": slates["favorite"][c],
            "dwell_seconds": slates["dwell"][c],
        }
    )
    engagements = pl.concat(
        [conform("engagements", organic), conform("engagements", from_slates)]
    ).sort("engaged_at", "user_id", "article_id", maintain_order=True)

    held = slates["time"] >= heldout_from
    probs = slates["probs"]
    tables = {
        "users": pl.DataFrame(
            {
                "user_id": np.arange(cfg.n_users, dtype=np.int64),
                "handle": [f"user{i}" for i in range(cfg.n_users)],
                "created_at": ts(users["created"]),
            }
        ),
        "articles": pl.DataFrame(
            {
                "article_id": np.arange(cfg.n_items, dtype=np.int64),
                "author_id": pl.Series([None] * cfg.n_items, dtype=pl.Int64),
                "published_at": ts(items["published"]),
                "kind": ["original"] * cfg.n_items,
                "conversation_id": np.arange(cfg.n_items, dtype=np.int64),
                "topic": items["genre"].astype(np.int32),
                "topic_name": pl.Series(np.array(GENRES)[items["genre"]]),
                "title": title,
                "text": text,
            }
        ),
        "impressions": pl.DataFrame(
            {
                "impression_id": slates["sid"],
                "user_id": slates["user"],
                "article_id": slates["item"],
                "position": slates["position"],
                "shown_at": ts(slates["time"]),
                "is_heldout": held,
            }
        ),
        "engagements": engagements,
        "impression_truth": pl.DataFrame(
            {
                "impression_id": slates["sid"][held],
                "article_id": slates["item"][held],
                **{
                    f"true_p_{a}": (
                        probs[a][held] if a in probs else np.zeros(int(held.sum()), np.float32)
                    )
                    for a in ACTIONS
                },
                # Expected dwell of a shown item (0 when not clicked), as in the social world.
                "true_dwell_seconds": probs["click"][held] * slates["dwell_mean"][held],
            }
        ),
    }
    tables = {name: conform(name, df) for name, df in tables.items()}
    empty = {
        name: pl.DataFrame(schema=TABLE_SCHEMAS[name])
        for name in ("follows", "topic_follows", "blocks", "mutes", "muted_keywords")
    }
    return World(
        **tables,
        **empty,
        window_start=cfg.window_start,
        heldout_start=cfg.window_start + timedelta(seconds=int(heldout_from)),
        now=cfg.window_start + timedelta(seconds=span),
        candidate_window=None,
    )


def _items(cfg: CatalogConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n, d = cfg.n_items, cfg.dim
    # Genres of uneven size, as in real catalogues (many dramas, few documentaries).
    genre_share = rng.dirichlet(np.full(len(GENRES), 2.0))
    genre = _sample_weighted(genre_share, n, rng)
    centre = rng.standard_normal((len(GENRES), d))
    w = cfg.genre_weight
    # Unit variance per component either way; the genre explains w^2 of it.
    vec = np.sqrt(1.0 - w * w) * rng.standard_normal((n, d)) + w * centre[genre]
    return {
        "genre": genre,
        "vec": vec.astype(np.float32),
        # Log-normal popularity: exp(popularity) is heavy-tailed across items.
        "popularity": (cfg.popularity_sigma * rng.standard_normal(n)).astype(np.float32),
        "published": -rng.integers(DAY, int(cfg.catalog_years * 365 * DAY), size=n),
    }


def _users(cfg: CatalogConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = cfg.n_users
    activity = rng.lognormal(0.0, 0.9, size=n)
    activity /= activity.mean()
    length = np.clip(rng.poisson(cfg.mean_history * activity), 1, cfg.n_items // 2)
    return {
        "vec": rng.standard_normal((n, cfg.dim)).astype(np.float32),
        "history_len": length,
        "click_bias": (cfg.user_bias_sigma * rng.standard_normal(n)).astype(np.float32),
        # Accounts exist before the window opens (up to two years).
        "created": -rng.integers(DAY, 2 * 365 * DAY, size=n),
    }


def _taste(cfg: CatalogConfig, user_vec: np.ndarray, item_vec: np.ndarray) -> np.ndarray:
    """User . item scaled so that its standard deviation is taste_scale."""
    return (user_vec @ item_vec.T) * (cfg.taste_scale / np.sqrt(cfg.dim))


def _texts(
    cfg: CatalogConfig, genre: np.ndarray, rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    """Titles of 2-4 and descriptions of 8-12 generic words; the genre word only sometimes."""
    words = np.array(GENERIC_WORDS)
    names = np.array(GENRES)[genre]
    n = len(genre)
    t_words = words[rng.integers(0, len(words), (n, 4))]
    t_len = rng.integers(2, 5, size=n)
    t_genre = rng.random(n) < cfg.genre_in_title
    d_words = words[rng.integers(0, len(words), (n, 12))]
    d_len = rng.integers(8, 13, size=n)
    d_genre = rng.random(n) < cfg.genre_in_text
    titles, texts = [], []
    for i in range(n):
        tw = t_words[i, : t_len[i]].tolist()
        if t_genre[i]:
            tw[-1] = names[i]
        titles.append(" ".join(tw).capitalize())
        dw = d_words[i, : d_len[i]].tolist()
        if d_genre[i]:
            dw[0] = names[i]
        texts.append(" ".join(dw))
    return titles, texts


def _dwell_mean(taste: np.ndarray) -> np.ndarray:
    """Mean seconds spent with an engaged item: longer for a better match."""
    return np.exp(5.5 + 0.3 * taste).astype(np.float32)


def _organic_history(
    cfg: CatalogConfig,
    users: dict[str, np.ndarray],
    items: dict[str, np.ndarray],
    span: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Each user's organic engagements: history_len distinct items drawn from
    softmax(taste + popularity) without replacement (Gumbel top-k), at uniform times."""
    length = users["history_len"]
    parts: dict[str, list[np.ndarray]] = {"user": [], "item": [], "taste": []}
    chunk = max(1, 4_000_000 // cfg.n_items)  # bounds the dense user x item block
    for u0 in range(0, cfg.n_users, chunk):
        u1 = min(cfg.n_users, u0 + chunk)
        taste = _taste(cfg, users["vec"][u0:u1], items["vec"])
        keys = taste + items["popularity"] + rng.gumbel(size=taste.shape)
        k = int(length[u0:u1].max())
        top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
        # argpartition leaves the top k unordered; order them so the first history_len win.
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(keys, top, 1), 1), 1)
        keep = np.arange(k)[None, :] < length[u0:u1, None]
        rows = np.nonzero(keep)[0]
        item = top[keep]
        parts["user"].append(u0 + rows)
        parts["item"].append(item)
        parts["taste"].append(taste[rows, item])
    user = np.concatenate(parts["user"]).astype(np.int64)
    item = np.concatenate(parts["item"]).astype(np.int64)
    taste = np.concatenate(parts["taste"])
    n = len(user)
    favorite = rng.random(n) < _sigmoid(taste - cfg.favorite_threshold)
    dwell = rng.lognormal(np.log(_dwell_mean(taste)), 0.5).astype(np.float32)
    return {
        "user": user,
        "item": item,
        "time": rng.integers(0, span, size=n),
        "favorite": favorite,
        "dwell": dwell,
    }


def _slates(
    cfg: CatalogConfig,
    users: dict[str, np.ndarray],
    items: dict[str, np.ndarray],
    history: dict[str, np.ndarray],
    span: int,
    rng: np.random.Generator,
    rng_clicks: np.random.Generator,
) -> dict:
    """Logged slates (one row per shown item) with clicks drawn from the true model."""
    n_users, n_items, size = cfg.n_users, cfg.n_items, cfg.slate_size
    counts = rng.integers(cfg.slates_min, cfg.slates_max + 1, size=n_users)
    s_user = np.repeat(np.arange(n_users), counts)
    age = rng.exponential(cfg.slate_age_days * DAY, size=len(s_user))
    s_time = np.maximum(span - 1 - age.astype(np.int64), 0)
    order = np.lexsort((s_user, s_time))
    s_user, s_time = s_user[order], s_time[order]

    # Twice the slots needed, so that dropping engaged items and repeats still fills slates.
    m = 2 * size
    u = np.repeat(s_user, m)
    sid = np.repeat(np.arange(len(s_user)), m)
    # The logging policy knows popularity only from what users engaged with.
    engaged_count = np.bincount(history["item"], minlength=n_items).astype(np.float64)
    popular = rng.random(len(u)) < cfg.popular_share
    item = rng.integers(0, n_items, size=len(u))
    item[popular] = _sample_weighted(engaged_count + 1.0, int(popular.sum()), rng)
    seen = unique(history["user"] * n_items + history["item"])
    key = u * n_items + item
    at = np.searchsorted(seen, key).clip(0, len(seen) - 1)
    ok = seen[at] != key
    u, sid, item = u[ok], sid[ok], item[ok]
    _, first = np.unique(sid * n_items + item, return_index=True)
    first.sort()
    u, sid, item = u[first], sid[first], item[first]
    position = _rank_within(sid)
    keep = position < size
    u, sid, item, position = u[keep], sid[keep], item[keep], position[keep]
    t = s_time[sid]

    taste = np.einsum("nd,nd->n", users["vec"][u], items["vec"][item]) * (
        cfg.taste_scale / np.sqrt(cfg.dim)
    )
    logit = (
        cfg.click_bias
        + users["click_bias"][u]
        + taste
        + items["popularity"][item]
        - cfg.position_bias * position
    )
    p_click = _sigmoid(logit).astype(np.float32)
    p_fav = (p_click * _sigmoid(taste - cfg.favorite_threshold)).astype(np.float32)
    dwell_mean = _dwell_mean(taste)
    n = len(u)
    r = rng_clicks.random(n)
    clicked = r < p_click
    # One draw decides both: favorite (a strong like) only ever comes with a click.
    favorite = r < p_fav
    dwell = np.where(clicked, rng_clicks.lognormal(np.log(dwell_mean), 0.5), 0.0)
    engaged = np.minimum(t + rng_clicks.integers(5, 300, size=n), span - 1)
    heldout_from = int(np.quantile(s_time, 1.0 - cfg.heldout_share))
    return {
        "sid": sid.astype(np.int64),
        "user": u.astype(np.int64),
        "item": item.astype(np.int64),
        "position": position,
        "time": t,
        "clicked": clicked,
        "favorite": favorite,
        "dwell": dwell.astype(np.float32),
        "engaged": engaged,
        "probs": {"click": p_click, "favorite": p_fav},
        "dwell_mean": dwell_mean,
        "heldout_from": heldout_from,
    }

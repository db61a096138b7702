"""The embedded synthetic social world, generated deterministically from a seed.

What it models, in order:
- users with sparse topic interests (one dominant "community"), activity and author quality;
- a follow graph grown by preferential attachment in arrival batches (Price's model), mostly
  inside the follower's community, plus follow-backs: heavy-tailed in-degree, mutual follows;
- blocks, mutes, muted keywords, followed topics;
- posts (originals, replies with a conversation root, reposts, quotes) over the time window,
  text drawn from topic vocabularies;
- impressions: sessions that show a slate of recent posts (from followed accounts, from the
  user's topics, or anything recent), and multi-action engagements drawn from a hidden
  ground-truth model of topic match, follow, author affinity, recency, quality and position.
For the held-out period the ground-truth probabilities are kept (impression_truth).

Everything is vectorised numpy; the only Python loops run over batches and topics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from feed_dagster.data.schema import ACTIONS, TABLE_SCHEMAS, World, conform
from feed_dagster.data.world_stream import STREAMED_TABLES, WorldStream
from feed_dagster.sorted_search import unique
from feed_dagster.world.config import WorldConfig
from feed_dagster.world.vocabulary import COMMON, TOPICS

HOUR = 3600
# Shown slots per chunk of impressions: what the generator (and a warehouse appending the
# chunks) holds at a time, about 0.1 GiB of frames.
CHUNK_SLOTS = 2_000_000
# Posts whose words are joined into texts at a time (`_texts`).
TEXT_ROWS = 1_000_000
RECENT_SECONDS = 48 * HOUR
TOPIC_NAMES = tuple(TOPICS)
N_TOPICS = len(TOPIC_NAMES)

# Ground-truth logit weights per action. Negative actions are rare (about 1% not-interested,
# 0.1% block/mute, 0.03% report), so with the reference scoring weights a good match scores
# positive and a poor one negative.
# Ground-truth logit weights per action:
# (bias, topic match, follows author, author affinity, author quality, age per hour, position)
TRUTH_WEIGHTS: dict[str, tuple[float, ...]] = {
    "click": (-2.2, 3.2, 0.9, 1.2, 0.35, -0.025, -0.06),
    "favorite": (-3.6, 3.6, 1.0, 0.8, 0.5, -0.02, -0.04),
    "reply": (-5.6, 2.6, 1.5, 0.8, 0.3, -0.02, -0.03),
    "repost": (-4.9, 2.6, 0.8, 0.6, 0.6, -0.02, -0.03),
    "quote": (-6.0, 2.6, 0.8, 0.6, 0.4, -0.02, -0.03),
    "share": (-5.4, 2.8, 0.3, 0.6, 0.5, -0.02, -0.03),
    "not_interested": (-4.6, -4.0, -0.8, -1.0, -0.3, 0.0, 0.0),
    "block_author": (-7.6, -3.0, -1.0, -1.0, -0.8, 0.0, 0.0),
    "mute_author": (-7.2, -3.0, -1.0, -1.0, -0.5, 0.0, 0.0),
    "report": (-9.0, -2.0, -0.5, -0.5, -1.5, 0.0, 0.0),
}
assert set(TRUTH_WEIGHTS) == set(ACTIONS)


def generate_world(cfg: WorldConfig, progress: Callable[[str], None] | None = None) -> World:
    """Generate every canonical table for `cfg`. Same config and seed give identical tables."""
    return stream_world(cfg, progress).collect()


def stream_world(cfg: WorldConfig, progress: Callable[[str], None] | None = None) -> WorldStream:
    """The world of `cfg` with its impressions, engagements and held-out truth in chunks of
    about CHUNK_SLOTS impressions: they are drawn as the stream's tail is read, so a writer that
    appends each chunk holds one at a time. Collected, it is `generate_world`'s world."""
    say = progress or (lambda _msg: None)
    streams = np.random.SeedSequence(cfg.seed).spawn(8)
    rng_users, rng_graph, rng_social, rng_posts, rng_text, rng_sessions, rng_truth, _ = (
        np.random.default_rng(s) for s in streams
    )
    # Naive datetimes are UTC throughout, as polars treats them.
    start_us = (cfg.window_start - datetime(1970, 1, 1)).days * 86_400_000_000 + (
        cfg.window_start - datetime(1970, 1, 1)
    ).seconds * 1_000_000
    span = int(cfg.days * 24 * HOUR)
    heldout_from = span - int(cfg.heldout_days * 24 * HOUR)

    say(f"users: {cfg.n_users:,}")
    users = _users(cfg, rng_users)
    say("follow graph")
    follows = _follow_graph(cfg, users["community"], rng_graph)
    say(f"follow graph: {len(follows[0]):,} edges")
    say(f"posts: {cfg.n_posts:,}")
    posts = _posts(cfg, users, span, rng_posts)
    text, title = _texts(posts, rng_text)
    social = _social_extras(cfg, users, posts, rng_social)

    def ts(seconds: np.ndarray) -> pl.Series:
        return pl.Series(start_us + seconds.astype(np.int64) * 1_000_000).cast(pl.Datetime("us"))

    n = cfg.n_users
    user_ids = np.arange(n, dtype=np.int64)
    tables = {
        "users": pl.DataFrame(
            {
                "user_id": user_ids,
                "handle": [f"user{i}" for i in range(n)],
                "created_at": ts(users["created"]),
            }
        ),
        "follows": pl.DataFrame(
            {"follower_id": follows[0], "followee_id": follows[1], "followed_at": ts(follows[2])}
        ),
        "articles": pl.DataFrame(
            {
                "article_id": np.arange(cfg.n_posts, dtype=np.int64),
                "author_id": posts["author"].astype(np.int64),
                "published_at": ts(posts["time"]),
                "kind": pl.Series(
                    np.array(["original", "reply", "repost", "quote"])[posts["kind"]]
                ),
                "parent_id": _nullable(posts["parent"]),
                "conversation_id": posts["conversation"].astype(np.int64),
                "topic": posts["topic"].astype(np.int32),
                "topic_name": pl.Series(np.array(TOPIC_NAMES)[posts["topic"]]),
                "title": title,
                "text": text,
            }
        ),
        "topic_follows": pl.DataFrame(
            {"user_id": social["topic_follow_user"], "topic": social["topic_follow_topic"]}
        ),
        "blocks": pl.DataFrame({"user_id": social["block_user"], "blocked_id": social["block_id"]}),
        "mutes": pl.DataFrame({"user_id": social["mute_user"], "muted_id": social["mute_id"]}),
        "muted_keywords": pl.DataFrame(
            {"user_id": social["kw_user"], "keyword": social["kw_word"]}
        ),
        **{name: pl.DataFrame(schema=TABLE_SCHEMAS[name]) for name in STREAMED_TABLES},
    }
    tables = {name: conform(name, df) for name, df in tables.items()}
    window_start = cfg.window_start
    head = World(
        **tables,
        window_start=window_start,
        heldout_start=window_start + timedelta(seconds=heldout_from),
        now=window_start + timedelta(seconds=span),
    )
    tail = _impressions(
        cfg, users, follows, posts, span, heldout_from, rng_sessions, rng_truth, ts, say
    )
    return WorldStream(head, tail)


def _nullable(values: np.ndarray) -> pl.Series:
    """int64 series where negative values (our 'none' marker) become nulls."""
    s = pl.Series(values.astype(np.int64))
    return pl.select(pl.when(s >= 0).then(s)).to_series()


def _users(cfg: WorldConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = cfg.n_users
    # Sparse Dirichlet interests: most users care about one or two topics.
    interest = rng.dirichlet(np.full(N_TOPICS, 0.25), size=n).astype(np.float32)
    activity = rng.lognormal(0.0, 0.7, size=n)
    activity /= activity.mean()
    return {
        "interest": interest,
        "community": interest.argmax(axis=1).astype(np.int32),
        "activity": activity,
        "quality": rng.normal(0.0, 1.0, size=n).astype(np.float32),
        # Posting propensity is heavy-tailed: a few accounts write most posts.
        "posting": rng.pareto(1.5, size=n) + 0.05,
        "ctr_bias": rng.normal(0.0, 0.4, size=n).astype(np.float32),
        # Accounts exist before the window opens (up to a year).
        "created": -rng.integers(HOUR, 365 * 24 * HOUR, size=n),
    }


def _sample_weighted(weights: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k indices drawn with replacement with probability proportional to weights."""
    cum = np.cumsum(weights, dtype=np.float64)
    return np.searchsorted(cum, rng.random(k) * cum[-1], side="right").clip(0, len(cum) - 1)


def _follow_graph(
    cfg: WorldConfig, community: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Directed follow edges (follower, followee, followed_at seconds), deduplicated.

    Users arrive in id order in batches; each newcomer follows earlier accounts with
    probability proportional to in-degree + offset (preferential attachment), inside its own
    community with probability community_follow_share. Batching keeps it vectorised; within a
    batch the weights are those at the batch start.
    """
    n = cfg.n_users
    sigma = 1.0
    out_deg = rng.lognormal(np.log(cfg.mean_follows) - sigma**2 / 2, sigma, size=n)
    out_deg = np.clip(out_deg.round(), 1, n - 1).astype(np.int64)
    indeg = np.zeros(n, dtype=np.float64)
    members = [np.flatnonzero(community == c) for c in range(N_TOPICS)]
    seed_size = min(n, max(20, n // 100))
    bounds = np.unique(np.linspace(seed_size, n, 101).astype(np.int64))
    src_parts, dst_parts = [], []

    # Seed accounts follow each other uniformly at random.
    src = np.repeat(np.arange(seed_size), np.minimum(out_deg[:seed_size], seed_size - 1))
    dst = rng.integers(0, seed_size, size=len(src))
    src_parts.append(src)
    dst_parts.append(dst)
    indeg += np.bincount(dst, minlength=n)

    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        src = np.repeat(np.arange(lo, hi), out_deg[lo:hi])
        dst = np.empty(len(src), dtype=np.int64)
        in_comm = rng.random(len(src)) < cfg.community_follow_share
        glob = ~in_comm
        dst[glob] = _sample_weighted(indeg[:lo] + cfg.attachment_offset, int(glob.sum()), rng)
        src_comm = community[src]
        for c in range(N_TOPICS):
            pick = in_comm & (src_comm == c)
            k = int(pick.sum())
            if not k:
                continue
            earlier = members[c][: np.searchsorted(members[c], lo)]
            if len(earlier) == 0:
                dst[pick] = _sample_weighted(indeg[:lo] + cfg.attachment_offset, k, rng)
            else:
                w = indeg[earlier] + cfg.attachment_offset
                dst[pick] = earlier[_sample_weighted(w, k, rng)]
        src_parts.append(src)
        dst_parts.append(dst)
        indeg += np.bincount(dst, minlength=n)

    src = np.concatenate(src_parts)
    dst = np.concatenate(dst_parts)
    back = rng.random(len(src)) < cfg.follow_back_prob
    src, dst = np.concatenate([src, dst[back]]), np.concatenate([dst, src[back]])
    keep = src != dst
    keys = unique(src[keep] * n + dst[keep])
    follower, followee = keys // n, keys % n
    # Follows happen before the window opens, so the graph is fixed while feeds are served.
    followed_at = -rng.integers(60, 180 * 24 * HOUR, size=len(keys))
    return follower, followee, followed_at


def _posts(
    cfg: WorldConfig, users: dict[str, np.ndarray], span: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    n = cfg.n_posts
    time = np.sort(rng.integers(0, span, size=n))
    author = _sample_weighted(users["posting"], n, rng)
    # A post's topic comes from its author's interests.
    cum = np.cumsum(users["interest"][author], axis=1)
    topic = (cum < rng.random((n, 1)) * cum[:, -1:]).sum(axis=1).clip(0, N_TOPICS - 1)
    kind = rng.choice(4, size=n, p=[0.7, 0.15, 0.1, 0.05])
    # Parents are posts from the preceding 24 h.
    lo = np.searchsorted(time, time - 24 * HOUR)
    idx = np.arange(n)
    has_earlier = idx > lo
    kind[~has_earlier] = 0
    parent = np.where(kind > 0, lo + (rng.random(n) * (idx - lo)).astype(np.int64), -1)
    # Replies and reposts join the parent's conversation; quotes and originals start their own.
    conv = np.where((kind == 1) | (kind == 2), parent, idx)
    while True:
        nxt = conv[conv]
        if np.array_equal(nxt, conv):
            break
        conv = nxt
    # A repost points at the original (root) post, never at another repost.
    parent = np.where(kind == 2, conv, parent)
    inherit = kind > 0
    topic = np.where(inherit, topic[np.maximum(parent, 0)], topic)
    return {
        "time": time,
        "author": author,
        "topic": topic.astype(np.int32),
        "kind": kind,
        "parent": parent,
        "conversation": conv,
        "quality": users["quality"][author] + rng.normal(0, 0.3, size=n).astype(np.float32),
    }


def _texts(posts: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[pl.Series, pl.Series]:
    """Post text: 8-14 words, ~70% from the topic's vocabulary. Reposts copy their parent.

    Words are drawn as indexes and joined by polars: joining a million rows of Python
    strings took 8.3 s at 1M posts, this 1.7 s, with the same draws and the same text."""
    vocab_size = len(next(iter(TOPICS.values())))
    topic_words = [w for name in TOPIC_NAMES for w in TOPICS[name]]
    n, max_len = len(posts["topic"]), 14
    from_topic = rng.random((n, max_len)) < 0.7
    topic_idx = posts["topic"][:, None] * vocab_size + rng.integers(0, vocab_size, (n, max_len))
    common_idx = len(topic_words) + rng.integers(0, len(COMMON), (n, max_len))
    word = np.where(from_topic, topic_idx, common_idx)
    del from_topic, topic_idx, common_idx  # 2.3 GiB at 10M posts, before the joins below
    lengths = rng.integers(8, max_len + 1, size=n)
    # A repost's parent is the root of its conversation: an original or a quote, never
    # another repost, so one gather copies every repost's words.
    repost = np.flatnonzero(posts["kind"] == 2)
    parent = posts["parent"][repost]
    word[repost] = word[parent]
    lengths[repost] = lengths[parent]
    vocabulary = pl.Series(topic_words + list(COMMON), dtype=pl.String)
    texts, titles = [], []
    # The words are gathered and joined TEXT_ROWS posts at a time: all 10M posts of `l` at
    # once took the generator to 10.75 GiB. The draws above are whole, so the text is the same.
    for start in range(0, n, TEXT_ROWS):
        block = word[start : start + TEXT_ROWS]
        words = vocabulary.gather(block.ravel()).reshape(block.shape).arr.to_list()
        joined = pl.DataFrame(
            {"words": words, "length": lengths[start : start + TEXT_ROWS]}
        ).select(
            pl.col("words").list.head(pl.col("length")).list.join(" ").alias("text"),
            pl.col("words").list.head(5).list.join(" ").alias("title"),
        )
        texts.append(joined["text"])
        titles.append(joined["title"])
    title = pl.concat(titles)
    # str.capitalize: the first character upper case, the rest lower case.
    title = title.str.slice(0, 1).str.to_uppercase() + title.str.slice(1).str.to_lowercase()
    return pl.concat(texts), title


def _social_extras(
    cfg: WorldConfig,
    users: dict[str, np.ndarray],
    posts: dict[str, np.ndarray],
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    n = cfg.n_users
    interest = users["interest"]
    # Topic follows: every topic holding at least 25% of a user's interest (1-3 topics).
    tf_user, tf_topic = np.nonzero(interest >= 0.25)
    # Blocks and mutes target authors, weighted by how much they post.
    post_counts = np.bincount(posts["author"], minlength=n).astype(np.float64) + 0.1

    def pairs(mean: float) -> tuple[np.ndarray, np.ndarray]:
        count = rng.poisson(mean, size=n)
        u = np.repeat(np.arange(n), count)
        t = _sample_weighted(post_counts, len(u), rng)
        keys = unique(u * n + t)
        keys = keys[keys // n != keys % n]
        return keys // n, keys % n

    block_user, block_id = pairs(0.15)
    mute_user, mute_id = pairs(0.25)
    # Muted keywords come from the vocabulary of the topic a user cares least about.
    kw_count = rng.poisson(0.4, size=n)
    kw_user = np.repeat(np.arange(n), kw_count)
    least = interest.argmin(axis=1)[kw_user]
    vocab = [TOPICS[name] for name in TOPIC_NAMES]
    pick = rng.integers(0, len(vocab[0]), size=len(kw_user))
    kw_word = np.array([vocab[t][p] for t, p in zip(least.tolist(), pick.tolist(), strict=True)])
    kw = pl.DataFrame({"u": kw_user, "w": kw_word.astype(str)}).unique(maintain_order=True)
    return {
        "topic_follow_user": tf_user.astype(np.int64),
        "topic_follow_topic": tf_topic.astype(np.int32),
        "block_user": block_user,
        "block_id": block_id,
        "mute_user": mute_user,
        "mute_id": mute_id,
        "kw_user": kw["u"].to_numpy(),
        "kw_word": kw["w"],
    }


def _range_pick(
    sorted_keys: np.ndarray, lo_keys: np.ndarray, hi_keys: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """For each query, a random position in sorted_keys within [lo_key, hi_key), or -1."""
    lo = np.searchsorted(sorted_keys, lo_keys, side="left")
    hi = np.searchsorted(sorted_keys, hi_keys, side="left")
    pos = lo + (rng.random(len(lo)) * (hi - lo)).astype(np.int64)
    return np.where(hi > lo, pos, -1)


def _impressions(
    cfg: WorldConfig,
    users: dict[str, np.ndarray],
    follows: tuple[np.ndarray, np.ndarray, np.ndarray],
    posts: dict[str, np.ndarray],
    span: int,
    heldout_from: int,
    rng: np.random.Generator,
    rng_truth: np.random.Generator,
    ts: Callable[[np.ndarray], pl.Series],
    say: Callable[[str], None],
) -> Iterator[Mapping[str, pl.DataFrame]]:
    """Impressions, engagements and held-out truth, yielded chunk by chunk as canonical
    frames (one mapping per chunk of about CHUNK_SLOTS shown slots).

    The random draws happen in a fixed order (sessions, then per chunk: slate slots from
    `rng`, actions from `rng_truth`), so a seed gives the same world."""
    say("impressions and engagements")
    n_users, slate = cfg.n_users, cfg.slate_size
    follow_keys = follows[0] * n_users + follows[1]  # sorted: edges come out of unique()
    s_user, s_time = _sessions(cfg, users, span, rng)
    n_sessions = len(s_user)
    lookups = _slate_lookups(users, follows, posts, span, n_users)

    chunk = max(1, CHUNK_SLOTS // slate)
    starts = range(0, n_sessions, chunk)

    def shown(c0: int) -> tuple[np.ndarray, ...]:
        sess = np.arange(c0, min(n_sessions, c0 + chunk))
        u, t, sid, post = _fill_slates(cfg, lookups, posts, s_user[sess], s_time[sess], sess, rng)
        return u, t, sid, post, _rank_within(sid)

    # The next chunk's slates are filled (from `rng`) on a second thread while this one's
    # actions are drawn (from `rng_truth`): each stream still draws chunk after chunk, so the
    # world is the same, and numpy lets go of the GIL for most of the work of either.
    with ThreadPoolExecutor(1) as slates:
        ahead = slates.submit(shown, starts[0]) if starts else None
        for i, c0 in enumerate(starts):
            u, t, sid, post, position = ahead.result()
            if i + 1 < len(starts):
                ahead = slates.submit(shown, starts[i + 1])
            part = {
                "impressions": conform(
                    "impressions",
                    pl.DataFrame(
                        {
                            "impression_id": sid,
                            "user_id": u,
                            "article_id": post,
                            "position": position,
                            "shown_at": ts(t),
                            "is_heldout": t >= heldout_from,
                        }
                    ),
                )
            }
            probs, dwell_mean = _truth(users, posts, follow_keys, n_users, u, post, t, position)
            part["engagements"] = _draw_engagements(
                u, t, sid, post, probs, dwell_mean, span, rng_truth, ts
            )
            truth = _heldout_truth(t, sid, post, probs, dwell_mean, heldout_from)
            if truth is not None:
                part["impression_truth"] = truth
            # About ten progress lines, however many chunks (250 at 1M users).
            if (10 * (i + 1)) // len(starts) > (10 * i) // len(starts):
                say(f"sessions {min(n_sessions, c0 + chunk):,}/{n_sessions:,}")
            yield part


def _sessions(
    cfg: WorldConfig, users: dict[str, np.ndarray], span: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(user, time) of every session in time order: each user's count follows its activity;
    times uniform after the first 6 h."""
    counts = rng.poisson(users["activity"] * cfg.sessions_per_user_day * cfg.days)
    s_user = np.repeat(np.arange(cfg.n_users), counts)
    s_time = rng.integers(6 * HOUR, span, size=len(s_user))
    order = np.argsort(s_time, kind="stable")
    return s_user[order], s_time[order]


@dataclass(frozen=True)
class _SlateLookups:
    """Sorted keys the slot picks search: each user's followees, posts by (author, time) and
    by (topic, time), and the users' cumulative topic interests."""

    followee: np.ndarray
    follow_off: np.ndarray
    out_deg: np.ndarray
    by_author: np.ndarray
    author_keys: np.ndarray
    by_topic: np.ndarray
    topic_keys: np.ndarray
    interest_cum: np.ndarray
    span: int


def _slate_lookups(
    users: dict[str, np.ndarray],
    follows: tuple[np.ndarray, np.ndarray, np.ndarray],
    posts: dict[str, np.ndarray],
    span: int,
    n_users: int,
) -> _SlateLookups:
    follower, followee, _ = follows
    follow_off = np.searchsorted(follower, np.arange(n_users + 1))
    ptime = posts["time"].astype(np.int64)
    by_author = np.lexsort((ptime, posts["author"]))
    by_topic = np.lexsort((ptime, posts["topic"]))
    return _SlateLookups(
        followee=followee,
        follow_off=follow_off,
        out_deg=np.diff(follow_off),
        by_author=by_author,
        author_keys=posts["author"][by_author].astype(np.int64) * span + ptime[by_author],
        by_topic=by_topic,
        topic_keys=posts["topic"][by_topic].astype(np.int64) * span + ptime[by_topic],
        interest_cum=np.cumsum(users["interest"], axis=1),
        span=span,
    )


def _fill_slates(
    cfg: WorldConfig,
    lk: _SlateLookups,
    posts: dict[str, np.ndarray],
    session_user: np.ndarray,
    session_time: np.ndarray,
    sess: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user, time, session id, post) of every shown slot of these sessions, in slate order,
    without own posts and without repeats inside a slate."""
    slate, span = cfg.slate_size, lk.span
    u = np.repeat(session_user, slate)
    t = np.repeat(session_time, slate).astype(np.int64)
    sid = np.repeat(sess, slate)
    m = len(u)
    src = rng.random(m)
    post = np.full(m, -1, dtype=np.int64)
    # In-network slots: a random followee's post from the last 48 h.
    innet = (src < cfg.in_network_share) & (lk.out_deg[u] > 0)
    k = lk.follow_off[u[innet]] + (rng.random(int(innet.sum())) * lk.out_deg[u[innet]]).astype(
        np.int64
    )
    a = lk.followee[k]
    pos = _range_pick(lk.author_keys, a * span + _recent_from(t[innet]), a * span + t[innet], rng)
    post[innet] = np.where(pos >= 0, lk.by_author[np.maximum(pos, 0)], -1)
    # Topic slots: a recent post from a topic drawn from the user's interests.
    topical = (post < 0) & (src < 0.8)
    r = rng.random(int(topical.sum()))[:, None] * lk.interest_cum[u[topical], -1:]
    tp = (lk.interest_cum[u[topical]] < r).sum(axis=1).clip(0, N_TOPICS - 1).astype(np.int64)
    pos = _range_pick(
        lk.topic_keys, tp * span + _recent_from(t[topical]), tp * span + t[topical], rng
    )
    post[topical] = np.where(pos >= 0, lk.by_topic[np.maximum(pos, 0)], -1)
    # Remaining slots: anything recent.
    rest = post < 0
    post[rest] = _range_pick(posts["time"].astype(np.int64), t[rest] - RECENT_SECONDS, t[rest], rng)
    ok = (post >= 0) & (posts["author"][np.maximum(post, 0)] != u)
    u, t, sid, post = u[ok], t[ok], sid[ok], post[ok]
    # One row per (session, post): drop repeats inside a slate.
    _, first = np.unique(sid * cfg.n_posts + post, return_index=True)
    first.sort()
    return u[first], t[first], sid[first], post[first]


def _draw_engagements(
    u: np.ndarray,
    t: np.ndarray,
    sid: np.ndarray,
    post: np.ndarray,
    probs: dict[str, np.ndarray],
    dwell_mean: np.ndarray,
    span: int,
    rng_truth: np.random.Generator,
    ts: Callable[[np.ndarray], pl.Series],
) -> pl.DataFrame:
    """Actions drawn from the hidden truth: one engagement row per impression with any."""
    draws = {a: rng_truth.random(len(u)) < probs[a] for a in ACTIONS}
    any_action = np.zeros(len(u), dtype=bool)
    for a in ACTIONS:
        any_action |= draws[a]
    dwell = np.where(draws["click"], rng_truth.lognormal(np.log(dwell_mean), 0.6), 0.0).astype(
        np.float32
    )
    e = np.flatnonzero(any_action)
    delay = rng_truth.integers(1, 120, size=len(e))
    return conform(
        "engagements",
        pl.DataFrame(
            {
                "user_id": u[e],
                "article_id": post[e],
                "impression_id": sid[e],
                "engaged_at": ts(np.minimum(t[e] + delay, span - 1)),
                **{a: draws[a][e] for a in ACTIONS},
                "dwell_seconds": dwell[e],
            }
        ),
    )


def _heldout_truth(
    t: np.ndarray,
    sid: np.ndarray,
    post: np.ndarray,
    probs: dict[str, np.ndarray],
    dwell_mean: np.ndarray,
    heldout_from: int,
) -> pl.DataFrame | None:
    """The true probabilities of the held-out impressions (None when the chunk has none)."""
    h = np.flatnonzero(t >= heldout_from)
    if not len(h):
        return None
    return conform(
        "impression_truth",
        pl.DataFrame(
            {
                "impression_id": sid[h],
                "article_id": post[h],
                **{f"true_p_{a}": probs[a][h] for a in ACTIONS},
                "true_dwell_seconds": probs["click"][h] * dwell_mean[h],
            }
        ),
    )


def _recent_from(t: np.ndarray) -> np.ndarray:
    """Start of the 48 h recency window, never before the window opens: a negative offset
    would reach into the previous author's (or topic's) key range and pick future posts."""
    return np.maximum(t - RECENT_SECONDS, 0)


def _rank_within(group: np.ndarray) -> np.ndarray:
    """0-based position of each row inside its run of equal (sorted) group values."""
    starts = np.r_[0, np.flatnonzero(np.diff(group)) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(group)]))
    return (np.arange(len(group)) - run_start).astype(np.int32)


# Rows per slice of _interest_overlap: its two [rows, topics] gathers stay in cache.
OVERLAP_ROWS = 16_384


def _interest_overlap(interest: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 [len(a)]: dot product of interest rows a[i] and b[i]. Slice by slice, the
    same sums as one expression over all rows (each row is summed alone), in about a third
    of the time at 2M rows, where the two gathered [rows, topics] arrays leave the cache."""
    out = np.empty(len(a), dtype=interest.dtype)
    for i in range(0, len(a), OVERLAP_ROWS):
        s = slice(i, i + OVERLAP_ROWS)
        out[s] = (interest[a[s]] * interest[b[s]]).sum(axis=1)
    return out


def _truth(
    users: dict[str, np.ndarray],
    posts: dict[str, np.ndarray],
    follow_keys: np.ndarray,
    n_users: int,
    u: np.ndarray,
    post: np.ndarray,
    t: np.ndarray,
    position: np.ndarray,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Hidden ground-truth probability of every action, and mean dwell given a click."""
    author = posts["author"][post]
    interest = users["interest"]
    match = interest[u, posts["topic"][post]] * 2.0
    key = u * n_users + author
    at = np.searchsorted(follow_keys, key).clip(0, len(follow_keys) - 1)
    follows = (follow_keys[at] == key).astype(np.float32)
    affinity = _interest_overlap(interest, u, author) * 2.0
    quality = posts["quality"][post]
    age_h = (t - posts["time"][post]) / HOUR
    feats = (match, follows, affinity, quality, age_h, position.astype(np.float32))
    probs = {}
    for action, (bias, *w) in TRUTH_WEIGHTS.items():
        logit = bias + sum(wi * f for wi, f in zip(w, feats, strict=True))
        if action == "click":
            logit = logit + users["ctr_bias"][u]
        probs[action] = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    dwell_mean = np.exp(2.3 + 1.0 * match + 0.2 * quality).astype(np.float32)
    return probs, dwell_mean

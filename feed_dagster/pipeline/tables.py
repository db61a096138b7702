"""Access to the canonical tables a pipeline run reads, whatever holds them."""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl

from feed_dagster.data.schema import DEFAULT_CANDIDATE_WINDOW, TABLE_SCHEMAS, World
from feed_dagster.data.world_tables import window_from_info
from feed_dagster.errors import DataValidationError
from feed_dagster.sorted_search import unique

Tables = Mapping[str, pl.DataFrame]


def as_tables(source: World | Tables) -> Tables:
    """The canonical tables of a World, or the mapping itself."""
    return source.tables() if isinstance(source, World) else source


def table(tables: World | Tables, name: str) -> pl.DataFrame:
    """Table `name`, or an empty frame of its canonical schema when the source lacks it.

    Optional tables (mutes, muted keywords, topic follows...) are absent for some sources;
    an empty frame keeps every stage free of special cases.
    """
    df = as_tables(tables).get(name)
    if df is None:
        return pl.DataFrame(schema=TABLE_SCHEMAS[name])
    missing = [c for c in TABLE_SCHEMAS[name] if c not in df.columns]
    if missing:
        raise DataValidationError(
            f"table {name}", None, f"columns {list(TABLE_SCHEMAS[name])}", f"{missing} missing"
        )
    return df


# Whether a frame's column ascends without nulls, by (frame id, column); an entry goes with
# its frame. (Frames are replaced, never edited in place, here.)
_ASCENDS: dict[tuple[int, str], bool] = {}


def rows_with(frame: pl.DataFrame, key: str, ids: pl.Series | np.ndarray) -> pl.DataFrame:
    """The rows of `frame` whose `key` is one of `ids` (nulls match nothing), in the frame's
    order: `frame.join(ids, on=key, how="semi")`.

    A frame sorted by `key` (the warehouse reads articles by id) is searched instead of
    hashed. A feed batch looks up some thousands of a shard's posts, and at 1M users a join
    hashed all 3.3M of them each time: 0.1 to 0.2 s a join, several joins a batch."""
    column = frame[key]
    wanted = pl.Series(key, ids).drop_nulls()
    if not _ascends(frame, key):
        return frame.join(wanted.cast(column.dtype).unique().to_frame(), on=key, how="semi")
    values = column.to_numpy()
    asked = unique(wanted.to_numpy())
    lo = np.searchsorted(values, asked, side="left")
    hi = np.searchsorted(values, asked, side="right")
    counts = hi - lo
    # Every row from lo to hi of each asked id (one row for a unique key), ascending.
    starts = np.repeat(lo - np.cumsum(counts) + counts, counts)
    return frame[starts + np.arange(int(counts.sum()))]


def _ascends(frame: pl.DataFrame, key: str) -> bool:
    cache_key = (id(frame), key)
    held = _ASCENDS.get(cache_key)
    if held is None:
        column = frame[key]
        values = column.to_numpy()
        held = (
            column.null_count() == 0
            and column.dtype.is_integer()
            and bool(np.all(values[1:] >= values[:-1]))
        )
        if not any(k[0] == id(frame) for k in _ASCENDS):
            weakref.finalize(frame, _forget, id(frame))
        _ASCENDS[cache_key] = held
    return held


def _forget(frame_id: int) -> None:
    for k in [k for k in _ASCENDS if k[0] == frame_id]:
        del _ASCENDS[k]


# The tables the query hydrators read a batch's rows of, by their user column.
PER_USER_TABLES: dict[str, str] = {
    "impressions": "user_id",
    "engagements": "user_id",
    "follows": "follower_id",
    "topic_follows": "user_id",
    "mutes": "user_id",
    "muted_keywords": "user_id",
}


def sorted_by_user(tables: Tables) -> dict[str, pl.DataFrame]:
    """`tables` with each of PER_USER_TABLES sorted by its user column (those already sorted
    are kept as they are), for `batch_tables`."""
    out = dict(tables)
    for name, user in PER_USER_TABLES.items():
        frame = out.get(name)
        if frame is not None and not _ascends(frame, user):
            out[name] = frame.sort(user, maintain_order=True)
    return out


def batch_tables(tables: Tables, user_ids: np.ndarray) -> Tables:
    """`tables` (from `sorted_by_user`) with each per-user table cut to the rows of the users
    from the least to the greatest of `user_ids`, a slice that copies nothing. A shard's
    batches take consecutive ids, so each hydrates its own users' rows instead of filtering
    the shard's: at 1M users 7.7M impressions and 2.6M engagements, 31 times a shard."""
    ids = np.asarray(user_ids)
    if ids.size == 0:
        return tables
    lo, hi = int(ids.min()), int(ids.max())
    out = dict(tables)
    for name, user in PER_USER_TABLES.items():
        frame = out.get(name)
        if frame is None or not _ascends(frame, user):
            continue
        values = frame[user].to_numpy()
        start = int(np.searchsorted(values, lo, side="left"))
        stop = int(np.searchsorted(values, hi, side="right"))
        out[name] = frame.slice(start, stop - start)
    return out


def candidate_window(source: World | Tables) -> timedelta | None:
    """The world's candidate window (None = no age limit), from a World or from the
    `world_info` table among `source`; the news default when neither says."""
    if isinstance(source, World):
        return source.candidate_window
    info = source.get("world_info")
    if info is None or info.is_empty():
        return DEFAULT_CANDIDATE_WINDOW
    return window_from_info(info.row(0, named=True))


def published_between(
    after: datetime | None, now: datetime, *, include_now: bool = True
) -> pl.Expr:
    """published_at in (after, now] (or (after, now) without `include_now`); no lower bound
    when `after` is None."""
    upper = pl.col("published_at") <= now if include_now else pl.col("published_at") < now
    return upper if after is None else upper & (pl.col("published_at") > after)


def naive_utc(moment: datetime) -> datetime:
    """`moment` as a naive UTC datetime, the convention of the canonical tables."""
    if moment.tzinfo is not None:
        return moment.astimezone(UTC).replace(tzinfo=None)
    return moment


def user_frame(user_ids: np.ndarray | list[int] | pl.Series) -> pl.DataFrame:
    """Sorted, unique batch of user ids as a one-column frame to join against."""
    ids = pl.Series("user_id", np.asarray(user_ids, dtype=np.int64))
    return pl.DataFrame(ids).unique().sort("user_id")


def excluded_pairs(
    exclude: pl.DataFrame | None,
    exclude_authors: pl.DataFrame | None,
    posts: pl.DataFrame,
) -> pl.DataFrame:
    """Distinct (user_id, article_id) a retriever must not return, among `posts` (article_id,
    author_id): the `exclude` pairs, and every post of a user's `exclude_authors`."""
    parts = [pl.DataFrame(schema={"user_id": pl.Int64, "article_id": pl.Int64})]
    if exclude is not None and exclude.height:
        parts.append(exclude.select(pl.col("user_id", "article_id").cast(pl.Int64)))
    if exclude_authors is not None and exclude_authors.height:
        by_author = exclude_authors.select(pl.col("user_id", "author_id").cast(pl.Int64))
        parts.append(
            by_author.join(posts.select("article_id", "author_id"), on="author_id").select(
                "user_id", "article_id"
            )
        )
    return pl.concat(parts).join(posts.select("article_id"), on="article_id", how="semi").unique()


def pair_key(df: pl.DataFrame, a: str, b: str) -> pl.Expr:
    """One Int64 per (a, b) pair of `df`, for fast distinct/window operations.

    Hashing one integer column is several times faster than hashing two columns or a
    struct. Packs (a - min a) * span(b) + (b - min b) when that fits in 63 bits (it does
    for any realistic id ranges); otherwise falls back to a struct key. Nulls stay null.
    """
    if df.is_empty():
        return pl.lit(0, dtype=pl.Int64)
    lo_a, hi_a, lo_b, hi_b = df.select(
        pl.col(a).min().alias("a0"),
        pl.col(a).max().alias("a1"),
        pl.col(b).min().alias("b0"),
        pl.col(b).max().alias("b1"),
    ).row(0)
    if None in (lo_a, hi_a, lo_b, hi_b):
        return pl.struct(a, b)
    span_b = int(hi_b) - int(lo_b) + 1
    if (int(hi_a) - int(lo_a) + 1) * span_b >= 2**62:
        return pl.struct(a, b)
    return (pl.col(a).cast(pl.Int64) - lo_a) * span_b + (pl.col(b).cast(pl.Int64) - lo_b)


def run_position(key: pl.Expr | str) -> pl.Expr:
    """0-based position of each row within its run of equal consecutive `key` values.

    On a frame sorted by key this is the rank within the group, computed without a
    group-by: window functions over hundreds of thousands of small groups (one per user and
    author) are far slower than this single pass. A null key starts a new run every row.
    """
    key = pl.col(key) if isinstance(key, str) else key
    idx = pl.int_range(pl.len(), dtype=pl.Int64)
    new_run = (key != key.shift(1)).fill_null(True)
    return idx - pl.when(new_run).then(idx).otherwise(None).forward_fill()

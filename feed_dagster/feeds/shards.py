"""Stable assignment of users to shards, so a user's feed is always built by one partition."""

from __future__ import annotations

import os

import numpy as np
import polars as pl

# Knuth's multiplicative hash spreads consecutive ids evenly; the result depends only on the
# id, never on the process (unlike Python's salted hash()).
_MULTIPLIER = np.uint64(2654435761)


def shard_of(user_ids: np.ndarray | pl.Series, n_shards: int) -> np.ndarray:
    if n_shards < 1:
        raise ValueError("n_shards must be at least 1")
    ids = np.asarray(user_ids, dtype=np.int64).astype(np.uint64)
    return ((ids * _MULTIPLIER) % np.uint64(2**32) % np.uint64(n_shards)).astype(np.int64)


def users_in_shard(users: pl.DataFrame, shard: int, n_shards: int) -> np.ndarray:
    """The user ids of `users` that belong to `shard`, sorted."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} outside 0..{n_shards - 1}")
    ids = users["user_id"].to_numpy()
    return np.sort(ids[shard_of(ids, n_shards) == shard])


# Shards per world tier: more users, more and smaller shards, so one shard's inputs and
# model work stay bounded (and a failed shard reruns quickly).
SHARDS_BY_SCALE: dict[str, int] = {"m": 16, "l": 64}
DEFAULT_SHARDS = 4


def default_shard_count(source: str, override: str | None = None) -> int:
    """Shards of user_feeds: `override` (FEED_DAGSTER_SHARDS) when set, else by the tier of
    a synthetic source spec ("synthetic:m" -> 16, "synthetic:l" -> 64), else 4."""
    if override:
        try:
            n = int(override)
        except ValueError:
            msg = f"FEED_DAGSTER_SHARDS must be a whole number, got {override!r}"
            raise ValueError(msg) from None
        if n < 1:
            raise ValueError(f"FEED_DAGSTER_SHARDS must be at least 1, got {n}")
        return n
    kind, _, scale = source.partition(":")
    if kind == "synthetic":
        return SHARDS_BY_SCALE.get(scale, DEFAULT_SHARDS)
    return DEFAULT_SHARDS


def configured_shard_count() -> int:
    """The shard count of this process's settings: FEED_DAGSTER_SHARDS, else by the tier of
    FEED_DAGSTER_SOURCE (default synthetic:demo). The user_feeds partitions are these."""
    return default_shard_count(
        os.environ.get("FEED_DAGSTER_SOURCE", "synthetic:demo"),
        os.environ.get("FEED_DAGSTER_SHARDS"),
    )


def shard_keys() -> list[str]:
    """The user_feeds partition keys, "0" .. str(configured_shard_count() - 1)."""
    return [str(i) for i in range(configured_shard_count())]

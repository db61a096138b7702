"""Stable assignment of users to shards, so a user's feed is always built by one partition."""

from __future__ import annotations

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

"""rows_with: the rows of a frame with some keys, searched when the frame is sorted by
the key and hashed otherwise, always the semi join's rows in the frame's order."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from feed_dagster.pipeline.tables import rows_with


def _semi(frame: pl.DataFrame, ids: list[int | None]) -> pl.DataFrame:
    wanted = pl.Series("k", ids, dtype=pl.Int64).drop_nulls().unique().to_frame()
    return frame.join(wanted, on="k", how="semi")


@pytest.mark.parametrize("seed", range(20))
def test_rows_with_is_the_semi_join_sorted_or_not(seed: int) -> None:
    rng = np.random.default_rng(seed)
    keys = np.sort(rng.integers(0, 40, int(rng.integers(0, 60))))  # repeats included
    frame = pl.DataFrame({"k": keys, "v": np.arange(keys.size)})
    ids = [int(i) for i in rng.integers(-3, 45, int(rng.integers(0, 30)))] + [None]
    got = rows_with(frame, "k", pl.Series(ids, dtype=pl.Int64))
    assert got.equals(_semi(frame, ids))
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=seed)
    assert rows_with(shuffled, "k", np.array([i for i in ids if i is not None])).equals(
        _semi(shuffled, ids)
    )


def test_a_frame_is_judged_sorted_once_and_forgotten_with_it() -> None:
    from feed_dagster.pipeline import tables

    frame = pl.DataFrame({"k": [1, 2, 2, 5], "v": [0, 1, 2, 3]})
    assert rows_with(frame, "k", np.array([2, 5]))["v"].to_list() == [1, 2, 3]
    key = (id(frame), "k")
    assert tables._ASCENDS[key] is True
    # A key column with nulls is not searched: nulls sort first and match nothing.
    nulls = pl.DataFrame({"k": [None, 1, 3]}, schema={"k": pl.Int64})
    assert rows_with(nulls, "k", np.array([1, 3]))["k"].to_list() == [1, 3]
    assert tables._ASCENDS[(id(nulls), "k")] is False
    del frame
    import gc

    gc.collect()
    assert key not in tables._ASCENDS


def test_a_batch_hydrates_from_its_slice_what_it_hydrates_from_every_row(tiny_world) -> None:
    """build_feeds sorts the per-user tables once and hands each batch the slice of its
    users' id range: the hydrated query is the one the whole tables give, for sorted and
    shuffled tables alike."""
    from dataclasses import fields

    from polars.testing import assert_frame_equal

    from feed_dagster.pipeline.query import hydrate_query
    from feed_dagster.pipeline.tables import PER_USER_TABLES, batch_tables, sorted_by_user

    whole = tiny_world.tables()
    shuffled = {
        name: frame.sample(fraction=1.0, shuffle=True, seed=1) if name in PER_USER_TABLES else frame
        for name, frame in whole.items()
    }
    users = np.sort(tiny_world.users["user_id"].to_numpy())
    for tables in (whole, shuffled):
        by_user = sorted_by_user(tables)
        for name, user in PER_USER_TABLES.items():
            assert by_user[name][user].is_sorted()
        for start in range(0, users.size, 70):
            batch = users[start : start + 70]
            sliced = batch_tables(by_user, batch)
            assert sliced["impressions"].height < whole["impressions"].height
            got, want = (
                hydrate_query(sliced, batch, tiny_world.now),
                hydrate_query(whole, batch, tiny_world.now),
            )
            for f in fields(got):
                a, b = getattr(got, f.name), getattr(want, f.name)
                if isinstance(a, pl.DataFrame):
                    assert_frame_equal(a, b, check_row_order=f.name != "deleted")

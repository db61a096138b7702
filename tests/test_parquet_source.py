"""A `parquet:` source folder with broken files: each is refused with a DataValidationError
naming the file and the column, before any table is returned (so nothing is written)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest

from feed_dagster.data.world_tables import load_parquet_world, save_parquet_world
from feed_dagster.errors import DataValidationError


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory, tiny_world) -> Path:
    folder = tmp_path_factory.mktemp("parquet_world")
    save_parquet_world(tiny_world, folder)
    return folder


@pytest.fixture()
def folder(valid: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "world"
    shutil.copytree(valid, out)
    return out


def test_valid_folder_round_trips(folder: Path, tiny_world) -> None:
    world = load_parquet_world(folder)
    for name, df in tiny_world.tables().items():
        assert world.tables()[name].equals(df), name


def _rewrite(path: Path, change: Callable[[pl.DataFrame], pl.DataFrame]) -> None:
    change(pl.read_parquet(path)).write_parquet(path)


def _set(column: str, value, row: int = 2, dtype=None):
    def change(df: pl.DataFrame) -> pl.DataFrame:
        lit = pl.lit(value, dtype=dtype or df.schema[column])
        return df.with_columns(
            pl.when(pl.int_range(pl.len()) == row).then(lit).otherwise(pl.col(column)).alias(column)
        )

    return change


def expect(folder: Path, file: str, column: str | None, text: str) -> DataValidationError:
    with pytest.raises(DataValidationError) as info:
        load_parquet_world(folder)
    err = info.value
    assert err.file.endswith(file), err.file
    assert err.column == column
    assert text in str(err)
    return err


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="no such folder"):
        load_parquet_world(tmp_path / "nowhere")


def test_missing_required_file(folder: Path) -> None:
    (folder / "engagements.parquet").unlink()
    expect(folder, "engagements.parquet", None, "missing file(s) engagements.parquet")


@pytest.mark.parametrize(
    ("file", "damage"),
    [
        ("users.parquet", lambda b: b[: len(b) // 2]),
        ("articles.parquet", lambda b: b"user_id;handle\n1;ann\n"),
        ("follows.parquet", lambda b: b""),  # an optional table, present but unreadable
        ("world_info.parquet", lambda b: b[:-20]),
    ],
    ids=["truncated", "csv", "zero_bytes_optional", "info_without_footer"],
)
def test_unreadable_file(folder: Path, file: str, damage) -> None:
    path = folder / file
    path.write_bytes(damage(path.read_bytes()))
    err = expect(folder, file, None, "not a readable Parquet file")
    assert err.expected == "a readable Parquet file"


@pytest.mark.parametrize("table", ["users", "articles", "impressions", "engagements"])
def test_empty_required_table(folder: Path, table: str) -> None:
    _rewrite(folder / f"{table}.parquet", lambda df: df.head(0))
    expect(folder, f"{table}.parquet", None, "0 rows")


CASES = {
    # name: (table, change, column, text)
    "negative_dwell": ("engagements", _set("dwell_seconds", -1.0), "dwell_seconds", "out of range"),
    "nan_dwell": ("engagements", _set("dwell_seconds", float("nan")), "dwell_seconds", "range"),
    "negative_position": ("impressions", _set("position", -1), "position", "out of range"),
    "probability_above_one": (
        "impression_truth",
        _set("true_p_click", 1.5),
        "true_p_click",
        "out of range",
    ),
    "negative_user_id": ("users", _set("user_id", -5), "user_id", "ids >= 0"),
    "negative_blocked_id": ("blocks", _set("blocked_id", -1), "blocked_id", "ids >= 0"),
    "shown_in_2200": (
        "impressions",
        _set("shown_at", datetime(2200, 1, 1)),
        "shown_at",
        "plausible window",
    ),
    "user_created_in_1970": (
        "users",
        _set("created_at", datetime(1970, 1, 1)),
        "created_at",
        "plausible window",
    ),
    "null_article_id": ("engagements", _set("article_id", None), "article_id", "rows with null"),
    "null_published_at": ("articles", _set("published_at", None), "published_at", "with null"),
    "missing_key_column": (
        "impressions",
        lambda df: df.drop("impression_id"),
        "impression_id",
        "no column",
    ),
    "ids_as_text": (
        "follows",
        lambda df: df.with_columns(pl.col("followee_id").cast(pl.String)),
        "followee_id",
        "type String",
    ),
    "epoch_integers_as_times": (
        "engagements",
        lambda df: df.with_columns(pl.col("engaged_at").dt.epoch("s")),
        "engaged_at",
        "type Int64",
    ),
    "duplicate_user_ids": ("users", _set("user_id", 0, row=3), "user_id", "duplicate ids"),
    "duplicate_article_ids": (
        "articles",
        lambda df: pl.concat([df, df.head(1)]),
        "article_id",
        "duplicate ids",
    ),
    "engagement_of_unknown_article": (
        "engagements",
        _set("article_id", 10**9),
        "article_id",
        "unknown ids",
    ),
    "impression_of_unknown_user": (
        "impressions",
        _set("user_id", 10**9),
        "user_id",
        "unknown ids",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_values(folder: Path, case: str) -> None:
    table, change, column, text = CASES[case]
    _rewrite(folder / f"{table}.parquet", change)
    expect(folder, f"{table}.parquet", column, text)


def test_world_info_time_outside_the_window(folder: Path) -> None:
    _rewrite(folder / "world_info.parquet", _set("now", datetime(1970, 1, 1), row=0))
    expect(folder, "world_info.parquet", "now", "plausible window")


def test_tombstone_of_unknown_article(folder: Path) -> None:
    pl.DataFrame(
        {"article_id": [10**9], "deleted_at": [datetime(2026, 1, 5)]},
        schema={"article_id": pl.Int64, "deleted_at": pl.Datetime("us")},
    ).write_parquet(folder / "deleted_posts.parquet")
    expect(folder, "deleted_posts.parquet", "article_id", "unknown ids")

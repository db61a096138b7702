"""Deliberately broken EBNeRD folders: each must fail with a DataValidationError that names
the file and the column at fault."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feed_dagster.ebnerd import load_ebnerd, write_synthetic_ebnerd
from feed_dagster.errors import DataValidationError


@pytest.fixture(scope="module")
def valid_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_ebnerd(
        tmp_path_factory.mktemp("ebnerd_valid"), users=30, articles=200, impressions_per_user=4
    )


@pytest.fixture()
def folder(valid_folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ebnerd"
    shutil.copytree(valid_folder, out)
    return out


def rewrite(
    path: Path,
    change: Callable[[pl.DataFrame], pl.DataFrame],
    schema: pa.Schema | None = None,
) -> None:
    """Apply `change` to a parquet file, keeping its Arrow schema unless one is given."""
    original = pq.read_table(path)
    changed = change(pl.from_arrow(original)).to_arrow()  # type: ignore[union-attr]
    pq.write_table(changed.cast(schema or original.schema), path)


def expect_error(folder: Path, file: str, column: str | None) -> DataValidationError:
    with pytest.raises(DataValidationError) as info:
        load_ebnerd(folder)
    err = info.value
    assert err.file.endswith(file), err.file
    assert err.column == column
    assert file in str(err)
    if column is not None:
        assert f"'{column}'" in str(err)
    return err


def test_valid_folder_loads(folder: Path) -> None:
    assert load_ebnerd(folder).impressions.height > 0


def test_missing_file(folder: Path) -> None:
    (folder / "validation" / "history.parquet").unlink()
    err = expect_error(folder, "validation/history.parquet", None)
    assert err.found == "missing file"


def test_missing_articles_file(folder: Path) -> None:
    (folder / "articles.parquet").unlink()
    expect_error(folder, "articles.parquet", None)


def test_missing_column(folder: Path) -> None:
    path = folder / "train" / "behaviors.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["article_ids_clicked"]), path)
    err = expect_error(folder, "train/behaviors.parquet", "article_ids_clicked")
    assert err.found == "no column"


def test_wrong_dtype(folder: Path) -> None:
    path = folder / "train" / "history.parquet"
    table = pq.read_table(path)
    idx = table.schema.get_field_index("user_id")
    pq.write_table(table.set_column(idx, "user_id", table["user_id"].cast(pa.int64())), path)
    err = expect_error(folder, "train/history.parquet", "user_id")
    assert "uint32" in err.expected and "int64" in err.found


@pytest.mark.parametrize(
    ("file", "column"),
    [
        ("validation/behaviors.parquet", "impression_id"),
        ("train/behaviors.parquet", "user_id"),
        ("articles.parquet", "article_id"),
        ("train/history.parquet", "user_id"),
    ],
)
def test_null_ids(folder: Path, file: str, column: str) -> None:
    rewrite(
        folder / file,
        lambda df: df.with_columns(
            pl.when(pl.int_range(pl.len()) == 2).then(None).otherwise(pl.col(column)).alias(column)
        ),
    )
    err = expect_error(folder, file, column)
    assert err.rows and err.rows[0]["row"] == 2


def test_clicked_not_in_inview(folder: Path) -> None:
    path = folder / "train" / "behaviors.parquet"
    df = pl.read_parquet(path)
    # An article that exists (so the dangling check is not what fires) but is not in view.
    outsider = pl.read_parquet(folder / "articles.parquet")["article_id"].max()
    row = df.with_row_index().filter(~pl.col("article_ids_inview").list.contains(outsider))[
        "index"
    ][0]
    bad_id = df["impression_id"][row]
    rewrite(
        path,
        lambda d: d.with_columns(
            pl.when(pl.col("impression_id") == bad_id)
            .then(pl.lit([outsider], dtype=pl.List(pl.Int32)))
            .otherwise(pl.col("article_ids_clicked"))
            .alias("article_ids_clicked")
        ),
    )
    err = expect_error(folder, "train/behaviors.parquet", "article_ids_clicked")
    assert err.rows[0]["impression_id"] == bad_id


def test_unsorted_history(folder: Path) -> None:
    path = folder / "validation" / "history.parquet"
    lists = [
        "impression_time_fixed",
        "scroll_percentage_fixed",
        "article_id_fixed",
        "read_time_fixed",
    ]
    rewrite(
        path,
        lambda d: d.with_columns(
            pl.when(pl.int_range(pl.len()) == 1)
            .then(pl.col(c).list.reverse())
            .otherwise(pl.col(c))
            .alias(c)
            for c in lists
        ),
    )
    user = pl.read_parquet(path)["user_id"][1]
    err = expect_error(folder, "validation/history.parquet", "impression_time_fixed")
    assert "ascending" in err.expected
    assert err.rows[0]["user_id"] == user


def test_unequal_history_lists(folder: Path) -> None:
    rewrite(
        folder / "train" / "history.parquet",
        lambda d: d.with_columns(
            pl.when(pl.int_range(pl.len()) == 0)
            .then(pl.col("read_time_fixed").list.head(1))
            .otherwise(pl.col("read_time_fixed"))
            .alias("read_time_fixed")
        ),
    )
    expect_error(folder, "train/history.parquet", "read_time_fixed")


def test_history_after_behaviour_window(folder: Path) -> None:
    first_impression = pl.read_parquet(folder / "train" / "behaviors.parquet")[
        "impression_time"
    ].min()

    def append_late_read(d: pl.DataFrame) -> pl.DataFrame:
        row0 = pl.int_range(pl.len()) == 0
        late = {
            "impression_time_fixed": pl.lit(first_impression, dtype=pl.Datetime("us")),
            "scroll_percentage_fixed": pl.lit(50.0, dtype=pl.Float32),
            "article_id_fixed": pl.col("article_id_fixed").list.last(),
            "read_time_fixed": pl.lit(5.0, dtype=pl.Float32),
        }
        return d.with_columns(
            pl.when(row0).then(pl.col(c).list.concat(v)).otherwise(pl.col(c)).alias(c)
            for c, v in late.items()
        )

    rewrite(folder / "train" / "history.parquet", append_late_read)
    err = expect_error(folder, "train/history.parquet", "impression_time_fixed")
    assert "before the split's first impression" in err.expected


@pytest.mark.parametrize(
    ("file", "column"),
    [
        ("validation/behaviors.parquet", "article_ids_inview"),
        ("train/history.parquet", "article_id_fixed"),
    ],
)
def test_dangling_article_ids(folder: Path, file: str, column: str) -> None:
    unknown = 2_000_000_000

    def replace_first(d: pl.DataFrame) -> pl.DataFrame:
        changed = d.with_columns(
            pl.when(pl.int_range(pl.len()) == 0)
            .then(pl.concat_list(pl.lit(unknown, dtype=pl.Int32), pl.col(column).list.slice(1)))
            .otherwise(pl.col(column))
            .alias(column)
        )
        if column == "article_ids_inview":  # keep clicks inside the inview list
            changed = changed.with_columns(
                pl.col("article_ids_clicked").list.set_intersection("article_ids_inview")
            )
        return changed

    rewrite(folder / file, replace_first)
    err = expect_error(folder, file, column)
    assert "articles.parquet" in err.expected
    assert err.rows[0]["article_id"] == unknown


def test_empty_inview(folder: Path) -> None:
    empty = pl.lit([], dtype=pl.List(pl.Int32))
    rewrite(
        folder / "validation" / "behaviors.parquet",
        lambda d: d.with_columns(
            pl.when(pl.int_range(pl.len()) == 3).then(empty).otherwise(pl.col(c)).alias(c)
            for c in ("article_ids_inview", "article_ids_clicked")
        ),
    )
    err = expect_error(folder, "validation/behaviors.parquet", "article_ids_inview")
    assert err.rows[0]["row"] == 3


def test_duplicate_impression_ids(folder: Path) -> None:
    path = folder / "train" / "behaviors.parquet"
    first_id = pl.read_parquet(path)["impression_id"][0]
    rewrite(
        path,
        lambda d: d.with_columns(
            pl.when(pl.int_range(pl.len()) == 1)
            .then(pl.lit(first_id, dtype=pl.UInt32))
            .otherwise(pl.col("impression_id"))
            .alias("impression_id")
        ),
    )
    err = expect_error(folder, "train/behaviors.parquet", "impression_id")
    assert {r["impression_id"] for r in err.rows} == {first_id}


def test_duplicate_impression_ids_across_splits(folder: Path) -> None:
    train_id = pl.read_parquet(folder / "train" / "behaviors.parquet")["impression_id"][0]
    rewrite(
        folder / "validation" / "behaviors.parquet",
        lambda d: d.with_columns(
            pl.when(pl.int_range(pl.len()) == 0)
            .then(pl.lit(train_id, dtype=pl.UInt32))
            .otherwise(pl.col("impression_id"))
            .alias("impression_id")
        ),
    )
    err = expect_error(folder, "validation/behaviors.parquet", "impression_id")
    assert {r["split"] for r in err.rows} == {"train", "validation"}


def test_null_inside_inview_list(folder: Path) -> None:
    rewrite(
        folder / "train" / "behaviors.parquet",
        lambda d: d.with_columns(
            pl.when(pl.int_range(pl.len()) == 4)
            .then(pl.col("article_ids_inview").list.concat(pl.lit([None], dtype=pl.List(pl.Int32))))
            .otherwise(pl.col("article_ids_inview"))
            .alias("article_ids_inview")
        ),
    )
    err = expect_error(folder, "train/behaviors.parquet", "article_ids_inview")
    assert err.expected == "no null elements" and err.rows[0]["row"] == 4

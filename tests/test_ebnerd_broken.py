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


# --------------------------------------------------------------------------------------
# file-level damage: every error names the file and what it should have been


@pytest.mark.parametrize(
    ("file", "damage"),
    [
        ("validation/behaviors.parquet", lambda b: b[: len(b) // 2]),  # torn copy
        ("articles.parquet", lambda b: b"article_id,title\n1,hello\n"),  # a CSV
        ("train/history.parquet", lambda b: b""),  # zero bytes
        ("train/behaviors.parquet", lambda b: b[:-12]),  # footer cut off
    ],
    ids=["truncated", "csv_named_parquet", "zero_bytes", "no_footer"],
)
def test_unreadable_parquet_names_the_file(folder: Path, file: str, damage) -> None:
    path = folder / file
    path.write_bytes(damage(path.read_bytes()))
    err = expect_error(folder, file, None)
    assert err.expected == "a readable Parquet file"
    assert "not a readable Parquet file" in err.found


@pytest.mark.parametrize(
    "file",
    ["articles.parquet", "train/behaviors.parquet", "validation/history.parquet"],
)
def test_empty_required_table(folder: Path, file: str) -> None:
    rewrite(folder / file, lambda d: d.head(0))
    err = expect_error(folder, file, None)
    assert err.found == "0 rows" and "at least one row" in err.expected


def _set_row(column: str, row: int, value, dtype: pl.DataType):
    def change(d: pl.DataFrame) -> pl.DataFrame:
        return d.with_columns(
            pl.when(pl.int_range(pl.len()) == row)
            .then(pl.lit(value, dtype=dtype))
            .otherwise(pl.col(column))
            .alias(column)
        )

    return change


@pytest.mark.parametrize(
    ("file", "column", "value", "dtype"),
    [
        ("train/behaviors.parquet", "read_time", -3.0, pl.Float32),
        ("train/behaviors.parquet", "read_time", float("nan"), pl.Float32),
        ("validation/behaviors.parquet", "scroll_percentage", 140.0, pl.Float32),
        ("validation/behaviors.parquet", "scroll_percentage", -0.5, pl.Float32),
        ("train/behaviors.parquet", "next_read_time", -1.0, pl.Float32),
        ("train/behaviors.parquet", "next_scroll_percentage", 101.0, pl.Float32),
        ("train/behaviors.parquet", "age", -4, pl.Int8),
        ("train/behaviors.parquet", "device_type", -1, pl.Int8),
        ("articles.parquet", "total_inviews", -7, pl.Int32),
        ("articles.parquet", "total_pageviews", -1, pl.Int32),
        ("articles.parquet", "total_read_time", -0.1, pl.Float32),
        ("articles.parquet", "sentiment_score", 1.5, pl.Float32),
        ("articles.parquet", "category", -2, pl.Int16),
    ],
    ids=lambda v: str(v).replace("/", "_"),
)
def test_out_of_domain_values(folder: Path, file: str, column: str, value, dtype) -> None:
    rewrite(folder / file, _set_row(column, 3, value, dtype))
    err = expect_error(folder, file, column)
    assert "out of range" in err.found
    assert err.rows[0]["row"] == 3


@pytest.mark.parametrize(
    ("column", "value"),
    [("read_time_fixed", -5.0), ("scroll_percentage_fixed", 250.0)],
)
def test_out_of_domain_history_list_elements(folder: Path, column: str, value: float) -> None:
    bad = pl.lit([value], dtype=pl.List(pl.Float32))
    rewrite(
        folder / "train" / "history.parquet",
        lambda d: d.with_columns(
            pl.when(pl.int_range(pl.len()) == 1)
            .then(pl.col(column).list.head(1).list.concat(bad))
            .otherwise(pl.col(column))
            .alias(column)
        ).with_columns(
            # keep every history list the same length, so only the domain rule fires
            *[
                pl.when(pl.int_range(pl.len()) == 1)
                .then(pl.col(c).list.head(2))
                .otherwise(pl.col(c))
                .alias(c)
                for c in (
                    "impression_time_fixed",
                    "scroll_percentage_fixed",
                    "article_id_fixed",
                    "read_time_fixed",
                )
                if c != column
            ]
        ),
    )
    err = expect_error(folder, "train/history.parquet", column)
    assert err.rows[0]["row"] == 1 and "out of range" in err.found


@pytest.mark.parametrize("year", [1970, 2200])
@pytest.mark.parametrize(
    ("file", "column"),
    [
        ("train/behaviors.parquet", "impression_time"),
        ("articles.parquet", "published_time"),
        ("articles.parquet", "last_modified_time"),
    ],
)
def test_implausible_timestamps(folder: Path, file: str, column: str, year: int) -> None:
    from datetime import datetime

    rewrite(folder / file, _set_row(column, 0, datetime(year, 1, 1), pl.Datetime("us")))
    err = expect_error(folder, file, column)
    assert "plausible window" in err.expected
    assert err.rows[0]["row"] == 0 and str(year) in str(err.rows[0][column])


def test_history_time_in_1970(folder: Path) -> None:
    from datetime import datetime

    # The epoch as the first read keeps the list ascending: only the window rule can fire.
    rewrite(
        folder / "validation" / "history.parquet",
        lambda d: d.with_columns(
            pl.concat_list(
                pl.lit([datetime(1970, 1, 1)], dtype=pl.List(pl.Datetime("us"))),
                pl.col("impression_time_fixed").list.slice(1),
            ).alias("impression_time_fixed")
        ),
    )
    err = expect_error(folder, "validation/history.parquet", "impression_time_fixed")
    assert "plausible window" in err.expected


def test_negative_article_id_is_refused(folder: Path) -> None:
    rewrite(folder / "articles.parquet", _set_row("article_id", 5, -9, pl.Int32))
    err = expect_error(folder, "articles.parquet", "article_id")
    assert err.rows[0]["row"] == 5


# --------------------------------------------------------------------------------------
# zips


def _zip(folder: Path, out: Path, *, skip: str | None = None, stored: bool = False) -> Path:
    import zipfile

    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(out, "w", method) as zf:
        for p in sorted(folder.rglob("*.parquet")):
            rel = p.relative_to(folder).as_posix()
            if rel != skip:
                zf.write(p, f"ebnerd_demo/{rel}")
    return out


def test_zip_loads_like_the_folder(folder: Path, tmp_path: Path) -> None:
    # The control case for the zip tests below: the same zip, undamaged, loads.
    assert load_ebnerd(_zip(folder, tmp_path / "ok.zip")).impressions.height > 0


def test_zip_missing_a_member(folder: Path, tmp_path: Path) -> None:
    archive = _zip(folder, tmp_path / "part.zip", skip="validation/history.parquet")
    with pytest.raises(DataValidationError) as info:
        load_ebnerd(archive)
    assert info.value.file.endswith("part.zip!ebnerd_demo/validation/history.parquet")
    assert info.value.found == "missing file"


@pytest.mark.parametrize(
    "damage",
    [lambda b: b[: len(b) // 2], lambda b: b"PK\x03\x04" + b"\x00" * 64, lambda b: b"hello"],
    ids=["truncated", "header_only", "not_a_zip"],
)
def test_corrupt_zip_names_the_archive(folder: Path, tmp_path: Path, damage) -> None:
    archive = _zip(folder, tmp_path / "broken.zip")
    archive.write_bytes(damage(archive.read_bytes()))
    with pytest.raises(DataValidationError) as info:
        load_ebnerd(archive)
    assert info.value.file == str(archive)
    assert "readable zip archive" in info.value.expected


def test_zip_member_failing_its_checksum(folder: Path, tmp_path: Path) -> None:
    archive = _zip(folder, tmp_path / "crc.zip", stored=True)
    data = bytearray(archive.read_bytes())
    member = (folder / "train" / "behaviors.parquet").read_bytes()
    at = bytes(data).find(member)
    assert at > 0
    data[at + len(member) // 2] ^= 0xFF  # flip one byte inside the member's data
    archive.write_bytes(bytes(data))
    with pytest.raises(DataValidationError) as info:
        load_ebnerd(archive)
    err = info.value
    assert err.file.endswith("crc.zip!ebnerd_demo/train/behaviors.parquet")
    assert err.expected == "a readable zip member"


def test_zip_member_that_is_not_parquet(folder: Path, tmp_path: Path) -> None:
    (folder / "articles.parquet").write_bytes(b"\x00" * 100)
    archive = _zip(folder, tmp_path / "notparquet.zip")
    with pytest.raises(DataValidationError) as info:
        load_ebnerd(archive)
    assert info.value.file.endswith("notparquet.zip!ebnerd_demo/articles.parquet")
    assert info.value.expected == "a readable Parquet file"

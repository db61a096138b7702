"""Reading every EBNeRD file against its exact schema, then checking its values; the result
is `EbnerdFrames`. See `load.py` for the rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import polars as pl
import pyarrow as pa

from feed_dagster.data.validate import (
    check_not_empty,
    check_range,
    check_time_window,
)
from feed_dagster.ebnerd.archive import FLAT_SPLIT, Archive, EbnerdLayout, read_layout
from feed_dagster.ebnerd.layout import (
    ARTICLES_FILE,
    ARTICLES_SCHEMA,
    BEHAVIORS_FILE,
    BEHAVIORS_SCHEMA,
    HISTORY_FILE,
    HISTORY_LIST_COLUMNS,
    HISTORY_SCHEMA,
    same_logical_type,
)
from feed_dagster.errors import MAX_ROWS_SHOWN, DataValidationError


@dataclass(frozen=True)
class EbnerdFrames:
    """The validated EBNeRD files as polars frames.

    `behaviors` concatenates the labelled splits with two added columns: `split` and
    `is_heldout`. `history` maps each split to its history frame.
    """

    layout: EbnerdLayout
    articles: pl.DataFrame
    behaviors: pl.DataFrame
    history: dict[str, pl.DataFrame]


def _read_checked(src: Archive, rel: str, schema: pa.Schema) -> pl.DataFrame:
    name = src.display(rel)
    if not src.exists(rel):
        raise DataValidationError(name, None, "the file to exist", "missing file")
    found = src.schema(rel)
    for f in schema:
        idx = found.get_field_index(f.name)
        if idx < 0:
            raise DataValidationError(name, f.name, f"a column of type {f.type}", "no column")
        if not same_logical_type(found.field(idx).type, f.type):
            raise DataValidationError(
                name, f.name, f"type {f.type}", f"type {found.field(idx).type}"
            )
    return src.read(rel)


def _printable(df: pl.DataFrame) -> pl.DataFrame:
    """Offending rows in short form: times as text, lists cut to their first 8 elements
    (with the full length beside them when cut)."""
    df = df.head(MAX_ROWS_SHOWN)
    exprs: list[pl.Expr] = []
    for name, dtype in df.schema.items():
        col = pl.col(name)
        if isinstance(dtype, pl.List):
            inner = dtype.inner
            shown = col.list.head(8)
            if inner is not None and inner.is_temporal():
                shown = shown.cast(pl.List(pl.String))
            exprs.append(shown.alias(name))
            if (df[name].list.len() > 8).any():
                exprs.append(col.list.len().alias(f"{name}_len"))
        elif dtype.is_temporal():
            exprs.append(col.cast(pl.String))
        else:
            exprs.append(col)
    return df.select(exprs)


def _fail_if(bad: pl.DataFrame, file: str, column: str, expected: str, found: str) -> None:
    if bad.height:
        raise DataValidationError.from_frame(
            file, column, expected, f"{bad.height} {found}", _printable(bad)
        )


def _check_not_null(df: pl.DataFrame, file: str, columns: list[str], keys: list[str]) -> None:
    for col in columns:
        bad = df.filter(pl.col(col).is_null())
        _fail_if(bad.select("row", *keys), file, col, "no null values", "rows with null")
        if isinstance(df.schema[col], pl.List):
            bad = df.filter(pl.col(col).list.eval(pl.element().is_null().any()).list.first())
            _fail_if(bad.select("row", *keys, col), file, col, "no null elements", "rows")


def _check_unique(df: pl.DataFrame, file: str, column: str) -> None:
    bad = df.filter(pl.col(column).is_duplicated()).sort(column, "row")
    _fail_if(bad.select("row", column), file, column, "unique values", "rows with duplicate ids")


# Value domains (inclusive; None = open). Percentages are EBNeRD's 0-100 scroll depths,
# times are seconds, `sentiment_score` is a classifier probability, codes and ids are
# non-negative. Nulls are allowed where EBNeRD has them (e.g. scroll depth not measured).
PERCENT = (0.0, 100.0)
NON_NEGATIVE = (0.0, None)
ARTICLE_RANGES: dict[str, tuple[float | None, float | None]] = {
    "article_id": NON_NEGATIVE,
    "image_ids": NON_NEGATIVE,
    "category": NON_NEGATIVE,
    "subcategory": NON_NEGATIVE,
    "total_inviews": NON_NEGATIVE,
    "total_pageviews": NON_NEGATIVE,
    "total_read_time": NON_NEGATIVE,
    "sentiment_score": (0.0, 1.0),
}
BEHAVIOR_RANGES: dict[str, tuple[float | None, float | None]] = {
    "article_id": NON_NEGATIVE,
    "read_time": NON_NEGATIVE,
    "scroll_percentage": PERCENT,
    "device_type": NON_NEGATIVE,
    "gender": NON_NEGATIVE,
    "postcode": NON_NEGATIVE,
    "age": (0.0, 120.0),
    "next_read_time": NON_NEGATIVE,
    "next_scroll_percentage": PERCENT,
}
HISTORY_RANGES: dict[str, tuple[float | None, float | None]] = {
    "scroll_percentage_fixed": PERCENT,
    "read_time_fixed": NON_NEGATIVE,
}
TIME_COLUMNS: dict[str, tuple[str, ...]] = {
    ARTICLES_FILE: ("published_time", "last_modified_time"),
    BEHAVIORS_FILE: ("impression_time",),
    HISTORY_FILE: ("impression_time_fixed",),
}


def _check_values(
    df: pl.DataFrame,
    file: str,
    ranges: dict[str, tuple[float | None, float | None]],
    times: tuple[str, ...],
    keys: list[str],
) -> None:
    """Domain ranges and the plausible time window (feed_dagster.data.validate)."""
    for column, (low, high) in ranges.items():
        check_range(df, file, column, low, high, keys=keys)
    for column in times:
        check_time_window(df, file, column, keys=keys)


def _check_articles(df: pl.DataFrame, file: str) -> None:
    check_not_empty(df, file, "the articles every impression refers to")
    _check_values(df, file, ARTICLE_RANGES, TIME_COLUMNS[ARTICLES_FILE], ["article_id"])
    df = df.with_row_index("row")
    _check_not_null(df, file, ["article_id"], [])
    _check_unique(df, file, "article_id")


def _check_behaviors(df: pl.DataFrame, file: str) -> None:
    check_not_empty(df, file, "the impressions to train and evaluate on")
    keys = ["impression_id", "user_id"]
    _check_values(df, file, BEHAVIOR_RANGES, TIME_COLUMNS[BEHAVIORS_FILE], keys)
    df = df.with_row_index("row")
    _check_not_null(
        df,
        file,
        [
            "impression_id",
            "user_id",
            "impression_time",
            "article_ids_inview",
            "article_ids_clicked",
        ],
        keys,
    )
    _check_unique(df, file, "impression_id")
    bad = df.filter(pl.col("article_ids_inview").list.len() == 0)
    _fail_if(bad.select("row", *keys), file, "article_ids_inview", "non-empty lists", "empty lists")
    bad = df.filter(
        pl.col("article_ids_clicked").list.set_difference("article_ids_inview").list.len() > 0
    )
    _fail_if(
        bad.select("row", *keys, "article_ids_clicked", "article_ids_inview"),
        file,
        "article_ids_clicked",
        "every clicked article in article_ids_inview",
        "rows with clicks outside the inview list",
    )


def _check_history(df: pl.DataFrame, file: str, behaviors_start: datetime | None) -> None:
    check_not_empty(df, file, "the reading history of the split's users")
    _check_values(df, file, HISTORY_RANGES, TIME_COLUMNS[HISTORY_FILE], ["user_id"])
    df = df.with_row_index("row")
    _check_not_null(df, file, ["user_id", "impression_time_fixed", "article_id_fixed"], ["user_id"])
    _check_unique(df, file, "user_id")
    n = pl.col("article_id_fixed").list.len()
    for col in HISTORY_LIST_COLUMNS:
        if col == "article_id_fixed":
            continue
        bad = df.filter(pl.col(col).is_null() | (pl.col(col).list.len() != n))
        _fail_if(
            bad.select(
                "row",
                "user_id",
                pl.col(col).list.len().alias(f"len_{col}"),
                n.alias("len_article_id_fixed"),
            ),
            file,
            col,
            "as many elements as article_id_fixed in every row",
            "rows of unequal length",
        )
    times = pl.col("impression_time_fixed")
    bad = df.filter(times.list.eval(pl.element().diff() < pl.duration(microseconds=0)).list.any())
    _fail_if(
        bad.select("row", "user_id", times),
        file,
        "impression_time_fixed",
        "ascending times in every row",
        "rows with times out of order",
    )
    if behaviors_start is not None:
        bad = df.filter(times.list.max() >= behaviors_start)
        _fail_if(
            bad.select("row", "user_id", times.list.max().alias("last_history_time")),
            file,
            "impression_time_fixed",
            f"every time before the split's first impression ({behaviors_start})",
            "rows reaching into the behaviour window",
        )


def _check_dangling(
    ids: pl.DataFrame, known: pl.Series, file: str, column: str, articles_file: str
) -> None:
    bad = ids.filter(~pl.col("article_id").is_in(known.implode()))
    _fail_if(
        bad,
        file,
        column,
        f"article ids present in {articles_file}",
        "references to unknown articles",
    )


def read_ebnerd(path: str | Path, *, heldout_fraction: float = 0.2) -> EbnerdFrames:
    """Read and validate every file EBNeRD training and evaluation need.

    Raises DataValidationError on the first layout or value problem found.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    src = Archive(path)
    try:
        layout = read_layout(src)
        articles_file = src.display(ARTICLES_FILE)
        articles = _read_checked(src, ARTICLES_FILE, ARTICLES_SCHEMA)
        _check_articles(articles, articles_file)
        known = articles["article_id"]

        behaviors_parts: list[pl.DataFrame] = []
        history: dict[str, pl.DataFrame] = {}
        for split in layout.splits:
            bfile = src.display(layout.behaviors_file(split))
            hfile = src.display(layout.history_file(split))
            beh = _read_checked(src, layout.behaviors_file(split), BEHAVIORS_SCHEMA)
            _check_behaviors(beh, bfile)
            hist = _read_checked(src, layout.history_file(split), HISTORY_SCHEMA)
            start = beh["impression_time"].min() if beh.height else None
            _check_history(hist, hfile, start)  # type: ignore[arg-type]

            for column in ("article_ids_inview", "article_ids_clicked"):
                ids = (
                    beh.with_row_index("row")
                    .select("row", "impression_id", pl.col(column).alias("article_id"))
                    .explode("article_id")
                )
                _check_dangling(ids, known, bfile, column, articles_file)
            ids = (
                hist.with_row_index("row")
                .select("row", "user_id", pl.col("article_id_fixed").alias("article_id"))
                .explode("article_id")
            )
            _check_dangling(ids, known, hfile, "article_id_fixed", articles_file)

            if split == FLAT_SPLIT:
                heldout = _time_heldout(beh, heldout_fraction)
            else:
                heldout = pl.lit(split == "validation")
            behaviors_parts.append(beh.with_columns(split=pl.lit(split), is_heldout=heldout))
            history[split] = hist

        behaviors = pl.concat(behaviors_parts, how="vertical")
        if len(behaviors_parts) > 1:
            dup = (
                behaviors.with_row_index("row")
                .filter(pl.col("impression_id").is_duplicated())
                .sort("impression_id", "split")
                .select("impression_id", "split")
            )
            _fail_if(
                dup,
                src.display(layout.behaviors_file(layout.splits[-1])),
                "impression_id",
                "impression ids unique across splits",
                "rows sharing an id with another split",
            )
        return EbnerdFrames(layout=layout, articles=articles, behaviors=behaviors, history=history)
    finally:
        src.close()


def _time_heldout(beh: pl.DataFrame, fraction: float) -> pl.Expr:
    t_min, t_max = beh["impression_time"].min(), beh["impression_time"].max()
    if t_min is None or t_max is None:
        return pl.lit(False)
    cutoff = t_min + (t_max - t_min) * (1.0 - fraction)  # type: ignore[operator]
    return pl.col("impression_time") >= cutoff

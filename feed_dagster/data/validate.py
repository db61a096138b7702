"""Value rules shared by every place that reads files from users (core; no dagster).

EBNeRD folders and zips, Parquet source folders and incoming batches all go through these
helpers, so one bad value is refused with the same kind of `DataValidationError` (file,
column, rule, first offending rows) wherever it enters.

The plausible time window
-------------------------
Every timestamp of every input must lie in [PLAUSIBLE_START, PLAUSIBLE_END). The start is
before any online news archive the project reads (EBNeRD's oldest articles are from the
2000s); it catches the epoch (1970-01-01, what a zero or a missing-value sentinel becomes)
and times read in the wrong unit (seconds as microseconds land in 1970). The end catches the
opposite unit mistake (milliseconds as microseconds jump centuries ahead) and the
year-2200-style placeholders some exports use for "never". The synthetic worlds live in
2026, EBNeRD in 2023; both are well inside. The window is deliberately fixed rather than
tied to the wall clock, so a file valid today is valid tomorrow and tests are repeatable.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from feed_dagster.data.schema import ACTIONS, TABLE_SCHEMAS
from feed_dagster.errors import MAX_ROWS_SHOWN, DataValidationError

PLAUSIBLE_START = datetime(1995, 1, 1)
PLAUSIBLE_END = datetime(2100, 1, 1)
PLAUSIBLE_WINDOW = f"[{PLAUSIBLE_START:%Y-%m-%d}, {PLAUSIBLE_END:%Y-%m-%d})"

# Value domains of the canonical tables (inclusive bounds; None = unbounded). Ids are
# non-negative everywhere: the pipeline uses -1 as its "no author / no topic" key.
ID_COLUMNS: dict[str, tuple[str, ...]] = {
    "users": ("user_id",),
    "articles": ("article_id", "author_id", "parent_id", "conversation_id", "topic"),
    "engagements": ("user_id", "article_id", "impression_id"),
    "impressions": ("impression_id", "user_id", "article_id"),
    "impression_truth": ("impression_id", "article_id"),
    "follows": ("follower_id", "followee_id"),
    "topic_follows": ("user_id", "topic"),
    "blocks": ("user_id", "blocked_id"),
    "mutes": ("user_id", "muted_id"),
    "muted_keywords": ("user_id",),
    "deleted_posts": ("article_id",),
}
RANGES: dict[str, dict[str, tuple[float | None, float | None]]] = {
    "engagements": {"dwell_seconds": (0.0, None)},
    "impressions": {"position": (0, None)},
    "impression_truth": {
        **{f"true_p_{a}": (0.0, 1.0) for a in ACTIONS},
        "true_dwell_seconds": (0.0, None),
    },
}
# Every datetime column of the canonical tables is checked against the plausible window.
TIME_COLUMNS: dict[str, tuple[str, ...]] = {
    name: tuple(c for c, t in schema.items() if t.is_temporal())
    for name, schema in TABLE_SCHEMAS.items()
}


def read_parquet(
    source: str | Path | io.BytesIO, file: str, columns: Iterable[str] | None = None
) -> pl.DataFrame:
    """A Parquet file as a frame, or a DataValidationError naming `file` when it is not
    one (truncated, empty, another format) instead of pyarrow's bare 'magic bytes' error."""
    try:
        table = pq.read_table(source, columns=list(columns) if columns is not None else None)
    except Exception as exc:  # ArrowInvalid, OSError, ...: all mean "not readable Parquet"
        raise DataValidationError(
            file, None, "a readable Parquet file", f"not a readable Parquet file ({exc})"
        ) from exc
    return pl.from_arrow(table)  # type: ignore[return-value]


def check_not_empty(df: pl.DataFrame, file: str, what: str) -> None:
    """A required table with no rows is an error, not an empty world."""
    if df.is_empty():
        raise DataValidationError(file, None, f"at least one row ({what})", "0 rows")


def _offending(df: pl.DataFrame, bad: pl.Expr, column: str, keys: Iterable[str]) -> pl.DataFrame:
    keep = [k for k in keys if k in df.columns and k != column]
    shown = df.with_row_index("row").filter(bad).select("row", *keep, column)
    # Times print as text so the message stays readable in a log line.
    return shown.with_columns(pl.col(pl.Datetime).cast(pl.String))


def check_range(
    df: pl.DataFrame,
    file: str,
    column: str,
    low: float | datetime | None,
    high: float | datetime | None,
    *,
    keys: Iterable[str] = (),
    high_exclusive: bool = False,
    expected: str | None = None,
) -> None:
    """Every non-null value of `column` (or every element, for a list column) lies in
    [low, high] (high excluded when `high_exclusive`). NaN counts as out of range.
    Nulls are not this rule's business: required columns have their own null checks."""
    if column not in df.columns:
        return
    is_list = isinstance(df.schema[column], pl.List)
    value = pl.element() if is_list else pl.col(column)
    bad = pl.lit(False)
    if df.schema[column].is_float() or (
        is_list and df.schema[column].inner.is_float()  # type: ignore[union-attr]
    ):
        bad = bad | value.is_nan()
    if low is not None:
        bad = bad | (value < low)
    if high is not None:
        bad = bad | ((value >= high) if high_exclusive else (value > high))
    bad = bad.fill_null(False)
    row_bad = pl.col(column).list.eval(bad).list.any() if is_list else bad
    n = df.select(row_bad.sum()).item()
    if not n:
        return
    if expected is None:
        lo = "" if low is None else f">= {low}"
        hi = "" if high is None else f"{'<' if high_exclusive else '<='} {high}"
        expected = " and ".join(p for p in (lo, hi) if p) + " in every value"
    rows = _offending(df, row_bad, column, keys)
    if is_list:
        rows = rows.with_columns(pl.col(column).list.head(8))
        if rows.schema[column].inner.is_temporal():  # type: ignore[union-attr]
            rows = rows.with_columns(pl.col(column).cast(pl.List(pl.String)))
    raise DataValidationError.from_frame(
        file, column, expected, f"{n} rows out of range", rows.head(MAX_ROWS_SHOWN)
    )


def check_time_window(
    df: pl.DataFrame, file: str, column: str, *, keys: Iterable[str] = ()
) -> None:
    """Every timestamp of `column` lies inside the plausible window (module doc)."""
    check_range(
        df,
        file,
        column,
        PLAUSIBLE_START,
        PLAUSIBLE_END,
        keys=keys,
        high_exclusive=True,
        expected=f"timestamps inside the plausible window {PLAUSIBLE_WINDOW}",
    )


def check_canonical(name: str, df: pl.DataFrame, file: str) -> None:
    """Value rules of canonical table `name`: ids >= 0, RANGES, times in the window."""
    keys = ID_COLUMNS.get(name, ())
    for column in ID_COLUMNS.get(name, ()):
        check_range(df, file, column, 0, None, keys=keys, expected="ids >= 0")
    for column, (low, high) in RANGES.get(name, {}).items():
        check_range(df, file, column, low, high, keys=keys)
    for column in TIME_COLUMNS.get(name, ()):
        check_time_window(df, file, column, keys=keys)


def _kind(dtype: pl.DataType) -> str:
    if dtype == pl.Null:
        return "null"
    if dtype.is_integer():
        return "integer"
    if dtype.is_float():
        return "float"
    if dtype.is_temporal():
        return "temporal"
    if dtype == pl.Boolean:
        return "boolean"
    if dtype in (pl.String, pl.Categorical):
        return "string"
    return str(dtype)


# Which source kinds may be cast to a canonical kind without changing meaning: ids must be
# integers in the file (a float id that casts to an int hides a broken export), a float
# column accepts any number, a timestamp only a date or datetime (never text or epoch ints,
# whose unit is a guess).
_CASTS = {
    "integer": {"integer", "null"},
    "float": {"integer", "float", "null"},
    "temporal": {"temporal", "null"},
    "boolean": {"boolean", "null"},
    "string": {"string", "null"},
}


def conform_checked(
    name: str, df: pl.DataFrame, file: str, required: Iterable[str] = ()
) -> pl.DataFrame:
    """`schema.conform` with the checks a user's file needs first: every `required` column
    present and non-null, and every present column of a type that casts to the canonical
    one without a guess (see _CASTS)."""
    from feed_dagster.data.schema import conform

    schema = TABLE_SCHEMAS[name]
    required = tuple(required)
    for column in required:
        if column not in df.columns:
            raise DataValidationError(
                file, column, f"a column of type {schema[column]}", "no column"
            )
    for column, target in schema.items():
        if column not in df.columns:
            continue
        found = df.schema[column]
        if _kind(found) not in _CASTS.get(_kind(target), {_kind(target)}):
            raise DataValidationError(file, column, f"type {target}", f"type {found}")
    try:
        out = conform(name, df)
    except Exception as exc:  # overflow and other casts polars refuses
        raise DataValidationError(
            file, None, f"columns that cast to the {name} schema", f"a cast failure ({exc})"
        ) from exc
    for column in required:
        bad = out.with_row_index("row").filter(pl.col(column).is_null())
        if bad.height:
            raise DataValidationError.from_frame(
                file,
                column,
                "no null values",
                f"{bad.height} rows with null",
                bad.select("row", *[c for c in required if c != column]).with_columns(
                    pl.col(pl.Datetime).cast(pl.String)
                ),
            )
    return out


def check_unique(df: pl.DataFrame, file: str, key: list[str]) -> None:
    """The key (one or more columns) identifies at most one row."""
    bad = df.with_row_index("row").filter(pl.struct(key).is_duplicated())
    if bad.height:
        raise DataValidationError.from_frame(
            file,
            ", ".join(key),
            "unique values",
            f"{bad.height} rows with duplicate ids",
            bad.sort(key).select("row", *key),
        )


def check_references(
    df: pl.DataFrame, file: str, column: str, known: pl.Series, target: str
) -> None:
    """Every non-null value of `column` is among `known` (the ids of `target`)."""
    bad = (
        df.with_row_index("row")
        .filter(pl.col(column).is_not_null() & ~pl.col(column).is_in(known.implode()))
        .select("row", column)
    )
    if bad.height:
        raise DataValidationError.from_frame(
            file,
            column,
            f"ids present in {target}",
            f"{bad.height} rows referring to unknown ids",
            bad,
        )

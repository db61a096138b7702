"""A world as tables: the one-row world_info, a Parquet folder of canonical tables (read with
full validation, or written), and a World rebuilt from warehouse tables (core; no dagster).

Choosing a source by its spec string lives one layer up, in `feed_dagster/sources.py`.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import polars as pl

from feed_dagster.artifacts import Location
from feed_dagster.data.schema import DEFAULT_CANDIDATE_WINDOW, TABLE_SCHEMAS, World, conform
from feed_dagster.data.validate import (
    check_canonical,
    check_not_empty,
    check_references,
    check_time_window,
    check_unique,
    conform_checked,
    read_parquet,
)
from feed_dagster.data.warehouse_store import write_tables
from feed_dagster.data.world_stream import WorldStream
from feed_dagster.errors import DataValidationError


def world_info(world: World, source: str) -> pl.DataFrame:
    """The one-row table that carries a world's time frame to downstream assets."""
    return pl.DataFrame(
        {
            "source": [source],
            "window_start": [world.window_start],
            "heldout_start": [world.heldout_start],
            "now": [world.now],
            "candidate_window_hours": [window_hours(world.candidate_window)],
        },
        schema={
            "source": pl.String,
            **{k: pl.Datetime("us") for k in ("window_start", "heldout_start", "now")},
            "candidate_window_hours": pl.Float64,
        },
    )


def window_hours(window: timedelta | None) -> float | None:
    return None if window is None else window.total_seconds() / 3600.0


def window_from_info(row: dict) -> timedelta | None:
    """The candidate window of a world_info row; tables written before the column existed
    carry the news default."""
    if "candidate_window_hours" not in row:
        return DEFAULT_CANDIDATE_WINDOW
    hours = row["candidate_window_hours"]
    return None if hours is None else timedelta(hours=float(hours))


def write_world(warehouse: Location, stream: WorldStream, source: str) -> dict[str, int]:
    """Every table of the stream, and its world_info, into the warehouse: the streamed
    tables part by part as they come, all replacing the old tables together
    (`warehouse_store.write_tables`). Returns each table's row count."""
    tables = {"world_info": world_info(stream.head, source), **stream.head.tables()}
    return write_tables(warehouse, tables, stream.parts())


def save_parquet_world(world: World, folder: Path, source: str = "parquet") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, df in world.tables().items():
        df.write_parquet(folder / f"{name}.parquet")
    world_info(world, source).write_parquet(folder / "world_info.parquet")


# Tables a Parquet source folder must hold, with at least one row each, and the columns
# every row needs (the rest of a table's columns may be absent and become nulls).
PARQUET_REQUIRED_TABLES = ("users", "articles", "impressions", "engagements")
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "users": ("user_id",),
    "articles": ("article_id", "published_at", "kind"),
    "engagements": ("user_id", "article_id", "engaged_at"),
    "impressions": ("impression_id", "user_id", "article_id", "position", "shown_at"),
    "impression_truth": ("impression_id", "article_id"),
    "follows": ("follower_id", "followee_id"),
    "topic_follows": ("user_id", "topic"),
    "blocks": ("user_id", "blocked_id"),
    "mutes": ("user_id", "muted_id"),
    "muted_keywords": ("user_id", "keyword"),
    "deleted_posts": ("article_id",),
}
UNIQUE_KEYS: dict[str, list[str]] = {
    "users": ["user_id"],
    "articles": ["article_id"],
    "impressions": ["impression_id", "article_id"],
    "deleted_posts": ["article_id"],
}
# (table, column) -> (table, column) it must refer to.
REFERENCES: dict[tuple[str, str], tuple[str, str]] = {
    ("engagements", "user_id"): ("users", "user_id"),
    ("engagements", "article_id"): ("articles", "article_id"),
    ("impressions", "user_id"): ("users", "user_id"),
    ("impressions", "article_id"): ("articles", "article_id"),
    ("deleted_posts", "article_id"): ("articles", "article_id"),
}
WORLD_INFO_TIMES = ("window_start", "heldout_start", "now")


def load_parquet_world(folder: Path) -> World:
    """Canonical tables from `<table>.parquet` files; missing optional tables are empty.

    Every file is validated before anything is returned (so nothing is written from a bad
    folder): readable Parquet, required tables present and non-empty, required columns
    present and non-null, types that cast without a guess, non-negative ids, value domains
    and the plausible time window (`feed_dagster.data.validate`), unique keys, and
    references from engagements, impressions and tombstones to users and articles. Any
    failure raises DataValidationError naming the file and column.
    """
    if not folder.is_dir():
        raise DataValidationError(
            str(folder), None, "a folder of <table>.parquet files", "no such folder"
        )
    missing = [t for t in PARQUET_REQUIRED_TABLES if not (folder / f"{t}.parquet").exists()]
    if missing:
        raise DataValidationError(
            str(folder / f"{missing[0]}.parquet"),
            None,
            f"the files {', '.join(t + '.parquet' for t in PARQUET_REQUIRED_TABLES)}",
            f"missing file(s) {', '.join(t + '.parquet' for t in missing)}",
        )
    tables = {}
    for name, schema in TABLE_SCHEMAS.items():
        path = folder / f"{name}.parquet"
        if not path.exists():
            tables[name] = pl.DataFrame(schema=schema)
            continue
        df = conform_checked(name, read_parquet(path, str(path)), str(path), REQUIRED_COLUMNS[name])
        if name in PARQUET_REQUIRED_TABLES:
            check_not_empty(df, str(path), f"a required {name} table")
        check_canonical(name, df, str(path))
        if name in UNIQUE_KEYS:
            check_unique(df, str(path), UNIQUE_KEYS[name])
        tables[name] = df
    for (name, column), (target, target_column) in REFERENCES.items():
        check_references(
            tables[name],
            str(folder / f"{name}.parquet"),
            column,
            tables[target][target_column],
            f"{target}.parquet",
        )
    info_path = folder / "world_info.parquet"
    if info_path.exists():
        info_df = read_parquet(info_path, str(info_path))
        check_not_empty(info_df, str(info_path), "the world's time frame")
        for column in WORLD_INFO_TIMES:
            if column not in info_df.columns or info_df[column].null_count():
                raise DataValidationError(
                    str(info_path), column, "a non-null timestamp", "no value"
                )
            check_time_window(info_df, str(info_path), column)
        info = info_df.row(0, named=True)
        start, heldout, now = info["window_start"], info["heldout_start"], info["now"]
        window = window_from_info(info)
    else:
        window = DEFAULT_CANDIDATE_WINDOW
        times = tables["impressions"]["shown_at"]
        start, now = times.min(), times.max()
        heldout = start + (now - start) * 0.8
    return World(
        **tables, window_start=start, heldout_start=heldout, now=now, candidate_window=window
    )


def world_from_tables(tables: dict[str, pl.DataFrame], info: pl.DataFrame) -> World:
    """A World from warehouse tables (missing ones empty) and the one-row world_info."""
    row = info.row(0, named=True)
    full = {
        name: conform(name, tables[name]) if name in tables else pl.DataFrame(schema=schema)
        for name, schema in TABLE_SCHEMAS.items()
    }
    return World(
        **full,
        window_start=row["window_start"],
        heldout_start=row["heldout_start"],
        now=row["now"],
        candidate_window=window_from_info(row),
    )

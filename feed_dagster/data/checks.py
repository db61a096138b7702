"""Integrity checks on the canonical tables, as pure functions (the asset checks call them).

Each check returns a CheckOutcome naming the table, the column and a few offending rows, so a
failure in the UI says exactly what is wrong without opening the warehouse.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import polars as pl

SAMPLE_ROWS = 5


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    description: str
    n_bad: int = 0
    sample: list[dict] | None = None

    def metadata(self) -> dict[str, object]:
        meta: dict[str, object] = {"offending_rows": self.n_bad}
        if self.sample:
            meta["sample"] = str(self.sample)
        return meta


def _outcome(table: str, column: str, what: str, bad: pl.DataFrame) -> CheckOutcome:
    if bad.height == 0:
        return CheckOutcome(True, f"{table}.{column}: {what} holds")
    sample = bad.head(SAMPLE_ROWS).to_dicts()
    return CheckOutcome(
        False,
        f"{table}.{column}: {bad.height:,} rows violate '{what}', e.g. {sample}",
        bad.height,
        sample,
    )


def unique_non_null(
    df: pl.DataFrame, table: str, key: list[str], nullable: tuple[str, ...] = ()
) -> CheckOutcome:
    """The key combination is unique, and its columns non-null except those in `nullable`
    (a null there counts as one value, e.g. engagements outside any logged impression)."""
    column = ", ".join(key)
    required = [c for c in key if c not in nullable]
    nulls = df.filter(pl.any_horizontal(pl.col(required).is_null()))
    if nulls.height:
        return _outcome(table, column, "key is never null", nulls.select(key))
    dupes = df.filter(pl.struct(key).is_duplicated()).select(key).unique(maintain_order=True)
    return _outcome(table, column, "key is unique", dupes)


def references(
    df: pl.DataFrame,
    table: str,
    column: str,
    target: pl.DataFrame,
    target_column: str,
    target_name: str,
) -> CheckOutcome:
    """Every non-null value of df[column] exists in target[target_column]."""
    keys = target.select(pl.col(target_column).alias(column)).unique()
    bad = (
        df.select(column).drop_nulls().unique(maintain_order=True).join(keys, on=column, how="anti")
    )
    return _outcome(table, column, f"refers to an existing {target_name}.{target_column}", bad)


def no_self_follows(follows: pl.DataFrame) -> CheckOutcome:
    bad = follows.filter(pl.col("follower_id") == pl.col("followee_id"))
    return _outcome("follows", "follower_id, followee_id", "nobody follows themselves", bad)


def within_window(
    df: pl.DataFrame, table: str, column: str, start: datetime | None, end: datetime
) -> CheckOutcome:
    """Timestamps are non-null, not after `end` and (when given) not before `start`."""
    cond = pl.col(column).is_null() | (pl.col(column) > end)
    if start is not None:
        cond = cond | (pl.col(column) < start)
    span = f"[{start}, {end}]" if start is not None else f"<= {end}"
    return _outcome(table, column, f"timestamp inside {span}", df.filter(cond))

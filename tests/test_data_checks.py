"""The uniqueness rule of the raw-table checks, on small DuckDB tables."""

from __future__ import annotations

import duckdb
import pytest

from feed_dagster.data.checks import unique_non_null


@pytest.fixture
def con() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    yield con
    con.close()


def _table(con: duckdb.DuckDBPyConnection, rows: list[tuple]) -> None:
    con.execute(
        "create or replace table main.impressions (impression_id bigint, article_id bigint)"
    )
    con.executemany("insert into main.impressions values (?, ?)", rows)


def test_a_two_column_key_passes_when_no_pair_repeats(con) -> None:
    # Values repeat in each column on their own, never as a pair.
    _table(con, [(1, 10), (1, 11), (2, 10), (2, 11), (3, 12)])
    out = unique_non_null(con, "impressions", ["impression_id", "article_id"])
    assert out.passed and out.n_bad == 0


def test_a_two_column_key_names_exactly_the_repeated_pairs(con) -> None:
    rows = [(1, 10), (1, 11), (1, 10), (2, 10), (2, 11), (3, 12), (3, 12), (3, 12), (3, 13)]
    _table(con, rows)
    out = unique_non_null(con, "impressions", ["impression_id", "article_id"])
    assert not out.passed
    assert out.n_bad == 2
    assert out.sample == [
        {"impression_id": 1, "article_id": 10},
        {"impression_id": 3, "article_id": 12},
    ]


def test_a_null_in_a_two_column_key_fails_before_the_duplicates(con) -> None:
    _table(con, [(1, 10), (1, None), (2, 10), (2, 10)])
    out = unique_non_null(con, "impressions", ["impression_id", "article_id"])
    assert not out.passed and "never null" in out.description


def test_a_nullable_key_column_counts_null_as_one_value(con) -> None:
    # The general path: (1, null) twice is a repeat, (2, null) once is not.
    _table(con, [(1, None), (1, None), (2, None), (2, 10)])
    out = unique_non_null(con, "impressions", ["impression_id", "article_id"], ("article_id",))
    assert not out.passed and out.n_bad == 1
    assert out.sample == [{"impression_id": 1, "article_id": None}]

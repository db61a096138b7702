"""The synthetic world in parts: generated chunk by chunk, appended to the warehouse as each
comes, the same tables as the world generated whole, and nothing written when it fails."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pytest
from dagster_helpers import materialize
from polars.testing import assert_frame_equal

import feed_dagster.world.generate as generate_module
from feed_dagster.assets.raw import RAW_TABLES
from feed_dagster.data.warehouse import read_table
from feed_dagster.data.warehouse_store import write_tables
from feed_dagster.data.world_stream import STREAMED_TABLES, WorldStream
from feed_dagster.data.world_tables import world_info, write_world
from feed_dagster.world import generate_world, stream_world, world_config

# Shown slots per chunk in these tests: the tiny world's 33k impressions in a dozen parts.
SMALL_CHUNKS = 3_000


@pytest.fixture()
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generate_module, "CHUNK_SLOTS", SMALL_CHUNKS)


def _read_all(warehouse: Path, names) -> dict[str, pl.DataFrame]:
    return {name: read_table(warehouse, name) for name in names}


def test_the_parts_collect_to_the_world_generated_whole(small_chunks) -> None:
    cfg = world_config("tiny")
    stream = stream_world(cfg)
    for name in STREAMED_TABLES:
        assert getattr(stream.head, name).height == 0
    parts = list(stream.parts())
    assert len(parts) >= 10
    assert all(part["impressions"].height <= SMALL_CHUNKS for part in parts)
    world = generate_world(cfg)
    collected = WorldStream(stream.head, parts).collect()
    for name, df in world.tables().items():
        assert_frame_equal(getattr(collected, name), df)
    assert collected.now == world.now and collected.heldout_start == world.heldout_start


def test_the_warehouse_appends_each_part_into_the_tables_a_whole_world_writes(
    small_chunks, tmp_path: Path
) -> None:
    cfg = world_config("tiny")
    whole = tmp_path / "whole.duckdb"
    world = generate_world(cfg)
    write_tables(whole, {"world_info": world_info(world, "test"), **world.tables()})
    streamed = tmp_path / "streamed.duckdb"
    stream = stream_world(cfg)
    seen: list[int] = []

    def counted() -> Iterator[Mapping[str, pl.DataFrame]]:
        for part in stream.parts():
            seen.append(part["impressions"].height)
            yield part

    rows = write_world(streamed, WorldStream(stream.head, counted()), "test")
    assert len(seen) >= 10
    assert rows["impressions"] == sum(seen) == world.impressions.height
    assert rows["engagements"] == world.engagements.height
    names = ["world_info", *world.tables()]
    want, got = _read_all(whole, names), _read_all(streamed, names)
    for name in names:
        assert_frame_equal(got[name], want[name])


def test_a_stream_that_fails_half_way_leaves_the_warehouse_as_it_was(
    small_chunks, tmp_path: Path
) -> None:
    warehouse = tmp_path / "warehouse.duckdb"
    before = stream_world(world_config("tiny"))
    write_world(warehouse, before, "test")
    counts = {n: read_table(warehouse, n).height for n in ("users", *STREAMED_TABLES)}

    other = stream_world(world_config("tiny", seed=7, n_users=200))

    def breaks() -> Iterator[Mapping[str, pl.DataFrame]]:
        for i, part in enumerate(other.parts()):
            if i == 3:
                raise OSError("disk full")
            yield part

    with pytest.raises(OSError, match="disk full"):
        write_world(warehouse, WorldStream(other.head, breaks()), "test")
    assert {n: read_table(warehouse, n).height for n in counts} == counts
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        names = {r[0] for r in con.execute("select table_name from duckdb_tables()").fetchall()}
    finally:
        con.close()
    assert names == {"world_info", *before.head.tables()}


def test_a_part_for_a_table_not_written_is_refused(tmp_path: Path, tiny_world) -> None:
    with pytest.raises(ValueError, match="'impressions'"):
        write_tables(
            tmp_path / "w.duckdb",
            {"users": tiny_world.users},
            [{"impressions": tiny_world.impressions}],
        )
    parts = WorldStream(tiny_world, [{"users": tiny_world.users}]).parts()
    with pytest.raises(ValueError, match="only"):
        next(parts)


def test_source_tables_writes_the_world_in_parts(data_dir: Path, small_chunks) -> None:
    world = generate_world(world_config("tiny"))
    result = materialize(dg.AssetSelection.groups("raw", "social_graph"))
    assert result.success
    materialized = [e.materialization for e in result.get_asset_materialization_events()]
    counts = {m.asset_key.path[-1]: m.metadata["dagster/row_count"].value for m in materialized}
    # The step's own peak, which the UI and bench/bench_tier.py show.
    peaks = {
        m.metadata["peak_rss_mib"].value for m in materialized if m.asset_key.path[-1] in RAW_TABLES
    }
    assert len(peaks) == 1 and peaks.pop() > 50
    con = duckdb.connect(str(data_dir / "warehouse.duckdb"), read_only=True)
    try:
        for name, df in world.tables().items():
            stored = con.execute(f'select count(*) from main."{name}"').fetchone()[0]
            assert stored == counts[name] == df.height, name
    finally:
        con.close()
    assert_frame_equal(read_table(data_dir / "warehouse.duckdb", "impressions"), world.impressions)

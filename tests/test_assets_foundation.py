import dagster as dg
import duckdb
import polars as pl
from dagster_helpers import definitions, materialize

from feed_dagster.data.world_tables import save_parquet_world


def test_definitions_validate(data_dir):
    dg.Definitions.validate_loadable(definitions())


def test_raw_assets_and_follow_graph_materialise_on_tiny(data_dir, tiny_world):
    result = materialize(dg.AssetSelection.groups("raw", "social_graph"))
    assert result.success
    checks = result.get_asset_check_evaluations()
    assert checks and all(c.passed for c in checks)
    con = duckdb.connect(str(data_dir / "warehouse.duckdb"), read_only=True)
    for name, df in tiny_world.tables().items():
        assert con.execute(f"select count(*) from main.{name}").fetchone()[0] == df.height
    stats = con.execute(
        "select sum(followers), sum(following), max(followers) from main.follow_graph"
    ).fetchone()
    con.close()
    assert stats[0] == stats[1] == tiny_world.follows.height
    assert stats[2] > 0


def _corrupt_parquet_source(tmp_path, world, monkeypatch, *, dangling: bool = False):
    """A parquet source with a self-follow (which only the asset checks catch) and, with
    `dangling`, an engagement by an unknown user (which the loader itself refuses)."""
    folder = tmp_path / "drop"
    follows = pl.concat(
        [world.follows, world.follows.head(1).with_columns(followee_id=pl.col("follower_id"))]
    )
    engagements = world.engagements
    if dangling:
        engagements = pl.concat(
            [
                world.engagements,
                world.engagements.head(1).with_columns(user_id=pl.lit(10**9, dtype=pl.Int64)),
            ]
        )
    from dataclasses import replace

    save_parquet_world(replace(world, follows=follows, engagements=engagements), folder)
    monkeypatch.setenv("FEED_DAGSTER_SOURCE", f"parquet:{folder}")


def test_checks_fail_and_block_on_corrupted_input(data_dir, tiny_world, tmp_path, monkeypatch):
    _corrupt_parquet_source(tmp_path, tiny_world, monkeypatch)
    result = materialize(dg.AssetSelection.groups("raw", "social_graph"))
    failed = {c.check_name: c for c in result.get_asset_check_evaluations() if not c.passed}
    assert set(failed) == {"no_self_follows"}
    assert "follows" in failed["no_self_follows"].description
    # The blocking self-follow check keeps follow_graph from being built on bad edges.
    built = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert "follows" in built and "follow_graph" not in built


def test_loader_refuses_dangling_references_before_writing(
    data_dir, tiny_world, tmp_path, monkeypatch
):
    # What the loader can tell (here an engagement by an unknown user) never reaches the
    # warehouse: the source asset fails naming the file, and no table is written.
    _corrupt_parquet_source(tmp_path, tiny_world, monkeypatch, dangling=True)
    result = materialize(dg.AssetSelection.groups("raw", "social_graph"))
    assert not result.success
    error = str(result.get_step_failure_events()[0].step_failure_data.error)
    assert "engagements.parquet" in error and "user_id" in error and "1000000000" in error
    assert not result.get_asset_materialization_events()
    assert not (data_dir / "warehouse.duckdb").exists()


def test_every_store_follows_the_storage_resource(data_dir, tiny_world, tmp_path):
    """A storage root other than FEED_DAGSTER_DATA: the warehouse (the I/O manager's and the
    checks' SQL reads alike) lands under it, and nothing is written to the default root."""
    from feed_dagster.definitions import build_definitions
    from feed_dagster.resources.storage import StorageResource

    root = tmp_path / "elsewhere"
    defs = build_definitions(StorageResource(root=str(root)))
    result = materialize(dg.AssetSelection.groups("raw", "social_graph"), defs=defs)
    assert result.success
    checks = result.get_asset_check_evaluations()
    assert checks and all(c.passed for c in checks)
    con = duckdb.connect(str(root / "warehouse.duckdb"), read_only=True)
    users = con.execute("select count(*) from main.users").fetchone()[0]
    stats = con.execute("select count(*) from main.follow_graph").fetchone()[0]
    con.close()
    assert users == stats == tiny_world.users.height
    assert not (data_dir / "warehouse.duckdb").exists()


def test_a_storage_root_set_in_the_run_config_moves_every_store(data_dir):
    """The launchpad's `resources.storage.config.root` alone moves every artifact of a
    build: warehouse, embeddings, models, vector table, shard files and serving file land
    under it, and nothing under the default root (FEED_DAGSTER_DATA)."""
    from feed_dagster.assets.feeds import user_shards
    from feed_dagster.jobs.automation import UPSTREAM_OF_FEEDS
    from feed_dagster.serving.read import read_meta

    root = data_dir.parent / "configured"
    run_config = {"resources": {"storage": {"config": {"root": str(root)}}}}
    defs = definitions()

    def build(selection: dg.AssetSelection, key: str | None = None) -> None:
        result = materialize(selection, key, defs=defs, run_config=run_config)
        assert result.success, selection

    build(UPSTREAM_OF_FEEDS)
    for key in user_shards.get_partition_keys():
        build(dg.AssetSelection.assets("user_feeds"), key)
    build(dg.AssetSelection.assets("published_feeds"))

    con = duckdb.connect(str(root / "warehouse.duckdb"), read_only=True)
    tables = {
        t for (t,) in con.execute("select table_name from information_schema.tables").fetchall()
    }
    con.close()
    assert {"users", "follow_graph", "ranker_evaluation"} <= tables
    assert (root / "embeddings" / "article_embeddings.parquet").exists()
    for model in ("two_tower", "ranker"):
        assert (root / "models" / model / "PROMOTED").exists(), model
    assert any((root / "lancedb").iterdir())
    shards = sorted(p.name for p in (root / "feeds" / "shards").glob("*.parquet"))
    assert len(shards) == len(user_shards.get_partition_keys())
    meta = read_meta(root / "serving" / "feeds.duckdb")
    assert meta["model_version"] != "fallback" and meta["users"] > 0
    assert not data_dir.exists(), sorted(str(p) for p in data_dir.rglob("*"))

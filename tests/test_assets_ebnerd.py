import shutil

import dagster as dg
import duckdb
import pytest
from dagster_helpers import materialize

from feed_dagster.cli import main
from feed_dagster.ebnerd import article_first_seen, write_articles_for_ids, write_synthetic_ebnerd
from feed_dagster.serving.read import connect, get_feed

SELECTION = dg.AssetSelection.groups("raw", "social_graph") | dg.AssetSelection.assets(
    "impressions_evaluation"
)


def _users_with_feeds(data_dir):
    con = connect(data_dir / "serving" / "feeds.duckdb")
    try:
        return [r[0] for r in con.execute("select user_id from serving.feed_users").fetchall()]
    finally:
        con.close()


def _baselines(data_dir):
    con = duckdb.connect(str(data_dir / "warehouse.duckdb"), read_only=True)
    try:
        return dict(con.execute("select baseline, auc from impressions_evaluation").fetchall())
    finally:
        con.close()


def test_graph_materialises_on_a_synthetic_ebnerd_folder(data_dir, tmp_path, monkeypatch):
    folder = write_synthetic_ebnerd(tmp_path / "ebnerd", users=60, articles=300)
    monkeypatch.setenv("FEED_DAGSTER_SOURCE", f"ebnerd:{folder}")
    assert main(["run"]) == 0  # the whole graph: models, vectors, feeds, publish
    assert get_feed(
        int(_users_with_feeds(data_dir)[0]), data_dir / "serving" / "feeds.duckdb"
    ).height
    auc = _baselines(data_dir)
    assert set(auc) >= {"random", "popularity", "recency", "read_time"}
    assert auc["popularity"] > auc["random"]


def test_graph_materialises_on_the_real_sample(data_dir, tmp_path, monkeypatch, shared_data):
    sample = shared_data / "ebnerd_sample"
    if not sample.exists():
        pytest.skip("shared EBNeRD sample not present")
    folder = tmp_path / "real"
    folder.mkdir()
    for name in ("behaviors.parquet", "history.parquet"):
        shutil.copy(sample / name, folder / name)
    import polars as pl

    seen = article_first_seen(
        pl.read_parquet(folder / "behaviors.parquet"), pl.read_parquet(folder / "history.parquet")
    )
    write_articles_for_ids(seen["article_id"], folder / "articles.parquet", first_seen=seen)
    monkeypatch.setenv("FEED_DAGSTER_SOURCE", f"ebnerd:{folder}")
    assert main(["run"]) == 0
    assert len(_baselines(data_dir)) == 8  # four baselines, four classic peers
    assert len(_users_with_feeds(data_dir)) > 0


def test_broken_folder_fails_clearly_and_keeps_earlier_tables(data_dir, tmp_path, monkeypatch):
    folder = write_synthetic_ebnerd(tmp_path / "ebnerd", users=40, articles=200)
    monkeypatch.setenv("FEED_DAGSTER_SOURCE", f"ebnerd:{folder}")
    assert materialize(SELECTION).success
    before = _baselines(data_dir)
    (folder / "validation" / "history.parquet").unlink()
    result = materialize(SELECTION)
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert "history.parquet" in str(failure)
    assert _baselines(data_dir) == before  # nothing half-written


def _warehouse(data_dir):
    con = duckdb.connect(str(data_dir / "warehouse.duckdb"), read_only=True)
    try:
        names = [r[0] for r in con.execute("show tables").fetchall()]
        return {n: con.execute(f'select * from "{n}"').pl() for n in names}
    finally:
        con.close()


def test_refused_inputs_leave_every_warehouse_table_unchanged(data_dir, tmp_path, monkeypatch):
    import polars as pl
    import pyarrow.parquet as pq

    folder = write_synthetic_ebnerd(tmp_path / "ebnerd", users=40, articles=200)
    monkeypatch.setenv("FEED_DAGSTER_SOURCE", f"ebnerd:{folder}")
    assert materialize(SELECTION).success
    before = _warehouse(data_dir)
    assert before["impressions"].height > 0

    behaviors = folder / "train" / "behaviors.parquet"
    good = pq.read_table(behaviors)
    negative = pl.from_arrow(good).with_columns(read_time=-pl.col("read_time").abs() - 1)
    breakages = [
        (lambda: behaviors.write_bytes(behaviors.read_bytes()[:1000]), "a readable Parquet file"),
        (lambda: pq.write_table(negative.to_arrow().cast(good.schema), behaviors), "read_time"),
    ]
    for breakage, named in breakages:
        breakage()
        result = materialize(SELECTION)
        assert not result.success
        error = str(result.get_step_failure_events()[0].step_failure_data.error)
        assert "train/behaviors.parquet" in error and named in error
        after = _warehouse(data_dir)
        assert after.keys() == before.keys()
        assert all(after[n].equals(before[n]) for n in before)

import shutil

import dagster as dg
import duckdb
import pytest

from feed_dagster.ebnerd import article_first_seen, write_articles_for_ids, write_synthetic_ebnerd

SELECTION = dg.AssetSelection.groups("raw", "social_graph", "evaluation")


def _materialize():
    from feed_dagster.definitions import build_definitions

    defs = build_definitions()
    return dg.materialize(
        [*defs.assets, *defs.asset_checks],
        resources=defs.resources,
        instance=dg.DagsterInstance.ephemeral(),
        selection=SELECTION,
        raise_on_error=False,
    )


def _baselines(data_dir):
    con = duckdb.connect(str(data_dir / "warehouse.duckdb"), read_only=True)
    try:
        return dict(con.execute("select baseline, auc from impressions_evaluation").fetchall())
    finally:
        con.close()


def test_graph_materialises_on_a_synthetic_ebnerd_folder(data_dir, tmp_path, monkeypatch):
    folder = write_synthetic_ebnerd(tmp_path / "ebnerd", users=60, articles=300)
    monkeypatch.setenv("FEED_DAGSTER_SOURCE", f"ebnerd:{folder}")
    result = _materialize()
    assert result.success
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
    assert _materialize().success
    assert len(_baselines(data_dir)) == 4


def test_broken_folder_fails_clearly_and_keeps_earlier_tables(data_dir, tmp_path, monkeypatch):
    folder = write_synthetic_ebnerd(tmp_path / "ebnerd", users=40, articles=200)
    monkeypatch.setenv("FEED_DAGSTER_SOURCE", f"ebnerd:{folder}")
    assert _materialize().success
    before = _baselines(data_dir)
    (folder / "validation" / "history.parquet").unlink()
    result = _materialize()
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert "history.parquet" in str(failure)
    assert _baselines(data_dir) == before  # nothing half-written

"""What the shards of a refresh share is prepared before them (feeds.serving_inputs): the
shards then load it, neither building nor fitting anything, and build the same feeds."""

from __future__ import annotations

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from feed_dagster.data.warehouse import read_tables
from feed_dagster.feeds import serving_inputs as serving_inputs_module
from feed_dagster.feeds.build import OPTIONAL_TABLES, PIPELINE_TABLES
from feed_dagster.feeds.evaluation import (
    LEARNED,
    evaluate_feeds,
    read_evaluation_tables,
    tables_before,
)
from feed_dagster.feeds.model_backends import ModelLocations, serving_features
from feed_dagster.feeds.precompute import precompute_shard, read_shard_tables
from feed_dagster.feeds.serving_inputs import prepare_serving_inputs
from feed_dagster.metrics import classic
from feed_dagster.models import serve as serve_module
from feed_dagster.models import shared_inputs as shared_module
from feed_dagster.models.ranker import RankerConfig, build_ranker
from feed_dagster.models.serve import ServingContext, item_vectors_of
from feed_dagster.models.store import ModelStore
from feed_dagster.models.two_tower import TwoTower, TwoTowerConfig
from feed_dagster.paths import RANKER, TWO_TOWER
from feed_dagster.vectors import retrieval_frame, write_vectors

N_SHARDS = 3


@pytest.fixture(scope="module")
def promoted(tmp_path_factory, tiny_world, make_warehouse, make_embeddings):
    """A warehouse, the posts' embeddings file, and a ranker and two-tower promoted with
    their vector table: what a refresh finds once the models phase is done."""
    root = tmp_path_factory.mktemp("serving_inputs")
    warehouse = make_warehouse(root / "warehouse.duckdb", tiny_world)
    embeddings, vectors = make_embeddings(root / "article_embeddings.parquet", tiny_world)
    ranker = build_ranker(RankerConfig(content_dim=vectors.shape[1]), seed=0)
    assert ranker.cfg.peer_features
    tower = TwoTower(TwoTowerConfig(content_dim=vectors.shape[1])).eval()
    store = ModelStore(root / "models")
    store.promote(RANKER, store.save(RANKER, ranker.state_dict(), ranker.cfg.to_dict()))
    store.promote(TWO_TOWER, store.save(TWO_TOWER, tower.state_dict(), tower.cfg.to_dict()))
    context = ServingContext.from_world(tiny_world, vectors, serving_features(ranker.cfg.features))
    items = retrieval_frame(item_vectors_of(tower, context), tiny_world.articles)
    write_vectors(root / "lancedb", "article_vectors", items)
    return warehouse, embeddings, store, root


def _locations(promoted, peers_dir) -> ModelLocations:
    warehouse, embeddings, store, root = promoted
    return ModelLocations(
        store,
        str(root / "lancedb"),
        "article_vectors",
        embeddings=embeddings,
        peers_dir=peers_dir,
        warehouse=warehouse,
    )


def _counting(monkeypatch) -> dict[str, int]:
    calls = {"inputs": 0, "peers": 0}
    build, fit = shared_module.build_shared_inputs, serve_module.fit_serving_peers
    knn_rows = classic._item_knn_rows

    def computed(*args, **kwargs):
        calls["knn rows"] = calls.get("knn rows", 0) + 1
        return knn_rows(*args, **kwargs)

    def built(*args, **kwargs):
        calls["inputs"] += 1
        return build(*args, **kwargs)

    def fitted(*args, **kwargs):
        calls["peers"] += 1
        return fit(*args, **kwargs)

    monkeypatch.setattr(shared_module, "build_shared_inputs", built)
    monkeypatch.setattr(serve_module, "fit_serving_peers", fitted)
    monkeypatch.setattr(serving_inputs_module, "fit_serving_peers", fitted)
    monkeypatch.setattr(classic, "_item_knn_rows", computed)
    return calls


def _shard(models: ModelLocations, shard: int):
    warehouse = models.warehouse
    tables = read_shard_tables(warehouse, shard, N_SHARDS)
    return precompute_shard(tables, shard, N_SHARDS, models, warn=pytest.fail)


def test_shards_load_what_was_prepared_and_build_the_same_feeds(
    promoted, tiny_world, tmp_path, monkeypatch
):
    calls = _counting(monkeypatch)
    # Shards on their own: the first builds and fits, the next load.
    own = _locations(promoted, tmp_path / "own")
    unprepared = [_shard(own, s) for s in range(N_SHARDS)]
    assert calls["inputs"] == 1 and calls["peers"] == 1
    # The same feeds as from the whole tables (every user's rows, every post).
    whole = read_tables(promoted[0], PIPELINE_TABLES, OPTIONAL_TABLES)
    whole_models = _locations(promoted, tmp_path / "whole")
    for shard in range(N_SHARDS):
        want = precompute_shard(whole, shard, N_SHARDS, whole_models, warn=pytest.fail)
        assert want.feeds.equals(unprepared[shard].feeds)

    prepared_dir = tmp_path / "prepared"
    models = _locations(promoted, prepared_dir)
    messages: list[str] = []
    prepared = prepare_serving_inputs(models, progress=messages.append)
    assert calls["inputs"] == 2 and calls["peers"] == 2
    computed_before = dict(calls)
    assert prepared is not None and prepared.now == tiny_world.now
    assert prepared.articles == tiny_world.articles.height
    window = tiny_world.articles.filter(
        pl.col("published_at") > tiny_world.now - tiny_world.candidate_window,
        pl.col("published_at") <= tiny_world.now,
    )
    assert prepared.window_posts == window.height > 0
    assert (prepared_dir / f"peers-{prepared.peers_name}.pkl").exists()
    assert len(list(prepared_dir.glob("inputs-*.pkl"))) == 1
    assert any("in the window" in m for m in messages)

    for shard in range(N_SHARDS):
        got = _shard(models, shard)
        assert got.feeds.height > 0
        assert got.feeds.equals(unprepared[shard].feeds)
    # The shards built and fitted nothing, nor computed an item-kNN row: every post they
    # score, and those each user's own peer figures are taken over, came prepared.
    assert calls == computed_before

    # Prepared again for the same warehouse: kept, not rebuilt.
    again = prepare_serving_inputs(models)
    assert again is not None and again.peers_name == prepared.peers_name
    assert calls == computed_before


def test_nothing_is_prepared_without_a_promoted_ranker_or_a_local_warehouse(promoted, tmp_path):
    warehouse, embeddings, _, root = promoted
    empty = ModelLocations(
        ModelStore(tmp_path / "models"),
        str(root / "lancedb"),
        "article_vectors",
        embeddings=embeddings,
        peers_dir=tmp_path / "peers",
        warehouse=warehouse,
    )
    assert prepare_serving_inputs(empty) is None
    remote = ModelLocations(
        promoted[2],
        str(root / "lancedb"),
        "article_vectors",
        embeddings=embeddings,
        peers_dir=tmp_path / "peers",
        warehouse="s3://bucket/warehouse",
    )
    assert prepare_serving_inputs(remote) is None
    assert not (tmp_path / "peers").exists()
    with pytest.raises(ValueError, match="peers store"):
        prepare_serving_inputs(ModelLocations(promoted[2], "x", "y", warehouse=warehouse))


def test_the_evaluation_of_the_models_from_its_sample_equals_that_from_the_whole_tables(
    promoted, tiny_world, tmp_path
):
    """feed_quality reads its sample's rows and what all users share from the warehouse
    (read_evaluation_tables): the learned feed at the cut is the one the whole tables give."""
    warehouse = promoted[0]
    tables, users, cut = read_evaluation_tables(warehouse, sample_size=40, seed=3)
    models = _locations(promoted, tmp_path / "sampled")
    retriever, scorer, versions = models.load(
        tables_before(tables, cut), pytest.fail, users, at=cut, engagements_of_users=True
    )
    assert versions["model_version"] != "fallback"
    got = evaluate_feeds(tables, cut, {LEARNED: lambda known: (retriever, scorer)}, users)

    whole = read_tables(warehouse, PIPELINE_TABLES, OPTIONAL_TABLES)
    retriever, scorer, _ = _locations(promoted, tmp_path / "whole").load(
        tables_before(whole, cut), pytest.fail, users, at=cut
    )
    want = evaluate_feeds(whole, cut, {LEARNED: lambda known: (retriever, scorer)}, users)
    assert got["feed"][0] == LEARNED and got["hits"][0] > 0
    assert_frame_equal(got.drop("seconds"), want.drop("seconds"), check_exact=False, rel_tol=1e-9)

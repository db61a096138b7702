"""In-memory search through lists (vectors.lists): all lists probed is exact search, the
default few find nearly all of it, exclusions never come back, and search_batch takes
this path for windows from `lists_from` rows up."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from test_vectors import clustered, frame, unit

from feed_dagster.feeds.model_backends import TwoTowerRetriever
from feed_dagster.vectors import exact_topk, open_vectors, recall_at_k, search_batch, write_vectors
from feed_dagster.vectors import search as search_module
from feed_dagster.vectors.lists import ListIndex
from feed_dagster.vectors.search import _finish

K = 50


@pytest.fixture(scope="module")
def window() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, vectors, queries): 6,000 clustered unit vectors with scattered ids."""
    vectors = clustered(6_000, 16, clusters=40, seed=1)
    ids = np.random.default_rng(2).permutation(100_000)[:6_000].astype(np.int64)
    queries = unit(clustered(64, 16, clusters=40, seed=1) + 0.3 * clustered(64, 16, 5, seed=3))
    return ids, vectors, queries


def _exclusions(ids: np.ndarray, n_queries: int) -> pl.DataFrame:
    rng = np.random.default_rng(4)
    return pl.DataFrame(
        {
            "query_idx": np.repeat(np.arange(n_queries), 200),
            "article_id": rng.choice(ids, n_queries * 200),
        }
    ).unique()


def test_lists_hold_every_vector_once_with_its_id_in_its_nearest_list(window):
    ids, vectors, _ = window
    index = ListIndex.build(ids, vectors)
    assert index.n_lists == round(np.sqrt(len(ids))) and index.offsets[-1] == len(ids)
    assert sorted(index.ids) == sorted(ids)
    row = {article: i for i, article in enumerate(ids)}
    np.testing.assert_array_equal(index.vectors, vectors[[row[a] for a in index.ids]])
    # Each vector sits in the list of its nearest centroid.
    distances = ((index.vectors[:, None, :] - index.centroids[None]) ** 2).sum(2)
    list_of = np.repeat(np.arange(index.n_lists), np.diff(index.offsets))
    nearest = distances.min(1)
    np.testing.assert_allclose(distances[np.arange(len(ids)), list_of], nearest, atol=1e-5)


def test_every_list_probed_is_exact_search_exclusions_masked_first(window):
    ids, vectors, queries = window
    excluded = _exclusions(ids, len(queries))
    index = ListIndex.build(ids, vectors, n_lists=30)
    got = _finish(index.search(queries, K, nprobe=index.n_lists, exclude=excluded), None, K)
    want = exact_topk(vectors, ids, queries, K, exclude=excluded)
    assert got["article_id"].to_list() == want["article_id"].to_list()
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=1e-5)
    assert got.join(excluded, on=["query_idx", "article_id"]).is_empty()
    assert got.group_by("query_idx").len()["len"].min() == K


def test_the_default_probes_find_nearly_all_of_the_exact_top_k(window):
    ids, vectors, queries = window
    excluded = _exclusions(ids, len(queries))
    index = ListIndex.build(ids, vectors)
    got = _finish(index.search(queries, K, exclude=excluded), None, K)
    want = exact_topk(vectors, ids, queries, K, exclude=excluded)
    assert 0 < index.probes() < index.n_lists
    assert recall_at_k(got, want, K) >= 0.95
    assert got.join(excluded, on=["query_idx", "article_id"]).is_empty()
    # The same lists and the same results from the same rows: the build is seeded.
    again = _finish(ListIndex.build(ids, vectors).search(queries, K, exclude=excluded), None, K)
    assert again.equals(got)


def test_fewer_vectors_than_asked_for_come_back_all(window):
    ids, vectors, queries = window
    index = ListIndex.build(ids[:7], vectors[:7], n_lists=3)
    got = _finish(index.search(queries[:2], K, nprobe=3), None, K)
    assert got.group_by("query_idx").len()["len"].to_list() == [7, 7]


def test_search_batch_searches_a_large_window_through_lists(tmp_path, window, monkeypatch):
    ids, vectors, queries = window
    write_vectors(tmp_path, "articles", frame(vectors, ids, hours_old=np.zeros(len(ids))))
    table = open_vectors(tmp_path, "articles")
    built = []
    build = ListIndex.build

    def counted(*args, **kwargs):
        built.append(1)
        return build(*args, **kwargs)

    monkeypatch.setattr(search_module.ListIndex, "build", counted)
    exact = search_batch(table, queries, K, exact=True, lists_from=1_000)
    assert built == []
    through_lists = search_batch(table, queries, K, lists_from=1_000)
    assert built == [1]
    assert recall_at_k(through_lists, exact, K) >= 0.95
    # Below `lists_from` the window is searched exactly.
    assert search_batch(table, queries, K, lists_from=len(ids) + 1).equals(exact)
    assert built == [1]


def test_a_refresh_builds_a_windows_lists_once_and_a_new_table_version_again(
    tmp_path, window, monkeypatch
):
    """The shards of a refresh share one build of their window's lists through the store
    (feeds.model_backends.stored_lists); a rewritten table gets lists of its own."""
    ids, vectors, queries = window
    write_vectors(tmp_path / "lance", "articles", frame(vectors, ids, hours_old=np.zeros(len(ids))))
    table = open_vectors(tmp_path / "lance", "articles")
    store = tmp_path / "store"
    built = []
    build = ListIndex.build

    def counted(*args, **kwargs):
        built.append(1)
        return build(*args, **kwargs)

    monkeypatch.setattr(ListIndex, "build", counted)

    def search(tbl):
        # A shard's retriever: only its lists store and its read of the rows are used here.
        shard = TwoTowerRetriever(None, None, tbl, lists_dir=store)  # type: ignore[arg-type]
        return search_batch(
            tbl, queries, K, read_rows=shard.rows, read_lists=shard.lists, lists_from=1_000
        )

    first = search(table)
    second = search(open_vectors(tmp_path / "lance", "articles"))
    assert built == [1] and second.equals(first)
    assert len(list(store.glob("lists-*.pkl"))) == 1
    # A table that changed since: a new version, its lists built again rather than trusted.
    kept = slice(0, 5_000)
    write_vectors(
        tmp_path / "lance",
        "articles",
        frame(vectors[kept], ids[kept], hours_old=np.zeros(5_000)),
    )
    third = search(open_vectors(tmp_path / "lance", "articles"))
    assert built == [1, 1] and len(list(store.glob("lists-*.pkl"))) == 2
    assert set(third["article_id"].to_list()) <= set(ids[kept].tolist())

"""The LanceDB vector table: writes, upserts, filtered batched search, index and maintenance."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest

from feed_dagster.vectors import (
    ensure_index,
    exact_topk,
    measure_recall,
    open_vectors,
    optimize,
    recall_at_k,
    search_batch,
    search_params,
    vector_index,
    write_vectors,
)
from feed_dagster.vectors import search as search_module

T0 = datetime(2024, 3, 1)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((clusters, dim)))
    spread = 0.8 / np.sqrt(dim)
    return unit(centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)))


def frame(vectors: np.ndarray, ids: np.ndarray | None = None, hours_old=None) -> pl.DataFrame:
    n = len(vectors)
    ids = np.arange(n) if ids is None else ids
    hours = np.arange(n) % 100 if hours_old is None else hours_old
    return pl.DataFrame(
        {
            "article_id": ids,
            "vector": vectors,
            "author_id": ids % 7,
            "published_at": [T0 - timedelta(hours=int(h)) for h in hours],
            "topic": (ids % 5).astype(np.int32),
            "is_reply": ids % 4 == 0,
            "is_repost": ids % 9 == 0,
        }
    )


@pytest.fixture
def small(tmp_path):
    vectors = clustered(300, 16, clusters=6)
    write_vectors(tmp_path, "articles", frame(vectors))
    return tmp_path, vectors


class TestWrite:
    def test_create_upsert_delete_and_versions(self, tmp_path) -> None:
        vectors = clustered(50, 8, clusters=3)
        v1 = write_vectors(tmp_path, "t", frame(vectors))
        assert open_vectors(tmp_path, "t").count_rows() == 50
        # The same frame again changes nothing and makes no new version.
        assert write_vectors(tmp_path, "t", frame(vectors)) == v1

        extra = clustered(5, 8, clusters=1, seed=9)
        edited = vectors.copy()
        edited[0] = extra[0]
        grown = frame(np.vstack([edited[:40], extra]), np.r_[np.arange(40), np.arange(100, 105)])
        v2 = write_vectors(tmp_path, "t", grown)
        assert v2 > v1
        table = open_vectors(tmp_path, "t")
        stored = pl.from_arrow(table.to_arrow()).sort("article_id")
        assert stored["article_id"].to_list() == [*range(40), *range(100, 105)]
        np.testing.assert_array_equal(stored["vector"].to_numpy()[0], extra[0])
        np.testing.assert_array_equal(stored["vector"].to_numpy()[1], vectors[1])

    def test_filter_column_change_is_written(self, tmp_path) -> None:
        vectors = clustered(10, 8, clusters=2)
        write_vectors(tmp_path, "t", frame(vectors))
        moved = frame(vectors).with_columns(pl.lit(3, dtype=pl.Int32).alias("topic"))
        write_vectors(tmp_path, "t", moved)
        topics = open_vectors(tmp_path, "t").to_arrow()["topic"].to_pylist()
        assert topics == [3] * 10

    def test_keeps_missing_rows_when_asked(self, tmp_path) -> None:
        vectors = clustered(10, 8, clusters=2)
        write_vectors(tmp_path, "t", frame(vectors))
        write_vectors(tmp_path, "t", frame(vectors[:3]), delete_missing=False)
        assert open_vectors(tmp_path, "t").count_rows() == 10

    def test_errors_name_the_problem(self, tmp_path) -> None:
        vectors = clustered(10, 8, clusters=2)
        with pytest.raises(ValueError, match=r"lacks column\(s\) \['is_repost'\]"):
            write_vectors(tmp_path, "t", frame(vectors).drop("is_repost"))
        with pytest.raises(ValueError, match="repeat"):
            write_vectors(tmp_path, "t", frame(vectors, ids=np.zeros(10, dtype=np.int64)))
        write_vectors(tmp_path, "t", frame(vectors))
        with pytest.raises(ValueError, match="8-d vectors but the frame has 4-d"):
            write_vectors(tmp_path, "t", frame(vectors[:, :4]))
        write_vectors(tmp_path, "t", frame(unit(vectors[:, :4])), mode="overwrite")
        assert open_vectors(tmp_path, "t").schema.field("vector").type.list_size == 4
        with pytest.raises(FileNotFoundError, match="no LanceDB table 'nope'"):
            open_vectors(tmp_path, "nope")


class TestSearch:
    def test_lancedb_scan_matches_exact_search(self, small) -> None:
        uri, vectors = small
        queries = vectors[:20]
        got = search_batch(open_vectors(uri, "articles"), queries, 10, exact=False, batch_size=8)
        want = exact_topk(vectors, np.arange(len(vectors)), queries, 10)
        assert got.columns == ["query_idx", "article_id", "score", "rank"]
        assert got["article_id"].to_list() == want["article_id"].to_list()
        np.testing.assert_allclose(got["score"], want["score"], atol=1e-5)
        assert got.filter(pl.col("rank") == 1)["article_id"].to_list() == list(range(20))

    @pytest.mark.parametrize("exact", [True, False], ids=["in-memory", "lancedb"])
    def test_recency_prefilter_excludes_old_posts(self, small, exact) -> None:
        uri, vectors = small
        table = open_vectors(uri, "articles")
        cutoff = T0 - timedelta(hours=10)  # hours_old = id % 100, so 33 posts qualify
        got = search_batch(table, vectors[:8], 20, published_after=cutoff, exact=exact)
        recent = {i for i in range(300) if i % 100 <= 10}
        assert set(got["article_id"]) <= recent
        # A prefilter, not a postfilter: every query still gets its 20 hits.
        assert got.group_by("query_idx").len()["len"].to_list() == [20] * 8
        aware = (cutoff.replace(tzinfo=UTC)).astimezone(timezone(timedelta(hours=2)))
        aware_got = search_batch(table, vectors[:8], 20, published_after=aware, exact=exact)
        assert aware_got["article_id"].to_list() == got["article_id"].to_list()
        fresh = search_batch(
            table, vectors[:8], 5, published_after=cutoff, where="NOT is_reply", exact=exact
        )
        assert set(fresh["article_id"]) <= {i for i in recent if i % 4}

    @pytest.mark.parametrize("exact", [True, False], ids=["in-memory", "lancedb"])
    def test_exclusions_are_honoured_and_k_rows_remain(self, small, exact) -> None:
        uri, vectors = small
        table = open_vectors(uri, "articles")
        plain = search_batch(table, vectors[:3], 10, exact=exact)
        # Exclude each query's own top 10, plus ids that would not be returned anyway.
        exclude = [
            set(plain.filter(pl.col("query_idx") == q)["article_id"].to_list()) | {10_000}
            for q in range(3)
        ]
        got = search_batch(table, vectors[:3], 10, exclude=exclude, exact=exact)
        assert got.group_by("query_idx").len().sort("query_idx")["len"].to_list() == [10] * 3
        for q in range(3):
            assert not set(got.filter(pl.col("query_idx") == q)["article_id"]) & exclude[q]
        assert got["rank"].to_list() == list(range(1, 11)) * 3
        as_frame = pl.DataFrame(
            {
                "query_idx": [q for q in range(3) for _ in exclude[q]],
                "article_id": [a for q in range(3) for a in exclude[q]],
            }
        )
        assert search_batch(table, vectors[:3], 10, exclude=as_frame, exact=exact).equals(got)
        with pytest.raises(ValueError, match="one set"):
            search_batch(table, vectors[:3], 10, exclude=exclude[:2])

    def test_single_query_and_dimension_check(self, small) -> None:
        uri, vectors = small
        table = open_vectors(uri, "articles")
        assert search_batch(table, vectors[5], 3)["article_id"][0] == 5
        with pytest.raises(ValueError, match="dimension 4, the table holds 16-d"):
            search_batch(table, vectors[:2, :4], 3)

    def test_exact_topk_against_argsort(self) -> None:
        rng = np.random.default_rng(1)
        items, queries = unit(rng.standard_normal((500, 12))), unit(rng.standard_normal((7, 12)))
        ids = np.arange(500) * 3
        got = exact_topk(items, ids, queries, 15, chunk=3)
        want = ids[np.argsort(-(queries @ items.T), axis=1)[:, :15]]
        assert got["article_id"].to_numpy().reshape(7, 15).tolist() == want.tolist()


class TestIndex:
    def test_exact_below_threshold(self, small) -> None:
        uri, _ = small
        table = open_vectors(uri, "articles")
        report = ensure_index(table, threshold=1000)
        assert report.kind == "exact" and vector_index(table) is None

    def test_index_above_threshold_keeps_recall(self, tmp_path) -> None:
        vectors = clustered(4000, 32, clusters=40, seed=3)
        write_vectors(tmp_path, "big", frame(vectors))
        table = open_vectors(tmp_path, "big")
        report = ensure_index(table, threshold=2000)
        assert report.kind == "IVF_FLAT" and report.built and vector_index(table) is not None
        # Calibrated on proxy queries and stored with the table for search_batch.
        assert report.recall >= 0.95 and report.search_params
        assert search_params(table) == report.search_params
        # Held-out user-like queries (near, not on, stored vectors) also reach the target.
        noise = np.random.default_rng(4).standard_normal((200, 32))
        queries = unit(vectors[:200] + 0.5 / np.sqrt(32) * noise)
        assert measure_recall(table, queries, k=100, sample=100) >= 0.95
        # Unchanged table: the index and its settings are kept, not retrained.
        again = ensure_index(table, threshold=2000)
        assert not again.built and again.search_params == report.search_params
        # Shrinking below the threshold goes back to exact search.
        assert ensure_index(table, threshold=10_000).kind == "exact"
        assert vector_index(table) is None and search_params(table) == {}

    def test_settings_survive_upsert_and_optimize(self, tmp_path) -> None:
        vectors = clustered(3000, 16, clusters=30, seed=5)
        write_vectors(tmp_path, "t", frame(vectors))
        table = open_vectors(tmp_path, "t")
        settings = ensure_index(table, threshold=1000).search_params
        extra = clustered(100, 16, clusters=3, seed=6)
        write_vectors(
            tmp_path, "t", frame(np.vstack([vectors, extra]), np.arange(3100)), delete_missing=False
        )
        table = open_vectors(tmp_path, "t")
        assert search_params(table) == settings
        optimize(table)
        assert search_params(table) == settings
        assert table.index_stats(vector_index(table).name).num_unindexed_rows == 0
        # New rows are found through the index right away.
        assert search_batch(table, extra[:1], 1, exact=False)["article_id"][0] == 3000

    def test_selective_prefilter_through_the_index(self, tmp_path) -> None:
        vectors = clustered(6000, 16, clusters=60, seed=8)
        hours = np.random.default_rng(8).integers(0, 1000, 6000)
        write_vectors(tmp_path, "t", frame(vectors, hours_old=hours))
        table = open_vectors(tmp_path, "t")
        ensure_index(table, threshold=1000)
        queries = vectors[:40]
        for window in (30, 300):  # ~3% and ~30% of the rows
            cutoff = T0 - timedelta(hours=window)
            allowed = np.flatnonzero(hours <= window)
            want = exact_topk(vectors[allowed], allowed, queries, 50)
            got = search_batch(table, queries, 50, published_after=cutoff, exact=False)
            # Every query gets its 50 rows, all recent, and nearly all the true ones.
            assert got.group_by("query_idx").len()["len"].to_list() == [50] * 40
            assert set(got["article_id"]) <= set(allowed.tolist())
            assert recall_at_k(got, want, 50) >= 0.95
            # Automatic mode ranks a small allowed set exactly.
            auto = search_batch(table, queries, 50, published_after=cutoff, exact_below=10_000)
            assert recall_at_k(auto, want, 50) == 1.0

    def test_filtered_queries_are_ranked_in_memory_unless_too_many_rows_pass(
        self, tmp_path, monkeypatch
    ) -> None:
        """A filter sends the search to memory below filtered_exact_below allowed rows,
        however many pass exact_below; no filter goes through the index."""
        vectors = clustered(6000, 16, clusters=60, seed=9)
        hours = np.random.default_rng(9).integers(0, 1000, 6000)
        write_vectors(tmp_path, "t", frame(vectors, hours_old=hours))
        table = open_vectors(tmp_path, "t")
        ensure_index(table, threshold=1000)
        exact_calls = []
        real = search_module.exact_topk
        monkeypatch.setattr(
            search_module, "exact_topk", lambda *a, **k: exact_calls.append(1) or real(*a, **k)
        )
        queries = vectors[:20]
        cutoff = T0 - timedelta(hours=300)  # ~30% of the rows: 1,800, over exact_below
        allowed = np.flatnonzero(hours <= 300)
        got = search_batch(table, queries, 50, published_after=cutoff, exact_below=1000)
        assert len(exact_calls) == 1
        assert recall_at_k(got, exact_topk(vectors[allowed], allowed, queries, 50), 50) == 1.0
        search_batch(
            table, queries, 50, published_after=cutoff, exact_below=1000, filtered_exact_below=1000
        )
        search_batch(table, queries, 50, exact_below=1000)
        assert len(exact_calls) == 1  # both through the index

    def test_explicit_calibration_queries_and_other_types(self, small) -> None:
        uri, vectors = small
        table = open_vectors(uri, "articles")
        report = ensure_index(
            table, threshold=100, index_type="IVF_HNSW_SQ", calibration_queries=vectors[:50], k=10
        )
        assert report.kind == "IVF_HNSW_SQ" and report.recall >= 0.95
        assert "ef" in report.search_params
        report = ensure_index(table, threshold=100, index_type="IVF_PQ", k=10)
        assert report.built and report.kind == "IVF_PQ" and "refine_factor" in report.search_params
        assert search_batch(table, vectors[7], 1, exact=False)["article_id"][0] == 7


class TestOptimize:
    def test_reader_on_current_version_survives(self, tmp_path) -> None:
        vectors = clustered(200, 8, clusters=4)
        # The first version's files are referenced by no later version (overwritten).
        old_version = write_vectors(tmp_path, "t", frame(vectors[::-1][:100]))
        write_vectors(tmp_path, "t", frame(vectors[:150]), mode="overwrite")
        time.sleep(1.2)  # make the versions above older than optimize's one-second margin
        current = write_vectors(tmp_path, "t", frame(vectors))

        reader = open_vectors(tmp_path, "t")
        reader.checkout(current)
        stale = open_vectors(tmp_path, "t")
        stale.checkout(old_version)

        writer = open_vectors(tmp_path, "t")
        n_fragments = writer.stats()["fragment_stats"]["num_fragments"]
        report = optimize(writer, keep_superseded_for=timedelta(0))
        assert report.version_after > current and report.versions_removed >= 2
        assert writer.stats()["fragment_stats"]["num_fragments"] < n_fragments

        # The reader opened at the then-current version still reads all of it...
        assert len(reader.to_arrow()) == 200
        assert search_batch(reader, vectors[:2], 3)["article_id"][0] == 0
        # ...whereas a version superseded long enough ago is really gone.
        with pytest.raises(Exception):  # noqa: B017 - lance raises an IO error of its own
            stale.to_arrow()

    def test_recent_versions_are_kept(self, tmp_path) -> None:
        vectors = clustered(20, 8, clusters=2)
        write_vectors(tmp_path, "t", frame(vectors[:10]))
        write_vectors(tmp_path, "t", frame(vectors))
        report = optimize(open_vectors(tmp_path, "t"))  # default: keep for an hour
        assert report.versions_removed == 0 and report.cleanup_cutoff_version is None

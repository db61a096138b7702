"""Batched top-k retrieval from the vector table, an exact in-memory reference, and recall."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence, Set
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl
import torch

from feed_dagster.vectors.lists import LISTS_FROM, ListIndex, excluded_cells
from feed_dagster.vectors.table import (
    DEFAULT_INDEX_THRESHOLD,
    FILTERED_EXACT_BELOW,
    METRIC,
    VECTOR_COLUMN,
    search_params,
    table_dim,
    vector_index,
)

RESULT_SCHEMA = {
    "query_idx": pl.Int64,
    "article_id": pl.Int64,
    "score": pl.Float32,
    "rank": pl.Int32,
}

Exclusions = Sequence[Set[int]] | pl.DataFrame


def _empty_result() -> pl.DataFrame:
    return pl.DataFrame(schema=RESULT_SCHEMA)


def _as_queries(queries: np.ndarray, dim: int | None = None) -> np.ndarray:
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2:
        raise ValueError(f"queries must be a [n, dim] array, got shape {queries.shape}")
    if dim is not None and q.shape[1] != dim:
        raise ValueError(f"queries have dimension {q.shape[1]}, the table holds {dim}-d vectors")
    return q


def _exclusion_frame(exclude: Exclusions | None, n_queries: int) -> pl.DataFrame | None:
    """(query_idx, article_id) pairs to drop, from a list of id sets or a frame."""
    if exclude is None:
        return None
    if isinstance(exclude, pl.DataFrame):
        missing = {"query_idx", "article_id"} - set(exclude.columns)
        if missing:
            raise ValueError(f"exclude frame lacks column(s) {sorted(missing)}")
        return exclude.select(
            pl.col("query_idx").cast(pl.Int64), pl.col("article_id").cast(pl.Int64)
        )
    if len(exclude) != n_queries:
        raise ValueError(
            f"exclude has {len(exclude)} sets but there are {n_queries} queries; pass one "
            "set (possibly empty) per query"
        )
    lengths = np.fromiter((len(s) for s in exclude), dtype=np.int64, count=n_queries)
    ids = np.fromiter((i for s in exclude for i in s), dtype=np.int64, count=int(lengths.sum()))
    return pl.DataFrame(
        {"query_idx": np.repeat(np.arange(n_queries, dtype=np.int64), lengths), "article_id": ids}
    )


def _finish(hits: pl.DataFrame, excluded: pl.DataFrame | None, k: int) -> pl.DataFrame:
    """Drop excluded pairs, keep the best k per query and number them 1..k."""
    if excluded is not None and len(excluded):
        hits = hits.join(excluded, on=["query_idx", "article_id"], how="anti")
    return (
        hits.sort(["query_idx", "score"], descending=[False, True])
        .with_columns(pl.int_range(pl.len()).over("query_idx").alias("rank") + 1)
        .filter(pl.col("rank") <= k)
        .select(
            pl.col("query_idx").cast(pl.Int64),
            pl.col("article_id").cast(pl.Int64),
            pl.col("score").cast(pl.Float32),
            pl.col("rank").cast(pl.Int32),
        )
    )


def _fetch_sizes(excluded: pl.DataFrame | None, n_queries: int, k: int) -> np.ndarray:
    """Per query: k plus its number of exclusions, so k survive the exclusion step."""
    sizes = np.full(n_queries, k, dtype=np.int64)
    if excluded is not None and len(excluded):
        counts = excluded.group_by("query_idx").len()
        idx = counts["query_idx"].to_numpy()
        ok = (idx >= 0) & (idx < n_queries)
        sizes[idx[ok]] += counts["len"].to_numpy()[ok]
    return sizes


def _filter_sql(published_after: datetime | None, where: str | None) -> str | None:
    parts = []
    if published_after is not None:
        if published_after.tzinfo is not None:
            # The column holds naive UTC timestamps, as everywhere in the canonical tables.
            published_after = published_after.astimezone(UTC).replace(tzinfo=None)
        parts.append(f"published_at >= TIMESTAMP '{published_after.isoformat(sep=' ')}'")
    if where:
        parts.append(f"({where})")
    return " AND ".join(parts) or None


def search_batch(
    table: Any,
    user_vectors: np.ndarray,
    k: int,
    *,
    published_after: datetime | None = None,
    where: str | None = None,
    exclude: Exclusions | None = None,
    nprobes: int | None = None,
    refine_factor: int | None = None,
    ef: int | None = None,
    exact: bool | None = None,
    exact_below: int = DEFAULT_INDEX_THRESHOLD,
    filtered_exact_below: int = FILTERED_EXACT_BELOW,
    batch_size: int = 256,
    read_rows: Callable[[Any, str | None], tuple[np.ndarray, np.ndarray]] | None = None,
    read_lists: Callable[[Any, str | None], ListIndex] | None = None,
    lists_from: int = LISTS_FROM,
) -> pl.DataFrame:
    """Top-k articles by dot product for each row of `user_vectors`.

    - `published_after` keeps articles published at or after that (naive UTC) moment, and
      `where` is an extra SQL predicate on the filter columns (e.g. "NOT is_reply"); both
      filter before ranking, so the k results come from the allowed rows.
    - `exclude` holds, per query, article ids never to return (a list of sets, or a frame of
      (query_idx, article_id)). The exact path masks them before its top-k; the LanceDB
      path removes them after the search, which fetches k + the query's number of
      exclusions (queries batched by that size) so k rows remain whenever enough rows are
      allowed.
    - Exact or approximate: with `exact=None` the search is exact (the allowed rows are read
      once and ranked in memory for all queries together) when the table has no vector index,
      when fewer than `exact_below` rows pass, or when a filter is given and fewer than
      `filtered_exact_below` rows pass it (as with a 48-hour recency window: see
      FILTERED_EXACT_BELOW); otherwise it goes through the ANN index, LanceDB taking the
      whole list of queries per batch of `batch_size`. `exact=True` forces the in-memory
      path, `exact=False` the LanceDB one (a brute-force scan when there is no index).
      `read_rows(table, where)` reads the exact path's rows (default `read_vectors`): a
      caller searching the same rows batch after batch can keep them.
    - In memory, from `lists_from` allowed rows up (and `exact` not True), the rows are
      grouped into lists and each query searches the few it is nearest (vectors.lists: at
      1.43M rows 5.5x faster, 99.7% of the exact top-1,000). `read_lists(table, where)`
      gives the lists (default: built from `read_rows`' rows at each call).
    - `nprobes`, `refine_factor` (IVF_PQ) and `ef` (HNSW) default to the settings
      `ensure_index` calibrated for the table. Under a filter that keeps a fraction f of
      the rows, IVF searches at least nprobes / f partitions, and more if it has not found k
      allowed rows, so filtering neither starves nor blurs the result.

    Returns query_idx (row of user_vectors), article_id, score (dot product), rank (1 = best).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    queries = _as_queries(user_vectors, table_dim(table))
    n = len(queries)
    if n == 0:
        return _empty_result()
    excluded = _exclusion_frame(exclude, n)
    flt = _filter_sql(published_after, where)

    index = vector_index(table)
    n_rows = int(table.count_rows())
    allowed = int(table.count_rows(flt)) if flt else n_rows
    in_memory = (
        index is None
        or allowed < exact_below
        or (flt is not None and allowed < filtered_exact_below)
    )
    if exact is None and in_memory and allowed >= lists_from:
        lists = (read_lists or _lists_of(read_rows or read_vectors))(table, flt)
        return _finish(lists.search(queries, k, exclude=excluded), None, k)
    if exact is None:
        exact = in_memory
    if exact:
        ids, matrix = (read_rows or read_vectors)(table, flt)
        if len(ids) == 0:
            return _empty_result()
        return exact_topk(matrix, ids, queries, k, exclude=excluded)
    if allowed == 0:
        return _empty_result()

    tuning = search_params(table)
    given = {"nprobes": nprobes, "refine_factor": refine_factor, "ef": ef}
    tuning.update({key: value for key, value in given.items() if value})
    fetch = _fetch_sizes(excluded, n, k)
    # Queries in order of their fetch size: a batch shares one limit, so one user with
    # thousands of exclusions then raises the limit of a batch of similar users only.
    order = np.argsort(fetch, kind="stable")
    parts = []
    for start in range(0, n, batch_size):
        members = order[start : start + batch_size]
        # One LanceDB call per batch: it takes a list of query vectors and tags each hit with
        # query_index. The limit is shared, so the batch fetches its largest need.
        query = table.search(list(queries[members]), vector_column_name=VECTOR_COLUMN)
        query = query.distance_type(METRIC).limit(int(fetch[members].max()))
        if tuning.get("nprobes"):
            if flt:
                # Probe as many allowed rows as an unfiltered search would, and keep probing
                # (maximum 0 = no limit) until k allowed rows are found.
                scaled = math.ceil(tuning["nprobes"] * n_rows / allowed)
                query = query.minimum_nprobes(scaled).maximum_nprobes(0)
            else:
                query = query.nprobes(tuning["nprobes"])
        if flt:
            query = query.where(flt, prefilter=True)
        if tuning.get("refine_factor"):
            query = query.refine_factor(tuning["refine_factor"])
        if tuning.get("ef"):
            query = query.ef(tuning["ef"])
        # _distance must be selected explicitly or LanceDB warns on every query.
        hits = query.select(["article_id", "_distance"]).to_polars()
        if "query_index" not in hits.columns:  # a single query comes back without it
            hits = hits.with_columns(pl.lit(0, dtype=pl.Int32).alias("query_index"))
        query_idx = members.astype(np.int64)[hits["query_index"].to_numpy()]
        parts.append(
            hits.select(
                pl.Series("query_idx", query_idx),
                pl.col("article_id"),
                (1.0 - pl.col("_distance")).alias("score"),
            )
        )
    return _finish(pl.concat(parts), excluded, k)


def _lists_of(
    read_rows: Callable[[Any, str | None], tuple[np.ndarray, np.ndarray]],
) -> Callable[[Any, str | None], ListIndex]:
    return lambda table, where: ListIndex.build(*read_rows(table, where))


def exact_topk(
    matrix: np.ndarray,
    ids: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    exclude: Exclusions | None = None,
    chunk: int | None = None,
) -> pl.DataFrame:
    """Exact top-k by dot product in memory (torch matmul + topk), same output as search_batch.

    `matrix` [n, dim] and `ids` [n] are the candidate vectors and their article ids (already
    filtered by the caller). Used as the ground truth for recall and as a fallback for small
    candidate sets. The matmul reads the vectors as [dim, n]: a column-major `matrix` (as
    read_vectors returns it) is that layout already, any other is transposed here.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    m = np.asarray(matrix, dtype=np.float32)
    if m.ndim != 2 or len(ids) != m.shape[0]:
        raise ValueError(
            f"exact_topk: matrix must be [n, dim] with one id per row, got {m.shape} "
            f"and {len(ids)} ids"
        )
    with warnings.catch_warnings():
        # Arrays from Arrow are read-only; the tensor is only read, so no copy is needed.
        warnings.filterwarnings("ignore", message=".*not writable.*")
        # [dim, n] contiguous: the transposed view of a row-major matrix is read against its
        # layout, 38 against 57 GFLOP/s on one thread (117 x 64 @ 64 x 143k).
        items_t = torch.from_numpy(np.ascontiguousarray(m.T))
    n_items = items_t.shape[1]
    q = _as_queries(queries, m.shape[1])
    if not q.flags.writeable:
        q = q.copy()  # queries read from Arrow: torch warns on a read-only array
    excluded = _exclusion_frame(exclude, len(q))
    fetch = min(k, n_items)
    if len(q) == 0 or fetch == 0:
        return _empty_result()
    ids = np.asarray(ids, dtype=np.int64)
    # Excluded pairs as (query, item row) cells, masked to -inf before the top-k: the top-k
    # then needs no room for them, however many a query has.
    cells = excluded_cells(ids, excluded, len(q))
    # Queries per matmul: the [chunk, n] score block stays near 64 MiB (2^24 cells). Larger
    # blocks were no faster (143k rows, 512 queries: 0.96 s at 2^24 and at 2^27) and held
    # 4x the memory, which a feed shard pays once per process.
    chunk = chunk or max(1, min(1024, 2**24 // max(1, n_items)))
    idx_parts, score_parts = [], []
    with torch.inference_mode():
        # One score block for every chunk: a fresh one each time is a new mapping of 64 MiB
        # whose pages fault in as the matmul writes them (with the layout above: 57 against
        # 30 GFLOP/s, the same scores bit for bit).
        block = torch.empty(min(chunk, len(q)), n_items)
        for start in range(0, len(q), chunk):
            part = torch.from_numpy(q[start : start + chunk])
            scores = torch.matmul(part, items_t, out=block[: len(part)])
            sel = (cells[0] >= start) & (cells[0] < start + len(scores))
            if sel.any():
                qi = torch.from_numpy(cells[0][sel] - start)
                scores[qi, torch.from_numpy(cells[1][sel])] = float("-inf")
            top = torch.topk(scores, fetch, dim=1)
            idx_parts.append(top.indices.numpy())
            score_parts.append(top.values.numpy())
    idx = np.concatenate(idx_parts)
    hits = pl.DataFrame(
        {
            "query_idx": np.repeat(np.arange(len(q), dtype=np.int64), fetch),
            "article_id": ids[idx.ravel()],
            "score": np.concatenate(score_parts).ravel(),
        }
    ).filter(pl.col("score") > float("-inf"))
    return _finish(hits, None, k)


def read_vectors(table: Any, where: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(article ids, vector matrix [n, dim], column-major) of the table's rows, optionally
    filtered by SQL `where`."""
    query = table.search().select(["article_id", VECTOR_COLUMN]).limit(None)
    if where:
        query = query.where(where)
    frame = query.to_polars()
    dim = table_dim(table)
    matrix = frame[VECTOR_COLUMN].to_numpy().reshape(len(frame), dim)
    # Column-major, the layout exact_topk multiplies by.
    return frame["article_id"].to_numpy(), np.asfortranarray(matrix, dtype=np.float32)


def per_query_recall(approx: pl.DataFrame, exact: pl.DataFrame, k: int) -> np.ndarray:
    """|approx top-k ∩ exact top-k| / |exact top-k| for each query of `exact`."""
    truth = exact.filter(pl.col("rank") <= k)
    found = approx.filter(pl.col("rank") <= k).join(
        truth, on=["query_idx", "article_id"], how="semi"
    )
    per_query = (
        truth.group_by("query_idx")
        .len()
        .join(found.group_by("query_idx").len(), on="query_idx", how="left", suffix="_hit")
        .select((pl.col("len_hit").fill_null(0) / pl.col("len")).alias("r"))
    )
    return per_query["r"].to_numpy()


def recall_at_k(approx: pl.DataFrame, exact: pl.DataFrame, k: int) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / |exact top-k|."""
    per_query = per_query_recall(approx, exact, k)
    return float(per_query.mean()) if len(per_query) else 1.0


def measure_recall(
    table: Any,
    queries: np.ndarray,
    k: int,
    sample: int | None = 256,
    *,
    seed: int = 0,
    **search_options: Any,
) -> float:
    """ANN recall@k of `search_batch` (forced through the index) against exact search.

    `sample` queries are drawn (without replacement, seeded) from `queries` to keep it cheap;
    `search_options` go to search_batch (nprobes, refine_factor, ef, ...).
    """
    q = _as_queries(queries)
    if sample is not None and sample < len(q):
        q = q[np.sort(np.random.default_rng(seed).choice(len(q), sample, replace=False))]
    ids, matrix = read_vectors(table)
    exact = exact_topk(matrix, ids, q, k)
    approx = search_batch(table, q, k, exact=False, **search_options)
    return recall_at_k(approx, exact, k)

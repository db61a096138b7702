"""Choosing between exact search and an ANN index, and calibrating the index's search settings.

Below `threshold` rows the table is searched exactly. Above it, an ANN index is built and
its search settings (nprobes, refine_factor or ef) are calibrated on the table's own data:
the cheapest setting on a fixed ladder whose recall@k against exact search reaches
`target_recall` (with a confidence margin) is stored with the vector column, where
`search_batch` finds it. A formula tuned on synthetic data cannot know how clustered real
vectors are; a measurement can.

Recommended order in a pipeline: write_vectors -> ensure_index -> optimize (ensure_index
judges index staleness by the rows not yet indexed, which optimize then folds in).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from feed_dagster.vectors.search import exact_topk, per_query_recall, read_vectors, search_batch
from feed_dagster.vectors.table import (
    DEFAULT_INDEX_THRESHOLD,
    DEFAULT_INDEX_TYPE,
    LANCE_INDEX_TYPES,
    METRIC,
    VECTOR_COLUMN,
    IndexType,
    index_params,
    store_search_params,
    stored_search_params,
    table_dim,
    vector_index,
)

# Rows added since the index was trained are searched by brute force until `optimize` folds
# them into the existing partitions; past this fraction the index is retrained, because
# centroids (and PQ codebooks) trained on old data fit new data less well.
REBUILD_UNINDEXED_FRACTION = 0.2


@dataclass(frozen=True)
class IndexReport:
    """What `ensure_index` found or built, with the search settings that go with it."""

    kind: str  # "exact" or the index type (IVF_FLAT, IVF_PQ, IVF_HNSW_SQ)
    n_rows: int
    dim: int
    built: bool  # True when this call trained a new index
    seconds: float  # whole call, calibration included
    build_params: dict[str, Any] = field(default_factory=dict)
    search_params: dict[str, int] = field(default_factory=dict)
    recall: float | None = None  # calibrated recall@k of search_params (None: not measured)
    recall_k: int = 100
    calibration_seconds: float = 0.0
    n_unindexed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "n_rows": self.n_rows,
            "dim": self.dim,
            "built": self.built,
            "seconds": round(self.seconds, 3),
            "calibration_seconds": round(self.calibration_seconds, 3),
            "n_unindexed": self.n_unindexed,
            f"recall@{self.recall_k}": self.recall,
            **{f"build.{k}": v for k, v in self.build_params.items()},
            **{f"search.{k}": v for k, v in self.search_params.items()},
        }


def _index_config(index_type: IndexType, build: dict[str, Any]) -> Any:
    from lancedb.index import IvfFlat, IvfHnswSq, IvfPq

    cls = {"IVF_FLAT": IvfFlat, "IVF_PQ": IvfPq, "IVF_HNSW_SQ": IvfHnswSq}[index_type]
    return cls(distance_type=METRIC, **build)


def search_ladder(index_type: IndexType, build: dict[str, Any]) -> list[dict[str, int]]:
    """Candidate search settings, cheapest first, tried until one reaches the target."""
    if index_type == "IVF_HNSW_SQ":
        return [{"nprobes": build["num_partitions"], "ef": ef} for ef in (100, 200, 400, 800)]
    parts = int(build["num_partitions"])
    probes = sorted({min(parts, max(1, math.ceil(parts / d))) for d in (32, 16, 8, 4, 2, 1)})
    if index_type == "IVF_FLAT":
        return [{"nprobes": p} for p in probes]
    return [{"nprobes": p, "refine_factor": r} for p in probes for r in (4, 8)]


def proxy_queries(table: Any, n: int, seed: int = 0) -> np.ndarray:
    """Stand-in user vectors: normalised sums of two random stored vectors.

    A user usually has more than one interest, so their vector sits between clusters; such
    queries need more probes than the stored vectors themselves and calibrate conservatively.
    """
    _, matrix = read_vectors(table)
    rng = np.random.default_rng(seed)
    q = matrix[rng.integers(0, len(matrix), n)] + matrix[rng.integers(0, len(matrix), n)]
    norms = np.linalg.norm(q, axis=1, keepdims=True)
    return (q / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def calibrate(
    table: Any,
    ladder: list[dict[str, int]],
    queries: np.ndarray,
    *,
    k: int = 100,
    target_recall: float = 0.95,
) -> tuple[dict[str, int], float]:
    """The first ladder setting that reaches `target_recall`, and its mean recall@k.

    "Reaches" means the lower end of a ~95% confidence interval of the mean over the
    calibration queries (mean - 2 standard errors), so that unseen queries from the same
    distribution reach the target too, not just this sample. If no setting does, the last
    (most thorough) one is returned.
    """
    ids, matrix = read_vectors(table)
    truth = exact_topk(matrix, ids, queries, k)
    recall = 0.0
    for settings in ladder:
        approx = search_batch(table, queries, k, exact=False, **settings)
        per_query = per_query_recall(approx, truth, k)
        recall = float(per_query.mean())
        low = recall - 2.0 * float(per_query.std()) / np.sqrt(max(1, len(per_query)))
        if low >= target_recall:
            return settings, recall
    return ladder[-1], recall


def ensure_index(
    table: Any,
    threshold: int = DEFAULT_INDEX_THRESHOLD,
    *,
    index_type: IndexType = DEFAULT_INDEX_TYPE,
    rebuild: bool = False,
    target_recall: float = 0.95,
    k: int = 100,
    calibration_queries: np.ndarray | None = None,
    n_calibration: int = 256,
) -> IndexReport:
    """Exact search below `threshold` rows, a calibrated ANN index at or above it.

    Below the threshold any vector index is dropped (exact search, recall 1). Above it an
    index is trained if there is none, if it is of another type, if `rebuild`, or if more
    than REBUILD_UNINDEXED_FRACTION of the rows arrived after it was trained; otherwise the
    existing one is kept. A new index (or one without stored settings) is then calibrated:
    search settings are raised along `search_ladder` until recall@k against exact search,
    on `calibration_queries` (e.g. real user vectors) or on `proxy_queries`, reaches
    `target_recall`; the result is stored with the table. A BTree index on published_at is
    kept alongside so the recency prefilter does not scan.
    """
    t0 = time.perf_counter()
    n_rows, dim = int(table.count_rows()), table_dim(table)
    existing = vector_index(table)
    if n_rows < threshold:
        if existing is not None:
            table.drop_index(existing.name)
        return IndexReport("exact", n_rows, dim, False, time.perf_counter() - t0, recall=1.0)

    params = index_params(n_rows, dim, index_type)
    unindexed = 0
    if existing is not None:
        stats = table.index_stats(existing.name)
        unindexed = int(getattr(stats, "num_unindexed_rows", 0) or 0)
    stale = existing is None or str(existing.index_type) != LANCE_INDEX_TYPES[index_type]
    stale = stale or rebuild or unindexed > REBUILD_UNINDEXED_FRACTION * n_rows
    if stale:
        table.create_index(
            VECTOR_COLUMN, config=_index_config(index_type, params["build"]), replace=True
        )
        unindexed = 0
    if not any(list(c.columns) == ["published_at"] for c in table.list_indices()):
        from lancedb.index import BTree

        table.create_index("published_at", config=BTree())

    settings, recall = stored_search_params(table), None
    t_cal = time.perf_counter()
    if not settings:
        queries = (
            np.ascontiguousarray(calibration_queries, dtype=np.float32)
            if calibration_queries is not None
            else proxy_queries(table, n_calibration)
        )
        ladder = search_ladder(index_type, params["build"])
        settings, recall = calibrate(table, ladder, queries, k=k, target_recall=target_recall)
        store_search_params(table, settings)
    calibration_seconds = time.perf_counter() - t_cal
    return IndexReport(
        kind=index_type,
        n_rows=n_rows,
        dim=dim,
        built=stale,
        seconds=time.perf_counter() - t0,
        build_params=params["build"],
        search_params=settings,
        recall=recall,
        recall_k=k,
        calibration_seconds=calibration_seconds,
        n_unindexed=unindexed,
    )

"""The LanceDB article-vector table and batched top-k retrieval over it."""

from feed_dagster.vectors.index import (
    DEFAULT_INDEX_THRESHOLD,
    IndexReport,
    calibrate,
    ensure_index,
    proxy_queries,
    search_ladder,
)
from feed_dagster.vectors.search import (
    exact_topk,
    measure_recall,
    per_query_recall,
    read_vectors,
    recall_at_k,
    search_batch,
)
from feed_dagster.vectors.table import (
    DEFAULT_INDEX_TYPE,
    METRIC,
    OptimizeReport,
    VectorTableError,
    index_params,
    open_vectors,
    open_verified,
    optimize,
    retrieval_frame,
    search_params,
    vector_index,
    write_vectors,
)

__all__ = [
    "DEFAULT_INDEX_THRESHOLD",
    "DEFAULT_INDEX_TYPE",
    "METRIC",
    "IndexReport",
    "OptimizeReport",
    "VectorTableError",
    "calibrate",
    "ensure_index",
    "exact_topk",
    "index_params",
    "measure_recall",
    "open_vectors",
    "open_verified",
    "optimize",
    "per_query_recall",
    "proxy_queries",
    "read_vectors",
    "recall_at_k",
    "retrieval_frame",
    "search_batch",
    "search_ladder",
    "search_params",
    "vector_index",
    "write_vectors",
]

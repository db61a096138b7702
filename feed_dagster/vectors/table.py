"""The LanceDB article-vector table: writes, index management and maintenance.

One row per article: `article_id`, `vector` (fixed-size float32, L2-normalised) and the
columns retrieval filters on (`author_id`, `published_at`, `topic`, `is_reply`,
`is_repost`), plus `row_hash`, a fingerprint of the rest of the row that lets a rewrite
touch only rows that changed.

Metric: vectors are unit length, so the table is searched with distance type "dot"
(LanceDB returns 1 - dot product, which `search_batch` turns back into a score). Cosine
would rank identically but renormalises every candidate on every query.

`uri` is anything `lancedb.connect` accepts: a local folder or an object-store URI
(s3://bucket/path). Without explicit `storage_options`, an s3:// table takes its endpoint,
region and credentials from the AWS_* variables, as every other artifact does
(feed_dagster/artifacts.py).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa

from feed_dagster.artifacts import join, lance_storage_options
from feed_dagster.embeddings.hashing import combine, hash_ints, mix64

METRIC: Literal["dot"] = "dot"
VECTOR_COLUMN = "vector"
FILTER_SCHEMA: dict[str, pl.DataType] = {
    "author_id": pl.Int64(),
    "published_at": pl.Datetime("us"),
    "topic": pl.Int32(),
    "is_reply": pl.Boolean(),
    "is_repost": pl.Boolean(),
}
REQUIRED_COLUMNS = ("article_id", VECTOR_COLUMN, *FILTER_SCHEMA)

IndexType = Literal["IVF_FLAT", "IVF_PQ", "IVF_HNSW_SQ"]
DEFAULT_INDEX_TYPE: IndexType = "IVF_FLAT"
# From bench/bench_vectors.py: with an IVF_FLAT index LanceDB answers batched top-100
# queries faster than its own brute-force scan and than torch in memory from about 10k
# rows up (docs/BENCHMARKS.md, "vectors"); below that, exact search costs milliseconds and
# keeps recall at 1. `ensure_index` indexes from here, and `search_batch` searches exactly
# when fewer rows than this pass its filters.
DEFAULT_INDEX_THRESHOLD = 10_000
# Under a filter, reading the allowed rows and ranking them in memory beats the index at
# every size measured: top-1,000 of 256 queries on the 1M-post table of synthetic:m took
# 0.6 / 1.7 / 2.2 s in memory against 6.7 / 7.5 / 14.7 s through IVF_FLAT for 143k / 357k /
# 714k allowed rows (48 h to 10 days); without a filter the index won (0.5 s against 3.4 s
# for all 1M rows). A filtered IVF search probes nprobes / (allowed share) partitions to
# find k allowed rows, so the rarer the rows, the more of the table it reads. On the
# 10M-post table of synthetic:l, top-1,000 of 512 queries over its 1.43M-post 48 h window
# took 4.8-5.1 s in memory (one thread) against 58.9-59.9 s through IVF_FLAT. `search_batch`
# searches filtered queries exactly below this many allowed rows: the rows a shard keeps
# (4M x 64 float32 = 1 GB) are the limit, not the time.
FILTERED_EXACT_BELOW = 4_000_000
_DELETE_CHUNK = 20_000
# Vector-column metadata key holding the search settings `ensure_index` calibrated.
SEARCH_PARAMS_KEY = "feed_dagster:search_params"


def connect(uri: str | Path, storage_options: dict[str, str] | None = None) -> Any:
    """The LanceDB database at `uri`; `storage_options` default to the AWS_* variables'
    for an s3:// URI (none for a local folder)."""
    # Imported here, not at the top: LanceDB starts an async runtime when imported, which a
    # process forked afterwards inherits (the step executor forks its steps from a server
    # that has imported the project), and it takes seconds that steps without vectors
    # need not pay.
    import lancedb

    if storage_options is None:
        storage_options = lance_storage_options(str(uri))
    return lancedb.connect(str(uri), storage_options=storage_options)


def open_vectors(uri: str | Path, name: str, storage_options: dict[str, str] | None = None) -> Any:
    """Open an existing vector table (a LanceDB `Table`)."""
    table = _open_if_exists(connect(uri, storage_options), name)
    if table is None:
        raise FileNotFoundError(f"no LanceDB table {name!r} under {uri}")
    return table


class VectorTableError(RuntimeError):
    """A vector table that exists but cannot be read (damaged manifest or data files)."""


def open_verified(uri: str | Path, name: str, storage_options: dict[str, str] | None = None) -> Any:
    """`open_vectors`, then read every row's article_id once.

    Opening reads only the manifest; a missing or truncated data file would otherwise
    surface as a bare lance error half-way through a feed run. Reading one narrow column of
    every fragment touches every data file (a truncated Lance file has lost its footer, so
    any read of it fails) for a few milliseconds per 100k rows. A missing table stays a
    FileNotFoundError (callers may fall back); a damaged one is a VectorTableError naming
    the table and the way out.
    """
    try:
        table = open_vectors(uri, name, storage_options)
        table.search().select(["article_id"]).limit(None).to_arrow()
    except FileNotFoundError:
        raise
    except (RuntimeError, OSError, ValueError) as exc:
        raise VectorTableError(
            f"LanceDB table {name!r} under {uri} exists but cannot be read "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); expected a readable "
            f"manifest and data files. Remove {join(str(uri), name + '.lance')} and "
            "rematerialise article_vectors (job update_vectors) to rebuild it"
        ) from exc
    return table


def _open_if_exists(db: Any, name: str) -> Any | None:
    # Asking for the table, rather than listing names, avoids paginated listings.
    try:
        return db.open_table(name)
    except (FileNotFoundError, ValueError):
        return None


def _dim_of(vectors: pl.Series) -> int:
    dtype = vectors.dtype
    if isinstance(dtype, pl.Array):
        return int(dtype.size)
    if isinstance(dtype, pl.List):
        lengths = vectors.list.len()
        if lengths.n_unique() != 1:
            raise ValueError("vector column: every vector must have the same length")
        return int(lengths[0])
    raise ValueError(f"vector column must be a list or array of floats, got {dtype}")


def _row_hash(matrix: np.ndarray, frame: pl.DataFrame) -> np.ndarray:
    """64-bit fingerprint of each row's vector bytes and filter values."""
    n, dim = matrix.shape
    words = np.ascontiguousarray(matrix, dtype=np.float32).view(np.uint32)
    # A random multilinear hash of the 32-bit words, summed mod 2^64 in column blocks so the
    # temporary stays small for million-row tables.
    coeffs = mix64(np.arange(1, dim + 1, dtype=np.uint64)) | np.uint64(1)
    acc = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, dim, 64):
            block = words[:, start : start + 64].astype(np.uint64)
            acc += (block * coeffs[start : start + 64]).sum(axis=1, dtype=np.uint64)
    h = mix64(acc)
    for i, col in enumerate(FILTER_SCHEMA):
        s = frame[col]
        values = s.cast(pl.Int64).fill_null(-(2**62)).to_numpy()
        h = combine(h, hash_ints(values, seed=i))
    return h.view(np.int64)


def _prepare(frame: pl.DataFrame) -> tuple[pa.Table, int]:
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"write_vectors: frame lacks column(s) {missing}; expected {list(REQUIRED_COLUMNS)}"
        )
    if len(frame) == 0:
        raise ValueError("write_vectors: frame is empty; refusing to create or wipe the table")
    ids = frame["article_id"]
    if ids.null_count():
        raise ValueError("write_vectors: article_id has null values")
    if ids.is_duplicated().any():
        example = ids.filter(ids.is_duplicated()).unique().head(5).to_list()
        raise ValueError(f"write_vectors: article_id values repeat, e.g. {example}")
    if frame[VECTOR_COLUMN].null_count():
        raise ValueError("write_vectors: vector has null values")
    dim = _dim_of(frame[VECTOR_COLUMN])
    vectors = frame[VECTOR_COLUMN].cast(pl.Array(pl.Float32, dim))
    matrix = vectors.to_numpy().reshape(len(frame), dim)
    if not np.isfinite(matrix).all():
        raise ValueError("write_vectors: vector has NaN or infinite values")
    out = pl.DataFrame({"article_id": ids.cast(pl.Int64), VECTOR_COLUMN: vectors}).with_columns(
        *(frame[c].cast(t).alias(c) for c, t in FILTER_SCHEMA.items()),
        pl.Series("row_hash", _row_hash(matrix, frame), dtype=pl.Int64),
    )
    return out.to_arrow(), dim


def retrieval_frame(vectors: pl.DataFrame, articles: pl.DataFrame) -> pl.DataFrame:
    """(article_id, vector) rows with the filter columns retrieval prefilters on, taken from
    the canonical articles table: the frame `write_vectors` expects."""
    return vectors.join(
        articles.select(
            "article_id",
            "author_id",
            "published_at",
            "topic",
            (pl.col("kind") == "reply").alias("is_reply"),
            (pl.col("kind") == "repost").alias("is_repost"),
        ),
        on="article_id",
    )


def write_vectors(
    uri: str | Path,
    name: str,
    frame: pl.DataFrame,
    *,
    delete_missing: bool = True,
    mode: Literal["upsert", "overwrite"] = "upsert",
    storage_options: dict[str, str] | None = None,
) -> int:
    """Create or update table `name` so it holds exactly the rows of `frame`; return its version.

    `frame` needs article_id, vector and the filter columns (author_id, published_at, topic,
    is_reply, is_repost); other columns are ignored. On an existing table only new and
    changed rows are upserted (merge_insert on article_id), and with `delete_missing` rows
    whose article_id is absent from `frame` are deleted. An unchanged frame writes nothing
    and returns the current version. `mode="overwrite"` replaces the table, which is needed
    when the vector dimension changes.
    """
    data, dim = _prepare(frame)
    if mode not in ("upsert", "overwrite"):
        raise ValueError(f"write_vectors: mode must be 'upsert' or 'overwrite', got {mode!r}")
    db = connect(uri, storage_options)
    table = None if mode == "overwrite" else _open_if_exists(db, name)
    if table is None:
        table = db.create_table(name, data, mode="overwrite" if mode == "overwrite" else "create")
        return int(table.version)

    stored = table.schema.field(VECTOR_COLUMN).type
    stored_dim = getattr(stored, "list_size", None)
    if stored_dim != dim:
        raise ValueError(
            f"write_vectors: table {name!r} at {uri} holds {stored_dim}-d vectors but the frame "
            f"has {dim}-d ones; write with mode='overwrite' (or a new table name) after "
            "changing encoders"
        )
    existing = pl.from_arrow(
        table.search().select(["article_id", "row_hash"]).limit(None).to_arrow()
    )
    new = pl.from_arrow(data)
    changed = new.join(existing, on=["article_id", "row_hash"], how="anti")
    if len(changed):
        (
            table.merge_insert("article_id")
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute(changed.to_arrow())
        )
    if delete_missing:
        gone = existing.join(new.select("article_id"), on="article_id", how="anti")
        gone_ids = gone["article_id"].to_numpy()
        for start in range(0, len(gone_ids), _DELETE_CHUNK):
            chunk = gone_ids[start : start + _DELETE_CHUNK]
            table.delete(f"article_id IN ({','.join(map(str, chunk.tolist()))})")
    return int(table.version)


def index_params(n_rows: int, dim: int, index_type: IndexType = DEFAULT_INDEX_TYPE) -> dict:
    """Build settings, and fallback search settings, for an index over `n_rows` vectors.

    `ensure_index` replaces the search settings with ones calibrated on the table itself;
    these are used only for an index built some other way. docs/BENCHMARKS.md ("vectors")
    has the measurements behind the values.
    """
    # About sqrt(n) partitions, but at least 256 rows each: LanceDB trains no more
    # partitions than that anyway, and nprobes is counted against the real number.
    partitions = max(1, min(round(math.sqrt(n_rows)), n_rows // 256, 4096))
    if index_type == "IVF_FLAT":
        # Exact distances inside the probed partitions: recall depends on nprobes alone.
        return {
            "build": {"num_partitions": partitions},
            "search": {"nprobes": max(8, math.ceil(partitions / 8))},
        }
    if index_type == "IVF_PQ":
        # 4 dimensions per 8-bit PQ code; PQ distances are too coarse for recall@100 >= 0.95
        # on their own, so the top k * refine_factor are re-scored exactly.
        sub_vectors = max(1, dim // 4)
        while dim % sub_vectors:
            sub_vectors -= 1
        return {
            "build": {"num_partitions": partitions, "num_sub_vectors": sub_vectors},
            "search": {"nprobes": max(8, math.ceil(partitions / 8)), "refine_factor": 4},
        }
    if index_type == "IVF_HNSW_SQ":
        # One HNSW graph per ~100k rows; every partition is probed.
        graphs = max(1, round(n_rows / 100_000))
        return {
            "build": {"num_partitions": graphs, "m": 20, "ef_construction": 300},
            "search": {"nprobes": graphs, "ef": 300},
        }
    raise ValueError(f"index_type must be one of {list(LANCE_INDEX_TYPES)}, got {index_type!r}")


LANCE_INDEX_TYPES = {"IVF_FLAT": "IvfFlat", "IVF_PQ": "IvfPq", "IVF_HNSW_SQ": "IvfHnswSq"}


def index_type_of(index: Any) -> IndexType:
    """Our name (IVF_FLAT, ...) of a LanceDB IndexConfig's type."""
    for ours, lance in LANCE_INDEX_TYPES.items():
        if str(index.index_type) == lance:
            return ours  # type: ignore[return-value]
    raise ValueError(f"unsupported vector index type {index.index_type!r}")


def vector_index(table: Any) -> Any | None:
    """The table's index on the vector column, or None."""
    for config in table.list_indices():
        if list(config.columns) == [VECTOR_COLUMN]:
            return config
    return None


def table_dim(table: Any) -> int:
    """Dimension of the table's vectors."""
    return int(table.schema.field(VECTOR_COLUMN).type.list_size)


def stored_search_params(table: Any) -> dict[str, int]:
    """Search settings `ensure_index` calibrated for the table's current vector index.

    Empty when there is no index, nothing was stored, or the index was rebuilt since.
    """
    index = vector_index(table)
    metadata = table.schema.field(VECTOR_COLUMN).metadata or {}
    raw = metadata.get(SEARCH_PARAMS_KEY.encode())
    if index is None or not raw:
        return {}
    stored = json.loads(raw)
    if stored.get("index_uuid") != str(index.index_uuid):
        return {}
    return {k: int(v) for k, v in stored["params"].items()}


def store_search_params(table: Any, params: dict[str, int]) -> None:
    """Save search settings for the current vector index with the vector column."""
    index = vector_index(table)
    if index is None:
        raise ValueError("store_search_params: the table has no vector index")
    value = json.dumps({"index_uuid": str(index.index_uuid), "params": params})
    table.update_field_metadata({"path": VECTOR_COLUMN, "metadata": {SEARCH_PARAMS_KEY: value}})


def search_params(table: Any) -> dict[str, int]:
    """Settings search_batch uses by default: calibrated ones, else `index_params`'."""
    index = vector_index(table)
    if index is None:
        return {}
    return (
        stored_search_params(table)
        or (index_params(int(table.count_rows()), table_dim(table), index_type_of(index))["search"])
    )


@dataclass(frozen=True)
class OptimizeReport:
    version_before: int
    version_after: int
    versions_removed: int
    cleanup_cutoff_version: int | None  # newest version eligible for removal, if any


def optimize(table: Any, *, keep_superseded_for: timedelta = timedelta(hours=1)) -> OptimizeReport:
    """Compact files, fold new rows into indexes and remove old versions safely.

    Search settings calibrated by `ensure_index` are carried over to the optimised index.
    A version is removed only once it has not been the current one for at least
    `keep_superseded_for`, so a reader that opened the table at the current version (before
    this call, or up to that long before a later write) keeps reading it. LanceDB's own
    age rule looks at when a version was created, which would delete a long-lived version
    the moment compaction supersedes it; this function translates the rule into the
    `cleanup_older_than` LanceDB expects. The latest version is never removed.
    """
    versions = sorted(table.list_versions(), key=lambda v: v["version"])
    before = int(table.version)
    now = time.time()
    # A version stopped being current when its successor was written.
    horizon = now - keep_superseded_for.total_seconds()
    cutoff_version, successor_ts = None, None
    for prev, nxt in zip(versions, versions[1:], strict=False):
        ts = nxt["timestamp"].timestamp()
        if ts <= horizon:
            cutoff_version, successor_ts = prev["version"], ts
    if successor_ts is None:
        # Nothing superseded long enough: an age beyond any version keeps them all.
        older_than = timedelta(days=365_000)
    else:
        # Delete versions created before the successor of the newest removable version; the
        # extra second keeps that successor even if the clock moves on before LanceDB runs.
        older_than = timedelta(seconds=now - successor_ts + 1.0)
    calibrated = stored_search_params(table)
    table.optimize(cleanup_older_than=older_than)
    if calibrated and not stored_search_params(table) and vector_index(table) is not None:
        # Folding new rows into the index gives it a new id; its partitions, and so the
        # calibrated settings, are unchanged.
        store_search_params(table, calibrated)
    after = sorted(table.list_versions(), key=lambda v: v["version"])
    return OptimizeReport(
        version_before=before,
        version_after=int(table.version),
        versions_removed=len({v["version"] for v in versions} - {v["version"] for v in after}),
        cleanup_cutoff_version=cutoff_version,
    )

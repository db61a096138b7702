"""Incremental article embeddings: encode only what is new or changed since the last run."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import polars as pl

from feed_dagster.embeddings.base import Encoder
from feed_dagster.embeddings.hashing import hash_strings

# A null field must hash differently from an empty one, and fields must not run together
# ("ab"+"c" vs "a"+"bc"), hence a null marker and a unit separator between fields.
_NULL = "\x00"
_SEP = "\x1f"

EMBEDDING_COLUMNS = ("article_id", "content_hash", "encoder_version", "vector")


def content_hash(articles: pl.DataFrame) -> pl.Series:
    """Stable UInt64 hash of each article's title, text and topic (same in every process)."""
    missing = [c for c in ("title", "text", "topic") if c not in articles.columns]
    if missing:
        raise ValueError(f"content_hash: the articles frame lacks column(s) {missing}")
    joined = articles.select(
        pl.concat_str(
            [
                pl.col("title").fill_null(_NULL),
                pl.col("text").fill_null(_NULL),
                pl.col("topic").cast(pl.String).fill_null(_NULL),
            ],
            separator=_SEP,
        ).alias("s")
    )["s"]
    return pl.Series("content_hash", hash_strings(joined, seed=0x0C0FFEE), dtype=pl.UInt64)


@dataclass(frozen=True)
class EmbeddingStats:
    """What one `update_embeddings` call did, for asset metadata and logs."""

    n_articles: int
    n_encoded: int
    n_reused: int
    dim: int
    encoder: str
    encoder_version: str
    norm_min: float
    norm_mean: float
    norm_max: float
    n_zero: int  # articles whose vector is all zeros (no usable content / no precomputed vector)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _vector_matrix(vectors: pl.Series, dim: int) -> np.ndarray:
    return np.ascontiguousarray(
        vectors.cast(pl.Array(pl.Float32, dim)).to_numpy(), dtype=np.float32
    ).reshape(len(vectors), dim)


def update_embeddings(
    articles: pl.DataFrame, previous: pl.DataFrame | None, encoder: Encoder
) -> tuple[pl.DataFrame, EmbeddingStats]:
    """Embeddings for every row of `articles`, re-encoding only what has to be.

    `previous` is an earlier result of this function (or None). A stored vector is reused
    when its article_id is still present, its content hash is unchanged and it was made by
    an encoder of the same `version`; every other article is encoded. Articles absent from
    `articles` are dropped. Returns (table, stats); the table has the columns
    article_id Int64, content_hash UInt64, encoder_version String, vector Array(Float32, dim),
    in the order of `articles`.
    """
    if "article_id" not in articles.columns:
        raise ValueError("update_embeddings: the articles frame has no 'article_id' column")
    if articles["article_id"].null_count():
        raise ValueError("update_embeddings: article_id has null values")
    dup = articles["article_id"].is_duplicated()
    if dup.any():
        example = articles["article_id"].filter(dup).unique().head(5).to_list()
        raise ValueError(f"update_embeddings: article_id values repeat, e.g. {example}")

    dim, version = encoder.dim, encoder.version
    keys = pl.DataFrame(
        {
            "article_id": articles["article_id"].cast(pl.Int64),
            "content_hash": content_hash(articles),
        }
    )
    vectors = np.zeros((len(articles), dim), dtype=np.float32)
    reuse = np.zeros(len(articles), dtype=bool)

    if previous is not None and len(previous):
        missing = [c for c in EMBEDDING_COLUMNS if c not in previous.columns]
        if missing:
            raise ValueError(
                f"update_embeddings: previous embeddings lack column(s) {missing}; "
                f"expected {list(EMBEDDING_COLUMNS)}"
            )
        usable = previous.filter(pl.col("encoder_version") == version)
        if len(usable):
            matched = keys.join(
                usable.select(
                    pl.col("article_id").cast(pl.Int64),
                    pl.col("content_hash").cast(pl.UInt64).alias("prev_hash"),
                    pl.int_range(pl.len()).alias("prev_row"),
                ),
                on="article_id",
                how="left",
                maintain_order="left",
            )
            reuse = (matched["prev_hash"] == matched["content_hash"]).fill_null(False).to_numpy()
            if reuse.any():
                rows = matched["prev_row"].filter(pl.Series(reuse)).to_numpy()
                old = _vector_matrix(usable["vector"].gather(rows), dim)
                vectors[reuse] = old

    todo = np.flatnonzero(~reuse)
    if len(todo):
        encoded = encoder.encode(articles[todo])
        if encoded.shape != (len(todo), dim):
            raise ValueError(
                f"update_embeddings: encoder {version} returned shape {encoded.shape}, "
                f"expected ({len(todo)}, {dim})"
            )
        vectors[todo] = encoded

    table = keys.with_columns(
        pl.lit(version, dtype=pl.String).alias("encoder_version"),
        pl.Series("vector", vectors, dtype=pl.Array(pl.Float32, dim)),
    )
    norms = np.linalg.norm(vectors, axis=1) if len(vectors) else np.zeros(1)
    stats = EmbeddingStats(
        n_articles=len(articles),
        n_encoded=len(todo),
        n_reused=int(reuse.sum()),
        dim=dim,
        encoder=encoder.name,
        encoder_version=version,
        norm_min=float(norms.min()),
        norm_mean=float(norms.mean()),
        norm_max=float(norms.max()),
        n_zero=int((norms == 0).sum()) if len(vectors) else 0,
    )
    return table, stats

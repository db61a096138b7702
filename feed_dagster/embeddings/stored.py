"""The stored article embeddings: where the article_embeddings file lives, reading it, and
the content vector of every article in a table's order."""

import numpy as np
import polars as pl

from feed_dagster.artifacts import Location, exists, read_parquet
from feed_dagster.paths import DataRoot, data_root


def embeddings_path() -> Location:
    # A Parquet file, not a warehouse table: vectors are a bulk columnar payload that
    # training and LanceDB read whole, and keeping them out of DuckDB means encoding never
    # holds the warehouse's single write lock.
    return DataRoot(data_root()).embeddings_path()


def read_embeddings(path: Location | None = None) -> pl.DataFrame:
    """The stored embeddings at `path`, a local path or a bucket URL (default: under the
    artifacts root, FEED_DAGSTER_ARTIFACTS_URI or the data root)."""
    path = path or embeddings_path()
    if not exists(path):
        raise FileNotFoundError(f"{path} is missing: materialise article_embeddings first")
    return read_parquet(path)


def content_vectors(articles: pl.DataFrame, path: Location | None = None) -> np.ndarray:
    """The stored content vector of every article, in the order of `articles` (embeddings
    file `path`, default under the artifacts root)."""
    emb = read_embeddings(path).select("article_id", "vector")
    joined = articles.select("article_id").join(
        emb, on="article_id", how="left", maintain_order="left"
    )
    missing = joined.filter(pl.col("vector").is_null())
    if missing.height:
        raise ValueError(
            f"{missing.height} articles have no content vector (e.g. "
            f"{missing['article_id'].head(5).to_list()}): rematerialise article_embeddings"
        )
    dim = emb.schema["vector"].size
    return joined["vector"].to_numpy().reshape(len(joined), dim).astype(np.float32, copy=False)

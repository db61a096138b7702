"""`PrecomputedEncoder`: vectors read from a parquet file, e.g. an EBNeRD artifact."""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from feed_dagster.embeddings.base import Encoder, l2_normalise, require_columns


class PrecomputedEncoder(Encoder):
    """Vectors looked up by article_id in a parquet file (EBNeRD artifacts and the like).

    The file needs an `article_id` column and one list/array-of-float vector column
    (`column`; found automatically when the file has exactly one). Vectors are
    L2-normalised on load unless `normalize=False`.

    Articles without a vector: `fallback="raise"` (default) fails naming the file and the
    ids; `fallback="zeros"` gives them a zero vector, which scores 0 against every user and
    so is neither favoured nor penalised by content similarity (the embedding stats report
    them as norm 0). A lexical fallback is deliberately not offered: lexical vectors live in
    a different space, so their dot products with the precomputed ones would be noise.
    """

    name = "precomputed"

    def __init__(
        self,
        path: str | Path,
        column: str | None = None,
        *,
        fallback: Literal["raise", "zeros"] = "raise",
        normalize: bool = True,
    ) -> None:
        if fallback not in ("raise", "zeros"):
            raise ValueError(
                f"PrecomputedEncoder: fallback must be 'raise' or 'zeros', got {fallback!r}"
            )
        self.path = str(path)
        self._column = column
        self.fallback = fallback
        self.normalize = normalize

    @cached_property
    def _table(self) -> tuple[pl.DataFrame, np.ndarray, str]:
        """(article_id -> row frame, vector matrix, vector column name), loaded once."""
        try:
            schema = pl.read_parquet_schema(self.path)
        except FileNotFoundError:
            raise FileNotFoundError(f"PrecomputedEncoder: no such file {self.path}") from None
        if "article_id" not in schema:
            raise ValueError(
                f"PrecomputedEncoder: {self.path} has no 'article_id' column "
                f"(columns: {list(schema)})"
            )
        vector_cols = [
            c for c, t in schema.items() if c != "article_id" and isinstance(t, pl.List | pl.Array)
        ]
        column = self._column
        if column is None:
            if len(vector_cols) != 1:
                raise ValueError(
                    f"PrecomputedEncoder: {self.path} has list/array columns {vector_cols}; "
                    "pass column= to choose the vector column"
                )
            column = vector_cols[0]
        elif column not in vector_cols:
            raise ValueError(
                f"PrecomputedEncoder: {self.path} has no list/array column {column!r} "
                f"(vector columns: {vector_cols})"
            )
        frame = pl.read_parquet(self.path, columns=["article_id", column])
        lengths = frame[column].list.len() if isinstance(schema[column], pl.List) else None
        if frame[column].null_count() or (lengths is not None and lengths.n_unique() > 1):
            raise ValueError(
                f"PrecomputedEncoder: column {column!r} of {self.path} must hold one vector of "
                "the same length in every row (found nulls or differing lengths)"
            )
        dup = frame["article_id"].is_duplicated()
        if dup.any():
            example = frame["article_id"].filter(dup).unique().head(5).to_list()
            raise ValueError(
                f"PrecomputedEncoder: {self.path} repeats article_id values, e.g. {example}"
            )
        dim = int(lengths[0]) if lengths is not None else schema[column].size
        matrix = frame[column].cast(pl.Array(pl.Float32, dim)).to_numpy()
        matrix = np.ascontiguousarray(matrix, dtype=np.float32).reshape(len(frame), dim)
        if self.normalize:
            matrix = l2_normalise(matrix)
        index = frame.select(
            pl.col("article_id").cast(pl.Int64), pl.int_range(len(frame)).alias("row")
        )
        return index, matrix, column

    @property
    def column(self) -> str:
        return self._table[2]

    @property
    def dim(self) -> int:
        return int(self._table[1].shape[1])

    @cached_property
    def version(self) -> str:
        digest = hashlib.sha256()
        if Path(self.path).exists():
            # Content digest, not mtime: a copied or re-downloaded identical file keeps its
            # vectors; a changed file re-encodes every article.
            with open(self.path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        else:
            digest.update(self.path.encode())
        return (
            f"precomputed-{self.column}-d{self.dim}-n{int(self.normalize)}-"
            f"{digest.hexdigest()[:16]}"
        )

    def encode(self, articles: pl.DataFrame) -> np.ndarray:
        require_columns(articles, ("article_id",), "PrecomputedEncoder")
        index, matrix, _ = self._table
        rows = articles.select(pl.col("article_id").cast(pl.Int64)).join(
            index, on="article_id", how="left", maintain_order="left"
        )["row"]
        missing = rows.is_null().to_numpy()
        if missing.any() and self.fallback == "raise":
            ids = articles["article_id"].filter(pl.Series(missing)).to_list()
            shown = ", ".join(map(str, ids[:20])) + (" ..." if len(ids) > 20 else "")
            raise KeyError(
                f"PrecomputedEncoder: {len(ids)} article(s) have no vector in {self.path} "
                f"(column {self.column!r}): {shown}. Use fallback='zeros' to give them "
                "zero vectors."
            )
        out = np.zeros((len(articles), matrix.shape[1]), dtype=np.float32)
        found = ~missing
        out[found] = matrix[rows.filter(pl.Series(found)).to_numpy()]
        return out

"""The encoder interface every article encoder implements, and the checks and
normalisation they share.

Every encoder maps rows of the canonical `articles` table to L2-normalised float32 vectors,
so that a dot product is a cosine similarity everywhere downstream (retrieval, LanceDB).
`version` identifies the function the encoder computes: stored vectors are reused only while
it is unchanged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import polars as pl

TEXT_COLUMNS = ("title", "text")


def require_columns(articles: pl.DataFrame, columns: tuple[str, ...], who: str) -> None:
    missing = [c for c in columns if c not in articles.columns]
    if missing:
        raise ValueError(
            f"{who}: the articles frame lacks column(s) {missing}; expected the canonical "
            f"articles schema (feed_dagster.data.schema.ARTICLES), got {articles.columns}"
        )


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Unit rows; all-zero rows stay zero (an article with no usable content)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0).astype(np.float32)


class Encoder(ABC):
    """Maps articles to L2-normalised float32 vectors of a fixed dimension."""

    name: str

    @property
    @abstractmethod
    def dim(self) -> int: ...

    @property
    @abstractmethod
    def version(self) -> str:
        """Changes whenever the vectors this encoder returns for the same article would."""

    @abstractmethod
    def encode(self, articles: pl.DataFrame) -> np.ndarray:
        """float32 array [len(articles), dim], one unit-norm row per article, in input order."""

"""The two seams where learned models plug into the pipeline.

The pipeline knows models only through these protocols, so a learned retriever or ranker
and the table-based fallbacks in `table_backends.py` are interchangeable.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import polars as pl

if TYPE_CHECKING:
    from feed_dagster.pipeline.query import Query

RETRIEVED_SCHEMA = {"user_id": pl.Int64, "article_id": pl.Int64, "retrieval_score": pl.Float64}


@runtime_checkable
class Retriever(Protocol):
    """Out-of-network candidate retrieval for a batch of users."""

    def retrieve(
        self,
        user_ids: np.ndarray,
        now: datetime,
        k: int,
        *,
        published_after: datetime | None,
        exclude: pl.DataFrame | None = None,
        exclude_authors: pl.DataFrame | None = None,
    ) -> pl.DataFrame:
        """Up to `k` posts per user: frame(user_id, article_id, retrieval_score), any order.

        Only posts published in (published_after, now] qualify (up to `now` when
        published_after is None: no age limit); higher scores are better.
        `exclude` (user_id, article_id) and `exclude_authors` (user_id, author_id) list what
        the pipeline drops afterwards anyway (in-network candidates, seen and served posts,
        followed authors): a retriever that honours them fills its k with usable posts.
        """
        ...


@runtime_checkable
class Scorer(Protocol):
    """Per-action engagement probabilities for (user, candidate) rows."""

    def score(self, candidates: pl.DataFrame, context: Query) -> pl.DataFrame:
        """`candidates` (hydrated rows: user_id, article_id, author_id, kind, topic, in_network,
        published_at, ...) with p_<action> for every action in schema.ACTIONS (a probability
        in [0, 1]; 0 for actions the model does not predict) and `dwell_seconds` (expected
        dwell, seconds) added.

        The result must keep user_id and article_id; the pipeline joins the prediction
        columns back on those keys, so row order is free. `context` is the hydrated Query of
        the batch (history, follows, now, ...).
        """
        ...


def component_name(component: object) -> str:
    """A short label for stats and metadata."""
    return str(getattr(component, "name", type(component).__name__))

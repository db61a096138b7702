"""The learned models behind the pipeline's Retriever and Scorer protocols.

TwoTowerRetriever embeds each user's history with the user tower and searches the LanceDB
item-tower table; RankerScorer asks the transformer ranker for per-action probabilities.
Both read features strictly before `now` through the models' own serving code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import numpy as np
import polars as pl

from feed_dagster.models.features import FeatureConfig
from feed_dagster.models.ranker import PhoenixRanker
from feed_dagster.models.serve import ServingContext, score_candidates, user_vectors_at
from feed_dagster.models.two_tower import TwoTower
from feed_dagster.pipeline.query import Query
from feed_dagster.vectors import search_batch

# Candidates scored per context at serving time. Training groups slates by 16; at serving a
# user has ~1,000 candidates, and with candidate isolation the grouping changes only how
# often the user's context (user + history tokens) is recomputed, never a score (tested).
# 256 keeps padding small while recomputing the context ~4 instead of ~60 times per user.
SERVING_GROUP = 256


def serving_features(features: FeatureConfig) -> FeatureConfig:
    """The models' feature config with candidates grouped for serving throughput."""
    return replace(features, max_candidates=max(features.max_candidates, SERVING_GROUP))


@dataclass
class TwoTowerRetriever:
    model: TwoTower
    context: ServingContext
    table: Any  # the LanceDB article-vector table
    name: str = "two_tower+lancedb"

    def retrieve(
        self,
        user_ids: np.ndarray,
        now: datetime,
        k: int,
        *,
        published_after: datetime,
        exclude: pl.DataFrame | None = None,
        exclude_authors: pl.DataFrame | None = None,
    ) -> pl.DataFrame:
        users = np.asarray(user_ids, dtype=np.int64)
        if users.size == 0 or k <= 0:
            return pl.DataFrame(
                schema={"user_id": pl.Int64, "article_id": pl.Int64, "retrieval_score": pl.Float64}
            )
        vectors = user_vectors_at(self.model, self.context, users, now)
        hits = search_batch(
            self.table,
            vectors,
            k,
            published_after=published_after,
            where=f"published_at <= TIMESTAMP '{now.isoformat(sep=' ')}'",
        )
        ids = pl.Series("user_id", users)
        return hits.select(
            ids.gather(hits["query_idx"].cast(pl.UInt32)).alias("user_id"),
            pl.col("article_id").cast(pl.Int64),
            pl.col("score").cast(pl.Float64).alias("retrieval_score"),
        )


@dataclass
class RankerScorer:
    model: PhoenixRanker
    context: ServingContext
    name: str = "phoenix_ranker"

    def score(self, candidates: pl.DataFrame, context: Query) -> pl.DataFrame:
        return score_candidates(self.model, self.context, candidates, context.now)

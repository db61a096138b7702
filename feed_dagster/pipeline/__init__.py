"""The candidate pipeline (core; no dagster): query hydration, sources, candidate
hydration, filters, scoring, selection, for a batch of users at once."""

from feed_dagster.pipeline.config import (
    FilterConfig,
    PipelineConfig,
    QueryConfig,
    ScoringConfig,
    ScoringWeights,
    SelectionConfig,
    SourceConfig,
)
from feed_dagster.pipeline.fallbacks import PopularityRetriever, TopicAffinityScorer
from feed_dagster.pipeline.protocols import ACTION_COLUMNS, Retriever, Scorer
from feed_dagster.pipeline.query import Query, hydrate_query
from feed_dagster.pipeline.run import FEED_SCHEMA, run_pipeline

__all__ = [
    "ACTION_COLUMNS",
    "FEED_SCHEMA",
    "FilterConfig",
    "PipelineConfig",
    "PopularityRetriever",
    "Query",
    "QueryConfig",
    "Retriever",
    "Scorer",
    "ScoringConfig",
    "ScoringWeights",
    "SelectionConfig",
    "SourceConfig",
    "TopicAffinityScorer",
    "hydrate_query",
    "run_pipeline",
]

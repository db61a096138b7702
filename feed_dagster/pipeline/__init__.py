"""The candidate pipeline (core; no dagster): query hydration, sources, candidate
hydration, filters, scoring, selection, for a batch of users at once."""

from feed_dagster.data.schema import ACTION_COLUMNS, FEED_SCHEMA
from feed_dagster.pipeline.config import (
    FilterConfig,
    PipelineConfig,
    QueryConfig,
    ScoringConfig,
    ScoringWeights,
    SelectionConfig,
    SourceConfig,
)
from feed_dagster.pipeline.protocols import Retriever, Scorer
from feed_dagster.pipeline.query import Query, hydrate_query
from feed_dagster.pipeline.run import run_pipeline
from feed_dagster.pipeline.spec import DEFAULT_SPEC
from feed_dagster.pipeline.stages import (
    Batch,
    CandidateHydrator,
    CandidateScorer,
    Filter,
    PipelineSpec,
    PostSelection,
    QueryHydrator,
    Request,
    Selector,
    Source,
)
from feed_dagster.pipeline.stats import PipelineStats
from feed_dagster.pipeline.table_backends import PopularityRetriever, TopicAffinityScorer

__all__ = [
    "ACTION_COLUMNS",
    "DEFAULT_SPEC",
    "FEED_SCHEMA",
    "Batch",
    "CandidateHydrator",
    "CandidateScorer",
    "Filter",
    "FilterConfig",
    "PipelineConfig",
    "PipelineSpec",
    "PipelineStats",
    "PopularityRetriever",
    "PostSelection",
    "Query",
    "QueryConfig",
    "QueryHydrator",
    "Request",
    "Retriever",
    "Scorer",
    "ScoringConfig",
    "ScoringWeights",
    "SelectionConfig",
    "Selector",
    "Source",
    "SourceConfig",
    "TopicAffinityScorer",
    "hydrate_query",
    "run_pipeline",
]

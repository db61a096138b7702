"""The built-in stages, one class each, and DEFAULT_SPEC, the pipeline every feed runs.

Each class is a thin, named wrapper around the stage's logic in candidate_sources.py,
hydrators.py, filters.py, scoring.py and selection.py, where it is tested on hand-made
frames. The order of DEFAULT_SPEC is the reference system's (see filters.PRE_SCORING_FILTERS
for why the filters run in theirs).
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from feed_dagster.pipeline.candidate_sources import in_network_source, out_of_network_source
from feed_dagster.pipeline.filters import (
    PRE_SCORING_FILTERS,
    FilterFn,
    keep_out_of_network_budget,
)
from feed_dagster.pipeline.hydrators import hydrate_core_data
from feed_dagster.pipeline.query import Query, hydrate_query
from feed_dagster.pipeline.scoring import (
    apply_author_diversity,
    apply_out_of_network_factor,
    predict,
    weighted_score,
)
from feed_dagster.pipeline.selection import dedupe_conversations, finalise, select_top_k, serve
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


class UserQuery(QueryHydrator):
    """History, follows, blocks, mutes, muted keywords, seen and served posts of the batch."""

    name = "user_query"

    def run(self, request: Request) -> Query:
        return hydrate_query(
            request.tables,
            request.user_ids,
            request.now,
            request.config.query,
            served=request.served,
        )


class InNetworkSource(Source):
    """Recent posts by followed accounts and on followed topics."""

    name = "in_network"

    def run(self, earlier: pl.DataFrame, batch: Batch) -> pl.DataFrame:
        return in_network_source(batch.query, batch.articles, batch.config.sources)


class OutOfNetworkSource(Source):
    """The retriever's best posts that the earlier sources did not find."""

    name = "out_of_network"

    def run(self, earlier: pl.DataFrame, batch: Batch) -> pl.DataFrame:
        return out_of_network_source(
            batch.query, batch.retriever, batch.config.sources, earlier, batch.articles
        )


class CoreDataHydrator(CandidateHydrator):
    """Author, kind, thread, publish time, topic and text of each candidate post."""

    name = "core_data"

    def run(self, candidates: pl.DataFrame, batch: Batch) -> pl.DataFrame:
        return hydrate_core_data(candidates, batch.articles)


@dataclass(frozen=True)
class FunctionFilter(Filter):
    """A filter written as a function of (candidates, query, FilterConfig), as the
    built-in ones in filters.py are."""

    name: str
    fn: FilterFn

    def run(self, candidates: pl.DataFrame, batch: Batch) -> pl.DataFrame:
        return self.fn(candidates, batch.query, batch.config.filters).kept


class OutOfNetworkBudget(Filter):
    """Users whose in-network candidates fill the selection keep their best
    `filters.out_of_network_scored` out-of-network candidates for the ranker, the others
    their best `filters.out_of_network_scored_short`."""

    name = "out_of_network_budget"

    def run(self, candidates: pl.DataFrame, batch: Batch) -> pl.DataFrame:
        cfg = batch.config
        f, top_k = cfg.filters, cfg.selection.top_k
        return keep_out_of_network_budget(
            candidates, f.out_of_network_scored, top_k, f.out_of_network_scored_short
        ).kept


class ModelScores(CandidateScorer):
    """The scorer model's p_<action> and dwell_seconds for every candidate."""

    name = "model"

    def run(self, candidates: pl.DataFrame, batch: Batch) -> pl.DataFrame:
        return predict(candidates, batch.scorer, batch.query)


class WeightedScore(CandidateScorer):
    """The weighted sum of the predictions, negatives squashed below every positive."""

    name = "weighted"

    def run(self, candidates: pl.DataFrame, batch: Batch) -> pl.DataFrame:
        return weighted_score(candidates, batch.config.scoring)


class AuthorDiversity(CandidateScorer):
    """Each author's later posts for a user count less."""

    name = "author_diversity"

    def run(self, candidates: pl.DataFrame, batch: Batch) -> pl.DataFrame:
        return apply_author_diversity(candidates, batch.config.scoring)


class OutOfNetworkFactor(CandidateScorer):
    """Out-of-network posts count less than posts from followed accounts."""

    name = "out_of_network_factor"

    def run(self, candidates: pl.DataFrame, batch: Batch) -> pl.DataFrame:
        return apply_out_of_network_factor(candidates, batch.config.scoring)


class TopK(Selector):
    """The `selection.top_k` best-scoring candidates per user."""

    name = "top_k"

    def run(self, candidates: pl.DataFrame, batch: Batch) -> pl.DataFrame:
        sel = batch.config.selection
        return select_top_k(candidates, sel.top_k, sel.out_of_network_slots)


class ConversationDedupe(PostSelection):
    """The best post per conversation per user."""

    name = "conversation_dedupe"

    def run(self, selected: pl.DataFrame, batch: Batch) -> pl.DataFrame:
        return dedupe_conversations(selected)


class Serve(PostSelection):
    """The first `selection.served` rows per user, positioned, in FEED_SCHEMA (with the
    author handle and reason hydrated): the pipeline's output, so it comes last."""

    name = "serve"

    def run(self, selected: pl.DataFrame, batch: Batch) -> pl.DataFrame:
        sel = batch.config.selection
        rows = serve(selected, sel.served, sel.out_of_network_slots)
        return finalise(rows, batch.users, batch.config)


DEFAULT_SPEC = PipelineSpec(
    query_hydrator=UserQuery(),
    sources=(InNetworkSource(), OutOfNetworkSource()),
    hydrators=(CoreDataHydrator(),),
    # The budget last, so it counts the candidates that could be served.
    filters=(
        *(FunctionFilter(name, fn) for name, fn in PRE_SCORING_FILTERS),
        OutOfNetworkBudget(),
    ),
    scorers=(ModelScores(), WeightedScore(), AuthorDiversity(), OutOfNetworkFactor()),
    selector=TopK(),
    post_selection=(ConversationDedupe(), Serve()),
)

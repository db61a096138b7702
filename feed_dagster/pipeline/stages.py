"""The kinds of stage the candidate pipeline is made of, and the spec that lists them.

As in the reference system, each kind is a small protocol: a `name` (its label in stats and
metadata), an `enabled(batch)` test (a disabled stage is skipped and not timed) and a
`run`. Every kind after query hydration has the same shape, run(candidates, batch) ->
frame; what a kind may do to the rows is its contract, and `run_pipeline` checks it:

    QueryHydrator     run(request) -> Query: everything later stages know about the users
    Source            run(earlier, batch) -> its own candidates (sources.CANDIDATE_SCHEMA);
                      `earlier` holds what the sources listed before it found
    CandidateHydrator adds columns; keeps every row
    Filter            keeps a subset of the rows
    CandidateScorer   adds or changes score columns; keeps every row (order may change)
    Selector          picks the rows worth serving, best first per user
    PostSelection     filters or hydrates the selected rows; may only drop rows

A stage class subclasses its kind to inherit the default `enabled` (always on).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol

import numpy as np
import polars as pl

from feed_dagster.pipeline.config import PipelineConfig
from feed_dagster.pipeline.protocols import Retriever, Scorer
from feed_dagster.pipeline.query import Query
from feed_dagster.pipeline.tables import Tables


@dataclass(frozen=True)
class Request:
    """What a run is asked for: the users, the time and the tables to read."""

    tables: Tables
    user_ids: np.ndarray | list[int]
    now: datetime
    config: PipelineConfig
    # (user_id, article_id) of the previously published feed; None before the first publish
    served: pl.DataFrame | None = None


@dataclass(frozen=True)
class Batch:
    """What every stage after query hydration reads: the hydrated query of the batch, the
    configuration, the post and user tables and the two models."""

    query: Query
    config: PipelineConfig
    articles: pl.DataFrame
    users: pl.DataFrame
    retriever: Retriever
    scorer: Scorer


class QueryHydrator(Protocol):
    """Builds the Query of a batch. Every run needs one, so it has no `enabled` test."""

    name: str

    def run(self, request: Request) -> Query: ...


class Source(Protocol):
    """Finds candidates: frame in sources.CANDIDATE_SCHEMA, best first per user."""

    name: str

    def enabled(self, batch: Batch) -> bool:
        return True

    def run(self, earlier: pl.DataFrame, batch: Batch) -> pl.DataFrame: ...


class CandidateHydrator(Protocol):
    """Joins what later stages need onto the candidates; keeps every row."""

    name: str

    def enabled(self, batch: Batch) -> bool:
        return True

    def run(self, candidates: pl.DataFrame, batch: Batch) -> pl.DataFrame: ...


class Filter(Protocol):
    """Drops candidates that must not be served; returns the rows it keeps.

    Candidates arrive ordered by user, in-network first, then by source rank, so "keep the
    first" is deterministic and prefers in-network and better-ranked rows.
    """

    name: str

    def enabled(self, batch: Batch) -> bool:
        return True

    def run(self, candidates: pl.DataFrame, batch: Batch) -> pl.DataFrame: ...


class CandidateScorer(Protocol):
    """Adds or adjusts score columns (the final one is `score`); keeps every row."""

    name: str

    def enabled(self, batch: Batch) -> bool:
        return True

    def run(self, candidates: pl.DataFrame, batch: Batch) -> pl.DataFrame: ...


class Selector(Protocol):
    """Picks the candidates worth serving, best first per user."""

    name: str

    def enabled(self, batch: Batch) -> bool:
        return True

    def run(self, candidates: pl.DataFrame, batch: Batch) -> pl.DataFrame: ...


class PostSelection(Protocol):
    """Filters or hydrates the selected rows (in order); may drop rows, never add them."""

    name: str

    def enabled(self, batch: Batch) -> bool:
        return True

    def run(self, selected: pl.DataFrame, batch: Batch) -> pl.DataFrame: ...


# The prefix of each kind's stage labels in stats ("filter.duplicates").
QUERY_HYDRATOR, SOURCE, HYDRATOR, FILTER, SCORER, SELECTOR, POST_SELECTION = (
    "query_hydrator",
    "source",
    "hydrator",
    "filter",
    "scorer",
    "selector",
    "post_selection",
)
CandidateStage = Source | CandidateHydrator | Filter | CandidateScorer | Selector | PostSelection


@dataclass(frozen=True)
class PipelineSpec:
    """The stages of a pipeline, in run order within each kind."""

    query_hydrator: QueryHydrator
    sources: tuple[Source, ...]
    hydrators: tuple[CandidateHydrator, ...]
    filters: tuple[Filter, ...]
    scorers: tuple[CandidateScorer, ...]
    selector: Selector
    post_selection: tuple[PostSelection, ...]

    def __post_init__(self) -> None:
        labels = [label(kind, stage) for kind, stage in self.stages()]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            # Stats are keyed by label: two stages of one label would merge their numbers.
            raise ValueError(f"pipeline spec: stage names must be unique per kind, got {twice}")

    def stages(self) -> Iterator[tuple[str, CandidateStage]]:
        """(kind, stage) for every stage after query hydration, in run order."""
        for kind, stages in (
            (SOURCE, self.sources),
            (HYDRATOR, self.hydrators),
            (FILTER, self.filters),
            (SCORER, self.scorers),
            (SELECTOR, (self.selector,)),
            (POST_SELECTION, self.post_selection),
        ):
            for stage in stages:
                yield kind, stage

    def with_filters(self, *filters: Filter) -> PipelineSpec:
        """This spec with `filters` run after its own filters, in the order given."""
        return replace(self, filters=(*self.filters, *filters))


def label(kind: str, stage: CandidateStage | QueryHydrator) -> str:
    """A stage's key in stats and metadata: "<kind>.<name>"."""
    return f"{kind}.{stage.name}"

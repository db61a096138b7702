"""The model backend of the pipeline: the trained models behind its Retriever and Scorer
protocols, and the choice between them and the table backend.

TwoTowerRetriever embeds each user's history with the user tower and searches the LanceDB
item-tower table; RankerScorer asks the transformer ranker for per-action probabilities.
Both read features strictly before `now` through the models' own serving code.
`feed_models` returns this pair when both models are promoted and the vector table exists,
and otherwise the table backend (`feed_dagster/pipeline/table_backends.py`);
`ModelLocations` holds where it looks, so every caller names the stores once.

It lives in `feeds`, not beside the table backend in `pipeline`, because the pipeline sits
below the models and never imports them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from feed_dagster.artifacts import Location
from feed_dagster.data.warehouse import read_tables
from feed_dagster.embeddings.stored import content_vectors, embeddings_path
from feed_dagster.metrics.fit_store import load_or_make
from feed_dagster.models.catalog import FeatureConfig
from feed_dagster.models.compiled import CompiledBlocks
from feed_dagster.models.exposures import WarehouseExposures
from feed_dagster.models.ranker import PhoenixRanker, load_ranker
from feed_dagster.models.serve import ServingContext, score_candidates, user_vectors_at
from feed_dagster.models.shared_inputs import shared_inputs
from feed_dagster.models.store import ModelStore
from feed_dagster.models.two_tower import TwoTower, load_two_tower
from feed_dagster.models.warehouse_engagements import WarehouseEngagements
from feed_dagster.paths import RANKER, TWO_TOWER, data_root
from feed_dagster.pipeline.protocols import RETRIEVED_SCHEMA, Retriever, Scorer
from feed_dagster.pipeline.query import Query
from feed_dagster.pipeline.table_backends import PopularityRetriever, TopicAffinityScorer
from feed_dagster.pipeline.tables import excluded_pairs, naive_utc, published_between
from feed_dagster.vectors import open_verified, read_vectors, search_batch
from feed_dagster.vectors.lists import ListIndex

# Candidate slots per group at serving time. Training groups slates by 16; at serving a
# user has ~1,000 candidates. `predict` encodes each user's context (user + history tokens)
# once however many groups the user spans, and with candidate isolation the grouping never
# changes a score (tested): the group size only sets the padding (at most one partly
# filled group per user; 92% of slots are real on the demo world).
SERVING_GROUP = 256


def serving_features(features: FeatureConfig) -> FeatureConfig:
    """The models' feature config with candidates grouped for serving throughput."""
    return replace(features, max_candidates=max(features.max_candidates, SERVING_GROUP))


@dataclass
class TwoTowerRetriever:
    """Top-k posts per user by user-tower x item-tower dot product from the LanceDB table.

    `exclude` (user_id, article_id) and `exclude_authors` (user_id, author_id) are honoured:
    the search fetches k plus the user's number of excluded posts inside the window and
    drops them, so all k slots hold usable posts whenever that many exist. A LanceDB `where`
    prefilter would be exact too, but the filter differs per user, so it costs one search per
    user: on synthetic:demo (30k posts, 512 users, k=1,000, 48 h window) the batched search
    took 1.1 s against 4.7 s (+0.6 s of user vectors) for per-user prefiltered searches.
    """

    model: TwoTower
    context: ServingContext
    table: Any  # the LanceDB article-vector table
    name: str = "two_tower+lancedb"
    _posts: pl.DataFrame | None = field(default=None, init=False, repr=False, compare=False)
    # The last rows the exact search read, by filter: every batch of a feed run searches
    # the same window (13 reads of 143k vectors a shard at 100k users otherwise).
    _rows: dict[str | None, tuple[np.ndarray, np.ndarray]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # Where the lists of a large window are kept for the other processes of the refresh
    # (stored_lists); None: each process builds its own.
    lists_dir: Path | None = None
    # The same for a window large enough to be searched through lists (search_batch).
    _lists: dict[str | None, ListIndex] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def posts(self) -> pl.DataFrame:
        """(article_id, author_id, published_at) of the serving catalog, built once."""
        if self._posts is None:
            catalog = self.context.catalog
            self._posts = pl.DataFrame(
                {
                    "article_id": catalog.article_ids,
                    "author_id": catalog.author_id[1:],
                    "published_at": catalog.published_us[1:],
                }
            ).select(
                pl.col("article_id").cast(pl.Int64),
                # The catalog marks an unknown author -1; no exclusion may match it.
                pl.when(pl.col("author_id") >= 0).then(pl.col("author_id")).alias("author_id"),
                pl.from_epoch("published_at", time_unit="us"),
            )
        return self._posts

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
        users = np.asarray(user_ids, dtype=np.int64)
        if users.size == 0 or k <= 0:
            return pl.DataFrame(schema=RETRIEVED_SCHEMA)
        now = naive_utc(now)
        after = None if published_after is None else naive_utc(published_after)
        # The protocol's window is (published_after, now]; spelled here rather than through
        # search_batch's inclusive published_after.
        where = f"published_at <= TIMESTAMP '{now.isoformat(sep=' ')}'"
        if after is not None:
            where += f" AND published_at > TIMESTAMP '{after.isoformat(sep=' ')}'"
        vectors = user_vectors_at(self.model, self.context, users, now)
        hits = search_batch(
            self.table,
            vectors,
            k,
            where=where,
            exclude=self.excluded(users, now, after, exclude, exclude_authors),
            read_rows=self.rows,
            read_lists=self.lists,
        )
        ids = pl.Series("user_id", users)
        return hits.select(
            ids.gather(hits["query_idx"].cast(pl.UInt32)).alias("user_id"),
            pl.col("article_id").cast(pl.Int64),
            pl.col("score").cast(pl.Float64).alias("retrieval_score"),
        )

    def rows(self, table: Any, where: str | None) -> tuple[np.ndarray, np.ndarray]:
        """(article ids, vectors) of the table's rows under `where`, read once per filter."""
        if where not in self._rows:
            self._rows.clear()
            self._rows[where] = read_vectors(table, where)
        return self._rows[where]

    def lists(self, table: Any, where: str | None) -> ListIndex:
        """The table's rows under `where` grouped into lists (vectors.lists), built once per
        filter; the lists hold the vectors, so the rows are not kept beside them."""
        if where not in self._lists:
            self._lists.clear()

            def build() -> ListIndex:
                index = ListIndex.build(*self.rows(table, where))
                self._rows.pop(where)
                return index

            if self.lists_dir is None:
                self._lists[where] = build()
            else:
                self._lists[where] = stored_lists(table, where, self.lists_dir, build)
        return self._lists[where]

    def excluded(
        self,
        users: np.ndarray,
        now: datetime,
        after: datetime | None,
        exclude: pl.DataFrame | None,
        exclude_authors: pl.DataFrame | None,
    ) -> pl.DataFrame | None:
        """(query_idx, article_id) of the excluded posts inside the window: the pairs, and
        every post of an excluded author. Posts outside the window cannot come back anyway,
        and leaving them out keeps the over-fetch small."""
        if (exclude is None or exclude.is_empty()) and (
            exclude_authors is None or exclude_authors.is_empty()
        ):
            return None
        window = self.posts().filter(published_between(after, now))
        queries = pl.DataFrame({"user_id": users, "query_idx": np.arange(len(users))})
        return (
            excluded_pairs(exclude, exclude_authors, window)
            .join(queries, on="user_id")
            .select("query_idx", "article_id")
            .unique()
        )


@dataclass
class RankerScorer:
    model: PhoenixRanker
    context: ServingContext
    name: str = "phoenix_ranker"
    # The candidate blocks compiled (models.compiled): set for runs that score many users.
    blocks: CompiledBlocks | None = None

    def compile(self) -> None:
        """Score with the model's candidate blocks compiled from now on."""
        if self.blocks is None:
            self.blocks = CompiledBlocks(self.model)

    def score(self, candidates: pl.DataFrame, context: Query) -> pl.DataFrame:
        return score_candidates(
            self.model, self.context, candidates, context.now, blocks=self.blocks
        )


def serving_context(
    tables: dict[str, pl.DataFrame],
    features: FeatureConfig,
    *,
    embeddings: Location | None = None,
    peers_dir: Path | None = None,
    warehouse: WarehouseExposures | None = None,
    candidate_posts: np.ndarray | None = None,
    users: np.ndarray | None = None,
    at: datetime | None = None,
    everyone: WarehouseEngagements | None = None,
) -> ServingContext:
    """The models' serving inputs from warehouse tables and the stored content vectors.

    `embeddings` (the article_embeddings file) and `peers_dir` (cached classic-peer scores)
    default to their places under the data root; the Dagster layer passes its storage's.
    With `warehouse`, the exposure counts come from the warehouse's impression log, so
    `tables` may hold just some users' impressions. With `users`, the engagement log holds
    only theirs, and with `at` everyone's counts are kept for that time (ServingContext.build);
    with `everyone` too, `tables["engagements"]` need hold only their rows."""
    articles = tables["articles"]
    peers_dir = peers_dir or data_root() / "models" / "serving_peers"
    shared = None
    if everyone is not None and users is not None and at is not None and "impressions" in tables:
        # A shard of a refresh: what every shard shares is built once (models.shared_inputs).
        shared = shared_inputs(
            features, everyone.path, at, peers_dir, embeddings or embeddings_path()
        )
    return ServingContext.build(
        articles,
        None if shared is not None else content_vectors(articles, embeddings),
        tables["engagements"],
        tables["follows"],
        tables["topic_follows"],
        features,
        peers_dir=peers_dir,
        impressions=tables.get("impressions"),
        warehouse=warehouse,
        candidate_posts=candidate_posts,
        users=users,
        at=at if users is not None else None,
        everyone=everyone,
        shared=shared,
    )


def feed_models(
    tables: dict[str, pl.DataFrame],
    store: ModelStore,
    vectors_uri: str,
    vectors_table: str,
    warn: Callable[[str], None],
    *,
    embeddings: Location | None = None,
    peers_dir: Path | None = None,
    warehouse: WarehouseExposures | None = None,
    candidate_posts: np.ndarray | None = None,
    users: np.ndarray | None = None,
    at: datetime | None = None,
    everyone: WarehouseEngagements | None = None,
) -> tuple[Retriever, Scorer, dict[str, str]]:
    """The promoted ranker and two-tower + LanceDB retrieval; the table-based fallbacks
    (and a warning through `warn`) while no model has been promoted or the vector table
    does not exist. With `users` (the only users scored) the models hold only their
    engagement rows besides what everyone shares, and with `at` too (the one time they
    score at) the context drops everyone else's engagement frame rows once the peers are
    fitted (ServingContext.for_users). With `everyone` (and both), `tables["engagements"]`
    holds the users' rows only and what everyone shares is read from the warehouse.

    A vector table that exists but cannot be read fails the run (VectorTableError, naming
    the table): quietly serving fallback feeds in place of the models' would be a quality
    drop no check downstream sees, whereas a missing table is the normal state before the
    first article_vectors run."""
    ranker_v, tower_v = store.promoted(RANKER), store.promoted(TWO_TOWER)
    table = None
    if ranker_v is not None and tower_v is not None:
        try:
            table = open_verified(vectors_uri, vectors_table)
        except FileNotFoundError as exc:
            warn(f"{exc}: rematerialise article_vectors")
    if ranker_v is None or tower_v is None or table is None:
        warn("no promoted models or vector table yet: using table fallbacks")
        if everyone is not None:
            # The fallbacks' popularity and base rates are every user's, over every post (a
            # shard reads its users' engagements and the posts its feeds can show only).
            whole = read_tables(everyone.path, ["articles"])
            tables = {**tables, "engagements": everyone.read(), "articles": whole["articles"]}
        return (
            PopularityRetriever.from_tables(tables),
            TopicAffinityScorer.from_tables(tables),
            {"model_version": "fallback", "vector_table_version": "none"},
        )
    ranker = load_ranker(*store.load(RANKER, ranker_v))
    tower = load_two_tower(*store.load(TWO_TOWER, tower_v))
    ctx = serving_context(
        tables,
        serving_features(ranker.cfg.features),
        embeddings=embeddings,
        peers_dir=peers_dir,
        warehouse=warehouse,
        candidate_posts=candidate_posts,
        users=users,
        at=at,
        everyone=everyone,
    )
    if users is not None and at is not None:
        ctx = ctx.for_users(users, at, peers=ranker.cfg.peer_features)
    return (
        TwoTowerRetriever(tower, ctx, table, lists_dir=peers_dir),
        RankerScorer(ranker, ctx),
        {
            "model_version": f"ranker:{ranker_v},two_tower:{tower_v}",
            "vector_table_version": str(table.version),
        },
    )


def stored_lists(
    table: Any, where: str | None, store: Path, build: Callable[[], ListIndex]
) -> ListIndex:
    """The lists of the table's rows under `where`, kept in `store`: made by `build` in the
    first process of a refresh that asks, mapped from the file by the others (the shards
    of a refresh search the same window; at 1M users building its lists took 13 s a
    shard). Named by the table's location, version and the version's time, so a rewritten
    or rebuilt table is never searched through an older table's lists."""
    version = int(table.version)
    stamp = next(
        (str(v["timestamp"]) for v in table.list_versions() if int(v["version"]) == version), ""
    )
    key = f"{table.uri}|{version}|{stamp}|{where}"
    name = hashlib.sha256(key.encode()).hexdigest()[:20]
    return load_or_make(store / f"lists-{name}.pkl", ListIndex, build, "lists-*.pkl", keep=2)


@dataclass(frozen=True)
class ModelLocations:
    """Where `feed_models` finds the served models and what they read at serving time:
    the model store, the LanceDB article-vector table, the stored article embeddings and
    the cached classic-peer scores."""

    store: ModelStore
    vectors_uri: str
    vectors_table: str
    embeddings: Location | None = None
    peers_dir: Path | None = None
    # The warehouse the exposure counts are read from (see serving_context).
    warehouse: Location | None = None

    def load(
        self,
        tables: dict[str, pl.DataFrame],
        warn: Callable[[str], None],
        users: np.ndarray | None = None,
        candidate_posts: np.ndarray | None = None,
        at: datetime | None = None,
        engagements_of_users: bool = False,
    ) -> tuple[Retriever, Scorer, dict[str, str]]:
        """`feed_models` over these stores: the promoted models or the table fallbacks.

        `users`: the users scored, when `tables` holds only their impressions
        (data.warehouse.read_tables(users=...)); the exposure counts then come from the
        warehouse's whole log. Without, from `tables`. `at`: the one time the
        models will score at (the shard's `now`, the evaluation's cut): the warehouse's
        exposure counts are then taken as of it (see ExposureLog.from_warehouse).
        `candidate_posts`: every article id the run can score (its candidate window),
        prepared once per fit of the classic peers (ServingContext.candidate_posts).
        `engagements_of_users`: `tables["engagements"]` holds the `users`' rows only too
        (read_tables(engagements_of_users=True)); what every user's engagements give is
        then read from the warehouse (models.warehouse_engagements)."""
        warehouse, everyone = None, None
        if users is not None and self.warehouse is not None:
            warehouse = WarehouseExposures(self.warehouse, users, at)
        if engagements_of_users:
            if users is None or at is None or self.warehouse is None:
                raise ValueError(
                    "engagements of some users only need the users, the time and the warehouse"
                )
            everyone = WarehouseEngagements(self.warehouse)
        return feed_models(
            tables,
            self.store,
            self.vectors_uri,
            self.vectors_table,
            warn,
            embeddings=self.embeddings,
            peers_dir=self.peers_dir,
            warehouse=warehouse,
            candidate_posts=candidate_posts,
            users=users,
            at=at,
            everyone=everyone,
        )

"""Serving-time entry points: user vectors and candidate scores for batches of users.

Build one `ServingContext` per feed run (catalog, engagement log, follow tables), then call
`user_vectors_at` / `score_candidates` once per user shard. Both use the exact feature code of
training, with everything strictly before `now`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl

from feed_dagster.artifacts import Location
from feed_dagster.data.schema import World
from feed_dagster.metrics.fit_store import fit_name, load_or_make, stored_fit_in_warehouse
from feed_dagster.models.catalog import FeatureConfig, ItemCatalog, to_micros
from feed_dagster.models.compiled import CompiledBlocks
from feed_dagster.models.engagement_log import EngagementLog, EveryonesPositives
from feed_dagster.models.exposures import ExposureLog, WarehouseExposures
from feed_dagster.models.layers import CatalogTensors
from feed_dagster.models.peers import PEER_METHODS, PeerFeatures
from feed_dagster.models.ranker import PhoenixRanker, predict
from feed_dagster.models.ranker_data import build_serving_data
from feed_dagster.models.retrieval_data import user_histories
from feed_dagster.models.shared_inputs import SharedInputs, count_times
from feed_dagster.models.two_tower import TwoTower, catalog_item_vectors, user_vectors
from feed_dagster.models.warehouse_engagements import WarehouseEngagements
from feed_dagster.sorted_search import unique


@dataclass(frozen=True)
class ServingContext:
    """The tables a feed run scores against, indexed once and shared by every shard."""

    catalog: ItemCatalog
    tensors: CatalogTensors
    log: EngagementLog
    engagements: pl.DataFrame
    follows: pl.DataFrame
    topic_follows: pl.DataFrame
    features: FeatureConfig
    # Where fitted peers are shared between processes (the shards of one refresh fit once;
    # the steps of a build share their classic-peer fits there too, metrics.fit_store).
    peers_dir: Path | None = None
    # Every post this run can score (its candidate window): a fresh fit computes their
    # item-kNN rows before it is shared, rather than each shard computing the same rows.
    candidate_posts: np.ndarray | None = None
    # The users whose engagement rows `engagements` and `log` hold (see for_users); None:
    # every user's.
    users: np.ndarray | None = None
    # Every user's engagements in the warehouse, when `engagements` holds some users' rows
    # only (a feed shard's, see build): the peers are named and fitted from there.
    everyone: WarehouseEngagements | None = None
    # The name of the classic peers' fit at a scoring time, when the shared inputs
    # (models.shared_inputs) hold it: naming it otherwise takes a pass over every engagement.
    peers_name: tuple[datetime, str] | None = None
    # Classic peers fitted at a scoring time, kept for the next batch scored at that time.
    _peers: dict[datetime, PeerFeatures] = field(default_factory=dict, repr=False)

    def peers_at(self, now: datetime) -> PeerFeatures:
        """Peer features fitted on the engagements strictly before `now`: from memory, from
        `peers_dir` when another process fitted them on the same engagements, else fitted."""
        if now in self._peers:
            return self._peers[now]
        if self.users is not None and self.everyone is None:
            raise ValueError(
                f"this context holds some users' engagements only: peers are fitted on "
                f"everyone's, at the times given to for_users, not at {now}"
            )
        if self.peers_dir is None:
            peers = self._fit_peers(now)
        else:
            # Named like the fit they come from (metrics.fit_store): what decides it, not the frame.
            if self.peers_name is not None and self.peers_name[0] == now:
                name = self.peers_name[1]
            elif self.everyone is not None:
                name = self.everyone.fit_name(now, PEER_METHODS)
            else:
                name = fit_name(self.engagements, now, PEER_METHODS)
            # One process fits, the others wait for its file: shards started together
            # would otherwise each spend minutes fitting the same peers (3 min at 100k
            # users). A refresh fits them before its shards (feeds.serving_inputs).
            peers = stored_serving_peers(self.peers_dir, name, lambda: self._fit_peers(now))
        if self.candidate_posts is not None:
            # Every post this run scores had its item-kNN rows prepared by the fit's
            # process (a fit saved before the transpose was dropped still holds it).
            peers.peers.drop_transpose()
        self._peers.clear()
        self._peers[now] = peers
        return peers

    def _fit_peers(self, now: datetime) -> PeerFeatures:
        # The fit itself may be another step's (feed_quality's is trained_models').
        if self.everyone is not None:
            return fit_serving_peers(self.everyone.path, now, self.peers_dir, self.candidate_posts)
        peers = PeerFeatures.fit(self.engagements, now, store=self.peers_dir)
        return _prepared(peers, self.candidate_posts)

    def for_users(self, users: np.ndarray, now: datetime, peers: bool = True) -> ServingContext:
        """This context for scoring `users` at `now` only: the engagement and follow frames
        cut to their rows, with the peers at `now` (when `peers`) fitted or loaded first,
        from everyone's engagements. The log must hold these users' rows (built with
        `users`); what every user shares (catalog, exposure and post counts, peers) stays
        whole. A feed shard holds its users' 1/16 of the engagements so, not all of them."""
        if self.log.users is None:
            raise ValueError("for_users needs a log built for some users (users=...)")
        self.log.require(unique(np.asarray(users, dtype=np.int64)))
        if peers:
            self.peers_at(now)
        mine = pl.DataFrame({"user_id": self.log.users})

        def own(frame: pl.DataFrame, column: str) -> pl.DataFrame:
            key = mine.select(pl.col("user_id").cast(frame[column].dtype).alias(column))
            return frame.join(key, on=column, how="semi")

        # A user's follow flags read the user's own follows only.
        return replace(
            self,
            engagements=own(self.engagements, "user_id"),
            follows=own(self.follows, "follower_id"),
            topic_follows=own(self.topic_follows, "user_id"),
            users=self.log.users,
            _peers=dict(self._peers),
        )

    @classmethod
    def build(
        cls,
        articles: pl.DataFrame,
        content_vectors: np.ndarray | None,
        engagements: pl.DataFrame,
        follows: pl.DataFrame,
        topic_follows: pl.DataFrame,
        features: FeatureConfig | None = None,
        peers_dir: Path | None = None,
        impressions: pl.DataFrame | None = None,
        warehouse: WarehouseExposures | None = None,
        candidate_posts: np.ndarray | None = None,
        users: np.ndarray | None = None,
        at: datetime | None = None,
        everyone: WarehouseEngagements | None = None,
        shared: SharedInputs | None = None,
    ) -> ServingContext:
        """`content_vectors[i]` belongs to `articles` row i (None with `shared`); `features` must be
        the models' (their config's `features`), since hashed buckets depend on it.
        `impressions` (the logged ones, when the source has them) give the ranker its
        exposure counts; with `warehouse`, they come from the warehouse's impression log
        instead (when the frame holds only some users' rows). `candidate_posts`: the article
        ids the run can score (see the field). `users`: the log holds only their rows (see
        for_users); with `at` too, the one time they are scored at, everyone's engagement
        counts per post and author are kept for it only. With `everyone` (and `users` and
        `at`), `engagements` need hold only the users' rows: what every user shares is
        counted in the warehouse. With `shared` too (built for `at` from the same warehouse,
        models.shared_inputs), what every user shares is taken from it, and the users'
        exposure counts from `impressions` (which must hold every impression of theirs): the
        same context without a pass over the warehouse."""
        features = features or FeatureConfig()
        times = _count_times(at)
        if everyone is not None and (users is None or at is None):
            raise ValueError("everyone's engagements serve some users at one time only")
        peers_name = None
        if shared is not None:
            if users is None or at is None or everyone is None or impressions is None:
                raise ValueError(
                    "shared inputs serve some users at one time, with their impressions and "
                    "everyone's engagements in the warehouse"
                )
            if shared.at_us != to_micros(at):
                raise ValueError(f"shared inputs built for {shared.at_us} us, not for {at}")
            catalog, positives = shared.catalog, shared.everyone
            exposures = ExposureLog.for_users_at(impressions, catalog, users, at, shared.exposures)
            peers_name = (at, shared.peers_name)
        else:
            if content_vectors is None:
                raise ValueError("content vectors are needed unless shared inputs are given")
            counts = everyone.post_counts(times) if everyone is not None else None
            catalog = ItemCatalog.build(
                articles,
                content_vectors,
                features,
                engagements if counts is None else None,
                firsts=None if counts is None else counts.firsts,
            )
            positives = None
            if counts is not None:
                positives = EveryonesPositives.from_counts(counts.positives, catalog)
            exposures = warehouse.load(catalog) if warehouse is not None else impressions
        return cls(
            catalog=catalog,
            tensors=CatalogTensors(catalog),
            log=EngagementLog.build(
                engagements, catalog, exposures, users=users, times_us=times, everyone=positives
            ),
            engagements=engagements,
            follows=follows,
            topic_follows=topic_follows,
            features=features,
            peers_dir=peers_dir,
            candidate_posts=candidate_posts,
            everyone=everyone,
            peers_name=peers_name,
        )

    @classmethod
    def from_world(
        cls, world: World, content_vectors: np.ndarray, features: FeatureConfig | None = None
    ) -> ServingContext:
        return cls.build(
            world.articles,
            content_vectors,
            world.engagements,
            world.follows,
            world.topic_follows,
            features,
            impressions=world.impressions,
        )


def stored_serving_peers(store: Path, name: str, fit: Callable[[], PeerFeatures]) -> PeerFeatures:
    """The serving peers of the classic fit named `name`, kept in `store` (the few newest: a
    refresh needs one); made by `fit` and stored when absent, one process at a time."""
    return load_or_make(store / f"peers-{name}.pkl", PeerFeatures, fit, "peers-*.pkl", keep=4)


def fit_serving_peers(
    warehouse: Location, at: datetime, store: Path | None, candidate_posts: np.ndarray | None
) -> PeerFeatures:
    """Peer features at `at` from every engagement in `warehouse` (the classic fit stored in
    `store`), with the item-kNN rows of `candidate_posts` (the posts a refresh can score)
    computed, so the processes that load them only score."""
    peers = PeerFeatures.of(stored_fit_in_warehouse(warehouse, at, store, PEER_METHODS))
    return _prepared(peers, candidate_posts)


def _prepared(peers: PeerFeatures, candidate_posts: np.ndarray | None) -> PeerFeatures:
    if candidate_posts is not None:
        peers.prepare(candidate_posts)
    return peers


def _count_times(at: datetime | None) -> tuple[int, ...]:
    """The times a ranker scoring at `at` asks everyone's engagement counts at."""
    return () if at is None else count_times(at)


def user_vectors_at(
    model: TwoTower, ctx: ServingContext, user_ids: np.ndarray, now: datetime
) -> np.ndarray:
    """float32 [len(user_ids), dim] unit user vectors from each user's history before `now`.

    Users with no history (new users) get the model's "no history yet" vector.
    """
    hist = user_histories(user_ids, now, ctx.engagements, ctx.catalog, ctx.features, ctx.log)
    return user_vectors(model, hist, ctx.tensors)


def item_vectors_of(model: TwoTower, source: ServingContext | ItemCatalog) -> pl.DataFrame:
    """(article_id, vector) of every article of a context's or a catalog's, for the vector
    index."""
    if isinstance(source, ServingContext):
        catalog, tensors = source.catalog, source.tensors
    else:
        catalog, tensors = source, CatalogTensors(source)
    vecs = catalog_item_vectors(model, tensors)[1:]
    return pl.DataFrame(
        {"article_id": catalog.article_ids, "vector": vecs},
        schema={"article_id": pl.Int64, "vector": pl.Array(pl.Float32, vecs.shape[1])},
    )


def score_candidates(
    model: PhoenixRanker,
    ctx: ServingContext,
    candidates: pl.DataFrame,
    now: datetime,
    batch_size: int | None = None,
    blocks: CompiledBlocks | None = None,
) -> pl.DataFrame:
    """Ranker predictions for (user_id, article_id) candidate rows scored at `now`
    (`blocks`: the model's candidate blocks compiled, see models.compiled).

    Returns user_id, article_id, p_<action> for each head of the model and dwell_seconds,
    one row per input row, in input order. A candidate's scores do not depend on the other
    candidates (candidate isolation), so any sharding of users and candidates gives the same
    numbers.
    """
    keyed = candidates.select(
        pl.col("user_id").cast(pl.Int64), pl.col("article_id").cast(pl.Int64)
    ).with_row_index("_row")
    # Group each user's candidates together (any order works; a user's rows stay in order).
    ordered = keyed.sort("user_id", "_row")
    data = build_serving_data(
        ordered.select("user_id", "article_id"),
        now,
        ctx.engagements,
        ctx.follows,
        ctx.topic_follows,
        ctx.catalog,
        ctx.features,
        log=ctx.log,
        peers=ctx.peers_at(now) if model.cfg.peer_features else None,
    )
    probs, dwell = predict(model, data, ctx.tensors, batch_size, blocks)
    m = data.cand_mask
    # Groups come out sorted by (user, position) = the order of `ordered`.
    out = ordered.with_columns(
        *[pl.Series(f"p_{a}", probs[..., i][m]) for i, a in enumerate(model.cfg.actions)],
        pl.Series("dwell_seconds", dwell[m]),
    )
    return out.sort("_row").drop("_row")

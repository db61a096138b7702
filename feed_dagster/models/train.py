"""Deterministic training of the two-tower retrieval model and the ranker.

Same data + same configs give bit-identical weights: fixed seeds, a fixed thread count, and a
data order drawn from a seeded numpy generator. Each trainer returns the best weights (by
the validation metric), the per-epoch history, wall time and parameter count.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from feed_dagster.artifacts import Location
from feed_dagster.data.schema import ACTIONS, World
from feed_dagster.memory import peak_rss_mib, small_heap
from feed_dagster.metrics.classic import ClassicPeers
from feed_dagster.metrics.fit_store import stored_fit_named
from feed_dagster.metrics.ranking import evaluate_scores
from feed_dagster.models.budget import TrainingBudget
from feed_dagster.models.catalog import FeatureConfig, ItemCatalog, _micros, to_micros
from feed_dagster.models.engagement_log import EngagementLog
from feed_dagster.models.exposures import ExposureLog, ExposurePoints
from feed_dagster.models.layers import CatalogTensors
from feed_dagster.models.peers import PeerFeatures, RollingPeersOnDemand
from feed_dagster.models.ranker import (
    PhoenixRanker,
    RankerConfig,
    ranker_batch,
    ranker_loss,
    score_frame,
    start_at_base_rates,
)
from feed_dagster.models.ranker_data import (
    POST_RECENT_US,
    PeerScores,
    RankerData,
    build_ranker_data,
    sampled_slates,
)
from feed_dagster.models.retrieval_data import (
    RetrievalExamples,
    Split,
    build_retrieval_examples,
    temporal_split,
)
from feed_dagster.models.two_tower import (
    TwoTower,
    TwoTowerConfig,
    catalog_item_vectors,
    in_batch_loss,
    item_log_q,
    retrieval_recall,
    user_vectors,
)
from feed_dagster.models.warehouse_engagements import WarehouseEngagements
from feed_dagster.processes import die_with_parent


@dataclass(frozen=True)
class TrainConfig:
    # Sized for the demo world (about 45k training slates): validation AUC levels off after
    # two or three epochs, and three epochs of both models fit well inside five minutes.
    # On the demo world validation AUC peaked in the second epoch in 7 of 9 runs measured
    # (in the first in the other two).
    epochs: int = 2
    # Small worlds get more epochs, up to max_epochs, until this many optimiser steps: a
    # catalog of a few thousand slates learns nothing in two passes of a dozen steps.
    min_steps: int = 350
    max_epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    # Stop after this many epochs without a better validation metric.
    patience: int = 2
    seed: int = 0
    # One intra-op thread by default: these models are small, and on a shared 2-core box a
    # second thread spin-waits on busy cores (measured: a ranker step went from 0.14 s with
    # one thread to 2 s with two while other jobs ran).
    threads: int = 1
    grad_clip: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]  # the model config (JSON-able), enough to rebuild the model
    history: list[dict[str, float]]  # per epoch: epoch, train_loss, valid metric(s), seconds
    seconds: float
    n_params: int
    best_epoch: int
    metric: str  # name of the validation metric that chose best_epoch (higher is better)
    train_config: dict[str, Any] = field(default_factory=dict)
    # Peak RSS of the process it trained in, when that process trained nothing else.
    process_peak_rss_mib: float | None = None

    def summary(self) -> dict[str, float]:
        best = self.history[self.best_epoch - 1] if self.history else {}
        return {
            "train_seconds": round(self.seconds, 2),
            "n_params": self.n_params,
            "best_epoch": self.best_epoch,
            "epochs_run": len(self.history),
            f"valid_{self.metric}": best.get(self.metric, float("nan")),
        }


@dataclass(frozen=True)
class TrainingMix:
    """What the ranker learns from: logged slates, and groups built from engagements (one
    positive plus sampled negatives, see `ranker_data.sampled_slates`)."""

    logged_slates: bool = True
    # Sampled groups per logged training slate (0 = logged slates only). Measured
    # (bench/bench_models.py, bench/bench_feeds.py): one sampled group per slate left
    # held-out AUC unchanged on the demo and catalog worlds and cut the demo feeds'
    # recall@35 from 0.170 to 0.117 (out-of-network factor 0.75), so the default is 0
    # wherever a source logs slates; engagement history still reaches the ranker through its
    # history tokens, profile counts and the classic peers' scores.
    sampled_per_logged: float = 0.0
    negatives: int = 7
    popularity_alpha: float = 0.75
    # Cap on sampled groups, so training time follows a budget, not the size of the world.
    max_sampled: int = 60_000
    # Classic peers' scores as ranker inputs (see models.peers), fitted at this many cuts
    # spread from `peer_cut` to the end of the training period.
    peer_features: bool = True
    peer_fits: int = 3
    # Share of the training positives the first fit must see.
    peer_start_quantile: float = 0.5

    def n_sampled(self, n_logged: int, n_positives: int) -> int:
        """Sampled groups to build; a source without logged slates learns from its
        engagements alone (one group per positive, up to the cap)."""
        if n_logged == 0:
            return int(min(self.max_sampled, n_positives))
        return int(min(self.max_sampled, self.sampled_per_logged * n_logged, n_positives))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ClassicScores:
    """The classic peers' scores of some candidates (user_id, article_id rows), by method,
    from a fit at `cut`."""

    cut: datetime
    scores: dict[str, np.ndarray]

    @classmethod
    def of(cls, peers: ClassicPeers, rows: pl.DataFrame) -> ClassicScores:
        users, articles = rows["user_id"].to_numpy(), rows["article_id"].to_numpy()
        return cls(peers.cut, {m: peers.score(m, users, articles) for m in peers.methods})


@dataclass(frozen=True)
class TrainingData:
    """Everything both trainers and the evaluation read, built once from a world."""

    catalog: ItemCatalog
    log: EngagementLog
    split: Split
    ranker_train: RankerData
    ranker_valid: RankerData
    ranker_heldout: RankerData
    retrieval_train: RetrievalExamples
    retrieval_valid: RetrievalExamples
    retrieval_heldout: RetrievalExamples
    actions: tuple[str, ...]  # actions the source logs (each gets a ranker head)
    features: FeatureConfig
    dropped_rows: int  # impression rows whose post was published after it was shown
    # End of the training data (the validation start): ids first seen later were not trained.
    id_cutoff_us: int = 0
    mix: TrainingMix = field(default_factory=TrainingMix)
    logged_groups: int = 0  # training groups from logged slates (the rest are sampled)
    heldout_classic: ClassicScores | None = None  # the peers' scores, fitted at the held-out start
    # The warehouse holding every user's engagements, when the world's hold only the
    # sampled users' own rows (models.budget): the classic peers are fitted there.
    everyone: Location | None = None

    def peer_rows(self, world: World) -> tuple[pl.DataFrame | None, Location | None]:
        """(engagements, warehouse) the classic peers are fitted on: world.engagements, or
        every engagement in `everyone` when the world holds only the sampled users'."""
        if self.everyone is None:
            return world.engagements, None
        return None, self.everyone


def source_actions(engagements: pl.DataFrame) -> tuple[str, ...]:
    """Actions that occur at least once: a source without an action gets no head for it."""
    if engagements.height == 0:
        return ("click",)
    any_true = engagements.select(pl.col(a).fill_null(False).any() for a in ACTIONS).row(0)
    present = tuple(a for a, hit in zip(ACTIONS, any_true, strict=True) if hit)
    return present or ("click",)


def drop_impossible_rows(impressions: pl.DataFrame, articles: pl.DataFrame) -> pl.DataFrame:
    """Impression rows whose post was published after the impression cannot be real (a
    source error); they would teach the model that "negative age" exists."""
    pub = articles.select("article_id", "published_at")
    return (
        impressions.join(pub, on="article_id", how="left", maintain_order="left")
        .filter(pl.col("published_at").is_null() | (pl.col("published_at") <= pl.col("shown_at")))
        .drop("published_at")
    )


def prepare_training_data(
    world: World,
    content_vectors: np.ndarray,
    features: FeatureConfig | None = None,
    valid_fraction: float = 0.1,
    mix: TrainingMix | None = None,
    budget: TrainingBudget | None = None,
    valid_start: datetime | None = None,
    warehouse: Location | None = None,
    users_only: bool = False,
) -> TrainingData:
    """Temporal split + model inputs of a world; `content_vectors` aligned with world.articles.

    `budget` caps the two-tower's training positives; `valid_start` (from the budget's
    sample, see models.budget) fixes where validation begins. With `warehouse`, the exposure
    counts come from every impression in its `impressions` table (world.impressions is then
    only the budget's sample of them). With `users_only` too, world.engagements (and
    follows) hold only the sampled impressions' users' rows, and what every user's rows
    decide comes from the warehouse: each post's first engagement, everyone's positives
    per post and author at the slates' times, and the classic peers' fits."""
    base = prepare_retrieval_data(
        world,
        content_vectors,
        features,
        valid_fraction,
        budget,
        valid_start,
        warehouse,
        mix,
        users_only,
    )
    return add_ranker_data(base, world, mix)


def prepare_retrieval_data(
    world: World,
    content_vectors: np.ndarray,
    features: FeatureConfig | None = None,
    valid_fraction: float = 0.1,
    budget: TrainingBudget | None = None,
    valid_start: datetime | None = None,
    warehouse: Location | None = None,
    mix: TrainingMix | None = None,
    users_only: bool = False,
) -> TrainingData:
    """The temporal split and the two-tower's examples; the ranker's groups are left empty
    (`add_ranker_data` fills them, with `mix`), so the two-tower can start training before
    they exist. `users_only`: as prepare_training_data."""
    features = features or FeatureConfig()
    mix = mix or TrainingMix()
    impressions = drop_impossible_rows(world.impressions, world.articles)
    split = temporal_split(impressions, valid_fraction, valid_start)
    if users_only and (warehouse is None or _samples_groups(mix, split)):
        raise ValueError(
            "training on the sampled users' rows needs the warehouse and logged slates only "
            "(groups sampled from engagements would ask everyone's counts at unknown times)"
        )
    # Retrieval positives follow the same time cut as the impressions.
    valid_start, heldout_start = _period_starts(split, world.now)
    everyone = WarehouseEngagements(warehouse) if users_only else None
    catalog = ItemCatalog.build(
        world.articles,
        content_vectors,
        features,
        None if everyone else world.engagements,
        heldout_start,
        firsts=everyone.post_counts(()).firsts if everyone else None,
    )
    positives = log_users = None
    if warehouse is None:
        exposures = ExposureLog.build(world.impressions, catalog)
    else:
        # world.impressions is the budget's sample: per-user counts are needed for its
        # users only (at 1M users, a few percent of the log's), the global ones for all.
        sampled = world.impressions["user_id"].unique().to_numpy()
        # When every ranker group is a logged slate, the counts are read at the sampled
        # rows only: kept there, they take megabytes instead of one key per impression.
        points = None
        if not _samples_groups(mix, split):
            points = exposure_points(impressions, catalog)
        exposures = ExposureLog.from_warehouse(
            warehouse, catalog, sampled if len(sampled) else None, points=points
        )
        if everyone is not None and points is not None:
            # The ranker reads each post's positives at its slate's time and
            # POST_RECENT_US before it (ranker_data.engagement_profile).
            positives = everyone.positives_at(
                catalog,
                np.concatenate([points.item, points.item]),
                np.concatenate([points.time_us, points.time_us - POST_RECENT_US]),
            )
            # The log then holds (and refuses to answer for any but) the sampled users,
            # whose rows world.engagements holds.
            log_users = sampled
    log = EngagementLog.build(
        world.engagements, catalog, exposures, users=log_users, everyone=positives
    )

    def retrieval(
        start: datetime | None, end: datetime | None, cap: int | None = None
    ) -> RetrievalExamples:
        seed = budget.seed if budget is not None else 0
        return build_retrieval_examples(
            world.engagements, catalog, features, start, end, log=log, max_examples=cap, seed=seed
        )

    eval_cap = budget.retrieval_eval_positives if budget is not None else None
    empty = build_ranker_data(
        split.train.clear(),
        world.engagements,
        world.follows,
        world.topic_follows,
        catalog,
        features,
        log=log,
    )
    return TrainingData(
        catalog=catalog,
        log=log,
        split=split,
        ranker_train=empty,
        ranker_valid=empty,
        ranker_heldout=empty,
        retrieval_train=retrieval(
            None, valid_start, budget.retrieval_positives if budget is not None else None
        ),
        retrieval_valid=retrieval(valid_start, heldout_start, eval_cap),
        retrieval_heldout=retrieval(heldout_start, None, eval_cap),
        actions=source_actions(world.engagements),
        features=features,
        dropped_rows=world.impressions.height - impressions.height,
        id_cutoff_us=to_micros(valid_start),
        mix=mix,
        everyone=warehouse if users_only else None,
    )


def _samples_groups(mix: TrainingMix, split: Split) -> bool:
    """Whether `add_ranker_data` may add groups sampled from engagements (their times are
    engagement times, not known before they are drawn)."""
    return mix.sampled_per_logged > 0 or not mix.logged_slates or split.train.height == 0


def exposure_points(impressions: pl.DataFrame, catalog: ItemCatalog) -> ExposurePoints:
    """Where the ranker's groups read exposure counts: each impression row at its
    impression's time (a group reads all its rows at the time of its first; every shown_at
    of the impression is kept, should its rows disagree)."""
    times = (
        impressions.group_by("impression_id").agg(pl.col("shown_at").unique()).explode("shown_at")
    )
    rows = impressions.select("impression_id", "user_id", "article_id").join(
        times, on="impression_id"
    )
    return ExposurePoints(
        user=rows["user_id"].to_numpy().astype(np.int64),
        item=catalog.rows(rows["article_id"].to_numpy(), "impressions.article_id"),
        time_us=_micros(rows["shown_at"]),
    )


def _period_starts(split: Split, now: datetime) -> tuple[datetime, datetime]:
    """(validation start, held-out start); an empty period starts where the next one does."""
    valid_start = split.valid["shown_at"].min() if split.valid.height else None
    heldout_start = split.heldout["shown_at"].min() if split.heldout.height else now
    return valid_start or heldout_start, heldout_start


def add_ranker_data(
    base: TrainingData,
    world: World,
    mix: TrainingMix | None = None,
    peer_fits: Path | None = None,
) -> TrainingData:
    """`base` (from prepare_retrieval_data) with the ranker's training, validation and
    held-out groups, and the classic peers they read; `mix` defaults to the one `base` was
    prepared for. The peers at the held-out start go through the fit store `peer_fits`
    (metrics.fit_store), where impressions_evaluation left the same fit."""
    mix = mix or base.mix
    catalog, log, split, features = base.catalog, base.log, base.split, base.features
    valid_start, heldout_start = _period_starts(split, world.now)
    train_peers = None
    if mix.peer_features:
        first = peer_cut(log, split, valid_start, mix.peer_start_quantile)
        step = (valid_start - first) / max(1, mix.peer_fits)
        cuts = [first + step * i for i in range(max(1, mix.peer_fits))]
        engagements, everyone = base.peer_rows(world)
        train_peers = RollingPeersOnDemand(engagements, cuts, warehouse=everyone)

    def ranker(imp: pl.DataFrame, peers: PeerScores | None) -> RankerData:
        return build_ranker_data(
            imp,
            world.engagements,
            world.follows,
            world.topic_follows,
            catalog,
            features,
            log=log,
            peers=peers,
        )

    logged = ranker(split.train if mix.logged_slates else split.train.clear(), train_peers)
    n_positives = int((log.positive() & (log.time_us < to_micros(valid_start))).sum())
    n_sampled = mix.n_sampled(len(logged), n_positives)
    train_groups = logged
    if n_sampled > 0:
        imp, labels = sampled_slates(
            log,
            catalog,
            None,
            valid_start,
            n_sampled,
            mix.negatives,
            mix.popularity_alpha,
            world.candidate_window,
        )
        sampled = build_ranker_data(
            imp,
            labels,
            world.follows,
            world.topic_follows,
            catalog,
            features,
            log,
            logged=False,
            peers=train_peers,
        )
        train_groups = RankerData.concat([logged, sampled]) if len(logged) else sampled

    valid_groups = ranker(split.valid, train_peers)
    # The classic peers at the held-out start (evaluated as methods of their own, and the
    # ranker's peer inputs on held-out impressions), fitted once the training-time fits are
    # gone: the two are never held at once.
    train_peers = None
    # At the world's held-out start, which precedes every held-out impression, so that the
    # fit is the one impressions_evaluation and feed_quality make at that time too.
    heldout_cut = min(heldout_start, world.heldout_start)
    engagements, everyone = base.peer_rows(world)
    heldout_classic, _ = stored_fit_named(
        heldout_cut, peer_fits, engagements=engagements, warehouse=everyone
    )
    heldout_peers = PeerFeatures.of(heldout_classic) if mix.peer_features else None
    heldout_groups = ranker(split.heldout, heldout_peers)
    # The evaluation reports the peers' own scores of the held-out candidates: kept instead
    # of the fit, which would otherwise sit beside the training and the two-tower's process
    # (4 to 5 GiB at 1M users, the largest part of the step's peak there).
    return replace(
        base,
        ranker_train=train_groups,
        ranker_valid=valid_groups,
        ranker_heldout=heldout_groups,
        mix=mix,
        logged_groups=len(logged),
        heldout_classic=ClassicScores.of(heldout_classic, heldout_groups.rows()),
    )


def peer_cut(
    log: EngagementLog, split: Split, valid_start: datetime, quantile: float = 0.5
) -> datetime:
    """Where the first training-time peers are fitted: the first training impression, or
    later when that leaves less than `quantile` of the training positives to fit on. Slates
    at or after the cut learn how far to trust the peers on clicks the peers never saw."""
    end = to_micros(valid_start)
    times = np.sort(log.time_us[log.positive() & (log.time_us < end)])
    median = int(times[int(len(times) * quantile)]) if len(times) else end
    first = to_micros(split.train["shown_at"].min()) if split.train.height else end
    return _from_micros(max(first, median))


def _from_micros(us: int) -> datetime:
    return pl.Series([us]).cast(pl.Datetime("us"))[0]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with n intra-op threads, restoring the caller's setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _fit(
    model: torch.nn.Module,
    n_examples: int,
    step_loss: Callable[[np.ndarray], torch.Tensor],
    validate: Callable[[], dict[str, float]],
    metric: str,
    cfg: TrainConfig,
    config: dict[str, Any],
) -> TrainResult:
    t0 = time.perf_counter()
    # Hashed-id tables are large and a batch touches few of their rows: they take sparse
    # gradients and SparseAdam, so a step costs what the batch uses, not the table size.
    sparse = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse]
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    opts: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(dense, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ]
    if sparse:
        opts.append(torch.optim.SparseAdam(sparse, lr=cfg.lr))
    per_epoch = max(1, -(-n_examples // cfg.batch_size))
    epochs = max(cfg.epochs, min(cfg.max_epochs, -(-cfg.min_steps // per_epoch)))
    n_steps = epochs * per_epoch
    # Linear warm-up over the first 5% of steps, then cosine decay to 10% of the peak: fixed
    # by the config, so it is reproducible and needs no tuning per world size.
    warmup = max(1, n_steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = min(1.0, (step - warmup) / max(1, n_steps - warmup))
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * done))

    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_factor) for o in opts]
    rng = np.random.default_rng(cfg.seed)
    history: list[dict[str, float]] = []
    best_value, best_epoch, best_state, stale = -np.inf, 0, None, 0
    for epoch in range(1, epochs + 1):
        te = time.perf_counter()
        model.train()
        order = rng.permutation(n_examples)
        total, batches = 0.0, 0
        for s in range(0, n_examples, cfg.batch_size):
            loss = step_loss(order[s : s + cfg.batch_size])
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(dense, cfg.grad_clip)
            for o, sch in zip(opts, scheds, strict=True):
                o.step()
                sch.step()
            total += float(loss.detach())
            batches += 1
        model.eval()
        row = {"epoch": epoch, "train_loss": total / max(batches, 1), **validate()}
        row["seconds"] = time.perf_counter() - te
        history.append(row)
        value = row.get(metric, float("nan"))
        # Without a validation metric (no validation period) the last epoch is kept.
        no_metric = not np.isfinite(value) and not np.isfinite(best_value)
        if best_state is None or no_metric or (np.isfinite(value) and value > best_value):
            best_value, best_epoch, stale = value, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    assert best_state is not None
    return TrainResult(
        state_dict=best_state,
        config=config,
        history=history,
        seconds=time.perf_counter() - t0,
        n_params=n_parameters(model),
        best_epoch=best_epoch,
        metric=metric,
        train_config=cfg.to_dict(),
    )


def ranker_validation(
    model: PhoenixRanker, data: RankerData, cat: CatalogTensors
) -> dict[str, float]:
    """Mean per-impression click AUC (and nDCG@10) of the ranker's click probability."""
    if len(data) == 0 or "click" not in model.cfg.actions:
        return {}
    frame = score_frame(model, data, cat).with_columns(pl.col("click").cast(pl.Int8).alias("label"))
    m = evaluate_scores(frame, "p_click")
    return {"valid_auc": float(m["auc"]), "valid_ndcg@10": float(m["ndcg@10"])}


def train_ranker(
    data: TrainingData,
    cfg: RankerConfig | None = None,
    train: TrainConfig | None = None,
) -> TrainResult:
    """Fit the ranker on data.ranker_train; the best epoch by validation click AUC wins."""
    train = train or TrainConfig()
    cfg = cfg or RankerConfig(
        content_dim=data.catalog.dim,
        actions=data.actions,
        features=data.features,
        id_cutoff_us=data.id_cutoff_us,
    )
    with torch_threads(train.threads):
        torch.manual_seed(train.seed)
        model = PhoenixRanker(cfg)
        start_at_base_rates(model, data.ranker_train)
        cat = CatalogTensors(data.catalog)
        return _fit(
            model,
            len(data.ranker_train),
            lambda idx: ranker_loss(model, ranker_batch(data.ranker_train, idx), cat),
            lambda: ranker_validation(model, data.ranker_valid, cat),
            "valid_auc",
            train,
            cfg.to_dict(),
        )


VALID_QUERIES = 4000
# Two passes over every positive engagement: on the demo world validation recall peaked in
# the second of three passes in both runs measured.
TWO_TOWER_TRAIN = TrainConfig(epochs=2, min_steps=0, batch_size=1024, lr=3e-3)


def train_two_tower(
    data: TrainingData,
    cfg: TwoTowerConfig | None = None,
    train: TrainConfig | None = None,
    recent_hours: float | None = 48.0,
) -> TrainResult:
    """Fit the two-tower model; the best epoch by validation recall@100 wins."""
    train = train or TWO_TOWER_TRAIN
    cfg = cfg or TwoTowerConfig(
        content_dim=data.catalog.dim, features=data.features, id_cutoff_us=data.id_cutoff_us
    )
    ex = data.retrieval_train
    with torch_threads(train.threads):
        torch.manual_seed(train.seed)
        model = TwoTower(cfg)
        cat = CatalogTensors(data.catalog)
        log_q = item_log_q(ex.item, len(data.catalog) + 1)

        # Validation recall on an evenly spread, fixed subset: each query scores the whole
        # catalog, and a few thousand queries pin recall@100 down to about +-0.01.
        valid = data.retrieval_valid
        if len(valid) > VALID_QUERIES:
            valid = valid.take(np.linspace(0, len(valid) - 1, VALID_QUERIES).astype(np.int64))

        def validate() -> dict[str, float]:
            if len(valid) == 0:
                return {}
            r = two_tower_recall(model, valid, data.catalog, cat, recent_hours)
            return {"valid_recall@100": r["recall@100"], "valid_recall@1000": r["recall@1000"]}

        return _fit(
            model,
            len(ex),
            lambda idx: in_batch_loss(model, ex, idx, cat, log_q),
            validate,
            "valid_recall@100",
            train,
            cfg.to_dict(),
        )


def two_tower_recall(
    model: TwoTower,
    examples: RetrievalExamples,
    catalog: ItemCatalog,
    cat: CatalogTensors | None = None,
    recent_hours: float | None = 48.0,
    ks: tuple[int, ...] = (100, 1000),
) -> dict[str, float]:
    """recall@k of `examples` (positives) by exact top-k over the catalog's recent items."""
    cat = cat or CatalogTensors(catalog)
    return retrieval_recall(
        user_vectors(model, examples.history, cat),
        examples.item,
        examples.time_us,
        # The rows the queries' windows hold, not the catalog: a 48 h window at 10M posts
        # is about 1.4M of them.
        lambda rows: catalog_item_vectors(model, cat, rows=rows),
        catalog.published_us,
        ks=ks,
        recent_hours=recent_hours,
    )


def _two_tower_job(data: TrainingData) -> TrainResult:
    result = train_two_tower(data)
    # This process only unpickled the data and trained: its high-water mark is the
    # two-tower's own (the parent cannot measure it, see feed_dagster.memory).
    return replace(result, process_peak_rss_mib=round(peak_rss_mib(), 1))


# Work for the ranker's process once the ranker is trained, while the two-tower may still
# train in its own (e.g. the held-out evaluation of the rankers).
AfterRanker = Callable[[TrainingData, TrainResult], None]


def train_both(
    data: TrainingData, parallel: bool = True, while_two_tower: AfterRanker | None = None
) -> tuple[TrainResult, TrainResult]:
    """(two-tower, ranker) trained with their default configs. With `parallel`, the
    two-tower trains in a second process while the ranker trains here: each trainer uses one
    core, so on two cores both finish in about the time of the slower one. The weights are
    the same either way (fixed seeds, one thread each). `while_two_tower(data, ranker)` runs
    here as soon as the ranker is trained."""
    if not parallel:
        tower, ranker = train_two_tower(data), train_ranker(data)
        _after_ranker(while_two_tower, data, ranker)
        return tower, ranker
    with _two_tower_in_background(data) as pending:
        ranker = train_ranker(data)
        _after_ranker(while_two_tower, data, ranker)
        return pending.result(), ranker


def _after_ranker(work: AfterRanker | None, data: TrainingData, ranker: TrainResult) -> None:
    if work is not None:
        # One torch thread, as the trainers: in the parallel paths the other core is the
        # two-tower's.
        with torch_threads(1):
            work(data, ranker)


def prepare_and_train(
    world: World,
    content_vectors: np.ndarray,
    features: FeatureConfig | None = None,
    mix: TrainingMix | None = None,
    budget: TrainingBudget | None = None,
    valid_start: datetime | None = None,
    warehouse: Location | None = None,
    peer_fits: Path | None = None,
    while_two_tower: AfterRanker | None = None,
    users_only: bool = False,
) -> tuple[TrainingData, TrainResult, TrainResult]:
    """prepare_training_data + train_both, overlapped: the two-tower starts training in a
    second process as soon as its examples exist, while this process fits the classic peers
    and builds the ranker's groups. Same data and weights as the two calls in sequence.

    Past the budget's `overlap_max_engagements`, the two-tower starts once the groups are
    built (beside the ranker's training, as train_both), so the two processes' peaks do not
    add up, and so for `users_only` worlds (prepare_training_data): they are past the
    budget's `whole_max_engagements`. `peer_fits`: the fit store of the held-out classic
    peers (add_ranker_data).
    `while_two_tower(data, ranker)` runs in this process once the ranker is trained, on the
    core the two-tower's process does not use: at 100k users the ranker trains in about
    half the two-tower's time."""
    valid_fraction = budget.valid_fraction if budget is not None else 0.1
    # The preparation is numpy and scipy work on large arrays, whose freed memory would
    # otherwise stay in this process beside the training (see small_heap).
    with small_heap():
        base = prepare_retrieval_data(
            world,
            content_vectors,
            features,
            valid_fraction,
            budget,
            valid_start,
            warehouse,
            mix,
            users_only,
        )
    # The catalog holds its own copy of the vectors (256 MiB at a million posts).
    del content_vectors
    limit = budget.overlap_max_engagements if budget is not None else None
    if users_only or (limit is not None and world.engagements.height > limit):
        data = _ranker_groups(base, world, mix, peer_fits)
        del base
        return data, *train_both(data, while_two_tower=while_two_tower)
    with _two_tower_in_background(base) as pending:
        data = _ranker_groups(base, world, mix, peer_fits)
        ranker = train_ranker(data)
        _after_ranker(while_two_tower, data, ranker)
        return data, pending.result(), ranker


def _ranker_groups(
    base: TrainingData, world: World, mix: TrainingMix | None, peer_fits: Path | None
) -> TrainingData:
    """add_ranker_data in a small heap, its engagement log let go once the groups exist."""
    with small_heap():
        return _without_log(add_ranker_data(base, world, mix, peer_fits))


def _without_log(data: TrainingData) -> TrainingData:
    """`data` with an empty engagement log. Once the ranker's groups are built no trainer
    and no evaluation reads it, and at 100k users it is gigabytes (every engagement and the
    exposure counts) that would otherwise sit beside the training."""
    log = data.log
    empty = replace(
        log,
        **{f: getattr(log, f)[:0] for f in ("user", "time_us", "item", "actions", "dwell", "age")},
        exposures=None,
    )
    return replace(data, log=empty)


@contextlib.contextmanager
def _two_tower_in_background(data: TrainingData) -> Iterator[Future[TrainResult]]:
    """The two-tower trained in a spawned process ("spawn" keeps it clear of this process's
    thread pools), which gets only what the two-tower reads."""
    none = np.arange(0)
    # The engagement log (with every impression's exposure) and the impression frames are
    # the largest inputs and the two-tower reads neither: at 100k users they are gigabytes
    # the child would otherwise unpickle.
    split = data.split
    slim = replace(
        _without_log(data),
        split=Split(split.train.clear(), split.valid.clear(), split.heldout.clear()),
        ranker_train=data.ranker_train.take(none),
        ranker_valid=data.ranker_valid.take(none),
        ranker_heldout=data.ranker_heldout.take(none),
        retrieval_heldout=data.retrieval_heldout.take(none),
        heldout_classic=None,
    )
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=1, mp_context=ctx, initializer=die_with_parent, initargs=(os.getpid(),)
    ) as pool:
        yield pool.submit(_two_tower_job, slim)

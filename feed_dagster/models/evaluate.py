"""Held-out evaluation of the learned models against non-learned baselines and the oracle.

Every method scores the same held-out impression rows and is judged per impression (AUC,
MRR, nDCG@5/@10 on the click label, as EBNeRD does), plus a per-action AUC where the method
has a score for that action (the ranker's own head, the oracle's true probability; single-
score methods use their one score for every action).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from feed_dagster.data.schema import ACTIONS, World  # noqa: E402
from feed_dagster.metrics.baselines import (  # noqa: E402
    BASELINES,
    any_follows,
    with_warehouse_fallbacks,
)
from feed_dagster.metrics.classic import CLASSIC_METHODS  # noqa: E402
from feed_dagster.metrics.fit_store import stored_fit_named  # noqa: E402
from feed_dagster.metrics.ranking import evaluate_scores, group_auc  # noqa: E402
from feed_dagster.models.layers import CatalogTensors  # noqa: E402
from feed_dagster.models.ranker import PhoenixRanker, score_frame  # noqa: E402
from feed_dagster.models.ranker_data import RankerData  # noqa: E402
from feed_dagster.models.train import ClassicScores, TrainingData  # noqa: E402
from feed_dagster.models.two_tower import TwoTower, catalog_item_vectors, user_vectors  # noqa: E402
from feed_dagster.sorted_search import unique  # noqa: E402

METRIC_COLUMNS = ("auc", "mrr", "ndcg@5", "ndcg@10")


def two_tower_scores(model: TwoTower, data: RankerData, cat: CatalogTensors) -> np.ndarray:
    """user·item dot product of every real candidate of `data`, in `data.rows()` order."""
    u = user_vectors(model, data.history, cat)
    group, slot = np.nonzero(data.cand_mask)
    # The candidates' own posts, not the catalog's (10M posts at 1M users).
    rows = unique(data.cand_item[group, slot].astype(np.int64))
    items = catalog_item_vectors(model, cat, rows=rows)
    out = np.empty(len(group), dtype=np.float32)
    # A block of candidates at a time: gathering every candidate's two vectors at once
    # took 2 x 256 bytes per candidate (over 300 MiB for the held-out slates at 100k users).
    for s in range(0, len(group), 1 << 16):
        g, c = group[s : s + (1 << 16)], slot[s : s + (1 << 16)]
        at = np.searchsorted(rows, data.cand_item[g, c])
        out[s : s + len(g)] = np.einsum("nd,nd->n", u[g], items[at])
    return out


def normalized_entropy(p: np.ndarray, y: np.ndarray) -> float:
    """Log loss of probabilities p divided by that of always predicting the base rate.

    Below 1 means the probabilities carry information; a model with random weights lands
    well above 1 even when its ranking is better than chance.
    """
    y = y.astype(np.float64)
    base = float(y.mean()) if len(y) else 0.0
    if not 0.0 < base < 1.0:
        return float("nan")
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    loss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float(loss / -(base * math.log(base) + (1 - base) * math.log(1 - base)))


# One method's metrics, as a row of the evaluation table.
Row = dict[str, float | str | int]


def _method_row(
    method: str,
    frame: pl.DataFrame,
    score_for: Mapping[str, str],
    actions: tuple[str, ...],
    probabilities: bool = False,
) -> Row:
    """Ranking metrics on the click label, per-action grouped AUC, and (for methods that
    output probabilities) the normalized entropy of the click probability."""
    main = evaluate_scores(frame, score_for["click"], label_col="click")
    row: dict[str, float | str | int] = {"method": method}
    row.update({k: float(main[k]) for k in METRIC_COLUMNS})
    row["ne_click"] = (
        normalized_entropy(frame[score_for["click"]].to_numpy(), frame["click"].to_numpy())
        if probabilities
        else float("nan")
    )
    row["n_impressions"] = int(main["n_impressions"]) - int(main["n_skipped"])
    for a in actions:
        auc, _, _ = group_auc(frame, score_for.get(a, score_for["click"]), a)
        row[f"auc_{a}"] = auc
    return row


def evaluate_models(
    world: World,
    data: TrainingData,
    ranker: PhoenixRanker | None = None,
    two_tower: TwoTower | None = None,
    extra_rankers: Mapping[str, PhoenixRanker] | None = None,
    baselines: tuple[str, ...] | None = None,
    classic: bool = True,
) -> pl.DataFrame:
    """One row per method on the held-out impressions: method, auc, mrr, ndcg@5, ndcg@10,
    ne_click (normalized entropy, probabilistic methods only, else NaN), n_impressions
    (with AUC defined), auc_<action> for each action the source logs.

    Methods: `ranker`, `two_tower` (dot product), each extra ranker under its key (e.g. the
    promoted incumbent), the baselines of metrics.baselines (chronological_following only
    when the world has follows), with `classic` the collaborative-filtering peers of
    metrics.classic (popularity_all_time, item_knn, als, ease), and `oracle` (true click
    probability) when the world has ground truth. Sorted by AUC, best first.
    """
    rows = evaluation_rows(world, data, ranker, extra_rankers, baselines, classic)
    return evaluation_frame(rows, None if two_tower is None else two_tower_row(data, two_tower))


@dataclass(frozen=True)
class EvaluationRows:
    """evaluate_models' rows but the two-tower's: the rankers', then everything else."""

    rankers: list[Row]
    others: list[Row]


def evaluation_frame(rows: EvaluationRows, two_tower: Row | None = None) -> pl.DataFrame:
    """evaluate_models' table from `evaluation_rows` and, when given, `two_tower_row`."""
    middle = [] if two_tower is None else [two_tower]
    table = pl.DataFrame([*rows.rankers, *middle, *rows.others])
    return table.sort("auc", descending=True, nulls_last=True)


def two_tower_row(data: TrainingData, two_tower: TwoTower) -> Row:
    """The two-tower's row of evaluate_models (its dot product as the click score)."""
    held = data.ranker_heldout
    base = _heldout_rows(data)
    actions = _evaluated_actions(data)
    scores = two_tower_scores(two_tower, held, CatalogTensors(data.catalog))
    frame = base.with_columns(pl.Series("score", scores))
    return _method_row("two_tower", frame, {"click": "score"}, actions)


def _evaluated_actions(data: TrainingData) -> tuple[str, ...]:
    return tuple(a for a in data.actions if a in ACTIONS)


def _heldout_rows(data: TrainingData) -> pl.DataFrame:
    base = data.ranker_heldout.rows()
    if base.height == 0:
        raise ValueError("evaluate_models: no held-out impressions (is_heldout) to evaluate")
    return base


def evaluation_rows(
    world: World,
    data: TrainingData,
    ranker: PhoenixRanker | None = None,
    extra_rankers: Mapping[str, PhoenixRanker] | None = None,
    baselines: tuple[str, ...] | None = None,
    classic: bool = True,
    heldout_post_engagements: pl.DataFrame | None = None,
) -> EvaluationRows:
    """Every row of evaluate_models but the two-tower's, unsorted: what can be measured
    while the two-tower still trains (models.train.prepare_and_train's `while_two_tower`).

    When `world` holds only the sampled users' engagements (data.everyone names the
    warehouse with everyone's), the baselines read `heldout_post_engagements`: every
    user's engagements on the posts the held-out impressions show (models.budget)."""
    held = data.ranker_heldout
    base = _heldout_rows(data)
    cat = CatalogTensors(data.catalog)
    actions = _evaluated_actions(data)
    rows = []

    def ranker_row(name: str, model: PhoenixRanker) -> Row:
        scored = score_frame(model, held, cat)
        heads = {a: f"p_{a}" for a in model.cfg.actions}
        if "click" not in heads:
            heads["click"] = f"p_{model.cfg.actions[0]}"
        return _method_row(name, scored, heads, actions, probabilities="p_click" in scored.columns)

    rankers = [] if ranker is None else [ranker_row("ranker", ranker)]
    rankers += [ranker_row(name, model) for name, model in (extra_rankers or {}).items()]

    # Baselines score the same rows, from the raw tables and only the past.
    impressions = base.select("impression_id", "user_id", "article_id", "position").join(
        data.split.heldout.select("impression_id", "article_id", "shown_at"),
        on=["impression_id", "article_id"],
        how="left",
        maintain_order="left",
    )
    chosen = {n: BASELINES[n] for n in (tuple(BASELINES) if baselines is None else baselines)}
    engagements = world.engagements
    if data.everyone is not None:
        if heldout_post_engagements is None:
            raise ValueError(
                "the world holds the sampled users' engagements only: the baselines need "
                "everyone's on the held-out posts (heldout_post_engagements)"
            )
        engagements = heldout_post_engagements
        chosen = with_warehouse_fallbacks(chosen, data.everyone)
    for name, baseline in chosen.items():
        if name == "chronological_following" and not any_follows(world, data.everyone):
            continue
        scored = baseline(impressions, engagements, world.articles, world.follows)
        frame = base.with_columns(scored["score"].cast(pl.Float64).alias("score"))
        rows.append(_method_row(name, frame, {"click": "score"}, actions))
    # The classic collaborative-filtering peers, fitted once on everything before the
    # held-out period.
    if classic and impressions.height:
        cut = impressions["shown_at"].min()
        # Scored by the fit the held-out groups were built with (add_ranker_data), whose
        # rows are these; a fit at or before the first scored impression sees none of what
        # it scores.
        peers = data.heldout_classic
        if peers is None or peers.cut > cut or not set(CLASSIC_METHODS) <= set(peers.scores):
            fit_rows, everyone = data.peer_rows(world)
            fit, _ = stored_fit_named(cut, None, engagements=fit_rows, warehouse=everyone)
            peers = ClassicScores.of(fit, impressions)
        for name in CLASSIC_METHODS:
            frame = base.with_columns(pl.Series("score", peers.scores[name], dtype=pl.Float64))
            rows.append(_method_row(name, frame, {"click": "score"}, actions))

    truth = world.impression_truth
    if truth.height:
        frame = base.join(
            truth, on=["impression_id", "article_id"], how="left", maintain_order="left"
        )
        if frame["true_p_click"].null_count() == 0:
            heads = {a: f"true_p_{a}" for a in ACTIONS}
            rows.append(_method_row("oracle", frame, heads, actions, probabilities=True))
    return EvaluationRows(rankers, rows)


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def evaluation_chart(table: pl.DataFrame, metrics: tuple[str, ...] = ("auc", "ndcg@10")) -> bytes:
    """Grouped bar chart (PNG bytes) of `metrics` per method."""
    methods = table["method"].to_list()
    x = np.arange(len(methods))
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(methods)), 3.5))
    for i, m in enumerate(metrics):
        values = [v if v is not None and math.isfinite(v) else 0.0 for v in table[m].to_list()]
        ax.bar(x + (i - (len(metrics) - 1) / 2) * width, values, width, label=m)
    ax.set_xticks(x, methods, rotation=30, ha="right")
    ax.set_ylim(0.0, 1.0)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_title("held-out ranking quality (click)")
    ax.legend()
    return _png(fig)


def training_curves(histories: Mapping[str, list[dict[str, float]]]) -> bytes:
    """Train loss (left) and validation metric (right) per epoch for each model (PNG bytes)."""
    fig, (ax_loss, ax_valid) = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, history in histories.items():
        epochs = [h["epoch"] for h in history]
        ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label=name)
        for key in history[0] if history else ():
            if key.startswith("valid_"):
                ax_valid.plot(
                    epochs,
                    [h.get(key, np.nan) for h in history],
                    marker="o",
                    label=f"{name} {key[6:]}",
                )
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("train loss")
    ax_loss.legend()
    ax_valid.set_xlabel("epoch")
    ax_valid.set_ylabel("validation metric")
    ax_valid.legend(fontsize=7)
    return _png(fig)

"""Training on the tiny world: learning, determinism, evaluation, promotion, store reload."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import polars as pl
import pytest
import torch

from feed_dagster.embeddings import LexicalEncoder
from feed_dagster.memory import peak_rss_mib
from feed_dagster.metrics.classic import CLASSIC_METHODS, ClassicPeers
from feed_dagster.metrics.ranking import evaluate_scores
from feed_dagster.models import train as train_module
from feed_dagster.models.budget import TrainingBudget
from feed_dagster.models.catalog import FeatureConfig
from feed_dagster.models.evaluate import evaluate_models, evaluation_chart, training_curves
from feed_dagster.models.layers import CatalogTensors
from feed_dagster.models.promotion import promotion_decision
from feed_dagster.models.ranker import (
    PhoenixRanker,
    RankerConfig,
    build_ranker,
    load_ranker,
    score_frame,
    start_at_base_rates,
)
from feed_dagster.models.retrieval_data import user_histories
from feed_dagster.models.store import ModelStore
from feed_dagster.models.train import (
    TrainConfig,
    prepare_and_train,
    prepare_training_data,
    train_both,
    train_ranker,
    train_two_tower,
    two_tower_recall,
)
from feed_dagster.models.two_tower import (
    catalog_item_vectors,
    item_vectors,
    load_two_tower,
    retrieval_recall,
    user_vectors,
)
from feed_dagster.world import generate_world, world_config

FEATURES = FeatureConfig(history_len=16, author_buckets=4096, user_buckets=4096)
RANKER_TRAIN = TrainConfig(epochs=3, min_steps=0, batch_size=256, lr=3e-3, patience=3)
TT_TRAIN = TrainConfig(epochs=3, min_steps=0, batch_size=512, lr=3e-3, patience=3)


@pytest.fixture(scope="module")
def world():
    return generate_world(world_config("tiny"))


@pytest.fixture(scope="module")
def data(world):
    return prepare_training_data(world, LexicalEncoder().encode(world.articles), FEATURES)


@pytest.fixture(scope="module")
def ranker_result(data):
    return train_ranker(data, train=RANKER_TRAIN)


@pytest.fixture(scope="module")
def tt_result(data):
    return train_two_tower(data, train=TT_TRAIN)


@pytest.fixture(scope="module")
def evaluation(world, data, ranker_result, tt_result):
    return evaluate_models(
        world,
        data,
        ranker=load_ranker(ranker_result.state_dict, ranker_result.config),
        two_tower=load_two_tower(tt_result.state_dict, tt_result.config),
    )


def test_training_data_shapes(data):
    assert len(data.ranker_train) > 1000 and len(data.ranker_heldout) > 100
    assert data.split.train["shown_at"].max() < data.split.heldout["shown_at"].min()
    assert data.actions[0] == "favorite" and "click" in data.actions
    assert data.dropped_rows == 0, "the world never shows a post before it exists"


def test_training_data_keeps_the_heldout_peers_scores_not_the_fit(world, data, evaluation):
    """The held-out classic fit is let go once the held-out groups exist: its scores of the
    held-out candidates are kept, and they are what the evaluation reports."""
    kept = data.heldout_classic
    assert kept.cut <= world.heldout_start
    rows = data.ranker_heldout.rows()
    fit = ClassicPeers.fit(world.engagements, kept.cut)
    users, articles = rows["user_id"].to_numpy(), rows["article_id"].to_numpy()
    for method in CLASSIC_METHODS:
        np.testing.assert_array_equal(kept.scores[method], fit.score(method, users, articles))
    auc = dict(zip(evaluation["method"], evaluation["auc"], strict=True))
    for method in CLASSIC_METHODS:
        frame = rows.with_columns(pl.Series("score", kept.scores[method], dtype=pl.Float64))
        want = evaluate_scores(frame, "score", label_col="click")["auc"]
        assert auc[method] == pytest.approx(want, abs=1e-12)


def test_ranker_learns_and_reports_history(ranker_result):
    r = ranker_result
    assert 1 <= r.best_epoch <= len(r.history) <= RANKER_TRAIN.epochs
    losses = [h["train_loss"] for h in r.history]
    assert losses[-1] < losses[0]
    assert r.history[r.best_epoch - 1]["valid_auc"] > 0.65
    assert r.n_params > 10_000 and r.seconds > 0


def _mean_predictions(model: PhoenixRanker, data) -> dict[str, tuple[float, float]]:
    """(mean predicted probability, rate) per action on the validation slates."""
    frame = score_frame(model, data.ranker_valid, CatalogTensors(data.catalog))
    return {
        a: (float(frame[f"p_{a}"].mean()), float(frame[a].cast(pl.Float64).mean()))
        for a in model.cfg.actions
    }


def test_heads_start_at_their_base_rates(data):
    """Before any step, each head predicts about its action's rate in the logged slates: a
    rare action starts near its rate, not at 0.5 (what a zero bias gives)."""
    cfg = RankerConfig(content_dim=data.catalog.dim, actions=data.actions, features=FEATURES)
    torch.manual_seed(0)
    model = PhoenixRanker(cfg)
    before = _mean_predictions(model, data)
    start_at_base_rates(model, data.ranker_train)
    after = _mean_predictions(model, data)
    for a, (pred, rate) in after.items():
        # Validation rates differ from training's a little; a rare head must be near its
        # rate (within a factor of 3), where the zero bias put it near 0.5.
        assert rate / 3 <= pred + 1e-4 and pred <= 3 * rate + 1e-3, (a, pred, rate)
        assert abs(before[a][0] - 0.5) < 0.2, (a, before[a])


def test_trained_ranker_is_calibrated_on_rare_actions(data, ranker_result):
    """The mean predicted probability of every action stays near its validation rate: an
    overestimated rare negative action (weighted -234 for a report) would outweigh every
    positive term of the weighted score."""
    model = load_ranker(ranker_result.state_dict, ranker_result.config)
    for a, (pred, rate) in _mean_predictions(model, data).items():
        assert pred <= 3 * rate + 1e-3, (a, pred, rate)
        assert pred >= rate / 3 - 1e-4, (a, pred, rate)


def test_evaluation_table(evaluation):
    methods = evaluation["method"].to_list()
    for m in ("ranker", "two_tower", "popularity", "recency", "random", "oracle",
              "chronological_following"):  # fmt: skip
        assert m in methods, m
    auc = dict(zip(methods, evaluation["auc"].to_list(), strict=True))
    assert auc["oracle"] > auc["ranker"] > max(auc["popularity"], auc["recency"], auc["random"])
    assert abs(auc["random"] - 0.5) < 0.05
    assert {"mrr", "ndcg@5", "ndcg@10", "auc_click", "auc_favorite"} <= set(evaluation.columns)
    assert evaluation_chart(evaluation)[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_curves_png(ranker_result, tt_result):
    png = training_curves({"ranker": ranker_result.history, "two_tower": tt_result.history})
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_tower_retrieves_better_than_chance(data, tt_result):
    model = load_two_tower(tt_result.state_dict, tt_result.config)
    r = two_tower_recall(model, data.retrieval_heldout, data.catalog)
    # About 1,000 posts are in a 48 h window of the tiny world: chance recall@100 is ~0.1.
    assert 0.05 < r["chance@100"] < 0.2
    assert r["recall@100"] > 2 * r["chance@100"]
    assert r["recall@1000"] > r["recall@100"]


def test_item_vectors_of_some_rows_and_recall_from_them(data, tt_result):
    """Recall and the evaluation compute the vectors of the rows they need only: the same
    vectors as the whole catalog's, and the same recall."""
    model = load_two_tower(tt_result.state_dict, tt_result.config)
    whole = catalog_item_vectors(model, data.catalog)
    rows = np.array([5, 0, 3, len(whole) - 1, 5])
    some = catalog_item_vectors(model, data.catalog, batch_size=2, rows=rows)
    # (other batch shapes may round the last bit differently)
    np.testing.assert_allclose(some, whole[rows], rtol=0, atol=1e-6)
    assert not some[1].any()  # row 0, the padding item
    ex = data.retrieval_heldout
    u = user_vectors(model, ex.history, data.catalog)
    expected = retrieval_recall(u, ex.item, ex.time_us, whole, data.catalog.published_us)
    assert two_tower_recall(model, ex, data.catalog) == expected


def test_user_and_item_vectors_for_serving(world, data, tt_result):
    model = load_two_tower(tt_result.state_dict, tt_result.config)
    users = np.array([0, 1, 2, 10**9])  # the last one has never engaged: a new user
    hist = user_histories(users, world.now, world.engagements, data.catalog, FEATURES)
    assert (hist.item[-1] == 0).all()
    u = user_vectors(model, hist, data.catalog)
    v = item_vectors(model, world.articles, LexicalEncoder().encode(world.articles))
    assert u.shape == (4, model.cfg.dim) and v.shape == (world.articles.height, model.cfg.dim)
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_training_is_deterministic(data):
    small = replace(
        data,
        ranker_train=data.ranker_train.take(np.arange(600)),
        retrieval_train=data.retrieval_train.take(np.arange(3000)),
    )
    quick = TrainConfig(epochs=2, min_steps=0, batch_size=128, lr=3e-3)
    a = train_ranker(small, train=quick)
    b = train_ranker(small, train=quick)
    assert a.state_dict.keys() == b.state_dict.keys()
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    # Validation metrics agree up to polars' parallel summation order in the last digit.
    for ha, hb in zip(a.history, b.history, strict=True):
        assert ha["valid_auc"] == pytest.approx(hb["valid_auc"], abs=1e-12)
    c = train_ranker(small, train=replace(quick, seed=1))
    assert any(not torch.equal(a.state_dict[k], c.state_dict[k]) for k in a.state_dict)
    t1 = train_two_tower(small, train=replace(quick, batch_size=512))
    t2 = train_two_tower(small, train=replace(quick, batch_size=512))
    for k in t1.state_dict:
        assert torch.equal(t1.state_dict[k], t2.state_dict[k]), k


@pytest.mark.parametrize("seed", [0, 7])
def test_random_weights_are_refused(world, data, evaluation, seed):
    # Seed 7 is the luckiest untrained ranker seen on this world (AUC 0.549, above
    # popularity and the two-tower score): the gate must still refuse it.
    broken = build_ranker(
        RankerConfig(content_dim=data.catalog.dim, actions=data.actions, features=FEATURES),
        seed=seed,
    )
    # Same held-out rows as `evaluation`: reuse its baseline rows, score only the new ranker.
    own = evaluate_models(world, data, ranker=broken, baselines=())
    table = pl.concat([own, evaluation.filter(pl.col("method") != "ranker")], how="diagonal")
    passed, reasons = promotion_decision(table)
    assert not passed, reasons
    assert any(r.startswith("FAIL") for r in reasons)


def test_trained_ranker_passes_the_gate(evaluation):
    passed, reasons = promotion_decision(evaluation)
    assert passed, reasons
    own = float(evaluation.filter(pl.col("method") == "ranker")["auc"][0])
    assert promotion_decision(evaluation, incumbent_auc=own + 0.004)[0]
    passed, reasons = promotion_decision(evaluation, incumbent_auc=own + 0.02)
    assert not passed and "below the promoted" in reasons[-1]


def test_promotion_rules_on_small_tables():
    def table(**auc: float) -> pl.DataFrame:
        ne = {"ranker": auc.pop("ne", 0.9)}
        return pl.DataFrame(
            {
                "method": list(auc),
                "auc": list(auc.values()),
                "ne_click": [ne.get(m) for m in auc],
            },
            schema_overrides={"ne_click": pl.Float64},
        )

    assert promotion_decision(table(ranker=0.8, popularity=0.6, two_tower=0.7, recency=0.7))[0]
    # Every baseline in the table counts, by at least the margin.
    assert not promotion_decision(table(ranker=0.8, popularity=0.6, two_tower=0.7, recency=0.795))[
        0
    ]
    # Missing evidence fails.
    passed, reasons = promotion_decision(table(ranker=0.8, popularity=0.6))
    assert not passed and any("two_tower" in r for r in reasons)
    assert not promotion_decision(table(ranker=float("nan"), popularity=0.6, two_tower=0.6))[0]
    # Probabilities worse than the base rate fail even with a good ranking.
    passed, reasons = promotion_decision(table(ranker=0.8, popularity=0.6, two_tower=0.7, ne=1.3))
    assert not passed and "normalized entropy" in reasons[-2]


def test_store_round_trip_gives_identical_scores(tmp_path, data, ranker_result):
    store = ModelStore(str(tmp_path))
    version = store.save(
        "ranker", ranker_result.state_dict, ranker_result.config, ranker_result.summary()
    )
    store.promote("ranker", version)
    state, config = store.load("ranker")
    original = load_ranker(ranker_result.state_dict, ranker_result.config)
    reloaded = load_ranker(state, config)
    a = score_frame(original, data.ranker_heldout, data.catalog)
    b = score_frame(reloaded, data.ranker_heldout, data.catalog)
    assert a.equals(b)


def test_training_both_models_in_two_processes_gives_the_same_weights(world, data, monkeypatch):
    # 1 GiB held here while the two-tower's process starts: its reported peak must be its
    # own, not this process's high-water mark that a forked child inherits.
    ballast = np.ones(2**30 // 8)
    # What runs beside the two-tower gets the data and the ranker once it is trained.
    seen = []
    record = lambda d, ranker: seen.append((d, ranker))  # noqa: E731
    parallel = train_both(data, parallel=True, while_two_tower=record)
    del ballast
    assert peak_rss_mib() > 1024
    assert parallel[0].process_peak_rss_mib is not None
    assert 0 < parallel[0].process_peak_rss_mib < peak_rss_mib() - 512
    sequential = train_both(data, parallel=False, while_two_tower=record)
    assert sequential[0].process_peak_rss_mib is None
    # Overlapped: the two-tower trains while the ranker's data is still being built.
    overlapped_data, *overlapped = prepare_and_train(
        world, LexicalEncoder().encode(world.articles), FEATURES, while_two_tower=record
    )
    assert len(overlapped_data.ranker_train) == len(data.ranker_train) > 0
    # The engagement log is let go once the groups are built: nothing after reads it.
    assert overlapped_data.log.user.size == 0 and overlapped_data.log.exposures is None
    # Past the budget's engagements, the groups are built first, then both train at once.
    calls = []
    monkeypatch.setattr(
        train_module,
        "train_both",
        lambda d, **kw: calls.append(d) or train_both(d, parallel=True, **kw),
    )
    grouped_first = prepare_and_train(
        world,
        LexicalEncoder().encode(world.articles),
        FEATURES,
        budget=TrainingBudget(overlap_max_engagements=world.engagements.height - 1),
        while_two_tower=record,
    )[1:]
    assert len(calls) == 1 and len(calls[0].ranker_train) == len(data.ranker_train)
    for run in (parallel, overlapped, grouped_first):
        for a, b in zip(run, sequential, strict=True):
            assert a.state_dict.keys() == b.state_dict.keys()
            for key in a.state_dict:
                assert torch.equal(a.state_dict[key], b.state_dict[key]), key
    returned = [parallel[1], sequential[1], overlapped[1], grouped_first[1]]
    assert len(seen) == len(returned)
    assert all(r is ranker for (_, r), ranker in zip(seen, returned, strict=True))
    assert seen[0][0] is data and seen[2][0] is overlapped_data


def test_without_a_validation_period_the_last_epoch_is_kept(world):
    data = prepare_training_data(
        world, LexicalEncoder().encode(world.articles), FEATURES, valid_fraction=0.0
    )
    assert len(data.ranker_valid) == 0
    result = train_ranker(data, train=replace(RANKER_TRAIN, epochs=2))
    assert len(result.history) == 2
    assert result.best_epoch == 2

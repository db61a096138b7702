"""Inference with the context computed once per user: the same scores as the training
forward, whatever the grouping and batching (untrained tiny ranker, tiny world)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import polars as pl
import pytest
import torch

from feed_dagster.embeddings import LexicalEncoder
from feed_dagster.models.catalog import FeatureConfig, ItemCatalog
from feed_dagster.models.compiled import COMPILE_ENV, CompiledBlocks, compile_requested
from feed_dagster.models.engagement_log import EngagementLog
from feed_dagster.models.layers import CatalogTensors
from feed_dagster.models.ranker import (
    PhoenixRanker,
    RankerConfig,
    build_ranker,
    context_runs,
    load_ranker,
    predict,
    ranker_batch,
)
from feed_dagster.models.ranker_data import RankerData, build_serving_data

FEATURES = FeatureConfig(history_len=8, max_candidates=16)
USERS = 6
PER_USER = 40


@pytest.fixture(scope="module")
def setup(tiny_world):
    world = tiny_world
    catalog = ItemCatalog.build(world.articles, LexicalEncoder().encode(world.articles), FEATURES)
    log = EngagementLog.build(world.engagements, catalog)
    rng = np.random.default_rng(0)
    users = world.engagements["user_id"].unique().sort().to_numpy()[:USERS]
    cands = pl.DataFrame(
        {
            "user_id": np.repeat(users, PER_USER),
            "article_id": rng.choice(world.articles["article_id"].to_numpy(), USERS * PER_USER),
        }
    )

    def serving(candidates: pl.DataFrame, group: int) -> RankerData:
        return build_serving_data(
            candidates,
            world.now,
            world.engagements,
            world.follows,
            world.topic_follows,
            catalog,
            replace(FEATURES, max_candidates=group),
            log=log,
        )

    # Random (untrained) weights leave every head near 0.5; a larger init spreads the
    # scores, so a wrong key, value or mask shows up as a clear difference.
    model = build_ranker(RankerConfig(content_dim=catalog.dim, features=FEATURES), seed=5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    model.eval()
    return cands, serving, CatalogTensors(catalog), model


def _reference(model: PhoenixRanker, data: RankerData, cat: CatalogTensors) -> np.ndarray:
    """The training forward on every group with its own context, as before the cache:
    probabilities and log1p dwell of the real candidates."""
    with torch.no_grad():
        logits, dwell = model(ranker_batch(data), cat)
    out = torch.cat([torch.sigmoid(logits), dwell.clamp(min=0)[..., None]], -1)
    return out[torch.from_numpy(data.cand_mask)].numpy()


def _fast(model: PhoenixRanker, data: RankerData, cat, batch_size=None) -> np.ndarray:
    """predict()'s probabilities and log1p dwell (compared in the model's own scale: the
    dwell in seconds is exp of it, which turns 1e-6 of rounding into 1e-2 s at hours)."""
    probs, dwell = predict(model, data, cat, batch_size)
    m = data.cand_mask
    return np.concatenate([probs[m], np.log1p(dwell[m])[:, None]], axis=1)


def _by_pair(frame: pl.DataFrame, data: RankerData, scores: np.ndarray) -> np.ndarray:
    """Scores in the order of `frame`'s (user_id, article_id, occurrence) rows."""
    rows = data.rows().select("user_id", "article_id", "position")
    keyed = pl.concat([rows, pl.DataFrame({"i": np.arange(len(scores))})], how="horizontal")
    order = frame.with_columns(pl.int_range(pl.len()).over("user_id").alias("position")).join(
        keyed, on=["user_id", "article_id", "position"], how="left", maintain_order="left"
    )
    return scores[order["i"].to_numpy()]


def test_groups_of_one_user_share_one_context(setup):
    cands, serving, _, _ = setup
    data = serving(cands, 16)
    firsts, context_of = context_runs(data)
    assert len(data) == 3 * USERS  # 40 candidates = 16 + 16 + 8 per user
    assert len(firsts) == USERS
    np.testing.assert_array_equal(np.bincount(context_of), [3] * USERS)


def test_fast_path_equals_the_training_forward(setup):
    cands, serving, cat, model = setup
    data = serving(cands, 16)
    ref = _reference(model, data, cat)
    assert ref[:, :-1].std() > 0.05  # scores are spread, so the comparison means something
    np.testing.assert_allclose(_fast(model, data, cat), ref, rtol=0, atol=1e-5)


def test_scores_do_not_depend_on_grouping_or_batching(setup):
    cands, serving, cat, model = setup
    one_group = serving(cands, PER_USER)  # all of a user's candidates in one group
    base = _by_pair(cands, one_group, _fast(model, one_group, cat))
    for group in (7, 16):
        data = serving(cands, group)
        for batch in (1, 2, 5, None):  # passes that split users' groups and mix users
            got = _by_pair(cands, data, _fast(model, data, cat, batch))
            np.testing.assert_allclose(got, base, rtol=0, atol=1e-5)
    # One user scored alone, and its candidates split in two halves scored separately.
    user = cands["user_id"][0]
    alone = cands.filter(pl.col("user_id") == user)
    halves = [alone[: PER_USER // 2], alone[PER_USER // 2 :]]
    got = np.concatenate(
        [_by_pair(h, d, _fast(model, d, cat)) for h in halves for d in [serving(h, 16)]]
    )
    np.testing.assert_allclose(got, base[:PER_USER], rtol=0, atol=1e-5)


def test_the_context_changes_scores(setup):
    """The checks above would pass if candidates ignored their context: show they don't."""
    cands, serving, cat, model = setup
    data = serving(cands, 16)
    base = _fast(model, data, cat)
    other = replace(data, history=replace(data.history, item=np.roll(data.history.item, 3, axis=0)))
    assert np.abs(_fast(model, other, cat) - base).max() > 1e-3


def test_saved_weights_load_with_unchanged_keys(setup):
    _, serving, cat, model = setup
    loaded = load_ranker(model.state_dict(), model.cfg.to_dict())
    assert set(loaded.state_dict()) == set(model.state_dict())
    data = serving(setup[0], 16)
    np.testing.assert_array_equal(_fast(loaded, data, cat), _fast(model, data, cat))


def test_fast_path_without_optional_inputs(setup):
    """Models stored with fewer inputs (no user id, profile, peer or affinity features, no
    post ids) take the same fast path."""
    cands, serving, cat, _ = setup
    cfg = RankerConfig(
        content_dim=cat.content.shape[1],
        features=FEATURES,
        user_embedding=False,
        profile_features=False,
        peer_features=False,
        affinity_features=False,
        id_dropout=1.0,
    )
    model = build_ranker(cfg, seed=2).eval()
    data = serving(cands, 16)
    np.testing.assert_allclose(_fast(model, data, cat), _reference(model, data, cat), atol=1e-5)


def test_compiled_blocks_score_as_the_uncompiled(setup):
    """torch.compile'd candidate blocks (FEED_DAGSTER_COMPILE_RANKER=1) give the same scores,
    with the last pass of each context block padded to the compiled shape."""
    cands, serving, cat, model = setup
    data = serving(cands, 16)
    base = _fast(model, data, cat, 4)
    blocks = CompiledBlocks(model)
    probs, dwell = predict(model, data, cat, 4, blocks)  # 18 groups: passes of 4, 4, 4, 4, 2
    assert blocks.failed is None
    m = data.cand_mask
    got = np.concatenate([probs[m], np.log1p(dwell[m])[:, None]], axis=1)
    np.testing.assert_allclose(got, base, rtol=0, atol=1e-5)


def test_a_compile_failure_falls_back_to_the_uncompiled_blocks(setup):
    cands, serving, cat, model = setup
    data = serving(cands, 16)
    blocks = CompiledBlocks(model)

    def broken(*args):
        raise RuntimeError("no C compiler\nsecond line")

    blocks.compiled = broken
    with pytest.warns(UserWarning, match="could not be compiled .RuntimeError: no C compiler"):
        probs, _ = predict(model, data, cat, 4, blocks)
    assert blocks.failed == "RuntimeError: no C compiler"
    np.testing.assert_allclose(probs, predict(model, data, cat, 4)[0], rtol=0, atol=0)


@pytest.mark.parametrize(("env", "expected"), [("", False), ("0", False), ("1", True)])
def test_feed_runs_compile_when_told(monkeypatch, env, expected):
    monkeypatch.setenv(COMPILE_ENV, env)
    assert compile_requested() is expected


def test_an_unknown_compile_setting_is_refused(monkeypatch):
    monkeypatch.setenv(COMPILE_ENV, "yes")
    with pytest.raises(ValueError, match="FEED_DAGSTER_COMPILE_RANKER must be 0, 1 or unset"):
        compile_requested()

"""The ranker's attention: candidate isolation and padding masks (untrained model, tiny)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from feed_dagster.embeddings import LexicalEncoder
from feed_dagster.models.catalog import FeatureConfig, ItemCatalog
from feed_dagster.models.layers import CatalogTensors
from feed_dagster.models.ranker import RankerConfig, build_ranker, ranker_batch
from feed_dagster.models.ranker_data import build_ranker_data
from feed_dagster.world import generate_world, world_config

FEATURES = FeatureConfig(history_len=16, max_candidates=16)


@pytest.fixture(scope="module")
def setup():
    world = generate_world(world_config("tiny"))
    catalog = ItemCatalog.build(world.articles, LexicalEncoder().encode(world.articles), FEATURES)
    imps = world.impressions.filter(pl.col("is_heldout")).filter(
        pl.col("impression_id") < pl.col("impression_id").min() + 40
    )
    data = build_ranker_data(
        imps, world.engagements, world.follows, world.topic_follows, catalog, FEATURES
    )
    model = build_ranker(RankerConfig(content_dim=catalog.dim, features=FEATURES), seed=3)
    model.eval()
    return data, CatalogTensors(catalog), model


def _scores(model, batch, cat) -> torch.Tensor:
    with torch.no_grad():
        logits, dwell = model(batch, cat)
    return torch.cat([logits, dwell.unsqueeze(-1)], dim=-1)


def _permute_candidates(batch: dict, perm: torch.Tensor) -> dict:
    out = dict(batch)
    for k, v in batch.items():
        if k.startswith("cand_") or k in ("labels", "dwell"):
            out[k] = v[:, perm]
    return out


def test_scores_do_not_depend_on_the_order_of_the_slate(setup):
    data, cat, model = setup
    b = ranker_batch(data)
    c = b["cand_item"].shape[1]
    base = _scores(model, b, cat)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(c))
    permuted = _scores(model, _permute_candidates(b, perm), cat)
    torch.testing.assert_close(permuted, base[:, perm], rtol=0, atol=1e-5)


def test_scores_do_not_depend_on_the_other_candidates(setup):
    data, cat, model = setup
    b = ranker_batch(data)
    base = _scores(model, b, cat)
    mask = b["cand_item"] > 0
    # Each candidate alone in its slate.
    for j in range(b["cand_item"].shape[1]):
        alone = _permute_candidates(b, torch.tensor([j]))
        got = _scores(model, alone, cat)[:, 0]
        torch.testing.assert_close(got[mask[:, j]], base[:, j][mask[:, j]], rtol=0, atol=1e-5)
    # Replacing every other candidate with different posts changes nothing for candidate 0.
    swapped = dict(b)
    swapped["cand_item"] = b["cand_item"].clone()
    swapped["cand_item"][:, 1:] = (torch.flip(b["cand_item"][:, 1:], dims=[0]) + 1) % len(
        cat.content
    )
    torch.testing.assert_close(_scores(model, swapped, cat)[:, 0], base[:, 0], rtol=0, atol=1e-5)


def test_a_candidate_and_the_history_do_change_scores(setup):
    """The isolation tests above would pass for a constant model: show inputs matter."""
    data, cat, model = setup
    b = ranker_batch(data)
    base = _scores(model, b, cat)
    changed = dict(b)
    changed["cand_item"] = b["cand_item"].clone()
    changed["cand_item"][:, 0] = (b["cand_item"][:, 0] + 1) % len(cat.content)
    out = _scores(model, changed, cat)
    assert (out[:, 0] - base[:, 0]).abs().max() > 1e-3
    torch.testing.assert_close(out[:, 1:], base[:, 1:], rtol=0, atol=1e-5)
    no_history = dict(b)
    no_history["hist_item"] = torch.zeros_like(b["hist_item"])
    has_history = (b["hist_item"] > 0).any(1)
    assert has_history.any()
    diff = (_scores(model, no_history, cat) - base).abs().amax(dim=(1, 2))
    assert (diff[has_history] > 1e-4).all()


def test_padding_is_invisible(setup):
    """Garbage in padded history slots and padded candidate slots changes no real score."""
    data, cat, model = setup
    b = ranker_batch(data)
    base = _scores(model, b, cat)
    noisy = dict(b)
    pad_h = b["hist_item"] == 0
    assert pad_h.any()
    g = torch.Generator().manual_seed(0)
    noisy["hist_actions"] = torch.where(
        pad_h.unsqueeze(-1), torch.rand(b["hist_actions"].shape, generator=g), b["hist_actions"]
    )
    noisy["hist_dwell"] = torch.where(pad_h, torch.full_like(b["hist_dwell"], 7.0), b["hist_dwell"])
    noisy["hist_age"] = torch.where(pad_h, torch.full_like(b["hist_age"], 3), b["hist_age"])
    out = _scores(model, noisy, cat)
    real = b["cand_item"] > 0
    torch.testing.assert_close(out[real], base[real], rtol=0, atol=1e-5)

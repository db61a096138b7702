"""Retrieval recall is per query: the batching that bounds its memory changes no figure."""

import numpy as np

from feed_dagster.models import two_tower
from feed_dagster.models.two_tower import retrieval_recall


def test_recall_does_not_depend_on_the_batch_size(monkeypatch):
    rng = np.random.default_rng(0)
    n_items, n_queries = 400, 97
    items = rng.normal(size=(n_items, 8)).astype(np.float32)
    users = rng.normal(size=(n_queries, 8)).astype(np.float32)
    published = np.sort(rng.integers(0, 10**12, n_items))
    published[0] = 0  # row 0 is the padding item
    targets = rng.integers(1, n_items, n_queries)
    times = published[targets] + rng.integers(1, 10**11, n_queries)
    whole = retrieval_recall(users, targets, times, items, published, ks=(5, 50))
    assert 0 < whole["recall@50"] < 1
    # A catalog too big for the batch: scored a few queries at a time.
    monkeypatch.setattr(two_tower, "_SCORE_CELLS", 3 * n_items)
    assert retrieval_recall(users, targets, times, items, published, ks=(5, 50)) == whole


def test_recall_scores_each_query_against_its_window_only():
    """Queries out of time order, a window narrower than the catalog's span: the same
    figures as scoring every query against every item (no window = the whole past)."""
    rng = np.random.default_rng(1)
    n_items, n_queries = 500, 120
    items = rng.normal(size=(n_items, 8)).astype(np.float32)
    users = rng.normal(size=(n_queries, 8)).astype(np.float32)
    published = rng.integers(0, 10 * 3_600_000_000, n_items)  # unsorted rows
    published[0] = 0
    targets = rng.integers(1, n_items, n_queries)
    times = published[targets] + rng.integers(1, 3 * 3_600_000_000, n_queries)
    for hours in (2.0, None):
        got = retrieval_recall(users, targets, times, items, published, (5, 50), hours)
        scores = users @ items.T
        own = scores[np.arange(n_queries), targets][:, None]
        t = times[:, None]
        valid = (np.arange(n_items) > 0)[None, :] & (published[None, :] < t)
        if hours is not None:
            valid &= published[None, :] >= t - int(hours * 3_600_000_000)
        rank = ((scores > own) & valid).sum(1)
        assert got["recall@5"] == (rank < 5).mean()
        assert got["recall@50"] == (rank < 50).mean()
        assert got["corpus_mean"] == valid.sum(1).mean()

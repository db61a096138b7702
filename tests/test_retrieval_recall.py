"""Retrieval recall is per query: the batching that bounds its memory changes no figure."""

import numpy as np
import pytest

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


@pytest.mark.parametrize("cells", [None, 3 * 500, 40 * 500])
def test_recall_scores_each_query_against_its_window_only(monkeypatch, cells):
    """Queries out of time order, a window narrower than the catalog's span: the same
    figures as scoring every query against every item (no window = the whole past), in one
    batch or in batches whose queries' windows start and end inside the batch's items."""
    if cells is not None:
        monkeypatch.setattr(two_tower, "_SCORE_CELLS", cells)
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


def test_recall_computes_only_the_vectors_its_windows_and_targets_need():
    rng = np.random.default_rng(2)
    n_items, n_queries = 600, 50
    items = rng.normal(size=(n_items, 8)).astype(np.float32)
    users = rng.normal(size=(n_queries, 8)).astype(np.float32)
    published = rng.integers(0, 100 * 3_600_000_000, n_items)
    published[0] = 0
    # Queries in the catalog's last tenth; some targets older than the 2 h window.
    times = rng.integers(90 * 3_600_000_000, 100 * 3_600_000_000, n_queries)
    targets = rng.integers(1, n_items, n_queries)
    asked: list[np.ndarray] = []

    def vectors_of(rows: np.ndarray) -> np.ndarray:
        asked.append(rows)
        return items[rows]

    whole = retrieval_recall(users, targets, times, items, published, (5, 50), 2.0)
    assert retrieval_recall(users, targets, times, vectors_of, published, (5, 50), 2.0) == whole
    window = 2 * 3_600_000_000
    needed = (published >= times.min() - window) & (published < times.max())
    needed[0] = False
    needed[targets] = True
    assert set(np.concatenate(asked).tolist()) == set(np.flatnonzero(needed).tolist())
    assert needed.sum() < n_items / 4

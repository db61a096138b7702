"""search_sorted and unique give exactly np.searchsorted's and np.unique's answers."""

from __future__ import annotations

import numpy as np
import pytest

from feed_dagster.sorted_search import search_sorted, unique


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("n_needles", [10, 50_000])
def test_equals_numpy_searchsorted(side: str, n_needles: int) -> None:
    rng = np.random.default_rng(0)
    haystack = np.sort(rng.integers(0, 1_000, 300_000))  # many repeated keys
    # Repeated needles, needles between and beyond the keys, as a 2-D array too.
    needles = rng.integers(-5, 1_005, n_needles)
    expected = np.searchsorted(haystack, needles, side=side)
    assert np.array_equal(search_sorted(haystack, needles, side), expected)
    grid = needles[: n_needles // 2 * 2].reshape(2, -1)
    got = search_sorted(haystack, grid, side)
    assert got.shape == grid.shape
    assert np.array_equal(got, np.searchsorted(haystack, grid, side=side))


def test_empty_inputs() -> None:
    assert search_sorted(np.arange(10), np.array([], dtype=np.int64)).size == 0
    assert np.array_equal(
        search_sorted(np.array([], dtype=np.int64), np.arange(5_000)), np.zeros(5_000)
    )


@pytest.mark.parametrize(
    "values",
    [
        np.random.default_rng(1).integers(-(10**12), 10**12, 50_000),  # wide, unsorted
        np.random.default_rng(2).integers(0, 300, 50_000),  # many repeats
        np.arange(1_000) // 3,  # already ascending
        np.random.default_rng(3).integers(0, 9, (40, 25)),  # 2-D: flattened, as np.unique
        np.zeros(0, dtype=np.int64),
    ],
)
def test_unique_equals_numpy_unique(values: np.ndarray) -> None:
    got = unique(values)
    want = np.unique(values)
    assert got.dtype == want.dtype
    assert np.array_equal(got, want)

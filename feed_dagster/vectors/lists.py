"""An inverted-list index over vectors held in memory (a feed run's candidate window), for
top-k by dot product where exact search costs too much.

At 1M users the 48-hour window holds 1.43M posts. The exact top-1,000 of a batch of 512
users is a 94 GFLOP product and a top-k over 732M scores: 5.5 s on one core, 39% of a
feed shard's time. LanceDB's own IVF index covers the whole table (10M posts), where the
window's filter costs more than the index saves (59 s against 5 s, vectors.table).

Here the window's vectors are clustered once (k-means on a sample, by Euclidean distance,
which the vectors' norms need not fit) into about sqrt(n) lists. A query scores the
lists' centroids and then only the vectors of its `nprobe` best lists, which are a few
percent of the window. The products are made per list, with every query that probes it:
a list's vectors are read once per batch, not once per query.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

# From this many vectors up, the in-memory search goes through lists (search_batch): at
# 1.43M (synthetic:l's window) exact search took 7.2 s a batch of 512 queries, the lists
# 1.3 s with 99.7% of the exact top-1,000. Below, exact search is the reference and cheap
# enough (synthetic:m's window, 143k, stays exact), and recall there was not measured.
LISTS_FROM = 1_000_000
# The share of lists a query probes: 60 of synthetic:l's 1,195 lists, 5% of its window;
# never fewer than MIN_PROBES lists (a few lists of a small window miss more).
PROBED = 0.05
MIN_PROBES = 16
# Points k-means learns the centroids from, per list: the assignment of every vector is
# what the index is made of, and it takes one more pass.
SAMPLE_PER_LIST = 64
ITERATIONS = 8
# Queries whose candidate scores are held at once: [chunk, probed vectors] floats (about
# 200 MB for 512 queries at synthetic:l). Each chunk costs a Python step per list, so a
# feed batch of 512 users is searched in one: 0.86 s at l's shape against 1.10 s in four.
QUERY_CHUNK = 512
# Vectors assigned to lists per product of the build ([chunk, lists] scores).
ASSIGN_CHUNK = 65_536


@dataclass(frozen=True)
class ListIndex:
    """Vectors grouped by list: list l holds rows offsets[l]:offsets[l + 1] of `vectors`
    and `ids`."""

    centroids: np.ndarray  # float32 [lists, dim]
    offsets: np.ndarray  # int64 [lists + 1]
    vectors: np.ndarray  # float32 [n, dim], grouped by list
    ids: np.ndarray  # int64 [n]: the id of each row of `vectors`

    @classmethod
    def build(
        cls,
        ids: np.ndarray,
        matrix: np.ndarray,
        n_lists: int | None = None,
        seed: int = 0,
    ) -> ListIndex:
        """Lists of the rows of `matrix` [n, dim] (ids[i] the id of row i): about sqrt(n)
        of them unless `n_lists` is given."""
        x = np.ascontiguousarray(matrix, dtype=np.float32)
        n = len(x)
        if len(ids) != n:
            raise ValueError(f"{len(ids)} ids for {n} vectors")
        lists = max(1, min(n, n_lists or round(math.sqrt(n))))
        rng = np.random.default_rng(seed)
        sample = x[np.sort(rng.choice(n, min(n, SAMPLE_PER_LIST * lists), replace=False))]
        centroids = sample[rng.choice(len(sample), lists, replace=False)].copy()
        points = torch.from_numpy(sample)
        for _ in range(ITERATIONS):
            assigned = _nearest(sample, centroids)
            sums = torch.zeros(lists, x.shape[1]).index_add_(0, torch.from_numpy(assigned), points)
            counts = np.bincount(assigned, minlength=lists)
            filled = counts > 0
            # An empty list keeps its centroid: it may still take vectors in the last pass.
            centroids[filled] = sums.numpy()[filled] / counts[filled, None]
        assigned = _nearest(x, centroids)
        order = np.argsort(assigned, kind="stable")
        offsets = np.zeros(lists + 1, np.int64)
        offsets[1:] = np.cumsum(np.bincount(assigned, minlength=lists))
        return cls(
            centroids=centroids,
            offsets=offsets,
            vectors=x[order],
            ids=np.asarray(ids, np.int64)[order],
        )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_lists(self) -> int:
        return len(self.centroids)

    def probes(self) -> int:
        """The lists a query probes by default: PROBED of them, at least MIN_PROBES."""
        return min(self.n_lists, max(MIN_PROBES, math.ceil(PROBED * self.n_lists)))

    def search(
        self,
        queries: np.ndarray,
        k: int,
        nprobe: int | None = None,
        exclude: pl.DataFrame | None = None,
    ) -> pl.DataFrame:
        """(query_idx, article_id, score) of the best `k` of each query's `nprobe` lists
        (default: `probes()`), never an (query_idx, article_id) pair of `exclude` (masked
        before the top-k, so they take no room in it); best first within a query."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        nprobe = max(1, min(nprobe or self.probes(), self.n_lists))
        cells = excluded_cells(self.ids, exclude, len(q))
        parts = []
        with torch.inference_mode():
            centroids = torch.from_numpy(self.centroids)
            for start in range(0, len(q), QUERY_CHUNK):
                part = torch.from_numpy(q[start : start + QUERY_CHUNK])
                probed = torch.topk(part @ centroids.T, nprobe, dim=1).indices.numpy()
                sel = (cells[0] >= start) & (cells[0] < start + len(part))
                parts.append(
                    self._search_chunk(
                        part, probed, k, (cells[0][sel] - start, cells[1][sel])
                    ).with_columns(pl.col("query_idx") + start)
                )
        return pl.concat(parts) if parts else _empty()

    def _search_chunk(
        self,
        part: torch.Tensor,
        probed: np.ndarray,
        k: int,
        cells: tuple[np.ndarray, np.ndarray],
    ) -> pl.DataFrame:
        n_queries, nprobe = probed.shape
        sizes = np.diff(self.offsets)[probed]  # [queries, nprobe]
        # Where each probed list's scores start in its query's row of the score block.
        starts = np.zeros_like(sizes)
        np.cumsum(sizes[:, :-1], axis=1, out=starts[:, 1:])
        width = int(sizes.sum(1).max())
        if width == 0:
            return _empty()
        block = torch.full((n_queries, width), float("-inf"))
        flat_block = block.view(-1)
        vectors = torch.from_numpy(self.vectors)
        # Every (query, list) probe, grouped by list: one product per list.
        flat = probed.ravel()
        order = np.argsort(flat, kind="stable")
        bounds = np.r_[0, np.flatnonzero(np.diff(flat[order])) + 1, order.size]
        # Where each probe's scores start in the flattened block, in the probes' list order:
        # one 1-d index per list is a third cheaper to write through than (row, column).
        first = torch.from_numpy((order // nprobe) * width + starts.ravel()[order])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            lst = int(flat[order[a]])
            lo, hi = int(self.offsets[lst]), int(self.offsets[lst + 1])
            if hi == lo:
                continue
            rows = torch.from_numpy(order[a:b] // nprobe)
            scores = part[rows] @ vectors[lo:hi].T
            flat_block[(first[a:b, None] + torch.arange(hi - lo)).view(-1)] = scores.view(-1)
        if len(cells[0]):
            # An excluded pair is masked where its list landed in its query's row, if probed.
            slot = np.full((n_queries, self.n_lists), -1, np.int64)
            slot[np.arange(n_queries)[:, None], probed] = starts
            query, position = cells
            lst = np.searchsorted(self.offsets, position, side="right") - 1
            at = slot[query, lst]
            hit = at >= 0
            column = at[hit] + position[hit] - self.offsets[lst[hit]]
            block[torch.from_numpy(query[hit]), torch.from_numpy(column)] = float("-inf")
        top = torch.topk(block, min(k, width), dim=1)
        column = top.indices.numpy()
        score = top.values.numpy()
        # Back from a column to its list (the probe slot whose span holds it) and row.
        # (Each query's starts ascend: its probe slot is the last start at or before.)
        slot_of = (column[:, :, None] >= starts[:, None, :]).sum(2) - 1
        query = np.arange(n_queries)[:, None].repeat(column.shape[1], 1)
        lst = probed[query, slot_of]
        position = self.offsets[lst] + column - starts[query, slot_of]
        keep = np.isfinite(score)
        return pl.DataFrame(
            {
                "query_idx": query[keep].astype(np.int64),
                "article_id": self.ids[position[keep]],
                "score": score[keep],
            }
        )


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The index of each row's nearest centroid by Euclidean distance: the largest
    x . c - |c|^2 / 2."""
    out = np.empty(len(x), np.int64)
    with torch.inference_mode():
        c = torch.from_numpy(centroids)
        half = (-0.5 * (c * c).sum(1)).expand(min(ASSIGN_CHUNK, len(x)), -1)
        block = torch.empty(half.shape)
        for start in range(0, len(x), ASSIGN_CHUNK):
            part = torch.from_numpy(x[start : start + ASSIGN_CHUNK])
            # One block reused, the bias added by the product itself.
            scores = torch.addmm(half[: len(part)], part, c.T, out=block[: len(part)])
            out[start : start + len(part)] = scores.argmax(1).numpy()
    return out


def excluded_cells(
    ids: np.ndarray, exclude: pl.DataFrame | None, n_queries: int
) -> tuple[np.ndarray, np.ndarray]:
    """(query, row) of each excluded (query_idx, article_id) pair of `exclude` whose article
    is ids[row], for queries 0..n_queries-1: the cells a search masks before its top-k."""
    if exclude is None or exclude.is_empty():
        return np.empty(0, np.int64), np.empty(0, np.int64)
    rows = pl.DataFrame({"article_id": ids, "row": np.arange(len(ids), dtype=np.int64)})
    hit = exclude.join(rows, on="article_id").filter(
        (pl.col("query_idx") >= 0) & (pl.col("query_idx") < n_queries)
    )
    return hit["query_idx"].to_numpy(), hit["row"].to_numpy()


def _empty() -> pl.DataFrame:
    return pl.DataFrame(schema={"query_idx": pl.Int64, "article_id": pl.Int64, "score": pl.Float32})

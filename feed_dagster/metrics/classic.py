"""Classic collaborative-filtering peers: the bar every learned ranker has to clear.

Each method is fitted once, at a cut time, on the positive engagements (any of
POSITIVE_ACTIONS) with engaged_at strictly before the cut; negative-only rows (e.g. just
not_interested) are ignored. Users and articles are the ones seen in that data.

* popularity_all_time: positive engagement rows per article before the cut.
* item_knn: item-item cosine similarity over the binary user x item matrix,
  sim(i, j) = |U_i & U_j| / (sqrt(|U_i| |U_j|) + shrink), the top k neighbours kept per item.
  Score of (u, i) = sum of sim(i, j) over the items j in u's history (Sarwar et al. 2001).
* als: implicit-feedback ALS (Hu, Koren, Volinsky 2008) from the `implicit` package on the
  binary matrix with confidence 1 + alpha; score = user factor . item factor.
* ease: EASE (Steck 2019), B = I - P / diag(P) with P = (X^T X + lambda I)^-1 over the
  `ease_items` articles with most positive engagements in the `ease_window_hours` before the
  cut (None = all time); score of (u, i) = X_u . B[:, i]. The window matters in a feed:
  all-time favourites are old posts nobody is shown any more (on the demo world the
  all-time top 4,000 covered 8% of the next day's impression rows, the last 24 h's 31%).

Fallback: a user or an article not seen before the cut (and, for ease, an article outside
its item set) scores 0.0, so every score is finite. For popularity, item_knn and ease 0 is
"no evidence"; for als it is the neutral dot product (factors can score below it).

Scale: nothing builds a dense users x items matrix. item_knn forms X^T X in item blocks
sized by their multiply cost and keeps only the top k per row; ease inverts an
ease_items x ease_items Gram matrix; pair scoring runs in chunks of pairs.

Hyperparameters (HYPER_DEFAULTS) were chosen on validation splits strictly before the
held-out period, each fitted at its first impression: the demo world's impressions of the
1.5 days before heldout_start (87k rows) and synthetic EBNeRD's train-split impressions
(1,000 users, 3,000 articles, 155k rows). Only 49% (demo) and 21% (EBNeRD) of those rows
show an article engaged with before the cut; every other row gets the fallback, whatever
the hyperparameters, so they were compared on click AUC over the seen-article rows
(demo / EBNeRD; grids: k 25-400 x shrink 0-50, lambda 10-2000, factors 32-128 x
regularization 0.01-10 x alpha 1-40):

    item_knn  k=200, shrink=10     0.612 / 0.624   (best single: 0.618 at shrink 0 / 0.635)
    als       f=32, reg=1, a=10    0.627 / 0.608   (0.633 at a=40 / 0.657 at reg=10, a=1,
                                                    which loses on all rows: 0.489 vs 0.509)
    ease      lambda=250, 24 h     0.553 / 0.619   (EBNeRD peaks at 0.637 with lambda 1000)
    popularity_all_time            0.505 / 0.605

ALS stops after 6 iterations rather than implicit's 15. Held-out click AUC, 15 / 8 / 6
iterations: demo 0.5475 / 0.5467 / 0.5463 (9k impressions), catalog 0.7692 / 0.7678 /
0.7676 (1.6k), synthetic EBNeRD 0.5146 / 0.5154 / 0.5150 (10k); m world 0.5413 / 0.5412
(36k), then 0.5412 / 0.5408 at 8 / 6 (39.5k): moves of at most 0.0016 either way, inside
these samples' noise. Fewer cost more (5 iterations: catalog 0.7623, 4: 0.7552). ALS is
most of a classic fit's time and a run makes five (at 100k users the serving fit took
79.6 s at 8 iterations, 52.3 s at 6).

Everything runs on one BLAS thread, so repeated fits are bit-identical. ALS solves each
user's (each item's) factors on its own from the other side's, so its threads only share
out the rows: it uses every core, with the same factors as on one (at 100k users, 20%
faster on two cores; the fits run where the other core would idle).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares
from scipy.linalg import lapack
from threadpoolctl import threadpool_limits

from feed_dagster.data.schema import POSITIVE_ACTIONS
from feed_dagster.metrics.baselines import SCORE
from feed_dagster.sorted_search import distinct, unique

CLASSIC_METHODS: tuple[str, ...] = ("popularity_all_time", "item_knn", "als", "ease")

HYPER_DEFAULTS: dict[str, Any] = {
    "knn_k": 200,
    "knn_shrink": 10.0,
    "als_factors": 32,
    "als_regularization": 1.0,
    "als_alpha": 10.0,
    "als_iterations": 6,
    "ease_lambda": 250.0,
    "ease_items": 4000,
    "ease_window_hours": 24.0,
    "seed": 0,
}

# Pair scoring gathers one sparse/dense row per pair; chunks bound that memory on big inputs.
# item-kNN gathers a neighbour row and a history row (up to 200 entries each) per pair: at
# 100k users, 262k-pair chunks held about 2 GB at once, 32k-pair chunks an eighth of it.
_PAIR_CHUNK = 32_768
# item-kNN pairs scored by a sparse (items x users) product, made in slices of at most this
# many cells, when it has at most that many or spans at most _PRODUCT_USERS users (a feed
# batch: at 100k users, 512 users' candidates span 68k posts, 35M cells of which 800k are
# not 0); else pair by pair.
_DENSE_CELLS = 2**25
_PRODUCT_USERS = 4096
# Threads of an ALS fit and of item-kNN rows: neither result depends on them (module doc).
ALS_THREADS = os.cpu_count() or 1
KNN_THREADS = os.cpu_count() or 1
# Multiply-adds per X^T X block in item_knn: bounds the block's nonzeros (and memory).
_KNN_BLOCK_FLOPS = 20_000_000

Baseline = Callable[..., pl.DataFrame]


def positive_rows(columns: list[str], cut: datetime) -> pl.Expr | None:
    """The filter of positive engagement rows strictly before the cut (None: the frame has
    no positive action column, so no row is positive)."""
    actions = [a for a in POSITIVE_ACTIONS if a in columns]
    if not actions:
        return None
    return pl.any_horizontal([pl.col(a).fill_null(False) for a in actions]) & (
        pl.col("engaged_at") < cut
    )


def positive_rows_sql(columns: set[str] | list[str]) -> str | None:
    """positive_rows' test of a row's actions as SQL (a missing action is no action; None:
    no positive action column). The caller adds the cut."""
    actions = [a for a in POSITIVE_ACTIONS if a in columns]
    return " or ".join(f'coalesce("{a}", false)' for a in actions) or None


def positive_pairs(engagements: pl.DataFrame, cut: datetime) -> pl.DataFrame:
    """(user_id, article_id, engaged_at) of positive engagement rows strictly before the cut."""
    keep = positive_rows(engagements.columns, cut)
    if keep is None:
        return pl.DataFrame(
            schema={"user_id": pl.Int64, "article_id": pl.Int64, "engaged_at": pl.Datetime("us")}
        )
    return engagements.filter(keep).select(
        pl.col("user_id").cast(pl.Int64), pl.col("article_id").cast(pl.Int64), "engaged_at"
    )


def _lookup(vocab: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Index of each id in the sorted vocab, -1 when absent. Each distinct id is looked up
    once: a feed batch's hundreds of thousands of pairs hold a few thousand posts."""
    ids = np.asarray(ids, dtype=np.int64)
    if vocab.size == 0:
        return np.full(ids.shape, -1, dtype=np.int64)
    values, inverse = distinct(ids.ravel())
    pos = np.minimum(np.searchsorted(vocab, values), vocab.size - 1)
    return np.where(vocab[pos] == values, pos, -1)[inverse].reshape(ids.shape)


def _block_topk(
    c: sp.csr_matrix, row_ids: np.ndarray, norm: np.ndarray, k: int, shrink: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cosine of a block of co-engagement rows (row r of `c` is item row_ids[r]), top k per
    row -> (rows, cols, sims).

    Rows are sorted once on an int64 key (row, then descending float32 similarity): the
    IEEE bits of a non-negative float order like its value, so the key is exact, and the
    stable sort breaks ties by the (deterministic) position in the product.
    """
    local = np.repeat(np.arange(c.shape[0], dtype=np.int64), np.diff(c.indptr))
    item = row_ids[local]
    cols = c.indices
    sim = c.data.astype(np.float32)
    sim /= norm[item] * norm[cols] + np.float32(shrink)
    sim[cols == item] = 0.0  # an item is not its own neighbour
    inverted = (np.uint32(0xFFFFFFFF) - sim.view(np.uint32)).astype(np.int64)
    order = np.argsort((local << 32) | inverted, kind="stable")
    rank = np.arange(order.size) - c.indptr[local[order]]
    keep = order[rank < k]
    keep = keep[sim[keep] > 0]
    return item[keep], cols[keep], sim[keep]


def _item_knn_rows(
    x: sp.csr_matrix, xt: sp.csr_matrix, rows: np.ndarray, k: int, shrink: float
) -> sp.csr_matrix:
    """Rows `rows` of the top-k cosine neighbour matrix (row i = neighbours of item i, no
    self-similarity); every other row empty. A row depends on nothing but its own item, so
    rows computed apart equal rows computed together."""
    n_items = x.shape[1]
    norm = np.sqrt(np.diff(xt.indptr)).astype(np.float32)
    # In item order, so the blocks' rows follow one another and the matrix is assembled
    # row by row: a (row, col, value) list of every neighbour, converted at the end, held
    # about 50 bytes per neighbour at once (3 GB for the rows of 60k slates at 100k users).
    rows = unique(np.asarray(rows, dtype=np.int64))
    # Cost of row i of X^T X = sum over its users of their history length; blocks of rows
    # with a bounded cost keep the product's memory bounded on big worlds; the threads'
    # blocks in flight together stay within one block's budget.
    cost = np.cumsum(xt[rows] @ np.diff(x.indptr).astype(np.float64))
    budget = _KNN_BLOCK_FLOPS / max(1, KNN_THREADS)
    bounds = [0]
    while bounds[-1] < rows.size:
        start = bounds[-1]
        stop = int(np.searchsorted(cost, cost[start] + budget, side="right"))
        bounds.append(max(stop, start + 1))

    def block_rows(start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        block = rows[start:stop]
        r, c, v = _block_topk(xt[block] @ x, block, norm, k, shrink)
        # Canonical CSR order: by row, then column.
        order = np.lexsort((c, r))
        counts = np.bincount(np.searchsorted(block, r), minlength=block.size)
        return counts, c[order].astype(np.int32), v[order].astype(np.float32)

    # Blocks are independent, and scipy's product and numpy's sorts let go of the GIL:
    # threads share them out, and the blocks are put together in order.
    with ThreadPoolExecutor(KNN_THREADS) as pool:
        done = list(pool.map(block_rows, bounds[:-1], bounds[1:]))
    counts = np.zeros(n_items, dtype=np.int64)
    counts[rows] = np.concatenate([d[0] for d in done]) if done else 0
    cols = [d[1] for d in done]
    sims = [d[2] for d in done]
    if not cols:
        return sp.csr_matrix((n_items, n_items), dtype=np.float32)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    out = sp.csr_matrix(
        (np.concatenate(sims), np.concatenate(cols), indptr), shape=(n_items, n_items)
    )
    out.has_canonical_format = True  # sorted by row and column, one entry per cell
    return out


def _item_knn(x: sp.csr_matrix, k: int, shrink: float) -> sp.csr_matrix:
    """Top-k cosine neighbours of every item (row i = neighbours of item i)."""
    return _item_knn_rows(x, x.T.tocsr(), np.arange(x.shape[1]), k, shrink)


def _spd_inverse(a: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite float32 matrix via Cholesky (half the work
    of inv). float32 is enough for EASE's ridge-regularised Gram matrix (B differed from
    float64 by 3e-8 relative at 4,000 items) and three times faster."""
    if a.size == 0:
        return a.copy()
    chol, info = lapack.spotrf(a, lower=False)
    if info != 0:
        raise np.linalg.LinAlgError(f"spotrf failed (info={info})")
    inv, info = lapack.spotri(chol, lower=False)
    if info != 0:
        raise np.linalg.LinAlgError(f"spotri failed (info={info})")
    # spotri fills only the upper triangle; mirror it (a masked copy: a third of np.triu's time)
    lower = np.tri(inv.shape[0], k=-1, dtype=bool)
    inv[lower] = inv.T[lower]
    return inv


def _sparse_pair_dot(
    a: sp.csr_matrix, a_idx: np.ndarray, b: sp.csr_matrix, b_idx: np.ndarray
) -> np.ndarray:
    """Row-wise dot products a[a_idx[p]] . b[b_idx[p]] for every pair p, in chunks."""
    out = np.zeros(a_idx.size, dtype=np.float64)
    for s in range(0, a_idx.size, _PAIR_CHUNK):
        sl = slice(s, s + _PAIR_CHUNK)
        prod = a[a_idx[sl]].multiply(b[b_idx[sl]])
        out[sl] = np.asarray(prod.sum(axis=1)).ravel()
    return out


def _item_knn_scores(
    knn: sp.csr_matrix, history: sp.csr_matrix, items: np.ndarray, users: np.ndarray
) -> np.ndarray:
    """knn[items[p]] . history[users[p]] for every pair p.

    A feed batch scores every candidate of a few hundred users: few distinct users and
    items for many pairs. One sparse product of the distinct items' rows with the distinct
    users' histories then gives every pair at once, where gathering two sparse rows per pair
    took a quarter of a feed shard's time at 100k users. The product stays sparse, as
    most (post, user) cells are 0 (no neighbour of the post in the history), and each
    pair is read off it. Scattered pairs (training slates) keep the pairwise path."""
    if items.size == 0:
        return np.zeros(0, dtype=np.float64)
    ui, u_at = np.unique(users, return_inverse=True)
    ii, i_at = np.unique(items, return_inverse=True)
    if len(ui) * len(ii) > _DENSE_CELLS and len(ui) > _PRODUCT_USERS:
        return _sparse_pair_dot(knn, items, history, users)
    # The product in slices of at most _DENSE_CELLS cells, which bound its memory. (Sizing
    # it first by its multiply-adds cost more than making it: at 1M users a batch's 415k
    # posts have 82M neighbours to look up and 454k multiply-adds.) The users' histories
    # are transposed once, not by every slice's product.
    histories_t = history[ui].T.tocsr()
    step = max(1, _DENSE_CELLS // len(ui))
    out = np.empty(items.size, dtype=np.float64)
    for start in range(0, len(ii), step):
        sel = np.flatnonzero((i_at >= start) & (i_at < start + step))
        block = (knn[ii[start : start + step]] @ histories_t).tocsr()
        block.sort_indices()
        out[sel] = np.asarray(block[i_at[sel] - start, u_at[sel]], dtype=np.float64).ravel()
    return out


@dataclass
class ClassicPeers:
    """The classic methods fitted at `cut`; see the module doc for definitions.

    Build with `ClassicPeers.fit`, then `score` (arrays) or `score_frame` (a pairs frame).
    """

    cut: datetime
    methods: tuple[str, ...]
    hyper: dict[str, Any]
    user_ids: np.ndarray  # sorted ids of users with a positive engagement before the cut
    item_ids: np.ndarray  # sorted ids of articles with one
    history: sp.csr_matrix  # binary users x items
    popularity: np.ndarray | None = None
    # items x items, top-k per row; rows are computed when first scored (see knn_rows)
    knn: sp.csr_matrix | None = None
    _knn_done: np.ndarray | None = field(default=None, repr=False)  # bool per item row
    _history_t: sp.csr_matrix | None = field(default=None, repr=False)  # items x users
    user_factors: np.ndarray | None = None
    item_factors: np.ndarray | None = None
    ease_items: np.ndarray | None = None  # item indices in the EASE set, by rank
    ease_b: np.ndarray | None = None  # len(ease_items) square, B[j, i] = weight of j for i
    _ease_pos: np.ndarray | None = field(default=None, repr=False)  # item index -> EASE column
    _ease_x: sp.csr_matrix | None = field(default=None, repr=False)  # history, EASE columns

    @classmethod
    def fit(
        cls,
        engagements: pl.DataFrame,
        cut: datetime,
        methods: tuple[str, ...] = CLASSIC_METHODS,
        **hyper: Any,
    ) -> ClassicPeers:
        """Fit `methods` on positive engagements strictly before `cut`.

        Hyperparameters override HYPER_DEFAULTS by name (knn_k, knn_shrink, als_factors,
        als_regularization, als_alpha, als_iterations, ease_lambda, ease_items,
        ease_window_hours, seed).
        """
        return cls.fit_pairs(positive_pairs(engagements, cut), cut, methods, **hyper)

    @classmethod
    def fit_pairs(
        cls,
        pairs: pl.DataFrame,
        cut: datetime,
        methods: tuple[str, ...] = CLASSIC_METHODS,
        **hyper: Any,
    ) -> ClassicPeers:
        """`fit` on `pairs`, the (user_id, article_id, engaged_at) of the positive
        engagements before `cut` as positive_pairs selects them (or as the warehouse hands
        them over, metrics.fit_store.read_positive_pairs). The fit does not depend on the
        rows' order."""
        unknown_methods = set(methods) - set(CLASSIC_METHODS)
        if unknown_methods:
            raise ValueError(f"unknown methods {sorted(unknown_methods)}; known {CLASSIC_METHODS}")
        unknown = set(hyper) - set(HYPER_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown hyperparameters {sorted(unknown)}")
        h = {**HYPER_DEFAULTS, **hyper}
        user_ids, u = distinct(pairs["user_id"].to_numpy())
        item_ids, i = distinct(pairs["article_id"].to_numpy())
        shape = (user_ids.size, item_ids.size)
        history = sp.csr_matrix((np.ones(u.size, dtype=np.float32), (u, i)), shape=shape)
        history.sum_duplicates()
        history.data[:] = 1.0  # binary: repeated engagements with an item count once
        peers = cls(
            cut=cut,
            methods=tuple(methods),
            hyper=h,
            user_ids=user_ids,
            item_ids=item_ids,
            history=history,
        )
        # One BLAS thread: the shared machine, and bit-identical refits (no reduction races).
        with threadpool_limits(limits=1):
            if "popularity_all_time" in methods:
                peers.popularity = np.bincount(i, minlength=item_ids.size).astype(np.float32)
            if "item_knn" in methods:
                # Rows are filled in on demand: a news world at 100k users has a million
                # posts, of which a scoring pass asks about the recent few thousand.
                n_items = item_ids.size
                peers.knn = sp.csr_matrix((n_items, n_items), dtype=np.float32)
                peers._knn_done = np.zeros(n_items, dtype=bool)
                peers._history_t = history.T.tocsr()
            if "als" in methods:
                peers._fit_als(h)
            if "ease" in methods:
                window = h["ease_window_hours"]
                recent = (
                    np.ones(i.size, dtype=bool)
                    if window is None
                    else (pairs["engaged_at"] >= cut - timedelta(hours=float(window))).to_numpy()
                )
                peers._fit_ease(h, np.bincount(i[recent], minlength=item_ids.size))
        return peers

    def knn_rows(self, items: np.ndarray | None = None) -> sp.csr_matrix:
        """The item-kNN matrix with the rows of item indices `items` (all when None)
        computed; rows computed once are kept."""
        if self.knn is None or self._knn_done is None:
            raise ValueError(f"method 'item_knn' was not fitted; fitted: {self.methods}")
        wanted = np.arange(self._knn_done.size) if items is None else unique(items)
        missing = wanted[~self._knn_done[wanted]]
        if missing.size:
            if self._history_t is None:
                self._history_t = self.history.T.tocsr()
            with threadpool_limits(limits=1):
                new = _item_knn_rows(
                    self.history,
                    self._history_t,
                    missing,
                    int(self.hyper["knn_k"]),
                    float(self.hyper["knn_shrink"]),
                )
            # Rows are disjoint, so the sum is their union.
            self.knn = new if self.knn.nnz == 0 else (self.knn + new).tocsr()
            self._knn_done[missing] = True
        return self.knn

    def drop_transpose(self) -> None:
        """Let go of the history's transpose, which only computing new item-kNN rows reads
        (rebuilt if one is ever missing): once every post a run scores is prepared, it is
        a fifth of a fit's size at 100k users."""
        self._history_t = None

    def _fit_als(self, h: dict[str, Any]) -> None:
        n_users, n_items = self.history.shape
        factors = int(h["als_factors"])
        if n_users == 0 or n_items == 0:
            self.user_factors = np.zeros((n_users, factors), dtype=np.float32)
            self.item_factors = np.zeros((n_items, factors), dtype=np.float32)
            return
        model = AlternatingLeastSquares(
            factors=factors,
            regularization=float(h["als_regularization"]),
            alpha=float(h["als_alpha"]),
            iterations=int(h["als_iterations"]),
            random_state=int(h["seed"]),
            num_threads=ALS_THREADS,
        )
        model.fit(self.history, show_progress=False)
        self.user_factors = np.ascontiguousarray(model.user_factors, dtype=np.float32)
        self.item_factors = np.ascontiguousarray(model.item_factors, dtype=np.float32)

    def _fit_ease(self, h: dict[str, Any], recent: np.ndarray) -> None:
        """EASE over the ease_items articles with most positive engagements in the window."""
        n_items = self.history.shape[1]
        n = min(int(h["ease_items"]), n_items)
        # most engaged first; stable on ties so the item set is deterministic
        top = np.argsort(-recent, kind="stable")[:n]
        x = self.history[:, top]
        gram = (x.T @ x).toarray().astype(np.float32)
        gram[np.diag_indices(n)] += np.float32(h["ease_lambda"])
        b = _spd_inverse(gram)
        b /= -np.diag(b).copy()[None, :]  # B[i, j] = -P[i, j] / P[j, j]
        b[np.diag_indices(n)] = 0.0
        pos = np.full(n_items, -1, dtype=np.int64)
        pos[top] = np.arange(n)
        self.ease_items = top
        self._ease_x = x.tocsr()
        self.ease_b = b
        self._ease_pos = pos

    def prepare(self, article_ids: np.ndarray) -> None:
        """Compute what scoring these articles needs ahead of the first score (their
        item-kNN rows), e.g. once for every post a feed run can score, before the fit is
        shared with the processes that score them."""
        if "item_knn" in self.methods:
            i = _lookup(self.item_ids, article_ids)
            self.knn_rows(i[i >= 0])

    def score(self, method: str, user_ids: np.ndarray, article_ids: np.ndarray) -> np.ndarray:
        """float32 score of each (user_ids[p], article_ids[p]) pair; 0 for unseen ids."""
        return self.score_at(method, *self.positions(user_ids, article_ids))

    def positions(self, user_ids: np.ndarray, article_ids: np.ndarray) -> tuple[np.ndarray, ...]:
        """(user row, item row) of each pair in the fit, -1 where unseen: what `score_at`
        takes, so several methods scoring the same pairs look them up once."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        article_ids = np.asarray(article_ids, dtype=np.int64)
        if user_ids.shape != article_ids.shape:
            raise ValueError("user_ids and article_ids must have the same shape")
        return _lookup(self.user_ids, user_ids), _lookup(self.item_ids, article_ids)

    def score_at(self, method: str, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        """`score` of pairs given by their `positions`."""
        if method not in self.methods:
            raise ValueError(f"method {method!r} was not fitted; fitted: {self.methods}")
        out = np.zeros(u.shape, dtype=np.float32)
        if method == "popularity_all_time":
            assert self.popularity is not None
            known = i >= 0
            out[known] = self.popularity[i[known]]
            return out
        both = (u >= 0) & (i >= 0)
        if method == "item_knn":
            out[both] = _item_knn_scores(self.knn_rows(i[both]), self.history, i[both], u[both])
        elif method == "als":
            assert self.user_factors is not None and self.item_factors is not None
            idx = np.flatnonzero(both)
            for s in range(0, idx.size, _PAIR_CHUNK):
                p = idx[s : s + _PAIR_CHUNK]
                out[p] = np.einsum("pf,pf->p", self.user_factors[u[p]], self.item_factors[i[p]])
        elif method == "ease":
            assert self.ease_b is not None and self._ease_pos is not None
            assert self._ease_x is not None
            idx = np.flatnonzero(both)
            idx = idx[self._ease_pos[i[idx]] >= 0]
            col = self._ease_pos[i[idx]]
            for s in range(0, idx.size, _PAIR_CHUNK):
                p, c = idx[s : s + _PAIR_CHUNK], col[s : s + _PAIR_CHUNK]
                rows = self._ease_x[u[p]]  # pairs x EASE items, sparse
                owner = np.repeat(np.arange(p.size), np.diff(rows.indptr))
                vals = rows.data * self.ease_b[rows.indices, c[owner]]
                out[p] = np.bincount(owner, weights=vals, minlength=p.size)
        return out

    def score_frame(self, pairs: pl.DataFrame) -> pl.DataFrame:
        """`pairs` (user_id, article_id) plus one float32 column per fitted method, same order."""
        users = pairs["user_id"].to_numpy()
        articles = pairs["article_id"].to_numpy()
        return pairs.select("user_id", "article_id").with_columns(
            pl.Series(m, self.score(m, users, articles), dtype=pl.Float32) for m in self.methods
        )


def _adapter(method: str) -> Baseline:
    def scores(
        impressions: pl.DataFrame,
        engagements: pl.DataFrame,
        articles: pl.DataFrame | None = None,
        follows: pl.DataFrame | None = None,
        **hyper: Any,
    ) -> pl.DataFrame:
        if impressions.height == 0:
            return impressions.with_columns(pl.lit(None, dtype=pl.Float32).alias(SCORE))
        # One fit at the earliest impression: everything it uses precedes every impression.
        cut = impressions["shown_at"].min()
        peers = ClassicPeers.fit(engagements, cut, methods=(method,), **hyper)
        s = peers.score(
            method, impressions["user_id"].to_numpy(), impressions["article_id"].to_numpy()
        )
        return impressions.with_columns(pl.Series(SCORE, s, dtype=pl.Float32))

    scores.__name__ = f"{method}_scores"
    scores.__doc__ = (
        f"Classic peer `{method}` fitted at the earliest shown_at of `impressions` "
        "(baseline signature; adds `score`, keeps row order)."
    )
    return scores


CLASSIC_PEERS: dict[str, Baseline] = {m: _adapter(m) for m in CLASSIC_METHODS}

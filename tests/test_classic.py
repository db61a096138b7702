"""Classic CF peers: fitted only on positive engagements strictly before the cut."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from feed_dagster.data.schema import conform
from feed_dagster.metrics import classic
from feed_dagster.metrics.classic import CLASSIC_METHODS, CLASSIC_PEERS, ClassicPeers

T0 = datetime(2024, 3, 1, 12, 0, 0)
CUT = T0 + timedelta(days=10)
H = timedelta(hours=1)
# Small ALS so the tiny matrices below fit in milliseconds; the structure tests do not depend
# on the factor count.
SMALL_ALS = {"als_factors": 8, "als_iterations": 20}


def engagements(rows: list[tuple[int, int, datetime]], **flags: bool) -> pl.DataFrame:
    """(user_id, article_id, engaged_at) rows, click True unless flags say otherwise."""
    df = pl.DataFrame(
        rows, schema=["user_id", "article_id", "engaged_at"], orient="row"
    ).with_columns(**{k: pl.lit(v) for k, v in {"click": True, **flags}.items()})
    return conform("engagements", df)


def two_blocks() -> pl.DataFrame:
    """Users 0-9 read block A (articles 100-105), users 10-19 block B (200-205).

    Every user reads four of the six articles of their block; user 0 never read 105.
    """
    rows = []
    for user in range(20):
        base = 100 if user < 10 else 200
        skip = (user % 6, (user + 3) % 6)
        if user == 0:
            skip = (4, 5)
        for j in range(6):
            if j not in skip:
                rows.append((user, base + j, T0 + (user * 6 + j) * H))
    return engagements(rows)


def all_pairs(users: list[int], articles: list[int]) -> tuple[np.ndarray, np.ndarray]:
    u, a = np.meshgrid(users, articles, indexing="ij")
    return u.ravel(), a.ravel()


def test_popularity_counts_positive_rows_before_the_cut() -> None:
    eng = engagements(
        [(1, 10, T0), (2, 10, T0), (1, 10, T0 + H), (3, 20, T0), (4, 20, CUT), (5, 30, CUT + H)]
    )
    peers = ClassicPeers.fit(eng, CUT, methods=("popularity_all_time",))
    got = peers.score("popularity_all_time", np.array([9, 9, 9, 9]), np.array([10, 20, 30, 40]))
    assert got.tolist() == [3.0, 1.0, 0.0, 0.0]
    assert got.dtype == np.float32


def test_item_knn_ranks_the_co_engaged_item_first() -> None:
    # 10 and 11 are read together by users 1-3; 12 only by users 4-5, who never read 10.
    rows = [(u, a, T0) for u in (1, 2, 3) for a in (10, 11)]
    rows += [(u, 12, T0) for u in (4, 5)] + [(u, 13, T0) for u in (4, 5)]
    rows += [(9, 10, T0)]
    peers = ClassicPeers.fit(engagements(rows), CUT, methods=("item_knn",))
    s = peers.score("item_knn", np.array([9, 9]), np.array([11, 12]))
    assert s[0] > 0.0
    assert s[1] == 0.0


def test_item_knn_matches_dense_cosine_with_shrink_and_top_k() -> None:
    rng = np.random.default_rng(3)
    x = (rng.random((30, 12)) < 0.3).astype(np.float64)
    rows = [(int(u), int(i), T0) for u, i in zip(*np.nonzero(x), strict=True)]
    k, shrink = 3, 2.0
    peers = ClassicPeers.fit(
        engagements(rows), CUT, methods=("item_knn",), knn_k=k, knn_shrink=shrink
    )
    # dense reference over the users and items that appear (all of them here)
    assert peers.user_ids.tolist() == sorted(set(np.nonzero(x)[0]))
    x = x[peers.user_ids][:, peers.item_ids]
    co = x.T @ x
    n = np.diag(co)
    sim = co / (np.sqrt(np.outer(n, n)) + shrink)
    np.fill_diagonal(sim, 0.0)
    kept = np.zeros_like(sim)
    for i in range(sim.shape[0]):
        # the k largest, ties to the lower column (stable sort of the negated row)
        top = np.argsort(-sim[i], kind="stable")[:k]
        kept[i, top] = sim[i, top]
    assert np.allclose(peers.knn_rows().toarray(), kept, atol=1e-6)
    expected = x @ kept.T  # score(u, i) = sum over u's items j of sim(i, j)
    u, a = all_pairs(peers.user_ids.tolist(), peers.item_ids.tolist())
    got = peers.score("item_knn", u, a).reshape(expected.shape)
    assert np.allclose(got, expected, atol=1e-5)


def test_item_knn_pairs_scored_one_by_one_equal_one_product(monkeypatch) -> None:
    rng = np.random.default_rng(6)
    x = rng.random((50, 30)) < 0.25
    rows = [(int(u), int(i), T0) for u, i in zip(*np.nonzero(x), strict=True)]
    peers = ClassicPeers.fit(engagements(rows), CUT, methods=("item_knn",), knn_k=6)
    u, a = all_pairs(peers.user_ids.tolist(), peers.item_ids.tolist())
    product = peers.score("item_knn", u, a)
    # Scattered pairs (training slates) are scored pair by pair: the same numbers.
    monkeypatch.setattr(classic, "_DENSE_CELLS", 0)
    monkeypatch.setattr(classic, "_PRODUCT_USERS", 0)
    np.testing.assert_allclose(peers.score("item_knn", u, a), product, rtol=1e-6, atol=1e-7)
    assert product.max() > 0


@pytest.mark.parametrize("cells", [2**25, 0])
def test_item_knn_sparse_product_equals_the_dense_product_bit_for_bit(monkeypatch, cells) -> None:
    """A feed batch's pairs are read off a sparse (items x users) product: the same sums in
    the same order as the dense product's, also past the dense product's cells (in
    slices then)."""
    monkeypatch.setattr(classic, "_DENSE_CELLS", cells)
    rng = np.random.default_rng(7)
    x = rng.random((80, 60)) < 0.2
    rows = [(int(u), int(i), T0) for u, i in zip(*np.nonzero(x), strict=True)]
    peers = ClassicPeers.fit(engagements(rows), CUT, methods=("item_knn",), knn_k=8)
    users = np.repeat(peers.user_ids[:12], 25)
    items = rng.choice(peers.item_ids, users.size)
    got = peers.score("item_knn", users, items)
    u = np.searchsorted(peers.user_ids, users)
    i = np.searchsorted(peers.item_ids, items)
    ui, u_at = np.unique(u, return_inverse=True)
    ii, i_at = np.unique(i, return_inverse=True)
    dense = (peers.knn_rows(i)[ii] @ peers.history[ui].T).toarray()
    np.testing.assert_array_equal(got, dense[i_at, u_at].astype(np.float32))
    assert (got == 0).any() and got.max() > 0


def test_item_knn_rows_computed_on_demand_equal_the_full_matrix() -> None:
    rng = np.random.default_rng(5)
    x = rng.random((60, 40)) < 0.2
    rows = [(int(u), int(i), T0) for u, i in zip(*np.nonzero(x), strict=True)]
    lazy = ClassicPeers.fit(engagements(rows), CUT, methods=("item_knn",), knn_k=5)
    full = ClassicPeers.fit(engagements(rows), CUT, methods=("item_knn",), knn_k=5)
    expected = full.knn_rows().toarray()
    # Scoring a few items computes their rows only, and they equal the full matrix's.
    items = lazy.item_ids[[3, 7, 7, 20]]
    users = lazy.user_ids[[0, 1, 2, 3]]
    got = lazy.score("item_knn", users, items)
    assert lazy._knn_done.sum() == 3
    assert np.array_equal(lazy.knn.toarray()[[3, 7, 20]], expected[[3, 7, 20]])
    assert not lazy.knn.toarray()[[0, 1, 2]].any()
    assert np.allclose(got, full.score("item_knn", users, items))
    # Preparing articles computes their rows (unknown ids are skipped), as scoring would.
    lazy.prepare(np.array([lazy.item_ids[30], lazy.item_ids[31], 10**12]))
    assert lazy._knn_done.sum() == 5 and lazy._knn_done[[30, 31]].all()
    assert np.array_equal(lazy.knn.toarray()[[30, 31]], expected[[30, 31]])
    # Later calls add rows without changing the earlier ones.
    lazy.score("item_knn", lazy.user_ids[:10], lazy.item_ids[:10])
    assert np.array_equal(lazy.knn_rows().toarray(), expected)


def test_ease_matches_the_closed_form() -> None:
    rng = np.random.default_rng(4)
    x = (rng.random((40, 10)) < 0.35).astype(np.float64)
    rows = [(int(u), int(i), T0) for u, i in zip(*np.nonzero(x), strict=True)]
    lam = 5.0
    peers = ClassicPeers.fit(engagements(rows), CUT, methods=("ease",), ease_lambda=lam)
    x = x[peers.user_ids][:, peers.item_ids]
    p = np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1]))
    b = np.eye(x.shape[1]) - p / np.diag(p)[None, :]
    u, a = all_pairs(peers.user_ids.tolist(), peers.item_ids.tolist())
    got = peers.score("ease", u, a).reshape(x.shape)
    assert np.allclose(got, x @ b, atol=1e-4)


def test_ease_scores_only_its_most_engaged_items() -> None:
    # article 1 by four users, 2 by three, 3 by two: with ease_items=2, 3 is outside
    rows = [(u, 1, T0) for u in range(4)] + [(u, 2, T0) for u in range(3)]
    rows += [(u, 3, T0) for u in (0, 1)]
    peers = ClassicPeers.fit(engagements(rows), CUT, methods=("ease",), ease_items=2)
    assert sorted(peers.item_ids[peers.ease_items].tolist()) == [1, 2]
    s = peers.score("ease", np.array([3, 3, 3]), np.array([1, 2, 3]))
    assert s[1] > 0.0  # user 3 read 1, and 2 co-occurs with 1
    assert s[2] == 0.0  # 3 co-occurs with 1 too, but is outside the EASE items


@pytest.mark.parametrize("method", ["item_knn", "als", "ease"])
def test_two_block_structure_is_recovered(method: str) -> None:
    peers = ClassicPeers.fit(two_blocks(), CUT, methods=(method,), **SMALL_ALS)
    s = peers.score(method, np.full(7, 0), np.array([105, 200, 201, 202, 203, 204, 205]))
    assert s[0] > s[1:].max(), s


def test_engagements_at_or_after_the_cut_change_nothing() -> None:
    eng = two_blocks()
    late = engagements(
        [(0, 200, CUT), (0, 201, CUT + H), (5, 105, CUT), (99, 100, CUT), (1, 777, CUT + H)]
    )
    a = ClassicPeers.fit(eng, CUT, **SMALL_ALS)
    b = ClassicPeers.fit(pl.concat([late, eng]), CUT, **SMALL_ALS)
    u, i = all_pairs([0, 1, 5, 12, 99], [100, 105, 200, 201, 205, 777])
    for m in CLASSIC_METHODS:
        assert np.array_equal(a.score(m, u, i), b.score(m, u, i)), m
    # the same rows one microsecond earlier do count
    early = late.with_columns(engaged_at=pl.lit(CUT - timedelta(microseconds=1)))
    c = ClassicPeers.fit(pl.concat([early, eng]), CUT, **SMALL_ALS)
    assert not np.array_equal(
        a.score("popularity_all_time", u, i), c.score("popularity_all_time", u, i)
    )


def test_unknown_users_and_items_score_zero() -> None:
    eng = two_blocks()
    peers = ClassicPeers.fit(eng, CUT, **SMALL_ALS)
    u = np.array([0, 12345, 12345, 0])
    a = np.array([99999, 100, 99999, 100])
    readers_of_100 = float(eng.filter(pl.col("article_id") == 100).height)
    for m in CLASSIC_METHODS:
        s = peers.score(m, u, a)
        assert np.isfinite(s).all()
        # popularity needs no user: an unknown user still sees the article's count
        unknown_user = readers_of_100 if m == "popularity_all_time" else 0.0
        assert s[:3].tolist() == [0.0, unknown_user, 0.0], m
        assert s[3] != 0.0, m
    frame = peers.score_frame(pl.DataFrame({"user_id": u, "article_id": a}))
    assert frame.columns == ["user_id", "article_id", *CLASSIC_METHODS]
    assert frame["popularity_all_time"].to_list() == [0.0, readers_of_100, 0.0, readers_of_100]


def test_refits_are_identical() -> None:
    eng = two_blocks()
    u, i = all_pairs(list(range(20)), [100, 101, 102, 103, 104, 105, 200, 203, 205])
    a = ClassicPeers.fit(eng, CUT).score_frame(pl.DataFrame({"user_id": u, "article_id": i}))
    b = ClassicPeers.fit(eng.sample(fraction=1.0, shuffle=True, seed=1), CUT).score_frame(
        pl.DataFrame({"user_id": u, "article_id": i})
    )
    assert a.equals(b)
    assert a["als"].abs().sum() > 0  # ALS actually fitted something


def test_negative_only_engagements_are_ignored() -> None:
    eng = two_blocks()
    negatives = engagements(
        [(0, 200, T0), (0, 201, T0), (30, 100, T0), (1, 500, T0)],
        click=False,
        not_interested=True,
    )
    only_neg = ClassicPeers.fit(negatives, CUT, **SMALL_ALS)
    assert only_neg.user_ids.size == 0 and only_neg.item_ids.size == 0
    u, i = all_pairs([0, 1, 30], [100, 200, 201, 500])
    for m in CLASSIC_METHODS:
        assert (only_neg.score(m, u, i) == 0.0).all(), m
    a = ClassicPeers.fit(eng, CUT, **SMALL_ALS)
    b = ClassicPeers.fit(pl.concat([eng, negatives]), CUT, **SMALL_ALS)
    for m in CLASSIC_METHODS:
        assert np.array_equal(a.score(m, u, i), b.score(m, u, i)), m


def test_adapters_keep_row_order_and_fit_before_the_first_impression() -> None:
    eng = two_blocks()
    first = T0 + 60 * H  # after some of the engagements, before others
    u, a = all_pairs([0, 3, 11, 99], [100, 103, 105, 200, 204, 999])
    imps = conform(
        "impressions",
        pl.DataFrame(
            {
                "impression_id": np.arange(u.size) // 6,
                "user_id": u,
                "article_id": a,
                "position": np.arange(u.size) % 6,
                "shown_at": [first + (j % 4) * H for j in range(u.size)],
                "is_heldout": True,
            }
        ),
    ).sample(fraction=1.0, shuffle=True, seed=2)
    peers = ClassicPeers.fit(eng, first, **SMALL_ALS)
    assert set(CLASSIC_PEERS) == set(CLASSIC_METHODS)
    for name, fn in CLASSIC_PEERS.items():
        scored = fn(imps, eng, None, None, **SMALL_ALS)
        assert scored.drop("score").equals(imps), name
        assert scored["score"].null_count() == 0
        expected = peers.score(name, imps["user_id"].to_numpy(), imps["article_id"].to_numpy())
        assert np.array_equal(scored["score"].to_numpy(), expected), name
    pop = CLASSIC_PEERS["popularity_all_time"](imps, eng)
    full = ClassicPeers.fit(eng, CUT, methods=("popularity_all_time",))
    later = full.score(
        "popularity_all_time", pop["user_id"].to_numpy(), pop["article_id"].to_numpy()
    )
    assert (pop["score"].to_numpy() < later).any()  # engagements after the first shown_at unused


def test_item_knn_rows_after_the_transpose_is_dropped_equal_the_full_matrix() -> None:
    rng = np.random.default_rng(8)
    x = rng.random((60, 40)) < 0.2
    rows = [(int(u), int(i), T0) for u, i in zip(*np.nonzero(x), strict=True)]
    kept = ClassicPeers.fit(engagements(rows), CUT, methods=("item_knn",), knn_k=5)
    dropped = ClassicPeers.fit(engagements(rows), CUT, methods=("item_knn",), knn_k=5)
    dropped.prepare(dropped.item_ids[:10])
    dropped.drop_transpose()
    users = np.repeat(kept.user_ids[:8], 30)
    items = rng.choice(kept.item_ids, users.size)
    got = dropped.score("item_knn", users, items)
    np.testing.assert_array_equal(got, kept.score("item_knn", users, items))
    assert got.max() > 0 and dropped._knn_done.sum() > 10


def test_item_knn_rows_assembled_block_by_block_equal_one_block(monkeypatch) -> None:
    rng = np.random.default_rng(8)
    x = sp.csr_matrix((rng.random((80, 60)) < 0.2).astype(np.float32))
    xt = x.T.tocsr()
    rows = rng.permutation(60)[:45]  # any order, as scoring asks
    whole = classic._item_knn_rows(x, xt, rows, 7, 5.0)
    monkeypatch.setattr(classic, "_KNN_BLOCK_FLOPS", 50)
    blocks = classic._item_knn_rows(x, xt, rows, 7, 5.0)
    assert whole.has_canonical_format and whole.nnz > 0
    for name in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(blocks, name), getattr(whole, name))
    # The same canonical matrix scipy builds from the (row, col, value) list.
    coo = whole.tocoo()
    rebuilt = sp.csr_matrix((coo.data, (coo.row, coo.col)), shape=whole.shape)
    np.testing.assert_array_equal(rebuilt.indices, whole.indices)
    np.testing.assert_array_equal(rebuilt.data, whole.data)


def test_als_factors_do_not_depend_on_its_threads(monkeypatch) -> None:
    """ALS shares out rows between threads, each solved on its own: one thread or two give
    the same factors bit for bit, so fits stay reproducible on any machine."""
    rng = np.random.default_rng(4)
    users, posts = rng.integers(0, 300, 4000), rng.integers(0, 500, 4000)
    rows = [(int(users[i]), int(posts[i]), T0 + i * H) for i in range(4000)]
    eng = engagements(rows)
    factors = []
    for threads in (1, 2):
        monkeypatch.setattr(classic, "ALS_THREADS", threads)
        peers = ClassicPeers.fit(eng, CUT, methods=("als",), als_iterations=5)
        factors.append((peers.user_factors, peers.item_factors))
    np.testing.assert_array_equal(factors[0][0], factors[1][0])
    np.testing.assert_array_equal(factors[0][1], factors[1][1])


def test_item_knn_rows_do_not_depend_on_the_threads(monkeypatch) -> None:
    """Blocks of rows shared out between threads are put together in order: the matrix
    equals the one-thread matrix bit for bit."""
    rng = np.random.default_rng(5)
    users, posts = rng.integers(0, 200, 6000), rng.integers(0, 300, 6000)
    eng = engagements([(int(users[i]), int(posts[i]), T0 + i * H) for i in range(6000)])
    monkeypatch.setattr(classic, "_KNN_BLOCK_FLOPS", 2_000)  # many blocks
    matrices = []
    for threads in (1, 2):
        monkeypatch.setattr(classic, "KNN_THREADS", threads)
        peers = ClassicPeers.fit(eng, CUT, methods=("item_knn",), knn_k=20)
        matrices.append(peers.knn_rows())
    one, two = matrices
    assert one.nnz > 0
    np.testing.assert_array_equal(one.indptr, two.indptr)
    np.testing.assert_array_equal(one.indices, two.indices)
    np.testing.assert_array_equal(one.data, two.data)

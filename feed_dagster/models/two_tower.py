"""Two-tower retrieval: a user tower over engagement history and an item tower over content.

Both towers end in L2-normalised vectors, so retrieval is a dot-product (cosine) top-k that an
ANN index can serve. The user tower sees only the history (no user id), so a brand-new user
gets a vector too: a learned "no history yet" token that stands for the population's tastes.
Training uses in-batch sampled softmax with logQ correction: the other positives of a batch
are the negatives, and each item's logit is reduced by the log of its sampling frequency so
popular items are not over-penalised for appearing as negatives more often.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from feed_dagster.data.schema import POSITIVE_ACTIONS
from feed_dagster.models.catalog import FeatureConfig, ItemCatalog
from feed_dagster.models.engagement_log import History
from feed_dagster.models.layers import (
    CatalogTensors,
    HashedIdEmbedding,
    HistoryEncoder,
    IsolatedBlock,
    ItemEncoder,
    history_tensors,
    id_limit,
    l2_normalise,
)
from feed_dagster.models.retrieval_data import RetrievalExamples


@dataclass(frozen=True)
class TwoTowerConfig:
    content_dim: int
    dim: int = 64
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 1
    hidden: int = 128
    temperature: float = 0.05
    emb_std: float = 0.3
    # Hashed user id next to the history in the user tower, and the post-id gate and
    # dropout of the item tower (see layers.ItemEncoder); ids first engaged at or after
    # id_cutoff_us (the end of the training data) are never used.
    user_embedding: bool = True
    id_cutoff_us: int = 0
    id_dropout: float = 0.2
    positive_actions: tuple[str, ...] = POSITIVE_ACTIONS
    features: FeatureConfig = field(default_factory=FeatureConfig)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["positive_actions"] = list(self.positive_actions)
        d["features"] = self.features.to_dict()
        d["kind"] = "two_tower"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TwoTowerConfig:
        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        kw["positive_actions"] = tuple(kw.get("positive_actions", POSITIVE_ACTIONS))
        kw["features"] = FeatureConfig.from_dict(d.get("features", {}))
        return cls(**kw)


class TwoTower(nn.Module):
    def __init__(self, cfg: TwoTowerConfig):
        super().__init__()
        self.cfg = cfg
        f, d = cfg.features, cfg.d_model
        # One item identity (content, author, topic) feeds both the history tokens of the user
        # tower and the item tower, so what a user engaged with and what is retrieved live in
        # the same learned space.
        # Author and topic embeddings start large enough to tell items apart from the first
        # step. At the usual 0.02 the in-batch softmax stayed stuck near its starting loss on
        # the EBNeRD-shaped data (no authors, 16 categories, held-out AUC 0.51); at 0.3 it
        # learnt the category tastes (0.64).
        self.item = ItemEncoder(
            cfg.content_dim,
            d,
            f.author_buckets,
            f.topic_buckets,
            f.post_buckets,
            emb_std=cfg.emb_std,
            id_dropout=cfg.id_dropout,
        )
        self.user = HashedIdEmbedding(f.user_buckets, d, 0.02) if cfg.user_embedding else None
        self.hist = HistoryEncoder(d, f.history_len)
        self.base = nn.Parameter(torch.zeros(d))
        self.query = nn.Parameter(torch.randn(d) * 0.02)
        self.blocks = nn.ModuleList(
            IsolatedBlock(d, cfg.n_heads, 2, 0.0) for _ in range(cfg.n_layers)
        )
        self.user_out = nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.dim)
        )
        self.item_out = nn.Sequential(
            nn.GELU(), nn.Linear(d, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.dim)
        )

    def user_vectors(self, b: dict[str, torch.Tensor], cat: CatalogTensors) -> torch.Tensor:
        """[B, dim] unit vectors from history tensors (`history_tensors`)."""
        hi = b["hist_item"]
        limit = id_limit(b, self.cfg.id_cutoff_us)
        hist = self.hist(
            self.item(hi, cat, limit[:, None]),
            b["hist_actions"],
            b["hist_dwell"],
            b["hist_age"],
        )
        # The always-present base token keeps attention defined for users with no history;
        # it carries the user's id embedding when the user was seen in training.
        base = self.base.expand(hi.shape[0], -1)
        if self.user is not None:
            known = (b["user_first_us"] < limit).to(torch.float32)[:, None]
            base = base + known * self.user(b["user"])
        ctx = torch.cat([base.unsqueeze(1), hist], dim=1)
        mask = torch.cat([torch.ones_like(hi[:, :1], dtype=torch.bool), hi > 0], dim=1)
        q = self.query.expand(hi.shape[0], 1, -1)
        for i, block in enumerate(self.blocks):
            ctx, q = block(ctx, q, mask, update_ctx=i < len(self.blocks) - 1)
        return l2_normalise(self.user_out(q[:, 0]))

    def item_vectors(self, rows: torch.Tensor, cat: CatalogTensors) -> torch.Tensor:
        """[N, dim] unit vectors of catalog rows (query-independent, for the vector index:
        a post's id counts when it was engaged with before the training cut)."""
        x = self.item(rows, cat, torch.tensor(self.cfg.id_cutoff_us))
        return l2_normalise(self.item_out(x))


def item_log_q(items: np.ndarray, n_rows: int) -> torch.Tensor:
    """log sampling probability of every catalog row among training positives (smoothed)."""
    counts = np.bincount(items, minlength=n_rows).astype(np.float64) + 1.0
    return torch.from_numpy(np.log(counts / counts.sum()).astype(np.float32))


def in_batch_loss(
    model: TwoTower,
    ex: RetrievalExamples,
    idx: np.ndarray,
    cat: CatalogTensors,
    log_q: torch.Tensor,
) -> torch.Tensor:
    b = history_tensors(ex.history, idx)
    items = torch.from_numpy(ex.item[idx].astype(np.int64))
    u = model.user_vectors(b, cat)
    v = model.item_vectors(items, cat)
    logits = u @ v.T / model.cfg.temperature - log_q[items][None, :]
    # The same item twice in a batch is a positive for both rows, not a negative.
    dup = (items[:, None] == items[None, :]) & ~torch.eye(len(items), dtype=torch.bool)
    logits = logits.masked_fill(dup, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(items)))


@torch.no_grad()
def user_vectors(
    model: TwoTower, history: History, catalog: ItemCatalog | CatalogTensors, batch_size: int = 4096
) -> np.ndarray:
    """float32 [Q, dim] user vectors for histories (e.g. `retrieval_data.user_histories` at now)."""
    cat = catalog if isinstance(catalog, CatalogTensors) else CatalogTensors(catalog)
    model.eval()
    n = len(history.item)
    out = [
        model.user_vectors(history_tensors(history, np.arange(s, min(n, s + batch_size))), cat)
        for s in range(0, n, batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, model.cfg.dim), np.float32)


@torch.no_grad()
def catalog_item_vectors(
    model: TwoTower,
    catalog: ItemCatalog | CatalogTensors,
    batch_size: int = 16_384,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """float32 [n+1, dim] vectors of every catalog row (row 0, the padding item, is zero),
    or with `rows` [len(rows), dim] those rows' only, in their order."""
    cat = catalog if isinstance(catalog, CatalogTensors) else CatalogTensors(catalog)
    model.eval()
    wanted = torch.arange(len(cat.content)) if rows is None else torch.from_numpy(rows)
    n = len(wanted)
    # Written batch by batch into one array: concatenating the batches would hold every
    # vector twice (2 x 256 MiB at 1M posts).
    vecs = np.empty((n, model.cfg.dim), dtype=np.float32)
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        vecs[s:e] = model.item_vectors(wanted[s:e], cat).numpy()
    vecs[(wanted == 0).numpy()] = 0.0
    return vecs


def item_vectors(
    model: TwoTower, articles: pl.DataFrame, content_vectors: np.ndarray
) -> np.ndarray:
    """float32 [len(articles), dim] item-tower vectors, one row per `articles` row in order."""
    catalog = ItemCatalog.build(articles, content_vectors, model.cfg.features)
    vecs = catalog_item_vectors(model, catalog)
    return vecs[catalog.rows(articles["article_id"].to_numpy())]


# Query x item cells scored at once by retrieval_recall.
_SCORE_CELLS = 2**24


@torch.no_grad()
def retrieval_recall(
    user_vecs: np.ndarray,
    targets: np.ndarray,
    times_us: np.ndarray,
    item_vecs: np.ndarray | Callable[[np.ndarray], np.ndarray],
    published_us: np.ndarray,
    ks: tuple[int, ...] = (100, 1000),
    recent_hours: float | None = 48.0,
    batch_size: int = 512,
) -> dict[str, float]:
    """Share of held-out positives whose item is in the exact dot-product top k.

    The corpus of each query is every item published before its time (and within
    `recent_hours`, the in-feed window, when given); rank = items scoring strictly higher.
    Row 0 of `item_vecs` and `published_us` is the padding item, in no corpus.
    `item_vecs`: every row's vector, or a function giving the vectors of the rows it is
    given, so that only the rows some query's window holds, and the targets, are computed.
    """
    vectors_of = item_vecs if callable(item_vecs) else item_vecs.__getitem__
    window = None if recent_hours is None else int(recent_hours * 3_600_000_000)
    # Queries in time order score only the items published in their batch's window, a
    # contiguous run of the items in publication order: at 1M posts a 48 h window is a
    # few percent of the catalog. Each query's rank is its own, so neither the batches
    # nor the order change a figure (results go back to query order before any sum).
    by_pub = np.argsort(published_us, kind="stable")
    by_pub = by_pub[by_pub > 0]  # row 0 is the padding item
    pub_sorted = published_us[by_pub]
    # The items any query's window holds, copied once in publication order, so a batch's
    # items are a slice of them: gathering each batch's (1.4M items at 10M posts, for a
    # dozen queries) cost more than scoring them.
    t_first, t_last = (int(times_us.min()), int(times_us.max())) if len(times_us) else (0, 0)
    first = 0 if window is None else int(np.searchsorted(pub_sorted, t_first - window, "left"))
    last = int(np.searchsorted(pub_sorted, t_last, "left"))
    span = by_pub[first:last]
    items = torch.from_numpy(vectors_of(span))
    target_vecs = torch.from_numpy(vectors_of(targets.astype(np.int64)))
    # Where each item sits in `items` (-1: in no query's window).
    position = np.full(len(published_us), -1, np.int64)
    position[span] = np.arange(len(span))
    order = np.argsort(times_us, kind="stable")
    rank = np.zeros(len(targets), np.int64)
    size = np.zeros(len(targets), np.int64)
    s = 0
    while s < len(order):
        b = max(1, batch_size)
        while True:
            q = order[s : s + b]
            t_lo, t_hi = int(times_us[q].min()), int(times_us[q].max())
            lo = 0 if window is None else np.searchsorted(pub_sorted, t_lo - window, "left")
            hi = np.searchsorted(pub_sorted, t_hi, "left")
            # A batch holds [queries, items] scores and masks: bounded by _SCORE_CELLS.
            if b == 1 or len(q) * (hi - lo) <= _SCORE_CELLS:
                break
            b //= 2
        # Each query's own window, [q_lo, q_hi) in publication order: the items it ranks.
        tq = times_us[q]
        q_hi = np.searchsorted(pub_sorted, tq, "left")
        q_lo = np.zeros_like(q_hi) if window is None else np.searchsorted(pub_sorted, tq - window)
        lo, hi = lo - first, hi - first
        q_lo, q_hi = q_lo - first - lo, q_hi - first - lo
        u = torch.from_numpy(user_vecs[q])
        scores = u @ items[lo:hi].T
        tgt = targets[q].astype(np.int64)
        own = (u * target_vecs[q]).sum(1)
        # Where the target is among the batch's items, its score is read from the same
        # matmul as theirs: another matmul may round it differently (how depends on the
        # shapes and the CPU), and the target would then rank above or below itself.
        at = position[tgt] - lo
        inside = np.flatnonzero((at >= 0) & (at < hi - lo))
        own[inside] = scores[inside, at[inside]]
        higher = scores > own[:, None]
        # Every item of the batch's span counted, less those before a query's window start
        # or at or after its end: the queries of a batch are close in time, so those edges
        # are narrow and no mask as wide as the batch is built.
        # (int32: summing bools into the default int64 took twice as long)
        count = torch.sum(higher, 1, dtype=torch.int32)
        left = int(q_lo.max(initial=0))
        if left > 0:
            cols = torch.arange(left)[None, :]
            count -= torch.sum(
                higher[:, :left] & (cols < torch.from_numpy(q_lo)[:, None]), 1, dtype=torch.int32
            )
        right = int(q_hi.min(initial=hi - lo))
        if right < hi - lo:
            cols = torch.arange(right, hi - lo)[None, :]
            count -= torch.sum(
                higher[:, right:] & (cols >= torch.from_numpy(q_hi)[:, None]), 1, dtype=torch.int32
            )
        rank[q] = count.numpy()
        size[q] = q_hi - q_lo
        s += len(q)
    size = size.astype(np.float64)
    n = max(len(rank), 1)
    out = {f"recall@{k}": float((rank < k).sum() / n) for k in ks}
    # What a random ranking would get: k over the size of each query's corpus.
    out.update(
        {f"chance@{k}": float(np.minimum(1.0, k / np.maximum(size, 1)).sum() / n) for k in ks}
    )
    out["corpus_mean"] = float(size.mean()) if len(size) else 0.0
    out["n_queries"] = float(len(rank))
    return out


def load_two_tower(state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> TwoTower:
    model = TwoTower(TwoTowerConfig.from_dict(config))
    model.load_state_dict(state_dict)
    model.eval()
    return model

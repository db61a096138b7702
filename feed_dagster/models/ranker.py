"""Transformer ranker over [user, history, candidates] with candidate isolation.

Modelled on the reference "Phoenix" ranker: the user token and the engagement-history tokens
form a context; each candidate token attends to the context and to itself only, so a post's
predicted probabilities do not depend on which other posts share its slate (scores can be
cached and candidates scored in any grouping). One sigmoid head per action the source logs,
plus a dwell regression head (log1p seconds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from feed_dagster.data.schema import ACTIONS
from feed_dagster.models.catalog import N_AGE_BUCKETS, FeatureConfig, ItemCatalog
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
from feed_dagster.models.ranker_data import (
    N_PEER_FEATURES,
    PROFILE_FEATURES,
    PROFILE_FEATURES_V1,
    RankerData,
)

if TYPE_CHECKING:
    from feed_dagster.models.compiled import CompiledBlocks

# Loss weight per action head. Clicks carry most of the signal and drive evaluation; the rare
# actions (replies, blocks, reports) still get a head but a smaller share of the gradient.
DEFAULT_ACTION_WEIGHTS: dict[str, float] = {
    "click": 1.0,
    "favorite": 0.5,
    "reply": 0.25,
    "repost": 0.25,
    "quote": 0.25,
    "share": 0.25,
    "not_interested": 0.25,
    "block_author": 0.1,
    "mute_author": 0.1,
    "report": 0.1,
}


@dataclass(frozen=True)
class RankerConfig:
    content_dim: int
    actions: tuple[str, ...] = ACTIONS
    d_model: int = 64
    n_heads: int = 4
    # Three thin blocks beat two wide ones on the demo world (held-out AUC 0.7709 against
    # 0.7699 for two blocks with ffn_mult 2, same seed) for about 12% more FLOPs.
    n_layers: int = 3
    ffn_mult: int = 1
    dropout: float = 0.0
    # A hashed user-id embedding in the user token. Off lets the model rely on history only
    # (every user is "new" to it); on, it can remember each user's tastes beyond 32 items.
    user_embedding: bool = True
    # Long-term (user, topic) and (user, author) engagement counts on each candidate token.
    profile_features: bool = True
    # Which PROFILE_FEATURES columns the model reads (stored, so older models keep theirs).
    profile_inputs: tuple[str, ...] = PROFILE_FEATURES
    # Classic peers' scores (ALS, item-kNN, EASE, popularity; fitted before the impression) on
    # each candidate token: the ranker stacks on collaborative filtering.
    peer_features: bool = True
    # Cosine of the user's history (mean content of the engaged posts) with the candidate and
    # with its author's profile: topic match and author affinity as two direct inputs.
    affinity_features: bool = True
    # Ids (post, user) first engaged at or after this time were never trained: their
    # embeddings are left out (set by the trainer to the end of its training data).
    id_cutoff_us: int = 0
    # Share of known post ids dropped per training step, so content alone ranks cold posts
    # (news: most candidates at serving time are newer than the training cut).
    id_dropout: float = 0.5
    action_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_ACTION_WEIGHTS))
    dwell_weight: float = 0.05
    # Weight of a listwise term: softmax cross-entropy of the click head over each group's
    # candidates, for groups with a click. The per-action BCE calibrates probabilities; this
    # term optimises the order inside a slate, which AUC and nDCG judge.
    listwise_weight: float = 1.0
    features: FeatureConfig = field(default_factory=FeatureConfig)

    def __post_init__(self) -> None:
        unknown = set(self.actions) - set(ACTIONS)
        if unknown or not self.actions:
            raise ValueError(f"ranker actions must be a non-empty subset of {ACTIONS}")
        unknown = set(self.profile_inputs) - set(PROFILE_FEATURES)
        if unknown:
            raise ValueError(f"unknown profile inputs {sorted(unknown)}; known {PROFILE_FEATURES}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["actions"] = list(self.actions)
        d["profile_inputs"] = list(self.profile_inputs)
        d["features"] = self.features.to_dict()
        d["kind"] = "ranker"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RankerConfig:
        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        kw["actions"] = tuple(kw.get("actions", ACTIONS))
        kw["features"] = FeatureConfig.from_dict(d.get("features", {}))
        # Models stored before the affinity inputs existed have no weights for them.
        kw.setdefault("affinity_features", False)
        kw["profile_inputs"] = tuple(kw.get("profile_inputs", PROFILE_FEATURES_V1))
        return cls(**kw)


def ranker_batch(data: RankerData, idx: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Tensors of groups `idx` (all when None): catalog rows, not vectors, to stay small."""
    d = data if idx is None else data.take(idx)
    return {
        **history_tensors(d.history),
        "logged": torch.from_numpy(d.group_logged.astype(np.int64)),
        "cand_item": torch.from_numpy(d.cand_item.astype(np.int64)),
        "cand_age": torch.from_numpy(d.cand_age.astype(np.int64)),
        "cand_in_network": torch.from_numpy(d.cand_in_network.astype(np.int64)),
        "cand_topic_follow": torch.from_numpy(d.cand_topic_follow.astype(np.int64)),
        "cand_profile": torch.from_numpy(d.cand_profile),
        "cand_peer": torch.from_numpy(d.cand_peer),
        "labels": torch.from_numpy(d.labels).to(torch.float32),
        "dwell": torch.from_numpy(d.dwell),
    }


class PhoenixRanker(nn.Module):
    def __init__(self, cfg: RankerConfig):
        super().__init__()
        self.cfg = cfg
        f, d = cfg.features, cfg.d_model
        self.item = ItemEncoder(
            cfg.content_dim,
            d,
            f.author_buckets,
            f.topic_buckets,
            f.post_buckets,
            id_dropout=cfg.id_dropout,
        )
        self.hist = HistoryEncoder(d, f.history_len)
        self.user_base = nn.Parameter(torch.zeros(d))
        self.user = HashedIdEmbedding(f.user_buckets, d, 0.02) if cfg.user_embedding else None
        self.cand_age = nn.Embedding(N_AGE_BUCKETS, d, padding_idx=0)
        self.in_network = nn.Embedding(2, d)
        self.topic_follow = nn.Embedding(2, d)
        self.logged = nn.Embedding(2, d)
        self.profile = nn.Linear(len(cfg.profile_inputs), d) if cfg.profile_features else None
        self.profile_columns = [PROFILE_FEATURES.index(f) for f in cfg.profile_inputs]
        self.peer = nn.Linear(N_PEER_FEATURES, d) if cfg.peer_features else None
        self.affinity = nn.Linear(2, d) if cfg.affinity_features else None
        # Segment embeddings tell the blocks which tokens are history and which candidates.
        self.segment = nn.Embedding(3, d)
        for emb in (self.cand_age, self.in_network, self.topic_follow, self.logged, self.segment):
            nn.init.normal_(emb.weight, std=0.02)
        self.blocks = nn.ModuleList(
            IsolatedBlock(d, cfg.n_heads, cfg.ffn_mult, cfg.dropout) for _ in range(cfg.n_layers)
        )
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, len(cfg.actions) + 1)

    def forward(
        self, b: dict[str, torch.Tensor], cat: CatalogTensors
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(action logits [B, C, n_actions], predicted log1p dwell [B, C])."""
        limit = id_limit(b, self.cfg.id_cutoff_us)
        ctx, ctx_mask = self.context_tokens(b, cat, limit)
        user_content = history_content(b["hist_item"], cat) if self.affinity is not None else None
        cand = self.candidate_tokens(b, cat, limit, user_content)
        for i, block in enumerate(self.blocks):
            ctx, cand = block(ctx, cand, ctx_mask, update_ctx=i < len(self.blocks) - 1)
        out = self.head(self.ln(cand))
        return out[..., :-1], out[..., -1]

    def context_tokens(
        self, b: dict[str, torch.Tensor], cat: CatalogTensors, limit: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(context tokens [B, L, d]: user token then history, mask [B, L] of real ones)."""
        hi = b["hist_item"]
        hist_item = self.item(hi, cat, limit[:, None])
        hist = self.hist(hist_item, b["hist_actions"], b["hist_dwell"], b["hist_age"])
        hist = hist + self.segment.weight[1]
        user = self.user_base + self.segment.weight[0]
        user = user.expand(hi.shape[0], -1)
        if self.user is not None:
            known = (b["user_first_us"] < limit).to(torch.float32)[:, None]
            user = user + known * self.user(b["user"])
        ctx = torch.cat([user.unsqueeze(1), hist], dim=1)
        ctx_mask = torch.cat([torch.ones_like(hi[:, :1], dtype=torch.bool), hi > 0], dim=1)
        return ctx, ctx_mask

    def candidate_tokens(
        self,
        b: dict[str, torch.Tensor],
        cat: CatalogTensors,
        limit: torch.Tensor,
        user_content: torch.Tensor | None,
    ) -> torch.Tensor:
        """Candidate tokens [B, C, d]; `limit` [B] and `user_content` [B, 1, D] (the
        history's mean content, `history_content`; None without affinity inputs) per group."""
        ci = b["cand_item"]
        cand = (
            self.item(ci, cat, limit[:, None])
            + self.cand_age(b["cand_age"])
            + self.logged(b["logged"])[:, None, :]
            + self.in_network(b["cand_in_network"])
            + self.topic_follow(b["cand_topic_follow"])
            + self.segment.weight[2]
        )
        if self.profile is not None:
            cand = cand + self.profile(b["cand_profile"][..., self.profile_columns])
        if self.peer is not None:
            cand = cand + self.peer(b["cand_peer"])
        if self.affinity is not None:
            assert user_content is not None
            cand = cand + self.affinity(candidate_affinity(user_content, ci, cat))
        return cand

    @torch.inference_mode()
    def encode_contexts(self, b: dict[str, torch.Tensor], cat: CatalogTensors) -> ContextCache:
        """Every block's context keys and values for the distinct contexts in `b` (history
        tensors, one row per context), computed once and reused by `score_with_contexts`
        for any number of candidates. Inference only (eval mode: no dropout)."""
        limit = id_limit(b, self.cfg.id_cutoff_us)
        ctx, ctx_mask = self.context_tokens(b, cat, limit)
        key_bias = torch.zeros(ctx_mask.shape, dtype=ctx.dtype)
        key_bias = key_bias.masked_fill(~ctx_mask, float("-inf"))[:, None, None, :]
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            kc, vc, nxt = block.context_step(ctx, key_bias, update_ctx=i < len(self.blocks) - 1)
            keys.append(kc.transpose(-1, -2).contiguous())
            values.append(vc)
            if nxt is not None:
                ctx = nxt
        user_content = history_content(b["hist_item"], cat) if self.affinity is not None else None
        return ContextCache(keys, values, key_bias, limit, user_content)

    @torch.inference_mode()
    def candidate_tables(self, cat: CatalogTensors, rows: torch.Tensor) -> CandidateTables:
        """The parts of candidate tokens that depend on the catalog row or on a few small
        categorical inputs only, computed once for catalog `rows` (sorted, unique) so each
        candidate token is two gathers and one small matmul. Inference only."""
        it = self.item
        static = (
            it.content(cat.content[rows]) + it.author(cat.author[rows]) + it.topic(cat.topic[rows])
        )
        post = None if it.id_dropout >= 1.0 else it.post(cat.post[rows])
        # (age, in_network, topic_follow, logged) -> the sum of their embeddings + segment,
        # in the order of `flag_index`.
        flags = (
            self.cand_age.weight[:, None, None, None, :]
            + self.in_network.weight[None, :, None, None, :]
            + self.topic_follow.weight[None, None, :, None, :]
            + self.logged.weight[None, None, None, :, :]
            + self.segment.weight[2]
        ).reshape(-1, self.cfg.d_model)
        # profile, peer and affinity Linears as one Linear over their concatenated inputs.
        linears = [m for m in (self.profile, self.peer, self.affinity) if m is not None]
        weight = torch.cat([m.weight for m in linears], dim=1) if linears else None
        bias = torch.stack([m.bias for m in linears]).sum(0) if linears else None
        return CandidateTables(rows, static, post, cat.first_engaged[rows], flags, weight, bias)

    @torch.inference_mode()
    def score_with_contexts(
        self,
        cache: ContextCache,
        group_context: torch.Tensor,
        b: dict[str, torch.Tensor],
        cat: CatalogTensors,
        tables: CandidateTables,
        blocks: Callable[..., torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward()'s outputs (within float rounding) for candidate groups `b` (candidate
        tensors and `logged`, [G, C]) whose contexts are rows `group_context` [G] of
        `cache`; `b["cand_row"]` indexes `tables.rows` (built for these candidates).
        `blocks`: `candidate_blocks` compiled (see `compiled_blocks`), or None."""
        take = group_context
        cand = self.fast_candidate_tokens(b, cat, cache.limit[take], cache, take, tables)
        keys = [kc[take] for kc in cache.keys]
        values = [vc[take] for vc in cache.values]
        out = (blocks or self.candidate_blocks)(cand, keys, values, cache.key_bias[take])
        return out[..., :-1], out[..., -1]

    def candidate_blocks(
        self,
        cand: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        key_bias: torch.Tensor,
    ) -> torch.Tensor:
        """Head outputs [G, C, n_actions + 1] of candidate tokens [G, C, d] through every
        block, against their groups' context keys and values (gathered per group)."""
        for block, kc, vc in zip(self.blocks, keys, values, strict=True):
            cand = block.candidate_step(cand, kc, vc, key_bias)
        return self.head(self.ln(cand))

    def fast_candidate_tokens(
        self,
        b: dict[str, torch.Tensor],
        cat: CatalogTensors,
        limit: torch.Tensor,
        cache: ContextCache,
        take: torch.Tensor,
        tables: CandidateTables,
    ) -> torch.Tensor:
        """candidate_tokens() from precomputed `tables`: the same sum, fewer passes."""
        r = b["cand_row"]
        cand = tables.static[r]
        if tables.post is not None:
            known = tables.first_engaged[r] < limit[:, None]
            cand = cand.addcmul_(tables.post[r], known.unsqueeze(-1).to(torch.float32))
        cand = cand.add_(tables.flags[flag_index(b)])
        inputs = []
        if self.profile is not None:
            inputs.append(b["cand_profile"][..., self.profile_columns])
        if self.peer is not None:
            inputs.append(b["cand_peer"])
        if self.affinity is not None:
            assert cache.user_content is not None
            inputs.append(candidate_affinity(cache.user_content[take], b["cand_item"], cat))
        if tables.weight is not None:
            x = torch.cat(inputs, dim=-1)
            cand = cand.add_(F.linear(x, tables.weight, tables.bias))
        return cand


def flag_index(b: dict[str, torch.Tensor]) -> torch.Tensor:
    """[G, C] row of CandidateTables.flags: (age, in_network, topic_follow, logged)."""
    return ((b["cand_age"] * 2 + b["cand_in_network"]) * 2 + b["cand_topic_follow"]) * 2 + b[
        "logged"
    ][:, None]


@dataclass(frozen=True)
class CandidateTables:
    """Candidate-token parts per catalog row in use (PhoenixRanker.candidate_tables)."""

    rows: torch.Tensor  # [R] catalog rows, sorted
    static: torch.Tensor  # [R, d] content + author + topic of the item encoder
    post: torch.Tensor | None  # [R, d] post-id embedding, gated per candidate
    first_engaged: torch.Tensor  # [R] first engagement time of each row (us)
    flags: torch.Tensor  # [N_AGE_BUCKETS * 8, d]
    weight: torch.Tensor | None  # [d, profile + peer + affinity inputs]
    bias: torch.Tensor | None  # [d]


@dataclass(frozen=True)
class ContextCache:
    """Per-block keys and values of U contexts (user + history tokens), with what the
    candidate tokens read from their context: the id-time limit and the history content."""

    keys: list[torch.Tensor]  # per block [U, heads, dh, L], transposed for the score matmul
    values: list[torch.Tensor]  # per block [U, heads, L, dh]
    key_bias: torch.Tensor  # [U, 1, 1, L]: 0 for a real token, -inf for padding
    limit: torch.Tensor  # [U]
    user_content: torch.Tensor | None  # [U, 1, content_dim], None without affinity inputs


def history_content(hist: torch.Tensor, cat: CatalogTensors) -> torch.Tensor:
    """[B, 1, D] unit mean content of each history's engaged posts (0 for an empty one)."""
    used = (hist > 0).to(torch.float32).unsqueeze(-1)
    return l2_normalise((cat.content[hist] * used).sum(1)).unsqueeze(1)


def candidate_affinity(user: torch.Tensor, cand: torch.Tensor, cat: CatalogTensors) -> torch.Tensor:
    """[B, C, 2]: cosine of `user` (history_content) with every candidate's content and with
    its author's profile."""
    post = l2_normalise(cat.content[cand])
    author = cat.author_content[cat.author_row[cand]]
    return torch.stack([(post * user).sum(-1), (author * user).sum(-1)], dim=-1)


def affinity_inputs(hist: torch.Tensor, cand: torch.Tensor, cat: CatalogTensors) -> torch.Tensor:
    """[B, C, 2]: cosine of each user's mean history content with every candidate's content
    and with its author's profile (0 for an empty history or an unknown author)."""
    return candidate_affinity(history_content(hist, cat), cand, cat)


def start_at_base_rates(model: PhoenixRanker, data: RankerData) -> None:
    """Set each action head's output bias to the logit of its rate in `data` (its logged
    slates when it has any: the groups serving resembles) and the dwell head's to the mean
    log1p dwell.

    From a zero bias a head starts at p = 0.5, and in the few hundred Adam steps of a
    training run the bias of a rare action travels only a few units: on the demo world the
    ranker predicted reports at 0.0072 on average against a rate of 0.00016. With the
    reference weights (a report counts -234) that error alone outweighed every positive
    term, so every candidate's combined score was negative."""
    mask = data.cand_mask
    logged = mask & (data.group_logged[:, None] == 1)
    if logged.any():
        mask = logged
    if not mask.any():
        return
    n = float(mask.sum())
    cols = action_columns(model.cfg.actions)
    # Half a positive for an action never seen keeps the logit finite.
    rates = (data.labels[mask][:, cols].sum(axis=0) + 0.5) / (n + 1.0)
    with torch.no_grad():
        bias = model.head.bias
        bias[:-1] = torch.logit(torch.as_tensor(rates, dtype=torch.float32))
        bias[-1] = float(data.dwell[mask].mean())


def action_columns(actions: tuple[str, ...]) -> list[int]:
    return [ACTIONS.index(a) for a in actions]


def ranker_loss(
    model: PhoenixRanker, b: dict[str, torch.Tensor], cat: CatalogTensors
) -> torch.Tensor:
    """Weighted sum of per-action binary cross-entropies plus the dwell regression, averaged
    over real (unpadded) candidates."""
    cfg = model.cfg
    logits, dwell = model(b, cat)
    mask = (b["cand_item"] > 0).to(torch.float32)
    n = mask.sum().clamp(min=1.0)
    labels = b["labels"][..., action_columns(cfg.actions)]
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    w = torch.tensor([cfg.action_weights.get(a, 1.0) for a in cfg.actions], dtype=torch.float32)
    loss = ((bce * w).sum(-1) * mask).sum() / n
    mse = ((dwell - b["dwell"]) ** 2 * mask).sum() / n
    loss = loss + cfg.dwell_weight * mse
    if cfg.listwise_weight > 0 and "click" in cfg.actions:
        c = cfg.actions.index("click")
        clicked = labels[..., c] * mask
        groups = clicked.sum(-1) > 0
        if groups.any():
            logp = torch.log_softmax(logits[..., c].masked_fill(mask == 0, -1e9), dim=-1)
            per_group = -(logp * clicked).sum(-1) / clicked.sum(-1).clamp(min=1.0)
            loss = loss + cfg.listwise_weight * per_group[groups].mean()
    return loss


# Candidate slots per pass at inference. With d_model 64 the forward is bound by memory
# traffic, not matmuls: every op streams its [tokens, 64..192] activations, so passes whose
# activations stay in cache run fastest. On a 2-core box shared with other jobs (one
# thread, 41k candidates of 96 users, medians of 9 interleaved runs): 0.55 s at 1,024 to
# 4,096 slots per pass, 0.70 s at 8,192, against 0.87 s for the per-group forward before.
PREDICT_TOKENS = 2048
# Contexts encoded per pass: their keys and values (about 50 kB per context for the demo
# ranker) are kept while all of their candidates are scored in PREDICT_TOKENS passes, and
# larger context passes spread the per-op overhead of the small context tensors.
PREDICT_CONTEXTS = 256


def context_runs(data: RankerData) -> tuple[np.ndarray, np.ndarray]:
    """(first group of each context, context number of every group): consecutive groups
    whose context inputs (history, user, query time) are equal share one context.

    A serving impression with more candidates than a group holds spans consecutive groups
    of the same user and time; equality is checked on the inputs themselves, so groups of
    different impressions that happen to share a context are merged too and nothing is
    assumed about how `data` was built."""
    g = len(data)
    h = data.history
    same = np.zeros(g, dtype=bool)
    if g > 1:
        same[1:] = (
            (h.item[1:] == h.item[:-1]).all(1)
            & (h.actions[1:] == h.actions[:-1]).all(1)
            & (h.dwell[1:] == h.dwell[:-1]).all(1)
            & (h.age[1:] == h.age[:-1]).all(1)
            & (h.time_us[1:] == h.time_us[:-1])
            & (h.user_bucket[1:] == h.user_bucket[:-1]).all(1)
            & (h.user_first_us[1:] == h.user_first_us[:-1])
        )
    context_of = np.cumsum(~same) - 1
    return np.flatnonzero(~same), context_of


def candidate_batch(
    data: RankerData, idx: np.ndarray, cand_row: np.ndarray
) -> dict[str, torch.Tensor]:
    """The candidate-side tensors of groups `idx` (no history, no labels); `cand_row`
    [G, C] indexes the rows of the call's CandidateTables."""
    return {
        "cand_row": torch.from_numpy(cand_row[idx].astype(np.int64)),
        "logged": torch.from_numpy(data.group_logged[idx].astype(np.int64)),
        "cand_item": torch.from_numpy(data.cand_item[idx].astype(np.int64)),
        "cand_age": torch.from_numpy(data.cand_age[idx].astype(np.int64)),
        "cand_in_network": torch.from_numpy(data.cand_in_network[idx].astype(np.int64)),
        "cand_topic_follow": torch.from_numpy(data.cand_topic_follow[idx].astype(np.int64)),
        "cand_profile": torch.from_numpy(data.cand_profile[idx]),
        "cand_peer": torch.from_numpy(data.cand_peer[idx]),
    }


@torch.inference_mode()
def predict(
    model: PhoenixRanker,
    data: RankerData,
    catalog: ItemCatalog | CatalogTensors,
    batch_size: int | None = None,
    blocks: CompiledBlocks | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [G, C, n_actions], dwell seconds [G, C]) for every group of `data`.

    Each distinct context (see `context_runs`) is encoded once, PREDICT_CONTEXTS at a
    time, and every group's candidates attend to its context's cached keys and values: a
    user with 1,000 candidates in four groups costs one context, not four. Candidates go
    through the blocks `batch_size` groups at a time (default: about PREDICT_TOKENS slots);
    a candidate's scores depend on neither. `blocks`: the model's candidate blocks
    compiled (models.compiled), fed passes of exactly `batch_size` groups."""
    cat = catalog if isinstance(catalog, CatalogTensors) else CatalogTensors(catalog)
    c = data.cand_item.shape[1]
    if batch_size is None:
        batch_size = max(1, PREDICT_TOKENS // max(1, c))
    was_training = model.training
    model.eval()
    firsts, context_of = context_runs(data)
    group_end = np.r_[firsts[1:], len(data)]
    rows, cand_row = np.unique(data.cand_item, return_inverse=True)
    cand_row = cand_row.reshape(data.cand_item.shape)
    probs, dwell = [], []
    try:
        tables = model.candidate_tables(cat, torch.from_numpy(rows.astype(np.int64)))
        for lo in range(0, len(firsts), PREDICT_CONTEXTS):
            hi = min(len(firsts), lo + PREDICT_CONTEXTS)
            cache = model.encode_contexts(history_tensors(data.history, firsts[lo:hi]), cat)
            for s in range(firsts[lo], group_end[hi - 1], batch_size):
                groups = np.arange(s, min(group_end[hi - 1], s + batch_size))
                n = len(groups)
                if blocks is not None and n < batch_size:
                    # Compiled for one shape: the last group repeats, its copies dropped.
                    groups = np.r_[groups, np.full(batch_size - n, groups[-1])]
                local = torch.from_numpy(context_of[groups] - lo)
                b = candidate_batch(data, groups, cand_row)
                logits, d = model.score_with_contexts(cache, local, b, cat, tables, blocks)
                # float(): under a bfloat16 autocast (bench_feeds compares it) the
                # outputs are bfloat16, which numpy cannot hold.
                probs.append(torch.sigmoid(logits[:n].float()).numpy())
                dwell.append(torch.expm1(d[:n].float().clamp(min=0)).numpy())
    finally:
        model.train(was_training)
    n_a = len(model.cfg.actions)
    if not probs:
        return np.zeros((0, c, n_a), np.float32), np.zeros((0, c), np.float32)
    return np.concatenate(probs), np.concatenate(dwell)


def score_frame(
    model: PhoenixRanker,
    data: RankerData,
    catalog: ItemCatalog | CatalogTensors,
    batch_size: int | None = None,
) -> pl.DataFrame:
    """One row per candidate: impression_id, user_id, article_id, position, the logged labels,
    p_<action> for each head and dwell_seconds (expected seconds)."""
    probs, dwell = predict(model, data, catalog, batch_size)
    m = data.cand_mask
    return data.rows().with_columns(
        *[pl.Series(f"p_{a}", probs[..., i][m]) for i, a in enumerate(model.cfg.actions)],
        pl.Series("dwell_seconds", dwell[m]),
    )


def build_ranker(cfg: RankerConfig, seed: int = 0) -> PhoenixRanker:
    torch.manual_seed(seed)
    return PhoenixRanker(cfg)


def load_ranker(state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> PhoenixRanker:
    model = PhoenixRanker(RankerConfig.from_dict(config))
    model.load_state_dict(state_dict)
    model.eval()
    return model

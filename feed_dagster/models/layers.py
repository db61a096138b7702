"""Shared torch building blocks: token embeddings and the candidate-isolated transformer."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from feed_dagster.models.catalog import N_AGE_BUCKETS, ItemCatalog
from feed_dagster.models.engagement_log import N_ACTIONS, History


class CatalogTensors:
    """Torch views of an ItemCatalog, built once per catalog and shared by batches."""

    def __init__(self, catalog: ItemCatalog):
        self.content = torch.from_numpy(catalog.content)
        self.post = torch.from_numpy(catalog.post_bucket.astype(np.int64))
        self.first_engaged = torch.from_numpy(catalog.first_engaged_us)
        self.author = torch.from_numpy(catalog.author_bucket.astype(np.int64))
        self.topic = torch.from_numpy(catalog.topic_bucket.astype(np.int64))
        self.author_row = torch.from_numpy(catalog.author_row.astype(np.int64))
        self.author_content = torch.from_numpy(catalog.author_content)


def action_multi_hot(bits: torch.Tensor) -> torch.Tensor:
    """[..., N_ACTIONS] float multi-hot from an int16 action bitmask."""
    shifts = torch.arange(N_ACTIONS, device=bits.device, dtype=torch.int32)
    return ((bits.to(torch.int32).unsqueeze(-1) >> shifts) & 1).to(torch.float32)


def history_tensors(history: History, idx: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    h = history if idx is None else history.take(idx)
    return {
        "hist_item": torch.from_numpy(h.item.astype(np.int64)),
        "hist_actions": action_multi_hot(torch.from_numpy(h.actions)),
        "hist_dwell": torch.from_numpy(h.dwell),
        "hist_age": torch.from_numpy(h.age.astype(np.int64)),
        "time_us": torch.from_numpy(h.time_us.astype(np.int64)),
        "user": torch.from_numpy(h.user_bucket.astype(np.int64)),
        "user_first_us": torch.from_numpy(h.user_first_us.astype(np.int64)),
    }


def id_limit(b: dict[str, torch.Tensor], cutoff_us: int) -> torch.Tensor:
    """[B] the time before which an id must have been engaged for its embedding to be used:
    the query time, and never later than the model's training cut (ids first seen after
    it were never trained)."""
    return b["time_us"].clamp(max=cutoff_us)


class HashedIdEmbedding(nn.Module):
    """Sum of one table's rows over several hashes of an id ([..., hashes] bucket indices);
    row 0 is the null id and stays zero."""

    def __init__(self, buckets: int, d: int, std: float):
        super().__init__()
        self.table = nn.Embedding(buckets, d, padding_idx=0, sparse=True)
        nn.init.normal_(self.table.weight, std=std)
        with torch.no_grad():
            self.table.weight[0].zero_()

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        return self.table(buckets).sum(-2)


class ItemEncoder(nn.Module):
    """Item identity shared by history and candidate tokens: content, hashed post id,
    hashed author id, topic.

    The post-id embedding is gated: it is added only for posts engaged with before the
    caller's `limit` time (see `id_limit`), and during training a share `id_dropout` of them
    is dropped at random, so the content path alone must rank well too (cold posts).
    """

    def __init__(
        self,
        content_dim: int,
        d: int,
        author_buckets: int,
        topic_buckets: int,
        post_buckets: int,
        emb_std: float = 0.02,
        id_dropout: float = 0.1,
    ):
        super().__init__()
        self.content = nn.Linear(content_dim, d)
        self.post = HashedIdEmbedding(post_buckets, d, emb_std)
        self.author = HashedIdEmbedding(author_buckets, d, emb_std)
        self.topic = nn.Embedding(topic_buckets, d, padding_idx=0)
        self.id_dropout = id_dropout
        nn.init.normal_(self.topic.weight, std=emb_std)
        with torch.no_grad():
            self.topic.weight[0].zero_()

    def forward(self, rows: torch.Tensor, cat: CatalogTensors, limit: torch.Tensor) -> torch.Tensor:
        """Item vectors of catalog `rows` [...]; `limit` broadcasts against `rows`."""
        x = (
            self.content(cat.content[rows])
            + self.author(cat.author[rows])
            + self.topic(cat.topic[rows])
        )
        if self.id_dropout >= 1.0:  # post ids switched off altogether
            return x
        known = cat.first_engaged[rows] < limit
        if self.training and self.id_dropout > 0:
            known = known & (torch.rand(rows.shape) >= self.id_dropout)
        return x + self.post(cat.post[rows]) * known.unsqueeze(-1).to(torch.float32)


class HistoryEncoder(nn.Module):
    """History token = item + what the user did (actions, dwell) + the post's age then +
    recency rank (most recent engagement last)."""

    def __init__(self, d: int, history_len: int):
        super().__init__()
        self.actions = nn.Linear(N_ACTIONS, d)
        self.dwell = nn.Linear(1, d, bias=False)
        self.age = nn.Embedding(N_AGE_BUCKETS, d, padding_idx=0)
        self.rank = nn.Embedding(history_len, d)
        nn.init.normal_(self.age.weight, std=0.02)
        nn.init.normal_(self.rank.weight, std=0.02)

    def forward(
        self, item: torch.Tensor, actions: torch.Tensor, dwell: torch.Tensor, age: torch.Tensor
    ) -> torch.Tensor:
        h = item.shape[1]
        rank = self.rank.weight[-h:].unsqueeze(0)
        return item + self.actions(actions) + self.dwell(dwell.unsqueeze(-1)) + self.age(age) + rank


class IsolatedBlock(nn.Module):
    """Pre-LayerNorm transformer block over a context (user + history) and candidates.

    Context tokens attend to the (unpadded) context only. Each candidate attends to the
    context and to itself, never to another candidate: the same result as one sequence
    [user, history, candidates] with the reference ranker's candidate-isolation mask, but
    computed without an (L+C)^2 mask, so a context can be scored against any number of
    candidates and a candidate's score cannot depend on the rest of the slate.
    """

    def __init__(self, d: int, n_heads: int, ffn_mult: int, dropout: float):
        super().__init__()
        if d % n_heads:
            raise ValueError(f"d_model={d} must be divisible by n_heads={n_heads}")
        self.h, self.dh = n_heads, d // n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_mult * d), nn.GELU(), nn.Linear(ffn_mult * d, d))
        self.drop = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)
        return q, k, v  # each [B, heads, N, dh]

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = x.shape
        return x.transpose(1, 2).reshape(b, n, self.h * self.dh)

    def forward(
        self,
        ctx: torch.Tensor,
        cand: torch.Tensor,
        ctx_mask: torch.Tensor,
        update_ctx: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`update_ctx=False` (the last block) skips the context's own update, which nothing
        reads afterwards: a quarter of the work saved, identical candidate outputs."""
        qc, kc, vc = self._split(self.ln1(ctx))
        qx, kx, vx = self._split(self.ln1(cand))
        key_bias = torch.zeros(ctx_mask.shape, dtype=ctx.dtype, device=ctx.device)
        key_bias = key_bias.masked_fill(~ctx_mask, float("-inf"))[:, None, None, :]
        scale = 1.0 / math.sqrt(self.dh)
        s_ctx = (qx @ kc.transpose(-1, -2)) * scale + key_bias  # [B, h, C, L]
        s_self = (qx * kx).sum(-1, keepdim=True) * scale  # [B, h, C, 1]
        p = torch.softmax(torch.cat([s_ctx, s_self], dim=-1), dim=-1)
        att_x = p[..., :-1] @ vc + p[..., -1:] * vx
        cand = cand + self.drop(self.out(self._merge(att_x)))
        cand = cand + self.drop(self.ffn(self.ln2(cand)))
        if update_ctx:
            att_c = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=key_bias)
            ctx = ctx + self.drop(self.out(self._merge(att_c)))
            ctx = ctx + self.drop(self.ffn(self.ln2(ctx)))
        return ctx, cand

    # -- inference: the context once per user ------------------------------------------------
    # forward() above is what training runs. The two methods below split it for serving:
    # `context_step` on each distinct context (user + history) once, `candidate_step` on any
    # number of candidate tokens against those keys and values. Together they compute what
    # forward() computes for the candidates (within float rounding; tested).

    def context_step(
        self, ctx: torch.Tensor, key_bias: torch.Tensor, update_ctx: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(keys, values [U, heads, L, dh], the updated context or None) of contexts
        [U, L, d]; `key_bias` [U, 1, 1, L] is 0 for real tokens and -inf for padding."""
        qc, kc, vc = self._split(self.ln1(ctx))
        if not update_ctx:
            return kc, vc, None
        att_c = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=key_bias)
        ctx = ctx + self.out(self._merge(att_c))
        ctx = ctx + self.ffn(self.ln2(ctx))
        return kc, vc, ctx

    def candidate_step(
        self, cand: torch.Tensor, keys_t: torch.Tensor, vc: torch.Tensor, key_bias: torch.Tensor
    ) -> torch.Tensor:
        """Candidate tokens [G, C, d] after this block, each group g attending to its
        context's keys `keys_t[g]` [G, heads, dh, L] (transposed, as the score matmul reads
        them) and values vc[g] [G, heads, L, dh], gathered per group by the caller, and to
        itself.

        The softmax over [context keys, self] is taken without concatenating the self score
        onto the [G, heads, C, L] scores, and the large intermediates are updated in place:
        with d_model 64 the step is bound by passes over memory, not by its matmuls."""
        x = self.ln1(cand)
        g, c, _ = x.shape
        qkv = self.qkv(x).view(g, c, 3, self.h, self.dh)
        # One pass scales q and lays it out [G, heads, C, dh] for the batched matmul.
        q = torch.empty(g, self.h, c, self.dh, dtype=x.dtype)
        torch.mul(qkv[:, :, 0].transpose(1, 2), 1.0 / math.sqrt(self.dh), out=q)
        k_self = qkv[:, :, 1].transpose(1, 2)
        v_self = qkv[:, :, 2].transpose(1, 2)
        s_ctx = torch.matmul(q, keys_t).add_(key_bias)  # [G, heads, C, L]
        s_self = (q * k_self).sum(-1, keepdim=True)  # [G, heads, C, 1]
        m = torch.maximum(s_ctx.amax(-1, keepdim=True), s_self)
        e_ctx = s_ctx.sub_(m).exp_()
        e_self = s_self.sub_(m).exp_()
        denom = e_ctx.sum(-1, keepdim=True).add_(e_self)
        att = torch.matmul(e_ctx, vc).addcmul_(e_self, v_self).div_(denom)
        cand = cand + self.out(self._merge(att))
        return cand + self.ffn(self.ln2(cand))


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=1e-8)

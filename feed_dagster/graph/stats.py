"""Per-account follow-graph statistics and heavy-tail summaries of degree distributions."""

from __future__ import annotations

import numpy as np
import polars as pl


def account_stats(users: pl.DataFrame, follows: pl.DataFrame) -> pl.DataFrame:
    """user_id, followers (in-degree), following (out-degree), mutual_follows for every user."""
    edges = follows.select("follower_id", "followee_id")
    followers = edges.group_by("followee_id").len("followers").rename({"followee_id": "user_id"})
    following = edges.group_by("follower_id").len("following").rename({"follower_id": "user_id"})
    reverse = edges.rename({"follower_id": "followee_id", "followee_id": "follower_id"})
    mutual = (
        edges.join(reverse, on=["follower_id", "followee_id"], how="semi")
        .group_by("follower_id")
        .len("mutual_follows")
        .rename({"follower_id": "user_id"})
    )
    out = users.select("user_id")
    for part in (followers, following, mutual):
        out = out.join(part, on="user_id", how="left")
    return out.with_columns(pl.col("followers", "following", "mutual_follows").fill_null(0))


def power_law_alpha(degrees: np.ndarray, xmin: int) -> float:
    """Discrete power-law exponent by maximum likelihood (Clauset et al. 2009, eq. 3.7)."""
    tail = degrees[degrees >= xmin].astype(np.float64)
    return float(1.0 + len(tail) / np.log(tail / (xmin - 0.5)).sum())


def gini(values: np.ndarray) -> float:
    v = np.sort(values.astype(np.float64))
    n = len(v)
    if n == 0 or v.sum() == 0:
        return 0.0
    return float((2 * np.arange(1, n + 1) - n - 1).dot(v) / (n * v.sum()))


def degree_summary(degrees: np.ndarray, xmin: int | None = None) -> dict[str, float]:
    """Shape of a degree distribution: tail exponent, concentration, extremes.

    xmin defaults to the 90th percentile of positive degrees (at least 2), a simple, fixed
    rule so the same summary is comparable between graphs of different sizes.
    """
    d = np.asarray(degrees)
    positive = d[d > 0]
    if xmin is None:
        xmin = max(2, int(np.percentile(positive, 90))) if len(positive) else 2
    top = np.sort(d)[::-1]
    top1 = top[: max(1, len(d) // 100)].sum() / max(1, d.sum())
    return {
        "nodes": int(len(d)),
        "mean": float(d.mean()) if len(d) else 0.0,
        "median": float(np.median(d)) if len(d) else 0.0,
        "max": int(d.max()) if len(d) else 0,
        "max_over_mean": float(d.max() / d.mean()) if len(d) and d.mean() else 0.0,
        "zero_share": float((d == 0).mean()) if len(d) else 0.0,
        "top1pct_share": float(top1),
        "gini": gini(d),
        "tail_alpha": power_law_alpha(d, xmin) if (d >= xmin).sum() > 1 else float("nan"),
        "tail_xmin": int(xmin),
    }


def read_edge_list(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A SNAP-style edge list (`# comments`, then `source target` per line; .gz allowed)."""
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as fh:
        rows = [line.split() for line in fh if line.strip() and not line.startswith("#")]
    arr = np.array(rows, dtype=np.int64)
    return arr[:, 0], arr[:, 1]


def in_degrees(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """In-degree of every node that appears in the edge list (zeros included)."""
    nodes, inverse = np.unique(np.concatenate([src, dst]), return_inverse=True)
    return np.bincount(inverse[len(src) :], minlength=len(nodes))

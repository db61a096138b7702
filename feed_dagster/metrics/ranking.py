"""Per-impression ranking metrics as the EBNeRD benchmark defines them, vectorised.

For every impression (group) with scores and labels:

* AUC: share of (positive, negative) pairs the scores order correctly, ties counting 0.5.
  Skipped for impressions without a positive or without a negative.
* MRR: sum(label / rank) / sum(label).
* nDCG@k: DCG = sum over the top k of (2^label - 1) / log2(rank + 1), divided by the DCG of
  the ideal order; k is capped at the list length.

MRR and nDCG are skipped for impressions without a positive. Each metric is the mean over
the impressions it is defined for.

Ties: the reference implementation breaks score ties by an unstable sort, i.e. by accident.
Here a tie is scored by its expectation over a uniformly random order of the tied items,
which for AUC is exactly the 0.5 rule. For MRR and nDCG each tied item is credited with
the mean of 1/rank (or of the discount) over the ranks its tie block spans. A constant
scorer therefore earns what a random ranker earns on average, never the luck of the input
order (in EBNeRD the inview order is not random). Without ties all three equal the
reference definitions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

NDCG_KS: tuple[int, ...] = (5, 10)


def _prefix(values: np.ndarray) -> np.ndarray:
    """Prefix sums with a leading 0, so sum(values[a-1 : b]) = P[b] - P[a-1] for ranks a..b."""
    return np.concatenate([[0.0], np.cumsum(values)])


def _block_mean(prefix: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Mean of f(r) for r in [first, last] (1-based ranks), given prefix sums of f."""
    return (prefix[last] - prefix[first - 1]) / (last - first + 1)


def _ranked(df: pl.DataFrame, score_col: str, label_col: str, group_col: str) -> pl.DataFrame:
    score = pl.col(score_col).cast(pl.Float64)
    label = pl.col(label_col).cast(pl.Float64)
    return df.select(
        pl.col(group_col).alias("g"),
        score.alias("s"),
        label.alias("y"),
    ).with_columns(
        # ranks from the top (1 = best); a tie block spans [r_first, r_last]
        r_first=pl.col("s").rank("min", descending=True).over("g").cast(pl.Int64),
        r_last=pl.col("s").rank("max", descending=True).over("g").cast(pl.Int64),
        r_up=pl.col("s").rank("average").over("g"),  # ascending, for AUC
        ideal=pl.col("y").rank("ordinal", descending=True).over("g").cast(pl.Int64),
        n=pl.len().over("g"),
        pos=(pl.col("y") > 0).sum().over("g"),
    )


def evaluate_scores(
    df: pl.DataFrame,
    score_col: str,
    label_col: str = "label",
    group_col: str = "impression_id",
    ks: Sequence[int] = NDCG_KS,
) -> dict[str, float | int]:
    """AUC, MRR and nDCG@k averaged over impressions (rules in the module doc).

    `label_col` holds relevance (bool or non-negative numbers; > 0 is a positive). Returns
    the metric means plus n_impressions (groups seen), n_skipped (groups without a positive
    or without a negative, hence without AUC) and n_no_positive (groups without a positive,
    hence without any metric). A metric defined for no impression is NaN.
    """
    for col in (score_col, label_col, group_col):
        if col not in df.columns:
            raise ValueError(f"evaluate_scores: column '{col}' not in frame {df.columns}")
    null_scores = df.filter(pl.col(score_col).is_null() | pl.col(score_col).is_nan())
    if null_scores.height:
        raise ValueError(
            f"evaluate_scores: column '{score_col}' has {null_scores.height} null/NaN scores; "
            f"first rows: {null_scores.head(5).to_dicts()}"
        )
    r = _ranked(df, score_col, label_col, group_col)
    max_n = int(r["n"].max() or 0)
    ranks = np.arange(1, max_n + 1, dtype=np.float64)
    first = r["r_first"].to_numpy()
    last = r["r_last"].to_numpy()
    y = r["y"].to_numpy()
    gain = np.power(2.0, y) - 1.0
    ideal = r["ideal"].to_numpy()
    cols: dict[str, np.ndarray] = {
        "rr": y * _block_mean(_prefix(1.0 / ranks), first, last),
    }
    for k in ks:
        disc = np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)
        cols[f"dcg{k}"] = gain * _block_mean(_prefix(disc), first, last)
        cols[f"idcg{k}"] = gain * np.where(ideal <= k, 1.0 / np.log2(ideal + 1.0), 0.0)
    r = r.with_columns(pl.Series(name, values) for name, values in cols.items())

    per = (
        r.group_by("g")
        .agg(
            pl.col("n").first(),
            pl.col("pos").first(),
            # Mann-Whitney: sum of ascending average ranks of positives, minus its minimum
            ((pl.col("r_up") * (pl.col("y") > 0)).sum()).alias("rank_sum"),
            pl.col("y").sum().alias("y_sum"),
            pl.col("rr").sum(),
            *[pl.col(f"dcg{k}").sum() for k in ks],
            *[pl.col(f"idcg{k}").sum() for k in ks],
        )
        .with_columns(neg=pl.col("n") - pl.col("pos"))
        .with_columns(
            auc=pl.when((pl.col("pos") > 0) & (pl.col("neg") > 0)).then(
                (pl.col("rank_sum") - pl.col("pos") * (pl.col("pos") + 1) / 2)
                / (pl.col("pos") * pl.col("neg"))
            ),
            mrr=pl.when(pl.col("pos") > 0).then(pl.col("rr") / pl.col("y_sum")),
            **{
                f"ndcg@{k}": pl.when(pl.col("pos") > 0).then(pl.col(f"dcg{k}") / pl.col(f"idcg{k}"))
                for k in ks
            },
        )
    )
    names = ["auc", "mrr", *[f"ndcg@{k}" for k in ks]]
    means = per.select(pl.col(names).mean()).row(0, named=True)
    out: dict[str, float | int] = {
        n: float("nan") if means[n] is None else float(means[n]) for n in names
    }
    out["n_impressions"] = per.height
    out["n_skipped"] = int(per["auc"].is_null().sum())
    out["n_no_positive"] = int((per["pos"] == 0).sum())
    return out


def group_auc(
    df: pl.DataFrame,
    score_col: str,
    label_col: str,
    group_col: str | None = "impression_id",
) -> tuple[float, int, int]:
    """Mean per-group AUC (ties 0.5) -> (auc, n_groups, n_skipped).

    With group_col None the AUC is pooled over all rows (one group), which is the useful
    reading for rare actions where most impressions have no positive.
    """
    score = pl.col(score_col).cast(pl.Float64)
    positive = pl.col(label_col).cast(pl.Float64) > 0
    frame = df.select(
        (pl.col(group_col) if group_col else pl.lit(0)).alias("g"),
        score.alias("s"),
        positive.alias("p"),
    )
    per = (
        frame.with_columns(r=pl.col("s").rank("average").over("g"))
        .group_by("g")
        .agg(
            pl.len().alias("n"),
            pl.col("p").sum().alias("pos"),
            (pl.col("r") * pl.col("p")).sum().alias("rank_sum"),
        )
        .with_columns(neg=pl.col("n") - pl.col("pos"))
        .with_columns(
            auc=pl.when((pl.col("pos") > 0) & (pl.col("neg") > 0)).then(
                (pl.col("rank_sum") - pl.col("pos") * (pl.col("pos") + 1) / 2)
                / (pl.col("pos") * pl.col("neg"))
            )
        )
    )
    mean = per["auc"].mean()
    return (
        float("nan") if mean is None else float(mean),  # type: ignore[arg-type]
        per.height,
        int(per["auc"].is_null().sum()),
    )


def per_action_auc(
    df: pl.DataFrame,
    label_score: Mapping[str, str],
    group_col: str | None = "impression_id",
) -> pl.DataFrame:
    """AUC for several (label column -> score column) pairs, e.g. one per action.

    Returns one row per label: label, score, auc, n_groups, n_skipped. Labels whose column
    is all False get NaN with every group skipped.
    """
    rows = []
    for label, score in label_score.items():
        auc, n, skipped = group_auc(df, score, label, group_col)
        rows.append(
            {"label": label, "score": score, "auc": auc, "n_groups": n, "n_skipped": skipped}
        )
    return pl.DataFrame(
        rows,
        schema={
            "label": pl.String,
            "score": pl.String,
            "auc": pl.Float64,
            "n_groups": pl.Int64,
            "n_skipped": pl.Int64,
        },
    )

"""The promotion gate for a newly trained ranker (pure: tables in, decision out)."""

from __future__ import annotations

import math

import polars as pl

from feed_dagster.metrics.baselines import BASELINES
from feed_dagster.metrics.classic import CLASSIC_METHODS

# A new ranker may be slightly worse than the incumbent (noise between retrains) but no more.
MAX_AUC_REGRESSION = 0.005
MUST_BEAT: tuple[str, ...] = ("popularity", "two_tower")
# The margin by which the candidate must beat each method. An untrained ranker with random
# weights can land a little above weak baselines by luck (on the tiny world one seed scored
# 0.549 AUC against popularity's 0.520); a margin of about the standard error of a
# few-hundred-impression AUC keeps a lucky model out without blocking real ones.
MIN_LIFT = 0.01


def promotion_decision(
    evaluation: pl.DataFrame,
    incumbent_auc: float | None = None,
    candidate: str = "ranker",
    must_beat: tuple[str, ...] = MUST_BEAT,
    beat_all_baselines: bool = True,
    min_lift: float = MIN_LIFT,
    max_regression: float = MAX_AUC_REGRESSION,
    metric: str = "auc",
    max_ne: float | None = 1.0,
) -> tuple[bool, list[str]]:
    """May the candidate ranker be promoted? Returns (passed, one reason per check).

    `evaluation` has one row per method (`method`, `metric`), as `evaluate_models` returns.
    The candidate must beat every method in `must_beat` (which must be present) and, with
    `beat_all_baselines`, every non-learned baseline and classic collaborative-filtering
    peer (popularity_all_time, item_knn, als, ease) in the table, each by at least
    `min_lift`. When a ranker is already promoted it must not be worse than `incumbent_auc`
    (the incumbent evaluated on the same held-out impressions) by more than
    `max_regression`. With `max_ne`, the candidate's click probabilities must also beat a
    constant base-rate prediction (normalized entropy `ne_click` below `max_ne`): ranking
    metrics alone can be passed by an untrained model whose inputs are strong signals on
    their own, its probabilities cannot. A missing comparison fails: the gate never passes
    for lack of evidence.
    """
    values = dict(zip(evaluation["method"].to_list(), evaluation[metric].to_list(), strict=True))
    reasons: list[str] = []
    ok = True
    own = values.get(candidate)
    if own is None or not math.isfinite(own):
        return False, [f"FAIL: no finite {metric} for the candidate {candidate!r}"]
    others = list(must_beat)
    if beat_all_baselines:
        peers = (*BASELINES, *CLASSIC_METHODS)
        others += [m for m in values if m in peers and m not in others]
    for other in others:
        value = values.get(other)
        if value is None or not math.isfinite(value):
            ok = False
            reasons.append(f"FAIL: no {metric} for {other!r} to compare against")
        elif own >= value + min_lift:
            reasons.append(f"ok: {metric} {own:.4f} beats {other} {value:.4f} by >= {min_lift}")
        else:
            ok = False
            reasons.append(
                f"FAIL: {metric} {own:.4f} does not beat {other} {value:.4f} by {min_lift}"
            )
    if max_ne is not None:
        ne = None
        if "ne_click" in evaluation.columns:
            ne = evaluation.filter(pl.col("method") == candidate)["ne_click"][0]
        if ne is None or not math.isfinite(ne):
            ok = False
            reasons.append("FAIL: no normalized entropy (ne_click) for the candidate")
        elif ne < max_ne:
            reasons.append(f"ok: click normalized entropy {ne:.4f} < {max_ne}")
        else:
            ok = False
            reasons.append(
                f"FAIL: click normalized entropy {ne:.4f} >= {max_ne}: the probabilities are "
                "worse than predicting the base rate"
            )
    if incumbent_auc is None:
        reasons.append("ok: no promoted ranker yet")
    elif own >= incumbent_auc - max_regression:
        reasons.append(
            f"ok: {metric} {own:.4f} within {max_regression} of the promoted {incumbent_auc:.4f}"
        )
    else:
        ok = False
        reasons.append(
            f"FAIL: {metric} {own:.4f} is more than {max_regression} below the promoted "
            f"ranker's {incumbent_auc:.4f}"
        )
    return ok, reasons
